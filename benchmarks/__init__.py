"""Benchmarks: scripts that print ratios measured side by side (see docs/benchmarks.md)."""

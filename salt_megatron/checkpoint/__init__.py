"""Checkpoint layout, atomic dist-checkpoint save/load, resumable trainer state."""

"""Evaluation of saved students: perplexity on held-out data (:mod:`.perplexity`)."""

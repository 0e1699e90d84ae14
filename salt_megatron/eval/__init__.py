"""Evaluation of saved students: perplexity on held-out data (:mod:`.perplexity`), bootstrap
intervals of task accuracy (:mod:`.intervals`)."""

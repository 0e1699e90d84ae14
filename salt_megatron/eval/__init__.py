"""Evaluation of saved checkpoints: perplexity on held-out data (:mod:`.perplexity`), task
scores through lm-evaluation-harness (:mod:`.lm_backend`, :mod:`.tasks`; the ``[eval]`` extra),
bootstrap intervals of task accuracy (:mod:`.intervals`)."""

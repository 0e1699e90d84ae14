"""Write the SALT_DS-selected sequences as a new indexed dataset (for ``--kd-data-path``)."""

from __future__ import annotations

import numpy as np

from salt_megatron.data.datasets import build_gpt_datasets
from salt_megatron.data.preprocess import atomic_indexed_builder
from salt_megatron.data.tokenizer import load_tokenizer
from salt_megatron.distill.scoring import ScoreSpec, torch_tokens


def write_selection(
    spec: ScoreSpec, chosen: np.ndarray, output_prefix: str, cache_dir: str
) -> None:
    """Rebuild the scored samples and write the ``chosen`` ones, one document each, in order.

    Each document holds the sample's ``seq_length + 1`` tokens, so a GPTDataset over the output
    with the same sequence length yields the chosen sequences.
    """
    tokenizer = load_tokenizer(spec.tokenizer_model, spec.tokenizer_type)
    dataset = build_gpt_datasets(
        spec.data_path, "1,0,0", spec.seq_length, spec.seed, (None, 0, 0), tokenizer, cache_dir
    )[0]
    if len(dataset) != spec.num_samples:
        raise ValueError(
            f"the data no longer matches the scores: {len(dataset)} samples, scored "
            f"{spec.num_samples} ({spec.data_path})"
        )
    with atomic_indexed_builder(output_prefix, tokenizer) as builder:
        for index in chosen.tolist():
            tokens = torch_tokens(dataset[index])
            builder.add_document(tokens, [len(tokens)])

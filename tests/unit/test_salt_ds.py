"""SALT_DS scoring and selection against float64 references and constructed data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salt_megatron.distill.salt_ds import select_band, sequence_scores, token_losses_and_topk


def _reference(logits: torch.Tensor, labels: torch.Tensor, k: int) -> np.ndarray:
    logp = torch.log_softmax(logits.double(), -1)
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    rank = (logits.double() > logits.double().gather(-1, labels.unsqueeze(-1))).sum(-1)
    member = rank < k  # fewer than k strictly larger logits
    out = []
    for row_loss, row_member in zip(loss, member):
        vals = row_loss[row_member].numpy()
        out.append(np.median(vals) if vals.size else np.nan)
    return np.array(out)


def test_scores_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 64, generator=g) * 3
    labels = torch.randint(0, 64, (6, 40), generator=g)
    loss, member = token_losses_and_topk(logits, labels, k=10)
    ref_loss = -torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(loss.double(), ref_loss, atol=1e-5)
    expected = _reference(logits, labels, 10)
    np.testing.assert_allclose(sequence_scores(loss, member).numpy(), expected, atol=1e-5)


def test_constructed_scores_known_in_advance() -> None:
    # Sequence i: the label's logit is `gap_i` above 63 others at 0 -> loss log(63 e^-gap + 1).
    v, s = 64, 9
    gaps = [3.0, 1.0, 0.0, 5.0]
    logits = torch.zeros(len(gaps), s, v)
    labels = torch.full((len(gaps), s), 7)
    for i, gap in enumerate(gaps):
        logits[i, :, 7] = gap
    logits[2, :, :12] = 10.0  # sequence 2: label 7 ties 11 others above it... all at 10
    logits[2, :, 7] = -5.0  # ...and is now far outside the top-10: no learnable token
    loss, member = token_losses_and_topk(logits, labels, k=10)
    scores = sequence_scores(loss, member).numpy()
    expected = [np.log(63 * np.exp(-g) + 1) for g in gaps]
    np.testing.assert_allclose(scores[[0, 1, 3]], np.array(expected)[[0, 1, 3]], rtol=1e-5)
    assert np.isnan(scores[2])


def test_select_band_quantiles_and_top_fraction() -> None:
    scores = np.array([0.5, np.nan, 2.0, 1.0, 3.0, 4.0, np.nan, 1.5, 2.5, 3.5])
    # finite scores sorted: 0.5 1.0 1.5 2.0 2.5 3.0 3.5 4.0 -> quantiles 0.25..0.75 = [1.375, 3.125]
    assert select_band(scores, 0.25, 0.75).tolist() == [2, 4, 7, 8]
    assert select_band(scores, top_fraction=0.25).tolist() == [5, 9]  # the 2 highest of 8
    assert select_band(scores, 0.0, 1.0).tolist() == [0, 2, 3, 4, 5, 7, 8, 9]
    with pytest.raises(ValueError, match="high_quantile"):
        select_band(scores, 0.8, 0.2)
    with pytest.raises(ValueError, match="no sequence"):
        select_band(np.array([np.nan, np.nan]), 0.1, 0.9)

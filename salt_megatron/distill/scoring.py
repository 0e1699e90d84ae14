"""Run the teacher over a dataset on all ranks and write each sequence's SALT_DS score.

Data parallel over sequences (DP rank r scores the micro-batches r, r + dp, ...), tensor parallel
inside the teacher. Scores stay on the device until a save: every ``save_every`` batches one copy
to the host, and TP rank 0 of each replica (its peers hold the same scores) writes them to the
replica's partial file (scores and a "done" mask), so a killed job resumes where it stopped;
rank 0 merges the partials at the end into ``<out>.npy`` (float64 scores, NaN = no learnable
token) and ``<out>.json`` (what was scored).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from salt_megatron.data.batches import collate, to_device
from salt_megatron.distill.salt_ds import sequence_scores, token_losses_and_topk
from salt_megatron.runtime import device


@dataclass(frozen=True)
class ScoreSpec:
    """What was scored: enough for tools/select_data.py to rebuild the same samples."""

    data_path: list[str]
    seq_length: int
    seed: int
    top_k: int
    num_samples: int
    tokenizer_model: str
    teacher: str
    tokenizer_type: str | None = None


def _save_atomic(path: str, **arrays: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _load_partial(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if os.path.isfile(path):
        with np.load(path) as f:
            if f["scores"].shape == (n,):
                return f["scores"].copy(), f["done"].copy()
    return np.full(n, np.nan), np.zeros(n, dtype=bool)


def score_dataset(
    teacher: Any,
    dataset: Any,
    out: str,
    spec: ScoreSpec,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    tp_group: Any,
    save_every: int = 20,
) -> np.ndarray | None:
    """Score ``dataset``; returns the merged scores on global rank 0 (None elsewhere)."""
    n = len(dataset)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = f"{out}.rank{dp_rank}.npz"
    writer = tp_group is None or dist.get_rank(group=tp_group) == 0
    scores, done = _load_partial(partial, n)
    batches = [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    todo = [b for b in batches[dp_rank::dp_size] if not done[b].all()]
    pending: list[tuple[list[int], torch.Tensor]] = []
    show = dist.get_rank() == 0
    for i, idx in enumerate(tqdm(todo, desc="scoring", disable=not show, unit="batch")):
        batch = to_device(collate([dataset[j] for j in idx]), device())
        logits_sbv = teacher.student_layout_logits(batch["tokens"], batch["position_ids"])
        loss_bs, member_bs = token_losses_and_topk(
            logits_sbv.transpose(0, 1), batch["labels"], spec.top_k, tp_group
        )
        member_bs &= batch["loss_mask"] > 0
        pending.append((idx, sequence_scores(loss_bs, member_bs)))
        if (i + 1) % save_every == 0:
            _flush(pending, scores, done)
            if writer:
                _save_atomic(partial, scores=scores, done=done)
    _flush(pending, scores, done)
    if writer:
        _save_atomic(partial, scores=scores, done=done)
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    return _merge(out, n, dp_size, spec)


def _flush(
    pending: list[tuple[list[int], torch.Tensor]], scores: np.ndarray, done: np.ndarray
) -> None:
    """Copy the scores computed since the last flush to the host (one transfer), mark them done."""
    if not pending:
        return
    idx = [i for rows, _ in pending for i in rows]
    scores[idx] = torch.cat([s for _, s in pending]).cpu().numpy()
    done[idx] = True
    pending.clear()


def _merge(out: str, n: int, dp_size: int, spec: ScoreSpec) -> np.ndarray:
    merged, covered = np.full(n, np.nan), np.zeros(n, dtype=bool)
    for r in range(dp_size):
        scores, done = _load_partial(f"{out}.rank{r}.npz", n)
        merged[done] = scores[done]
        covered |= done
    if not covered.all():
        raise RuntimeError(f"{out}: {int((~covered).sum())} sequences were not scored")
    np.save(out + ".npy", merged)
    with open(out + ".json", "w") as f:
        json.dump(asdict(spec), f, indent=2)
    for r in range(dp_size):
        os.remove(f"{out}.rank{r}.npz")
    return merged


def read_scores(out: str) -> tuple[np.ndarray, ScoreSpec]:
    """The merged scores and what they were computed on."""
    with open(out + ".json") as f:
        spec = ScoreSpec(**json.load(f))
    return np.load(out + ".npy"), spec


def torch_tokens(sample: dict[str, Any]) -> torch.Tensor:
    """The ``seq_length + 1`` tokens of a GPT sample (inputs followed by the last label)."""
    tokens = torch.as_tensor(sample["tokens"])
    labels = torch.as_tensor(sample["labels"])
    return torch.cat([tokens, labels[-1:]])

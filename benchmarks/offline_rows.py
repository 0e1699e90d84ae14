"""The offline rows of ``benchmarks/teacher_overhead.py``: KD steps on stored teacher targets.

The online trainer's teacher stores the top-k targets of the samples a second trainer will read
(the pass of ``tools/save_teacher_targets.py``, timed), and that trainer, built with
``--kd-targets`` and no teacher, is timed like the online one (KD on stored targets / plain).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.overhead_tables import ms

DOC = (
    "Offline rows (`--kd-targets`): the online trainer's teacher stores its top-{k} targets of "
    "the samples a second trainer reads (`salt_megatron.distill.targets.save_targets`, the "
    "tool's pass, timed: one-off ms per optimizer step of samples), then that trainer, without a "
    "teacher, is timed like the online one (its plain blocks read the same batches, targets "
    "unused). The store is in the default format (float16 log-probabilities, no top-p: k ids "
    "per token of a random teacher); bytes/token on disk in the last column."
)


def steps_read(steps: int, rounds: int) -> int:
    """Optimizer steps a timed trainer takes: the warm-up (1 plain, 2 KD), then ``rounds``
    blocks of ``steps`` plain and ``steps`` KD steps (each step reads a global batch)."""
    return 3 + 2 * steps * rounds


def store_targets(
    trainer: Any, root: str, n_steps: int, gbs: int, top_k: int, temperature: float
) -> float:
    """Store the teacher's top-``top_k`` targets of the first ``n_steps`` global batches of
    ``trainer``'s data under ``root`` (collective; the online trainer's teacher and layout).
    Returns the seconds of the pass."""
    import torch.distributed as dist

    from salt_megatron.data.teacher_targets import TargetSpec, write_spec
    from salt_megatron.distill.targets import save_targets

    lay, dataset = trainer.layout, trainer.train_ds
    spec = TargetSpec(
        teacher="benchmark", tokenizer_fingerprint="", dataset_fingerprint="",
        dataset_length=len(dataset), num_samples=n_steps * gbs,
        seq_length=trainer.cfg.data.seq_length, vocab_size=trainer.vocab_size,
        temperature=temperature, top_k=top_k, top_p=None, samples_per_shard=gbs,
    )  # fmt: skip
    if dist.get_rank() == 0:
        write_spec(root, spec)
    dist.barrier()
    start = time.perf_counter()
    mbs = trainer.cfg.training.micro_batch_size
    save_targets(trainer.kd.step_fn.teacher, dataset, root, spec, mbs, lay.dp_rank, lay.dp,
                 lay.tp_group, lay.tp_rank == 0)  # fmt: skip
    return time.perf_counter() - start


def bytes_per_token(root: str) -> float:
    """Bytes on disk per stored token of the store ``root`` (its shards' files)."""
    from salt_megatron.data.teacher_targets import read_spec
    from salt_megatron.distill.targets import store_summary

    return store_summary(root, read_spec(root))["bytes_per_token"]


def offline_trainer(flags: list[str], targets: str, n_steps: int, dataset: Any, vocab: int) -> Any:
    """A trainer of the student ``flags`` whose first ``n_steps`` steps are KD steps on the
    stored ``targets`` (no teacher)."""
    import torch.distributed as dist

    from salt_megatron.config import parse_config
    from salt_megatron.data.teacher_targets import TargetStore
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([*flags, "--kd-targets", targets, "--kd-steps", str(n_steps)])
    cfg.validate_world(dist.get_world_size())
    return Trainer(cfg, (dataset, None), vocab, kd_targets=TargetStore(targets))


def offline_table(rows: list[dict], top_k: int) -> str:
    """The offline rows (those of ``rows`` that have them) as a Markdown table."""
    lines = [
        f"| world | TP | teacher TP | student | teacher | plain ms | offline KD ms (k={top_k}) "
        "| offline/plain (paired median) | online KD / plain | one-off teacher pass ms/step "
        "| store bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "off_kd" not in r:
            continue
        lay = r["layout"]
        lines.append(
            f"| {lay.world} | {lay.tp} | {lay.ttp} | {r['student']} | {r['teacher']} "
            f"| {ms(r['off_plain'])} | {ms(r['off_kd'])} "
            f"| {r['off_kd'] / r['off_plain']:.2f} ({r['off_paired']:.2f}) | {r['ratio']:.2f} "
            f"| {ms(r['pass_s'] / r['pass_steps'])} | {r['store_bytes_per_token']:.1f} |"
        )
    return "\n".join(lines)

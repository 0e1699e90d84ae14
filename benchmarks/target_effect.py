"""The stored-target controls of docs/results.md (issue 24): how two stores of the same targets
differ, and a store of the demo's run-to-run noise.

``compare REF OTHER``: sample by sample over every stored sample, the ids (the same set per
token, the same top-1 in slot 0), the L1 distance of OTHER's target distributions (kept ids and
the residual) from REF's (mean and max per token), the mean error of the top-1's log-probability
and of the target's entropy over all tokens (a biased code shows as a mean many standard errors
from 0), and whether REF's values rounded to float16 equal OTHER's bit for bit (the check that a
float16 store holds exactly the rounded float32 targets).

``students DIR --pair REF OTHER ...``: students (run directories in DIR with a
``metrics.jsonl``, e.g. the ``salt_offline_<name>`` of ``tools/demo.py --stored-only``) side by
side: each pair's final validation loss, the mean over its last five evaluations, and OTHER
minus REF; then the mean and the spread of the differences over the pairs (pair students of the
same seed).

``perturb SRC OUT``: a float32 copy of the float32 store SRC with every log-probability moved by
one float32 ulp, up or down at random (``--seed``): a perturbation no format makes, whose student
shows how far the demo's final loss moves from noise alone.

    cd runs/demo/full  # after tools/demo.py and its --stored-only runs
    python ../../../benchmarks/target_effect.py compare targets_float32 targets_q8
    python ../../../benchmarks/target_effect.py perturb targets_float32 targets_ulp
    python ../../../benchmarks/target_effect.py students . \
        --pair salt_offline_float16_seed2 salt_offline_q8_seed2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data import teacher_targets as store


def _by_id(ids_tk: np.ndarray, logq_tk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's slots sorted by id, empty slots last."""
    order = np.argsort(np.where(ids_tk >= 0, ids_tk, 1 << 30), axis=1, kind="stable")
    return np.take_along_axis(ids_tk, order, 1), np.take_along_axis(logq_tk, order, 1)


def _token_stats(ref: dict, other: dict) -> dict[str, np.ndarray]:
    """Per token of one sample: L1 distance, top-1 log error, entropy error, float16 equality."""
    ids_r, lq_r = (ref[k].numpy() for k in store.TARGET_KEYS[:2])
    ids_o, lq_o = (other[k].numpy() for k in store.TARGET_KEYS[:2])
    if not np.array_equal(ids_r[:, 0], ids_o[:, 0]):
        raise SystemExit("the stores' top-1 ids differ: not the same targets")
    (ids_r, lq_r), (ids_o, lq_o) = _by_id(ids_r, lq_r), _by_id(ids_o, lq_o)
    if not np.array_equal(ids_r, ids_o):
        raise SystemExit("the stores' kept ids differ: not the same targets")
    kept = ids_r >= 0
    lq_r64, lq_o64 = (np.where(kept, x.astype(np.float64), 0.0) for x in (lq_r, lq_o))
    q_r, q_o = np.exp(lq_r64) * kept, np.exp(lq_o64) * kept
    r_r, r_o = (x["kd_residual"].numpy().astype(np.float64) for x in (ref, other))
    top = np.argmax(np.where(kept, lq_r64, -np.inf), axis=1)[:, None]
    return {
        "l1": np.abs(q_o - q_r).sum(1) + np.abs(r_o - r_r),
        "top": (np.take_along_axis(lq_o64, top, 1) - np.take_along_axis(lq_r64, top, 1))[:, 0],
        "entropy": (q_r * lq_r64).sum(1) - (q_o * lq_o64).sum(1),
        "f16": np.all(~kept | (lq_r.astype(np.float16) == lq_o), 1),
        "resid": (r_o == r_r) | (r_o == r_r.astype(np.float32).astype(np.float16)),
    }


def compare(ref_root: str, other_root: str) -> None:
    ref, other = store.TargetStore(ref_root), store.TargetStore(other_root)
    if ref.spec.covered != other.spec.covered:
        raise SystemExit(f"{ref.spec.covered} vs {other.spec.covered} samples")
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(ref.spec.covered):
        for key, value in _token_stats(ref.sample(i), other.sample(i)).items():
            parts.setdefault(key, []).append(value)
    s = {key: np.concatenate(v) for key, v in parts.items()}
    n = s["l1"].size
    print(f"{other_root} against {ref_root}: {ref.spec.covered} samples, {n} tokens, the same "
          "ids (sets per token, top-1 in slot 0)")  # fmt: skip
    print(f"  L1 of the target distributions per token: mean {s['l1'].mean():.3e}, "
          f"max {s['l1'].max():.3e}")  # fmt: skip
    for key, what in (("top", "top-1 log-probability"), ("entropy", "entropy (nats)")):
        err = s[key]
        print(f"  {what} error: mean {err.mean():+.2e} (standard error "
              f"{err.std() / np.sqrt(n):.1e}), sd {err.std():.2e}")  # fmt: skip
    same, resid = int(s["f16"].sum()), int(s["resid"].sum())
    print(f"  tokens whose log-probabilities are the reference's rounded to float16, bit for bit: "
          f"{same} of {n}" + (" (all)" if same == n else ""))  # fmt: skip
    print(f"  tokens whose residual is the reference's, or its float16 rounding: {resid} of {n}"
          + (" (all)" if resid == n else ""))  # fmt: skip


def perturb(src_root: str, out_root: str, seed: int) -> None:
    src = store.TargetStore(src_root)
    if src.spec.logprob_format != "float32":
        raise SystemExit(f"{src_root} is {src.spec.logprob_format}, perturb needs float32")
    spec = replace(src.spec, command=f"python benchmarks/target_effect.py perturb {src_root} "
                                     f"{out_root} --seed {seed}")  # fmt: skip
    store.write_spec(out_root, spec)
    rng = np.random.default_rng(seed)
    for shard in range(spec.num_shards):
        ids, logq, resid, sums = src.read_shard(shard)
        toward = np.where(rng.random(logq.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        moved = np.where(ids >= 0, np.minimum(np.nextafter(logq, toward), 0.0), logq)
        store.write_shard(out_root, spec, shard, ids, moved.astype(np.float32), resid, sums)
    print(f"{out_root}: {spec.covered} samples, every log-probability one ulp from {src_root}'s")


def students(root: Path, pairs: list[list[str]]) -> None:
    from tools.runs import Curve

    print("| REF | OTHER | REF final | OTHER final | OTHER - REF, final | OTHER - REF, mean of "
          "the last 5 evaluations |\n|---|---|---|---|---|---|")  # fmt: skip
    finals, lasts = [], []
    for ref, other in pairs:
        a, b = (Curve.read(root / name / "metrics.jsonl", 0.0) for name in (ref, other))
        if a.steps != b.steps:
            raise SystemExit(f"{ref} and {other} were evaluated at other steps")
        finals.append(b.losses[-1] - a.losses[-1])
        lasts.append(float(np.mean(b.losses[-5:]) - np.mean(a.losses[-5:])))
        print(f"| {ref} | {other} | {a.losses[-1]:.4f} | {b.losses[-1]:.4f} | {finals[-1]:+.4f} | "
              f"{lasts[-1]:+.4f} |")  # fmt: skip
    for what, d in (("final", finals), ("mean of the last 5", lasts)):
        sd = np.std(d, ddof=min(1, len(d) - 1))
        print(f"{what}: mean difference {np.mean(d):+.4f}, sd {sd:.4f}, range {min(d):+.4f} to "
              f"{max(d):+.4f} over {len(d)} pairs")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cmp_ = sub.add_parser("compare", help="how OTHER's targets differ from REF's")
    cmp_.add_argument("ref")
    cmp_.add_argument("other")
    per = sub.add_parser("perturb", help="a float32 copy one ulp away, at random")
    per.add_argument("src")
    per.add_argument("out")
    per.add_argument("--seed", type=int, default=1)
    stu = sub.add_parser("students", help="stored-target students side by side, paired")
    stu.add_argument("root", type=Path)
    stu.add_argument("--pair", nargs=2, action="append", required=True, metavar=("REF", "OTHER"))
    args = parser.parse_args(argv)
    if args.what == "compare":
        compare(args.ref, args.other)
    elif args.what == "students":
        students(args.root, args.pair)
    else:
        perturb(args.src, args.out, args.seed)


if __name__ == "__main__":
    main()

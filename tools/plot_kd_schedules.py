"""Plot w(t) of each KD schedule (docs/img/kd_schedules.png), from salt_megatron's own formulas.

python tools/plot_kd_schedules.py [--out docs/img/kd_schedules.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from salt_megatron.distill.schedule import kd_weight  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "kd_schedules.png")
    parser.add_argument("--w0", type=float, default=0.5)
    parser.add_argument("--n-kd", type=int, default=36_000)
    parser.add_argument("--decay-start", type=int, default=0)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(0, int(args.n_kd * 1.25), max(1, args.n_kd // 400)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("step", "linear", "linear_ratio"):
        w = [kd_weight(t, args.w0, args.n_kd, name, args.decay_start) for t in steps]
        ax.plot(steps, w, label=name)
    ax.axvline(args.n_kd, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step t")
    ax.set_ylabel("KD weight w(t)")
    ax.set_title(f"w0 = {args.w0}, n_kd = {args.n_kd}, decay start = {args.decay_start}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()

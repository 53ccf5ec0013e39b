"""Loss curves of distill.py runs: one panel per stage (1, 2, 3), one line per run folder.

Reads `RUN/stageK/log.jsonl` (written by distill.py, one {"step", "loss", "lr", "time"} per step)
and draws a moving average of the loss. Stages 1-2: layer-wise MSE (x mse_scale, summed over layers);
stage 3: per-token KL(teacher || student).

Run:
    python experiments/plot_distill.py runs/linear runs/hybrid --out experiments/distill_curves.png
"""
from __future__ import annotations

import argparse
import json
import os


def read_log(path: str) -> list[dict]:
    """The per-step records of one stage's log.jsonl; names the file if a line is broken."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e})") from None
    return rows


def smooth(ys: list[float], k: int) -> list[float]:
    """Trailing moving average over k steps (the first k-1 points average what exists)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by distill.py (each with stage1..3/log.jsonl)")
    p.add_argument("--out", default="experiments/distill_curves.png", help="PNG to write")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window in steps")
    args = p.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {1: "stage 1: layer-wise MSE, new params", 2: "stage 2: layer-wise MSE, whole mixer",
              3: "stage 3: end-to-end per-token KL"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, stage in zip(axes, (1, 2, 3)):
        for run in args.runs:
            path = os.path.join(run, f"stage{stage}", "log.jsonl")
            if not os.path.exists(path):
                continue
            rows = read_log(path)
            ax.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows], args.smooth),
                    label=os.path.basename(os.path.normpath(run)))
        ax.set_title(titles[stage])
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(f"loss ({args.smooth}-step mean)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Does the student remember? Recall across many images, where a fixed-size state is stressed.

Not in the paper, whose benchmarks are short. Every prompt here holds K images (one "<image>" tag
each, ~66 tokens per image) and a question about a needle among them (data.py's `recall`):
"What color is the square?" where the only square of all K images is in one of them, or "What
shape is the red object?" likewise. Text models are probed the same way (needle in a haystack).

The teacher (fine-tuned on the training mix, K <= 8: python -m teacher.train --task mix) and the
students distilled from it on the same mix (mmMamba-linear, and mmMamba-hybrid keeping 2 of 8
attention layers) are scored at K = 1, 2, 4, 8 (the training range), 16, 32, 64 and 128 images
(up to ~8.5K tokens), prompts prefilled in segments of 2,048 tokens (Model.generate). The needle's
image goes round-robin over the first, the middle (K // 2 + 1) and the last, so each point also
says whether a decaying state forgets the oldest images first. A linear student carries 8 layers
x 6 heads x 32 x 32 numbers of state whatever K is; the teacher's KV cache grows with K.

Writes results/recall/<model>_K<K>.json (a point already there is skipped), recall.png and
table.md; prints the table.

Run (from the repository root):
    python experiments/recall.py                       # every point (hours on 2 CPU cores)
    python experiments/recall.py --ks 1 2 --n 12 --out /tmp/recall    # a smoke run
    python experiments/recall.py --report-only         # table and plot from the JSON
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
import data  # noqa: E402
from convert import load_model  # noqa: E402
from evaluate import evaluate  # noqa: E402
from utils import arg, git_commit, parse_config, read_json, run_main, write_json  # noqa: E402

POSITIONS = ("first", "middle", "last")


@dataclass
class RecallConfig:
    models: list[str] = arg(["teacher=checkpoints/teacher_multi",
                             "linear=runs/recall/linear/stage3/model",
                             "hybrid=runs/recall/hybrid/stage3/model"],
                            "name=checkpoint folder, one curve each")
    ks: list[int] = arg([1, 2, 4, 8, 16, 32, 64, 128], "images per prompt, one point each")
    n: int = arg(200, "questions per point")
    train_max: int = arg(8, "the largest K of the training mix (shaded in the plot)")
    seed: int = arg(0, "seed of the test stream")
    out: str = arg("results/recall", "one JSON per (model, K), recall.png, table.md")
    report_only: bool = arg(False, "only rebuild the table and the plot from the JSON")


def target_index(position: str, n_images: int) -> int:
    """The 0-based index of the image asked about."""
    if position == "first":
        return 0
    if position == "middle":
        return n_images // 2
    return n_images - 1


def questions(n_images: int, n: int, seed: int) -> list:
    """n test prompts with n_images images; the asked position goes round-robin over POSITIONS."""
    cfg = data.DataConfig()
    samples = []
    for i in range(n):
        target = target_index(POSITIONS[i % len(POSITIONS)], n_images)
        samples.append(data.multi_sample_at(cfg, "test", seed, i, n_images, target))
    return samples


def score_point(folder: str, n_images: int, n: int, seed: int) -> dict:
    """Accuracy of one model at one K: overall, per category, per asked position."""
    model = load_model(folder).float().eval()
    samples = questions(n_images, n, seed)
    t0 = time.time()
    result = evaluate(model, samples, batch_size=max(2, 128 // n_images))
    hits = [data.normalize_answer(p) == data.normalize_answer(s.answer)
            for s, p in zip(samples, result["predictions"])]
    by_position = {}
    for k, position in enumerate(POSITIONS):
        mine = hits[k::len(POSITIONS)]
        by_position[position] = sum(mine) / len(mine)
    prompt_tokens = len(data.chat_ids(samples[0].turns, last_answer=False, n_images=n_images)[0])
    return {"folder": folder, "K": n_images, "n": n, "seed": seed, "prompt_tokens": prompt_tokens,
            "accuracy": sum(hits) / n, "by_category": result["accuracy"],
            "by_position": by_position, "seconds": round(time.time() - t0, 1),
            "commit": git_commit()}


def point_path(cfg: RecallConfig, name: str, n_images: int) -> str:
    return os.path.join(cfg.out, f"{name}_K{n_images}.json")


def table(cfg: RecallConfig, points: dict) -> str:
    """Markdown: one row per K, per model its accuracy and (first / middle / last)."""
    names = [spec.split("=")[0] for spec in cfg.models]
    head = "| K | prompt tokens | " + " | ".join(f"{m} % (first / middle / last)" for m in names)
    lines = [head + " |", "| ---: | ---: |" + " ---: |" * len(names)]
    for n_images in cfg.ks:
        row = [p for p in (points.get((m, n_images)) for m in names) if p]
        if not row:
            continue
        cells = []
        for m in names:
            p = points.get((m, n_images))
            if p is None:
                cells.append("-")
                continue
            parts = " / ".join(f"{100 * p['by_position'][q]:.0f}" for q in POSITIONS)
            cells.append(f"{100 * p['accuracy']:.1f} ({parts})")
        lines.append(f"| {n_images} | {row[0]['prompt_tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cfg: RecallConfig, points: dict) -> str:
    """recall.png: accuracy against K per model (training range shaded); right, by position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    styles = {"first": ":", "middle": "--", "last": "-"}
    for k, spec in enumerate(cfg.models):
        name = spec.split("=")[0]
        ks = [n for n in cfg.ks if (name, n) in points]
        color = f"C{k}"
        left.plot(ks, [100 * points[name, n]["accuracy"] for n in ks], "o-", color=color, label=name)
        for position, style in styles.items():
            acc = [100 * points[name, n]["by_position"][position] for n in ks]
            right.plot(ks, acc, style, color=color, label=f"{name}, {position}")
    for ax in (left, right):
        ax.axvspan(min(cfg.ks) / 1.3, cfg.train_max * 1.15, color="grey", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("images in the prompt, K (shaded: the training range)")
        ax.grid(alpha=0.3)
    left.set_ylabel("accuracy, % (exact match)")
    left.set_title(f"recall across K images ({cfg.n} questions per point)")
    right.set_title("by the image asked about")
    left.legend()
    right.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = os.path.join(cfg.out, "recall.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    cfg = parse_config(RecallConfig, argv, "Recall across many images: teacher, linear, hybrid.")
    points = {}
    for spec in cfg.models:
        name, folder = spec.split("=", 1)
        for n_images in cfg.ks:
            path = point_path(cfg, name, n_images)
            if not os.path.exists(path) and not cfg.report_only:
                print(f"{name} at K = {n_images} ...", flush=True)
                write_json(path, score_point(folder, n_images, cfg.n, cfg.seed))
            if os.path.exists(path):
                points[name, n_images] = read_json(path)
    text = table(cfg, points)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"plot: {plot(cfg, points)}")
    return points


if __name__ == "__main__":
    run_main(main)

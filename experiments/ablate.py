"""The paper's ablations (Tables 3-6) in miniature, by one command, with error bars over seeds.

    Table 3  which stages matter: none, 1, 2, 3, 1+2, 1+3, 2+3, 1+2+3, each from the freshly seeded
             (inherit+mimic) all-Mamba-2 student
    Table 4  which initialisation: scratch, inherit, inherit+mimic (seed.py), each through stages 1-3
    Table 5  how many attention layers a hybrid keeps: 0, 1, 2, 4 of 8 (head-interleaved), and the
             teacher (8 of 8)
    Table 6  where, for k = 1 and k = 2: the paper's four placements and a fifth, data-chosen one
             ("auto": choose_attention_layers below keeps attention where swapping the stage-2
             mixer into the teacher raises the output KL most)

Every row uses distill.py's default recipe on the bundled teacher and is scored on the same test
questions (200 per category, greedy, exact match). A seed changes the student's random starting
values and the order of the training data. Work is shared: a student is trained once per
(initialisation, stage chain, kept layers) and reused by every row that starts from it (stage
1 -> 2 -> 3 gives three Table 3 rows; the stage-2 student is shared by Tables 4-6).

Writes one JSON per (table, row, seed) under results/ablation/ (rows already there are skipped, so
an interrupted or spread-out run completes without redoing work), and results/ablation/tables.md:
our rows (mean +- std over seeds) beside the paper's, and a verdict per ordering the paper claims.

It drives the library (distill.py, seed.py, model.py) and is not part of it, like the other scripts here.

Run (from the repository root):
      python experiments/ablate.py                        # all four tables, seeds 0 1 2 (hours on a CPU)
      python experiments/ablate.py --tables 3 --seeds 0   # one table, one seed
      python experiments/ablate.py --report-only          # rebuild tables.md from the JSON
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
import distill  # noqa: E402
import evaluate  # noqa: E402
from convert import load_model  # noqa: E402
from model import PLACEMENTS, Model, make_layers  # noqa: E402
from seed import seed_student  # noqa: E402
from utils import arg, git_commit, parse_config, read_json, run_main, write_json  # noqa: E402

CATS = ("exist", "count", "color", "shape", "position", "text", "reason")
PAPER_METRICS = ("MME", "POPE", "TextVQA", "SQA-I")
PAPER = {  # mmMamba Tables 3-6 (HoVLE teacher: MME 1433.5, POPE 87.6, TextVQA 66.0, SQA-I 94.8)
    "3": {"none": None, "1": (969.8, 70.6, 13.47, 40.8), "2": (1007.1, 72.9, 25.5, 52.1),
          "3": (1188.4, 83.0, 40.0, 63.4), "1+2": (1108.9, 75.3, 28.0, 59.3), "1+3": (1263.1, 84.0, 42.5, 77.1),
          "2+3": (1255.5, 83.5, 41.1, 72.1), "1+2+3": (1303.5, 85.2, 47.7, 79.2)},
    "4": {"scratch": (1214.0, 83.1, 40.0, 67.4), "inherit": (1222.6, 84.0, 41.9, 73.3),
          "inherit+mimic": (1303.5, 85.2, 47.7, 79.2)},
    "5": {"0": (1303.5, 85.2, 47.7, 79.2), "1": (1304.3, 85.5, 48.0, 79.3), "2": (1318.4, 86.3, 48.4, 79.9),
          "4": (1329.1, 86.8, 51.5, 82.8), "teacher": (1433.5, 87.6, 66.0, 94.8)},
    "6": {"tail-stacked": (1305.5, 85.9, 53.7, 79.4), "head-stacked": (1329.4, 85.9, 55.0, 80.8),
          "tail-interleaved": (1308.3, 86.1, 55.0, 86.5), "head-interleaved": (1371.1, 86.7, 55.1, 86.9)},
}
PAPER_NOTE = {  # how our rows line up with the paper's
    "3": "the paper's rows 1-8, its check marks read as: none, 1, 2, 3, 1+2, 1+3, 2+3, all; no training is NaN there",
    "5": "ours keep k of 8 layers, the paper's k of 32; its 8-of-32 hybrid row is not shown",
    "6": "the paper keeps 8 of 32 layers: its rows are set beside our k = 2 rows; it has no data-chosen placement"}


@dataclass
class AblationConfig:
    tables: list[str] = arg(["3", "4", "5", "6"], "paper tables to run")
    seeds: list[int] = arg([0, 1, 2], "seeds: each one trains every row once")
    teacher: str = arg("checkpoints/teacher", "teacher checkpoint folder")
    work: str = arg("runs/ablation", "trained students (not committed)")
    results: str = arg("results/ablation", "one JSON per (table, row, seed), and tables.md")
    eval_per_category: int = arg(200, "test questions per category")
    steps: int | None = arg(None, "override every stage's steps (tests; default: the recipe's)")
    batch_size: int | None = arg(None, "override every stage's batch size (tests)")
    report_only: bool = arg(False, "only rebuild tables.md from the JSON")


@dataclass(frozen=True)
class Row:
    table: str
    name: str
    init: str = "inherit+mimic"
    stages: tuple = (1, 2, 3)
    n_attn: int = 0
    placement: str = "head-interleaved"


def rows(tables: list, n_layers: int) -> list:
    """The rows of each paper table for a teacher of n_layers layers."""
    out = []
    if "3" in tables:
        chains = {"none": (), "1": (1,), "2": (2,), "3": (3,), "1+2": (1, 2), "1+3": (1, 3), "2+3": (2, 3),
                  "1+2+3": (1, 2, 3)}
        out += [Row("3", name, stages=chain) for name, chain in chains.items()]
    if "4" in tables:
        out += [Row("4", mode, init=mode) for mode in ("scratch", "inherit", "inherit+mimic")]
    if "5" in tables:
        out += [Row("5", str(k), n_attn=k) for k in (0, 1, 2, 4) if k < n_layers] + [Row("5", "teacher", stages=None)]
    if "6" in tables:
        out += [Row("6", f"{p}, k={k}", n_attn=k, placement=p) for k in (1, 2) if k < n_layers
                for p in PLACEMENTS + ("auto",)]
    return out


@torch.no_grad()
def choose_attention_layers(student: Model, teacher: Model, k: int, seed: int = 0, n_batches: int = 4) -> list:
    """Table 6's fifth, data-chosen placement (not in the paper): the k layers whose linearisation
    costs the most. For each layer i, swap the teacher's attention in layer i alone for the
    student's (stage-2) mixer and measure the per-token KL from the intact teacher on training
    batches; keep attention where that KL is largest. It asks what stage 3 is judged on (the output
    distribution) in the context of every other layer, which a per-layer MSE cannot: layers differ
    in scale and in how much of their error the rest of the network undoes."""
    cfg = distill.TrainConfig(stage="3", seed=seed, data="")
    batches = [distill.train_batch(s, cfg, 0, 1, None) for s in range(n_batches)]
    logits = [teacher(b["input_ids"], b["pixel_values"]) for b in batches]
    kl = []
    for i in range(teacher.cfg.n_layers):
        kept = teacher.layers[i]
        teacher.layers[i] = student.layers[i]                                       # swap one layer in ...
        try:
            sums = []
            counts = []
            for t, b in zip(logits, batches):
                s, n = distill.kl_per_token(t, teacher(b["input_ids"], b["pixel_values"]), b["attention_mask"])
                sums.append(s)
                counts.append(n)
        finally:
            teacher.layers[i] = kept                                                # ... and back
        kl.append((sum(sums) / sum(counts)).item())
    order = sorted(range(len(kl)), key=lambda i: -kl[i])
    print("layer swap KL (student mixer in one teacher layer): "
          + ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(kl)))
    return sorted(order[:k])


class Suite:
    """Trains each student once (on disk under work/seed<s>/...) and scores each row."""

    def __init__(self, cfg: AblationConfig):
        self.cfg, self.teacher = cfg, distill.load_teacher(cfg.teacher)
        self.tests = evaluate.test_samples(cfg.eval_per_category)

    def score(self, model) -> tuple:
        t0 = time.time()
        result = evaluate.accuracy(model, self.tests)
        return result, time.time() - t0

    def keep(self, row: Row, seed: int) -> list:
        """The attention layers the row's hybrid keeps (auto: measured once per seed and k)."""
        if not row.n_attn:
            return []
        if row.placement != "auto":
            return [i for i, k in enumerate(make_layers(self.teacher.cfg.n_layers, row.n_attn, row.placement))
                    if k == "attn"]
        path = os.path.join(self.cfg.work, f"seed{seed}", f"auto_k{row.n_attn}.json")
        if not os.path.exists(path):
            stage2, _ = self.student(row.init, (1, 2), [], seed)
            write_json(path, {"keep": choose_attention_layers(stage2, self.teacher, row.n_attn, seed)})
        return read_json(path)["keep"]

    def student(self, init: str, stages: tuple, keep: list, seed: int) -> tuple:
        """(model, {run folder: stage seconds}) after `stages` from the seeded student; `keep`
        (attention layers) applies from stage 3 on. Every trained stage is kept on disk and reused."""
        if not stages:
            g = torch.Generator().manual_seed(seed)
            return seed_student(self.teacher, ["mamba2"] * self.teacher.cfg.n_layers, init, g), {}
        prefix = ("-".join(f"s{k}" for k in stages) + (f"@attn{','.join(map(str, keep))}" if keep else ""))
        out = os.path.join(self.cfg.work, f"seed{seed}", init, prefix)
        cfg = distill.TrainConfig(stage=str(stages[-1]), out=out, teacher=self.cfg.teacher, init=init, seed=seed,
                                  steps=self.cfg.steps, batch_size=self.cfg.batch_size, eval_per_category=0,
                                  resume=True)
        summary_path = os.path.join(cfg.stage_dir, "summary.json")
        parent_keep = keep if len(stages) > 1 and stages[-2] == 3 else []
        parent, seconds = self.student(init, stages[:-1], parent_keep, seed)
        if not os.path.exists(summary_path):
            if keep and stages[-1] == 3 and not parent_keep:
                distill.keep_attention(parent, self.teacher, keep)
            distill.run_stage(cfg, self.teacher, parent)
        seconds[cfg.stage_dir] = read_json(summary_path)["seconds"]
        return load_model(os.path.join(cfg.stage_dir, "model")).float(), seconds

    def run_row(self, row: Row, seed: int, path: str, teacher_mean: float) -> None:
        if row.stages is None:                                   # the teacher itself
            model, runs, keep = self.teacher, {}, list(range(self.teacher.cfg.n_layers))
        else:
            keep = self.keep(row, seed)
            model, runs = self.student(row.init, row.stages, keep, seed)
        result, eval_s = self.score(model)
        trained = [read_json(os.path.join(d, "summary.json"))["stage"] for d in runs]   # in training order
        write_json(path, {"table": row.table, "row": row.name, "seed": seed, "init": row.init,
                          "stages": list(row.stages or []), "trained": trained, "attention_layers": keep,
                          "placement": row.placement if row.n_attn else None, **result,
                          "retention": result["mean"] / max(teacher_mean, 1e-9), "train_s": sum(runs.values()),
                          "stage_seconds": {os.path.relpath(d, self.cfg.work): t for d, t in runs.items()},
                          "eval_s": round(eval_s, 1), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M")})
        print(f"table {row.table} | {row.name} | seed {seed}: mean {100 * result['mean']:.1f}% "
              f"(teacher {100 * teacher_mean:.1f}%)")


def row_path(cfg: AblationConfig, row: Row, seed: int) -> str:
    slug = row.name.replace(", ", "_").replace("=", "").replace(" ", "_")
    return os.path.join(cfg.results, f"table{row.table}", slug, f"seed{seed}.json")


def main(argv=None) -> dict:
    cfg = parse_config(AblationConfig, argv, "The paper's ablation tables 3-6 on the bundled teacher.")
    n_layers = load_model(cfg.teacher).cfg.n_layers
    todo = [(r, s) for s in cfg.seeds for r in rows(cfg.tables, n_layers)
            if not os.path.exists(row_path(cfg, r, s))]
    if todo and not cfg.report_only:
        suite = Suite(cfg)
        tpath = os.path.join(cfg.results, "teacher.json")
        if not os.path.exists(tpath):
            write_json(tpath, suite.score(suite.teacher)[0])
        print(f"{len(todo)} rows to run ({sum(1 for s in cfg.seeds for _ in rows(cfg.tables, n_layers)) - len(todo)} "
              f"already done)")
        for row, seed in todo:
            suite.run_row(row, seed, row_path(cfg, row, seed), read_json(tpath)["mean"])
    return report(cfg, n_layers)


# ----------------------------------------------------------------------------------------------
# The report: Markdown tables beside the paper's, and a verdict per claimed ordering

CLAIMS = {  # table: (the paper's claim, [(better row, worse row), ...]) on the mean accuracy
    "3": ("all three stages are best", [("1+2+3", r) for r in ("1", "2", "3", "1+2", "1+3", "2+3")]),
    "4": ("inherit+mimic > inherit > scratch", [("inherit+mimic", "inherit"), ("inherit", "scratch")]),
    "5": ("more attention layers are better", [("1", "0"), ("2", "1"), ("4", "2"), ("teacher", "4")]),
    "6": ("head-interleaved is the best placement",
          [(f"head-interleaved, k={k}", f"{p}, k={k}") for k in (1, 2)
           for p in ("tail-interleaved", "head-stacked", "tail-stacked")]),
}


def verdict(a: list, b: list, n: int) -> tuple:
    """(verdict, difference of means, noise): "holds" when mean(a) - mean(b) exceeds the noise,
    "does not hold" when it is below minus the noise, else "within noise". The noise is the larger of
    the pooled standard deviation over seeds, sqrt((std_a^2 + std_b^2) / 2), and the sampling standard
    deviation of a difference of two accuracies p on n test questions, sqrt(2 p (1 - p) / n), so
    that one seed is judged against the test set's own noise."""
    sd = lambda x: statistics.stdev(x) if len(x) > 1 else 0.0
    diff, p = statistics.mean(a) - statistics.mean(b), (statistics.mean(a) + statistics.mean(b)) / 2
    noise = max(math.sqrt((sd(a) ** 2 + sd(b) ** 2) / 2), math.sqrt(2 * p * (1 - p) / n))
    return ("holds" if diff > noise else "does not hold" if diff < -noise else "within noise"), diff, noise


def report(cfg: AblationConfig, n_layers: int) -> dict:
    """Read every row JSON; write tables.md; return {table: {row: [results per seed]}}."""
    found = {}
    for row in rows(["3", "4", "5", "6"], n_layers):
        for seed in cfg.seeds:
            if os.path.exists(row_path(cfg, row, seed)):
                found.setdefault(row.table, {}).setdefault(row.name, []).append(read_json(row_path(cfg, row, seed)))
    pm = lambda xs: (f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1
                     else f"{100 * xs[0]:.1f}")
    have = sorted({r["seed"] for by_row in found.values() for rs in by_row.values() for r in rs})
    lines = [f"# Ablations (Tables 3-6) on the bundled teacher\n",
             f"Accuracy in % on {cfg.eval_per_category} test questions per category, mean ± std over the seeds "
             f"found ({', '.join(map(str, have))} of {', '.join(map(str, cfg.seeds))}; the column `seeds` counts "
             f"them per row); written by `python experiments/ablate.py`.\n"]
    for table, by_row in sorted(found.items()):
        lines += [f"\n## Table {table}\n", f"| row | seeds | " + " | ".join(CATS) + " | mean | of teacher | "
                  + " | ".join(f"paper {m}" for m in PAPER_METRICS) + " | layers kept |",
                  "|" + " --- |" * (len(CATS) + 5 + len(PAPER_METRICS))]
        for name, rs in by_row.items():
            paper = PAPER.get(table, {}).get(name.split(",")[0]) if table != "6" or "k=2" in name else None
            cats = (pm([r["accuracy"].get(c, 0) for r in rs]) for c in CATS)
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cats)
                         + f" | **{pm([r['mean'] for r in rs])}** | {pm([r['retention'] for r in rs])} | "
                         + " | ".join(str(v) for v in (paper or ("-",) * len(PAPER_METRICS)))
                         + f" | {' / '.join(sorted({','.join(map(str, r['attention_layers'])) or '-' for r in rs}))} |")
        if table in PAPER_NOTE:
            lines.append(f"\n(Paper columns: {PAPER_NOTE[table]}.)")
        claim, pairs = CLAIMS[table]
        lines.append(f"\nThe paper's claim: {claim}.\n")
        for a, b in pairs:
            if a in by_row and b in by_row:
                v, diff, sd = verdict([r["mean"] for r in by_row[a]], [r["mean"] for r in by_row[b]],
                                      cfg.eval_per_category * len(CATS))
                lines.append(f"- {a} > {b}: **{v}** (difference {100 * diff:+.1f} points, noise {100 * sd:.1f})")
    wall = {}
    for by_row in found.values():
        for rs in by_row.values():
            for r in rs:
                w = wall.setdefault(r["seed"], {"runs": {}, "eval_s": 0.0})
                w["runs"].update(r["stage_seconds"])                     # keys: run folders under --work
                w["eval_s"] += r["eval_s"]
    lines.append("\n## Wall time per seed (unique stage runs + evaluations)\n")
    lines += [f"- seed {s}: {(sum(w['runs'].values()) + w['eval_s']) / 3600:.2f} h ({len(w['runs'])} stage runs)"
              for s, w in sorted(wall.items())]
    os.makedirs(cfg.results, exist_ok=True)
    with open(os.path.join(cfg.results, "tables.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return found


if __name__ == "__main__":
    run_main(main)

"""Measuring a model: accuracy on the benchmark, per-layer fidelity to the teacher, stage reports.

Not the paper's method but how its results are read. The paper scores students on VLM benchmarks
(POPE, MME, TextVQA, ...); here the synthetic test split of data.py stands in for them, one
category per benchmark, scored by greedy generation and exact match (data.score). A stage of
distill.py ends with it and with each mixer's fidelity to the teacher's attention (`stage_report`).

Run:  python distill.py --eval checkpoints/teacher --eval-per-category 200   # the --eval mode
      python distill.py --eval runs/linear/stage3/model --eval-data my_test.jsonl  # any LLaVA JSONL
Tests: python -m pytest -q tests/test_evaluate.py tests/test_distill.py
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import data
from convert import load_model
from model import Mamba2Mixer, Model
from utils import InputError, write_json


def test_samples(n_per_category: int) -> list:
    """The synthetic test split: categories round-robin, n_per_category of each."""
    n = n_per_category * len(data.CATEGORIES)
    return [data.sample_at(data.DataConfig(), "test", 0, i) for i in range(n)]


def evaluate(model: Model, samples: list, progress: bool = False, batch_size: int = 64) -> dict:
    """Greedy generation, exact match, accuracy per category: data.score's dict, with the
    predictions. Prompts of equal length go batch_size at a time."""
    model.eval()
    return data.score(model.generate, samples, batch_size=batch_size, progress=progress)


def accuracy(model: Model, samples: list) -> dict:
    """evaluate's result without the predictions: accuracy, n and mean."""
    result = evaluate(model, samples)
    del result["predictions"]
    return result


@torch.no_grad()
def mixer_fidelity(teacher: Model, student: Model, input_ids, pixel_values=None) -> list:
    """Per layer, the student mixer's per-head output (before W_O) against the teacher attention's,
    both on the teacher's normed hidden state at that layer (teacher forcing): relative error and
    cosine of the flattened tensors; cos_y compares the SSD output y alone (before the norm and the
    gate, whose random start scrambles signs until stage 1 trains it)."""
    rows = []
    for i, u in enumerate(teacher.mixer_inputs(input_ids, pixel_values)):
        mixer = student.layers[i].mixer
        t = teacher.layers[i].mixer.heads(u).double().flatten()
        s = mixer.heads(u).double().flatten()
        y = s
        if isinstance(mixer, Mamba2Mixer):
            y = mixer.heads(u, gate=False).double().flatten()
        rows.append({"layer": i, "kind": student.layers[i].kind,
                     "rel_err": ((s - t).norm() / t.norm().clamp_min(1e-300)).item(),
                     "cosine": F.cosine_similarity(s, t, dim=0).item(),
                     "cos_y": F.cosine_similarity(y, t, dim=0).item()})
    return rows


def fidelity_table(results: dict) -> str:
    """results: {column name: mixer_fidelity rows}; one line per layer, then the mean."""
    def columns(r):
        return f"  {r['rel_err']:>10.4f}{r['cosine']:>8.4f}{r['cos_y']:>8.4f}"
    lines = [f"{'layer':>5}" + "".join(f"  {n[:26]:>26}" for n in results),
             f"{'':>5}" + "".join(f"  {'rel.err':>10}{'cos':>8}{'cos_y':>8}" for _ in results)]
    for i, row in enumerate(zip(*results.values())):
        lines.append(f"{i:>5}" + "".join(columns(r) for r in row))
    keys = ("rel_err", "cosine", "cos_y")
    means = [{k: sum(r[k] for r in rows) / len(rows) for k in keys} for rows in results.values()]
    return "\n".join(lines + [f"{'mean':>5}" + "".join(columns(m) for m in means)])


def stage_report(summary: dict) -> str:
    """What a stage prints when it ends (distill.run_stage's summary): the per-layer fidelity
    before and after, the accuracy table beside the teacher's, and one summary line."""
    minutes, seconds = divmod(int(summary["seconds"]), 60)
    line = f"stage {summary['stage']} done in {minutes}m{seconds:02d}s: {summary['steps']} steps"
    if summary["loss_first"] is not None:
        line += f", loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}"
    if "mse_before" in summary:
        b = summary["mse_before"]
        a = summary["mse_after"]
        line += f", layer MSE {b:.3g} -> {a:.3g} ({b / max(a, 1e-30):.1f}x lower)"
    parts = []
    if summary["fidelity_before"]:
        parts.append(fidelity_table({"before": summary["fidelity_before"], "after": summary["fidelity"]}))
    if "accuracy" in summary:
        parts.append(data.format_table({"teacher": summary["teacher_accuracy"],
                                        "student": summary["accuracy"]}))
        s = summary["accuracy"]["mean"]
        t = summary["teacher_accuracy"]["mean"]
        line += f", accuracy {100 * s:.1f}% (teacher {100 * t:.1f}%"
        if t:
            line += f", {100 * s / t:.1f}% of it"
        line += ")"
    return "\n".join(parts + [line])


def plot_fidelity(out: str, summaries: list) -> str:
    """fidelity.png: per layer, the cosine and relative error of each mixer against the teacher's
    attention, for the seeded student and after each stage."""
    import matplotlib.pyplot as plt
    curves = [("seeded", summaries[0]["fidelity_before"])]
    curves += [(f"stage {s['stage']}", s["fidelity"]) for s in summaries]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves:
        for a, key in zip(ax, ("cosine", "rel_err")):
            a.plot([r["layer"] for r in rows], [r[key] for r in rows], "o-", label=name)
    for a, key in zip(ax, ("cosine to the teacher's attention", "relative error")):
        a.set(xlabel="layer", ylabel=key, title=f"per-layer fidelity: {key}")
        a.legend(fontsize=8)
    kept = summaries[-1]["layers"].count("attn")
    fig.suptitle(f"{out}: mixer outputs before W_O, teacher forcing, {kept} attention layers kept",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "fidelity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_folder(folder: str, eval_data: str = "", per_category: int = 50) -> dict:
    """distill.py --eval: the accuracy table of any checkpoint folder on the synthetic test split
    (per_category questions of each category) or on a JSONL; writes the predictions beside the
    references to runs/eval/<name>.json, the name made of the folder's last three path parts
    (runs/linear/stage3/model -> linear_stage3_model) and the JSONL's (@file). A HoVLE / mmMamba
    folder (its own tokenizer.model) is an error: data.py's questions need data.py's tokenizer."""
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise InputError(f"{folder}: a HoVLE / mmMamba folder (tokenizer.model) cannot be scored with "
                         f"data.py's tokenizer; ask it: python ask.py {folder} IMAGE QUESTION")
    model = load_model(folder).float()
    parts = os.path.normpath(folder).split(os.sep)[-3:]
    name = "_".join(p for p in parts if p not in ("runs", "..", ""))
    if eval_data:
        name += "@" + os.path.splitext(os.path.basename(eval_data))[0]
        samples = data.load_jsonl(eval_data, model.cfg.image_size)
    else:
        samples = test_samples(per_category)
        if not samples:
            raise InputError(f"--eval-per-category {per_category}: no test questions")
    result = evaluate(model, samples, progress=True)
    print(data.format_table({os.path.basename(os.path.normpath(folder)): result}))
    predictions = result.pop("predictions")
    result["samples"] = [{"source": s.source, "category": s.category, "question": s.turns[-1][0],
                          "answer": s.turns[-1][1], "prediction": p}
                         for s, p in zip(samples, predictions)]
    path = os.path.join("runs", "eval", name + ".json")
    write_json(path, result)
    print(f"predictions: {path}")
    return result

"""Layer patch probe: which converted layer breaks which benchmark category?

For each layer i, take the bundled teacher, replace layer i's attention mixer by the student's
Mamba-2 mixer (every other layer stays the teacher's), and measure the accuracy per category. A
category that drops only when layer i is patched names the layer whose conversion loses it. This is
how the stage-2 defaults of distill.py were found (experiments/README.md: layer 2 holds the look
head; a short stage 2 left it dropping exist and count). ablate.choose_attention_layers measures
the same swap by the output KL instead of accuracy.

Run (after `python distill.py --stage 2`):
    python experiments/patch_probe.py runs/linear/stage2/model --per-category 50
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill  # noqa: E402
from convert import load_model  # noqa: E402
from evaluate import evaluate, test_samples  # noqa: E402
from model import Model  # noqa: E402


def patched(teacher: Model, student: Model, i: int) -> Model:
    """A copy of teacher whose layer i is the student's layer i (a hybrid with one Mamba-2 layer)."""
    if len(student.layers) != len(teacher.layers):
        raise ValueError(f"student has {len(student.layers)} layers, teacher {len(teacher.layers)}")
    m = copy.deepcopy(teacher)
    m.layers[i] = copy.deepcopy(student.layers[i])
    m.set_config(m.cfg.replace(layers=[b.kind for b in m.layers]))
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("student", help="student model folder (config.json + model.safetensors)")
    p.add_argument("--teacher", default="checkpoints/teacher", help="teacher model folder")
    p.add_argument("--per-category", type=int, default=50, help="test questions per category")
    args = p.parse_args()

    teacher = distill.load_teacher(args.teacher)
    student = load_model(args.student).float()
    tests = test_samples(args.per_category)
    base = evaluate(teacher, tests)["accuracy"]
    cats = list(base)
    print("layer  " + " ".join(f"{c:>8}" for c in cats))
    print("none   " + " ".join(f"{base[c]:8.2f}" for c in cats))
    for i in range(len(teacher.layers)):
        acc = evaluate(patched(teacher, student, i), tests)["accuracy"]
        print(f"{i:<6} " + " ".join(f"{acc[c]:8.2f}" for c in cats), flush=True)


if __name__ == "__main__":
    main()

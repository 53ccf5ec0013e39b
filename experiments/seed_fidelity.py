"""How close each seeding mode starts to the teacher (the paper's Table 4 modes, seed.py): the
per-layer fidelity of a freshly seeded all-Mamba-2 student against the teacher's attention, one
column per mode (evaluate.mixer_fidelity: relative error, cosine, and cosine of the SSD output y).

Run (from the repository root):  python experiments/seed_fidelity.py [--checkpoint DIR] [--n 14]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
import data  # noqa: E402
from convert import load_model  # noqa: E402
from evaluate import fidelity_table, mixer_fidelity  # noqa: E402
from seed import MODES, seed_student  # noqa: E402
from utils import arg, parse_config, run_main  # noqa: E402


@dataclass
class FidelityConfig:
    checkpoint: str = arg("checkpoints/teacher", "teacher model folder")
    modes: list[str] = arg(list(MODES), "seeding modes", choices=MODES)
    n: int = arg(14, "test questions to measure on")
    seed: int = arg(0, "seed of the new parameters")


def main(argv=None) -> dict:
    cfg = parse_config(FidelityConfig, argv, "Per-layer fidelity of freshly seeded Mamba-2 mixers, per mode.")
    teacher = load_model(cfg.checkpoint).float().eval()
    batch = data.collate([data.sample_at(data.DataConfig(), "test", 0, i) for i in range(cfg.n)])
    layers = ["mamba2"] * teacher.cfg.n_layers
    results = {}
    for mode in cfg.modes:
        student = seed_student(teacher, layers, mode, torch.Generator().manual_seed(cfg.seed))
        results[mode] = mixer_fidelity(teacher, student, batch["input_ids"], batch["pixel_values"])
    print(f"{cfg.checkpoint}: per-head outputs before W_O of seeded Mamba-2 mixers against the "
          f"teacher's attention, on {cfg.n} test questions")
    print(fidelity_table(results))
    return results


if __name__ == "__main__":
    run_main(main)

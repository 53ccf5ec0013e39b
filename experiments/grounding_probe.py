"""Grounding probe: how much attention does each grounding role's head put on its targets?

A progress measure for stage 0 (teacher/grounding.py): for each role (look, gather_first, gather_last,
read) and question category, the mean over the role's query positions of the attention mass its
head puts on the target keys. The best is 1 (look: n/(n+1) on the n named cells plus 1/(n+1) on
<s>); an untrained head spreads its attention and scores far below. experiments/README.md used it
to see that the heads were on target while the answers were still at chance.

Run (on the bundled teacher, or any checkpoint with the default GroundingConfig heads):
    python experiments/grounding_probe.py checkpoints/teacher [--n 140] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from convert import load_model  # noqa: E402
from teacher.grounding import GroundingConfig, role_probs, targets  # noqa: E402
from model import Model  # noqa: E402


@torch.no_grad()
def attention_on_target(model: Model, batch: dict, cfg: GroundingConfig) -> dict:
    """{role: {category: mean attention mass on the role's target keys}} for a data.collate batch."""
    _, hidden = model(batch["input_ids"], batch["pixel_values"], return_hidden=True)
    result = {}
    for role, (target, queries) in targets(batch)[0].items():
        p = role_probs(model, hidden, *cfg.roles()[role]).float()
        mass = (p * (target > 0)).sum(-1)                                  # (b, T)
        per = {}
        for k, cat in enumerate(batch["category"]):
            if queries[k].any():
                per.setdefault(cat, []).append(mass[k][queries[k]].mean().item())
        result[role] = {c: sum(v) / len(v) for c, v in per.items()}
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Attention mass of each grounding role on its targets, per category")
    p.add_argument("checkpoint", help="a model folder (config.json + model.safetensors)")
    p.add_argument("--n", type=int, default=140, help="test questions (round-robin over the categories)")
    p.add_argument("--seed", type=int, default=0, help="test split seed")
    args = p.parse_args(argv)
    model = load_model(args.checkpoint).float().eval()
    samples = [data.sample_at(data.DataConfig(), "test", args.seed, i) for i in range(args.n)]
    result = attention_on_target(model, data.collate(samples), GroundingConfig())
    cats = list(data.CATEGORIES)
    print(f"{'role':<14}" + "".join(f"{c:>9}" for c in cats))
    for role, per in result.items():
        print(f"{role:<14}" + "".join(f"{per[c]:9.2f}" if c in per else f"{'-':>9}" for c in cats))


if __name__ == "__main__":
    main()

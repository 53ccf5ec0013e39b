"""Seeding: carve a Mamba-2 mixer out of a trained attention layer (mmMamba Sec. 3.2, Table 4).

The SSD's dual form is causal linear attention with q = C, k = B, v = x (ssd.py), so the mixer
inherits the attention layer's projections: W_Q -> the C projection (`wq`), W_K -> B (`wk`),
W_V -> x (`wv`), W_O -> the output projection (`wo`), GQA included (head h reads KV head h // R in
both). The new parameters (conv, W_dt, dt_bias, A_log, norm, W_G) then start at the values of
`Mamba2Mixer.init_new` in model.py. Three modes, the rows of the paper's Table 4, as the official
code runs them (github.com/hustvl/mmMamba, src/model/linear_attention/mamba2.py, `inherit_qkv` and
`mimic_init`):

    mode            W_Q, W_K, W_V                      W_O        new parameters
    scratch         random (nn.Linear's default init)  inherited  non-mimic values
    inherit         inherited                          inherited  non-mimic values
    inherit+mimic   inherited                          inherited  mimic values (the default)

Run:  python seed.py [--checkpoint DIR]     # per-layer fidelity of a freshly seeded student, per mode
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from convert import load_model
from model import Attention, Mamba2Mixer, Model, ModelConfig
from utils import run_main

MODES = ("scratch", "inherit", "inherit+mimic")


@torch.no_grad()
def seed_mixer(attn: Attention, cfg: ModelConfig, mode: str = "inherit+mimic",
               generator: torch.Generator | None = None) -> Mamba2Mixer:
    """A new Mamba2Mixer (on attn's device and dtype) seeded from `attn` in `mode`. Inherited
    tensors are copies: training the mixer leaves `attn` untouched."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(attn, Attention):
        raise ValueError(f"seed_mixer needs an Attention layer, got {type(attn).__name__}")
    mixer = Mamba2Mixer(cfg).to(attn.wq.weight.device, attn.wq.weight.dtype)
    for name in Mamba2Mixer.INHERITED:
        w = getattr(mixer, name).weight
        if mode == "scratch" and name != "wo":          # W_Q, W_K, W_V random; W_O is always inherited
            r = torch.empty(w.shape, dtype=torch.float32)
            w.copy_(nn.init.kaiming_uniform_(r, a=math.sqrt(5), generator=generator))
        else:
            w.copy_(getattr(attn, name).weight)
    mixer.init_new(mimic=mode == "inherit+mimic", generator=generator)
    return mixer


def seed_student(teacher: Model, layers: list, mode: str = "inherit+mimic",
                 generator: torch.Generator | None = None) -> Model:
    """A student with layer kinds `layers`: each layer the teacher has as attention and the student
    as "mamba2" gets a seeded mixer; everything else (vision stem, embeddings, norms, MLPs, LM head,
    kept attention layers) is a copy of the teacher's."""
    if len(layers) != teacher.cfg.n_layers:
        raise ValueError(f"layers has {len(layers)} entries, the teacher has {teacher.cfg.n_layers} layers")
    cfg = teacher.cfg.replace(layers=list(layers))     # validates the kinds
    student = copy.deepcopy(teacher)
    for i, (old, new) in enumerate(zip(teacher.cfg.layers, layers)):
        if old == "mamba2" and new == "attn":
            raise ValueError(f"layer {i} is Mamba-2 in the teacher; it cannot become attention")
        if old == "attn" and new == "mamba2":
            student.layers[i].mixer = seed_mixer(teacher.layers[i].mixer, cfg, mode, generator)
            student.layers[i].kind = new
    student.set_config(cfg)
    return student


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
        y = mixer.heads(u, gate=False).double().flatten() if isinstance(mixer, Mamba2Mixer) else s
        rows.append({"layer": i, "kind": student.layers[i].kind,
                     "rel_err": ((s - t).norm() / t.norm().clamp_min(1e-300)).item(),
                     "cosine": F.cosine_similarity(s, t, dim=0).item(),
                     "cos_y": F.cosine_similarity(y, t, dim=0).item()})
    return rows


def fidelity_table(results: dict) -> str:
    """results: {column name: mixer_fidelity rows}; one line per layer, then the mean."""
    names = list(results)
    lines = [f"{'layer':>5}" + "".join(f"  {n[:26]:>26}" for n in names),
             f"{'':>5}" + "".join(f"  {'rel.err':>10}{'cos':>8}{'cos_y':>8}" for _ in names)]
    cols = lambda r: f"  {r['rel_err']:>10.4f}{r['cosine']:>8.4f}{r['cos_y']:>8.4f}"
    rows = list(zip(*results.values()))
    lines += [f"{i:>5}" + "".join(cols(r) for r in row) for i, row in enumerate(rows)]
    mean = [{k: sum(r[k] for r in col) / len(col) for k in ("rel_err", "cosine", "cos_y")} for col in results.values()]
    return "\n".join(lines + [f"{'mean':>5}" + "".join(cols(m) for m in mean)])


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-layer fidelity of freshly seeded Mamba-2 mixers, per mode.")
    p.add_argument("--checkpoint", default="checkpoints/teacher", help="teacher model folder")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--n", type=int, default=14, help="test questions to measure on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    teacher = load_model(args.checkpoint).float().eval()
    batch = data.collate([data.sample_at(data.DataConfig(), "test", 0, i) for i in range(args.n)])
    layers = ["mamba2"] * teacher.cfg.n_layers
    results = {m: mixer_fidelity(teacher, seed_student(teacher, layers, m, torch.Generator().manual_seed(args.seed)),
                                 batch["input_ids"], batch["pixel_values"]) for m in args.modes}
    print(f"{args.checkpoint}: per-head outputs before W_O of seeded Mamba-2 mixers against the teacher's "
          f"attention, on {args.n} test questions")
    print(fidelity_table(results))
    return results


if __name__ == "__main__":
    run_main(main)

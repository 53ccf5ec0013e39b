"""Seeding: carve a Mamba-2 mixer out of a trained attention layer (mmMamba Sec. 3.2, Table 4).

The SSD's dual form is causal linear attention with q = C, k = B, v = x (ssd.py), so the mixer
inherits the attention layer's projections: W_Q -> the C projection (`wq`), W_K -> B (`wk`),
W_V -> x (`wv`), W_O -> the output projection (`wo`), GQA included (head h reads KV head h // R in
both). The new parameters (conv, W_dt, dt_bias, A_log, norm, W_G) then start at the values of
`Mamba2Mixer.init_new` in model.py. Three modes, the rows of the paper's Table 4, as the official
code runs them (`inherit_qkv`, then `mimic_init` for the new parameters):
https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/model/linear_attention/mamba2.py#L326-L361

    mode            W_Q, W_K, W_V                      W_O        new parameters
    scratch         random (nn.Linear's default init)  inherited  non-mimic values
    inherit         inherited                          inherited  non-mimic values
    inherit+mimic   inherited                          inherited  mimic values (the default)

How close each mode starts to the teacher: python experiments/seed_fidelity.py
Tests: python -m pytest -q tests/test_seed.py
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from model import Attention, Mamba2Mixer, Model, ModelConfig

MODES = ("scratch", "inherit", "inherit+mimic")


@torch.no_grad()
def seed_mixer(attn: Attention, cfg: ModelConfig, mode: str = "inherit+mimic",
               generator: torch.Generator | None = None) -> Mamba2Mixer:
    """A new Mamba2Mixer (on attn's device and dtype) seeded from `attn` in `mode`. Inherited
    tensors are copies: training the mixer leaves `attn` untouched."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mixer = Mamba2Mixer(cfg).to(attn.wq.weight.device, attn.wq.weight.dtype)
    for name in Mamba2Mixer.INHERITED:
        w = getattr(mixer, name).weight
        if mode == "scratch" and name != "wo":          # W_Q, W_K, W_V random; W_O always inherited
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
        raise ValueError(f"layers has {len(layers)} entries, the teacher {teacher.cfg.n_layers}")
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

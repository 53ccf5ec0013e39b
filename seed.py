"""Seeding: carve a Mamba-2 mixer out of a trained attention layer ("inherit + mimic").

Paper map (mmMamba, arXiv 2502.13145): Sec. 3.2 "Seeding strategy" (Eq. 5-6) and the
initialisation ablation of Table 4 (from scratch / inherit / inherit + mimic).

Attention and the Mamba-2 SSD share their projections: the SSD's dual form is
y_t = sum_{s<=t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s, causal linear attention with
q = C, k = B, v = x. So W_Q -> C projection (mixer.wq), W_K -> B projection (mixer.wk),
W_V -> x projection (mixer.wv) and W_O -> output projection (mixer.wo) are copied, keeping GQA
(head h reads KV head h // (H / Hkv) in both). The new parameters start so that the mixer behaves
like a slowly decaying causal linear attention (DESIGN section 5, mode "inherit+mimic"):

    conv1d      weight 1 on the current-token tap, 0 elsewhere; bias 0   (the conv is the identity)
    wdt         0                                                     (dt does not depend on input)
    dt_bias     softplus^-1(dt0), dt0 log-uniform in [1e-3, 0.1] per head
    A_log       1                                                     (A = -e; decay exp(-e dt0))
    norm.weight 1
    wg          Xavier uniform with gain 2^-2.5

Ablation modes: "inherit" copies Q/K/V/O and leaves the rest at the stock Mamba-2 init
(Mamba2Mixer.reset_parameters: A = -U(1, 16), dt log-uniform, conv / wdt / wg PyTorch defaults);
"scratch" is the stock init of everything, Q/K/V/O included.

Run:  python seed.py [--checkpoint DIR] [--modes scratch inherit inherit+mimic]
      prints, per layer and per mode, the relative error and the cosine similarity between the
      seeded mixer's per-head output and the teacher attention's (both before W_O), on the
      teacher's own hidden states (a random tiny teacher when no checkpoint is given).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, Mamba2Mixer, Model, ModelConfig, log_uniform_dt, sample_batch, softplus_inverse

MODES = ("scratch", "inherit", "inherit+mimic")
WG_GAIN = 2 ** -2.5
A_LOG_MIMIC = 1.0


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@torch.no_grad()
def mimic_init_(mixer: Mamba2Mixer, generator: torch.Generator | None = None) -> Mamba2Mixer:
    """Set the new (non-inherited) parameters of `mixer` to the mimic values (module docstring)."""
    H = mixer.cfg.n_heads
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0                 # the current-token tap (causal padding on the left)
    mixer.conv1d.bias.zero_()
    mixer.wdt.weight.zero_()
    mixer.dt_bias.copy_(softplus_inverse(log_uniform_dt(H, generator)))
    mixer.A_log.fill_(A_LOG_MIMIC)
    mixer.norm.weight.fill_(1.0)
    w = torch.empty(mixer.wg.weight.shape, dtype=torch.float64 if mixer.wg.weight.dtype == torch.float64
                    else torch.float32)
    nn.init.xavier_uniform_(w, gain=WG_GAIN, generator=generator)
    mixer.wg.weight.copy_(w)
    return mixer


@torch.no_grad()
def seed_mixer(attn: Attention, cfg: ModelConfig, mode: str = "inherit+mimic",
               generator: torch.Generator | None = None) -> Mamba2Mixer:
    """A new Mamba2Mixer (on attn's device and dtype) seeded from the attention layer `attn`.
    Inherited tensors are copies: training the mixer leaves `attn` untouched."""
    _check_mode(mode)
    if not isinstance(attn, Attention):
        raise ValueError(f"seed_mixer needs an Attention layer, got {type(attn).__name__}")
    w = attn.wq.weight
    mixer = Mamba2Mixer(cfg).to(device=w.device, dtype=w.dtype)
    mixer.reset_parameters(generator)                   # stock init: the whole of "scratch"
    if mode != "scratch":
        for name in Mamba2Mixer.INHERITED:
            src, dst = getattr(attn, name).weight, getattr(mixer, name).weight
            if src.shape != dst.shape:
                raise ValueError(f"attention {name} has shape {tuple(src.shape)}, the mixer expects {tuple(dst.shape)}")
            dst.copy_(src)
    if mode == "inherit+mimic":
        mimic_init_(mixer, generator)
    return mixer


def convert(teacher: Model, layers: list, mode: str = "inherit+mimic",
            generator: torch.Generator | None = None) -> Model:
    """A student with per-layer kinds `layers`: every layer the teacher has as attention and the
    student as "mamba2" gets a seeded mixer; everything else (vision stem, embeddings, norms, MLPs,
    LM head, kept attention layers, existing Mamba-2 layers) is copied from the teacher."""
    _check_mode(mode)
    layers = list(layers)
    if len(layers) != teacher.cfg.n_layers:
        raise ValueError(f"layers has {len(layers)} entries, the teacher has {teacher.cfg.n_layers} layers")
    cfg = teacher.cfg.replace(layers=layers)            # validates the kinds
    student = copy.deepcopy(teacher)
    for i, (old, new) in enumerate(zip(teacher.cfg.layers, layers)):
        if old == new:
            continue
        if old == "mamba2":
            raise ValueError(f"layer {i} is Mamba-2 in the teacher; it cannot become attention")
        block = student.layers[i]
        block.mixer = seed_mixer(teacher.layers[i].mixer, cfg, mode, generator)
        block.kind = new
    student.set_config(cfg)
    return student


@torch.no_grad()
def mixer_fidelity(teacher: Model, student: Model, input_ids, pixel_values=None) -> list:
    """Per layer: relative error ||s - t|| / ||t|| and cosine similarity (of the flattened tensors)
    between the student mixer's and the teacher mixer's per-head outputs before W_O, both on the
    teacher's normed hidden state at that layer (teacher forcing). `cosine_ssm` compares the SSD
    output y alone (before the per-head norm and the gate, whose small random init scrambles signs
    until stage 1 trains it) with the teacher's output."""
    us = teacher.mixer_inputs(input_ids, pixel_values)
    rows = []
    for i, (tb, sb, u) in enumerate(zip(teacher.layers, student.layers, us)):
        t = tb.mixer.heads(u).double().flatten()
        s = sb.mixer.heads(u).double().flatten()
        # the SSM output alone (before the per-head norm and the gate), for Mamba-2 students
        y = sb.mixer.ssm(u).double().flatten() if sb.kind == "mamba2" else s
        rows.append({"layer": i, "kind": sb.kind,
                     "rel_err": ((s - t).norm() / t.norm().clamp_min(1e-300)).item(),
                     "cosine": F.cosine_similarity(s, t, dim=0).item(),
                     "cosine_ssm": F.cosine_similarity(y, t, dim=0).item()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-layer fidelity of freshly seeded Mamba-2 mixers.")
    p.add_argument("--checkpoint", help="a save_pretrained folder (default: a random tiny teacher)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=48, help="text tokens per sample (plus one image)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.checkpoint:
        teacher = Model.from_pretrained(args.checkpoint, dtype=torch.float32)
        source = args.checkpoint
    else:
        teacher = Model(ModelConfig())
        source = "random tiny teacher (no --checkpoint)"
    teacher.eval()
    cfg = teacher.cfg
    ids, px = sample_batch(cfg, args.batch, args.text_len, args.seed)
    print(f"teacher: {source}; {cfg.n_layers} layers {cfg.layers.count('attn')} attention; "
          f"inputs {tuple(ids.shape)} with {cfg.image_tokens} image tokens per sample")
    results = {}
    for mode in args.modes:
        student = convert(teacher, ["mamba2"] * cfg.n_layers, mode,
                          generator=torch.Generator().manual_seed(args.seed))
        results[mode] = mixer_fidelity(teacher, student, ids, px)
    print("per-head outputs before W_O, student vs teacher attention: relative error, cosine, and "
          "cosine of the SSD output before norm and gate")
    print(f"{'':>5}" + "".join(f"  {m:>26}" for m in args.modes))
    print(f"{'layer':>5}" + "".join(f"  {'rel.err':>10}{'cos':>8}{'cos(y)':>8}" for _ in args.modes))
    cols = lambda r: f"  {r['rel_err']:>10.4f}{r['cosine']:>8.4f}{r['cosine_ssm']:>8.4f}"
    for i in range(cfg.n_layers):
        print(f"{i:>5}" + "".join(cols(results[m][i]) for m in args.modes))
    mean = {m: {k: sum(r[k] for r in results[m]) / cfg.n_layers for k in ("rel_err", "cosine", "cosine_ssm")}
            for m in args.modes}
    print(f"{'mean':>5}" + "".join(cols(mean[m]) for m in args.modes))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()

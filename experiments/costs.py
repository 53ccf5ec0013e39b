"""The paper's speed and memory numbers on paper: FLOPs, bytes and roofline times of the teacher
HoVLE-2.6B, mmMamba-linear and mmMamba-hybrid at HoVLE's shape in bf16 (arXiv 2502.13145, Fig. 1
and Table 2), beside the paper's figures: which teacher (with or without a KV cache) gives them.

Counted: the projections, attention, the SSD, K and V, the SSM state; not: norms, conv, activations,
the vision stem. A forward takes max(FLOPs / peak, bytes / bandwidth) at GPU's peaks (a roofline).
No model is run: the parameter counts come from a Model built on the meta device.

Run: python experiments/bench.py --parts costs   (the bench's costs section)
Tests: python -m pytest -q tests/test_bench.py
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
from convert import hovle_config  # noqa: E402
from model import Model, make_layers  # noqa: E402

PAPER = {"fig1_L": 103000, "table2_L": 800, "new_tokens": 256,
         "fig1": {"linear": {"speedup": 20.6, "memory_saving": 0.758},
                  "hybrid": {"speedup": 13.5, "memory_saving": 0.602}},
         "table2_tokens_per_s": {"teacher": 33.03, "linear": 132.43, "hybrid": 134.77}}
GPU = {"name": "RTX 4090", "flop_s": 165e12, "byte_s": 1008e9}  # bf16 tensor cores; DRAM


def architecture(n_attn: int) -> dict:
    """convert.hovle_config() keeping n_attn of its 32 layers as attention, counted on a Model on
    the meta device: parameters, the weights that multiply every token, K + V bytes per token, state."""
    cfg = hovle_config(layers=make_layers(32, n_attn))
    with torch.device("meta"):
        model = Model(cfg)
    P = cfg.head_dim                                    # = N
    conv = (cfg.conv_width - 1) * (2 * cfg.n_kv_heads + cfg.n_heads) * P * 2
    linears = [m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear)]
    return {"cfg": cfg, "attn": n_attn, "mamba": 32 - n_attn, "matmul": sum(linears),
            "params": sum(p.numel() for p in model.parameters()),
            "head": model.lm_head.weight.numel(),
            "kv_per_token": n_attn * 2 * cfg.n_kv_heads * P * 2,
            "state": (32 - n_attn) * (cfg.n_heads * P * P * 4 + conv)}


def forward_cost(a: dict, new: int, past: int = 0) -> tuple:
    """(FLOPs, bytes) of a forward of `new` tokens after `past` cached ones (a prefill: past 0; a
    decode step: new 1). FLOPs: 2 per weight and token (lm_head: the last token only); attention
    2 H P new (2 past + new + 1) per layer (q k^T and p v; token i sees past + i + 1 keys); the
    SSD 4 P N per token and head (state update and read-out) + 2 min(Q, new) P (diagonal blocks).
    Bytes: the weights, K and V read and written, and the float32 SSM state read and written (a
    step) or the chunk states (new / Q) H P N written, passed on (read, written) and read (4x)."""
    cfg = a["cfg"]
    H = cfg.n_heads
    P = cfg.head_dim
    Q = cfg.ssd_chunk_size
    flops = 2 * a["matmul"] * new + 2 * a["head"] + a["attn"] * 2 * H * P * new * (2 * past + new + 1)
    flops += a["mamba"] * new * H * (4 * P * P + 2 * min(Q, new) * P)
    states = 2 if new == 1 else 4 * math.ceil(new / Q)
    nbytes = 2 * (a["matmul"] + a["head"]) + a["kv_per_token"] * (past + new)
    return flops, nbytes + a["mamba"] * states * H * P * P * 4


def generation_s(a: dict, L: int, n: int, cached: bool = True) -> float:
    """Roofline time of an L-token prompt and n generated tokens: the prefill gives the first;
    each other is a decode step, or without a cache a forward over the L + i tokens so far."""
    costs = [forward_cost(a, L)]
    for i in range(1, n):
        costs.append(forward_cost(a, 1, L + i - 1) if cached else forward_cost(a, L + i))
    return sum(max(flops / GPU["flop_s"], nbytes / GPU["byte_s"]) for flops, nbytes in costs)


def cost_rows(archs: dict, L: int, n: int) -> list:
    """A row per layout, in cost_lines' column order. Memory: weights + cache after L + n tokens
    (the no-cache teacher's too: HoVLE's forward, use_cache on, builds every K, V at each step)."""
    def memory_gb(a):
        return (2 * a["params"] + a["kv_per_token"] * (L + n) + a["state"]) / 1e9
    teacher_s = generation_s(archs["teacher"], L, n)
    nocache_s = generation_s(archs["teacher"], L, n, cached=False)
    rows = []
    for layout, a in archs.items():
        cached = layout != "teacher-nocache"
        step = forward_cost(a, 1, L) if cached else forward_cost(a, L + 1)
        s = generation_s(a, L, n, cached)
        rows.append({"layout": layout,
                     "params_b": a["params"] / 1e9,
                     "weights_gb": 2 * a["params"] / 1e9,
                     "cache_gb": memory_gb(a) - 2 * a["params"] / 1e9,
                     "memory_saved": 1 - memory_gb(a) / memory_gb(archs["teacher"]),
                     "prefill_gflop_per_token": forward_cost(a, L)[0] / L / 1e9,
                     "step_gflop": step[0] / 1e9,
                     "step_gb": step[1] / 1e9,
                     "s": s,
                     "vs_teacher": teacher_s / s,
                     "vs_nocache": nocache_s / s})
    return rows


def costs_section() -> dict:
    """The rows at 103K (Fig. 1) and at Table 2's 800-token prompt, 256 generated tokens each;
    and at 103K the speed-ups over the no-cache teacher for n = 1, 2, ... generated tokens until
    the linear model's reaches the paper's 20.6x."""
    archs = {"teacher": architecture(32), "teacher-nocache": architecture(32),
             "linear": architecture(0), "hybrid": architecture(8)}
    L = PAPER["fig1_L"]
    by_n = []
    for n in range(1, PAPER["new_tokens"] + 1):
        nocache_s = generation_s(archs["teacher"], L, n, cached=False)
        speedups = {s: nocache_s / generation_s(archs[s], L, n) for s in PAPER["fig1"]}
        by_n.append({"n": n, **speedups})
        if by_n[-1]["linear"] >= PAPER["fig1"]["linear"]["speedup"]:
            break
    return {"gpu": GPU, "fig1": cost_rows(archs, L, PAPER["new_tokens"]), "nocache_by_n": by_n,
            "table2": cost_rows(archs, PAPER["table2_L"], PAPER["new_tokens"])}


def cost_lines(costs: dict) -> list:
    """The cost tables beside the paper's figures, and which teacher reproduces them."""
    gpu = costs["gpu"]
    tps = PAPER["table2_tokens_per_s"]
    students = PAPER["fig1"]                            # linear, hybrid
    fig1 = {s: f"{students[s]['speedup']}x, {students[s]['memory_saving']:.1%}" for s in students}
    paper = {"fig1": fig1, "table2": {s: f"{tps[s] / tps['teacher']:.1f}x" for s in students}}
    lines = ["", "Costs at HoVLE's shape (32 layers, d_model 2048, H 16, Hkv 8, P = N 128, I 8192, "
             f"V 92553), bf16, float32 SSM state; roofline time at the {gpu['name']}'s "
             f"{gpu['flop_s'] / 1e12:.0f} TFLOP/s and {gpu['byte_s'] / 1e9:.0f} GB/s; a step of the "
             "no-cache teacher is a forward over L + 1 tokens"]
    columns = [("model", ""), ("params B", ".2f"), ("weights GB", ".2f"), ("cache GB", ".3g"),
               ("mem saved", ".1%"), ("prefill GFLOP/tok", ".2f"), ("step GFLOP", ".4g"),
               ("step GB", ".3g"), ("time s", ".4g"), ("x teacher", ".3g"), ("x no-cache", ".3g"),
               ("paper", "")]
    for setting, L in (("fig1", PAPER["fig1_L"]), ("table2", PAPER["table2_L"])):
        rows = [[*r.values(), paper[setting].get(r["layout"], "")] for r in costs[setting]]
        lines += ["", f"prompt {L} tokens, {PAPER['new_tokens']} generated", *text_table(columns, rows)]
    f1 = {r["layout"]: r for r in costs["fig1"]}
    t2 = {r["layout"]: r for r in costs["table2"]}
    near = [f"n = {m['n']} ({m['linear']:.1f}x, {m['hybrid']:.1f}x)" for m in costs["nocache_by_n"][-2:]]
    return lines + [
        "", "Which teacher gives the paper's ratios: with its KV cache, a hybrid keeping 8 of 32 "
        f"attention layers is at most ~4x faster (here {f1['hybrid']['vs_teacher']:.1f}x at 103K; paper "
        f"13.5x) and Table 2 gives {t2['linear']['vs_teacher']:.2f}x (paper 4.0x). Decoded without "
        f"one, as HoVLE's code does: Table 2 {t2['linear']['vs_nocache']:.1f}x; 103K with 256 tokens "
        f"{f1['linear']['vs_nocache']:.0f}x / {f1['hybrid']['vs_nocache']:.0f}x, the paper's 20.6x / "
        f"13.5x between {' and '.join(near)} generated tokens. Only the no-cache teacher reproduces "
        "the paper's speed-ups; the memory savings are those of the KV cache either way."]


def text_table(columns: list, rows: list) -> list:
    """columns: (header, format spec of its numbers; "": left-aligned text). A short row (a
    failure) ends in free text."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([v if isinstance(v, str) else format(v, spec) for v, (_, spec) in zip(row, columns)])
    widths = [max(len(r[i]) for r in cells if len(r) == len(columns)) for i in range(len(columns))]
    lines = []
    for row in cells:
        padded = [x.rjust(w) if spec else x.ljust(w) for x, (_, spec), w in zip(row, columns, widths)]
        lines.append("  ".join(padded).rstrip())
    return lines

"""Speed and memory of the teacher, mmMamba-linear and mmMamba-hybrid, and of the SSD kernel.

What the linear model buys (mmMamba, arXiv 2502.13145):
  Fig. 1 (c)(d)  time and peak memory of prefill + 256 decoded tokens against sequence length, for
                 the teacher (all attention, KV cache, SDPA), the linear student (all Mamba-2) and the
                 hybrid (a few attention layers kept, head-interleaved)       -> model section
                 (paper, RTX 4090, HoVLE-2.6B at 103K tokens: linear 20.6x faster and 75.8% less
                 memory; hybrid 13.5x and 60.2%)
  Table 2        768 image tokens, 256 generated tokens, tokens per second     -> table-2 section
                 (paper: HoVLE 33.03 tok/s, linear 132.43, hybrid 134.77)
  Sec. 3.1       the SSD operator against its references: ssd_naive (token loop), ssd_chunked,
                 ssd_triton (CUDA), flash-linear-attention's chunk_simple_gla (if installed) and
                 causal SDPA with the same heads and head dim, forward and forward + backward
                                                                               -> kernel section

Method. Random weights (speed does not depend on them) and random text token ids; the Table 2
prompt holds real images' worth of `<IMG_CONTEXT>` placeholders plus random pixel values, so the
vision stem runs too. Every model point (layout x length) runs in a fresh Python process
(`bench.py --point JSON`), so that peak memory cannot leak from one point into the next: after
imports, model build and a short warm-up, the process resets its peak counter and measures
`repeats` runs (fewer when a point is slow, see --point-budget) of: a cache preallocated for
L + new tokens (the teacher's KV cache shows in the memory), prefill of L tokens, then greedy decode
through the caches until exactly --new-tokens tokens exist (no eos), all under inference_mode, with
CUDA synchronisation around each timed part. Times are medians; ratios to the teacher come from the
same run. Memory: on CUDA `torch.cuda.max_memory_allocated` (weights included, like the paper's GPU
memory); on CPU the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after
the warm-up) above the baseline measured after imports + build + warm-up (the ~250 MB of the
PyTorch runtime are not the model's). Both totals and increments are in the JSON.
A point that runs out of memory, fails, is killed or times out is recorded as such and the run goes
on (larger lengths of that layout are then skipped).

Run:  python bench.py                      # tiny preset on the CPU, L = 1K .. 32K (< 10 min, 2 cores)
      python bench.py --smoke              # smallest sizes, a few seconds (what the test runs)
      python bench.py --preset hovle       # HoVLE-2.6B shapes, bf16, random weights, on a GPU, L to 103K
      python bench.py --preset hovle --max-len 131072 --skip-kernel
Output (--out, default bench_results/<preset>_<device>): bench.json (every figure, machine, torch
version, commit), table.txt (the printed tables), model_time.png, model_memory.png, kernel.png.
While it runs, bench.partial.json holds every point measured so far (removed once bench.json is
written), so a run that is killed keeps its numbers. The last printed line summarises the ratios
at the longest length.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import A_INIT_RANGE, Model, ModelConfig, log_uniform_dt, make_layers, softplus_inverse, write_json
from ssd import ssd_chunked, ssd_naive, ssd_triton, triton

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = ("teacher", "linear", "hybrid")
POINT_TAG = "BENCH_POINT_JSON "          # the child's result line on stdout
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRESETS = {                               # device, dtype, longest default length
    "tiny": dict(device="cpu", dtype="float32", max_len=32768),
    "hovle": dict(device="cuda", dtype="bfloat16", max_len=103000),
}
PAPER = {  # mmMamba Fig. 1 (c)(d) and Table 2, one RTX 4090, HoVLE-2.6B teacher
    "fig1_length": 103000,
    "fig1": {"linear": {"speedup": 20.6, "memory_saving": 0.758},
             "hybrid": {"speedup": 13.5, "memory_saving": 0.602}},
    "table2": {"teacher": {"tokens_per_s": 33.03, "total_s": 7.75},
               "linear": {"tokens_per_s": 132.43, "total_s": 1.93},
               "hybrid": {"tokens_per_s": 134.77, "total_s": 1.90}},
}


@dataclass
class BenchConfig:
    """Everything a run depends on (resolved: no None left after `resolve`)."""
    preset: str = "tiny"                  # "tiny" (CPU) or "hovle" (HoVLE-2.6B shapes, GPU)
    device: str | None = None             # default: the preset's
    dtype: str | None = None              # default: the preset's
    lengths: list | None = None           # default: 1024, 2048, ... doubling up to max_len, and max_len
    max_len: int | None = None            # default: the preset's
    new_tokens: int = 256                 # tokens generated after the prefill (the paper: 256)
    repeats: int = 3                      # timed runs per point (median), fewer when slow
    point_budget_s: float = 10.0          # stop repeating a point once its runs took this long
    timeout_s: float = 900.0              # a model point's process is stopped after this long
    kernel_max_s: float = 90.0            # skip a kernel length whose predicted (quadratic) run is longer
    hybrid_attn: int | None = None        # attention layers kept by the hybrid (default n_layers // 4)
    placement: str = "head-interleaved"   # where the hybrid keeps them (model.make_layers)
    table2_image_tokens: int = 768        # the paper's Table 2 prompt
    table2_text_tokens: int = 32
    naive_max_len: int = 2048             # ssd_naive is a Python token loop: small L only
    backward: bool = True                 # also time forward + backward in the kernel section
    skip_kernel: bool = False
    skip_model: bool = False
    skip_table2: bool = False
    seed: int = 0
    smoke: bool = False
    in_process: bool = False              # run model points in this process (no isolation; --smoke)
    threads: int | None = None            # torch CPU threads (default: torch's; --smoke: 1)
    out: str | None = None                # default bench_results/<preset>_<device>


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill the preset's defaults and check the configuration."""
    if cfg.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {tuple(PRESETS)}, got {cfg.preset!r}")
    p = PRESETS[cfg.preset]
    c = dataclasses.replace(cfg)
    if c.smoke:
        c.lengths = c.lengths or [64, 128]
        c.new_tokens, c.repeats, c.point_budget_s = 8, 1, 2.0
        c.naive_max_len = min(c.naive_max_len, 128)
        c.table2_image_tokens, c.table2_text_tokens = 64, 8
        c.in_process = True
        c.threads = c.threads or 1        # no OpenMP spinning against other work: machinery, not speed
    c.device = c.device or p["device"]
    c.dtype = c.dtype or p["dtype"]
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--preset {c.preset} runs on a CUDA GPU by default and none is available "
                         f"(pass --device cpu to force the CPU)")
    if c.dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {tuple(DTYPES)}, got {c.dtype!r}")
    c.max_len = c.max_len or (max(c.lengths) if c.lengths else p["max_len"])
    if not c.lengths:
        c.lengths = [n for n in (1024 * 2 ** i for i in range(40)) if n < c.max_len] + [c.max_len]
    c.lengths = sorted({int(n) for n in c.lengths if n <= c.max_len})
    if not c.lengths or c.lengths[0] < 2:
        raise SystemExit(f"need lengths >= 2 and <= --max-len {c.max_len}, got {cfg.lengths}")
    if c.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (one token comes from the prefill, the rest are decoded)")
    if c.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    c.out = c.out or os.path.join("bench_results", f"{c.preset}_{c.device.split(':')[0]}")
    return c


# ----------------------------------------------------------------------------------------------
# Models: configuration, construction on the target device, prompts, timed generation

def model_config(preset: str, layout: str, hybrid_attn: int | None = None,
                 placement: str = "head-interleaved") -> ModelConfig:
    """The teacher / linear / hybrid configuration of a preset."""
    base = ModelConfig.hovle() if preset == "hovle" else ModelConfig()
    n = base.n_layers
    k = n // 4 if hybrid_attn is None else hybrid_attn
    layers = {"teacher": ["attn"] * n, "linear": make_layers(n, 0),
              "hybrid": make_layers(n, k, placement)}[layout]
    return base.replace(layers=layers)


@torch.no_grad()
def init_random_(model: Model, seed: int = 0) -> Model:
    """Random weights drawn on the parameters' own device (no CPU copies): projections and
    embeddings normal(0, init_std), biases 0, norm weights 1, Mamba-2 A and dt in their stock ranges."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    std = model.cfg.init_std
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            a = torch.empty(p.shape, dtype=torch.float64).uniform_(*A_INIT_RANGE, generator=cpu_gen)
            p.copy_(a.log())
        elif leaf == "dt_bias":
            p.copy_(softplus_inverse(log_uniform_dt(p.numel(), cpu_gen)).reshape(p.shape))
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:                # RMSNorm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    return model


def build_model(cfg: ModelConfig, device, dtype: torch.dtype, seed: int = 0, via_meta: bool | None = None) -> Model:
    """A model with random weights on `device` in `dtype`. Off the CPU (via_meta=None) it is built
    on the meta device, then allocated and filled on `device` directly, so a HoVLE-sized model never
    passes through CPU memory; on the CPU it is built directly (the meta path costs ~2 s of set-up)."""
    device = torch.device(device)
    if not (device.type != "cpu" if via_meta is None else via_meta):
        model = Model(cfg).to(dtype=dtype)
    else:
        with torch.device("meta"):
            model = Model(cfg)
        model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_(model, seed).eval()


def random_text_ids(cfg: ModelConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random token ids, never `<IMG_CONTEXT>`."""
    ids = torch.randint(0, cfg.vocab_size - 1, (1, n), generator=generator)
    ids[ids >= cfg.img_context_id] += 1
    return ids


def make_prompt(cfg: ModelConfig, length: int | None, image_tokens: int, text_tokens: int,
                device, dtype, seed: int = 0):
    """(input_ids (1, T), pixel_values or None). `length`: T random text tokens. Otherwise the
    Table 2 prompt: text, ceil(image_tokens / tokens per image) images' placeholders, text."""
    g = torch.Generator().manual_seed(seed)
    if length is not None:
        return random_text_ids(cfg, length, g).to(device), None
    n_img = max(1, math.ceil(image_tokens / cfg.image_tokens))
    text = random_text_ids(cfg, text_tokens, g)
    a = text_tokens // 2
    img = torch.full((1, n_img * cfg.image_tokens), cfg.img_context_id)
    ids = torch.cat([text[:, :a], img, text[:, a:]], dim=1).to(device)
    px = torch.randn(n_img, 3, cfg.image_size, cfg.image_size, generator=g).to(device=device, dtype=dtype)
    return ids, px


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick(logits: torch.Tensor, img_context_id: int) -> torch.Tensor:
    """Greedy, never `<IMG_CONTEXT>` (as Model.generate)."""
    logits = logits.float().clone()
    logits[:, img_context_id] = float("-inf")
    return logits.argmax(-1)


@torch.inference_mode()
def generate_timed(model: Model, input_ids, pixel_values, new_tokens: int):
    """Model.generate without eos, timed in two parts. The cache is preallocated for the whole
    context; prefill = forward of the prompt (last position only) and the first token; decode =
    new_tokens - 1 single-token steps through the cache. Returns (prefill_s, decode_s,
    cache_bytes, tokens (1, new_tokens))."""
    device = input_ids.device
    img = model.cfg.img_context_id
    cache = model.new_cache(capacity=input_ids.shape[1] + new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    tok = _pick(model(input_ids, pixel_values, cache=cache, last_only=True)[:, -1], img)
    _sync(device)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = _pick(model(tok[:, None], cache=cache)[:, -1], img)
        out.append(tok)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cache.nbytes(), torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------
# Memory

def _proc_status_kib(key: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024       # KiB on Linux, bytes on macOS


def memory_reset(device: torch.device) -> tuple[int, bool]:
    """Start a measurement: returns (baseline bytes, whether the peak counter was reset)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), True
    rss = _proc_status_kib("VmRSS")
    try:                                  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = _proc_status_kib("VmHWM") is not None
    except OSError:
        reset = False
    return (rss * 1024 if rss is not None else _maxrss_bytes()), reset


def memory_peak(device: torch.device, reset: bool) -> int:
    """Peak bytes since `memory_reset` (since process start on CPU if the reset failed)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_kib("VmHWM") if reset else None
    return hwm * 1024 if hwm is not None else _maxrss_bytes()


MiB = 1024.0 ** 2


# ----------------------------------------------------------------------------------------------
# One model point (runs in its own process)

def run_point(spec: dict) -> dict:
    """Build the model of `spec`, warm up, then time `repeats` prefill + decode runs (fewer if
    their total passes point_budget_s) and measure the peak memory over all of them."""
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    cfg = model_config(spec["preset"], spec["layout"], spec.get("hybrid_attn"),
                       spec.get("placement", "head-interleaved"))
    t_build = time.perf_counter()
    model = build_model(cfg, device, dtype, spec["seed"])
    _sync(device)
    build_s = time.perf_counter() - t_build
    ids, px = make_prompt(cfg, spec.get("L"), spec.get("image_tokens", 0), spec.get("text_tokens", 0),
                          device, dtype, spec["seed"])
    n = spec["new_tokens"]
    # warm-up: a short text prompt and a few decode steps (kernels, allocator, lazy init)
    warm = random_text_ids(cfg, min(ids.shape[1], 256), torch.Generator().manual_seed(1)).to(device)
    generate_timed(model, warm, None, min(n, 4))
    if px is not None:
        with torch.inference_mode():
            model.vision_features(px[:1])
    base, reset = memory_reset(device)
    prefill, decode = [], []
    cache_bytes = 0
    while len(prefill) < spec["repeats"]:
        tp, td, cache_bytes, tokens = generate_timed(model, ids, px, n)
        prefill.append(tp)
        decode.append(td)
        del tokens
        if sum(prefill) + sum(decode) > spec["point_budget_s"]:
            break
    peak = memory_peak(device, reset)
    p, d = statistics.median(prefill), statistics.median(decode)
    res = {
        "prompt_tokens": int(ids.shape[1]),
        "image_tokens": int((ids == cfg.img_context_id).sum()),
        "n_images": 0 if px is None else int(px.shape[0]),
        "decode_steps": n - 1,
        "repeats": len(prefill),
        "prefill_s": p, "decode_s": d, "total_s": p + d,
        "prefill_all_s": prefill, "decode_all_s": decode,
        "decode_ms_per_token": 1e3 * d / (n - 1),
        "prefill_tokens_per_s": ids.shape[1] / p,
        "tokens_per_s": n / (p + d),                       # the paper's Table 2 "Speed"
        "peak_mib": peak / MiB,                            # CUDA: allocated; CPU: resident (process)
        "baseline_mib": base / MiB,
        "run_mib": (peak - base) / MiB,                    # above the post-build baseline
        "cache_mib": cache_bytes / MiB,                    # KV caches + Mamba states after the run
        "params": model.num_params(),
        "build_s": build_s,
        "threads": torch.get_num_threads(),
        "peak_reset": reset,
    }
    if device.type != "cuda":
        res["process_max_rss_mib"] = _maxrss_bytes() / MiB   # ru_maxrss since start, warm-up included
    return res


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def run_point_safe(spec: dict) -> dict:
    """run_point with failures classified: {"status": "ok" | "oom" | "error", ...}."""
    try:
        return {"status": "ok", **run_point(spec)}
    except Exception as e:  # recorded, never fatal: the parent goes on with the next point
        return {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {str(e)[:400]}"}


def point_main(spec: dict) -> dict:
    """Child entry (`bench.py --point JSON`): run the point, print the result line."""
    res = run_point_safe(spec)
    print(POINT_TAG + json.dumps(res), flush=True)
    return res


def run_point_subprocess(spec: dict, timeout_s: float) -> dict:
    """Run one point in a fresh interpreter; a crash, kill or timeout becomes a status."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(POINT_TAG):
            return json.loads(line[len(POINT_TAG):])
    tail = (r.stderr or r.stdout or "").strip()[-400:]
    if r.returncode < 0:
        sig = -r.returncode
        why = " (SIGKILL: probably out of memory)" if sig == 9 else ""
        return {"status": "killed", "error": f"killed by signal {sig}{why}; {tail}"}
    return {"status": "failed", "error": f"exit code {r.returncode}; {tail}"}


# ----------------------------------------------------------------------------------------------
# Kernel section (in this process)

def _fla_simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or no GPU Triton: the reference is optional
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}

    def fn(t):  # the same operator: q = C, k = B, v = dt * x, g = dt * A, scale 1
        v = (t["dt"][..., None] * t["x"]).to(t["x"].dtype)
        return chunk_simple_gla(q=t["C"], k=t["B"], v=v, g=t["dt"] * t["A"], scale=1.0, **extra)[0]
    return fn


def kernel_table(device: torch.device, chunk_size: int) -> dict:
    """name -> (fn(tensors) -> output, names of the leaves to differentiate)."""
    ssd_args = lambda t: (t["x"], t["dt"], t["A"], t["B"], t["C"])
    ssd_leaves = ("x", "dt", "B", "C")
    ks = {"ssd_naive": (lambda t: ssd_naive(*ssd_args(t))[0], ssd_leaves),
          "ssd_chunked": (lambda t: ssd_chunked(*ssd_args(t), chunk_size=chunk_size)[0], ssd_leaves)}
    if device.type == "cuda" and triton is not None:
        ks["ssd_triton"] = (lambda t: ssd_triton(*ssd_args(t), chunk_size=chunk_size)[0], ssd_leaves)
    fla = _fla_simple_gla() if device.type == "cuda" else None
    if fla is not None:
        ks["fla_chunk_simple_gla"] = (fla, ssd_leaves)
    ks["sdpa_causal"] = (lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True),
                         ("q", "k", "v"))
    return ks


def kernel_inputs(L: int, H: int, P: int, N: int, device, dtype, seed: int = 0) -> dict:
    """SSD inputs as the model makes them (G = H groups, N = P, dt and A in float32) and SDPA
    q, k, v (b, H, L, P) in `dtype`; all drawn on the device."""
    torch.manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, device=device, dtype=torch.float32).to(dt)
    return {"x": r(1, L, H, P), "dt": F.softplus(r(1, L, H, dt=torch.float32) - 3.0),
            "A": -torch.empty(H, device=device).uniform_(*A_INIT_RANGE),
            "B": (r(1, L, H, N, dt=torch.float32) / math.sqrt(N)).to(dtype),
            "C": (r(1, L, H, N, dt=torch.float32) / math.sqrt(N)).to(dtype),
            "q": r(1, H, L, P), "k": r(1, H, L, P), "v": r(1, H, L, P)}


def time_runs(fn, device, repeats: int, budget_s: float) -> list:
    """Up to `repeats` synchronised timings, stopping once their sum passes budget_s."""
    ts = []
    while len(ts) < repeats:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
        if sum(ts) > budget_s:
            break
    return ts


def copy_bandwidth(device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write), median of 5."""
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    t = statistics.median(time_runs(lambda: b.copy_(a), device, 5, 1e9))
    del a, b
    return 2 * nbytes / t


def bench_kernels(c: BenchConfig, progress, on_row=None) -> dict:
    """Forward and forward + backward time of every available kernel across L: a warm-up call
    (at the first length on the CPU, which has no JIT; at every length on CUDA), then up to
    max(repeats, 5) synchronised calls within point_budget_s, median. `on_row(rows)` is called
    after every timing (the driver saves partial results with it)."""
    device, dtype = torch.device(c.device), DTYPES[c.dtype]
    mc = model_config(c.preset, "linear")
    H, P = mc.n_heads, mc.head_dim
    N = P
    ks = kernel_table(device, mc.ssd_chunk_size)
    modes = ("fwd", "fwd+bwd") if c.backward else ("fwd",)
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    rows, dead, warmed, last = [], {}, set(), {}
    for L in c.lengths:
        t = kernel_inputs(L, H, P, N, device, dtype, c.seed)
        # the least bytes an SSD forward must move: read x, dt, B, C; write y
        floor_bytes = sum(t[k].numel() * t[k].element_size() for k in ("x", "dt", "B", "C")) + \
            t["x"].numel() * t["x"].element_size()
        for name, (fn, leaves) in ks.items():
            for mode in modes:
                progress.set_postfix_str(f"kernel {name} {mode} L={L}")
                row = {"kernel": name, "mode": mode, "L": L}
                if name == "ssd_naive" and L > c.naive_max_len:
                    continue
                if (name, mode) in dead:
                    rows.append({**row, "status": "skipped", "error": dead[(name, mode)]})
                    progress.update(1)
                    continue
                if (name, mode) in last:                 # quadratic extrapolation from the last length
                    L0, s0 = last[(name, mode)]
                    if s0 * (L / L0) ** 2 > c.kernel_max_s:
                        why = f"predicted > {c.kernel_max_s:.0f} s (--kernel-max-s)"
                        rows.append({**row, "status": "skipped", "error": why})
                        dead[(name, mode)] = why
                        progress.update(1)
                        continue
                try:
                    if mode == "fwd":
                        def call():
                            with torch.inference_mode():
                                fn(t)
                    else:
                        leaf = {k: (v.detach().requires_grad_(True) if k in leaves else v) for k, v in t.items()}
                        gy = None

                        def call():
                            nonlocal gy
                            for k in leaves:
                                leaf[k].grad = None
                            y = fn(leaf)
                            gy = torch.ones_like(y) if gy is None else gy
                            y.backward(gy)
                    # warm-up: at the first length on CPU (no JIT), at every length on CUDA
                    if device.type == "cuda" or (name, mode) not in warmed:
                        call()
                        warmed.add((name, mode))
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    ts = time_runs(call, device, max(c.repeats, 5), c.point_budget_s)
                    row.update(status="ok", ms=1e3 * statistics.median(ts), all_ms=[1e3 * x for x in ts],
                               repeats=len(ts))
                    last[(name, mode)] = (L, statistics.median(ts))
                    if device.type == "cuda":
                        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / MiB
                    if mode == "fwd" and name.startswith(("ssd", "fla")):
                        row["floor_ms"] = 1e3 * floor_bytes / bw
                except Exception as e:  # recorded; the run goes on
                    row.update(status="oom" if _is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:300]}")
                    dead[(name, mode)] = f"{row['status']} at L={L}"
                finally:
                    call = leaf = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                progress.update(1)
                if on_row is not None:
                    on_row(rows)
        del t
    return {"shape": {"b": 1, "H": H, "P": P, "N": N, "G": H, "chunk_size": mc.ssd_chunk_size,
                      "dtype": c.dtype, "dt_A_dtype": "float32"},
            "kernels": list(ks), "modes": list(modes), "bandwidth_gb_s": bw / 1e9, "results": rows}


def kernel_jobs(c: BenchConfig) -> int:
    ks = kernel_table(torch.device(c.device), 64)
    n = 0
    for L in c.lengths:
        n += sum(1 for k in ks if not (k == "ssd_naive" and L > c.naive_max_len))
    return n * (2 if c.backward else 1)


# ----------------------------------------------------------------------------------------------
# Model section driver, ratios, summary

def model_specs(c: BenchConfig) -> list:
    """Table 2 points first (short), then every layout at every length."""
    common = dict(preset=c.preset, device=c.device, dtype=c.dtype, new_tokens=c.new_tokens, threads=c.threads,
                  repeats=c.repeats, point_budget_s=c.point_budget_s, seed=c.seed,
                  hybrid_attn=c.hybrid_attn, placement=c.placement)
    specs = []
    if not c.skip_table2:
        specs += [dict(common, kind="table2", layout=lay, L=None, image_tokens=c.table2_image_tokens,
                       text_tokens=c.table2_text_tokens) for lay in LAYOUTS]
    specs += [dict(common, kind="length", layout=lay, L=L) for L in c.lengths for lay in LAYOUTS]
    return specs


def memory_metric(device: str) -> str:
    return "peak_mib" if device.startswith("cuda") else "run_mib"


def compute_ratios(points: list, metric: str) -> list:
    """Per length, each student against the teacher of the same run."""
    by = {(p["layout"], p["L"]): p for p in points if p["kind"] == "length" and p["status"] == "ok"}
    out = []
    for L in sorted({p["L"] for p in points if p["kind"] == "length"}):
        t = by.get(("teacher", L))
        for lay in ("linear", "hybrid"):
            s = by.get((lay, L))
            if t is None or s is None:
                continue
            tm, sm = t[metric], s[metric]
            out.append({"L": L, "layout": lay,
                        "speedup": t["total_s"] / s["total_s"],
                        "prefill_speedup": t["prefill_s"] / s["prefill_s"],
                        "decode_speedup": t["decode_ms_per_token"] / s["decode_ms_per_token"],
                        "memory_ratio": sm / tm if tm > 0 else None,
                        "memory_saving": 1.0 - sm / tm if tm > 0 else None,
                        "cache_ratio": s["cache_mib"] / t["cache_mib"] if t["cache_mib"] > 0 else None})
    return out


def compute_checks(points: list, metric: str) -> dict:
    """The issue's acceptance figures: speed at the longest length, flat linear decode, memory slopes."""
    ok = {(p["layout"], p["L"]): p for p in points if p["kind"] == "length" and p["status"] == "ok"}
    lengths = sorted({p["L"] for p in points if p["kind"] == "length"})
    checks = {}
    if len(lengths) >= 1:
        Lmax = max(L for L in lengths if ("teacher", L) in ok and ("linear", L) in ok) \
            if any(("teacher", L) in ok and ("linear", L) in ok for L in lengths) else None
        if Lmax is not None:
            checks["longest_common_L"] = Lmax
            checks["linear_faster_than_teacher"] = ok[("linear", Lmax)]["total_s"] < ok[("teacher", Lmax)]["total_s"]
    for lay in LAYOUTS:
        ls = [L for L in lengths if (lay, L) in ok]
        if len(ls) >= 2:
            a, b = ok[(lay, ls[0])], ok[(lay, ls[-1])]
            checks[f"{lay}_decode_ms_growth"] = b["decode_ms_per_token"] / a["decode_ms_per_token"]
            checks[f"{lay}_memory_slope_kib_per_token"] = (b[metric] - a[metric]) * 1024 / (ls[-1] - ls[0])
            checks[f"{lay}_span"] = [ls[0], ls[-1]]
    if "linear_decode_ms_growth" in checks:
        checks["linear_decode_flat_within_20pct"] = abs(checks["linear_decode_ms_growth"] - 1) <= 0.2
    if "linear_memory_slope_kib_per_token" in checks and "teacher_memory_slope_kib_per_token" in checks:
        checks["linear_memory_grows_slower"] = (checks["linear_memory_slope_kib_per_token"]
                                                < checks["teacher_memory_slope_kib_per_token"])
    return checks


def summary_line(ratios: list, points: list, kernel: dict | None, new_tokens: int) -> str:
    if ratios:
        L = max(r["L"] for r in ratios)
        parts = []
        for r in ratios:
            if r["L"] != L:
                continue
            mem = ("n/a memory" if r["memory_saving"] is None else
                   f"{100 * r['memory_saving']:.0f}% less memory" if r["memory_saving"] >= 0 else
                   f"{-100 * r['memory_saving']:.0f}% more memory")
            sp = r["speedup"]
            speed = f"{sp:.1f}x faster" if sp >= 1 else f"{1 / sp:.1f}x slower"
            parts.append(f"{r['layout']} {speed}, {mem}")
        fails = sorted({(p["layout"], p["L"], p["status"]) for p in points
                        if p["kind"] == "length" and p["status"] != "ok" and p["L"] > L})
        tail = "".join(f"; {lay} {st} at L={l}" for lay, l, st in fails[:3])
        return f"at L={L}: " + "; ".join(parts) + f" than the teacher (prefill + {new_tokens} tokens){tail}"
    if kernel:
        ok = {(r["kernel"], r["L"]): r for r in kernel["results"] if r["status"] == "ok" and r["mode"] == "fwd"}
        Ls = [L for (k, L) in ok if k == "sdpa_causal"]
        fast = [k for k in kernel["kernels"] if k in ("ssd_triton", "ssd_chunked")]
        for L in sorted(Ls, reverse=True):
            for k in fast:
                if (k, L) in ok:
                    return (f"kernel at L={L}: {k} {ok[('sdpa_causal', L)]['ms'] / ok[(k, L)]['ms']:.1f}x "
                            f"the speed of causal SDPA (forward)")
    return "no successful points to summarise"


# ----------------------------------------------------------------------------------------------
# Reporting

def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None) if triton is not None else None}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = int(f.readline().split()[1]) / 1024 ** 2
    except (OSError, ValueError, IndexError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1024 ** 3
        info["cuda"] = torch.version.cuda
    try:
        import fla  # noqa: F401
        info["fla"] = getattr(fla, "__version__", "installed")
    except Exception:
        info["fla"] = None
    return info


def _loadavg():
    """1-minute load average (other work on the machine distorts CPU timings), or None."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def git_commit() -> tuple[str, bool | None]:
    """(short commit, dirty) of this file's repository, or ("unknown", None)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown", None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                            capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def format_tables(res: dict) -> list:
    lines = []
    c = res["config"]
    metric = res.get("model", {}).get("memory_metric")
    mdesc = {"run_mib": "peak resident memory above the post-build baseline",
             "peak_mib": "peak allocated GPU memory (weights included)"}.get(metric, "")
    model = res.get("model")
    if model and model["points"]:
        t2 = [p for p in model["points"] if p["kind"] == "table2"]
        if t2:
            ok = [p for p in t2 if p["status"] == "ok"]
            desc = (f"{ok[0]['image_tokens']} image tokens ({ok[0]['n_images']} images) + "
                    f"{ok[0]['prompt_tokens'] - ok[0]['image_tokens']} text tokens" if ok else "")
            lines += ["", f"Table 2 setting: {desc}, {c['new_tokens']} generated tokens "
                      f"(paper, RTX 4090: HoVLE 33.03 tok/s, linear 132.43, hybrid 134.77)",
                      f"{'model':<9}{'prefill s':>11}{'decode s':>10}{'total s':>9}{'tok/s':>9}{'vs teacher':>12}"]
            tt = next((p for p in ok if p["layout"] == "teacher"), None)
            for p in t2:
                if p["status"] != "ok":
                    lines.append(f"{p['layout']:<9}  {p['status']}: {p.get('error', '')[:80]}")
                    continue
                sp = f"{tt['total_s'] / p['total_s']:.2f}x" if tt else "-"
                lines.append(f"{p['layout']:<9}{p['prefill_s']:>11.3f}{p['decode_s']:>10.3f}{p['total_s']:>9.3f}"
                             f"{p['tokens_per_s']:>9.1f}{sp:>12}")
        lines += ["", f"Model section: prefill L tokens + {c['new_tokens']} generated tokens; memory = {mdesc}",
                  f"{'L':>7} {'model':<8}{'prefill s':>10}{'decode s':>9}{'ms/tok':>8}{'total s':>9}"
                  f"{'tok/s':>8}{'mem MiB':>9}{'cache MiB':>10}{'speedup':>9}{'mem saved':>10}"]
        rat = {(r["layout"], r["L"]): r for r in model["ratios"]}
        for p in model["points"]:
            if p["kind"] != "length":
                continue
            head = f"{p['L']:>7} {p['layout']:<8}"
            if p["status"] != "ok":
                lines.append(head + f"  {p['status']}: {p.get('error', '')[:80]}")
                continue
            r = rat.get((p["layout"], p["L"]))
            sp = "1.00x" if p["layout"] == "teacher" else (f"{r['speedup']:.2f}x" if r else "-")
            ms = "-" if p["layout"] == "teacher" or not r or r["memory_saving"] is None else \
                f"{100 * r['memory_saving']:.0f}%"
            lines.append(head + f"{p['prefill_s']:>10.3f}{p['decode_s']:>9.3f}{p['decode_ms_per_token']:>8.2f}"
                         f"{p['total_s']:>9.3f}{p['tokens_per_s']:>8.1f}{p[metric]:>9.1f}{p['cache_mib']:>10.2f}"
                         f"{sp:>9}{ms:>10}")
        ch = model.get("checks", {})
        if ch:
            lines.append("checks: " + ", ".join(f"{k}={_f(v, '.3g') if isinstance(v, float) else v}"
                                                for k, v in ch.items()))
    kern = res.get("kernel")
    if kern and kern["results"]:
        s = kern["shape"]
        lines += ["", f"Kernel section: b=1 H={s['H']} P={s['P']} N={s['N']} G={s['G']} Q={s['chunk_size']} "
                  f"{s['dtype']}, ms (median); floor = bytes of x, dt, B, C, y at "
                  f"{kern['bandwidth_gb_s']:.1f} GB/s measured copy bandwidth"]
        names = kern["kernels"]
        by = {(r["kernel"], r["mode"], r["L"]): r for r in kern["results"]}
        for mode in kern["modes"]:
            cols = names + (["floor"] if mode == "fwd" else [])
            lines.append(f"{mode:<8}{'L':>7}" + "".join(f"{n:>22}" for n in cols))
            for L in sorted({r["L"] for r in kern["results"]}):
                cells = []
                for n in names:
                    r = by.get((n, mode, L))
                    cells.append("" if r is None else (f"{r['ms']:.2f}" if r["status"] == "ok" else r["status"]))
                if mode == "fwd":
                    fl = next((r["floor_ms"] for n in names
                               if (r := by.get((n, mode, L))) and "floor_ms" in r), None)
                    cells.append(_f(fl, ".3f"))
                lines.append(f"{'':<8}{L:>7}" + "".join(f"{x:>22}" for x in cells))
    return lines


def _klabel(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else (f"{n / 1000:.0f}K" if n >= 10000 else str(n))


def _length_axis(ax, lengths) -> None:
    """Log-2 x axis with a tick at every measured length (1K, 2K, ..., 103K)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_klabel(n) for n in lengths])
    ax.minorticks_off()


def make_plots(res: dict, out: str) -> list:
    """model_time.png, model_memory.png, kernel.png (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []

    def save(fig, name, title=None):
        fig.suptitle(title or tag, fontsize=9)
        fig.tight_layout()
        files.append(os.path.join(out, name))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    colors = {"teacher": "tab:red", "linear": "tab:blue", "hybrid": "tab:green"}
    m = res["machine"]
    where = m.get("gpu") or f"{m.get('cpus_usable', m['cpu_count'])} CPU cores"
    tag = f"{res['config']['preset']} preset, {res['config']['dtype']}, {where}, commit {res['commit']}"
    model = res.get("model")
    if model and any(p["kind"] == "length" for p in model["points"]):
        pts = [p for p in model["points"] if p["kind"] == "length"]
        metric = model["memory_metric"]

        def series(lay, key):
            xs = [p["L"] for p in pts if p["layout"] == lay and p["status"] == "ok"]
            ys = [p[key] for p in pts if p["layout"] == lay and p["status"] == "ok"]
            bad = [p for p in pts if p["layout"] == lay and p["status"] != "ok"]
            label = lay + (f" ({bad[0]['status']} from L={bad[0]['L']})" if bad else "")
            return xs, ys, label

        n = res["config"]["new_tokens"]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for lay in LAYOUTS:
            xs, ys, label = series(lay, "total_s")
            ax[0].plot(xs, ys, "o-", color=colors[lay], label=f"{label}: prefill + {n} tokens")
            xs, ys, _ = series(lay, "prefill_s")
            ax[0].plot(xs, ys, "s--", color=colors[lay], alpha=0.6, label=f"{lay}: prefill only")
            xs, ys, label = series(lay, "decode_ms_per_token")
            ax[1].plot(xs, ys, "o-", color=colors[lay], label=label)
        ax[0].set(yscale="log", xlabel="sequence length L (tokens)", ylabel="time (s)",
                  title="time vs length (paper Fig. 1c)")
        ax[1].set(yscale="log", xlabel="context length L (tokens)", ylabel="ms per decoded token",
                  title="decode time per token")
        Ls = sorted({p["L"] for p in pts})
        for a in ax:
            _length_axis(a, Ls)
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
        save(fig, "model_time.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for lay in LAYOUTS:
            xs, ys, label = series(lay, metric)
            pos = [(x, y) for x, y in zip(xs, ys) if y > 0]          # log axis: increments of 0 are left out
            ax.plot([x for x, _ in pos], [y for _, y in pos], "o-", color=colors[lay], label=label)
            xs, ys, _ = series(lay, "cache_mib")
            ax.plot(xs, ys, ":", color=colors[lay], alpha=0.7, label=f"{lay}: cache size (KV / state)")
        ylabel = "peak GPU memory (MiB)" if metric == "peak_mib" else "peak RSS above baseline (MiB)"
        ax.set(yscale="log", xlabel="sequence length L (tokens)", ylabel=ylabel,
               title=f"memory vs length, prefill + {n} tokens (paper Fig. 1d)")
        _length_axis(ax, Ls)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "model_memory.png")

    kern = res.get("kernel")
    if kern and kern["results"]:
        modes = kern["modes"]
        fig, ax = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        ax = ax[0]
        for i, mode in enumerate(modes):
            for name in kern["kernels"]:
                rows = [r for r in kern["results"]
                        if r["kernel"] == name and r["mode"] == mode and r["status"] == "ok"]
                if rows:
                    ax[i].plot([r["L"] for r in rows], [r["ms"] for r in rows], "o-", label=name)
            if mode == "fwd":
                fl = sorted({(r["L"], r["floor_ms"]) for r in kern["results"] if "floor_ms" in r})
                if fl:
                    ax[i].plot([x for x, _ in fl], [y for _, y in fl], "k:", label="SSD memory floor")
            ax[i].set(yscale="log", xlabel="L (tokens)", ylabel="ms", title=f"kernel {mode}")
            _length_axis(ax[i], sorted({r["L"] for r in kern["results"]}))
            ax[i].grid(True, which="both", alpha=0.3)
            ax[i].legend(fontsize=8)
        s = kern["shape"]
        save(fig, "kernel.png", f"SSD vs references, H={s['H']} P=N={s['P']}; {tag}")
    return files


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None) -> tuple[BenchConfig, str | None]:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        description="Speed and memory curves of teacher / linear / hybrid and of the SSD kernel "
                    "(mmMamba Fig. 1 (c)(d), Table 2).",
        epilog="Output: <out>/bench.json, table.txt, model_time.png, model_memory.png, kernel.png; "
               "the last printed line summarises the ratios at the longest length.")
    p.add_argument("--preset", choices=tuple(PRESETS), default=d.preset,
                   help="tiny (default): the project's model on the CPU, float32; "
                        "hovle: HoVLE-2.6B shapes, bf16, on CUDA")
    p.add_argument("--device", default=None, help="override the preset's device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="override the preset's dtype")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths (default: 1024 doubling up to --max-len, plus --max-len)")
    p.add_argument("--max-len", type=int, default=None, help="longest length (default: 32768 tiny, 103000 hovle)")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="tokens generated per point (no eos) (default %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="timed runs per point; the median is reported (default %(default)s)")
    p.add_argument("--point-budget", type=float, default=d.point_budget_s, dest="point_budget_s",
                   help="seconds after which a point stops repeating (at least one run) (default %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, dest="timeout_s",
                   help="seconds after which a model point's process is stopped and recorded as timeout "
                        "(default %(default)s)")
    p.add_argument("--kernel-max-s", type=float, default=d.kernel_max_s,
                   help="kernel section: skip a length whose run, extrapolated quadratically, would take longer "
                        "(default %(default)s)")
    p.add_argument("--hybrid-attn", type=int, default=None,
                   help="attention layers the hybrid keeps (default n_layers // 4: 2 of 8 tiny, 8 of 32 hovle)")
    p.add_argument("--placement", default=d.placement,
                   choices=("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked"),
                   help="where the hybrid keeps its attention layers (default %(default)s)")
    p.add_argument("--table2-image-tokens", type=int, default=d.table2_image_tokens,
                   help="image tokens of the Table 2 prompt (rounded up to whole images) (default %(default)s)")
    p.add_argument("--naive-max-len", type=int, default=d.naive_max_len,
                   help="longest L for ssd_naive (default %(default)s)")
    p.add_argument("--no-backward", action="store_true", help="kernel section: forward only")
    p.add_argument("--skip-kernel", action="store_true", help="skip the kernel section")
    p.add_argument("--skip-model", action="store_true", help="skip the model section (length curves)")
    p.add_argument("--skip-table2", action="store_true", help="skip the Table 2 setting")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the random weights and inputs (default %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="smallest sizes (L 64 and 128, 8 new tokens, 1 repeat, one image in Table 2), model "
                        "points in this process: a few seconds, to check the machinery, not to measure")
    p.add_argument("--in-process", action="store_true",
                   help="run model points in this process instead of a fresh one each (faster start, "
                        "but memory peaks are not isolated between points)")
    p.add_argument("--out", default=None, help="output folder (default bench_results/<preset>_<device>)")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)   # internal: run one model point
    a = p.parse_args(argv)
    cfg = BenchConfig(preset=a.preset, device=a.device, dtype=a.dtype, lengths=a.lengths, max_len=a.max_len,
                      new_tokens=a.new_tokens, repeats=a.repeats, point_budget_s=a.point_budget_s,
                      timeout_s=a.timeout_s, kernel_max_s=a.kernel_max_s, hybrid_attn=a.hybrid_attn,
                      placement=a.placement,
                      table2_image_tokens=a.table2_image_tokens, naive_max_len=a.naive_max_len,
                      backward=not a.no_backward, skip_kernel=a.skip_kernel, skip_model=a.skip_model,
                      skip_table2=a.skip_table2, seed=a.seed, smoke=a.smoke, out=a.out,
                      in_process=a.in_process, threads=a.threads)
    return cfg, a.point


def main(argv=None) -> dict:
    cfg, point = parse_args(argv)
    if point is not None:
        return point_main(json.loads(point))
    c = resolve(cfg)
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        return _run(c)
    finally:
        torch.set_num_threads(threads)        # main() may be called from a test session


def _run(c: BenchConfig) -> dict:
    from tqdm import tqdm
    os.makedirs(c.out, exist_ok=True)
    commit, dirty = git_commit()
    started = time.time()
    res = {"bench": "mmMamba bench.py (paper Fig. 1 (c)(d), Table 2; SSD kernel)",
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": commit, "dirty": dirty, "torch": torch.__version__,
           "machine": machine_info(c.device), "config": dataclasses.asdict(c), "paper": PAPER,
           "load_avg_start": _loadavg()}
    layouts = {lay: model_config(c.preset, lay, c.hybrid_attn, c.placement) for lay in LAYOUTS}
    res["layouts"] = {lay: mc.layers for lay, mc in layouts.items()}
    res["model_config"] = layouts["teacher"].to_dict()
    specs = [] if c.skip_model and c.skip_table2 else model_specs(c)
    if c.skip_model:
        specs = [s for s in specs if s["kind"] != "length"]
    n_kernel = 0 if c.skip_kernel else kernel_jobs(c)
    print(f"bench: preset {c.preset}, {c.device} {c.dtype}, lengths {c.lengths}, {c.new_tokens} new tokens, "
          f"{len(specs)} model points + {n_kernel} kernel timings; commit {commit}{'+dirty' if dirty else ''}",
          flush=True)
    ncpu = res["machine"].get("cpus_usable") or os.cpu_count() or 1
    if c.device == "cpu" and (res["load_avg_start"] or 0) > 0.5 * ncpu:
        print(f"warning: load average {res['load_avg_start']:.1f} on {ncpu} CPUs: other work will distort "
              f"the CPU timings", flush=True)
    bar = tqdm(total=len(specs) + n_kernel, desc="bench", unit="pt", file=sys.stderr, dynamic_ncols=True)
    points, dead = [], {}
    partial_path = os.path.join(c.out, "bench.partial.json")

    def save_partial(kernel_rows=None):
        """Everything measured so far, after every point: a run that is killed keeps its numbers."""
        write_json(partial_path, {**res, "partial": True, "model_points": points,
                                  "kernel_results": kernel_rows or []})

    for spec in specs:              # model points first: each in a fresh process, GPU still empty
        bar.set_postfix_str(f"{spec['layout']} {'table2' if spec['kind'] == 'table2' else 'L=%d' % spec['L']}")
        key = (spec["kind"], spec["layout"])
        if spec["kind"] == "length" and key in dead:
            r = {"status": "skipped", "error": f"{dead[key]} at a smaller L"}
        elif c.in_process:
            r = run_point_safe(spec)
        else:
            r = run_point_subprocess(spec, c.timeout_s)
            if r["status"] != "ok" and spec["kind"] == "length":
                dead[key] = r["status"]
                tqdm.write(f"  {spec['layout']} L={spec['L']}: {r['status']} ({r.get('error', '')[:120]})")
        points.append({"kind": spec["kind"], "layout": spec["layout"], "L": spec["L"], **r})
        bar.update(1)
        save_partial()
    metric = memory_metric(c.device)
    if specs:
        res["model"] = {"memory_metric": metric, "points": points,
                        "ratios": compute_ratios(points, metric), "checks": compute_checks(points, metric)}
    if not c.skip_kernel:
        res["kernel"] = bench_kernels(c, bar, on_row=save_partial)
    bar.close()
    res["elapsed_s"] = time.time() - started
    res["load_avg_end"] = _loadavg()
    res["summary"] = summary_line(res.get("model", {}).get("ratios", []), points, res.get("kernel"), c.new_tokens)
    lines = format_tables(res)
    res["plots"] = [os.path.basename(f) for f in make_plots(res, c.out)]
    write_json(os.path.join(c.out, "bench.json"), res)
    if os.path.exists(partial_path):
        os.remove(partial_path)                 # complete: bench.json holds everything
    m = res["machine"]
    lines += ["", f"machine: {m.get('gpu') or m.get('cpu_model') or m['processor'] or m['machine']}, "
              f"{m.get('cpus_usable', m['cpu_count'])} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}, "
              f"load {_f(res['load_avg_start'], '.1f')}, commit {commit}"
              f"{'+dirty' if dirty else ''}; {res['elapsed_s']:.0f} s; wrote {c.out}/bench.json, "
              + ", ".join(res["plots"]),
              f"paper at 103K tokens (HoVLE-2.6B, RTX 4090): linear 20.6x faster, 75.8% less memory; "
              f"hybrid 13.5x faster, 60.2% less memory",
              res["summary"]]
    with open(os.path.join(c.out, "table.txt"), "w") as f:
        f.write("\n".join(lines).lstrip("\n") + "\n")
    print("\n".join(lines), flush=True)
    return res


if __name__ == "__main__":
    main()

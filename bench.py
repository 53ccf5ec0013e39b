"""Speed and memory of the teacher, mmMamba-linear and mmMamba-hybrid, and of the SSD operator (arXiv 2502.13145).

Sections: model = Fig. 1 (c)(d), time and memory of prefill + 256 generated tokens against length (the paper: PAPER);
table2 = Table 2 (768 image + 32 text tokens, 256 generated); decode = linear decode, lengths interleaved in one
process; kernel = the SSD operator against causal SDPA. table2, decode: torch.compile (--no-compile: eager).
Layouts: "teacher" prefills in one pass (as HoVLE is usually run); "teacher-seg", "linear" (all Mamba-2) and "hybrid"
(n_layers // 4 attention layers) --segment tokens at a time, carrying their caches. Random weights and tokens.
A model point is timed in a fresh process (`--point JSON`) by Model.generate's stats (prefill = prompt + first token,
decode = the rest), its memory (CUDA peak allocated, weights included, as the paper; CPU peak RSS above the post-build
RSS) in another. Failures (OOM, timeouts) are recorded; one predicted to pass --budget-s is "skipped (budget)".

Run:  python bench.py           # tiny model, CPU, L 1K..128K, teacher as far as the budget allows; < 10 min
      python bench.py --smoke   # tiny sizes, points in this process (memory only rough): seconds (the test)
      python bench.py --long    # every layout once at 103,000 tokens, no budget (~35 min on 2 CPU cores)
      python bench.py --preset hovle --parts model --lengths 32768 103000    # HoVLE-2.6B shapes, GPU, bf16
Output in --out: bench.json (bench.partial.json until then), table.txt, model_time.png, model_memory.png, kernel.png.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from model import Model, ModelConfig, make_layers
from ssd import ssd_chunked, ssd_naive
from utils import arg, git_commit, parse_config, run_main, write_json

try:
    from ssd_triton import ssd_triton
except ImportError:                                     # pragma: no cover
    ssd_triton = None

LAYOUTS, PARTS = ("teacher", "teacher-seg", "linear", "hybrid"), ("kernel", "table2", "model", "decode")
TAG = "BENCH_POINT_JSON "                               # the child's result line
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRESETS = {"tiny": dict(device="cpu", dtype="float32", lengths=[1024, 4096, 8192, 32768, 131072]),
           "hovle": dict(device="cuda", dtype="bfloat16", lengths=[4096, 16384, 32768, 65536, 103000, 131072])}
PAPER = {"fig1_L": 103000, "fig1_vs_teacher": {"linear": {"speedup": 20.6, "memory_saving": 0.758},
                                               "hybrid": {"speedup": 13.5, "memory_saving": 0.602}},
         "table2_tokens_per_s": {"teacher": 33.03, "linear": 132.43, "hybrid": 134.77}}
MEMORY = {"run_mib": "peak RSS above the post-build baseline", "peak_mib": "peak allocated GPU memory"}
MiB, REPORT_S = 2.0 ** 20, 15.0                         # REPORT_S: budget kept for tables and plots


@dataclasses.dataclass
class BenchConfig:
    preset: str = arg("tiny", "tiny: this project's model, CPU, float32; hovle: HoVLE-2.6B shapes, CUDA, bf16")
    device: str = arg("", "device (default: the preset's)")
    dtype: str = arg("", "float32, bfloat16 or float16 (default: the preset's)")
    parts: list[str] = arg(list(PARTS), "sections to run (decode: after model)")
    lengths: list[int] = arg([], "sequence lengths (default: the preset's, to 128K)")
    new_tokens: int = arg(256, "tokens generated per point, no eos (the paper: 256)")
    segment: int = arg(2048, "prefill segment of teacher-seg, linear and hybrid")
    compile: bool = arg(True, "decode through torch.compile in table2 and decode (Model.generate(compile=True))")
    repeats: int = arg(3, "timed runs per point or kernel (median), fewer once they take --point-budget-s")
    point_budget_s: float = arg(5.0, "stop repeating a point or kernel timing after this many seconds")
    budget_s: float = arg(585.0, "whole run: skip a point predicted to end later (0: no budget)")
    kernel_budget_s: float = arg(45.0, "the kernel section's share of the run")
    timeout_s: float = arg(900.0, "a model point's process is stopped after this long")
    hybrid_attn: int | None = arg(None, "attention layers the hybrid keeps, head-interleaved (default n_layers // 4)")
    table2_image_tokens: int = arg(768, "image tokens of the Table 2 prompt (whole images), plus 32 text tokens")
    batch: list[int] = arg([1], "kernel section batch sizes")
    backward: bool = arg(True, "kernel section: forward + backward too")
    threads: int | None = arg(None, "torch CPU threads (default: torch's)")
    seed: int = arg(0, "seed of weights and inputs")
    long: bool = arg(False, "the paper's point: every layout once at 103,000 tokens, no budget, own folder")
    smoke: bool = arg(False, "tiny sizes, points in this process: seconds; checks the machinery only")
    out: str = arg("", "output folder (default bench_results/<preset>_<device>[_long|_smoke])")
    point: str = arg("", "internal: run one model point (JSON)")


def resolve(c: BenchConfig) -> BenchConfig:
    """Apply --long / --smoke (to fields left at their default) and the preset; check values."""
    over = dict(lengths=[103000], parts=["model"], budget_s=0.0, timeout_s=5400.0, repeats=1) if c.long else {}
    if c.smoke:
        over.update(lengths=[64, 128], new_tokens=8, segment=48, repeats=1, budget_s=0.0, table2_image_tokens=64,
                    threads=1, compile=False)
    c = dataclasses.replace(c, **{k: v for k, v in over.items() if getattr(c, k) == getattr(BenchConfig(), k)})
    if c.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {c.preset!r}")
    p = PRESETS[c.preset]
    c.device, c.dtype = c.device or p["device"], c.dtype or p["dtype"]
    c.lengths = sorted(set(c.lengths or p["lengths"]))
    tail = "_long" * c.long + "_smoke" * c.smoke                  # --smoke never overwrites measured results
    c.out = c.out or os.path.join("bench_results", f"{c.preset}_{c.device.split(':')[0]}{tail}")
    for bad, msg in [(c.dtype not in DTYPES, f"--dtype must be one of {list(DTYPES)}"),
                     (not set(c.parts) <= set(PARTS), f"--parts takes {', '.join(PARTS)}"),
                     (c.device.startswith("cuda") and not torch.cuda.is_available(), "no CUDA device (--device cpu?)"),
                     (min(c.lengths) < 2 or c.new_tokens < 2 or c.repeats < 1 or c.segment < 1,
                      "need lengths >= 2, --new-tokens >= 2, --repeats >= 1, --segment >= 1")]:
        if bad:
            raise ValueError(msg)
    return c


def failure(e: BaseException) -> dict:
    oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
    return {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}


# ---- One model point (in its own process) ---------------------------------------------------------------------
def model_config(c: BenchConfig, layout: str) -> ModelConfig:
    base = ModelConfig.hovle() if c.preset == "hovle" else ModelConfig()
    n_attn = {"linear": 0, "hybrid": base.n_layers // 4 if c.hybrid_attn is None else c.hybrid_attn}
    return base.replace(layers=make_layers(base.n_layers, n_attn.get(layout, base.n_layers)))


def build_model(c: BenchConfig, layout: str) -> Model:
    """Model(cfg) built on the device itself: its constructors and reset_parameters' draws run there."""
    torch.manual_seed(c.seed)
    with torch.device(c.device):
        return Model(model_config(c, layout)).to(DTYPES[c.dtype]).eval()


def memory_run(run, device: torch.device) -> tuple:
    """(baseline, peak) bytes of run(): CUDA allocated; CPU RSS, its peak (VmHWM) reset via /proc/self/clear_refs."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    rss = lambda key: 1024 * next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))
    base = torch.cuda.memory_allocated(device) if cuda else rss("VmRSS:")
    run()
    return base, torch.cuda.max_memory_allocated(device) if cuda else rss("VmHWM:")


def run_point(spec: dict) -> dict:
    """Build, warm up, then time `repeats` runs of Model.generate by its stats, or (spec "memory") measure one run.
    The prompt: L random text tokens, or (L None) Table 2's 16 text tokens, whole images, 16 text tokens."""
    c, layout, L = BenchConfig(**spec["config"]), spec["layout"], spec["L"]
    torch.set_num_threads(c.threads or torch.get_num_threads())
    n, g, model = c.new_tokens, torch.Generator().manual_seed(c.seed), build_model(c, layout)
    cfg, px = model.cfg, None
    text = lambda k: torch.randint(cfg.img_context_id + 1, cfg.vocab_size, (1, k), generator=g)
    if L is None:
        n_img = max(1, math.ceil(c.table2_image_tokens / cfg.image_tokens))
        ids = torch.cat([text(16), torch.full((1, n_img * cfg.image_tokens), cfg.img_context_id), text(16)], 1)
        px = torch.randn(n_img, 3, cfg.image_size, cfg.image_size, generator=g).to(c.device, DTYPES[c.dtype])
    ids, seg = (text(L) if L else ids).to(c.device), None if layout == "teacher" else c.segment
    T, cache, runs, fast = ids.shape[1], None, [], c.compile and L is None and not spec.get("memory")
    # warm-up: two segments, the second as long as the prompt's last one (Triton specialises on lengths)
    W = T if px is not None or T <= (seg or 512) else (seg + (T % seg or seg) if seg else 512)
    model.generate(ids[:, :W], px, max_new_tokens=min(n, 4), segment=seg, compile=fast)

    def run(stats):
        nonlocal cache
        cache = model.new_cache(capacity=T + n)
        assert model.generate(ids, px, n, segment=seg, cache=cache, stats=stats, compile=fast).shape[1] == n
    if spec.get("memory"):
        base, peak = memory_run(lambda: run({}), torch.device(c.device))
        return {"peak_mib": peak / MiB, "baseline_mib": base / MiB, "run_mib": (peak - base) / MiB,
                "cache_mib": cache.nbytes() / MiB}
    while not runs or (len(runs) < c.repeats and sum(r["prefill_s"] + r["decode_s"] for r in runs) < c.point_budget_s):
        runs.append({})
        run(runs[-1])
    p, d = (statistics.median(r[k] for r in runs) for k in ("prefill_s", "decode_s"))
    return {"prompt_tokens": T, "image_tokens": int((ids == cfg.img_context_id).sum()), "segment": seg,
            "repeats": len(runs), "prefill_s": p, "decode_s": d, "total_s": p + d,
            "prefill_all_s": [r["prefill_s"] for r in runs], "decode_all_s": [r["decode_s"] for r in runs],
            "decode_ms_per_token": 1e3 * d / (n - 1), "tokens_per_s": n / (p + d), "cache_mib": cache.nbytes() / MiB,
            "params": sum(q.numel() for q in model.parameters()), "threads": torch.get_num_threads()}


def run_point_safe(spec: dict, memory: bool = True) -> dict:
    """The point's times and (memory: in this process, only roughly on a CPU) its memory; or its failure."""
    try:
        return {"status": "ok", **run_point(spec), **(run_point({**spec, "memory": True}) if memory else {})}
    except Exception as e:                              # recorded; the run goes on
        return failure(e)


def run_point_subprocess(spec: dict, timeout_s: float) -> dict:
    """Times in a fresh interpreter, then memory in another one with glibc mapping every block >= 64 KiB so that RSS
    follows the live tensors (else its threshold grows to 18-48 MiB; mapping slows prefill up to 2.5x: not timed)."""
    t0, out = time.time(), {}
    for extra, env in (({}, {}), ({"memory": True}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})):
        cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps({**spec, **extra})]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(cmd[1]),
                               timeout=max(1.0, timeout_s - (time.time() - t0)), env={**os.environ, **env})
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
        line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith(TAG)), None)
        if line is None:
            oom = " (SIGKILL: out of memory?)" if r.returncode == -9 else ""
            return {"status": "killed" if r.returncode < 0 else "failed",
                    "error": f"exit {r.returncode}{oom}; {(r.stderr or r.stdout).strip()[-300:]}"}
        out.update(json.loads(line[len(TAG):]))
        if out["status"] != "ok":
            break
    return out


# ---- The model section: Table 2, linear at every length, then hybrid, teacher, teacher-seg by length ----------
def predict_s(c: BenchConfig, done: list, layout: str, L: int | None) -> float:
    """Wall time of a point from the layout's last one: its overhead (processes, build, warm-up) plus its timed
    runs and the memory run (mapped allocations: ~2.5 timed runs without attention, ~1.5 with), a run's prefill
    scaled by (L / L0)^2 and decode by L / L0 with attention layers, by L / L0 and 1 without."""
    if not done or L is None:
        return 0.0
    p, k, mem = done[-1], (1 if layout == "linear" else 2), (2.5 if layout in ("linear", "hybrid") else 1.5)
    one = lambda x: p["prefill_s"] * (x / p["L"]) ** k + p["decode_s"] * (x / p["L"]) ** (k - 1)
    overhead = max(0.0, p["wall_s"] - one(p["L"]) * (p["repeats"] + mem))
    return overhead + one(L) * (min(c.repeats, 1 + c.point_budget_s // one(L)) + mem)


def model_section(c: BenchConfig, started: float, save) -> list:
    """The points in that order (the budget cuts the end); a layout's failure skips its longer lengths."""
    specs, points = [("table2", lay, None) for lay in ("teacher", "linear", "hybrid") if "table2" in c.parts], []
    if "model" in c.parts:
        specs += [("length", "linear", L) for L in c.lengths]
        specs += [("length", lay, L) for L in c.lengths for lay in ("hybrid", "teacher", "teacher-seg")]
    for kind, layout, L in specs:
        prev = [p for p in points if (p["kind"], p["layout"]) == (kind, layout)]
        bad = next((p for p in prev if p["status"] != "ok"), None)
        keep = decode_reserve_s(c, points) * ("decode" in c.parts)
        left = c.budget_s - (time.time() - started) - REPORT_S - keep if c.budget_s else math.inf
        pred = predict_s(c, [p for p in prev if p["status"] == "ok"], layout, L)
        spec, t0 = {"config": dataclasses.asdict(c), "kind": kind, "layout": layout, "L": L}, time.time()
        if bad:
            r = {"status": bad["status"] if bad["status"].startswith("skipped") else "skipped",
                 "error": f"{bad['status']} at L={bad['L']}"}
        elif pred > left:
            r = {"status": "skipped (budget)", "error": f"predicted {pred:.0f} s, {max(left, 0):.0f} s left"}
        else:
            r = run_point_safe(spec) if c.smoke else run_point_subprocess(spec, min(c.timeout_s, left))
            r["wall_s"] = time.time() - t0
        points.append({"kind": kind, "layout": layout, "L": L, **r})
        print(f"  {kind} {layout} L={L or r.get('prompt_tokens')}: {r['status']}, " + (
            f"{r['total_s']:.2f} s, {r['run_mib']:.1f} MiB above the baseline, wall {r['wall_s']:.0f} s"
            if r["status"] == "ok" else r["error"][:90]), flush=True)
        save(points)
    return points


def linear_totals(points: list) -> dict:
    return {p["L"]: p["total_s"] for p in points if (p["kind"], p["layout"], p["status"]) == ("length", "linear", "ok")}


def decode_reserve_s(c: BenchConfig, points: list) -> float:        # decode_section: prefills, rounds, compiling
    return sum(linear_totals(points).values()) + 10 + 30 * c.compile


def decode_section(c: BenchConfig, points: list, deadline: float) -> dict:
    """Linear decode at the model section's lengths in one process: each prefilled once, then 16 rounds of 32 tokens at
    each in turn (the VM's 2x drift hits all alike); ms/token: medians over rounds; flatness: of time / round mean."""
    lin, ms, rounds, k = linear_totals(points), {}, 16, 32
    try:
        if lin and time.time() + decode_reserve_s(c, points) <= deadline:
            model, g = build_model(c, "linear"), torch.Generator().manual_seed(c.seed)
            text = lambda L: torch.randint(model.cfg.img_context_id + 1, model.cfg.vocab_size, (1, L),
                                           generator=g).to(c.device)
            model.generate(text(8), max_new_tokens=4, compile=c.compile)                # warm-up (compiles)
            caches = {L: model.new_cache() for L in sorted(lin)}
            for L, cache in caches.items():
                model.prefill(text(L), cache=cache, segment=c.segment)
            for r in range(rounds):                                      # whole rounds until the deadline
                for L, cache in caches.items() if not r or time.time() < deadline else ():
                    model.generate(text(1), None, k + 1, cache=cache, stats=(st := {}), compile=c.compile)
                    ms.setdefault(L, []).append(1e3 * st["decode_s"] / k)
    except Exception as e:                              # recorded; the report is still written
        return {"ms": ms, "median_ms": {}, "relative": {}, **failure(e)}
    med = {L: statistics.median(v) for L, v in ms.items()}
    rel = {L: statistics.median(t / statistics.mean(u) for t, *u in zip(v, *ms.values())) for L, v in ms.items()}
    print("  decode, linear, one process: " + ", ".join(f"L={L} {v:.2f} ms" for L, v in med.items()))
    return {"ms": ms, "median_ms": med, "relative": rel}


# ---- The kernel section (in this process) ----------------------------------------------------------------------
def timeit(fn, device: torch.device, repeats: int, budget_s: float) -> list:
    """Synchronised wall times of fn(): at least one, at most `repeats`, stopping once they pass budget_s."""
    clock, ts = lambda: (torch.cuda.synchronize() if device.type == "cuda" else None, time.perf_counter())[1], []
    while not ts or (len(ts) < repeats and sum(ts) < budget_s):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return ts


def kernel_setup(b: int, L: int, mc: ModelConfig, device, dtype) -> tuple:
    """(name -> (fn(inputs) -> y, the inputs it reads and differentiates), inputs), the mixer's GQA layout: x, B
    (b, L, Hkv, P), C (b, L, H, N = P), dt (b, L, H), A (H,); SDPA's q (b, H, L, P), k, v (b, Hkv, L, P); on CUDA
    ssd_triton and, if installed, fla's chunk_simple_gla (q = C, k = B, v = dt x to H heads, g = dt A, scale 1)."""
    H, G, P = mc.n_heads, mc.n_kv_heads, mc.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)
    t = {"x": r(b, L, G, P).to(dtype), "dt": F.softplus(r(b, L, H) - 3), "A": -1 - 15 * r(H).sigmoid(),
         "B": (r(b, L, G, P) / P ** 0.5).to(dtype), "C": (r(b, L, H, P) / P ** 0.5).to(dtype),
         "q": r(b, H, L, P).to(dtype), "k": r(b, G, L, P).to(dtype), "v": r(b, G, L, P).to(dtype)}
    ssd = lambda f: (lambda t: f(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=mc.ssd_chunk_size)[0],
                     ("x", "dt", "B", "C"))
    ks = {"ssd_naive": ssd(ssd_naive), "ssd_chunked": ssd(ssd_chunked)}
    if device.type == "cuda" and ssd_triton is not None:
        ks["ssd_triton"] = ssd(ssd_triton)
    try:
        if device.type == "cuda":
            from fla.ops.simple_gla import chunk_simple_gla as gla
            kw = {"head_first": False} if "head_first" in inspect.signature(gla).parameters else {}
            ks["fla_simple_gla"] = (lambda t: gla(t["C"], t["fk"], t["fv"], t["fg"], scale=1.0, **kw)[0],
                                    ("C", "fk", "fv", "fg"))
            t.update(fk=t["B"].repeat_interleave(H // G, 2), fg=t["dt"] * t["A"],
                     fv=(t["dt"][..., None] * t["x"].repeat_interleave(H // G, 2)).to(dtype))
    except Exception:                                   # optional (not installed, no GPU Triton)
        pass
    ks["sdpa_causal"] = (lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True,
                                                                  enable_gqa=True), ("q", "k", "v"))
    return ks, t


def kernel_section(c: BenchConfig, deadline: float, save) -> dict:
    """Every kernel x mode x batch x length: median ms of the forward, or of forward + backward of sum(y); a call
    predicted (from the last length: linear, SDPA quadratic) to pass the deadline is skipped. bytes: the inputs
    read + the output written (fwd), 3 x inputs + 2 x output (fwd+bwd); floor: those bytes at the copy bandwidth."""
    device, mc, rows, last = torch.device(c.device), model_config(c, "linear"), [], {}
    modes = ["fwd", "fwd+bwd"][:1 + c.backward]
    src, dst = (torch.full((1 << (28 if device.type == "cuda" else 26),), v, device=device) for v in (1.0, 0.0))
    bw = 8 * src.numel() / statistics.median(timeit(lambda: dst.copy_(src), device, 5, 1e9))
    del src, dst
    for b, L in ((b, L) for b in c.batch for L in c.lengths):
        ks, t = kernel_setup(b, L, mc, device, DTYPES[c.dtype])
        for (name, (fn, reads)), mode in ((k, m) for k in ks.items() for m in modes):
            if name == "ssd_naive" and L > 1024:                         # a token loop
                continue
            key, row = (name, mode, b), {"kernel": name, "mode": mode, "b": b, "L": L}
            L0, s0 = last.get(key, (L, 0.0))
            one = (s0 or 0.0) * (L / L0) ** (2 if name == "sdpa_causal" else 1)
            if s0 is None or time.time() + one * (c.repeats + 1) > deadline:
                row.update(status="skipped", error="not run at a smaller L" if s0 is None else f"predicted {one:.1f} s")
            else:
                leaf = {k: v.detach().requires_grad_(mode != "fwd" and k in reads) for k, v in t.items()}
                call = lambda: (y := fn(leaf)).backward(torch.ones_like(y)) if mode != "fwd" else fn(leaf)
                rd, wr = sum(t[k].numel() * t[k].element_size() for k in reads), t["C"].numel() * t["x"].element_size()
                nbytes = rd + wr if mode == "fwd" else 3 * rd + 2 * wr
                try:
                    with torch.set_grad_enabled(mode != "fwd"):
                        call() if device.type == "cuda" or key not in last else None          # warm-up
                        ms = statistics.median(1e3 * s for s in timeit(call, device, c.repeats, c.point_budget_s))
                    row.update(status="ok", ms=ms, bytes=nbytes, gb_s=nbytes / ms / 1e6, floor_ms=1e3 * nbytes / bw)
                except Exception as e:                  # recorded; the section goes on
                    row.update(failure(e))
            last[key] = (L, row["ms"] / 1e3 if row["status"] == "ok" else None)
            rows.append(row)
            save(rows)
        t = leaf = None                                 # free the inputs (and grads) before the next size
        gc.collect()
    return {"shape": {"H": mc.n_heads, "Hkv": mc.n_kv_heads, "P": mc.head_dim, "N": mc.head_dim,
                      "Q": mc.ssd_chunk_size, "dtype": c.dtype}, "kernels": list(ks),
            "modes": modes, "copy_gb_s": bw / 1e9, "results": rows}


# ---- Ratios, checks (the project's speed and memory goals), tables, plots ---------------------------------
def compute_ratios(points: list, metric: str) -> list:
    """Linear and hybrid against the one-pass and the segment-wise teacher, at every length."""
    ok = {(p["layout"], p["L"]): p for p in points if p["kind"] == "length" and p["status"] == "ok"}
    return [{"L": L, "layout": lay, "vs": ref, "speedup": t["total_s"] / s["total_s"],
             "prefill_speedup": t["prefill_s"] / s["prefill_s"],
             "decode_speedup": t["decode_ms_per_token"] / s["decode_ms_per_token"],
             "memory_saving": 1 - s[metric] / t[metric] if t[metric] > 0 else None}
            for L in sorted({L for _, L in ok}) for lay in ("linear", "hybrid") for ref in ("teacher", "teacher-seg")
            if (s := ok.get((lay, L))) and (t := ok.get((ref, L)))]


def compute_checks(points: list, metric: str, decode: dict | None = None) -> dict:
    """The speed and memory goals, from this run's points: value, target, pass (None: not measured)."""
    ok = {(p["layout"], p["L"]): p for p in points if p["kind"] == "length" and p["status"] == "ok"}
    t2 = {p["layout"]: p["tokens_per_s"] for p in points if p["kind"] == "table2" and p["status"] == "ok"}
    val = lambda lay, L, key=metric: ok[(lay, L)][key] if (lay, L) in ok else math.nan
    div = lambda a, b: a / b if b else math.nan
    saving = lambda lay, ref: 1 - div(val(lay, 32768), val(ref, 32768))           # at 32K
    lin = sorted(L for lay, L in ok if lay == "linear")
    lo, hi = next((L for L in lin if L >= 4096), 0), max(lin, default=0)
    dec = (decode or {}).get("median_ms") or {L: val("linear", L, "decode_ms_per_token") for L in lin}
    ms = [dec[L] for L in sorted(dec)]                       # the interleaved measurement if there is one
    rel = list(((decode or {}).get("relative") or dec).values())                     # drift divided out
    rows = [("linear_memory_flat", div(val("linear", hi), val("linear", lo)) - 1 if hi > lo else math.nan,
             f"within +-10% (L={lo or '-'}..{hi or '-'})", lambda v: abs(v) <= 0.1),
            ("linear_saving_32k", saving("linear", "teacher"), ">= 90%", lambda v: v >= 0.9),
            ("linear_saving_seg_32k", saving("linear", "teacher-seg"), ">= 75%", lambda v: v >= 0.75),
            ("hybrid_saving_32k", saving("hybrid", "teacher"), ">= 60%", lambda v: v >= 0.6),
            ("linear_decode_ms", max(ms, default=math.nan), "<= 3 ms (the largest)", lambda v: v <= 3),
            ("linear_decode_flat", div(max(rel), min(rel)) - 1 if len(rel) > 1 else math.nan, f"max / min - 1 <= 20% "
             f"({'of time / round mean, ' * bool((decode or {}).get('relative'))}L={min(dec, default=0)}.."
             f"{max(dec, default=0)})", lambda v: v <= 0.2),
            ("table2_speedup", div(t2.get("linear", math.nan), t2.get("teacher", math.nan)), ">= 2x", lambda v: v >= 2)]
    return {k: {"value": v if math.isfinite(v) else None, "target": tg,
                "pass": bool(f(v)) if math.isfinite(v) else None} for k, v, tg, f in rows}


def vs_teachers(ratios: list, layout: str, L: int, key: str, fmt: str) -> str:
    """'a | b': the ratio `key` of `layout` at L against the one-pass | segment-wise teacher ('-': none)."""
    v = {r["vs"]: r[key] for r in ratios if (r["layout"], r["L"]) == (layout, L)}
    return " | ".join("-" if v.get(ref) is None else fmt.format(v[ref]) for ref in ("teacher", "teacher-seg"))


def ratio_text(ratios: list, key: str) -> str:
    """'speed-up at L=32768 vs the one-pass | segment-wise teacher: linear 8.3x | 7.9x, hybrid ...'."""
    if not ratios:
        return ""
    L, fmt = max(r["L"] for r in ratios), "{:.1f}x" if key == "speedup" else "{:.0%}"
    return (f"{'speed-up' if key == 'speedup' else 'memory saving'} at L={L} vs the one-pass | segment-wise "
            "teacher: " + ", ".join(f"{lay} {vs_teachers(ratios, lay, L, key, fmt)}" for lay in ("linear", "hybrid")))


def table(cols: list, rows: list) -> list:
    """Columns (header, format spec: numbers formatted by it; right-aligned if given); a short row ends in free text."""
    cells = [[h for h, _ in cols]] + [[v if isinstance(v, str) else format(v, s) for v, (_, s) in zip(r, cols)]
                                      for r in rows]
    w = [max(len(r[i]) for r in cells if len(r) == len(cols)) for i in range(len(cols))]
    return ["  ".join(f"{x:{'>' if s else '<'}{n}}" for x, (_, s), n in zip(r, cols, w)).rstrip() for r in cells]


def table_lines(res: dict) -> list:
    """table.txt: Table 2; time, memory and ratios by length (Fig. 1 c-d); the goals; the kernels."""
    c, model, kern, lines = res["config"], res.get("model") or {}, res.get("kernel") or {}, []
    pts, metric, ratios = model.get("points", []), model.get("memory_metric"), model.get("ratios", [])
    failed = lambda p: f"{p['status']}: {p.get('error', '')[:80]}"
    t2 = {p["layout"]: p for p in pts if p["kind"] == "table2"}
    if t2:
        p0, tt = next((p for p in t2.values() if p["status"] == "ok"), {}), t2.get("teacher", {}).get("tokens_per_s")
        lines += ["", f"Table 2 setting: {p0.get('prompt_tokens')} prompt tokens ({p0.get('image_tokens')} image "
                  f"tokens), {c['new_tokens']} generated", *table(
                      [("model", ""), ("prefill s", ".3f"), ("decode s", ".3f"), ("tok/s", ".1f"),
                       ("vs teacher", ">"), ("paper tok/s", "g")],
                      [[lay, failed(p)] if p["status"] != "ok" else [
                          lay, p["prefill_s"], p["decode_s"], p["tokens_per_s"],
                          f"{p['tokens_per_s'] / (tt or math.nan):.2f}x", PAPER["table2_tokens_per_s"][lay]]
                       for lay, p in t2.items()])]
    lens = sorted((p for p in pts if p["kind"] == "length"), key=lambda p: (p["L"], LAYOUTS.index(p["layout"])))
    if lens:
        f = PAPER["fig1_vs_teacher"]
        lines += ["", f"Prefill L + {c['new_tokens']} generated tokens; memory = {MEMORY[metric]}; speed-up and "
                  "memory saved vs the one-pass | segment-wise teacher", *table(
                      [("L", "d"), ("model", ""), ("prefill s", ".3f"), ("ms/tok", ".2f"), ("total s", ".3f"),
                       ("mem MiB", ".1f"), ("cache MiB", ".2f"), ("speed-up", ">"), ("mem saved", ">")],
                      [[p["L"], p["layout"], failed(p)] if p["status"] != "ok" else [
                          p["L"], p["layout"], p["prefill_s"], p["decode_ms_per_token"], p["total_s"], p[metric],
                          p["cache_mib"], vs_teachers(ratios, p["layout"], p["L"], "speedup", "{:.2f}x"),
                          vs_teachers(ratios, p["layout"], p["L"], "memory_saving", "{:.0%}")] for p in lens]),
                  f"paper (HoVLE-2.6B, 103K tokens, RTX 4090, vs its teacher): linear {f['linear']['speedup']}x, "
                  f"{f['linear']['memory_saving']:.1%} less memory; hybrid {f['hybrid']['speedup']}x, "
                  f"{f['hybrid']['memory_saving']:.1%}"]
    if (d := model.get("decode") or {}).get("relative") or d.get("error"):
        lines += ["linear decode in one process, lengths interleaved (ms/token, median of rounds; x its rounds' "
                  "mean): " + (", ".join(f"L={L} {d['median_ms'][L]:.2f} (x{d['relative'][L]:.3f})" for L in d["ms"])
                               if d.get("relative") else f"{d['status']}: {d['error'][:200]}")]
    if model.get("checks"):
        lines += ["", *table([("goal", ""), ("value", ".3g"), ("pass", ""), ("target", "")], [
            [k, "-" if v["value"] is None else v["value"], {True: "PASS", False: "FAIL"}.get(v["pass"], "n/a"),
             v["target"]] for k, v in model["checks"].items()])]
    if kern.get("results"):
        s = kern["shape"]
        lines += ["", f"Kernels, H={s['H']} Hkv={s['Hkv']} P=N={s['P']} Q={s['Q']} {s['dtype']}; floor = the bytes "
                  f"at the measured copy bandwidth, {kern['copy_gb_s']:.1f} GB/s", *table(
                      [("kernel", ""), ("mode", ""), ("b", "d"), ("L", "d"), ("ms", ".3g"), ("GB/s", ".3g"),
                       ("floor ms", ".2g")], [[r["kernel"], r["mode"], r["b"], r["L"], *(
                          [r["ms"], r["gb_s"], r["floor_ms"]] if r["status"] == "ok" else [failed(r)])]
                                             for r in kern["results"]])]
    return lines


def _axes(ax, xs, ylabel: str, title: str) -> None:
    """Log-2 x with a tick per length; log y with plain-number ticks (1-2-3-5 per decade, finer when too few)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
    ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel=ylabel, title=title)
    ax.set_xticks(xs, [f"{x // 1024}K" if x % 1024 == 0 else f"{x / 1000:.0f}K" if x >= 1e4 else str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    lo, hi = ax.get_ylim()
    for ms in ((1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in ms]
        if len(ticks := [t for t in ticks if lo <= t <= hi]) >= 3:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def make_plots(res: dict, out: str) -> list:
    """model_time.png, model_memory.png (Fig. 1 c-d), kernel.png: panels (ylabel, title, lines), each line (label,
    style, color, [(L, y)]), on log-log axes; returns the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, model, kern, figs = res["config"], res.get("model") or {}, res.get("kernel") or {}, {}
    pts, krows = [p for p in model.get("points", []) if p["kind"] == "length"], kern.get("results", [])
    xy = lambda rows, key, **m: [(r["L"], r[key]) for r in rows if r["status"] == "ok" and r[key] > 0
                                 and all(r[k] == v for k, v in m.items())]
    fails = {p["layout"]: f" ({p['status']} from {p['L']})" for p in reversed(pts) if p["status"] != "ok"}
    curves = lambda key, style="o-", what="": [
        (f"{lay} ({'one pass' if lay == 'teacher' else 'segments of %d' % c['segment']})"
         + (what or fails.get(lay, "")), style, f"C{i}", xy(pts, key, layout=lay)) for i, lay in enumerate(LAYOUTS)]
    if any(p["status"] == "ok" for p in pts):
        n, metric = c["new_tokens"], model["memory_metric"]
        figs["model_time.png"] = (ratio_text(model["ratios"], "speedup"), [
            ("time (s)", f"prefill + {n} generated tokens (paper Fig. 1c)",
             curves("total_s") + curves("prefill_s", "s--", ": prefill only")),
            ("ms per generated token", "decode time per token", curves("decode_ms_per_token"))])
        figs["model_memory.png"] = (ratio_text(model["ratios"], "memory_saving"), [
            (MEMORY[metric] + " (MiB)", f"memory, prefill + {n} tokens (paper Fig. 1d)",
             curves(metric) + curves("cache_mib", ":", ": cache (KV / state)"))])
    if any(r["status"] == "ok" for r in krows):
        panels, ssd = [], f"C{kern['kernels'].index('ssd_chunked')}"          # a color per kernel, a style per batch
        for mode in kern["modes"]:
            lines = [(f"{k} b={b}", ("o-", "s--", "^-.")[i % 3], f"C{j}", xy(krows, "ms", kernel=k, b=b, mode=mode))
                     for i, b in enumerate(c["batch"]) for j, k in enumerate(kern["kernels"])]
            lines += [(f"memory floor of the SSD, b={b}", ":", ssd, xy(krows, "floor_ms", kernel="ssd_chunked", b=b,
                                                                        mode=mode)) for b in c["batch"]]
            panels.append(("ms", f"kernels, {mode}", lines))
        figs["kernel.png"] = ("SSD kernels vs causal SDPA", panels)
    for name, (title, panels) in figs.items():
        fig, axs = plt.subplots(1, len(panels), figsize=(1.5 + 5.5 * len(panels), 4.8), squeeze=False)
        for ax, (ylabel, sub, lines) in zip(axs[0], panels):
            for label, style, color, points in lines:
                ax.plot([x for x, _ in points], [y for _, y in points], style, color=color, label=label)
            if xs := sorted({x for *_, points in lines for x, _ in points}):
                _axes(ax, xs, ylabel, sub)
        fig.suptitle(f"{c['preset']} preset, {c['dtype']}, {res['machine']['where']}, commit {res['commit']}\n{title}",
                     fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
    return list(figs)


# ---- The run ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, "Speed and memory of the models and SSD kernels (mmMamba Fig. 1, Table 2).")
    if cfg.point:                                       # a child of run_point_subprocess
        res = run_point_safe(json.loads(cfg.point), memory=False)
        print(TAG + json.dumps(res), flush=True)
        return res
    c, threads = resolve(cfg), torch.get_num_threads()
    torch.set_num_threads(c.threads or threads)
    try:
        return run(c)
    finally:
        torch.set_num_threads(threads)                  # main() is also called from tests


def run(c: BenchConfig) -> dict:
    started, partial = time.time(), os.path.join(c.out, "bench.partial.json")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(c.device) if c.device.startswith("cuda") else None
    res = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(), "paper": PAPER,
           "config": dataclasses.asdict(c), "layouts": {lay: model_config(c, lay).layers for lay in LAYOUTS},
           "model_config": dataclasses.asdict(model_config(c, "teacher")),
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                       "cpu": cpu, "gpu": gpu, "cuda": torch.version.cuda, "load_avg": os.getloadavg()[0],
                       "where": gpu or f"{os.cpu_count()} CPUs ({cpu})"}}
    os.makedirs(c.out, exist_ok=True)
    print(f"bench: {c.preset} {c.device} {c.dtype}, {c.parts}, L {c.lengths}, {c.new_tokens} new tokens, budget "
          f"{c.budget_s or 'none'} s, commit {res['commit']}, load {res['machine']['load_avg']:.1f}", flush=True)
    save = lambda key: lambda rows: write_json(partial, {**res, "partial": True, key: rows})
    if "kernel" in c.parts:
        end = started + (min(c.kernel_budget_s, c.budget_s - REPORT_S) if c.budget_s else c.kernel_budget_s)
        res["kernel"] = kernel_section(c, end, save("kernel_rows"))
    if {"table2", "model"} & set(c.parts):
        metric = "peak_mib" if c.device.startswith("cuda") else "run_mib"
        points = model_section(c, started, save("model_points"))
        decode = decode_section(c, points, started + c.budget_s - REPORT_S if c.budget_s else math.inf) \
            if "decode" in c.parts else None
        res["model"] = {"memory_metric": metric, "points": points, "ratios": compute_ratios(points, metric),
                        "decode": decode, "checks": compute_checks(points, metric, decode)}
    model, kern = res.get("model") or {}, res.get("kernel", {}).get("results", [])
    ch = [v["pass"] for v in model.get("checks", {}).values()]
    res["summary"] = "; ".join(s for s in [
        ratio_text(model.get("ratios", []), "speedup"), ratio_text(model.get("ratios", []), "memory_saving"),
        ch and f"checks: {ch.count(True)} pass, {ch.count(False)} fail, {ch.count(None)} not measured",
        kern and f"{sum(r['status'] == 'ok' for r in kern)}/{len(kern)} kernel timings ok"] if s) or "nothing measured"
    res["elapsed_s"], res["plots"] = time.time() - started, make_plots(res, c.out)
    write_json(partial, res)
    os.replace(partial, os.path.join(c.out, "bench.json"))                       # and no partial file is left
    lines = table_lines(res) + ["", f"{res['machine']['where']}, torch {torch.__version__}, {torch.get_num_threads()} "
                                f"threads, {res['elapsed_s']:.0f} s; wrote {c.out}: bench.json, table.txt, "
                                + ", ".join(res["plots"]), res["summary"]]
    with open(os.path.join(c.out, "table.txt"), "w") as f:
        f.write("\n".join(lines).lstrip("\n") + "\n")
    print("\n".join(lines), flush=True)
    return res


if __name__ == "__main__":
    run_main(main)

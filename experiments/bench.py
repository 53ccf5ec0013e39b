"""Speed and memory of the teacher, mmMamba-linear and mmMamba-hybrid (arXiv 2502.13145).

The paper: at 103K tokens mmMamba-linear is 20.6x faster than its teacher HoVLE with 75.8% less GPU
memory, mmMamba-hybrid (8 of 32 attention layers) 13.5x and 60.2% (Fig. 1); in Table 2 both decode
4x the teacher's tokens/s (PAPER). Sections (--parts):
  costs   those numbers on paper at HoVLE's shape: FLOPs, bytes, roofline times (costs.py)
  kernel  the SSD operator (ssd.py, ssd_triton.py) against causal SDPA: ms, a traffic floor
  table2  Table 2's prompt (16 text, 768 image, 16 text tokens) and 256 generated tokens
  model   L random tokens and 256 generated, against L (Fig. 1 c-d); each point is timed in a
          fresh process, its peak memory measured in another (CUDA allocated; CPU RSS)
  decode  the linear model's decode at every L in one process: is a token's cost flat in L?
Layouts (--layouts): teacher (prefill in one pass), teacher-seg (in --segment tokens),
teacher-nocache (no KV cache: every new token re-runs the whole sequence, as the official repo's
HoVLE generation code does: `past_key_values = None`, hovle/modeling_internvl_chat.py line 422 at
https://github.com/hustvl/mmMamba/tree/85143d03b62a8f8279ef8d019dc01a94674256fb), linear, hybrid
(n_layers // 4 attention layers); model, model-nocache: --model FOLDER (convert.load_model).

It measures the library (model.py, ssd.py, ssd_triton.py) and is not part of it, like ablate.py.

Run (from the repository root):
      python experiments/bench.py                 # tiny model, CPU, L 1K..128K: under 10 minutes
      python experiments/bench.py --smoke         # tiny sizes, in this process: seconds (the test)
      python experiments/bench.py --parts costs   # the analytic table only
      python experiments/bench.py --long          # every layout once at 103,000 tokens (~35 min)
      python experiments/bench.py --model FOLDER --parts model --lengths 1024 4096
      python experiments/bench.py --preset hovle --parts model --lengths 32768 103000   # GPU, bf16
Writes bench.json, table.txt, model_time.png, model_memory.png to --out (bench_results/...).
Tests: python -m pytest -q tests/test_bench.py
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
from convert import hovle_config, load_model  # noqa: E402
from experiments.costs import PAPER, cost_lines, costs_section, text_table  # noqa: E402
from model import Model, ModelConfig, make_layers  # noqa: E402
from ssd import ssd_chunked  # noqa: E402
from utils import arg, git_commit, parse_config, run_main, write_json  # noqa: E402

try:
    from ssd_triton import ssd_triton  # noqa: E402
except ImportError:                                     # pragma: no cover
    ssd_triton = None

PARTS = ("costs", "kernel", "table2", "model", "decode")
LAYOUTS = {                     # name: (model, prefill in --segment tokens, decode with a cache)
    "teacher": ("teacher", False, True),
    "teacher-seg": ("teacher", True, True),
    "teacher-nocache": ("teacher", False, False),
    "linear": ("linear", True, True),
    "hybrid": ("hybrid", True, True),
    "model": ("model", True, True),
    "model-nocache": ("model", False, False),
}
TEACHERS = ("teacher", "teacher-seg", "teacher-nocache")
STUDENTS = ("linear", "hybrid")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRESETS = {"tiny": ("cpu", "float32", [1024, 4096, 8192, 32768, 131072]),
           "hovle": ("cuda", "bfloat16", [4096, 16384, 32768, 65536, 103000, 131072])}
MEMORY = {"run_mib": "peak RSS above the post-build baseline", "peak_mib": "peak GPU memory"}
TAG = "BENCH_POINT_JSON "                               # the line of a child process's result
MiB = 2.0 ** 20
REPORT_S = 15.0                                         # of the budget, kept for the report


@dataclasses.dataclass
class BenchConfig:
    preset: str = arg("tiny", "tiny: this project's model, CPU, float32; hovle: HoVLE's, CUDA, bf16")
    device: str = arg("", "device (default: the preset's)")
    dtype: str = arg("", "float32, bfloat16 or float16 (default: the preset's)")
    parts: list[str] = arg(list(PARTS), "sections to run (decode: after model)")
    layouts: list[str] = arg([], "of table2 and model (default: teacher teacher-seg linear hybrid)")
    model: str = arg("", "a model folder (convert.load_model) for the layouts model*")
    lengths: list[int] = arg([], "sequence lengths (default: the preset's, to 128K)")
    new_tokens: int = arg(256, "tokens generated per point (the paper: 256)")
    segment: int = arg(2048, "prefill segment of teacher-seg, linear, hybrid and model")
    compile: bool = arg(True, "decode steps through torch.compile in table2 and decode")
    repeats: int = arg(3, "timed runs per point or kernel (median), fewer past --point-budget-s")
    point_budget_s: float = arg(5.0, "stop repeating a point or kernel timing after this long")
    budget_s: float = arg(585.0, "whole run: skip a point predicted to end later (0: no budget)")
    kernel_budget_s: float = arg(45.0, "the kernel section's share of the run")
    timeout_s: float = arg(900.0, "a model point's process is stopped after this long")
    table2_image_tokens: int = arg(768, "image tokens of the Table 2 prompt (whole images)")
    batch: list[int] = arg([1], "kernel section batch sizes")
    seed: int = arg(0, "seed of weights and inputs")
    long: bool = arg(False, "the paper's point: every layout once at 103,000 tokens, no budget")
    smoke: bool = arg(False, "tiny sizes, points in this process: checks the machinery only")
    out: str = arg("", "output folder (default bench_results/<preset>_<device>[_long|_smoke])")
    point: str = arg("", "internal: run one model point (JSON)")


def resolve(c: BenchConfig) -> BenchConfig:
    """A checked copy: --long / --smoke set the fields left at their defaults; the preset fills
    device, dtype and lengths."""
    c = dataclasses.replace(c)
    over = {}
    if c.long:
        over = dict(lengths=[103000], parts=["model"], budget_s=0.0, timeout_s=5400.0, repeats=1)
    if c.smoke:
        over.update(lengths=[64, 128], new_tokens=8, segment=48, repeats=1, budget_s=0.0,
                    table2_image_tokens=64, compile=False)
        if not c.model:
            over["layouts"] = list(LAYOUTS)[:5]          # every layout with random weights
    for name, value in over.items():
        if getattr(c, name) == getattr(BenchConfig(), name):
            setattr(c, name, value)
    if c.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {c.preset!r}")
    device, dtype, lengths = PRESETS[c.preset]
    c.device = c.device or device
    c.dtype = c.dtype or dtype
    c.lengths = sorted(set(c.lengths or lengths))
    if not c.layouts:
        c.layouts = ["model"] if c.model else ["teacher", "teacher-seg", "linear", "hybrid"]
    name = os.path.basename(os.path.normpath(c.model)) if c.model else c.preset
    tail = "_long" * c.long + "_smoke" * c.smoke           # --smoke never overwrites results
    c.out = c.out or os.path.join("bench_results", f"{name}_{c.device.split(':')[0]}{tail}")
    problems = [
        (c.dtype not in DTYPES, f"--dtype must be one of {list(DTYPES)}"),
        (not set(c.parts) <= set(PARTS), f"--parts takes {', '.join(PARTS)}"),
        (not set(c.layouts) <= set(LAYOUTS), f"--layouts takes {', '.join(LAYOUTS)}"),
        (any(x.startswith("model") for x in c.layouts) and not c.model, "layout model needs --model"),
        (c.device.startswith("cuda") and not torch.cuda.is_available(), "no CUDA (--device cpu?)"),
        (min(c.lengths) < 2 or c.new_tokens < 2, "need lengths >= 2 and --new-tokens >= 2"),
        (c.repeats < 1 or c.segment < 1, "need --repeats >= 1 and --segment >= 1")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    return c


# ---- One model point: prefill and greedy decoding, timed, or its peak memory -----------------------

def model_config(c: BenchConfig, which: str) -> ModelConfig:
    base = hovle_config() if c.preset == "hovle" else ModelConfig()
    n_attn = {"teacher": base.n_layers, "linear": 0, "hybrid": base.n_layers // 4}[which]
    return base.replace(layers=make_layers(base.n_layers, n_attn))


def build_model(c: BenchConfig, layout: str) -> Model:
    """--model's folder, or random weights from --seed, built on the device itself."""
    which = LAYOUTS[layout][0]
    if which == "model":
        return load_model(c.model, dtype=DTYPES[c.dtype], device=c.device).eval()
    torch.manual_seed(c.seed)
    with torch.device(c.device):
        return Model(model_config(c, which)).to(DTYPES[c.dtype]).eval()


def prompt(c: BenchConfig, cfg: ModelConfig, L: int | None, g: torch.Generator) -> tuple:
    """(input_ids (1, T), pixel_values or None): L random tokens (any but <IMG_CONTEXT>), or for L
    None Table 2's: 16 text tokens, whole images of --table2-image-tokens, 16 text tokens."""
    def text(k):
        ids = torch.randint(0, cfg.vocab_size - 1, (1, k), generator=g)
        return ids + (ids >= cfg.img_context_id).long()
    if L is not None:
        return text(L).to(c.device), None
    n_img = max(1, math.ceil(c.table2_image_tokens / cfg.image_tokens))
    images = torch.full((1, n_img * cfg.image_tokens), cfg.img_context_id)
    pixels = torch.randn(n_img, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.cat([text(16), images, text(16)], dim=1)
    return ids.to(c.device), pixels.to(c.device, DTYPES[c.dtype])


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def greedy(model: Model, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    logits[:, model.cfg.img_context_id] = float("-inf")        # never the image placeholder
    return logits.argmax(-1)


@torch.no_grad()
def timed_generate(model: Model, ids, pixels, n: int, segment: int | None, cached: bool, step=None):
    """Greedy decoding of n tokens after the prompt (b, T): tokens (b, n), prefill_s (the prompt
    and the first token), decode_s (the other n - 1), cache_bytes. With a cache: Model.prefill,
    then one `step` per token (the model, or its torch.compile); without (the no-cache teacher)
    every token is a forward over the prompt and the tokens so far."""
    step = step or model
    t0 = clock(ids.device)
    cache = model.new_cache(capacity=ids.shape[1] + n)
    if cached:
        logits = model.prefill(ids, pixels, cache, segment)
    else:
        logits = model(ids, pixels, last_only=True)[:, -1]
    tokens = [greedy(model, logits)]
    t1 = clock(ids.device)
    for _ in range(n - 1):
        if cached:
            logits = step(tokens[-1][:, None], cache=cache)[:, -1]
        else:
            sequence = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
            logits = model(sequence, pixels, last_only=True)[:, -1]
        tokens.append(greedy(model, logits))
    t2 = clock(ids.device)
    return {"tokens": torch.stack(tokens, dim=1), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "cache_bytes": cache.nbytes()}


def memory_run(run, device: torch.device) -> tuple:
    """(baseline bytes, peak bytes, run()'s result): CUDA allocated memory; on the CPU the RSS,
    its peak (VmHWM) reset through /proc/self/clear_refs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return base, torch.cuda.max_memory_allocated(device), run()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def status(key):
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith(key))
    base = status("VmRSS:")
    result = run()
    return base, status("VmHWM:"), result


def run_point(spec: dict) -> dict:
    """Build the layout's model, warm up, time `repeats` runs (fewer past --point-budget-s); or,
    spec "memory", measure the memory of one run."""
    c = BenchConfig(**spec["config"])
    model = build_model(c, spec["layout"])
    ids, pixels = prompt(c, model.cfg, spec["L"], torch.Generator().manual_seed(c.seed))
    segmented, cached = LAYOUTS[spec["layout"]][1:]
    segment = c.segment if segmented else None
    step = model
    if c.compile and cached and spec["L"] is None and not spec.get("memory"):
        step = torch.compile(model.forward, dynamic=True)
    T = ids.shape[1]
    W = T if pixels is not None else min(T, 512)     # the warm-up prompt; or two segments, the
    if pixels is None and segment and T > segment:    # second as long as the prompt's last one
        W = segment + (T % segment or segment)        # (Triton specialises on lengths)
    timed_generate(model, ids[:, :W], pixels, min(c.new_tokens, 4), segment, cached, step)

    def run():
        return timed_generate(model, ids, pixels, c.new_tokens, segment, cached, step)
    if spec.get("memory"):
        base, peak, r = memory_run(run, torch.device(c.device))
        return {"peak_mib": peak / MiB, "baseline_mib": base / MiB, "run_mib": (peak - base) / MiB,
                "cache_mib": r["cache_bytes"] / MiB}
    runs = [run()]
    while len(runs) < c.repeats and sum(r["prefill_s"] + r["decode_s"] for r in runs) < c.point_budget_s:
        runs.append(run())
    prefill = statistics.median(r["prefill_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    return {"prompt_tokens": T, "image_tokens": int((ids == model.cfg.img_context_id).sum()),
            "segment": segment, "cached": cached, "repeats": len(runs), "prefill_s": prefill,
            "decode_s": decode, "total_s": prefill + decode,
            "prefill_all_s": [r["prefill_s"] for r in runs], "decode_all_s": [r["decode_s"] for r in runs],
            "decode_ms_per_token": 1e3 * decode / (c.new_tokens - 1),
            "tokens_per_s": c.new_tokens / (prefill + decode), "cache_mib": runs[0]["cache_bytes"] / MiB,
            "layers": model.cfg.layers, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def failure(e: BaseException) -> dict:
    oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
    return {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}


def run_point_safe(spec: dict, memory: bool = True) -> dict:
    """The point's times and (memory) its memory, measured in this process; or its failure."""
    try:
        result = {"status": "ok", **run_point(spec)}
        if memory:
            result.update(run_point({**spec, "memory": True}))
        return result
    except Exception as e:                              # recorded; the run goes on
        return failure(e)


def run_point_subprocess(spec: dict, timeout_s: float) -> dict:
    """Times in a fresh interpreter, then memory in another with glibc mapping every block of
    64 KiB or more, so that RSS follows the live tensors (glibc's own threshold grows to
    18-48 MiB; mapping slows prefill up to 2.5x, so that run is not timed)."""
    deadline = time.time() + timeout_s
    result = {}
    mapped = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    for extra, env in (({}, {}), ({"memory": True}, mapped)):
        cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps({**spec, **extra})]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                               timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
        lines = [line for line in r.stdout.splitlines() if line.startswith(TAG)]
        if not lines:
            hint = " (SIGKILL: out of memory?)" * (r.returncode == -9)
            output = (r.stderr or r.stdout).strip()[-300:]
            return {"status": "failed", "error": f"exit {r.returncode}{hint}; {output}"}
        result.update(json.loads(lines[-1][len(TAG):]))
        if result["status"] != "ok":
            break
    return result


# ---- The model section: Table 2, then every length, within the budget -----------------------------

def predict_s(c: BenchConfig, done: list, layout: str, L: int | None) -> float:
    """Wall time of a point at L from the layout's last one at L0: its overhead (processes,
    build, warm-up), then the timed runs and the memory run (~2.5 timed runs with Mamba-2 layers,
    1.5 without), a run's prefill scaled by (L / L0)^k (k = 2 with attention, 1 without) and its
    decode by (L / L0)^(k - 1) (^k without a cache: every token is a whole forward)."""
    if not done or L is None:
        return 0.0
    last = done[-1]
    which, _, cached = LAYOUTS[layout]
    k = 1 if which == "linear" else 2

    def one_run(length):
        scale = length / last["L"]
        return last["prefill_s"] * scale ** k + last["decode_s"] * scale ** (k - cached)
    memory_runs = 1.5 if which == "teacher" else 2.5
    overhead = max(0.0, last["wall_s"] - one_run(last["L"]) * (last["repeats"] + memory_runs))
    repeats = min(c.repeats, 1 + c.point_budget_s // one_run(L))
    return overhead + one_run(L) * (repeats + memory_runs)


def decode_reserve_s(c: BenchConfig, points: list) -> float:
    """The decode section's time: its prefills, 16 x 32 tokens per length, compiling."""
    layout = "model" if c.model else "linear"
    totals = [p["total_s"] for p in ok_points(points).values() if p["layout"] == layout]
    return sum(totals) + 10 + 30 * c.compile


def model_section(c: BenchConfig, started: float, save) -> list:
    """Table 2's points, linear at every length, then the others length by length (the budget
    cuts the end). A layout's failure skips its longer lengths."""
    specs = []
    if "table2" in c.parts:
        specs += [("table2", x, None) for x in c.layouts if x != "teacher-seg"]
    if "model" in c.parts:
        specs += [("length", "linear", L) for L in c.lengths if "linear" in c.layouts]
        specs += [("length", x, L) for L in c.lengths for x in c.layouts if x != "linear"]
    points = []
    for kind, layout, L in specs:
        done = [p for p in points if p["kind"] == kind and p["layout"] == layout]
        left = math.inf
        if c.budget_s:
            reserve = decode_reserve_s(c, points) * ("decode" in c.parts)
            left = c.budget_s - (time.time() - started) - REPORT_S - reserve
        spec = {"config": dataclasses.asdict(c), "kind": kind, "layout": layout, "L": L}
        t0 = time.time()
        if done and done[-1]["status"] != "ok":
            r = {"status": "skipped", "error": f"{done[-1]['status']} at L={done[-1]['L']}"}
        elif predict_s(c, done, layout, L) > left:
            r = {"status": "skipped", "error": f"budget: predicted {predict_s(c, done, layout, L):.0f} s"}
        elif c.smoke:
            r = run_point_safe(spec)
        else:
            r = run_point_subprocess(spec, min(c.timeout_s, left))
        points.append({"kind": kind, "layout": layout, "L": L, **r, "wall_s": time.time() - t0})
        said = r.get("error", "")[:90]
        if r["status"] == "ok":
            said = f"{r['total_s']:.2f} s, {r['run_mib']:.1f} MiB above the baseline"
        print(f"  {kind} {layout} L={L or r.get('prompt_tokens')}: {r['status']}, {said}", flush=True)
        save(points)
    return points


@torch.no_grad()
def decode_section(c: BenchConfig, points: list, deadline: float, rounds: int = 16, k: int = 32):
    """Is a token's cost flat in L? The linear model (or --model) at the model section's lengths
    in one process: each prompt prefilled into its own cache, then rounds of k tokens at each length
    in turn (the VM's drift, up to 2x in minutes, hits all alike). ms/token: the median over rounds;
    flatness: a length's time over its round's mean, median over rounds (the drift divides out)."""
    layout = "model" if c.model else "linear"
    lengths = sorted(L for x, L in ok_points(points) if x == layout)
    if not lengths or time.time() + decode_reserve_s(c, points) > deadline:
        return None
    device = torch.device(c.device)
    ms = {L: [] for L in lengths}
    try:
        model = build_model(c, layout)
        step = model
        if c.compile:
            step = torch.compile(model.forward, dynamic=True)
        g = torch.Generator().manual_seed(c.seed)
        caches = {L: model.new_cache(capacity=L + 1 + rounds * k) for L in [8, *lengths]}  # 8: warm-up
        tokens = {}
        for L, cache in caches.items():
            tokens[L] = greedy(model, model.prefill(prompt(c, model.cfg, L, g)[0], None, cache, c.segment))
        for r, L in itertools.product(range(rounds), caches):
            if r and L == 8 and time.time() > deadline:                    # whole rounds only
                break
            t0 = clock(device)
            for _ in range(k):
                tokens[L] = greedy(model, step(tokens[L][:, None], cache=caches[L])[:, -1])
            if L != 8:
                ms[L].append(1e3 * (clock(device) - t0) / k)
    except Exception as e:                              # recorded; the report is still written
        return {"layout": layout, "ms": ms, "median_ms": {}, "relative": {}, **failure(e)}
    means = [statistics.mean(times) for times in zip(*ms.values())]
    median = {L: statistics.median(v) for L, v in ms.items()}
    relative = {L: statistics.median(t / m for t, m in zip(v, means)) for L, v in ms.items()}
    print(f"  decode, {layout}: " + ", ".join(f"L={L} {median[L]:.2f} ms" for L in lengths))
    return {"layout": layout, "ms": ms, "median_ms": median, "relative": relative}


# ---- The kernel section (in this process) ----------------------------------------------------------

def timeit(fn, device: torch.device, repeats: int, budget_s: float) -> list:
    """Wall times of fn(): at least one, at most `repeats`, fewer past budget_s."""
    times = []
    while not times or (len(times) < repeats and sum(times) < budget_s):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return times


def kernel_inputs(b: int, L: int, mc: ModelConfig, c: BenchConfig) -> dict:
    """The mixer's GQA layout: x, B (b, L, Hkv, P), C (b, L, H, N = P), dt (b, L, H), A (H,); and
    SDPA's q (b, H, L, P), k, v (b, Hkv, L, P); --dtype but dt and A (float32)."""
    H, G, P = mc.n_heads, mc.n_kv_heads, mc.head_dim
    shapes = {"x": (b, L, G, P), "B": (b, L, G, P), "C": (b, L, H, P), "q": (b, H, L, P),
              "k": (b, G, L, P), "v": (b, G, L, P), "dt": (b, L, H), "A": (H,)}
    g = torch.Generator(device=c.device).manual_seed(0)
    t = {k: torch.randn(*s, device=c.device, generator=g) for k, s in shapes.items()}
    t["dt"] = F.softplus(t["dt"] - 3)
    t["A"] = -1 - 15 * t["A"].sigmoid()
    t["B"] = t["B"] / P ** 0.5
    t["C"] = t["C"] / P ** 0.5
    for k in ("x", "B", "C", "q", "k", "v"):
        t[k] = t[k].to(DTYPES[c.dtype])
    return t


def kernel_bytes(t: dict, reads: tuple, mode: str, Q: int) -> int:
    """The traffic floor's bytes: the inputs read, y (b, L, H, P) written and, for the SSD, the
    float32 chunk states S (b, L / Q, H, P, N) written (step 2), read and rewritten (step 3), read
    (step 4): 4 S. fwd+bwd: 3x the inputs, 2x y, 14 S: the forward's 4 and the backward's 10, which
    recomputes the states (step 2 writes S: 1; step 3 reads and rewrites it: 2), writes the adjoint
    of step 4, dH (1), passes it back (reads and rewrites it: 2), and reads the entering states H_in
    and their gradients G in both backward kernels (4)."""
    read = sum(t[k].numel() * t[k].element_size() for k in reads)
    written = t["C"].numel() * t["x"].element_size()
    b, L, H, P = t["C"].shape
    S = 0
    if "x" in reads:
        S = b * math.ceil(L / Q) * H * P * P * 4
    if mode == "fwd":
        return read + written + 4 * S
    return 3 * read + 2 * written + 14 * S


def predicted_call_s(timed: dict, key: tuple, b: int, L: int) -> float:
    """Seconds of one call of `key` (kernel, mode) at (b, L), from its last timing (b0, L0, s0) in
    `timed`, whatever its batch: x b / b0, x (L / L0)^2 (attention), at least x L / L0 (the chunks,
    for a shorter L). 0 before the first timing."""
    b0, L0, s0 = timed.get(key, (b, L, 0.0))
    growth = max(L / L0, (L / L0) ** 2)
    return s0 * (b / b0) * growth


def kernel_section(c: BenchConfig, deadline: float, save) -> dict:
    """ssd_chunked (and ssd_triton on CUDA or in Triton's interpreter) against causal SDPA, for
    every batch, length and mode: the median ms of the forward or of forward and backward of
    sum(y); floor_ms: kernel_bytes at the copy bandwidth. A call that `predicted_call_s` says
    would pass the deadline is skipped; one that raised is not tried at larger sizes."""
    device = torch.device(c.device)
    mc = model_config(c, "linear")
    ssds = {"ssd_chunked": ssd_chunked}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"      # gpu_check.sh --dry-run
    if (device.type == "cuda" or interpreted) and ssd_triton is not None:
        ssds["ssd_triton"] = ssd_triton
    modes = ["fwd", "fwd+bwd"]
    src = torch.ones(1 << 26, device=device)
    dst = torch.zeros_like(src)
    bandwidth = 8 * src.numel() / statistics.median(timeit(lambda: dst.copy_(src), device, 5, 1e9))
    rows = []
    timed = {}                                          # (kernel, mode) -> (b, L, s of a call)
    failed = {}                                         # (kernel, mode) -> (b, L) where it raised
    for b, L in itertools.product(c.batch, c.lengths):
        t = kernel_inputs(b, L, mc, c)
        for name, mode in itertools.product([*ssds, "sdpa_causal"], modes):
            reads = ("q", "k", "v") if name == "sdpa_causal" else ("x", "dt", "B", "C")
            leaf = {k: v.detach().requires_grad_(mode != "fwd" and k in reads) for k, v in t.items()}

            def call():
                if name == "sdpa_causal":
                    y = F.scaled_dot_product_attention(leaf["q"], leaf["k"], leaf["v"], is_causal=True,
                                                       enable_gqa=True)
                else:
                    y = ssds[name](*(leaf[k] for k in ("x", "dt", "A", "B", "C")), chunk_size=mc.ssd_chunk_size)[0]
                if mode != "fwd":
                    y.backward(torch.ones_like(y))
            key = (name, mode)
            predicted_s = predicted_call_s(timed, key, b, L) * (c.repeats + 1)
            row = {"kernel": name, "mode": mode, "b": b, "L": L, "status": "skipped", "error": "budget"}
            fb, fL = failed.get(key, (math.inf, math.inf))
            if b >= fb and L >= fL:                     # not retried at a larger size
                row["error"] = f"failed at b={fb}, L={fL}"
            elif time.time() + predicted_s < deadline:
                try:
                    with torch.set_grad_enabled(mode != "fwd"):
                        warm_up = device.type == "cuda" or key not in timed
                        if warm_up and not (interpreted and name == "ssd_triton"):   # nothing to compile
                            call()
                        ms = 1e3 * statistics.median(timeit(call, device, c.repeats, c.point_budget_s))
                    nbytes = kernel_bytes(t, reads, mode, mc.ssd_chunk_size)
                    row = {**row, "status": "ok", "ms": ms, "bytes": nbytes, "gb_s": nbytes / ms / 1e6,
                           "floor_ms": 1e3 * nbytes / bandwidth}
                    del row["error"]
                    timed[key] = (b, L, ms / 1e3)
                except Exception as e:                  # recorded; the section goes on
                    row.update(failure(e))
                    failed[key] = (b, L)
            rows.append(row)
            save(rows)
        t = leaf = None                                 # free the inputs (and grads) first
        gc.collect()
    shape = {"H": mc.n_heads, "Hkv": mc.n_kv_heads, "P": mc.head_dim, "N": mc.head_dim,
             "Q": mc.ssd_chunk_size, "dtype": c.dtype}
    return {"shape": shape, "kernels": [*ssds, "sdpa_causal"], "modes": modes,
            "copy_gb_s": bandwidth / 1e9, "results": rows}


# ---- Ratios, the project's goals, the report -----------------------------------------------------

def ok_points(points: list) -> dict:
    return {(p["layout"], p["L"]): p for p in points if p["kind"] == "length" and p["status"] == "ok"}


def compute_ratios(points: list, metric: str) -> list:
    """Each student against each teacher layout measured at the same length."""
    ok = ok_points(points)
    ratios = []
    for L, student, ref in itertools.product(sorted({L for _, L in ok}), STUDENTS, TEACHERS):
        if (student, L) in ok and (ref, L) in ok:
            s = ok[(student, L)]
            t = ok[(ref, L)]
            ratios.append({"L": L, "layout": student, "vs": ref, "speedup": t["total_s"] / s["total_s"],
                           "prefill_speedup": t["prefill_s"] / s["prefill_s"],
                           "decode_speedup": t["decode_ms_per_token"] / s["decode_ms_per_token"],
                           "memory_saving": 1 - s[metric] / t[metric] if t[metric] > 0 else None})
    return ratios


def compute_checks(points: list, metric: str, decode: dict | None = None) -> dict:
    """The goals: the linear model's memory flat in L and far below the teachers' at 32K; a decode
    token's cost flat in L (the decode section's ratios, else the points' ms/token); Table 2's
    tokens/s against the cached teacher's. Value and pass None: not measured."""
    ok = ok_points(points)

    def value(layout, L, key=metric):
        return ok.get((layout, L), {}).get(key, math.nan)
    linear = sorted(L for layout, L in ok if layout == "linear")
    lo = next((L for L in linear if L >= 4096), 0)
    per_length = {L: value("linear", L, "decode_ms_per_token") for L in linear}
    how = "ms/token"
    if decode and decode.get("relative"):
        per_length = decode["relative"]
        how = "time / round mean"
    flat = math.nan
    if len(per_length) > 1:
        flat = max(per_length.values()) / min(per_length.values()) - 1
    t2 = {p["layout"]: p["tokens_per_s"] for p in points if p["kind"] == "table2" and p["status"] == "ok"}
    hi = max(linear, default=0)
    growth = value("linear", hi) / value("linear", lo) - 1 if hi > lo else math.nan
    goals = {   # name: (value, target, bound: |value| <= bound for *_flat, else value >= bound)
        "linear_memory_flat": (growth, f"+-10% (L={lo or '4096'}..{hi or '-'})", 0.1),
        "linear_saving_32k": (1 - value("linear", 32768) / value("teacher", 32768), ">= 90%", 0.9),
        "linear_saving_seg_32k": (1 - value("linear", 32768) / value("teacher-seg", 32768), ">= 75%", 0.75),
        "hybrid_saving_32k": (1 - value("hybrid", 32768) / value("teacher", 32768), ">= 60%", 0.6),
        "linear_decode_flat": (flat, f"max / min - 1 <= 20% ({how}, L={sorted(per_length)})", 0.2),
        "table2_speedup": (t2.get("linear", math.nan) / t2.get("teacher", math.nan), ">= 2x tok/s", 2.0)}
    checks = {}
    for name, (v, target, bound) in goals.items():
        passed = v >= bound
        if name.endswith("_flat"):
            passed = abs(v) <= bound
        checks[name] = {"value": v, "target": target, "pass": passed}
        if not math.isfinite(v):
            checks[name] = {"value": None, "target": target, "pass": None}
    return checks


def table_lines(res: dict) -> list:
    """table.txt: costs; the points (Table 2, then by length) with their ratios; decode; goals;
    kernels."""
    model = res.get("model") or {}
    metric = model.get("memory_metric")
    ratios = model.get("ratios", [])
    refs = [ref for ref in TEACHERS if any(r["vs"] == ref for r in ratios)]
    lines = []
    if res.get("costs"):
        lines += cost_lines(res["costs"])
    rows = []
    for p in sorted(model.get("points", []), key=lambda p: (p["L"] or 0, list(LAYOUTS).index(p["layout"]))):
        row = [str(p["L"] or f"table2 {p.get('prompt_tokens', '')}"), p["layout"]]
        if p["status"] != "ok":
            rows.append(row + [f"{p['status']}: {p.get('error', '')[:80]}"])
            continue
        vs = {r["vs"]: r for r in ratios if r["layout"] == p["layout"] and r["L"] == p["L"]}
        speedup = " | ".join(f"{vs[ref]['speedup']:.2f}x" for ref in refs if ref in vs)
        saved = " | ".join(f"{vs[ref]['memory_saving'] or 0:.0%}" for ref in refs if ref in vs)
        rows.append(row + [p["prefill_s"], p["decode_ms_per_token"], p["total_s"], p["tokens_per_s"],
                           p[metric], p["cache_mib"], speedup, saved])
    if rows:
        paper = ", ".join(f"{x} {v}" for x, v in PAPER["table2_tokens_per_s"].items())
        lines += ["", f"Prompt L tokens (table2: Table 2's prompt; the paper's tok/s there: {paper}) and "
                  f"{res['config']['new_tokens']} generated; memory: {MEMORY[metric]}; speed-up and "
                  f"memory saved vs {' | '.join(refs) or '-'}",
                  *text_table([("L", ""), ("model", ""), ("prefill s", ".3f"), ("ms/tok", ".2f"),
                               ("total s", ".3f"), ("tok/s", ".1f"), ("mem MiB", ".1f"),
                               ("cache MiB", ".2f"), ("speed-up", ">"), ("mem saved", ">")], rows)]
    decode = model.get("decode") or {}
    if decode.get("relative"):
        each = [f"L={L} {decode['median_ms'][L]:.2f} (x{decode['relative'][L]:.3f})" for L in decode["ms"]]
        lines.append(f"{decode['layout']} decode in one process, lengths interleaved (ms/token, median "
                     "of rounds; x its rounds' mean): " + ", ".join(each))
    elif decode.get("error"):
        lines.append(f"decode section: {decode['status']}: {decode['error'][:200]}")
    verdicts = {True: "PASS", False: "FAIL", None: "n/a"}
    goals = [[k, v["value"] or "-", verdicts[v["pass"]], v["target"]] for k, v in model.get("checks", {}).items()]
    if goals:
        lines += ["", *text_table([("goal", ""), ("value", ".3g"), ("pass", ""), ("target", "")], goals)]
    kernel = res.get("kernel") or {}
    rows = [[r["kernel"], r["mode"], r["b"], r["L"], r.get("ms", r["status"]), r.get("gb_s", ""),
             r.get("floor_ms", "")] for r in kernel.get("results", [])]
    if rows:
        s = kernel["shape"]
        lines += ["", f"Kernels, H={s['H']} Hkv={s['Hkv']} P=N={s['P']} Q={s['Q']} {s['dtype']}; floor: "
                  "inputs, output and float32 chunk states (kernel_bytes) at the copy bandwidth, "
                  f"{kernel['copy_gb_s']:.1f} GB/s",
                  *text_table([("kernel", ""), ("mode", ""), ("b", "d"), ("L", "d"), ("ms", ".3g"),
                               ("GB/s", ".3g"), ("floor ms", ".2g")], rows)]
    return lines


def make_plots(res: dict, out: str) -> list:
    """model_time.png and model_memory.png (Fig. 1 c-d): every layout's time (prefill + generated
    tokens) and memory against L, log-log; returns the names written."""
    model = res.get("model") or {}
    points = [p for p in model.get("points", []) if p["kind"] == "length" and p["status"] == "ok"]
    if not points:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    c = res["config"]
    metric = model["memory_metric"]
    xs = sorted({p["L"] for p in points})
    figures = {"model_time.png": ("total_s", f"s, prefill + {c['new_tokens']} generated tokens"),
               "model_memory.png": (metric, f"MiB, {MEMORY[metric]}")}
    for name, (key, ylabel) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for layout in LAYOUTS:
            xy = [(p["L"], p[key]) for p in points if p["layout"] == layout and p[key] > 0]
            if xy:
                ax.plot(*zip(*xy), "o-", label=layout)
        ax.set(xscale="log", yscale="log", xlabel="prompt length L (tokens)", ylabel=ylabel,
               title=f"{c['preset']}, {c['dtype']}, {res['machine']['where']}, {res['commit']}")
        ax.set_xticks(xs, [f"{x / 1024:g}K" if x >= 1024 else str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
    return list(figures)


# ---- The run -------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, "Speed and memory (mmMamba Fig. 1, Table 2).")
    if cfg.point:                                       # a child of run_point_subprocess
        res = run_point_safe(json.loads(cfg.point), memory=False)
        print(TAG + json.dumps(res), flush=True)
        return res
    c = resolve(cfg)
    started = time.time()
    partial = os.path.join(c.out, "bench.partial.json")
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":")[1].strip() for line in f if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(c.device) if c.device.startswith("cuda") else None
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
               "torch": torch.__version__, "gpu": gpu, "cuda": torch.version.cuda,
               "threads": torch.get_num_threads(), "where": gpu or f"{os.cpu_count()} CPUs ({cpu})"}
    res = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
           "paper": PAPER, "config": dataclasses.asdict(c), "machine": machine,
           "layouts": {x: model_config(c, w).layers for x, (w, *_) in LAYOUTS.items() if w != "model"}}
    os.makedirs(c.out, exist_ok=True)
    print(f"bench: {c.preset} {c.device} {c.dtype}, {c.parts}, {c.layouts}, L {c.lengths}, "
          f"budget {c.budget_s or 'none'} s, commit {res['commit']}", flush=True)

    def saver(key):                                     # a killed run leaves what it measured
        def save(rows):
            write_json(partial, {**res, "partial": True, key: rows})
        return save
    if "costs" in c.parts:
        res["costs"] = costs_section()
    if "kernel" in c.parts:
        share = c.kernel_budget_s
        if c.budget_s:
            share = min(share, c.budget_s - REPORT_S)
        res["kernel"] = kernel_section(c, started + share, saver("kernel_rows"))
    if {"table2", "model"} & set(c.parts):
        metric = "peak_mib" if c.device.startswith("cuda") else "run_mib"
        points = model_section(c, started, saver("model_points"))
        decode = None
        if "decode" in c.parts:
            decode = decode_section(c, points, started + (c.budget_s - REPORT_S if c.budget_s else math.inf))
        res["model"] = {"memory_metric": metric, "points": points, "decode": decode,
                        "ratios": compute_ratios(points, metric),
                        "checks": compute_checks(points, metric, decode)}
    passed = [v["pass"] for v in (res.get("model") or {}).get("checks", {}).values()]
    kernels = [r["status"] for r in (res.get("kernel") or {}).get("results", [])]
    res["summary"] = (f"goals: {passed.count(True)} pass, {passed.count(False)} fail, "
                      f"{passed.count(None)} not measured; {kernels.count('ok')}/{len(kernels)} "
                      "kernel timings ok")
    res["elapsed_s"] = time.time() - started
    res["plots"] = make_plots(res, c.out)
    write_json(partial, res)
    os.replace(partial, os.path.join(c.out, "bench.json"))         # no partial file is left
    lines = table_lines(res)
    lines += ["", f"{machine['where']}, torch {torch.__version__}, {machine['threads']} threads, "
              f"{res['elapsed_s']:.0f} s; wrote {c.out}: " + ", ".join(["bench.json", "table.txt", *res["plots"]]),
              res["summary"]]
    with open(os.path.join(c.out, "table.txt"), "w") as f:
        f.write("\n".join(lines).lstrip("\n") + "\n")
    print("\n".join(lines), flush=True)
    return res


if __name__ == "__main__":
    run_main(main)

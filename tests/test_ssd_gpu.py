"""GPU tests of ssd_triton.py at mmMamba's shape (H = 16 heads, P = N = 128) against ssd_chunked in
float64 on the same (upcast) inputs: the forward to L = 131,072 and batch 8, forward + backward at
moderate L, L not a multiple of the chunk size, GQA as the mixer uses it (x and B with Hx = G = 8 KV
heads, C with Gc = H = 16); the model's logits with ssd_impl="triton". Q = 64 (the model's).

Tolerances (relative error ||out - ref|| / ||ref||), TOL: float32 (3xTF32 dots; tf32 off in
PyTorch) 1e-4, float16 5e-3, bfloat16 2e-2 (16-bit dot operands, float32 accumulation and states).

GPU_CHECK_DRY_RUN=1 without CUDA: the same tests at tiny shapes (H = 4, P = N = 32, L <= 100) in
Triton's CPU interpreter (experiments/gpu_check.sh --dry-run). GPU_CHECK_ERRORS=FILE: every measured
error is appended to FILE as a JSON line. test_gpu_check_dry_run runs the GPU script's dry run.

Run on a GPU: python -m pytest -q -s tests/test_ssd_gpu.py     # -s prints the measured errors
"""
import json
import os
import subprocess

import pytest
import torch

pytest.importorskip("triton")

from ssd import ssd_chunked  # noqa: E402
from ssd_inputs import no_tf32, random_inputs, rel_err  # noqa: E402
from ssd_triton import ssd_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DRY = not CUDA and os.environ.get("GPU_CHECK_DRY_RUN") == "1"
DEVICE = "cuda" if CUDA else "cpu"
on_gpu = pytest.mark.skipif(not (CUDA or DRY), reason="needs a CUDA GPU (or GPU_CHECK_DRY_RUN=1)")
if DRY:                 # tiny shapes for the interpreter
    H, P, N = 4, 32, 32
    LENGTH = dict(b8_mha=70, b8_gqa=100, odd=37, b1_mha=64, longest=90, backward=50, model=40)
else:                   # mmMamba's Mamba-2 mixer: 16 heads, head dim 128, state 128
    H, P, N = 16, 128, 128
    LENGTH = dict(b8_mha=1000, b8_gqa=4096, odd=16_387, b1_mha=65_536, longest=131_072,
                  backward=8_200, model=300)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]          # 16-bit first
GQA = (H // 2, H // 2, H)   # (Hx, G, Gc): x = V and B = K with H/2 KV heads, C = Q with H heads
MHA = (H, H, H)


def _inputs(b, L, groups, dtype, seed=0):
    """Random inputs in `dtype` on the device, and the same values upcast to float64."""
    Hx, G, Gc = groups
    lo = random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, Hx=Hx, Gc=Gc, dtype=dtype, device=DEVICE,
                       seed=seed)
    return list(lo), [t.double() for t in lo]


def _report(test: str, dtype, b: int, L: int, groups, errors: dict):
    """Print the measured errors and append them to $GPU_CHECK_ERRORS (one JSON line)."""
    print(f"{test} {dtype} b={b} L={L} (Hx, G, Gc)={groups}: "
          + ", ".join(f"{name} {e:.1e}" for name, e in errors.items()))
    path = os.environ.get("GPU_CHECK_ERRORS")
    if path:
        record = dict(test=test, dtype=str(dtype), b=b, L=L, groups=groups, device=DEVICE,
                      tolerance=TOL[dtype], errors=errors)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(autouse=True)
def _no_tf32():
    with no_tf32():
        yield
    if CUDA:
        torch.cuda.empty_cache()


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,groups", [
    (8, LENGTH["b8_mha"], MHA),         # batch 8, L not a multiple of Q
    (8, LENGTH["b8_gqa"], GQA),
    (2, LENGTH["odd"], GQA),            # odd length
    (1, LENGTH["b1_mha"], MHA),
    (1, LENGTH["longest"], GQA),        # the longest length of the issue
], ids=["b8-mha", "b8-gqa", "b2-odd-gqa", "b1-mha", "b1-longest-gqa"])
def test_forward_matches_float64(dtype, b, L, groups):
    lo, ref_in = _inputs(b, L, groups, dtype)
    y, hT = ssd_triton(*lo, chunk_size=64)
    assert y.dtype == dtype and hT.dtype == torch.float32 and torch.isfinite(y).all()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=64)
    errors = {"y": rel_err(y, y_ref), "final state": rel_err(hT, h_ref)}
    _report("forward", dtype, b, L, groups, errors)
    assert all(e <= TOL[dtype] for e in errors.values()), errors


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,groups", [(2, LENGTH["b8_mha"], GQA), (1, LENGTH["backward"], MHA)],
                         ids=["b2-gqa", "b1-mha"])
def test_backward_matches_float64(dtype, b, L, groups):
    lo, ref_in = _inputs(b, L, groups, dtype, seed=1)
    lo = [t.detach().requires_grad_() for t in lo]
    ref_in = [t.detach().requires_grad_() for t in ref_in]
    g = torch.Generator(device=DEVICE).manual_seed(2)
    dy = torch.randn(b, L, H, P, device=DEVICE, dtype=torch.float64, generator=g)
    dh = torch.randn(b, H, P, N, device=DEVICE, dtype=torch.float64, generator=g)
    y, hT = ssd_triton(*lo, chunk_size=64)
    ((y.double() * dy).sum() + (hT.double() * dh).sum()).backward()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=64)
    ((y_ref * dy).sum() + (h_ref * dh).sum()).backward()
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    errors = {n: rel_err(a.grad, r.grad) for n, a, r in zip(names, lo, ref_in)}
    _report("backward", dtype, b, L, groups, errors)
    assert all(a.grad.dtype == a.dtype for a in lo)
    assert all(e <= TOL[dtype] for e in errors.values()), errors


@on_gpu
@pytest.mark.gpu
def test_model_float32_forward_with_triton_matches_chunked():
    """The Mamba-2 mixer with ssd_impl="triton": the model's logits agree with the chunked path."""
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    cfg = model.ModelConfig(layers=["mamba2", "attn", "mamba2", "mamba2"], ssd_impl="triton")
    m = model.Model(cfg).to(DEVICE).eval()
    ids = torch.randint(7, cfg.vocab_size, (2, LENGTH["model"]), device=DEVICE)
    with torch.no_grad():
        fast = m(ids)
        m.set_config(cfg.replace(ssd_impl="chunked"))
        slow = m(ids)
    error = rel_err(fast, slow)
    _report("model logits", torch.float32, 2, LENGTH["model"], None, {"logits": error})
    assert error <= 1e-4


@pytest.mark.skipif(CUDA, reason="the dry run is the CPU rehearsal of the GPU script")
def test_gpu_check_dry_run(tmp_path):
    """experiments/gpu_check.sh --dry-run: every part, every Python path it calls, on the CPU at
    tiny shapes, writes its results folder (summary, logs, measured errors, bench JSON, tables and
    plots) within its time limits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK")}
    command = ["bash", "experiments/gpu_check.sh", "--dry-run", "--out", str(out)]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = ["env", "tests_16bit", "kernel_bfloat16", "model", "tests_float32", "kernel_float32"]
    assert [p["part"] for p in summary["parts"]] == parts
    for p in summary["parts"]:                          # 124: stopped at its time limit
        log = (out / f"{p['part']}.log").read_text()[-3000:]
        assert p["status"] == 0, f"{p}\n{log}"
    assert summary["dry_run"] and summary["limit_s"] <= 360
    for name in ("env.log", "summary.md", "tests_16bit.log", "tests_float32.log"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "ssd_errors.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in records} == {"torch.float16", "torch.bfloat16", "torch.float32"}
    assert all(max(r["errors"].values()) <= r["tolerance"] for r in records)
    for part, files in {"kernel_bfloat16": [], "kernel_float32": [],
                        "model": ["model_time.png", "model_memory.png"]}.items():
        for name in ["bench.json", "table.txt"] + files:
            assert (out / part / name).stat().st_size > 0, (part, name)
    kernel = json.loads((out / "kernel_bfloat16" / "bench.json").read_text())["kernel"]
    assert kernel["shape"]["dtype"] == "bfloat16" and kernel["results"]

"""GPU-only tests of ssd_triton.py at mmMamba's shape: H = 16 heads, P = N = 128, against
ssd_chunked in float64 on the same (upcast) inputs. Forward for L up to 131,072 and batch up to 8,
forward + backward (the Triton backward) at moderate L; L not a multiple of the chunk size; GQA as
the mixer uses it (x and B with Hx = G = 8 KV heads, C with Gc = H = 16). Skipped without CUDA.

Tolerances (relative error ||out - ref|| / ||ref||): float32 (IEEE dots in the kernels, tf32 off in
PyTorch) 1e-4, float16 5e-3, bfloat16 2e-2 (16-bit inputs use tf32 dots in the kernels).
Q = 64, the model's chunk size (ModelConfig.ssd_chunk_size).

Run on a GPU: python -m pytest -q tests/test_ssd_gpu.py -s     # -s prints the measured errors
"""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from ssd import ssd_chunked  # noqa: E402
from ssd_inputs import random_inputs, rel_err  # noqa: E402
from ssd_triton import ssd_triton  # noqa: E402

H, P, N = 16, 128, 128  # mmMamba's Mamba-2 mixer: 16 heads, head dim 128, state 128
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = (8, 8, H)     # (Hx, G, Gc): x = V and B = K with 8 KV heads, C = Q with 16 heads
MHA = (H, H, H)


def _inputs(b, L, groups, dtype, seed=0):
    """Random inputs in `dtype` on CUDA, and the same values upcast to float64 (the reference's)."""
    Hx, G, Gc = groups
    lo = random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, Hx=Hx, Gc=Gc, dtype=dtype, device="cuda", seed=seed)
    return list(lo), [t.double() for t in lo]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,groups", [
    (8, 1000, MHA),         # batch 8, L not a multiple of Q
    (8, 4096, GQA),
    (2, 16_387, GQA),       # odd length
    (1, 65_536, MHA),
    (1, 131_072, GQA),      # the longest length of the issue
], ids=["b8-L1000-mha", "b8-L4096-gqa", "b2-L16387-gqa", "b1-L65536-mha", "b1-L131072-gqa"])
def test_forward_matches_float64(dtype, b, L, groups):
    lo, ref_in = _inputs(b, L, groups, dtype)
    y, hT = ssd_triton(*lo, chunk_size=64)
    assert y.dtype == dtype and hT.dtype == torch.float32 and torch.isfinite(y).all()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=64)
    ey, eh = rel_err(y, y_ref), rel_err(hT, h_ref)
    print(f"forward {dtype} b={b} L={L} (Hx, G, Gc)={groups}: rel err y {ey:.2e}, final state {eh:.2e}")
    assert ey <= TOL[dtype] and eh <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,groups", [(2, 1000, GQA), (1, 8_200, MHA)], ids=["b2-L1000-gqa", "b1-L8200-mha"])
def test_backward_matches_float64(dtype, b, L, groups):
    lo, ref_in = _inputs(b, L, groups, dtype, seed=1)
    lo = [t.detach().requires_grad_() for t in lo]
    ref_in = [t.detach().requires_grad_() for t in ref_in]
    g = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(b, L, H, P, device="cuda", dtype=torch.float64, generator=g)
    dh = torch.randn(b, H, P, N, device="cuda", dtype=torch.float64, generator=g)
    y, hT = ssd_triton(*lo, chunk_size=64)
    ((y.double() * dy).sum() + (hT.double() * dh).sum()).backward()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=64)
    ((y_ref * dy).sum() + (h_ref * dh).sum()).backward()
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    errs = {n: rel_err(a.grad, r.grad) for n, a, r in zip(names, lo, ref_in)}
    print(f"backward {dtype} b={b} L={L} (Hx, G, Gc)={groups}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert all(a.grad.dtype == a.dtype for a in lo)
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_model_forward_with_triton_matches_chunked():
    """The Mamba-2 mixer on CUDA with ssd_impl="triton": the model's logits agree with the chunked
    path (float32)."""
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    cfg = model.ModelConfig(layers=["mamba2", "attn", "mamba2", "mamba2"], ssd_impl="triton")
    m = model.Model(cfg).cuda().eval()
    ids = torch.randint(7, cfg.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        fast = m(ids)
        m.set_config(cfg.replace(ssd_impl="chunked"))
        slow = m(ids)
    assert rel_err(fast, slow) <= 1e-4

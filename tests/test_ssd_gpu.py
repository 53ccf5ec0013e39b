"""GPU-only tests of ssd_triton at mmMamba's shape (issue 6): H = 16 heads, P = N = 128, against
ssd_chunked in float64 on the same (upcast) inputs; forward for L up to 131,072 and batch up to 8,
forward + backward at moderate L; L not a multiple of the chunk size, G < H. Skipped without CUDA.

Tolerances (relative error ||out - ref|| / ||ref||): float32 (IEEE dots, no tf32) 1e-4,
float16 5e-3, bfloat16 2e-2. Q = 64, the model's chunk size (ModelConfig.ssd_chunk_size). Caution:
a first run on an H100 with Q = 128 printed nothing within 200 s (killed by a timeout); the cause was
not established (a slow compile of 128 x 128 float32 IEEE tiles is the likely one), so Q = 128 is
not tested here until it has been looked at on a GPU.

Run on a GPU: python -m pytest -q tests/test_ssd_gpu.py
"""
import pytest
import torch

import ssd
from ssd import random_inputs, rel_err, ssd_chunked, ssd_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(ssd.triton is None, reason="triton is not installed"),
]

H, P, N = 16, 128, 128  # mmMamba's Mamba-2 mixer: 16 heads, head dim 128, state 128
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b, L, G, dtype, seed=0):
    """Random inputs in `dtype` on CUDA, and the same values upcast to float64 (the reference's)."""
    lo = random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, dtype=dtype, device="cuda", seed=seed)
    return lo, [t.double() for t in lo]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,G,Q", [
    (8, 1000, 16, 64),      # batch 8, L not a multiple of Q, G = H
    (4, 4096, 4, 64),       # G < H
    (2, 16_387, 16, 64),    # odd length
    (1, 65_536, 4, 64),
    (1, 131_072, 16, 64),   # the longest length of the issue
])
def test_forward_matches_float64(dtype, b, L, G, Q):
    lo, ref_in = _inputs(b, L, G, dtype)
    y, hT = ssd_triton(*lo, chunk_size=Q)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=Q)
    ey, eh = rel_err(y, y_ref), rel_err(hT, h_ref)
    print(f"forward {dtype} b={b} L={L} G={G} Q={Q}: rel err y {ey:.2e}, final state {eh:.2e}")
    assert ey <= TOL[dtype] and eh <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,L,G,Q", [(2, 1000, 4, 64), (1, 8_200, 16, 64)])
def test_backward_matches_float64(dtype, b, L, G, Q):
    lo, ref_in = _inputs(b, L, G, dtype, seed=1)
    lo = [t.detach().requires_grad_() for t in lo]
    ref_in = [t.detach().requires_grad_() for t in ref_in]
    g = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(b, L, H, P, device="cuda", dtype=torch.float64, generator=g)
    dh = torch.randn(b, H, P, N, device="cuda", dtype=torch.float64, generator=g)
    y, hT = ssd_triton(*lo, chunk_size=Q)
    ((y.double() * dy).sum() + (hT.double() * dh).sum()).backward()
    y_ref, h_ref = ssd_chunked(*ref_in, chunk_size=Q)
    ((y_ref * dy).sum() + (h_ref * dh).sum()).backward()
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    errs = {n: rel_err(a.grad, r.grad) for n, a, r in zip(names, lo, ref_in)}
    print(f"backward {dtype} b={b} L={L} G={G}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_model_forward_uses_triton_and_matches_chunked():
    """The Mamba-2 mixer on CUDA dispatches to ssd_triton; the model's logits agree with the
    chunked path (float32)."""
    from model import Model, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(layers=["mamba2", "attn", "mamba2", "mamba2"])
    m = Model(cfg).cuda().eval()
    ids = torch.randint(7, cfg.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        fast = m(ids)
        m.set_config(cfg.replace(ssd_impl="chunked"))
        slow = m(ids)
    assert rel_err(fast, slow) <= 1e-4

"""Tests of ssd_triton.py on the CPU (Triton's interpreter, TRITON_INTERPRET=1 from conftest.py) or
on CUDA, against a float64 token loop written here and against ssd.py's step functions."""
import pytest
import torch

pytest.importorskip("triton")

import ssd  # noqa: E402
import ssd_triton as st  # noqa: E402
from ssd_inputs import random_inputs  # noqa: E402
from ssd_triton import ssd_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.fixture(autouse=True)
def _ieee():
    """float32 checks at 1e-5 need IEEE matmuls in the references on CUDA (no tf32)."""
    if DEV == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield


def oracle(x, dt, A, B, C, D=None, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t, one head at a time, float64;
    head h reads x head h // (H/Hx), B group h // (H/G), C group h // (H/Gc)."""
    x, dt, A, B, C = (t.detach().double().cpu() for t in (x, dt, A, B, C))
    b, L, Hx, P = x.shape
    H, G, Gc, N = dt.shape[2], B.shape[2], C.shape[2], B.shape[3]
    y = torch.zeros(b, L, H, P, dtype=torch.float64)
    hT = torch.zeros(b, H, P, N, dtype=torch.float64)
    for i in range(b):
        for h in range(H):
            hx, g, gc = h // (H // Hx), h // (H // G), h // (H // Gc)
            s = torch.zeros(P, N, dtype=torch.float64) if h0 is None else h0[i, h].detach().double().cpu()
            for t in range(L):
                s = torch.exp(dt[i, t, h] * A[h]) * s + dt[i, t, h] * torch.outer(x[i, t, hx], B[i, t, g])
                y[i, t, h] = s @ C[i, t, gc]
                if D is not None:
                    y[i, t, h] += D[h].detach().double().cpu() * x[i, t, hx]
            hT[i, h] = s
    return y, hT


def oracle_autograd(x, dt, A, B, C, D=None, h0=None):
    """The same token loop vectorised over batch and heads, differentiable (the gradient oracle)."""
    H = dt.shape[2]
    xh, Bh, Ch = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (x, B, C))
    s = torch.zeros(x.shape[0], H, x.shape[3], B.shape[3], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        s = torch.exp(dt[:, t] * A)[..., None, None] * s + (dt[:, t, :, None] * xh[:, t])[..., None] * Bh[:, t, :, None]
        ys.append((s * Ch[:, t, :, None]).sum(-1))
    y = torch.stack(ys, 1)
    return (y if D is None else y + D[:, None] * xh), s


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def inputs(b=2, L=37, H=4, P=20, G=2, N=17, Hx=2, Gc=4, dtype=torch.float64, seed=0, D=True, h0=True):
    return random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, dtype=dtype, seed=seed, with_D=D, with_state=h0,
                         Hx=Hx, Gc=Gc)


def on(args, dtype=torch.float32):
    return [None if t is None else t.to(DEV, dtype) for t in args]


@pytest.mark.parametrize("L,Q,H,Hx,G,Gc,P,N,block_p", [
    (37, 16, 4, 2, 2, 4, 20, 17, 64),   # L not a multiple of Q; Hx = G < H, Gc != G
    (37, 10, 4, 2, 2, 4, 20, 17, 16),   # chunk size rounded up to 16; two P tiles
    (70, 32, 4, 1, 1, 2, 8, 32, 64),    # one x head and one B group for all heads
    (3, 64, 2, 2, 2, 1, 5, 6, 64),      # L < Q
])
def test_forward_matches_token_loop(monkeypatch, L, Q, H, Hx, G, Gc, P, N, block_p):
    monkeypatch.setattr(st, "MAX_BLOCK_P", block_p)
    args = inputs(L=L, H=H, Hx=Hx, G=G, Gc=Gc, P=P, N=N)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_triton(*on(args), chunk_size=Q)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5


def test_forward_without_D_and_state():
    args = inputs(L=29, D=False, h0=False)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_triton(*on(args), chunk_size=16)
    assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5


def test_float16():
    args = on(inputs(L=40), torch.float16)
    y_ref, h_ref = oracle(*args)                    # the same float16 values, in float64
    y, h = ssd_triton(*args, chunk_size=16)
    assert y.dtype == torch.float16 and h.dtype == torch.float32
    assert rel(y, y_ref) <= 5e-3 and rel(h, h_ref) <= 5e-3


def test_strided_inputs():
    """Non-contiguous views (slices of a fused projection, a transposed dt) are read in place."""
    x, dt, A, B, C, D, h0 = on(inputs(L=23))
    fused = torch.cat([C, C.flip(2)], dim=-1)       # (b, L, Gc = 4, 2N): B (G = 2) and C are views of it
    Bv, Cv = fused[:, :, ::2, 17:], fused[..., :17]
    xv = torch.cat([x, x], dim=-1)[..., 1:21]
    dtv = dt.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (xv, dtv, Bv, Cv))
    y_ref, h_ref = oracle(xv, dtv, A, Bv, Cv, D, h0)
    y, h = ssd_triton(xv, dtv, A, Bv, Cv, D, h0, chunk_size=16)
    assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5


def test_steps_match_ssd_step_functions():
    """The Triton chunk states, passed states and chunk outputs against ssd.py's (float64)."""
    x, dt, A, B, C, D, h0 = args = inputs(L=45, P=20, N=17)
    Q, c, pad = 16, 3, 3

    def chunks(t):                                  # (b, L, groups, ...) -> (b, c, Q, H, ...), zero padded
        t = torch.nn.functional.pad(ssd.per_head(t, 4), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(2, c, Q, *t.shape[2:])

    xq, Bq, Cq, dtq = chunks(x), chunks(B), chunks(C), chunks(dt)
    cs = torch.cumsum(dtq * A, dim=2)
    S_ref = ssd.chunk_states(xq, dtq, Bq, cs)
    H_ref, h_ref = ssd.pass_states(S_ref, cs[:, :, -1], h0)
    y_ref = ssd.chunk_outputs(xq, dtq, Bq, Cq, cs, H_ref).reshape(2, c * Q, 4, 20)[:, :45]
    x, dt, A, B, C, D, h0 = on(args)
    z = st._Sizes(x, dt, B, C, Q)                  # the launchers of ssd_triton, one step each
    S, cs_last = st._states(x, B, dt, A, z)
    assert S.shape == S_ref.shape and rel(S, S_ref) <= 1e-5 and rel(cs_last, cs[:, :, -1]) <= 1e-6
    H_in, hT = st._pass(S.clone(), cs_last, h0)    # in place over its first argument
    assert rel(H_in, H_ref) <= 1e-5 and rel(hT, h_ref) <= 1e-5
    y = st._outputs(x, dt, A, B, C, None, H_in, z)
    assert rel(y, y_ref) <= 1e-5


@pytest.mark.parametrize("Hx,G,Gc,L,with_D_h0", [(2, 2, 4, 37, True), (1, 2, 1, 20, False)])
def test_gradients_match_token_loop(monkeypatch, Hx, G, Gc, L, with_D_h0):
    monkeypatch.setattr(st, "MAX_BLOCK_P", 16)      # P = 20: two P tiles, partial sums over them
    base = inputs(L=L, Hx=Hx, G=G, Gc=Gc, D=with_D_h0, h0=with_D_h0)
    ref = [None if t is None else t.clone().requires_grad_() for t in base]
    lo = [None if t is None else t.to(DEV, torch.float32).requires_grad_() for t in base]
    g = torch.Generator().manual_seed(2)
    y, h = oracle_autograd(*ref)
    wy, wh = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(h.shape, generator=g,
                                                                                  dtype=torch.float64)
    ((y * wy).sum() + (h * wh).sum()).backward()
    y, h = ssd_triton(*lo, chunk_size=16)
    ((y * wy.to(y)).sum() + (h * wh.to(h)).sum()).backward()
    for name, a, r in zip(NAMES, lo, ref):
        if r is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            assert rel(a.grad, r.grad) <= 1e-4, (name, rel(a.grad, r.grad))


def test_strong_decay_is_finite():
    """dt * A = -50 per step: exp overflows unless exponents are clamped before exp, masked after."""
    x, dt, A, B, C, D, h0 = inputs(L=40)
    dt, A = torch.full_like(dt, 5.0), torch.full_like(A, -10.0)
    args = [t.to(DEV, torch.float32).requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    y, h = ssd_triton(*args, chunk_size=16)
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    for name, t in zip(NAMES, args):
        assert torch.isfinite(t.grad).all(), name
    y_ref, h_ref = oracle(*args)
    assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5


def test_bad_input_raises_value_error():
    x, dt, A, B, C, D, h0 = on(inputs(L=6))
    with pytest.raises(ValueError, match="A must be <= 0"):
        ssd_triton(x, dt, -A, B, C, D, h0)
    with pytest.raises(ValueError, match="C must have shape"):
        ssd_triton(x, dt, A, B, C[..., :3], D, h0)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_triton(x, dt, A, B, C, D, h0, chunk_size=0)


@pytest.mark.skipif(DEV == "cuda", reason="CPU tensors only")
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ssd_triton(*on(inputs(L=6)))

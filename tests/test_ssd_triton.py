"""Tests of ssd_triton.py against float64 references: a token loop written here (outputs), its autograd
(gradients) and ssd.py's step functions, on the same rounded inputs.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py). Its
tl.dot is a float32 numpy matmul that ignores input_precision, so a fixture here makes it round the
operands as a GPU's tensor cores do (tf32: 10 mantissa bits; tf32x3: the 3xTF32 split that the float32
kernels use); the float32 tolerances then check the 3xTF32 dots. 16-bit dot operands are rounded to
their dtype by the kernels themselves (ssd_triton._dot).
Tolerances (||out - ref|| / ||ref||): TOL below, per dtype, for outputs / final state and gradients.
Not checked here: the GPU's accumulation order, races of the atomic adds, shared memory, registers
(tests/test_triton_compile.py compiles every kernel for sm_80 and sm_90; tests/test_ssd_gpu.py runs
them on a GPU).
Run: python -m pytest -q tests/test_ssd_triton.py
"""
import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import ssd  # noqa: E402
import ssd_triton as st  # noqa: E402
from ssd_inputs import no_tf32, oracle, oracle_vectorised, random_inputs, rel_err  # noqa: E402
from ssd_triton import ssd_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 2e-2)}


def _tf32(a):
    """Round float32 values to tf32 (10 mantissa bits), to nearest, ties away (cvt.rna.tf32.f32)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _gpu_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """The interpreter's dot with the operand rounding of input_precision (tf32, tf32x3, ieee)."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle
    x = a.data.astype(np.float32)
    y = b.data.astype(np.float32)
    if input_precision == ir.INPUT_PRECISION.TF32:
        out = _tf32(x) @ _tf32(y)
    elif input_precision == ir.INPUT_PRECISION.TF32x3:
        x_big = _tf32(x)
        y_big = _tf32(y)
        out = _tf32(x - x_big) @ y_big + x_big @ _tf32(y - y_big) + x_big @ y_big
    else:
        out = x @ y
    return TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)


@pytest.fixture(autouse=True)
def _gpu_rounding(monkeypatch):
    """In the interpreter: dots round as on a GPU. On CUDA: IEEE matmuls in the references (no tf32)."""
    if DEV == "cpu":
        from triton.runtime.interpreter import InterpreterBuilder
        monkeypatch.setattr(InterpreterBuilder, "create_dot", _gpu_dot)
    with no_tf32():
        yield


def inputs(b=2, L=37, H=4, P=20, G=2, N=17, Hx=2, Gc=4, dtype=torch.float64, seed=0, D=True, h0=True):
    return random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, dtype=dtype, seed=seed, with_D=D, with_state=h0,
                         Hx=Hx, Gc=Gc)


def on(args, dtype=torch.float32):
    """The inputs on the test device in dtype (None stays None)."""
    return [t if t is None else t.to(DEV, dtype) for t in args]


def p_tiles(monkeypatch, block_p: int):
    """Every per-chunk kernel's P tile block_p (16 < P = 20: two P tiles, partial sums over them)."""
    monkeypatch.setattr(st, "TILES", {key: (block_p, *rest) for key, (_, *rest) in st.TILES.items()})


def gradients(args, dtype, chunk_size=16):
    """The gradients of ssd_triton (inputs in dtype) and of the float64 oracle (on the same rounded
    values) of one random linear function of y and the final state; returns (name, grad, ref) triples."""
    lo = [t if t is None else t.to(DEV, dtype).requires_grad_() for t in args]
    ref = [t if t is None else t.detach().cpu().double().requires_grad_() for t in lo]
    g = torch.Generator().manual_seed(2)
    y, h = oracle_vectorised(*ref)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    ((y * wy).sum() + (h * wh).sum()).backward()
    y, h = ssd_triton(*lo, chunk_size=chunk_size)
    ((y.double() * wy.to(DEV)).sum() + (h.double() * wh.to(DEV)).sum()).backward()
    out = []
    for name, a, r in zip(NAMES, lo, ref):
        if r is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            out.append((name, a.grad, r.grad))
    return out


@pytest.mark.parametrize("L,Q,H,Hx,G,Gc,P,N,block_p", [
    (37, 16, 4, 2, 2, 4, 20, 17, None),   # L not a multiple of Q; Hx = G < H, Gc != G
    (37, 10, 4, 2, 2, 4, 20, 17, 16),     # chunk size rounded up to 16; two P tiles
    (70, 32, 4, 1, 1, 2, 8, 32, None),    # one x head and one B group for all heads
    (3, 64, 2, 2, 2, 1, 5, 6, None),      # L < Q
])
def test_forward_matches_token_loop(monkeypatch, L, Q, H, Hx, G, Gc, P, N, block_p):
    if block_p:
        p_tiles(monkeypatch, block_p)
    args = inputs(L=L, H=H, Hx=Hx, G=G, Gc=Gc, P=P, N=N)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_triton(*on(args), chunk_size=Q)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_forward_without_D_and_state():
    args = inputs(L=29, D=False, h0=False)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_triton(*on(args), chunk_size=16)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def _forward_and_gradients(args, dtype, label: str):
    """ssd_triton's output, final state and gradients against the oracle on the same values in
    float64; outputs in the input dtype, states in float32."""
    y_ref, h_ref = oracle(*args)
    y, h = ssd_triton(*args, chunk_size=16)
    assert y.dtype == dtype and h.dtype == torch.float32
    tol_out, tol_grad = TOL[dtype]
    errs = {"y": rel_err(y, y_ref), "final state": rel_err(h, h_ref)}
    errs.update({name: rel_err(a, r) for name, a, r in gradients(args, dtype)})
    print(f"{dtype} {label}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert errs["y"] <= tol_out and errs["final state"] <= tol_out, errs
    assert all(e <= tol_grad for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_small_tiles_every_loop(monkeypatch, dtype):
    """16 x 16 tiles: two P tiles and three N tiles, so every grid axis and loop over P and N has
    several steps; forward and gradients against float64 (16-bit inputs too)."""
    small = {key: (16, None if key[0] == "states" else 16, 4, 1) for key in st.TILES}
    monkeypatch.setattr(st, "TILES", small)
    _forward_and_gradients(on(inputs(L=45, P=20, N=40), dtype), dtype, "small tiles")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_forward_and_gradients(dtype):
    """16-bit inputs: dot operands in the input dtype, float32 accumulation and states."""
    _forward_and_gradients(on(inputs(L=40), dtype), dtype, "")


def test_strided_inputs():
    """Non-contiguous views (slices of a fused projection, a transposed dt) are read in place."""
    x, dt, A, B, C, D, h0 = on(inputs(L=23))
    fused = torch.cat([C, C.flip(2)], dim=-1)       # (b, L, Gc = 4, 2N): B (G = 2) and C are its views
    Bv = fused[:, :, ::2, 17:]
    Cv = fused[..., :17]
    xv = torch.cat([x, x], dim=-1)[..., 1:21]
    dtv = dt.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (xv, dtv, Bv, Cv))
    y_ref, h_ref = oracle(xv, dtv, A, Bv, Cv, D, h0)
    y, h = ssd_triton(xv, dtv, A, Bv, Cv, D, h0, chunk_size=16)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_steps_match_ssd_step_functions():
    """The Triton chunk states, passed states and chunk outputs against ssd.py's (float64)."""
    x, dt, A, B, C, D, h0 = args = inputs(L=45, P=20, N=17)
    Q, c, pad = 16, 3, 3

    def chunks(t):                                  # (b, L, groups, ...) -> (b, c, Q, H, ...), zero padded
        t = torch.nn.functional.pad(ssd.per_head(t, 4), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(2, c, Q, *t.shape[2:])

    xq, Bq, Cq, dtq = (chunks(t) for t in (x, B, C, dt))
    cs = torch.cumsum(dtq * A, dim=2)
    S_ref = ssd.chunk_states(xq, dtq, Bq, cs)
    H_ref, h_ref = ssd.pass_states(S_ref, cs[:, :, -1], h0)
    y_ref = ssd.chunk_outputs(xq, dtq, Bq, Cq, cs, H_ref).reshape(2, c * Q, 4, 20)[:, :45]
    x, dt, A, B, C, D, h0 = on(args)
    z = st._Sizes(x, dt, B, C, Q)                  # the launchers of ssd_triton, one step each
    S, cs_last = st._states(x, B, dt, A, z)
    assert S.shape == S_ref.shape and rel_err(S, S_ref) <= 1e-5 and rel_err(cs_last, cs[:, :, -1]) <= 1e-6
    H_in, hT = st._pass(S.clone(), cs_last, h0)    # in place over its first argument
    assert rel_err(H_in, H_ref) <= 1e-5 and rel_err(hT, h_ref) <= 1e-5
    y = st._outputs(x, dt, A, B, C, None, H_in, z)
    assert rel_err(y, y_ref) <= 1e-5


@pytest.mark.parametrize("Hx,G,Gc,L,with_D_h0", [(2, 2, 4, 37, True), (1, 2, 1, 20, False)])
def test_gradients_match_token_loop(monkeypatch, Hx, G, Gc, L, with_D_h0):
    p_tiles(monkeypatch, 16)
    args = inputs(L=L, Hx=Hx, G=G, Gc=Gc, D=with_D_h0, h0=with_D_h0)
    for name, a, r in gradients(args, torch.float32):
        assert rel_err(a, r) <= 1e-4, (name, rel_err(a, r))


def test_strong_decay_is_finite():
    """dt * A = -50 per step: exp overflows unless exponents are clamped before exp, masked after."""
    x, dt, A, B, C, D, h0 = inputs(L=40)
    dt = torch.full_like(dt, 5.0)
    A = torch.full_like(A, -10.0)
    args = on((x, dt, A, B, C, D, h0))
    y, h = ssd_triton(*args, chunk_size=16)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = oracle(*args)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5
    for name, a, r in gradients((x, dt, A, B, C, D, h0), torch.float32):
        assert torch.isfinite(a).all(), name
        if name not in ("A", "initial_state"):      # decayed by e^-50: ~0, no relative error to speak of
            assert rel_err(a, r) <= 1e-4, (name, rel_err(a, r))


@pytest.mark.skipif(DEV == "cuda", reason="the interpreter's dot")
def test_interpreter_dot_rounds_like_a_gpu():
    """The fixture's dot is live: tf32 operands lose ~1e-4, 3xTF32 keeps float32 accuracy."""
    import triton.language as tl

    @triton.jit
    def matmul(a_ptr, b_ptr, out_ptr, PRECISION: tl.constexpr):
        r = tl.arange(0, 32)
        a = tl.load(a_ptr + r[:, None] * 32 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 32 + r[None, :])
        tl.store(out_ptr + r[:, None] * 32 + r[None, :], tl.dot(a, b, input_precision=PRECISION))

    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=g)
    b = torch.randn(32, 32, generator=g)
    ref = a.double() @ b.double()
    errs = {}
    for precision in ("tf32", "tf32x3", "ieee"):
        out = torch.empty(32, 32)
        matmul[(1,)](a, b, out, PRECISION=precision)
        errs[precision] = rel_err(out, ref)
    assert 1e-4 <= errs["tf32"] <= 2e-3, errs
    assert errs["tf32x3"] <= 2e-6 and errs["ieee"] <= 1e-6, errs


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

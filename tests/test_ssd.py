"""Tests of ssd.py against an independent token-loop oracle (tests/ssd_inputs.py, float64)."""

import pytest
import torch

import ssd
from ssd import ssd_chunked, ssd_naive, ssd_step
from ssd_inputs import oracle, oracle_vectorised, random_inputs, rel_err


def inputs(b=2, L=37, H=4, P=5, G=2, N=6, dtype=torch.float64, seed=0, D=True, h0=True, Hx=None, Gc=None):
    return random_inputs(b=b, L=L, H=H, P=P, G=G, N=N, dtype=dtype, seed=seed, with_D=D, with_state=h0,
                         Hx=Hx, Gc=Gc)


def test_oracles_agree():
    args = inputs(b=1, L=9, H=2, P=3, G=1, N=4)
    y1, h1 = oracle(*args)
    y2, h2 = oracle_vectorised(*args)
    assert rel_err(y2, y1) < 1e-14 and rel_err(h2, h1) < 1e-14


@pytest.mark.parametrize("L,Q,G", [(37, 8, 2), (64, 16, 1), (5, 16, 4), (50, 7, 2), (1, 4, 2)])
def test_chunked_matches_oracle_float64(L, Q, G):
    args = inputs(L=L, G=G)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_chunked(*args, chunk_size=Q)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) <= 1e-10
    assert rel_err(h, h_ref) <= 1e-10


def test_chunked_without_D_and_state():
    args = inputs(L=29, D=False, h0=False)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_chunked(*args, chunk_size=8)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10


def test_naive_matches_oracle():
    args = inputs(L=23)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_naive(*args)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-12


@pytest.mark.parametrize("Hx,G,Gc", [(2, 2, 4), (1, 2, 1), (4, 1, 2)])
def test_grouped_x_B_C_match_oracle(Hx, G, Gc):
    """GQA as the mixer uses it: x, B and C each read by index from their own number of groups."""
    args = inputs(L=29, G=G, Hx=Hx, Gc=Gc)
    y_ref, h_ref = oracle(*args)
    for fn in (ssd_naive, ssd_chunked):
        y, h = fn(*args, chunk_size=8)
        assert rel_err(y, y_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10, fn.__name__
    x, dt, A, B, C, D, h0 = args
    y_pre, state = ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], D, h0, chunk_size=8)
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D)[0] for t in range(20, 29)]
    assert rel_err(torch.cat([y_pre, torch.stack(ys, 1)], 1), y_ref) <= 1e-12
    assert rel_err(state, h_ref) <= 1e-12


def test_chunked_steps_are_the_papers_four():
    """The step functions, called one by one on one chunk each, give the recurrence's states."""
    x, dt, A, B, C, D, h0 = inputs(b=1, L=16, H=2, P=3, G=2, N=4)
    c = lambda t: t.reshape(1, 2, 8, *t.shape[2:])                     # two chunks of Q = 8
    cs = torch.cumsum(c(dt) * A, dim=2)
    S = ssd.chunk_states(c(x), c(dt), c(B), cs)
    h_in, hT = ssd.pass_states(S, cs[:, :, -1], h0)
    _, h_mid = oracle(x[:, :8], dt[:, :8], A, B[:, :8], C[:, :8], None, h0)
    _, h_end = oracle(x, dt, A, B, C, None, h0)
    _, S1 = oracle(x[:, 8:], dt[:, 8:], A, B[:, 8:], C[:, 8:])          # chunk 1 from a zero state
    assert rel_err(h_in[:, 0], h0) == 0 and rel_err(h_in[:, 1], h_mid) <= 1e-12 and rel_err(hT, h_end) <= 1e-12
    assert rel_err(S[:, 1], S1) <= 1e-12
    y = ssd.chunk_outputs(c(x), c(dt), c(B), c(C), cs, h_in).reshape(1, 16, 2, 3)
    assert rel_err(y, oracle(x, dt, A, B, C, None, h0)[0]) <= 1e-12


def test_implicit_attention_is_the_dual_form():
    """y = M x per head, with M the materialised dual form, against the token loop (float64):
    L = 13 is not a multiple of any chunk size; B has G = 2 groups, C one per head, x Hx = 2."""
    x, dt, A, B, C, _, _ = inputs(b=2, L=13, H=4, P=3, G=2, N=5, Gc=4, Hx=2, D=False, h0=False)
    M = ssd.implicit_attention(dt, A, B, C)                             # (b, H, L, L)
    assert M.shape == (2, 4, 13, 13) and M.dtype == torch.float64
    assert bool((M.triu(1) == 0).all())                                 # causal
    y = torch.einsum("bhts,bshp->bthp", M, x.repeat_interleave(2, dim=2))
    assert rel_err(y, oracle(x, dt, A, B, C)[0]) <= 1e-12
    assert rel_err(y, ssd_naive(x, dt, A, B, C)[0]) <= 1e-12
    M32 = ssd.implicit_attention(*(t.float() for t in (dt, A, B, C)))
    assert M32.dtype == torch.float32 and rel_err(M32, M) <= 1e-5


def test_chunked_float32_close_to_oracle():
    args = inputs(L=70, dtype=torch.float32)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_chunked(*args, chunk_size=16)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_chunked_gradcheck_float64():
    x, dt, A, B, C, D, h0 = inputs(b=1, L=7, H=2, P=2, G=1, N=3)
    args = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]

    def f(*a):
        y, h = ssd_chunked(*a, chunk_size=3)
        return y, h

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_chunked_gradients_match_oracle_autograd():
    base = inputs(L=21, G=2)
    a1 = [t.clone().requires_grad_() for t in base]
    a2 = [t.clone().requires_grad_() for t in base]
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(2, 21, 4, 5, generator=g, dtype=torch.float64)
    wh = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    y, h = ssd_chunked(*a1, chunk_size=8)
    ((y * wy).sum() + (h * wh).sum()).backward()
    y, h = oracle_vectorised(*a2)
    ((y * wy).sum() + (h * wh).sum()).backward()
    for name, t1, t2 in zip(["x", "dt", "A", "B", "C", "D", "h0"], a1, a2):
        assert rel_err(t1.grad, t2.grad) <= 1e-10, name


@pytest.mark.parametrize("L,k", [(30, 5), (32, 3), (1, 4)])
def test_prefill_then_steps_equals_full(L, k):
    x, dt, A, B, C, D, h0 = inputs(L=L + k)
    y_full, h_full = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=8)
    y_pre, state = ssd_chunked(x[:, :L], dt[:, :L], A, B[:, :L], C[:, :L], D, h0, chunk_size=8)
    ys = [y_pre]
    for t in range(L, L + k):
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D)
        ys.append(y_t[:, None])
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-12
    assert rel_err(state, h_full) <= 1e-12


def test_step_keeps_float32_state_and_updates_it_in_place():
    x, dt, A, B, C, D, h0 = inputs(L=1, dtype=torch.float16)
    h = h0.float()
    y, state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h, D)
    assert state.dtype == torch.float32 and y.dtype == torch.float16 and state is h


def test_long_sequence_float32_stable():
    """L = 65,536 in float32: finite, and within 1e-4 of a float64 run."""
    x, dt, A, B, C, D, h0 = inputs(b=1, L=65536, H=2, P=8, G=1, N=8, dtype=torch.float64, seed=3)
    A = A / 16.0  # slow decays (A in [-1, -1/16]): the state remembers thousands of tokens
    y64, h64 = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=64)
    y32, h32 = ssd_chunked(*(t.float() for t in (x, dt, A, B, C, D, h0)), chunk_size=64)
    assert torch.isfinite(y32).all() and torch.isfinite(h32).all()
    assert rel_err(y32, y64) <= 1e-4 and rel_err(h32, h64) <= 1e-4


def strong_decay_inputs(dtype):
    x, dt, A, B, C, D, h0 = inputs(L=40, dtype=dtype)
    dt = torch.full_like(dt, 5.0)
    A = torch.full_like(A, -10.0)                  # dt * A = -50 per step
    return x, dt, A, B, C, D, h0


def test_strong_decay_no_nan_chunked():
    args = [t.float().requires_grad_() for t in strong_decay_inputs(torch.float32)]
    y, h = ssd_chunked(*args, chunk_size=16)
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    for t in args:
        assert torch.isfinite(t.grad).all()
    y_ref, _ = oracle(*[t.detach() for t in args])
    assert rel_err(y, y_ref) <= 1e-5


def test_deterministic():
    args = inputs(L=33, dtype=torch.float32)
    y1, h1 = ssd_chunked(*args, chunk_size=8)
    y2, h2 = ssd_chunked(*args, chunk_size=8)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


# ---------------------------------------------------------------- bad input


def good():
    return dict(zip(["x", "dt", "A", "B", "C", "D", "initial_state"], inputs(L=6, dtype=torch.float32)))


@pytest.mark.parametrize("fn", [ssd_naive, ssd_chunked])
@pytest.mark.parametrize("name,bad,pattern", [
    ("x", lambda a: a["x"][0], r"x must have shape \(b, L, Hx, P\)"),
    ("dt", lambda a: a["dt"][:, :3], r"dt must have shape \(b, L, H\) = \(2, 6, H\)"),
    ("A", lambda a: a["A"][:2], r"A must have shape \(H,\) = \(4,\)"),
    ("B", lambda a: a["B"][:, :5], r"B must have shape \(b, L, G, N\)"),
    ("B", lambda a: a["B"][:, :, 0], r"B must have shape \(b, L, G, N\)"),
    ("C", lambda a: a["C"][..., :3], r"C must have shape \(b, L, Gc, N\) = \(2, 6, Gc, 6\)"),
    ("D", lambda a: a["D"][:1], r"D must have shape \(H,\) = \(4,\)"),
    ("initial_state", lambda a: a["initial_state"][:, :, :2],
     r"initial_state must have shape \(b, H, P, N\) = \(2, 4, 5, 6\)"),
    ("A", lambda a: -a["A"], r"A must be <= 0"),
    ("dt", lambda a: -a["dt"], r"dt must be >= 0"),
    ("x", lambda a: a["x"].long(), r"x must be a floating-point tensor"),
    ("B", lambda a: a["B"].to(torch.int32), r"B must be a floating-point tensor"),
    ("D", lambda a: a["D"].to("meta"), r"D is on meta but x is on cpu"),
])
def test_bad_inputs(fn, name, bad, pattern):
    a = good()
    a[name] = bad(a)
    with pytest.raises(ValueError, match=pattern):
        fn(**a)


@pytest.mark.parametrize("name,groups", [("B", 3), ("C", 3), ("x", 3)])
def test_heads_not_multiple_of_groups(name, groups):
    a = good()
    a[name] = torch.randn(*a[name].shape[:2], groups, a[name].shape[3])
    with pytest.raises(ValueError, match=f"{name} has 3 heads/groups, but the number of heads H = 4"):
        ssd_chunked(**a)


@pytest.mark.parametrize("block_chunks", [1, 3, 100])
def test_chunked_blocks_of_chunks_match_oracle(block_chunks):
    """Processing the chunks a block at a time (bounded memory) changes nothing."""
    args = inputs(L=61, G=2)
    y_ref, h_ref = oracle(*args)
    y, h = ssd_chunked(*args, chunk_size=8, block_chunks=block_chunks)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10

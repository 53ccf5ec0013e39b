"""The Mamba-2 SSD operator (state space duality), the linear-time mixer at the heart of mmMamba.

mmMamba (arXiv 2502.13145, Sec. 3.1-3.2) replaces softmax attention with Mamba-2's selective state
space model. Per head, with a P x N state h, the recurrence (the definition) is

    a_t = dt_t * A                                     # log decay, <= 0
    h_t = exp(a_t) * h_{t-1} + dt_t * outer(x_t, B_t)  # (P, N)
    y_t = h_t @ C_t + D * x_t                          # (P,)

and its dual, attention-like form is y = M (dt * x) with M[t, s] = (C_t . B_s) exp(a_{s+1} + ... + a_t)
for s <= t. With A = 0 and dt = 1 this is causal linear attention with q = C, k = B, v = x.

Four implementations share one signature and one meaning:

    ssd_naive    the token loop above; slow, obviously right (the reference, run in float64)
    ssd_chunked  the block decomposition of Mamba-2 (Dao & Gu 2024, Sec. 6) in PyTorch einsums;
                 differentiable, the CPU fast path and the gradient oracle; any L
    ssd_triton   a fused Triton chunked scan (one kernel: intra-chunk, chunk state, state passing
                 and state-to-output), backward by recompute through ssd_chunked; also runs on a
                 CPU under TRITON_INTERPRET=1
    ssd_step     one decode token, O(P N) per head, float32 state

and `ssd(...)` picks Triton for CUDA tensors and `ssd_chunked` otherwise (`impl=` overrides).

Shapes: batch b, length L, heads H, head dim P, state N, groups G (head h reads group h // (H/G)),
chunk size Q.  x (b, L, H, P); dt (b, L, H) >= 0; A (H,) <= 0; B, C (b, L, G, N); D (H,) optional;
initial_state (b, H, P, N) optional. Returns y (b, L, H, P) in x's dtype and the final state
(b, H, P, N) in float32 (float64 when the inputs are float64).

Run:  python ssd.py           # every implementation against ssd_naive: relative errors, timings
      python ssd.py --bench   # ssd_chunked vs causal SDPA across L (CPU), the issue's speed goal
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

try:  # Triton is optional at import time: a CPU-only install may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


# ----------------------------------------------------------------------------------------------
# Input checks: every bad input is a ValueError that names the argument and what was expected.

def _check_inputs(x, dt, A, B, C, D=None, initial_state=None, check_values=True):
    """Validate shapes, dtypes, devices and signs; return (b, L, H, P, G, N)."""
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": initial_state}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share one device")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (b, L, H, P), got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if B.dim() != 4:
        raise ValueError(f"B must have shape (b, L, G, N) = ({b}, {L}, G, N), got {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    expected = {
        "dt": (b, L, H), "A": (H,), "B": (b, L, G, N), "C": (b, L, G, N),
        "D": (H,), "initial_state": (b, H, P, N),
    }
    letters = {"dt": "(b, L, H)", "A": "(H,)", "B": "(b, L, G, N)", "C": "(b, L, G, N)",
               "D": "(H,)", "initial_state": "(b, H, P, N)"}
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {letters[name]} = {shape}, got {tuple(t.shape)}")
    if G == 0 or H % G != 0:
        raise ValueError(f"B and C have G = {G} groups, but the number of heads H = {H} must be a multiple of G")
    if check_values:
        if A.numel() and bool((A > 0).any()):
            raise ValueError(f"A must be <= 0 (a decay), got max(A) = {A.max().item():.4g}")
        if dt.numel() and bool((dt < 0).any()):
            raise ValueError(f"dt must be >= 0 (apply softplus first), got min(dt) = {dt.min().item():.4g}")
    return b, L, H, P, G, N


def _compute_dtype(*ts):
    """float64 if any input is float64, else float32 (16-bit inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ----------------------------------------------------------------------------------------------
# The definition: a token loop.

def ssd_naive(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The recurrence of the module docstring, one token at a time. `chunk_size` is ignored."""
    b, L, H, P, G, N = _check_inputs(x, dt, A, B, C, D, initial_state)
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    R = H // G                                                      # heads per group
    Bh = B.to(ct).repeat_interleave(R, dim=2)                       # (b, L, H, N)
    Ch = C.to(ct).repeat_interleave(R, dim=2)                       # (b, L, H, N)
    xc, dtc, Ac = x.to(ct), dt.to(ct), A.to(ct)
    h = x.new_zeros(b, H, P, N, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(L):
        decay = torch.exp(dtc[:, t] * Ac)                           # (b, H)
        h = decay[..., None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", dtc[:, t], xc[:, t], Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))        # (b, H, P)
    y = torch.stack(ys, dim=1) if L else x.new_zeros(b, 0, H, P, dtype=ct)  # (b, L, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * xc
    return y.to(x.dtype), h


# ----------------------------------------------------------------------------------------------
# The block decomposition (Mamba-2 paper, Sec. 6; mmMamba Sec. 3.1).

def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64, block_chunks=16):
    """SSD in chunks of Q tokens: 1 intra-chunk (dual form), 2 chunk states, 3 state passing,
    4 state to output. Cumulative sums are taken inside each chunk, never across the sequence.
    Chunks are processed `block_chunks` at a time with the state carried between blocks, so the
    (Q x Q) temporaries stay bounded: without autograd, memory beyond y is O(block), not O(L)."""
    b, L, H, P, G, N = _check_inputs(x, dt, A, B, C, D, initial_state)
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    Q, R = int(chunk_size), H // G
    if Q < 1 or block_chunks < 1:
        raise ValueError(f"chunk_size and block_chunks must be >= 1, got {chunk_size}, {block_chunks}")
    pad = (-L) % Q                                   # padded tokens have dt = 0: no decay, no input
    c = (L + pad) // Q                               # number of chunks

    def chunks(t, *rest):                            # (b, L, ...) -> (b, c, Q, ...), zero padded
        t = t.to(ct)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, c, Q, *rest)

    xq = chunks(x, G, R, P)                          # (b, c, Q, G, R, P)
    dtq = chunks(dt, G, R)                           # (b, c, Q, G, R)
    Bq = chunks(B, G, N)                             # (b, c, Q, G, N)
    Cq = chunks(C, G, N)                             # (b, c, Q, G, N)
    Agr = A.to(ct).reshape(G, R)
    h = (x.new_zeros(b, G, R, P, N, dtype=ct) if initial_state is None
         else initial_state.to(ct).reshape(b, G, R, P, N))      # (b, G, R, P, N)
    ys = []
    for k0 in range(0, c, block_chunks):
        blk = slice(k0, k0 + block_chunks)
        y_blk, h = _ssd_chunk_block(xq[:, blk], dtq[:, blk], Agr, Bq[:, blk], Cq[:, blk], h)
        ys.append(y_blk)
    y = torch.cat(ys, dim=1) if ys else xq           # (b, c, Q, G, R, P)
    y = y.reshape(b, c * Q, H, P)[:, :L]             # (b, L, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype), h.reshape(b, H, P, N)


def _ssd_chunk_block(xq, dtq, Agr, Bq, Cq, h):
    """Steps 1-4 on a block of c chunks, entering with state h (b, G, R, P, N); returns the
    block's output (b, c, Q, G, R, P) and the state after it."""
    Q = xq.shape[2]
    a = dtq * Agr                                    # (b, c, Q, G, R)   log decays
    cs = torch.cumsum(a, dim=2)                      # (b, c, Q, G, R)   inside each chunk
    cs_last = cs[:, :, -1]                           # (b, c, G, R)
    dtx = dtq[..., None] * xq                        # (b, c, Q, G, R, P)

    # 1. intra-chunk: Y_diag[i] = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
    seg = cs[:, :, :, None] - cs[:, :, None]         # (b, c, Qi, Qj, G, R)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=xq.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[:, :, None, None], float("-inf")))  # (b,c,Qi,Qj,G,R)
    CB = torch.einsum("bcign,bcjgn->bcijg", Cq, Bq)  # (b, c, Qi, Qj, G)
    y = torch.einsum("bcijgr,bcjgrp->bcigrp", CB[..., None] * decay, dtx)  # (b, c, Q, G, R, P)

    # 2. chunk states: S_c = sum_j exp(cs_last - cs_j) dt_j outer(x_j, B_j)
    w = torch.exp(cs_last[:, :, None] - cs)          # (b, c, Q, G, R)
    S = torch.einsum("bcjgr,bcjgrp,bcjgn->bcgrpn", w, dtx, Bq)  # (b, c, G, R, P, N)

    # 3. state passing, sequential over chunks: H_{c+1} = exp(cs_last_c) H_c + S_c
    chunk_decay = torch.exp(cs_last)                 # (b, c, G, R)
    states = []
    for k in range(xq.shape[1]):
        states.append(h)                             # state entering chunk k
        h = chunk_decay[:, k, ..., None, None] * h + S[:, k]
    H_in = torch.stack(states, dim=1)                # (b, c, G, R, P, N)

    # 4. state to output: Y_off[i] = exp(cs_i) (H_c @ C_i)
    y = y + torch.exp(cs)[..., None] * torch.einsum("bcign,bcgrpn->bcigrp", Cq, H_in)
    return y, h


# ----------------------------------------------------------------------------------------------
# One decode step.

def ssd_step(x, dt, A, B, C, state, D=None):
    """One token of the recurrence. x (b, H, P), dt (b, H), A (H,), B, C (b, G, N),
    state (b, H, P, N) float32 (or float64). Returns y (b, H, P) in x's dtype and the new state."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (b, H, P), got {tuple(x.shape)}")
    _check_inputs(x[:, None], dt[:, None] if dt.dim() == 2 else dt, A,
                  B[:, None] if B.dim() == 3 else B, C[:, None] if C.dim() == 3 else C,
                  D, state, check_values=False)
    b, H, P = x.shape
    G = B.shape[1]
    ct = state.dtype if state.dtype == torch.float64 else torch.float32
    Bh = B.to(ct).repeat_interleave(H // G, dim=1)                  # (b, H, N)
    Ch = C.to(ct).repeat_interleave(H // G, dim=1)                  # (b, H, N)
    dtc = dt.to(ct)
    decay = torch.exp(dtc * A.to(ct))                               # (b, H)
    state = decay[..., None, None] * state.to(ct) + (dtc[..., None] * x.to(ct))[..., None] * Bh[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)                    # (b, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype), state


# ----------------------------------------------------------------------------------------------
# The Triton chunked scan: one program per (batch, head, block of P), walking the chunks in order
# with the (BLOCK_P, N) state kept in registers. Every input byte is read once and y written once.

if triton is not None:

    @triton.jit
    def _ssd_fwd_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr,
        L, H, P, N, R,
        sx_b, sx_l, sx_h, sx_p,
        sdt_b, sdt_l, sdt_h,
        sB_b, sB_l, sB_g, sB_n,
        sC_b, sC_l, sC_g, sC_n,
        sy_b, sy_l, sy_h, sy_p,
        sh_b, sh_h, sh_p, sh_n,
        HAS_D: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
        Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0).to(tl.int64)       # int64: offsets overflow int32 past ~60K tokens
        pid_p = tl.program_id(1).to(tl.int64)
        bi = pid_bh // H
        hi = pid_bh % H
        gi = hi // R                                 # head h reads group h // (H / G)
        offs_q = tl.arange(0, Q)                     # (Q,)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        offs_n = tl.arange(0, BLOCK_N)               # (BLOCK_N,)
        mask_p = offs_p < P
        mask_n = offs_n < N

        A = tl.load(A_ptr + hi).to(tl.float32)
        Dh = tl.load(D_ptr + hi).to(tl.float32) if HAS_D else 0.0
        h_off = bi * sh_b + hi * sh_h + offs_p[:, None] * sh_p + offs_n[None, :] * sh_n
        h_mask = mask_p[:, None] & mask_n[None, :]
        if HAS_H0:
            state = tl.load(h0_ptr + h_off, mask=h_mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
        else:
            state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        causal = offs_q[:, None] >= offs_q[None, :]  # (Q, Q)

        for start in range(0, L, Q):
            t = start + offs_q                       # (Q,) token indices, int64
            mask_t = t < L
            x = tl.load(x_ptr + bi * sx_b + t[:, None] * sx_l + hi * sx_h + offs_p[None, :] * sx_p,
                        mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)  # (Q, BLOCK_P)
            dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_l + hi * sdt_h, mask=mask_t, other=0.0).to(tl.float32)  # (Q,)
            Bc = tl.load(B_ptr + bi * sB_b + t[:, None] * sB_l + gi * sB_g + offs_n[None, :] * sB_n,
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # (Q, BLOCK_N)
            Cc = tl.load(C_ptr + bi * sC_b + t[:, None] * sC_l + gi * sC_g + offs_n[None, :] * sC_n,
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # (Q, BLOCK_N)

            cs = tl.cumsum(dt * A, axis=0)           # (Q,) cumulative log decay inside the chunk
            cs_last = tl.sum(tl.where(offs_q == Q - 1, cs, 0.0), axis=0)  # scalar
            # 1. intra-chunk: clamp the exponent to <= 0 before exp, mask after (inf * 0 = NaN)
            seg = tl.minimum(cs[:, None] - cs[None, :], 0.0)           # (Q, Q)
            Lmat = tl.where(causal, tl.exp(seg), 0.0)                  # (Q, Q)
            if IEEE:
                CB = tl.dot(Cc, tl.trans(Bc), input_precision="ieee")  # (Q, Q)
            else:
                CB = tl.dot(Cc, tl.trans(Bc))
            M = CB * Lmat * dt[None, :]                                # (Q, Q)
            # 4. state to output (state entering this chunk)
            if IEEE:
                y = tl.dot(M, x, input_precision="ieee")               # (Q, BLOCK_P)
                y_off = tl.dot(Cc, tl.trans(state), input_precision="ieee")  # (Q, BLOCK_P)
            else:
                y = tl.dot(M, x)
                y_off = tl.dot(Cc, tl.trans(state))
            y += tl.exp(cs)[:, None] * y_off
            if HAS_D:
                y += Dh * x
            tl.store(y_ptr + bi * sy_b + t[:, None] * sy_l + hi * sy_h + offs_p[None, :] * sy_p,
                     y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])
            # 2 + 3. chunk state and state passing: H <- exp(cs_last) H + sum_j w_j dt_j x_j B_j^T
            w = tl.exp(tl.minimum(cs_last - cs, 0.0)) * dt             # (Q,)
            xw = x * w[:, None]                                        # (Q, BLOCK_P)
            if IEEE:
                S = tl.dot(tl.trans(xw), Bc, input_precision="ieee")   # (BLOCK_P, BLOCK_N)
            else:
                S = tl.dot(tl.trans(xw), Bc)
            state = tl.exp(cs_last) * state + S

        tl.store(hT_ptr + h_off, state, mask=h_mask)


def _ssd_triton_forward(x, dt, A, B, C, D, initial_state, chunk_size):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = max(16, triton.next_power_of_2(int(chunk_size)))      # tl.dot wants tiles >= 16
    BLOCK_N = max(16, triton.next_power_of_2(N))
    BLOCK_P = min(64, max(16, triton.next_power_of_2(P)))
    y = torch.empty_like(x)
    hT = torch.empty(b, H, P, N, device=x.device, dtype=torch.float32)
    h0 = initial_state if initial_state is not None else hT   # dummy pointer when absent
    Dp = D if D is not None else A                             # dummy pointer when absent
    grid = (b * H, triton.cdiv(P, BLOCK_P))
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, Dp, h0, y, hT,
        L, H, P, N, H // G,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(), *hT.stride(),
        HAS_D=D is not None, HAS_H0=initial_state is not None, IEEE=x.dtype == torch.float32,
        Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    return y, hT


class _SSDTriton(torch.autograd.Function):
    """Forward: the Triton scan. Backward: recompute through ssd_chunked under autograd."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state)
        ctx.chunk_size = chunk_size
        y, hT = _ssd_triton_forward(x, dt, A, B, C, D, initial_state, chunk_size)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in ctx.saved_tensors]
        with torch.enable_grad():
            y, hT = ssd_chunked(*inputs, chunk_size=ctx.chunk_size)
            wrt = [t for t in inputs if t is not None and t.requires_grad]
            outs, grads_out = [y], [dy]
            if dhT is not None:
                outs.append(hT)
                grads_out.append(dhT)
            grads = iter(torch.autograd.grad(outs, wrt, grads_out, allow_unused=True)) if wrt else iter(())
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None)


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The fused Triton chunked scan (forward) with backward by recompute through ssd_chunked.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (float32/float16 there)."""
    if triton is None:
        raise RuntimeError("ssd_triton needs the triton package (pip install triton)")
    _check_inputs(x, dt, A, B, C, D, initial_state)
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ssd_triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    h0 = initial_state.contiguous().float() if initial_state is not None else None
    return _SSDTriton.apply(x, dt, A, B, C, D, h0, chunk_size)


# ----------------------------------------------------------------------------------------------
# Dispatch.

IMPLS = {"naive": ssd_naive, "chunked": ssd_chunked, "triton": ssd_triton}


def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64, impl="auto"):
    """SSD forward. impl: "auto" (Triton on CUDA tensors, ssd_chunked otherwise), "naive",
    "chunked" or "triton"."""
    if impl == "auto":
        impl = "triton" if (x.is_cuda and triton is not None) else "chunked"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of 'auto', {', '.join(map(repr, IMPLS))}; got {impl!r}")
    return IMPLS[impl](x, dt, A, B, C, D=D, initial_state=initial_state, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# Self-check and speed table.

def random_inputs(b=2, L=100, H=4, P=8, G=2, N=16, dtype=torch.float32, device="cpu", seed=0,
                  with_D=True, with_state=True):
    """Random SSD inputs with realistic ranges (dt in [1e-3, 0.1] after softplus, A in [-16, -1])."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = r(b, L, H, P)
    dt = F.softplus(r(b, L, H) - 3.0)
    A = -torch.empty(H).uniform_(1.0, 16.0, generator=g)
    B, C = r(b, L, G, N) / math.sqrt(N), r(b, L, G, N) / math.sqrt(N)
    D = r(H) if with_D else None
    h0 = r(b, H, P, N) if with_state else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(dt), cast(A), cast(B), cast(C), cast(D), cast(h0)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _time(fn, repeats=3):
    fn()                                             # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def check():
    """Every implementation against ssd_naive (float64) on random inputs; print a table."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inputs64 = random_inputs(b=2, L=200, H=4, P=16, G=2, N=16, dtype=torch.float64)
    y_ref, h_ref = ssd_naive(*inputs64)
    rows = [("naive", "float64", "cpu", lambda: ssd_naive(*inputs64))]
    rows.append(("chunked", "float64", "cpu", lambda: ssd_chunked(*inputs64, chunk_size=64)))
    inputs32 = [t.float() for t in inputs64]
    rows.append(("chunked", "float32", "cpu", lambda: ssd_chunked(*inputs32, chunk_size=64)))
    if triton is not None and (dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        inputs_dev = [t.float().to(dev) for t in inputs64]
        rows.append(("triton", "float32", dev, lambda: ssd_triton(*inputs_dev, chunk_size=64)))
    print(f"{'impl':<8} {'dtype':<8} {'device':<6} {'rel err y':>10} {'rel err h':>10} {'time ms':>9}")
    for name, dtype, device, fn in rows:
        y, h = fn()
        ms = _time(fn, repeats=1 if name == "naive" else 3) * 1e3
        print(f"{name:<8} {dtype:<8} {device:<6} {rel_err(y.cpu(), y_ref):>10.2e} {rel_err(h.cpu(), h_ref):>10.2e} {ms:>9.2f}")
    if len(rows) == 3:
        print("(triton skipped: no CUDA device; set TRITON_INTERPRET=1 to run it on the CPU)")


def bench(lengths=(1024, 4096, 16384, 65536), H=8, P=64, N=64, chunk_size=64):
    """ssd_chunked forward vs causal SDPA with the same heads and head dim, float32, b = 1."""
    torch.manual_seed(0)
    print(f"b=1 H={H} P=N={N} float32 Q={chunk_size}, threads={torch.get_num_threads()}")
    print(f"{'L':>7} {'chunked ms':>11} {'sdpa ms':>10} {'sdpa/chunked':>13}")
    times = {}
    for L in lengths:
        x, dt, A, B, C, D, _ = random_inputs(b=1, L=L, H=H, P=P, G=1, N=N, with_state=False, seed=L)
        tc = _time(lambda: ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size))
        q = torch.randn(1, H, L, P)
        ts = _time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), repeats=1 if L > 16384 else 3)
        times[L] = (tc, ts)
        print(f"{L:>7} {tc * 1e3:>11.1f} {ts * 1e3:>10.1f} {ts / tc:>12.1f}x")
    if 16384 in times and 65536 in times:
        print(f"chunked growth 16K -> 64K: {times[65536][0] / times[16384][0]:.2f}x (linear would be 4x)")
    return times


def main():
    p = argparse.ArgumentParser(description="Check the SSD implementations against the token loop, or time them.")
    p.add_argument("--bench", action="store_true", help="time ssd_chunked against causal SDPA across L")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="lengths for --bench")
    args = p.parse_args()
    if args.bench:
        bench(tuple(args.lengths))
    else:
        check()


if __name__ == "__main__":
    main()

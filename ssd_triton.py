"""The SSD operator of ssd.py in Triton: the paper's chunked steps as kernels, forward and backward.

mmMamba (arXiv 2502.13145, Sec. 3.1) runs the Mamba-2 SSD through mamba_ssm's
`mamba_chunk_scan_combined` (https://github.com/hustvl/mmMamba/blob/
85143d03b62a8f8279ef8d019dc01a94674256fb/src/model/linear_attention/mamba2.py#L639-L652). ssd.py
defines the operator, its letters and the chunked steps 1-4; `ssd_triton` has ssd_chunked's
signature. One kernel per step, its docstring the step's equation: _chunk_states_kernel (2;
TRANSPOSE: the adjoint of 4), _pass_states_kernel (3; REVERSE: its adjoint), _chunk_outputs_kernel
(1 + 4), _chunk_bwd_kernel and _chunk_bwd_dBdC_kernel (the adjoints of 1, 2, 4). Every kernel
recomputes cs, the cumulative log decay inside a chunk, from dt and A.
The backward recomputes steps 2 and 3 rather than saving the states entering the chunks (2.15 GB
per layer at 128K tokens of HoVLE's shape), as mamba_ssm v2.2.4 does (the official code's version):
https://github.com/state-spaces/mamba/blob/95d8aba8a8c75aedcaa6143713b11e745e7cd0d9/mamba_ssm/ops/
triton/ssd_combined.py#L380-L384. Sums over a group's heads (GQA) and over chunks are in PyTorch.
Numerics: float32 accumulation, cumsums and states. 16-bit inputs go into the dots in their dtype
(mamba_ssm casts the state to C's dtype: .../mamba_ssm/ops/triton/ssd_chunk_scan.py#L111 at the
same commit); float32 inputs use 3xTF32 (tensor cores, ~float32 accuracy; IEEE float32 dots
compile to spilled scalar code). Exponents are clamped to <= 0 before exp, masks applied after it
(inf * 0 = NaN); offsets are int64; strides are passed in (non-contiguous inputs are read in
place); L need not be a multiple of Q (the tail is masked, dt = 0 there); Q is rounded up to a
power of two >= 16. Sums over P tiles are float32 atomic adds (run-to-run rounding differences).
Tiles and warps per kernel and GPU: TILES. Anchors: mamba_ssm's ssd_chunk_state.py,
ssd_state_passing.py, ssd_chunk_scan.py at that commit.

Tests: python -m pytest -q tests/test_ssd_triton.py (every step, outputs and gradients, float32,
float16, bfloat16 against float64, in Triton's CPU interpreter: TRITON_INTERPRET=1 from
tests/conftest.py); tests/test_triton_compile.py (sm_80, sm_90 builds), tests/test_ssd_gpu.py (GPU).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ssd import check_inputs

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}     # else float32 dot operands

# (BLOCK_P, BLOCK_N, num_warps, num_stages) of the per-chunk kernels by dot operand bits and GPU
# generation (8: A100, 9: H100 and later); None: the whole (padded) dimension. Chosen by compiling
# for sm_80 and sm_90 at HoVLE's shape (Q = 64, P = N = 128): shared memory within the GPU's limit,
# no spills for 16-bit inputs (float32: 16 bytes in one kernel); tests/test_triton_compile.py.
TILES = {
    ("states", 16, 8): (64, None, 4, 1), ("states", 16, 9): (64, None, 4, 1),
    ("states", 32, 8): (32, None, 8, 1), ("states", 32, 9): (64, None, 4, 1),
    ("outputs", 16, 8): (64, 32, 8, 1), ("outputs", 16, 9): (64, 64, 8, 1),
    ("outputs", 32, 8): (64, 32, 8, 1), ("outputs", 32, 9): (64, 32, 8, 1),
    ("bwd", 16, 8): (32, 32, 8, 2), ("bwd", 16, 9): (64, 32, 8, 1),
    ("bwd", 32, 8): (16, 32, 8, 1), ("bwd", 32, 9): (32, 16, 8, 1),
    ("bwd_dBdC", 16, 8): (32, 32, 8, 1), ("bwd_dBdC", 16, 9): (64, 64, 8, 1),
    ("bwd_dBdC", 32, 8): (32, 16, 8, 2), ("bwd_dBdC", 32, 9): (16, 32, 8, 1),
}


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with float32 accumulation, the operands rounded to DOT (16-bit), or 3xTF32 for float32.
    The interpreter reads bfloat16 operands as integers: it multiplies the rounded values in float32
    (the same products, exact in float32)."""
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    elif _INTERPRET:
        return tl.dot(a.to(DOT).to(tl.float32), b.to(DOT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT), b.to(DOT))


@triton.jit
def _program(dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h,
             Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A per-chunk program's (batch bi, head hi, chunk k) from its grid (b*H, c, P tiles), int64
    (offsets pass 2^31 at long L); its chunk's token indices t (Q,), their mask, dt (Q,) (0 past L),
    the cumulative log decay cs (Q,) inside the chunk and cs_last, float32; the offsets of its tile
    of the grid's third axis (BLOCK_P) and arange(BLOCK_N)."""
    bh = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    pp = tl.program_id(2).to(tl.int64)
    bi = bh // H
    hi = bh % H
    t = k * Q + tl.arange(0, Q)                                                   # (Q,) int64
    mask_t = t < L
    dt = tl.load(dt_ptr + bi * sdt_b + t * sdt_l + hi * sdt_h, mask=mask_t, other=0.0)
    dt = dt.to(tl.float32)                                                        # (Q,)
    cs = tl.cumsum(dt * tl.load(A_ptr + hi).to(tl.float32), axis=0)             # (Q,)
    cs_last = tl.sum(tl.where(tl.arange(0, Q) == Q - 1, cs, 0.0), axis=0)         # scalar
    offs_p = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    return bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, tl.arange(0, BLOCK_N)


@triton.jit
def _tile(ptr, bi, t, mask_t, head, offs, n, s_b, s_l, s_h, s_e, DOT: tl.constexpr):
    """ptr[bi, t, head, offs] as a (Q, BLOCK) tile in the dot dtype, zero past L and past n."""
    ptrs = ptr + bi * s_b + t[:, None] * s_l + head * s_h + offs[None, :] * s_e
    return tl.load(ptrs, mask=mask_t[:, None] & (offs[None, :] < n), other=0.0).to(DOT)


@triton.jit
def _state(base, offs_p, offs_n, P, N):
    """A (BLOCK_P, BLOCK_N) float32 tile of a contiguous (P, N) state at base, zero past P, N."""
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    return tl.load(base + offs_p[:, None] * N + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def _chunk_states_kernel(u_ptr, v_ptr, dt_ptr, A_ptr, out_ptr, cs_last_ptr, L, H, P, N, n_chunks,
                         Ru, Rv, su_b, su_l, su_h, su_p, sv_b, sv_l, sv_g, sv_n,
                         sdt_b, sdt_l, sdt_h, TRANSPOSE: tl.constexpr, DOT: tl.constexpr,
                         Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step 2 (u = x, v = B): S_k = sum_j exp(cs_last - cs_j) dt_j u_j v_j^T. TRANSPOSE, the adjoint
    of step 4 (u = dy, v = C): dH_k = sum_i exp(cs_i) u_i v_i^T. Also writes cs_last (b, c, H)."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(
        dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q, BLOCK_P, BLOCK_N)
    if TRANSPOSE:
        w = tl.exp(cs)                                                            # (Q,)
    else:
        w = tl.exp(tl.minimum(cs_last - cs, 0.0)) * dt                            # (Q,)
    u = _tile(u_ptr, bi, t, mask_t, hi // Ru, offs_p, P, su_b, su_l, su_h, su_p, DOT)  # (Q, BP)
    v = _tile(v_ptr, bi, t, mask_t, hi // Rv, offs_n, N, sv_b, sv_l, sv_g, sv_n, DOT)  # (Q, BN)
    S = _dot(tl.trans(u * w[:, None]), v, DOT)  # (BP, BN)
    row = (bi * n_chunks + k) * H + hi                                           # (b, c, H)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    tl.store(out_ptr + row * P * N + offs_p[:, None] * N + offs_n[None, :], S, mask=mask)
    tl.store(cs_last_ptr + row, cs_last, mask=tl.program_id(2) == 0)              # once per chunk


@triton.jit
def _pass_states_kernel(S_ptr, cs_last_ptr, h0_ptr, out_ptr, final_ptr, n_chunks, H, PN,
                        HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Step 3 on a tile of BLOCK state entries, sequential over chunks: out[k] = h (the state
    entering chunk k), h <- exp(cs_last_k) h + S_k; final = h. REVERSE walks k = c-1 .. 0 (the
    adjoint). S, out (b, c, H, P*N) and h0, final (b, H, P*N) are contiguous; out may be S."""
    bh = tl.program_id(0).to(tl.int64)
    bi = bh // H
    hi = bh % H
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)           # (BLOCK,)
    mask = offs < PN
    if HAS_H0:
        h = tl.load(h0_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_chunks):
        if REVERSE:
            k = n_chunks - 1 - i
        else:
            k = i
        row = (bi * n_chunks + k) * H + hi
        s = tl.load(S_ptr + row * PN + offs, mask=mask, other=0.0)                # (BLOCK,)
        tl.store(out_ptr + row * PN + offs, h, mask=mask)
        h = tl.exp(tl.load(cs_last_ptr + row)) * h + s
    tl.store(final_ptr + bh * PN + offs, h, mask=mask)


@triton.jit
def _chunk_outputs_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, Hin_ptr, y_ptr,
                          L, H, P, N, n_chunks, Rx, RB, RC, sx_b, sx_l, sx_h, sx_p,
                          sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                          sy_b, sy_l, sy_h, sy_p, HAS_D: tl.constexpr, DOT: tl.constexpr,
                          Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Steps 1 + 4 (+ D skip) for chunk k and one P tile, a loop over N tiles: y_i = sum_{j<=i}
    (C_i.B_j) exp(cs_i - cs_j) dt_j x_j + exp(cs_i) H_k C_i + D x_i, with H_k (b, c, H, P, N)
    float32, the state entering chunk k."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(
        dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q, BLOCK_P, BLOCK_N)
    offs_q = tl.arange(0, Q)
    base = ((bi * n_chunks + k) * H + hi) * P * N
    CB = tl.zeros((Q, Q), dtype=tl.float32)            # C_i . B_j
    CH = tl.zeros((Q, BLOCK_P), dtype=tl.float32)      # H_k C_i
    for n0 in range(0, N, BLOCK_N):                    # the sums over N, a tile at a time
        offs = n0 + offs_n                                                        # (BLOCK_N,)
        Cc = _tile(C_ptr, bi, t, mask_t, hi // RC, offs, N, sC_b, sC_l, sC_g, sC_n, DOT)  # (Q, BN)
        Bc = _tile(B_ptr, bi, t, mask_t, hi // RB, offs, N, sB_b, sB_l, sB_g, sB_n, DOT)  # (Q, BN)
        CB += _dot(Cc, tl.trans(Bc), DOT)
        CH += _dot(Cc, tl.trans(_state(Hin_ptr + base, offs_p, offs, P, N)), DOT)
    causal = offs_q[:, None] >= offs_q[None, :]                                   # (Q, Q)
    E = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)  # (Q, Q) i <- j
    x = _tile(x_ptr, bi, t, mask_t, hi // Rx, offs_p, P, sx_b, sx_l, sx_h, sx_p, DOT)  # (Q, BP)
    y = _dot(CB * E * dt[None, :], x, DOT)                                       # 1. diagonal
    y += tl.exp(cs)[:, None] * CH                                                 # 4. state
    if HAS_D:
        y += tl.load(D_ptr + hi).to(tl.float32) * x                               # (Q, BLOCK_P)
    ptrs = y_ptr + bi * sy_b + t[:, None] * sy_l + hi * sy_h + offs_p[None, :] * sy_p
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_p[None, :] < P))


@triton.jit
def _chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, Hin_ptr, G_ptr, dy_ptr,
                      dx_ptr, ddt_ptr, dcs_ptr, dcs_last_ptr, dD_ptr, L, H, P, N, n_chunks,
                      Rx, RB, RC, sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h,
                      sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sy_b, sy_l, sy_h, sy_p,
                      HAS_D: tl.constexpr, DOT: tl.constexpr, Q: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The adjoint of steps 1, 2 and 4 for chunk k and one P tile (a loop over N tiles), given dy,
    H_k (the state entering) and G_k (the gradient of the state leaving): writes dx (b, L, H, P)
    per head and adds this P tile's part of d(dt), d(cs) (b, L, H), d(cs_last), dD (b, c, H)
    (zeroed buffers, float32 atomic adds). _chunk_bwd_dBdC_kernel does the rest."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(
        dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q, BLOCK_P, BLOCK_N)
    offs_q = tl.arange(0, Q)
    base = ((bi * n_chunks + k) * H + hi) * P * N
    CB = tl.zeros((Q, Q), dtype=tl.float32)            # C_i . B_j
    CH = tl.zeros((Q, BLOCK_P), dtype=tl.float32)      # H_k C_i
    BG = tl.zeros((Q, BLOCK_P), dtype=tl.float32)      # G_k B_j
    GH = 0.0                                           # <G_k, H_k>
    for n0 in range(0, N, BLOCK_N):                    # the sums over N, a tile at a time
        offs = n0 + offs_n                                                        # (BLOCK_N,)
        Bc = _tile(B_ptr, bi, t, mask_t, hi // RB, offs, N, sB_b, sB_l, sB_g, sB_n, DOT)  # (Q, BN)
        Cc = _tile(C_ptr, bi, t, mask_t, hi // RC, offs, N, sC_b, sC_l, sC_g, sC_n, DOT)  # (Q, BN)
        Hk = _state(Hin_ptr + base, offs_p, offs, P, N)                           # (BP, BN)
        G = _state(G_ptr + base, offs_p, offs, P, N)                              # (BP, BN)
        CB += _dot(Cc, tl.trans(Bc), DOT)
        CH += _dot(Cc, tl.trans(Hk), DOT)
        BG += _dot(Bc, tl.trans(G), DOT)
        GH += tl.sum(G * Hk)
    x = _tile(x_ptr, bi, t, mask_t, hi // Rx, offs_p, P, sx_b, sx_l, sx_h, sx_p, DOT)  # (Q, BP)
    dy = _tile(dy_ptr, bi, t, mask_t, hi, offs_p, P, sy_b, sy_l, sy_h, sy_p, DOT)     # (Q, BLOCK_P)
    # 1. diagonal block: y_i += sum_j W_ij dt_j x_j, W = (C B^T) * E
    causal = offs_q[:, None] >= offs_q[None, :]
    E = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)  # (Q, Q) i <- j
    W = CB * E                                                                    # (Q, Q)
    Wd = W * _dot(dy, tl.trans(x), DOT)                                           # (Q, Q)
    ddt = tl.sum(Wd, axis=0)                                                      # (Q,)
    T = Wd * dt[None, :]                                                          # d(cs_i - cs_j)
    dcs = tl.sum(T, axis=1) - tl.sum(T, axis=0)                                   # (Q,)
    # 2. chunk state: leaving state += sum_j w_j x_j B_j^T, w_j = exp(cs_last - cs_j) dt_j
    wdec = tl.exp(tl.minimum(cs_last - cs, 0.0))                                  # (Q,)
    w = wdec * dt                                                                 # (Q,)
    dw = tl.sum(x * BG, axis=1)                                                   # (Q,)
    ddt += wdec * dw
    dcs -= w * dw
    dx = dt[:, None] * _dot(tl.trans(W), dy, DOT) + w[:, None] * BG              # (Q, BLOCK_P)
    row = (bi * L + t) * H + hi                                                   # (Q,)  (b, L, H)
    part = (bi * n_chunks + k) * H + hi                                           # (b, c, H)
    if HAS_D:
        dx += tl.load(D_ptr + hi).to(tl.float32) * dy
        tl.atomic_add(dD_ptr + part, tl.sum(tl.sum(dy.to(tl.float32) * x, axis=1), axis=0))
    tl.store(dx_ptr + row[:, None] * P + offs_p[None, :], dx,
             mask=mask_t[:, None] & (offs_p[None, :] < P))
    # 4. state to output: y_i += exp(cs_i) H_k C_i
    dcs += tl.exp(cs) * tl.sum(dy * CH, axis=1)
    tl.atomic_add(ddt_ptr + row, ddt, mask=mask_t)
    tl.atomic_add(dcs_ptr + row, dcs, mask=mask_t)
    # 3. (its cs_last part) leaving state += exp(cs_last) H_k
    dcs_last = tl.sum(w * dw, axis=0) + tl.exp(cs_last) * GH
    tl.atomic_add(dcs_last_ptr + part, dcs_last)


@triton.jit
def _chunk_bwd_dBdC_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Hin_ptr, G_ptr, dy_ptr,
                           dB_ptr, dC_ptr, ddt_ptr, dcs_ptr, dcs_last_ptr, dA_ptr,
                           L, H, P, N, n_chunks, Rx, RB, RC, sx_b, sx_l, sx_h, sx_p,
                           sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                           sy_b, sy_l, sy_h, sy_p, DOT: tl.constexpr, Q: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rest of the adjoint for chunk k and one N tile (grid (b*H, c, N tiles)), a loop over P:
    dB, dC (b, L, H, N) per head; then, once per chunk, d(a) = the reverse cumsum of d(cs) (complete
    after _chunk_bwd_kernel), d(dt) += d(a) A, and dA (b, c, H) to be summed over chunks."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_n, offs_p = _program(
        dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q, BLOCK_N, BLOCK_P)   # N tiles on the grid
    offs_q = tl.arange(0, Q)
    base = ((bi * n_chunks + k) * H + hi) * P * N
    dyx = tl.zeros((Q, Q), dtype=tl.float32)           # dy_i . x_j
    dyH = tl.zeros((Q, BLOCK_N), dtype=tl.float32)     # dy_i H_k
    xG = tl.zeros((Q, BLOCK_N), dtype=tl.float32)      # x_j G_k
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + offs_p                                                        # (BLOCK_P,)
        x = _tile(x_ptr, bi, t, mask_t, hi // Rx, offs, P, sx_b, sx_l, sx_h, sx_p, DOT)  # (Q, BP)
        dy = _tile(dy_ptr, bi, t, mask_t, hi, offs, P, sy_b, sy_l, sy_h, sy_p, DOT)     # (Q, BP)
        dyx += _dot(dy, tl.trans(x), DOT)
        dyH += _dot(dy, _state(Hin_ptr + base, offs, offs_n, P, N), DOT)
        xG += _dot(x, _state(G_ptr + base, offs, offs_n, P, N), DOT)
    causal = offs_q[:, None] >= offs_q[None, :]
    E = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)  # (Q, Q) i <- j
    dW = dyx * dt[None, :] * E                                                    # d(C_i . B_j)
    w = tl.exp(tl.minimum(cs_last - cs, 0.0)) * dt                                # (Q,)
    Bc = _tile(B_ptr, bi, t, mask_t, hi // RB, offs_n, N, sB_b, sB_l, sB_g, sB_n, DOT)  # (Q, BN)
    Cc = _tile(C_ptr, bi, t, mask_t, hi // RC, offs_n, N, sC_b, sC_l, sC_g, sC_n, DOT)  # (Q, BN)
    row = (bi * L + t) * H + hi                                                   # (Q,)  (b, L, H)
    mask_n = mask_t[:, None] & (offs_n[None, :] < N)
    dC = _dot(dW, Bc, DOT) + tl.exp(cs)[:, None] * dyH                            # (Q, BLOCK_N)
    tl.store(dC_ptr + row[:, None] * N + offs_n[None, :], dC, mask=mask_n)
    dB = _dot(tl.trans(dW), Cc, DOT) + w[:, None] * xG                            # (Q, BLOCK_N)
    tl.store(dB_ptr + row[:, None] * N + offs_n[None, :], dB, mask=mask_n)
    if tl.program_id(2) == 0:                          # once per chunk: cs = cumsum(a), a = dt A
        part = (bi * n_chunks + k) * H + hi                                       # (b, c, H)
        dcs = tl.load(dcs_ptr + row, mask=mask_t, other=0.0)                      # (Q,)
        dcs += tl.where(offs_q == Q - 1, tl.load(dcs_last_ptr + part), 0.0)
        da = tl.cumsum(dcs, axis=0, reverse=True)      # d(a_t) = sum_{i >= t} d(cs_i)
        A = tl.load(A_ptr + hi).to(tl.float32)
        ddt = tl.load(ddt_ptr + row, mask=mask_t, other=0.0) + da * A
        tl.store(ddt_ptr + row, ddt, mask=mask_t)
        tl.store(dA_ptr + part, tl.sum(da * dt, axis=0))


# ----------------------------------------------------------------------------------------------
# Launchers

def _capability(device: torch.device) -> int:
    """The GPU generation TILES are chosen for: 8 (A100 and older), 9 (H100 and later)."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9
    return min(max(major, 8), 9)


class _Sizes:
    """Sizes of one call: b L H P N, x/B/C heads per group (Rx, RB, RC), Q, c, the dot dtype."""

    def __init__(self, x, dt, B, C, chunk_size):
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.b, self.L, _, self.P = x.shape
        self.H = dt.shape[2]
        self.N = B.shape[3]
        self.Rx = self.H // x.shape[2]
        self.RB = self.H // B.shape[2]
        self.RC = self.H // C.shape[2]
        self.Q = max(16, triton.next_power_of_2(int(chunk_size)))     # tl.dot tiles are >= 16
        self.c = triton.cdiv(self.L, self.Q)
        self.dot = _DOT.get(x.dtype, tl.float32)
        self.arch = _capability(x.device)

    def tiles(self, kernel: str) -> tuple[int, int, dict]:
        """A per-chunk kernel's numbers of P and N tiles and its meta-parameters: the tiles of TILES
        (None: the whole padded size), warps and stages."""
        block_p, block_n, warps, stages = TILES[(kernel, self.dot.primitive_bitwidth, self.arch)]
        pad_p = max(16, triton.next_power_of_2(self.P))
        pad_n = max(16, triton.next_power_of_2(self.N))
        block_p = min(block_p or pad_p, pad_p)
        block_n = min(block_n or pad_n, pad_n)
        meta = dict(DOT=self.dot, Q=self.Q, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps,
                    num_stages=stages)
        return triton.cdiv(self.P, block_p), triton.cdiv(self.N, block_n), meta


def _launch(kernel, grid, *args, **meta):
    if all(g > 0 for g in grid):  # an empty grid (L = 0 or b = 0) launches nothing
        kernel[grid](*args, **meta)


def _states(u, v, dt, A, z, transpose=False):
    """Step 2 (or, transpose, the adjoint of step 4): (b, c, H, P, N) float32, cs_last (b, c, H)."""
    out = torch.empty(z.b, z.c, z.H, z.P, z.N, device=u.device, dtype=torch.float32)
    cs_last = torch.empty(z.b, z.c, z.H, device=u.device, dtype=torch.float32)
    nP, _, meta = z.tiles("states")
    _launch(_chunk_states_kernel, (z.b * z.H, z.c, nP), u, v, dt, A, out, cs_last,
            z.L, z.H, z.P, z.N, z.c, z.H // u.shape[2], z.H // v.shape[2],
            *u.stride(), *v.stride(), *dt.stride(), TRANSPOSE=transpose, **meta)
    return out, cs_last


def _pass(S, cs_last, h0, reverse=False):
    """Step 3 (reverse: its adjoint) IN PLACE over S (b, c, H, P, N) contiguous float32; returns
    (S now holding the state entering each chunk, the final state (b, H, P, N) float32)."""
    b, c, H, P, N = S.shape
    final = torch.empty(b, H, P, N, device=S.device, dtype=torch.float32)
    BLOCK = min(1024, triton.next_power_of_2(max(P * N, 16)))
    if h0 is not None:
        h0 = h0.float().contiguous()
    _launch(_pass_states_kernel, (b * H, triton.cdiv(P * N, BLOCK)), S, cs_last,
            final if h0 is None else h0, S, final, c, H, P * N,
            HAS_H0=h0 is not None, REVERSE=reverse, BLOCK=BLOCK)
    return S, final


def _outputs(x, dt, A, B, C, D, H_in, z):
    """Steps 1 + 4 (+ D): y (b, L, H, P) in x's dtype."""
    y = torch.empty(z.b, z.L, z.H, z.P, device=x.device, dtype=x.dtype)
    nP, _, meta = z.tiles("outputs")
    _launch(_chunk_outputs_kernel, (z.b * z.H, z.c, nP), x, dt, A, B, C, A if D is None else D,
            H_in, y, z.L, z.H, z.P, z.N, z.c, z.Rx, z.RB, z.RC, *x.stride(), *dt.stride(),
            *B.stride(), *C.stride(), *y.stride(), HAS_D=D is not None, **meta)
    return y


def _group(t, R):
    """Sum a per-head gradient (b, L, H, .) over the R heads of each group: (b, L, H/R, .)."""
    b, L, H, n = t.shape
    return t.view(b, L, H // R, R, n).sum(3)


def _backward(x, dt, A, B, C, D, H_in, G, dy, z):
    """The adjoint of steps 1, 2, 4 per chunk; the sums over chunks and a group's heads here."""
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(z.b, z.L, z.H, z.P, **f32)
    dB = torch.empty(z.b, z.L, z.H, z.N, **f32)
    dC = torch.empty(z.b, z.L, z.H, z.N, **f32)
    ddt = torch.zeros(z.b, z.L, z.H, **f32)
    dcs = torch.zeros(z.b, z.L, z.H, **f32)
    dcs_last = torch.zeros(z.b, z.c, z.H, **f32)
    dA = torch.empty(z.b, z.c, z.H, **f32)
    dD = torch.zeros(z.b, z.c, z.H, **f32)
    common = (z.L, z.H, z.P, z.N, z.c, z.Rx, z.RB, z.RC, *x.stride(), *dt.stride(), *B.stride(),
              *C.stride(), *dy.stride())
    nP, _, meta = z.tiles("bwd")
    _launch(_chunk_bwd_kernel, (z.b * z.H, z.c, nP), x, dt, A, B, C, A if D is None else D, H_in,
            G, dy, dx, ddt, dcs, dcs_last, dD, *common, HAS_D=D is not None, **meta)
    _, nN, meta = z.tiles("bwd_dBdC")
    _launch(_chunk_bwd_dBdC_kernel, (z.b * z.H, z.c, nN), x, dt, A, B, C, H_in, G, dy,
            dB, dC, ddt, dcs, dcs_last, dA, *common, **meta)
    dD = None if D is None else dD.sum((0, 1)).to(D.dtype)
    return (_group(dx, z.Rx).to(x.dtype), ddt.to(dt.dtype), dA.sum((0, 1)).to(A.dtype),
            _group(dB, z.RB).to(B.dtype), _group(dC, z.RC).to(C.dtype), dD)


class _SSDTriton(torch.autograd.Function):
    """Forward: steps 2, 3, 1+4. Backward: 2 and 3 again, then the adjoints (module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, chunk_size):
        z = _Sizes(x, dt, B, C, chunk_size)
        S, cs_last = _states(x, B, dt, A, z)                     # 2. chunk states
        H_in, hT = _pass(S, cs_last, h0)                         # 3. state passing (over S)
        y = _outputs(x, dt, A, B, C, D, H_in, z)                 # 1 + 4. chunk outputs
        ctx.save_for_backward(x, dt, A, B, C, D, h0)
        ctx.z = z
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, B, C, D, h0 = ctx.saved_tensors
        z = ctx.z
        S, cs_last = _states(x, B, dt, A, z)                         # 2 and 3 recomputed
        H_in, _ = _pass(S, cs_last, h0)
        dH_loc, _ = _states(dy, C, dt, A, z, transpose=True)         # adjoint of 4
        G, dh0 = _pass(dH_loc, cs_last, dhT, reverse=True)           # adjoint of 3 (over dH_loc)
        dx, ddt, dA, dB, dC, dD = _backward(x, dt, A, B, C, D, H_in, G, dy, z)
        return dx, ddt, dA, dB, dC, dD, None if h0 is None else dh0, None


def _check_device(x):
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ssd_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           f"is imported to run on {x.device.type} tensors (Triton's interpreter)")


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """SSD in Triton, the signature and semantics of ssd.ssd_chunked: returns y (b, L, H, P) in x's
    dtype and the final state (b, H, P, N) float32; differentiable (Triton backward). Computed in
    float32 (16-bit dot operands for 16-bit x). chunk_size is rounded up to a power of two >= 16.
    CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    check_inputs(x, dt, A, B, C, D, initial_state)
    _check_device(x)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    D = None if D is None else D.contiguous()
    return _SSDTriton.apply(x, dt, A.contiguous(), B, C, D, h0, int(chunk_size))

"""The SSD operator of ssd.py in Triton: the paper's chunked steps as kernels, forward and backward.

mmMamba (arXiv 2502.13145, Sec. 3.1) runs the Mamba-2 SSD; ssd.py defines it, names the letters
(b L H P N Q c; x dt A B C D; head h reads x head h // (H/Hx), B group h // (H/G), C group
h // (H/Gc)) and numbers the chunked steps (1 diagonal blocks, 2 chunk states, 3 state passing,
4 state to output). Here each step is one kernel; `ssd_triton` has the signature of ssd_chunked.

Forward (cs, the cumulative log decay inside a chunk, is recomputed from dt and A where needed):
  _chunk_states_kernel   step 2   grid (b*H, c, P tiles)  S_k = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T
                                  -> S (b, c, H, P, N) float32 and cs_last (b, c, H)
  _pass_states_kernel    step 3   grid (b*H, P*N tiles)   sequential over the c chunks:
                                  H_{k+1} = exp(cs_last_k) H_k + S_k -> the state entering every chunk
                                  (written over S) and the final state (b, H, P, N) float32
  _chunk_outputs_kernel  1 + 4    grid (b*H, c, P tiles)  y_i = sum_{j<=i} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j
                                  + exp(cs_i) H_k C_i + D x_i -> y (b, L, H, P) in x's dtype
Backward (an autograd.Function; every step's adjoint is a Triton kernel, small sums in PyTorch):
  _chunk_states_kernel, TRANSPOSE   the adjoint of step 4 has the form of step 2:
                                  dH_loc_k = sum_i exp(cs_i) dy_i C_i^T (parallel over chunks)
  _pass_states_kernel, REVERSE      the adjoint of step 3 is step 3 run backwards: G_k (gradient of
                                  the state leaving chunk k) from G_{c-1} = d(final state),
                                  G_{k-1} = dH_loc_k + exp(cs_last_k) G_k; what is left is d(initial_state)
  _chunk_bwd_kernel      1, 2, 4  grid (b*H, c, P tiles)  dx, dB, dC, d(dt) and d(cs) of one chunk from
                                  dy, H_k and G_k; d(cs) -> d(a) by a reverse cumsum inside the chunk,
                                  d(dt) += d(a) A, dA = sum d(a) dt, dD = sum dy x. Sums over P tiles and
                                  over the heads of a group (GQA) are done in PyTorch on per-head buffers.
Numerics: float32 accumulation and cumsums; exponents clamped to <= 0 before exp and masks applied
after it (inf * 0 = NaN); int64 offsets (program ids cast before multiplying strides); strides of
x, dt, B, C, dy passed in (non-contiguous inputs are read in place); L need not be a multiple of Q
(tail tokens are masked, dt = 0 there: no decay, no input). Q is rounded up to a power of two >= 16
(tl.dot tiles). Dots are IEEE float32 for float32 inputs, tf32 for 16-bit inputs.

Anchors (same decomposition, different code): state-spaces/mamba mamba_ssm/ops/triton/ssd_chunk_state.py,
ssd_state_passing.py, ssd_chunk_scan.py; flash-linear-attention chunk_simple_gla.

Tests: python -m pytest -q tests/test_ssd_triton.py (forward, every step and the gradients against float64
references; on the CPU under TRITON_INTERPRET=1, which tests/conftest.py sets) and tests/test_ssd_gpu.py (CUDA,
HoVLE's shapes).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ssd import check_inputs

MAX_BLOCK_P = 64                                     # P tile of the per-chunk kernels (tests lower it)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation: IEEE float32 products, or tf32 for 16-bit inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _chunk_decay(dt_ptr, A_ptr, bi, hi, k, L, s_b, s_l, s_h, Q: tl.constexpr):
    """Chunk k of (batch bi, head hi): token indices t (Q,), their mask, dt (Q,) (0 past L) and the
    cumulative log decay cs (Q,) inside the chunk, float32, and cs_last (scalar)."""
    t = k * Q + tl.arange(0, Q)                                                   # (Q,) int64
    mask_t = t < L
    dt = tl.load(dt_ptr + bi * s_b + t * s_l + hi * s_h, mask=mask_t, other=0.0).to(tl.float32)  # (Q,)
    cs = tl.cumsum(dt * tl.load(A_ptr + hi).to(tl.float32), axis=0)             # (Q,)
    cs_last = tl.sum(tl.where(tl.arange(0, Q) == Q - 1, cs, 0.0), axis=0)         # scalar
    return t, mask_t, dt, cs, cs_last


@triton.jit
def _program(dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A per-chunk program's (batch bi, head hi, chunk k) from its grid (b*H, c, P tiles), as int64 (offsets
    pass 2^31 at long L), its chunk's tokens, dt and decays (_chunk_decay), and its P and N offsets."""
    bh, k, pp = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bi, hi = bh // H, bh % H
    t, mask_t, dt, cs, cs_last = _chunk_decay(dt_ptr, A_ptr, bi, hi, k, L, sdt_b, sdt_l, sdt_h, Q)
    return bi, hi, k, t, mask_t, dt, cs, cs_last, pp * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)


@triton.jit
def _tile(ptr, bi, t, mask_t, head, offs, n, s_b, s_l, s_h, s_e):
    """ptr[bi, t, head, offs] as a float32 (Q, BLOCK) tile, zero past L and past n."""
    return tl.load(ptr + bi * s_b + t[:, None] * s_l + head * s_h + offs[None, :] * s_e,
                   mask=mask_t[:, None] & (offs[None, :] < n), other=0.0).to(tl.float32)


@triton.jit
def _state(base, offs_p, offs_n, P, N):
    """Pointers and mask of a (BLOCK_P, BLOCK_N) tile of a contiguous (P, N) state at base."""
    return base + offs_p[:, None] * N + offs_n[None, :], (offs_p[:, None] < P) & (offs_n[None, :] < N)


@triton.jit
def _chunk_states_kernel(u_ptr, v_ptr, dt_ptr, A_ptr, out_ptr, cs_last_ptr, L, H, P, N, n_chunks, Ru, Rv,
                         su_b, su_l, su_h, su_p, sv_b, sv_l, sv_g, sv_n, sdt_b, sdt_l, sdt_h,
                         TRANSPOSE: tl.constexpr, IEEE: tl.constexpr, Q: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step 2 (u = x, v = B): S_k = sum_j exp(cs_last - cs_j) dt_j u_j v_j^T. TRANSPOSE, the adjoint of
    step 4 (u = dy, v = C): dH_loc_k = sum_i exp(cs_i) u_i v_i^T. Also writes cs_last (b, c, H)."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q,
                                                                      BLOCK_P, BLOCK_N)
    if TRANSPOSE:
        w = tl.exp(cs)                                                            # (Q,)
    else:
        w = tl.exp(tl.minimum(cs_last - cs, 0.0)) * dt                            # (Q,)
    u = _tile(u_ptr, bi, t, mask_t, hi // Ru, offs_p, P, su_b, su_l, su_h, su_p)  # (Q, BLOCK_P)
    v = _tile(v_ptr, bi, t, mask_t, hi // Rv, offs_n, N, sv_b, sv_l, sv_g, sv_n)  # (Q, BLOCK_N)
    S = _dot(tl.trans(u * w[:, None]), v, IEEE)                                   # (BLOCK_P, BLOCK_N)
    ptrs, mask = _state(out_ptr + ((bi * n_chunks + k) * H + hi) * P * N, offs_p, offs_n, P, N)
    tl.store(ptrs, S, mask=mask)
    tl.store(cs_last_ptr + (bi * n_chunks + k) * H + hi, cs_last, mask=tl.program_id(2) == 0)   # once per chunk


@triton.jit
def _pass_states_kernel(S_ptr, cs_last_ptr, h0_ptr, out_ptr, final_ptr, n_chunks, H, PN,
                        HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Step 3 on a tile of BLOCK state entries, sequential over chunks: out[k] = h (the state entering
    chunk k), h <- exp(cs_last_k) h + S_k; final = h. REVERSE walks k = c-1 .. 0 (the adjoint).
    S, out (b, c, H, P*N) and h0, final (b, H, P*N) are contiguous; out may be S (read, then written)."""
    bh, pid = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bi, hi = bh // H, bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)                                      # (BLOCK,)
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
def _chunk_outputs_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, Hin_ptr, y_ptr, L, H, P, N, n_chunks,
                          Rx, RB, RC, sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
                          sC_b, sC_l, sC_g, sC_n, sy_b, sy_l, sy_h, sy_p, HAS_D: tl.constexpr,
                          IEEE: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Steps 1 + 4 (+ D skip) for chunk k: y_i = sum_{j<=i} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j
    + exp(cs_i) H_k C_i + D x_i, with H_k (b, c, H, P, N) contiguous float32, the state entering chunk k."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q,
                                                                      BLOCK_P, BLOCK_N)
    offs_q = tl.arange(0, Q)
    x = _tile(x_ptr, bi, t, mask_t, hi // Rx, offs_p, P, sx_b, sx_l, sx_h, sx_p)    # (Q, BLOCK_P)
    Bc = _tile(B_ptr, bi, t, mask_t, hi // RB, offs_n, N, sB_b, sB_l, sB_g, sB_n)  # (Q, BLOCK_N)
    Cc = _tile(C_ptr, bi, t, mask_t, hi // RC, offs_n, N, sC_b, sC_l, sC_g, sC_n)  # (Q, BLOCK_N)
    ptrs, mask = _state(Hin_ptr + ((bi * n_chunks + k) * H + hi) * P * N, offs_p, offs_n, P, N)
    Hk = tl.load(ptrs, mask=mask, other=0.0)                                      # (BLOCK_P, BLOCK_N)
    causal = offs_q[:, None] >= offs_q[None, :]                                   # (Q, Q)
    E = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)  # (Q, Q) decay i <- j
    M = _dot(Cc, tl.trans(Bc), IEEE) * E * dt[None, :]                           # (Q, Q)
    y = _dot(M, x, IEEE)                                                          # (Q, BLOCK_P) 1. diagonal
    y += tl.exp(cs)[:, None] * _dot(Cc, tl.trans(Hk), IEEE)                      # (Q, BLOCK_P) 4. state
    if HAS_D:
        y += tl.load(D_ptr + hi).to(tl.float32) * x
    tl.store(y_ptr + bi * sy_b + t[:, None] * sy_l + hi * sy_h + offs_p[None, :] * sy_p,
             y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_p[None, :] < P))


@triton.jit
def _chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, Hin_ptr, G_ptr, dy_ptr,
                      dx_ptr, dB_ptr, dC_ptr, ddt_ptr, dA_ptr, dD_ptr, nb, L, H, P, N, n_chunks, Rx, RB, RC,
                      sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
                      sC_b, sC_l, sC_g, sC_n, sy_b, sy_l, sy_h, sy_p, HAS_D: tl.constexpr,
                      IEEE: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The adjoint of steps 1, 2 and 4 for chunk k and one P tile, given dy, H_k (state entering) and
    G_k (gradient of the state leaving). Writes dx per head (b, L, H, P) and, summed over this P tile
    only, dB, dC (nP, b, L, H, N), d(dt) (nP, b, L, H), dA and dD (nP, b, c, H)."""
    bi, hi, k, t, mask_t, dt, cs, cs_last, offs_p, offs_n = _program(dt_ptr, A_ptr, H, L, sdt_b, sdt_l, sdt_h, Q,
                                                                      BLOCK_P, BLOCK_N)
    offs_q = tl.arange(0, Q)
    x = _tile(x_ptr, bi, t, mask_t, hi // Rx, offs_p, P, sx_b, sx_l, sx_h, sx_p)    # (Q, BLOCK_P)
    dy = _tile(dy_ptr, bi, t, mask_t, hi, offs_p, P, sy_b, sy_l, sy_h, sy_p)       # (Q, BLOCK_P)
    Bc = _tile(B_ptr, bi, t, mask_t, hi // RB, offs_n, N, sB_b, sB_l, sB_g, sB_n)  # (Q, BLOCK_N)
    Cc = _tile(C_ptr, bi, t, mask_t, hi // RC, offs_n, N, sC_b, sC_l, sC_g, sC_n)  # (Q, BLOCK_N)
    base = ((bi * n_chunks + k) * H + hi) * P * N
    ptrs, mask = _state(Hin_ptr + base, offs_p, offs_n, P, N)
    Hk = tl.load(ptrs, mask=mask, other=0.0)                                      # (BLOCK_P, BLOCK_N)
    ptrs, mask = _state(G_ptr + base, offs_p, offs_n, P, N)
    G = tl.load(ptrs, mask=mask, other=0.0)                                       # (BLOCK_P, BLOCK_N)

    # 1. diagonal block: y_i += sum_j W_ij dt_j x_j, W = (C B^T) * E
    causal = offs_q[:, None] >= offs_q[None, :]
    E = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)  # (Q, Q)
    W = _dot(Cc, tl.trans(Bc), IEEE) * E                                         # (Q, Q)
    dyx = _dot(dy, tl.trans(x), IEEE)                                             # (Q, Q) <dy_i, x_j>
    dx = dt[:, None] * _dot(tl.trans(W), dy, IEEE)                                # (Q, BLOCK_P)
    ddt = tl.sum(W * dyx, axis=0)                                                 # (Q,)
    dW = dyx * dt[None, :] * E                                                    # (Q, Q) d(C_i.B_j)
    dC = _dot(dW, Bc, IEEE)                                                       # (Q, BLOCK_N)
    dB = _dot(tl.trans(dW), Cc, IEEE)                                             # (Q, BLOCK_N)
    T = W * dyx * dt[None, :]                                                     # (Q, Q) d(cs_i - cs_j)
    dcs = tl.sum(T, axis=1) - tl.sum(T, axis=0)                                   # (Q,)
    # 4. state to output: y_i += exp(cs_i) H_k C_i
    ecs = tl.exp(cs)                                                              # (Q,)
    dC += ecs[:, None] * _dot(dy, Hk, IEEE)                                       # (Q, BLOCK_N)
    dcs += ecs * tl.sum(dy * _dot(Cc, tl.trans(Hk), IEEE), axis=1)                # (Q,)
    # 2. chunk state: leaving state += sum_j w_j x_j B_j^T, w_j = exp(cs_last - cs_j) dt_j
    wdec = tl.exp(tl.minimum(cs_last - cs, 0.0))                                  # (Q,)
    w = wdec * dt                                                                 # (Q,)
    BG = _dot(Bc, tl.trans(G), IEEE)                                              # (Q, BLOCK_P) G B_j
    dx += w[:, None] * BG
    dB += w[:, None] * _dot(x, G, IEEE)                                           # (Q, BLOCK_N)
    dw = tl.sum(x * BG, axis=1)                                                   # (Q,)
    ddt += wdec * dw
    dcs -= w * dw
    # 3. (its cs_last part) leaving state += exp(cs_last) H_k
    dcs_last = tl.sum(w * dw, axis=0) + tl.exp(cs_last) * tl.sum(G * Hk)
    dcs += tl.where(offs_q == Q - 1, dcs_last, 0.0)
    # cs = cumsum(a), a = dt A: d(a_t) = sum_{i >= t} d(cs_i)
    da = tl.cumsum(dcs, axis=0, reverse=True)                                     # (Q,)
    ddt += da * tl.load(A_ptr + hi).to(tl.float32)
    pp = tl.program_id(2).to(tl.int64)
    part = (pp * nb + bi) * n_chunks + k                                          # (P tile, batch, chunk)
    tl.store(dA_ptr + part * H + hi, tl.sum(da * dt, axis=0))
    if HAS_D:
        dx += tl.load(D_ptr + hi).to(tl.float32) * dy
        tl.store(dD_ptr + part * H + hi, tl.sum(tl.sum(dy * x, axis=1), axis=0))
    row = (bi * L + t) * H + hi                                                   # (Q,)  (b, L, H)
    mask_p = mask_t[:, None] & (offs_p[None, :] < P)
    tl.store(dx_ptr + row[:, None] * P + offs_p[None, :], dx, mask=mask_p)
    prow = pp * nb * L * H + row                                                  # (Q,)  (nP, b, L, H)
    tl.store(ddt_ptr + prow, ddt, mask=mask_t)
    mask_n = mask_t[:, None] & (offs_n[None, :] < N)
    tl.store(dB_ptr + prow[:, None] * N + offs_n[None, :], dB, mask=mask_n)
    tl.store(dC_ptr + prow[:, None] * N + offs_n[None, :], dC, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launchers

class _Sizes:
    """Sizes and tiles of one call: b L H P N, x/B/C heads per group (Rx, RB, RC), Q, c, tiles."""

    def __init__(self, x, dt, B, C, chunk_size):
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.b, self.L, _, self.P = x.shape
        self.H, self.N = dt.shape[2], B.shape[3]
        self.Rx, self.RB, self.RC = self.H // x.shape[2], self.H // B.shape[2], self.H // C.shape[2]
        self.Q = max(16, triton.next_power_of_2(int(chunk_size)))     # tl.dot tiles are >= 16
        self.c = triton.cdiv(self.L, self.Q)
        self.BLOCK_N = max(16, triton.next_power_of_2(self.N))
        self.BLOCK_P = min(MAX_BLOCK_P, max(16, triton.next_power_of_2(self.P)))
        self.nP = triton.cdiv(self.P, self.BLOCK_P)
        self.ieee = x.dtype in (torch.float32, torch.float64)
        self.tiles = dict(IEEE=self.ieee, Q=self.Q, BLOCK_P=self.BLOCK_P, BLOCK_N=self.BLOCK_N)


def _launch(kernel, grid, *args, **meta):
    if all(g > 0 for g in grid):                     # an empty grid (L = 0 or b = 0) launches nothing
        kernel[grid](*args, **meta)


def _states(u, v, dt, A, z, transpose=False):
    """Step 2 (or, transpose, the adjoint of step 4): (b, c, H, P, N) float32 and cs_last (b, c, H)."""
    out = torch.empty(z.b, z.c, z.H, z.P, z.N, device=u.device, dtype=torch.float32)
    cs_last = torch.empty(z.b, z.c, z.H, device=u.device, dtype=torch.float32)
    _launch(_chunk_states_kernel, (z.b * z.H, z.c, z.nP), u, v, dt, A, out, cs_last,
            z.L, z.H, z.P, z.N, z.c, z.H // u.shape[2], z.H // v.shape[2],
            *u.stride(), *v.stride(), *dt.stride(), TRANSPOSE=transpose, **z.tiles)
    return out, cs_last


def _pass(S, cs_last, h0, reverse=False):
    """Step 3 (reverse: its adjoint) IN PLACE over S (b, c, H, P, N) contiguous float32; returns
    (S now holding the state entering each chunk, the final state (b, H, P, N) float32)."""
    b, c, H, P, N = S.shape
    final = torch.empty(b, H, P, N, device=S.device, dtype=torch.float32)
    BLOCK = min(1024, triton.next_power_of_2(max(P * N, 16)))
    h0 = None if h0 is None else h0.float().contiguous()
    _launch(_pass_states_kernel, (b * H, triton.cdiv(P * N, BLOCK)), S, cs_last,
            final if h0 is None else h0, S, final, c, H, P * N,
            HAS_H0=h0 is not None, REVERSE=reverse, BLOCK=BLOCK)
    return S, final


def _outputs(x, dt, A, B, C, D, H_in, z):
    """Steps 1 + 4 (+ D): y (b, L, H, P) in x's dtype."""
    y = torch.empty(z.b, z.L, z.H, z.P, device=x.device, dtype=x.dtype)
    _launch(_chunk_outputs_kernel, (z.b * z.H, z.c, z.nP), x, dt, A, B, C, A if D is None else D, H_in, y,
            z.L, z.H, z.P, z.N, z.c, z.Rx, z.RB, z.RC, *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
            *y.stride(), HAS_D=D is not None, **z.tiles)
    return y


def _backward(x, dt, A, B, C, D, H_in, G, dy, z):
    """The adjoint of steps 1, 2, 4 per chunk; the sums over P tiles and over a group's heads here."""
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(z.b, z.L, z.H, z.P, **f32)
    dB, dC = (torch.empty(z.nP, z.b, z.L, z.H, z.N, **f32) for _ in range(2))
    ddt = torch.empty(z.nP, z.b, z.L, z.H, **f32)
    dA, dD = (torch.zeros(z.nP, z.b, z.c, z.H, **f32) for _ in range(2))
    _launch(_chunk_bwd_kernel, (z.b * z.H, z.c, z.nP), x, dt, A, B, C, A if D is None else D, H_in, G, dy,
            dx, dB, dC, ddt, dA, dD, z.b, z.L, z.H, z.P, z.N, z.c, z.Rx, z.RB, z.RC,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), HAS_D=D is not None, **z.tiles)
    group = lambda t, R: t.view(z.b, z.L, z.H // R, R, t.shape[-1]).sum(3)  # (b, L, H, .) -> (b, L, H/R, .)
    return (group(dx, z.Rx).to(x.dtype), ddt.sum(0).to(dt.dtype), dA.sum((0, 1, 2)).to(A.dtype),
            group(dB.sum(0), z.RB).to(B.dtype), group(dC.sum(0), z.RC).to(C.dtype),
            None if D is None else dD.sum((0, 1, 2)).to(D.dtype))


class _SSDTriton(torch.autograd.Function):
    """Forward: steps 2, 3, 1+4. Backward: their adjoints, all in Triton (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, chunk_size):
        z = _Sizes(x, dt, B, C, chunk_size)
        S, cs_last = _states(x, B, dt, A, z)                     # 2. chunk states
        H_in, hT = _pass(S, cs_last, h0)                         # 3. state passing (over S)
        y = _outputs(x, dt, A, B, C, D, H_in, z)                 # 1 + 4. chunk outputs
        ctx.save_for_backward(x, dt, A, B, C, D, H_in)
        ctx.z, ctx.has_h0 = z, h0 is not None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, B, C, D, H_in = ctx.saved_tensors
        z = ctx.z
        dH_loc, cs_last = _states(dy, C, dt, A, z, transpose=True)   # adjoint of 4: sum exp(cs) dy C^T
        G, dh0 = _pass(dH_loc, cs_last, dhT, reverse=True)           # adjoint of 3 (over dH_loc)
        dx, ddt, dA, dB, dC, dD = _backward(x, dt, A, B, C, D, H_in, G, dy, z)
        return dx, ddt, dA, dB, dC, dD, dh0 if ctx.has_h0 else None, None


def _check_device(x):
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"ssd_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                           f"to run on {x.device.type} tensors (Triton's interpreter); got {x.device}")


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """SSD in Triton, the signature and semantics of ssd.ssd_chunked: returns y (b, L, H, P) in x's
    dtype and the final state (b, H, P, N) float32; differentiable (Triton backward). Computed in
    float32, float64 inputs too. chunk_size is rounded up to a power of two >= 16. CUDA tensors, or
    CPU ones under TRITON_INTERPRET=1 (float32/float16 there)."""
    check_inputs(x, dt, A, B, C, D, initial_state)
    _check_device(x)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    D = None if D is None else D.contiguous()
    return _SSDTriton.apply(x, dt, A.contiguous(), B, C, D, h0, int(chunk_size))

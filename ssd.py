"""The Mamba-2 SSD operator (state space duality): the linear-time mixer at the heart of mmMamba.

mmMamba (arXiv 2502.13145, Sec. 3.1-3.2) replaces softmax attention with the selective state space
model of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"; Sec. 6 there is the chunked algorithm).
This file holds the definition and the PyTorch implementations; `ssd_triton.py` holds the GPU
kernels, checked against the functions here.

Letters (one meaning each, in every file of this project):
    b batch   L length   H heads   P head dim   N state size   Q chunk size   c number of chunks
    x   (b, L, Hx, P)  input ("V" in attention terms); head h reads x[:, :, h // (H / Hx)]
    dt  (b, L, H)      step size, >= 0 (the caller applies softplus)
    A   (H,)           decay rate, <= 0; a_t = dt_t * A is the log decay of step t
    B   (b, L, G, N)   input map ("K"); head h reads group h // (H / G)
    C   (b, L, Gc, N)  output map ("Q"); head h reads group h // (H / Gc)
    D   (H,)           optional skip connection
    h   (b, H, P, N)   the state (float32, or float64 for float64 inputs)
Hx, G and Gc must divide H. The mmMamba mixer passes x = V and B = K with the KV-head count and
C = Q with H heads (GQA read by index, nothing repeated in memory on the GPU path).

The recurrence (the definition; `ssd_naive`), per head:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (P, N)
    y_t = h_t C_t + D x_t                               (P,)
Its dual, attention-like form (`implicit_attention`): y_t = sum_{s<=t} M[t, s] x_s with
M[t, s] = (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s. With A = 0 and dt = 1 this is causal linear
attention with q = C, k = B, v = x: no softmax, no 1/sqrt(d), no normaliser; this is why attention
weights can seed it (seed.py).

The chunked form (`ssd_chunked`, the paper's block decomposition) cuts L into chunks of Q tokens;
cs is the cumulative log decay *inside* each chunk (never a difference of one global cumsum, which
loses precision at long L):
    1. diagonal blocks:  Y_diag[i] = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
    2. chunk states:     S_k = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T
    3. state passing:    h_{k+1} = exp(cs_last_k) h_k + S_k   (sequential over chunks, h_0 = h0)
    4. state to output:  Y_off[i] = exp(cs_i) h_k C_i
Reference: state-spaces/mamba `mamba_ssm/modules/ssd_minimal.py` (the same four steps).

Tests: python -m pytest -q tests/test_ssd.py (every implementation against ssd_naive, float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(x, dt, A, B, C, D=None, initial_state=None):
    """Raise ValueError naming the argument unless shapes, dtypes, devices and signs fit the
    glossary; return (b, L, H, P, N)."""
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": initial_state}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', t)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: one device for all")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (b, L, Hx, P), got {tuple(x.shape)}")
    b, L, _, P = x.shape
    if dt.dim() != 3 or dt.shape[:2] != (b, L):
        raise ValueError(f"dt must have shape (b, L, H) = ({b}, {L}, H), got {tuple(dt.shape)}")
    H = dt.shape[2]
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise ValueError(f"B must have shape (b, L, G, N) = ({b}, {L}, G, N), got {tuple(B.shape)}")
    N = B.shape[3]
    if C.dim() != 4 or C.shape[:2] != (b, L) or C.shape[3] != N:
        raise ValueError(f"C must have shape (b, L, Gc, N) = ({b}, {L}, Gc, {N}), got {tuple(C.shape)}")
    for name, t, shape, letters in (("A", A, (H,), "(H,)"), ("D", D, (H,), "(H,)"),
                                    ("initial_state", initial_state, (b, H, P, N), "(b, H, P, N)")):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {letters} = {shape}, got {tuple(t.shape)}")
    for name, n in (("x", x.shape[2]), ("B", B.shape[2]), ("C", C.shape[2])):
        if n == 0 or H % n:
            raise ValueError(f"{name} has {n} heads/groups, but the number of heads H = {H} is no multiple")
    if bool((A > 0).any()):
        raise ValueError(f"A must be <= 0 (a decay), got max(A) = {A.max().item():.4g}")
    if bool((dt < 0).any()):
        raise ValueError(f"dt must be >= 0 (softplus first), got min(dt) = {dt.min().item():.4g}")
    return b, L, H, P, N


def compute_dtype(*ts) -> torch.dtype:
    """float64 if any input is float64, else float32 (16-bit inputs are computed in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in ts):
        return torch.float64
    return torch.float32


def per_head(t: torch.Tensor, H: int, dim: int = 2) -> torch.Tensor:
    """Expand a grouped tensor (..., G, ...) to H heads along `dim`: head h reads group
    h // (H / G)."""
    return t if t.shape[dim] == H else t.repeat_interleave(H // t.shape[dim], dim=dim)


def ssd_naive(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The recurrence, one token at a time: slow and obviously right. `chunk_size` is unused."""
    b, L, H, P, N = check_inputs(x, dt, A, B, C, D, initial_state)
    ct = compute_dtype(x, dt, A, B, C, D, initial_state)
    xh, Bh, Ch = (per_head(t.to(ct), H) for t in (x, B, C))      # (b, L, H, P), (b, L, H, N) x 2
    dt, A = dt.to(ct), A.to(ct)
    h = x.new_zeros(b, H, P, N, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)                            # (b, H)
        inflow = torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], xh[:, t], Bh[:, t])   # dt_t x_t B_t^T
        h = decay[..., None, None] * h + inflow
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))     # (b, H, P)
    y = torch.stack(ys, dim=1) if L else xh.new_zeros(b, 0, H, P)  # (b, L, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * xh
    return y.to(x.dtype), h


def implicit_attention(dt, A, B, C):
    """The dual form as a matrix, the attention the SSD applies implicitly, per head:
    M[b, h, t, s] = (C_t . B_s) exp(dt_{s+1} A + ... + dt_t A) dt_s for s <= t, else 0, so that
    y_t = sum_s M[t, s] x_s is ssd_naive's y (no D, no initial state). dt (b, L, H), A (H,),
    B (b, L, G, N), C (b, L, Gc, N); returns (b, H, L, L) in float32 (float64 for float64 inputs).
    O(L^2) memory: for inspecting what a mixer attends to, not for computing y."""
    b, L, H = dt.shape
    ct = compute_dtype(dt, A, B, C)
    a = (dt.to(ct) * A.to(ct)).transpose(1, 2)                     # (b, H, L) log decay of each step
    causal = torch.ones(L, L, dtype=torch.bool, device=dt.device).tril()     # (t, s): s <= t
    steps = a[..., None].expand(b, H, L, L).masked_fill(~causal.tril(-1), 0)  # [t, s]: a_t if s < t
    decay = torch.exp(steps.cumsum(dim=2)).masked_fill(~causal, 0)  # exp(a_{s+1} + ... + a_t)
    CB = torch.einsum("bthn,bshn->bhts", per_head(C.to(ct), H), per_head(B.to(ct), H))
    return CB * decay * dt.to(ct).transpose(1, 2)[:, :, None, :]   # (b, H, L, L)


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64, block_chunks=16):
    """The four chunked steps in PyTorch: differentiable, the CPU path and the gradient oracle of
    the Triton kernels. Any L (the last chunk is padded with dt = 0: no decay, no input). Chunks go
    `block_chunks` at a time with the state carried between blocks, so the (Q x Q) temporaries stay
    bounded: without autograd, memory beyond y is O(block), not O(L)."""
    b, L, H, P, N = check_inputs(x, dt, A, B, C, D, initial_state)
    ct = compute_dtype(x, dt, A, B, C, D, initial_state)
    Q = int(chunk_size)
    if Q < 1 or block_chunks < 1:
        raise ValueError(f"chunk_size, block_chunks must be >= 1, got {chunk_size}, {block_chunks}")
    pad = (-L) % Q
    c = (L + pad) // Q

    def chunks(t):                                   # (b, L, ...) -> (b, c, Q, ...), zero padded
        t = t.to(ct)
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).reshape(b, c, Q, *t.shape[2:])

    xq = chunks(per_head(x, H))                                  # (b, c, Q, H, P)
    Bq = chunks(per_head(B, H))                                  # (b, c, Q, H, N)
    Cq = chunks(per_head(C, H))                                  # (b, c, Q, H, N)
    dtq = chunks(dt)                                             # (b, c, Q, H)
    A = A.to(ct)
    h = x.new_zeros(b, H, P, N, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for k in range(0, c, block_chunks):              # a block of chunks at a time, carrying h
        blk = slice(k, k + block_chunks)
        x_k, dt_k, B_k, C_k = xq[:, blk], dtq[:, blk], Bq[:, blk], Cq[:, blk]
        cs = torch.cumsum(dt_k * A, dim=2)           # (b, c, Q, H): log decay so far in each chunk
        S = chunk_states(x_k, dt_k, B_k, cs)         # step 2
        h_in, h = pass_states(S, cs[:, :, -1], h)    # step 3: the state entering each chunk
        ys.append(chunk_outputs(x_k, dt_k, B_k, C_k, cs, h_in))   # steps 1 and 4
    y = torch.cat(ys, dim=1).reshape(b, c * Q, H, P)[:, :L] if ys else xq.reshape(b, 0, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * per_head(x.to(ct), H)
    return y.to(x.dtype), h


# The steps, on chunked per-head tensors: x (b, c, Q, H, P), dt (b, c, Q, H), B, C (b, c, Q, H, N),
# cs (b, c, Q, H) the cumulative log decay inside each chunk. ssd_triton.py has one kernel per step.

def chunk_states(x, dt, B, cs):
    """Step 2: S_k = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T, the state each chunk adds on its own,
    (b, c, H, P, N)."""
    w = torch.exp(cs[:, :, -1:] - cs) * dt           # (b, c, Q, H)
    return torch.einsum("bcjh,bcjhp,bcjhn->bchpn", w, x, B)


def pass_states(S, cs_last, h):
    """Step 3, sequential over chunks: h_{k+1} = exp(cs_last_k) h_k + S_k, from h_0 = h
    (b, H, P, N). Returns the state entering every chunk, h_in (b, c, H, P, N), and the state
    after the last."""
    decay = torch.exp(cs_last)[..., None, None]      # (b, c, H, 1, 1)
    states = []
    for k in range(S.shape[1]):
        states.append(h)
        h = decay[:, k] * h + S[:, k]
    return torch.stack(states, dim=1), h


def chunk_outputs(x, dt, B, C, cs, h_in):
    """Steps 1 + 4: y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j + exp(cs_i) h_k C_i,
    (b, c, Q, H, P), where h_k is h_in[:, k], the state entering chunk k."""
    Q = x.shape[2]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()[:, :, None]  # (Qi, Qj, 1)
    seg = (cs[:, :, :, None] - cs[:, :, None]).masked_fill(~causal, float("-inf"))  # (b, c, Qi, Qj, H)
    CB = torch.einsum("bcihn,bcjhn->bcijh", C, B)                                   # (b, c, Qi, Qj, H)
    y = torch.einsum("bcijh,bcjhp->bcihp", CB * torch.exp(seg), dt[..., None] * x)  # 1. diagonal
    hC = torch.einsum("bcihn,bchpn->bcihp", C, h_in)                                # h_k C_i
    return y + torch.exp(cs)[..., None] * hC                                        # 4. state to output


def ssd_step(x, dt, A, B, C, state, D=None):
    """One decode token: x (b, Hx, P), dt (b, H), A (H,), B (b, G, N), C (b, Gc, N), state
    (b, H, P, N) float32 or float64, updated IN PLACE (decode keeps one preallocated buffer, as
    mamba_ssm's selective_state_update). Returns y (b, H, P) in x's dtype and the state. No input
    checks: the caller (the mixer) builds the shapes; `ssd_naive` is its test oracle."""
    H = dt.shape[1]
    ct = state.dtype
    dA = torch.exp(dt.to(ct) * A.to(ct))                                         # (b, H)
    xh = per_head(x.to(ct), H, 1)                                                # (b, H, P)
    xB = xh[..., None] * per_head(B.to(ct), H, 1)[:, :, None]
    state.mul_(dA[..., None, None]).add_(dt.to(ct)[..., None, None] * xB)        # (b, H, P, N)
    y = (state * per_head(C.to(ct), H, 1)[:, :, None, :]).sum(-1)                # (b, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * xh
    return y.to(x.dtype), state

"""SSD test inputs, the token-loop oracle and the relative error every SSD test asserts with (tests
of ssd.py, ssd_triton.py)."""
import contextlib
import math

import torch
import torch.nn.functional as F


def random_inputs(b=2, L=100, H=4, P=8, G=2, N=16, dtype=torch.float32, device="cpu", seed=0,
                  with_D=True, with_state=True, Hx=None, Gc=None):
    """Random SSD inputs in realistic ranges: dt = softplus(z - 3) (~0.05), A ~ -U(1, 16)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = r(b, L, Hx or H, P)
    dt = F.softplus(r(b, L, H) - 3.0)
    A = -torch.empty(H).uniform_(1.0, 16.0, generator=g)
    B, C = r(b, L, G, N) / math.sqrt(N), r(b, L, Gc or G, N) / math.sqrt(N)
    D = r(H) if with_D else None
    h0 = r(b, H, P, N) if with_state else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return tuple(cast(t) for t in (x, dt, A, B, C, D, h0))


def oracle(x, dt, A, B, C, D=None, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t, one head at a time,
    float64 on the CPU; head h reads x head h // (H/Hx), B group h // (H/G), C group h // (H/Gc)."""
    x, dt, A, B, C = (t.detach().double().cpu() for t in (x, dt, A, B, C))
    b, L, Hx, P = x.shape
    H = dt.shape[2]
    N = B.shape[3]
    y = torch.zeros(b, L, H, P, dtype=torch.float64)
    hT = torch.zeros(b, H, P, N, dtype=torch.float64)
    for i in range(b):
        for h in range(H):
            hx = h // (H // Hx)
            g = h // (H // B.shape[2])
            gc = h // (H // C.shape[2])
            s = torch.zeros(P, N, dtype=torch.float64)
            if h0 is not None:
                s = h0[i, h].detach().double().cpu()
            for t in range(L):
                decay = torch.exp(dt[i, t, h] * A[h])
                s = decay * s + dt[i, t, h] * torch.outer(x[i, t, hx], B[i, t, g])
                y[i, t, h] = s @ C[i, t, gc]
                if D is not None:
                    y[i, t, h] += D[h].detach().double().cpu() * x[i, t, hx]
            hT[i, h] = s
    return y, hT


def oracle_vectorised(x, dt, A, B, C, D=None, h0=None):
    """The same token loop vectorised over batch and heads, differentiable (the gradient oracle)."""
    H = dt.shape[2]
    xh, Bh, Ch = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (x, B, C))
    s = h0
    if s is None:
        s = torch.zeros(x.shape[0], H, x.shape[3], B.shape[3], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        s = decay * s + (dt[:, t, :, None] * xh[:, t])[..., None] * Bh[:, t, :, None]
        ys.append((s * Ch[:, t, :, None]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D[:, None] * xh
    return y, s


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def no_tf32():
    """PyTorch's own float32 matmuls in IEEE precision (tf32 off) inside the block, then as before.
    Set and restored by hand: pytest's monkeypatch (9.2) cannot undo torch.backends' attributes."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn

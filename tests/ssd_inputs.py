"""SSD test inputs and the relative error every SSD test asserts with (tests of ssd.py, ssd_triton.py)."""
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

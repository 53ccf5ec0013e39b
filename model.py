"""The decoder-only vision-language model: the teacher (all attention), mmMamba-linear (all Mamba-2)
and mmMamba-hybrid, as one class driven by a per-layer list of mixer kinds.

Paper map (mmMamba, arXiv 2502.13145):
    Sec. 3.1, Fig. 2    a HoVLE-shaped decoder-only VLM: vision stem and text embeddings in one
                        sequence, pre-norm blocks, untied LM head                  -> Model
    Sec. 3.1            softmax attention with GQA and RoPE (the teacher's mixer)  -> Attention
    Sec. 3.2, Eq. 4-6   the Mamba-2 mixer carved from attention, and its starting
                        values (seed.py copies the attention weights into it)      -> Mamba2Mixer
    Tab. 5-6            which layers a hybrid keeps as attention                   -> make_layers
    Fig. 1, Tab. 2      a fixed-size recurrent state instead of a growing KV cache -> Cache, generate

Letters: the README's glossary (b L d_model V H Hkv R P N Q W I; N = P: the state is K x V shaped).

Parameter names follow HoVLE's (convert.py maps them): vision.{patch_embedding, position_embedding,
pixel_shuffle_proj}, embed_tokens, layers.{i}.{attention_norm, mixer, ffn_norm, feed_forward.w1/w2/w3},
norm, lm_head (untied).

Tests: python -m pytest -q tests/test_model.py (cached, segment-wise and compiled decoding against the full
forward, placements, init)."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd import ssd_chunked, ssd_naive, ssd_step
from utils import InputError, atomic_write, read_json, write_json

try:                                   # the GPU path; absent without triton
    from ssd_triton import ssd_triton
except ImportError:                    # pragma: no cover
    ssd_triton = None

SSD_IMPLS = {"naive": ssd_naive, "chunked": ssd_chunked, "triton": ssd_triton}
PLACEMENTS = ("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked")


@dataclasses.dataclass
class ModelConfig:
    """Every shape of the model. The defaults are this project's tiny teacher (128 px images ->
    64 image tokens, the tokenizer of data.py); `hovle()` is the paper's teacher."""
    vocab_size: int = 463                   # V
    hidden_size: int = 192                  # d_model
    intermediate_size: int = 512            # I, SwiGLU inner width
    n_heads: int = 6                        # H query heads; head dim P = d_model / H
    n_kv_heads: int = 2                     # Hkv key/value heads (GQA)
    layers: list = dataclasses.field(default_factory=lambda: ["attn"] * 8)   # per layer "attn" or "mamba2"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    image_size: int = 128                   # square images, pixels
    patch_size: int = 8
    pixel_shuffle_ratio: float = 0.5        # 0.5: every 2 x 2 patches become one token
    img_context_id: int = 6                 # id of <IMG_CONTEXT>, the image placeholder token
    conv_width: int = 2                     # W, the Mamba-2 causal depthwise conv
    ssd_chunk_size: int = 64                # Q
    ssd_impl: str = "auto"                  # "auto" (Triton on CUDA, else chunked), "chunked", "naive", "triton"
    init_std: float = 0.02                  # normal init of projections and embeddings

    def __post_init__(self):
        self.layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        bad = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "image_size",
                           "patch_size", "conv_width", "ssd_chunk_size") if not getattr(self, n) > 0
               or type(getattr(self, n)) is not int]
        if bad:
            raise ValueError(f"ModelConfig: {', '.join(bad)} must be positive ints")
        s = 1 / self.pixel_shuffle_ratio if self.pixel_shuffle_ratio > 0 else 0.5
        for ok, msg in [(self.layers and set(self.layers) <= {"attn", "mamba2"},
                         f"layers must be a non-empty list of 'attn' / 'mamba2', got {self.layers}"),
                        (self.hidden_size % self.n_heads == 0, "hidden_size must be divisible by n_heads"),
                        (self.head_dim % 2 == 0, "the head dim hidden_size / n_heads must be even (RoPE: pairs)"),
                        (self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads (GQA)"),
                        (self.image_size % self.patch_size == 0, "image_size must be divisible by patch_size"),
                        (s >= 1 and s == round(s) and self.grid % round(s) == 0,
                         "pixel_shuffle_ratio must be 1/s for an integer s dividing the patch grid"),
                        (0 <= self.img_context_id < self.vocab_size, "img_context_id must be a token id < vocab_size"),
                        (min(self.rope_theta, self.norm_eps, self.init_std) > 0,
                         "rope_theta, norm_eps, init_std must be > 0"),
                        (self.ssd_impl == "auto" or self.ssd_impl in SSD_IMPLS, f"ssd_impl not in {list(SSD_IMPLS)}")]:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    head_dim = property(lambda self: self.hidden_size // self.n_heads)          # P
    n_layers = property(lambda self: len(self.layers))
    heads_per_kv = property(lambda self: self.n_heads // self.n_kv_heads)       # R
    grid = property(lambda self: self.image_size // self.patch_size)            # patches per side
    shuffle = property(lambda self: round(1 / self.pixel_shuffle_ratio))        # s x s patches -> 1 token
    image_tokens = property(lambda self: (self.grid // self.shuffle) ** 2)     # <IMG_CONTEXT> per image

    @classmethod
    def hovle(cls, layers=None, **overrides) -> "ModelConfig":
        """HoVLE-2.6B, the paper's teacher: 8 holistic-embedding + 24 InternLM2-1.8B layers.
        92546 is <IMG_CONTEXT> in the InternVL2 / InternLM2 tokenizer."""
        kw = dict(vocab_size=92553, hidden_size=2048, intermediate_size=8192, n_heads=16, n_kv_heads=8,
                  layers=layers or ["attn"] * 32, rope_theta=1e6, image_size=448, patch_size=14,
                  img_context_id=92546)
        return cls(**{**kw, **overrides})

    replace = dataclasses.replace                       # cfg.replace(layers=...): a checked copy

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        try:
            return cls(**read_json(path))
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: invalid model config: {e}") from e


def make_layers(n_layers: int, n_attn: int = 0, placement: str = "head-interleaved") -> list:
    """Layer kinds of a student keeping `n_attn` attention layers (0: mmMamba-linear). The paper's
    Table 6 placements: head-interleaved keeps layers floor(i n_layers / n_attn) (8 of 32: 0, 4, ...,
    28; 2 of 8: 0, 4); tail-interleaved its mirror image (2 of 8: 3, 7); head-stacked the first
    n_attn; tail-stacked the last n_attn."""
    if n_layers < 1 or not isinstance(n_attn, int) or isinstance(n_attn, bool) or not 0 <= n_attn <= n_layers:
        raise ValueError(f"n_attn must be an int in [0, {n_layers}], got {n_attn!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    head = [i * n_layers // n_attn for i in range(n_attn)]
    keep = {"head-interleaved": head, "tail-interleaved": [n_layers - 1 - i for i in head],
            "head-stacked": range(n_attn), "tail-stacked": range(n_layers - n_attn, n_layers)}[placement]
    return ["attn" if i in keep else "mamba2" for i in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# Building blocks

class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 u) * w3 u); w1 gate, w3 up, w2 down (HoVLE / InternLM2 names)."""

    def __init__(self, d_model: int, inner: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d_model, inner, bias=False), nn.Linear(d_model, inner, bias=False)
        self.w2 = nn.Linear(inner, d_model, bias=False)

    def forward(self, u, cache=None):
        gate, up = project(self, u, ("w1", "w3"), cache)
        return project(self, F.silu(gate) * up, ("w2",), cache)[0]


class VisionStem(nn.Module):
    """HoVLE's image embedding: patchify conv + learned positions, InternVL's pixel shuffle (each
    s x s block of patches concatenated into one token), MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, s = cfg.hidden_size, cfg.shuffle
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, d))
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(d * s * s, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_img, 3, S, S) -> (n_img, image_tokens, d_model), tokens row-major."""
        S, g, s = self.cfg.image_size, self.cfg.grid, self.cfg.shuffle
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (n_img, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.device, w.dtype))       # (n, d, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding          # (n, g*g, d) row-major
        n, d = x.shape[0], x.shape[2]
        x = x.reshape(n, g // s, s, g // s, s, d).permute(0, 1, 3, 2, 4, 5)  # (n, g/s, g/s, s_row, s_col, d)
        return self.pixel_shuffle_proj(x.reshape(n, (g // s) ** 2, s * s * d))


@functools.lru_cache(maxsize=4)
def rope_tables(start: int, L: int, P: int, theta: float, device: torch.device, dtype: torch.dtype):
    """cos, sin (L, P) of the rotary angles at positions start.. (kept for the other layers of a step)."""
    inv = theta ** (-torch.arange(0, P, 2, device=device, dtype=dtype) / P)              # (P/2,)
    ang = torch.arange(start, start + L, device=device, dtype=dtype)[:, None] * inv      # (L, P/2)
    return ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half, as InternLM2 and HF Llama) of x (b, heads, L, P) at positions
    start .. start + L - 1, computed in float32 (float64 stays float64)."""
    L, P = x.shape[-2], x.shape[-1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_tables(start, L, P, theta, x.device, ct)
    xf = x.to(ct)
    rot = torch.cat([-xf[..., P // 2:], xf[..., : P // 2]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Caches: attention keeps every key and value (it grows with the context); Mamba-2 keeps W-1 conv
# inputs and the (b, H, P, N) state (a fixed size).

class LayerCache:
    """What one layer keeps between calls. Attention: k, v (b, Hkv, T, P), keys after RoPE, in
    buffers of `capacity` tokens when given (grown when passed). Mamba-2: conv_state (b, channels,
    W-1), the last conv inputs, and ssm_state (b, H, P, N) in float32. Both: `w`, the layer's
    projections stacked and transposed once per sequence (by names, `project`; not in nbytes): a
    decode step makes one matmul per group.
    Decoding is inference: the cached values carry no graph."""

    def __init__(self, capacity: int | None = None):
        self.capacity, self.length, self.w = capacity, 0, {}
        self.k = self.v = self.conv_state = self.ssm_state = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append (b, Hkv, L, P) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:               # allocate, or grow to what is needed
            size, old = max(end, self.capacity or 0), (self.k, self.v)
            self.k, self.v = (t.new_zeros(*t.shape[:2], size, t.shape[3]) for t in (k, v))
            for new, kept in zip((self.k, self.v), old):
                if kept is not None:
                    new[:, :, :self.length] = kept[:, :, :self.length]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.conv_state, self.ssm_state) if t is not None)


class Cache:
    """Per-layer caches, the number of tokens seen (the RoPE offset of the next token), and `w`
    for lm_head (as LayerCache.w)."""

    def __init__(self, layers: list):
        self.layers, self.length, self.w = layers, 0, {}
        self.nbytes = lambda: sum(c.nbytes() for c in self.layers)


def project(module: nn.Module, u: torch.Tensor, names: tuple, cache) -> list:
    """[u W^T for module's Linear layers `names`]. In an inference decode step (one token, a cache,
    no autograd) one matmul u @ W_cat^T, the weights stacked once per sequence into cache.w: on a
    CPU a contiguous transposed copy (its one-row products are ~3x faster than F.linear's u W^T), on
    a GPU a view where nothing is stacked. A cache must not outlive a change of the weights."""
    weights = [getattr(module, n).weight for n in names]
    if cache is None or u.shape[1] > 1 or torch.is_grad_enabled():
        return [F.linear(u, w) for w in weights]
    if names not in cache.w:                         # W_cat^T (d_in, d_out summed): d_in = d_model, I for w2
        w = (torch.cat(weights) if len(weights) > 1 else weights[0]).detach().t()
        cache.w[names] = w.contiguous() if w.device.type == "cpu" else w
    return (u @ cache.w[names]).split([w.shape[0] for w in weights], dim=-1)


# ----------------------------------------------------------------------------------------------
# The two mixers

class Attention(nn.Module):
    """Causal softmax attention with GQA (head h uses KV head h // R) and RoPE, through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq, self.wk = nn.Linear(d, H * P, bias=False), nn.Linear(d, Hkv * P, bias=False)
        self.wv, self.wo = nn.Linear(d, Hkv * P, bias=False), nn.Linear(H * P, d, bias=False)

    def qkv(self, u: torch.Tensor, start: int = 0, cache: LayerCache | None = None):
        """q (b, H, L, P) and k (b, Hkv, L, P) after RoPE at positions start.., and v (b, Hkv, L, P)."""
        b, L, _ = u.shape
        cfg, P = self.cfg, self.cfg.head_dim
        q, k, v = (t.view(b, L, -1, P).transpose(1, 2) for t in project(self, u, ("wq", "wk", "wv"), cache))
        return rope(q, start, cfg.rope_theta), rope(k, start, cfg.rope_theta), v

    def heads(self, u: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(P)) v per head, before wo: (b, L, d_model) -> (b, L, H, P). With a
        cache, the L tokens follow the cached ones (positions start..)."""
        q, k, v = self.qkv(u, start, cache)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)                                          # (b, Hkv, past + L, P)
        L, T = q.shape[2], k.shape[2]
        if not past or L == 1:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=True)    # (b, H, L, P)
        else:                  # a segment after earlier tokens: query i sees keys <= past + i; the (rows, T)
            rows, o = max(1, 2 ** 24 // T), []                # boolean masks are built 16M entries at a time
            for i in range(0, L, rows):
                mask = torch.arange(T, device=u.device) <= torch.arange(past + i, past + min(i + rows, L),
                                                                        device=u.device)[:, None]
                o.append(F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v, attn_mask=mask, enable_gqa=True))
            o = torch.cat(o, dim=2)
        return o.transpose(1, 2)                                               # (b, L, H, P)

    def forward(self, u, start: int = 0, cache: LayerCache | None = None):
        return project(self, self.heads(u, start, cache).flatten(2), ("wo",), cache)[0]


class Mamba2Mixer(nn.Module):
    """mmMamba's Mamba-2 mixer (Sec. 3.2, Fig. 2), for the normed input u (b, L, d_model):

        x, B, C = W_V u, W_K u, W_Q u            # (b, L, Hkv, P), (b, L, Hkv, N), (b, L, H, N); N = P
        x, B, C = SiLU(causal depthwise conv of width W over the channels [x, B, C])
        dt = softplus(W_dt u + dt_bias)          # (b, L, H), one step size per head
        A  = -exp(A_log)                         # (H,)
        y  = SSD(x, dt, A, B, C)                 # ssd.py; head h reads x, B of KV head h // R, C of head h
        o  = RMSNorm_P(y) * SiLU(W_G u)          # norm over each head's P values, weight shared by heads
        out = W_O o

    Compared with attention: V, K, Q become x, B, C (the SSD's dual form is causal linear attention
    with q = C, k = B, v = x); no softmax, no 1/sqrt(P), no RoPE, no normaliser; D is not used.
    wq, wk, wv, wo have attention's shapes and are INHERITED from it (seed.py); the rest is NEW.
    Official code: github.com/hustvl/mmMamba, src/model/linear_attention/mamba2.py (Mamba2_Attention).
    """
    INHERITED = ("wq", "wk", "wv", "wo")
    NEW = ("conv1d", "wdt", "dt_bias", "A_log", "norm", "wg")
    IN_PROJ = ("wv", "wk", "wq", "wg", "wdt")                 # -> x, B, C, the gate, dt: stacked in decode

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq, self.wk = nn.Linear(d, H * P, bias=False), nn.Linear(d, Hkv * P, bias=False)    # -> C, B
        self.wv, self.wo = nn.Linear(d, Hkv * P, bias=False), nn.Linear(H * P, d, bias=False)    # -> x, out
        channels = (2 * Hkv + H) * P                                                             # [x, B, C]
        self.conv1d = nn.Conv1d(channels, channels, cfg.conv_width, groups=channels)  # causal padding by hand
        self.wdt = nn.Linear(d, H, bias=False)
        self.dt_bias, self.A_log = nn.Parameter(torch.zeros(H)), nn.Parameter(torch.zeros(H))
        self.norm = nn.RMSNorm(P, eps=cfg.norm_eps)
        self.wg = nn.Linear(d, H * P, bias=False)
        self.init_new(mimic=False)

    @torch.no_grad()
    def init_new(self, mimic: bool, generator: torch.Generator | None = None):
        """Starting values of the NEW parameters, as the official code (mamba2.py lines 407-466).

        mimic=True, the paper's "mimic" init: the mixer starts as a slowly decaying causal linear
        attention. conv: weight 1 on the current-token tap, 0 elsewhere, bias 0 (the identity);
        W_dt = 0 (dt does not depend on u); dt_bias = softplus^-1(dt0), dt0 log-uniform in
        [1e-3, 0.1] per head; A_log = 1 (A = -e: per-token decay exp(-e dt0) in [0.76, 0.997]).
        mimic=False (Table 4's "inherit" and "scratch"): conv and W_dt PyTorch's default init,
        dt_bias = 0 (dt = softplus(0) = 0.69), A = -U(1, 16) (decays 1.6e-5 .. 0.5 per token).
        Both: RMSNorm weight 1, W_G Xavier-uniform with gain 2^-2.5."""
        if self.A_log.is_meta:
            return
        H = self.cfg.n_heads
        if mimic:
            self.conv1d.weight.zero_()[:, 0, -1] = 1.0
            self.conv1d.bias.zero_()
            self.wdt.weight.zero_()
            u = torch.rand(H, dtype=torch.float64, generator=generator)
            dt0 = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))              # softplus^-1(dt0)
            self.A_log.fill_(1.0)
        else:
            for p in (self.conv1d.weight, self.wdt.weight):
                _init_(p, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator), generator)
            bound = 1 / math.sqrt(self.cfg.conv_width)                            # fan-in of a depthwise conv
            _init_(self.conv1d.bias, lambda t: t.uniform_(-bound, bound, generator=generator), generator)
            self.dt_bias.zero_()
            self.A_log.copy_(torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=generator).log())
        self.norm.weight.fill_(1.0)
        _init_(self.wg.weight, lambda t: nn.init.xavier_uniform_(t, gain=2 ** -2.5, generator=generator), generator)

    def conv(self, xBC: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """SiLU(causal depthwise conv) over (b, L, channels); continues and updates cache.conv_state."""
        (b, L, ch), W = xBC.shape, self.cfg.conv_width
        prev = xBC.new_zeros(b, ch, W - 1) if cache is None or cache.conv_state is None else cache.conv_state
        window = torch.cat([prev, xBC.transpose(1, 2)], dim=2)                # (b, ch, W - 1 + L)
        if cache is not None:
            cache.conv_state = window[:, :, L:].detach().clone()                 # the last W - 1 inputs
        return F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=ch)).transpose(1, 2)

    def heads(self, u: torch.Tensor, start: int = 0, cache: LayerCache | None = None, gate: bool = True):
        """Per-head output before W_O, RMSNorm_P(y) * SiLU(W_G u): (b, L, d_model) -> (b, L, H, P);
        gate=False: the SSD output y alone. `start` is unused (the SSM has no positions); it keeps
        Attention.heads' signature."""
        cfg = self.cfg
        b, L, _ = u.shape
        if cache is not None and cache.ssm_state is not None and L == 1 and gate:
            return self.step(u, cache)
        Hkv, P = cfg.n_kv_heads, cfg.head_dim
        x, B, C, g, dt = project(self, u, self.IN_PROJ, cache)
        x, B, C = self.conv(torch.cat([x, B, C], dim=-1), cache).split([Hkv * P, Hkv * P, cfg.n_heads * P], dim=-1)
        x, B, C = x.view(b, L, Hkv, P), B.view(b, L, Hkv, P), C.view(b, L, -1, P)   # N = P
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))                             # (b, L, H)
        A = -torch.exp(self.A_log.to(ct))                                            # (H,)
        impl = cfg.ssd_impl if cfg.ssd_impl != "auto" else "triton" if u.is_cuda and ssd_triton else "chunked"
        y, state = SSD_IMPLS[impl](x, dt, A, B, C, initial_state=None if cache is None else cache.ssm_state,
                                   chunk_size=cfg.ssd_chunk_size)
        if cache is not None:
            cache.ssm_state = state.detach()
        return self.norm(y.to(u.dtype)) * F.silu(g).view(y.shape) if gate else y       # (b, L, H, P)

    def step(self, u: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One decode token, (b, 1, d_model) -> (b, 1, H, P): `heads` for L = 1 after a prefill, with
        the five projections as one stacked matmul (`project`), the conv as one window, the SSM state
        updated in place (ssd.ssd_step); no graph is kept between tokens."""
        cfg, b, state = self.cfg, u.shape[0], cache.ssm_state
        Hkv, H, P = cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
        x, B, C, g, dt = project(self, u, self.IN_PROJ, cache)                        # one stacked matmul
        window = torch.cat([cache.conv_state, torch.cat([x, B, C], dim=-1).transpose(1, 2)], dim=-1)  # (b, ch, W)
        cache.conv_state = window[..., 1:].detach()
        x, B, C = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias).split(
            [Hkv * P, Hkv * P, H * P], dim=-1)
        A = -torch.exp(self.A_log.to(state.dtype))                                    # (H,)
        dt = F.softplus(dt[:, 0].to(A.dtype) + self.dt_bias.to(A.dtype))               # (b, H)
        y, state = ssd_step(x.view(b, Hkv, P), dt, A, B.view(b, Hkv, P), C.view(b, H, P), state)   # (b, H, P)
        cache.ssm_state = state.detach()
        return (self.norm(y) * F.silu(g).view(b, H, P))[:, None]

    def forward(self, u, start: int = 0, cache: LayerCache | None = None):
        return project(self, self.heads(u, start, cache).flatten(2), ("wo",), cache)[0]


# ----------------------------------------------------------------------------------------------
# The model

class Block(nn.Module):
    """Pre-norm block: h += mixer(attention_norm(h)); h += feed_forward(ffn_norm(h))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind, self.attention_norm = kind, nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mixer = Attention(cfg) if kind == "attn" else Mamba2Mixer(cfg)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, start: int = 0, cache=None):
        h = h + self.mixer(self.attention_norm(h), start, cache)
        return h + self.feed_forward(self.ffn_norm(h), cache)


class Model(nn.Module):
    """Decoder-only VLM; `cfg.layers` says which layers are attention and which Mamba-2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionStem(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layers)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def set_config(self, cfg: ModelConfig) -> None:
        """Point the model and every submodule at `cfg` (after swapping a layer's mixer)."""
        for m in self.modules():
            if hasattr(m, "cfg"):
                m.cfg = cfg

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Every projection and embedding normal(0, init_std) (the patch conv keeps PyTorch's
        default), biases 0; Mamba-2's new parameters their non-mimic values (Mamba2Mixer.init_new).
        The order of the draws is fixed: stage 0 from one seed gives one teacher."""
        normal = lambda p: _init_(p, lambda t: t.normal_(0.0, self.cfg.init_std, generator=generator), generator)
        for m in self.modules():
            if isinstance(m, (Attention, FeedForward, Mamba2Mixer)):
                for lin in m.children():
                    if isinstance(lin, nn.Linear):
                        normal(lin.weight)
            if isinstance(m, Mamba2Mixer):
                m.init_new(mimic=False, generator=generator)
        for lin in self.vision.pixel_shuffle_proj[::2]:
            normal(lin.weight)
            lin.bias.zero_()
        for p in (self.vision.position_embedding, self.embed_tokens.weight, self.lm_head.weight):
            normal(p)

    def embed(self, input_ids, pixel_values=None, image_embeds=None) -> torch.Tensor:
        """Token embeddings (b, L, d_model) with image features in the <IMG_CONTEXT> slots, filled
        row by row. image_embeds: (n_tokens, d_model) or the vision stem's (n_img, tokens, d_model)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (b, L), got {tuple(input_ids.shape)}")
        h = self.embed_tokens(input_ids)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.vision(pixel_values)
        feats = None if image_embeds is None else image_embeds.reshape(-1, h.shape[-1])
        if feats is None and input_ids.shape[1] == 1:     # a decode step (generate never emits the
            return h                                       # placeholder): no count, no device sync
        slots = input_ids == self.cfg.img_context_id
        n = 0 if feats is None else feats.shape[0]
        if int(slots.sum()) != n:
            raise ValueError(f"input_ids hold {int(slots.sum())} <IMG_CONTEXT> tokens but the images give {n} "
                             f"image tokens ({self.cfg.image_tokens} per image)")
        return h.masked_scatter(slots[..., None], feats.to(h.dtype)) if n else h

    def forward(self, input_ids, pixel_values=None, *, image_embeds=None, cache: Cache | None = None,
                return_hidden: bool = False, last_only: bool = False):
        """Logits (b, L, V), or (b, 1, V) with last_only. With `cache` the tokens continue the cached
        context and the cache is updated. return_hidden: also the residual stream entering every
        layer and leaving the last, hidden[i] (b, L, d_model), i = 0 .. n_layers."""
        h = self.embed(input_ids, pixel_values, image_embeds)
        start, hidden = (0 if cache is None else cache.length), []
        for i, block in enumerate(self.layers):
            hidden.append(h)
            h = block(h, start, None if cache is None else cache.layers[i])
        hidden.append(h)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = project(self, self.norm(h[:, -1:] if last_only else h), ("lm_head",), cache)[0]
        return (logits, hidden) if return_hidden else logits

    def mixer_inputs(self, input_ids, pixel_values=None, image_embeds=None) -> list:
        """Teacher forcing: every layer's normed mixer input u_i = attention_norm(hidden[i]), from one
        pass of this model. Feed u_i to any model's `layers[i].mixer.heads(u_i)`."""
        _, hidden = self(input_ids, pixel_values, image_embeds=image_embeds, return_hidden=True, last_only=True)
        return [block.attention_norm(h) for block, h in zip(self.layers, hidden)]

    def new_cache(self, capacity: int | None = None) -> Cache:
        """An empty cache; `capacity` preallocates the KV buffers for that many tokens."""
        return Cache([LayerCache(capacity) for _ in self.layers])

    @torch.no_grad()
    def prefill(self, input_ids, pixel_values=None, cache: Cache | None = None, segment: int | None = None):
        """Run the prompt (b, T) through `cache` `segment` tokens at a time (None: one pass); return
        the last position's logits (b, V). Segments carry the KV cache and the conv + SSM states, so
        the result equals one pass; a recurrent model's memory then stays flat in T."""
        cache = cache if cache is not None else self.new_cache()
        T = input_ids.shape[1]
        seg = T if not segment else segment
        feats = None if pixel_values is None else self.vision(pixel_values).flatten(0, 1)   # (n_tokens, d_model)
        slots = input_ids == self.cfg.img_context_id                                        # (b, T)
        if int(slots.sum()) != (0 if feats is None else feats.shape[0]):
            return self(input_ids, pixel_values, cache=cache, last_only=True)[:, -1]          # embed's error
        first = F.pad(slots.sum(1).cumsum(0), (1, 0))[:-1]     # index in feats of each row's first image token
        for s in range(0, T, seg):
            part, e = None, min(T, s + seg)
            if feats is not None:                              # this segment's image tokens, row by row
                k0, k1 = first + slots[:, :s].sum(1), first + slots[:, :e].sum(1)
                part = torch.cat([feats[i:j] for i, j in zip(k0.tolist(), k1.tolist())])
            logits = self(input_ids[:, s:e], image_embeds=part, cache=cache, last_only=True)
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32, eos_id: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None, *,
                 cache: Cache | None = None, segment: int | None = 2048, stats: dict | None = None,
                 compile: bool = False) -> torch.Tensor:
        """Prefill the prompt (b, T) (equal-length rows, no padding) in segments, then decode one
        token at a time. temperature 0: greedy, else sampling from softmax(logits / temperature).
        <IMG_CONTEXT> is never generated. Returns the new tokens (b, <= max_new_tokens); stops when
        every row has produced eos_id (rows that finished are padded with eos_id). `stats`, if given,
        receives prefill_s (the prompt and the first token) and decode_s (the other tokens).
        compile: decode steps through torch.compile (inductor fuses a step's few hundred small ops,
        whose per-call overhead is much of a step on a CPU; the role CUDA graphs play in mamba_ssm's
        generate). Dynamic shapes: one graph for every cache length, compiled on the first steps
        (seconds) and kept by dynamo for later calls."""
        b, T = input_ids.shape
        step = torch.compile(self.forward, dynamic=True) if compile else self
        cache = cache if cache is not None else self.new_cache(capacity=T + max_new_tokens)
        clock = lambda: (torch.cuda.synchronize() if input_ids.is_cuda else None, time.perf_counter())[1]
        t0 = clock()
        logits = self.prefill(input_ids, pixel_values, cache, segment) if max_new_tokens > 0 else None
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for i in range(max_new_tokens):
            logits = logits.float()
            logits[:, self.cfg.img_context_id] = float("-inf")
            tok = logits.argmax(-1) if temperature <= 0 else \
                torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            if eos_id is not None:
                tok = tok.masked_fill(done, eos_id)
                done |= tok == eos_id
            out.append(tok)
            if i == 0:
                t1 = clock()
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = step(tok[:, None], cache=cache)[:, -1]
        if stats is not None and out:
            stats.update(prefill_s=t1 - t0, decode_s=clock() - t1)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)

    def save_pretrained(self, directory: str) -> None:
        """directory/config.json and directory/model.safetensors, each written atomically."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(state, tmp))
        write_json(os.path.join(directory, "config.json"), dataclasses.asdict(self.cfg))


@torch.no_grad()
def _init_(p: torch.Tensor, fn, generator: torch.Generator | None = None) -> None:
    """Apply the in-place init `fn` to p: directly (on p's device), or with a (CPU) `generator`
    through a CPU float32/64 copy, so that one seed gives the same weights on any device."""
    if p.is_meta:
        return
    if generator is None:
        fn(p)
        return
    t = torch.empty(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
    fn(t)
    p.copy_(t)

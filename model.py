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

Letters: the README's glossary (b L T d_model V H Hkv R P N W I; N = P: the state is K x V shaped).

Parameter names follow HoVLE's (convert.py maps them): vision.{patch_embedding,
position_embedding, pixel_shuffle_proj}, embed_tokens, layers.{i}.{attention_norm, mixer, ffn_norm,
feed_forward.w1/w2/w3}, norm, lm_head (untied).

Tests: python -m pytest -q tests/test_model.py (mixers against loops, decoding, placements)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ssd import compute_dtype, ssd_chunked, ssd_naive, ssd_step

try:                                   # the GPU path; absent without triton
    from ssd_triton import ssd_triton
except ImportError:                    # pragma: no cover
    ssd_triton = None

SSD_IMPLS = {"naive": ssd_naive, "chunked": ssd_chunked, "triton": ssd_triton}
PLACEMENTS = ("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig: {message}")


@dataclasses.dataclass
class ModelConfig:
    """Every shape of the model. The defaults are this project's tiny teacher (128 px images ->
    64 image tokens, the tokenizer of data.py); convert.hovle_config() is the paper's teacher."""
    vocab_size: int = 463                   # V
    hidden_size: int = 192                  # d_model
    intermediate_size: int = 512            # I, SwiGLU inner width
    n_heads: int = 6                        # H query heads; head dim P = d_model / H
    n_kv_heads: int = 2                     # Hkv key/value heads (GQA)
    layers: list = dataclasses.field(default_factory=lambda: ["attn"] * 8)   # "attn" / "mamba2"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5                  # the blocks' RMSNorms (the mixer's own norm: 1e-5)
    image_size: int = 128                   # square images, pixels
    patch_size: int = 8
    pixel_shuffle_ratio: float = 0.5        # 0.5: every 2 x 2 patches become one token
    img_context_id: int = 6                 # id of <IMG_CONTEXT>, the image placeholder token
    conv_width: int = 2                     # W, the Mamba-2 causal depthwise conv
    ssd_chunk_size: int = 64                # Q
    ssd_impl: str = "auto"                  # "auto": Triton on CUDA, else chunked; or a key of SSD_IMPLS
    init_std: float = 0.02                  # normal init of projections and embeddings

    def __post_init__(self):
        self.layers = list(self.layers)
        require(self.layers and set(self.layers) <= {"attn", "mamba2"},
                f"layers must be a non-empty list of 'attn' / 'mamba2', got {self.layers}")
        require(self.hidden_size % self.n_heads == 0, "hidden_size must be divisible by n_heads")
        require(self.head_dim % 2 == 0, "the head dim hidden_size / n_heads must be even (RoPE: pairs)")
        require(self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads (GQA)")
        require(self.image_size % self.patch_size == 0, "image_size must be divisible by patch_size")
        s = 1 / self.pixel_shuffle_ratio                    # s x s patches -> 1 token
        require(s == round(s) and self.grid % round(s) == 0,
                "pixel_shuffle_ratio must be 1/s for an integer s dividing the patch grid")
        require(0 <= self.img_context_id < self.vocab_size, "img_context_id must be a token id < vocab_size")
        require(self.ssd_impl == "auto" or self.ssd_impl in SSD_IMPLS, f"ssd_impl not in {list(SSD_IMPLS)}")

    @property
    def head_dim(self) -> int:              # P
        return self.hidden_size // self.n_heads
    @property
    def n_layers(self) -> int:
        return len(self.layers)
    @property
    def heads_per_kv(self) -> int:          # R
        return self.n_heads // self.n_kv_heads
    @property
    def grid(self) -> int:                  # patches per side
        return self.image_size // self.patch_size
    @property
    def shuffle(self) -> int:               # s x s patches -> 1 token
        return round(1 / self.pixel_shuffle_ratio)
    @property
    def image_tokens(self) -> int:          # <IMG_CONTEXT> tokens per image
        return (self.grid // self.shuffle) ** 2

    replace = dataclasses.replace           # cfg.replace(layers=...): a copy, checked again


def make_layers(n_layers: int, n_attn: int = 0, placement: str = "head-interleaved") -> list:
    """Layer kinds of a student keeping `n_attn` attention layers (0: mmMamba-linear). The paper's
    Table 6 placements: head-interleaved keeps layers floor(i n_layers / n_attn) (8 of 32: 0, 4, ...,
    28; 2 of 8: 0, 4); tail-interleaved its mirror image (2 of 8: 3, 7); head-stacked the first
    n_attn; tail-stacked the last n_attn."""
    is_int = isinstance(n_attn, int) and not isinstance(n_attn, bool)
    if n_layers < 1 or not is_int or not 0 <= n_attn <= n_layers:
        raise ValueError(f"n_attn must be an int in [0, {n_layers}], got {n_attn!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    head = [i * n_layers // n_attn for i in range(n_attn)]
    keep = {"head-interleaved": head,
            "tail-interleaved": [n_layers - 1 - i for i in head],
            "head-stacked": range(n_attn),
            "tail-stacked": range(n_layers - n_attn, n_layers)}[placement]
    return ["attn" if i in keep else "mamba2" for i in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# Building blocks

class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 u) * w3 u); w1 gate, w3 up, w2 down (HoVLE / InternLM2 names)."""

    def __init__(self, d_model: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, inner, bias=False)
        self.w3 = nn.Linear(d_model, inner, bias=False)
        self.w2 = nn.Linear(inner, d_model, bias=False)

    def forward(self, u):
        gate = self.w1(u)
        up = self.w3(u)
        return self.w2(F.silu(gate) * up)


class VisionStem(nn.Module):
    """HoVLE's image embedding: patchify conv + learned positions, InternVL's pixel shuffle (each
    s x s block of patches concatenated into one token), MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        s = cfg.shuffle
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, d))
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(d * s * s, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_img, 3, S, S) -> (n_img, image_tokens, d_model), tokens row-major."""
        S = self.cfg.image_size
        g = self.cfg.grid
        s = self.cfg.shuffle
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (n_img, 3, {S}, {S}), "
                             f"got {tuple(pixel_values.shape)}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.device, w.dtype))        # (n, d, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding          # (n, g*g, d) row-major
        n, _, d = x.shape
        x = x.reshape(n, g // s, s, g // s, s, d).permute(0, 1, 3, 2, 4, 5)  # (n, g/s, g/s, s, s, d)
        return self.pixel_shuffle_proj(x.reshape(n, (g // s) ** 2, s * s * d))


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half, as InternLM2 and HF Llama) of x (b, heads, L, P) at positions
    start .. start + L - 1, computed in float32 (float64 stays float64)."""
    L, P = x.shape[-2:]
    ct = compute_dtype(x)
    inv = theta ** (-torch.arange(0, P, 2, device=x.device, dtype=ct) / P)               # (P/2,)
    angle = torch.arange(start, start + L, device=x.device, dtype=ct)[:, None] * inv     # (L, P/2)
    cos = angle.cos().repeat(1, 2)                                                       # (L, P)
    sin = angle.sin().repeat(1, 2)
    xf = x.to(ct)
    rot = torch.cat([-xf[..., P // 2:], xf[..., : P // 2]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Caches: attention keeps every key and value (it grows with the context); Mamba-2 keeps W-1 conv
# inputs and the (b, H, P, N) state (a fixed size).

class LayerCache:
    """What one layer keeps between calls. Attention: k, v (b, Hkv, T, P), keys after RoPE, in
    buffers of `capacity` tokens when given (grown when passed), and `length`, the tokens kept.
    Mamba-2: conv_state (b, channels, W-1), the last conv inputs, and ssm_state (b, H, P, N) in
    float32. Decoding is inference: the cached values carry no graph."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.length = 0
        self.k = self.v = self.conv_state = self.ssm_state = None        # nothing kept yet

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append (b, Hkv, L, P) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        if self.k is None:
            self.k = k[:, :, :0]
            self.v = v[:, :, :0]
        if end > self.k.shape[2]:                     # grow the buffers to capacity, or to what is needed
            grow = max(end, self.capacity or 0) - self.k.shape[2]
            self.k = F.pad(self.k, (0, 0, 0, grow))
            self.v = F.pad(self.v, (0, 0, 0, grow))
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        kept = (self.k, self.v, self.conv_state, self.ssm_state)
        return sum(t.nbytes for t in kept if t is not None)


class Cache:
    """Per-layer caches and the number of tokens seen."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


# ----------------------------------------------------------------------------------------------
# The two mixers

class Attention(nn.Module):
    """Causal softmax attention with GQA (head h uses KV head h // R) and RoPE, through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = nn.Linear(d, H * P, bias=False)
        self.wk = nn.Linear(d, Hkv * P, bias=False)
        self.wv = nn.Linear(d, Hkv * P, bias=False)
        self.wo = nn.Linear(H * P, d, bias=False)

    def qkv(self, u: torch.Tensor, start: int = 0):
        """q (b, H, L, P) and k (b, Hkv, L, P) after RoPE at positions start.., and v (b, Hkv, L, P)."""
        b, L, _ = u.shape
        P = self.cfg.head_dim
        q = self.wq(u).view(b, L, -1, P).transpose(1, 2)              # (b, H, L, P)
        k = self.wk(u).view(b, L, -1, P).transpose(1, 2)              # (b, Hkv, L, P)
        v = self.wv(u).view(b, L, -1, P).transpose(1, 2)              # (b, Hkv, L, P)
        return rope(q, start, self.cfg.rope_theta), rope(k, start, self.cfg.rope_theta), v

    def heads(self, u: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(P)) v per head, before wo: (b, L, d_model) -> (b, L, H, P). With a
        cache, the L tokens follow the cached ones (RoPE positions from cache.length on)."""
        past = 0
        if cache is not None:
            past = cache.length
        q, k, v = self.qkv(u, past)
        if cache is not None:
            k, v = cache.append(k, v)                                  # (b, Hkv, past + L, P)
        L = q.shape[2]
        T = k.shape[2]
        if past == 0 or L == 1:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=True)  # (b, H, L, P)
            return o.transpose(1, 2)
        # a segment after earlier tokens: query i sees keys <= past + i, `rows` queries at a time
        # (each (rows, T) mask and score block under 16M entries)
        rows = max(1, 2 ** 24 // T)
        o = []
        for i in range(0, L, rows):
            mask = torch.ones(min(rows, L - i), T, dtype=torch.bool, device=u.device).tril(past + i)
            o.append(F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v, attn_mask=mask, enable_gqa=True))
        return torch.cat(o, dim=2).transpose(1, 2)                     # (b, L, H, P)

    def forward(self, u, cache: LayerCache | None = None):
        return self.wo(self.heads(u, cache).flatten(2))


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
    Official code (class Mamba2_Attention):
    https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/model/linear_attention/mamba2.py#L226-L806
    """
    INHERITED = ("wq", "wk", "wv", "wo")
    NEW = ("conv1d", "wdt", "dt_bias", "A_log", "norm", "wg")
    # The norm's eps is the official 1e-5 whatever the teacher's (init_weights' default, which no
    # caller overrides): https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/model/linear_attention/mamba2.py#L304-L310
    NORM_EPS = 1e-5

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = nn.Linear(d, H * P, bias=False)                                 # -> C
        self.wk = nn.Linear(d, Hkv * P, bias=False)                               # -> B
        self.wv = nn.Linear(d, Hkv * P, bias=False)                               # -> x
        self.wo = nn.Linear(H * P, d, bias=False)
        channels = (2 * Hkv + H) * P                                               # [x, B, C]
        self.conv1d = nn.Conv1d(channels, channels, cfg.conv_width, groups=channels)  # causal by hand
        self.wdt = nn.Linear(d, H, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.norm = nn.RMSNorm(P, eps=self.NORM_EPS)
        self.wg = nn.Linear(d, H * P, bias=False)
        self.init_new(mimic=False)

    @torch.no_grad()
    def init_new(self, mimic: bool, generator: torch.Generator | None = None):
        """Starting values of the NEW parameters, as the official code:
        https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/model/linear_attention/mamba2.py#L407-L463

        mimic=True, the paper's "mimic" init: the mixer starts as a slowly decaying causal linear
        attention. conv: weight 1 on the current-token tap, 0 elsewhere, bias 0 (the identity);
        W_dt = 0 (dt does not depend on u); dt_bias = softplus^-1(dt0), dt0 log-uniform in
        [1e-3, 0.1] per head; A_log = 1 (A = -e: per-token decay exp(-e dt0) in [0.76, 0.997]).
        mimic=False (Table 4's "inherit" and "scratch"): conv and W_dt PyTorch's default init,
        dt_bias = 0 (dt = softplus(0) = 0.69), A = -U(1, 16) (decays 1.6e-5 .. 0.5 per token).
        Both: RMSNorm weight 1, W_G Xavier-uniform with gain 2^-2.5."""
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
                _init_(p, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
            bound = 1 / math.sqrt(self.cfg.conv_width)                            # a depthwise conv's fan-in
            _init_(self.conv1d.bias, nn.init.uniform_, generator, a=-bound, b=bound)
            self.dt_bias.zero_()
            A = torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=generator)
            self.A_log.copy_(A.log())
        self.norm.weight.fill_(1.0)
        _init_(self.wg.weight, nn.init.xavier_uniform_, generator, gain=2 ** -2.5)

    def conv(self, xBC: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """SiLU(causal depthwise conv) over (b, L, channels); continues and updates cache.conv_state."""
        b, L, ch = xBC.shape
        prev = xBC.new_zeros(b, ch, self.cfg.conv_width - 1)                   # the start: zeros
        if cache is not None and cache.conv_state is not None:
            prev = cache.conv_state
        window = torch.cat([prev, xBC.transpose(1, 2)], dim=2)                # (b, ch, W - 1 + L)
        if cache is not None:
            cache.conv_state = window[:, :, L:].detach().clone()                 # the last W - 1 inputs
        return F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=ch)).transpose(1, 2)

    def heads(self, u: torch.Tensor, cache: LayerCache | None = None, gate: bool = True):
        """Per-head output before W_O, RMSNorm_P(y) * SiLU(W_G u): (b, L, d_model) -> (b, L, H, P);
        gate=False: the SSD output y alone. With a cache, continues the cached conv inputs and state."""
        b, L, _ = u.shape
        Hkv, H, P = self.cfg.n_kv_heads, self.cfg.n_heads, self.cfg.head_dim
        x = self.wv(u)                                                          # V -> x
        B = self.wk(u)                                                          # K -> B
        C = self.wq(u)                                                          # Q -> C
        g = self.wg(u)
        dt = self.wdt(u)
        x, B, C = self.conv(torch.cat([x, B, C], dim=-1), cache).split([Hkv * P, Hkv * P, H * P], dim=-1)
        x = x.view(b, L, Hkv, P)
        B = B.view(b, L, Hkv, P)                                                # N = P
        C = C.view(b, L, H, P)
        ct = compute_dtype(u)
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))                        # (b, L, H)
        A = -torch.exp(self.A_log.to(ct))                                       # (H,)
        y = self.ssd(x, dt, A, B, C, cache)                                     # (b, L, H, P)
        if not gate:
            return y
        return self.norm(y.to(u.dtype)) * F.silu(g).view(y.shape)

    def ssd(self, x, dt, A, B, C, cache: LayerCache | None) -> torch.Tensor:
        """y = SSD(x, dt, A, B, C) (b, L, H, P) from cache.ssm_state, which it updates. One decode
        token: the recurrence, one state update (ssd.ssd_step: constant work and memory per token).
        A prompt or training: the chunked form (ssd_triton's kernels on a GPU)."""
        state = None
        if cache is not None:
            state = cache.ssm_state
        if state is not None and x.shape[1] == 1:
            y, state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)   # (b, H, P)
            y = y[:, None]
        else:
            impl = self.cfg.ssd_impl
            if impl == "auto":
                impl = "triton" if x.is_cuda and ssd_triton else "chunked"
            y, state = SSD_IMPLS[impl](x, dt, A, B, C, initial_state=state,
                                       chunk_size=self.cfg.ssd_chunk_size)
        if cache is not None:
            cache.ssm_state = state.detach()
        return y

    def forward(self, u, cache: LayerCache | None = None):
        return self.wo(self.heads(u, cache).flatten(2))


# ----------------------------------------------------------------------------------------------
# The model

MIXERS = {"attn": Attention, "mamba2": Mamba2Mixer}


class Block(nn.Module):
    """Pre-norm block: h += mixer(attention_norm(h)); h += feed_forward(ffn_norm(h))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attention_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mixer = MIXERS[kind](cfg)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cache: LayerCache | None = None):
        h = h + self.mixer(self.attention_norm(h), cache)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.recompute = False        # training: keep each block's input only, run it again in backward
        self.reset_parameters()

    def set_config(self, cfg: ModelConfig) -> None:
        """Point the model and every submodule at `cfg` (after swapping a layer's mixer)."""
        for m in self.modules():
            if hasattr(m, "cfg"):
                m.cfg = cfg

    @torch.no_grad()
    def reset_parameters(self):
        """Every projection and embedding normal(0, init_std) (the patch conv keeps PyTorch's
        default), biases 0; Mamba-2's new parameters their non-mimic values (Mamba2Mixer.init_new).
        The order of the draws is fixed: stage 0 from one seed gives one teacher."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (Attention, FeedForward, Mamba2Mixer)):
                for lin in m.children():
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, std=std)
            if isinstance(m, Mamba2Mixer):
                m.init_new(mimic=False)
        for lin in self.vision.pixel_shuffle_proj[::2]:
            nn.init.normal_(lin.weight, std=std)
            lin.bias.zero_()
        for p in (self.vision.position_embedding, self.embed_tokens.weight, self.lm_head.weight):
            nn.init.normal_(p, std=std)

    def embed(self, input_ids, pixel_values=None, image_embeds=None) -> torch.Tensor:
        """Token embeddings (b, L, d_model) with image features in the <IMG_CONTEXT> slots, filled
        row by row. image_embeds: (n_tokens, d_model) or the vision stem's (n_img, tokens, d_model)."""
        h = self.embed_tokens(input_ids)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.vision(pixel_values)
        if image_embeds is None and input_ids.shape[1] == 1:   # a decode step (generate never emits
            return h                                            # the placeholder): no count, no sync
        if image_embeds is None:
            image_embeds = h.new_zeros(0, h.shape[-1])
        image_embeds = image_embeds.reshape(-1, h.shape[-1])                  # (n_tokens, d_model)
        slots = input_ids == self.cfg.img_context_id
        if int(slots.sum()) != image_embeds.shape[0]:
            raise ValueError(f"input_ids hold {int(slots.sum())} <IMG_CONTEXT> tokens but the images give "
                             f"{image_embeds.shape[0]} image tokens ({self.cfg.image_tokens} per image)")
        return h.masked_scatter(slots[..., None], image_embeds.to(h.dtype))

    def forward(self, input_ids, pixel_values=None, *, image_embeds=None, cache: Cache | None = None,
                return_hidden: bool = False, last_only: bool = False):
        """Logits (b, L, V), or (b, 1, V) with last_only. With `cache` the tokens continue the cached
        context and the cache is updated. return_hidden: also the residual stream entering every
        layer and leaving the last, hidden[i] (b, L, d_model), i = 0 .. n_layers."""
        h = self.embed(input_ids, pixel_values, image_embeds)
        caches = [None] * len(self.layers)
        if cache is not None:
            caches = cache.layers
            cache.length += input_ids.shape[1]
        hidden = []
        for block, layer_cache in zip(self.layers, caches):
            hidden.append(h)
            h = recomputed(block, h, layer_cache, enabled=self.recompute)
        hidden.append(h)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        if return_hidden:
            return logits, hidden
        return logits

    def mixer_inputs(self, input_ids, pixel_values=None, image_embeds=None) -> list:
        """Teacher forcing: every layer's normed mixer input u_i = attention_norm(hidden[i]), from one
        pass of this model. Feed u_i to any model's `layers[i].mixer.heads(u_i)`."""
        _, hidden = self(input_ids, pixel_values, image_embeds=image_embeds, return_hidden=True,
                         last_only=True)
        return [block.attention_norm(h) for block, h in zip(self.layers, hidden)]

    def new_cache(self, capacity: int | None = None) -> Cache:
        """An empty cache; `capacity` preallocates the KV buffers for that many tokens."""
        return Cache([LayerCache(capacity) for _ in self.layers])

    @torch.no_grad()
    def prefill(self, input_ids, pixel_values=None, cache: Cache | None = None, segment: int | None = None):
        """Run the prompt (b, T) through `cache` `segment` tokens at a time (None: one pass); return
        the last position's logits (b, V). Segments carry the KV cache and the conv + SSM states, so
        the result equals one pass; a recurrent model's memory then stays flat in T."""
        if cache is None:
            cache = self.new_cache()
        T = input_ids.shape[1]
        segment = segment or T
        slots = input_ids == self.cfg.img_context_id                          # (b, T)
        feats = self.embed_tokens.weight.new_zeros(0, self.cfg.hidden_size)  # (n_tokens, d_model)
        if pixel_values is not None:
            feats = self.vision(pixel_values).flatten(0, 1)
        if int(slots.sum()) != feats.shape[0]:
            self.embed(input_ids, image_embeds=feats)                         # raises embed's error
        first = F.pad(slots.sum(1).cumsum(0), (1, 0))[:-1]     # index in feats of each row's first
        for s in range(0, T, segment):
            e = min(T, s + segment)
            starts = (first + slots[:, :s].sum(1)).tolist()    # this segment's image tokens, by row
            ends = (first + slots[:, :e].sum(1)).tolist()
            part = torch.cat([feats[i:j] for i, j in zip(starts, ends)])
            logits = self(input_ids[:, s:e], image_embeds=part, cache=cache, last_only=True)
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32, eos_id: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None, *,
                 cache: Cache | None = None, segment: int | None = 2048) -> torch.Tensor:
        """Prefill the prompt (b, T) (equal-length rows, no padding) in segments, then decode one
        token at a time. temperature 0: greedy, else sampling from softmax(logits / temperature).
        <IMG_CONTEXT> is never generated. Returns the new tokens (b, <= max_new_tokens); stops when
        every row has produced eos_id (rows that finished are padded with eos_id)."""
        b, T = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids.new_zeros(b, 0)
        if cache is None:
            cache = self.new_cache(capacity=T + max_new_tokens)
        logits = self.prefill(input_ids, pixel_values, cache, segment)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for i in range(max_new_tokens):
            logits = logits.float()
            logits[:, self.cfg.img_context_id] = float("-inf")
            if temperature <= 0:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if eos_id is not None:
                tok = tok.masked_fill(done, eos_id)
                done |= tok == eos_id
            out.append(tok)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self(tok[:, None], cache=cache)[:, -1]
        return torch.stack(out, dim=1)


def recomputed(fn, *args, enabled: bool):
    """fn(*args); enabled, in training: activation checkpointing (fn reruns in backward)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@torch.no_grad()
def _init_(p: torch.Tensor, init, generator: torch.Generator | None = None, **kw) -> None:
    """p <- init(p, **kw), an nn.init function: directly (on p's device), or with a (CPU)
    `generator` through a CPU float32/64 copy, so that one seed gives the same weights on any
    device."""
    if generator is None:
        init(p, **kw)
        return
    t = torch.empty(p.shape, dtype=compute_dtype(p))
    init(t, generator=generator, **kw)
    p.copy_(t)

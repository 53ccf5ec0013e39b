"""The decoder-only vision-language model: teacher (all attention), linear student (all Mamba-2) and
hybrid student, as one class driven by a per-layer list of mixer kinds.

Paper map (mmMamba, arXiv 2502.13145):
  Sec. 3.1 / Fig. 2  the architecture: a HoVLE-shaped decoder-only VLM (vision stem + text
                     embedding into one sequence, pre-norm blocks, untied LM head)   -> `Model`
  Sec. 3.1           softmax attention with GQA and RoPE (the teacher's mixer)       -> `Attention`
  Sec. 3.2, Eq. 4-6  the mmMamba Mamba-2 mixer seeded from attention                 -> `Mamba2Mixer`
  Sec. 4 / Tab. 5-6  linear and hybrid layouts, placement of kept attention layers   -> `make_layers`
  Fig. 1, Tab. 2     constant-size recurrent state vs a growing KV cache             -> `Cache`

Shapes and names (kept close to HoVLE's checkpoint so that an importer is a key rename):

  vision.patch_embedding           Conv2d(3, D, patch, stride=patch)  (HoVLE: vision_embeddings.*)
  vision.position_embedding        (1, grid*grid, D) learned
  vision.pixel_shuffle_proj.{0,2}  Linear(4D, D), GELU, Linear(D, D)  after a 0.5 pixel shuffle
  embed_tokens                     Embedding(V, D)                    (HoVLE: llm_text_embeddings)
  layers.{i}.attention_norm        RMSNorm(D)
  layers.{i}.mixer                 Attention or Mamba2Mixer           (HoVLE: attention.*)
  layers.{i}.ffn_norm              RMSNorm(D)
  layers.{i}.feed_forward.{w1,w2,w3}  SwiGLU: w2(silu(w1 x) * w3 x)
  norm, lm_head                    final RMSNorm(D), untied Linear(D, V)

  Attention:    wq (H*P, D), wk (Hkv*P, D), wv (Hkv*P, D), wo (D, H*P); no biases
                (HoVLE stores q, k, v fused as `wqkv`; an importer splits it).
  Mamba2Mixer:  wq, wk, wv, wo as above (inherited), conv1d (depthwise, width 2, channels [v, k, q]),
                wdt (H, D), dt_bias (H,), A_log (H,), norm.weight (P,), wg (H*P, D).

The Mamba-2 mixer (DESIGN section 5), for normed input u (b, L, D):
    q, k, v = wq u, wk u, wv u                       # k, v have Hkv heads
    v, k, q = SiLU(causal depthwise conv([v, k, q]))
    dt = softplus(wdt u + dt_bias);  A = -exp(A_log)
    y  = SSD(x = v, dt, A, B = k, C = q)             # no D, no RoPE, no scaling, no normaliser
    o  = RMSNorm_per_head(y) * SiLU(wg u)            # `heads()` returns o: (b, L, H, P)
    out = wo o
GQA in the SSD: head h uses KV head h // (H / Hkv). We pass x = v and B = k repeated (repeat_interleave)
to H heads and C = q, i.e. G = H groups in ssd's signature; ssd's own group mechanism would cover k
alone but needs B and C to share G, and C = q always has H heads.

Teacher forcing (distillation stages 1-2): `forward(..., return_hidden=True)` returns the residual
stream entering every layer; block i's mixer input is `layers[i].attention_norm(hidden[i])`, and
`layers[i].mixer.heads(u)` gives the per-head output before wo for either mixer kind
(`Model.mixer_inputs` does the first step for all layers).

Caches: `Model.new_cache()` makes a `Cache` with a `KVCache` per attention layer (grows with the
context; preallocated to `capacity` tokens when given) and a `MambaCache` per Mamba-2 layer (the last
conv_width-1 conv inputs and the (b, H, P, N) SSM state in float32: a fixed size). `generate()`
prefills with the full-sequence path (chunked SSD) and decodes token by token (`ssd_step`).
Batched prompts must have equal length (no padding / attention mask support).

Checkpoints: `save_pretrained(dir)` writes dir/config.json and dir/model.safetensors;
`Model.from_pretrained(dir)` (alias `load_pretrained`) checks every tensor against the config and
raises `CheckpointError` naming the file and listing missing, unexpected and mis-shaped keys.

Run:  python model.py      # tiny default: parameter counts, a cache check, prefill/decode timings
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd import IMPLS as SSD_IMPLS
from ssd import ssd, ssd_step

LAYER_KINDS = ("attn", "mamba2")
PLACEMENTS = ("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked")
# Stock Mamba-2 initialisation ranges (mamba_ssm), also used by seed.py's mimic init.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
A_INIT_RANGE = (1.0, 16.0)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelConfig:
    """Everything that fixes the model's shapes. The defaults are the tiny model of this project
    (fits the synthetic benchmark: 128 px images -> 256 patches -> 64 image tokens); `hovle()` is
    the paper's teacher. `vocab_size` and `img_context_id` must match the tokenizer in use."""
    vocab_size: int = 463                     # data.py tokenizer (checked in tests/test_distill.py)
    hidden_size: int = 192
    intermediate_size: int = 512              # SwiGLU inner width
    n_heads: int = 6                          # query heads H; head dim P = hidden_size / n_heads
    n_kv_heads: int = 2                       # key/value heads (GQA): head h uses KV head h // (H/Hkv)
    layers: list = field(default_factory=lambda: ["attn"] * 8)   # per layer "attn" or "mamba2"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    image_size: int = 128                     # square images, pixels
    patch_size: int = 8
    pixel_shuffle_ratio: float = 0.5          # 0.5: every 2x2 patch group becomes one token
    img_context_id: int = 6                   # token id of <IMG_CONTEXT> in data.py's tokenizer
    conv_width: int = 2                       # Mamba-2 causal depthwise conv width
    ssd_chunk_size: int = 64
    ssd_impl: str = "auto"                    # "auto", "chunked", "naive" or "triton" (see ssd.py)
    init_std: float = 0.02                    # normal init of projections and embeddings

    def __post_init__(self):
        if isinstance(self.layers, (tuple, str)):
            self.layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads",
                     "image_size", "patch_size", "conv_width", "ssd_chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.layers, list) or not self.layers:
            raise ValueError(f"ModelConfig.layers must be a non-empty list of {LAYER_KINDS}, got {self.layers!r}")
        bad = [k for k in self.layers if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"ModelConfig.layers: unknown layer kind(s) {bad}; expected each in {LAYER_KINDS}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim hidden_size / n_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) (GQA)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        r = self.pixel_shuffle_ratio
        s = 1.0 / r if isinstance(r, (int, float)) and r > 0 else 0.0
        if not (0 < r <= 1) or abs(s - round(s)) > 1e-9:
            raise ValueError(f"pixel_shuffle_ratio must be 1/s for an integer s >= 1, got {r!r}")
        if self.grid % round(s):
            raise ValueError(f"the patch grid ({self.image_size}/{self.patch_size} = {self.grid}) must be "
                             f"divisible by 1/pixel_shuffle_ratio = {round(s)}")
        if not isinstance(self.img_context_id, int) or not 0 <= self.img_context_id < self.vocab_size:
            raise ValueError(f"img_context_id must be a token id in [0, {self.vocab_size}), got {self.img_context_id!r}")
        if not self.rope_theta > 0 or not self.norm_eps > 0 or not self.init_std > 0:
            raise ValueError("rope_theta, norm_eps and init_std must be positive")
        if self.ssd_impl != "auto" and self.ssd_impl not in SSD_IMPLS:
            raise ValueError(f"ssd_impl must be 'auto' or one of {tuple(SSD_IMPLS)}, got {self.ssd_impl!r}")

    # derived sizes
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def shuffle(self) -> int:
        """Pixel-shuffle factor s = 1 / ratio: s x s patches become one token."""
        return round(1.0 / self.pixel_shuffle_ratio)

    @property
    def image_tokens(self) -> int:
        """`<IMG_CONTEXT>` tokens per image."""
        return (self.grid // self.shuffle) ** 2

    @property
    def attn_indices(self) -> list:
        return [i for i, k in enumerate(self.layers) if k == "attn"]

    # presets
    @classmethod
    def hovle(cls, layers=None, **overrides) -> "ModelConfig":
        """HoVLE-2.6B (the paper's teacher): 8 holistic-embedding + 24 InternLM2-1.8B layers.
        img_context_id 92546 is `<IMG_CONTEXT>` in the InternVL2 / InternLM2 tokenizer (check it
        against the tokenizer you use)."""
        kw = dict(vocab_size=92553, hidden_size=2048, intermediate_size=8192, n_heads=16, n_kv_heads=8,
                  layers=list(layers) if layers is not None else ["attn"] * 32, rope_theta=1e6,
                  norm_eps=1e-5, image_size=448, patch_size=14, pixel_shuffle_ratio=0.5,
                  img_context_id=92546, conv_width=2)
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with some fields changed, e.g. cfg.replace(layers=make_layers(8, 2))."""
        return dataclasses.replace(self, **changes)

    # JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ModelConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(self.to_json() + "\n")
        _atomic_write(path, write)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        """Read a config.json; every failure is an error that names the file."""
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: invalid model config: {e}") from e


def make_layers(n_layers: int, n_attn: int = 0, placement: str = "head-interleaved") -> list:
    """Per-layer kinds for a linear (n_attn = 0) or hybrid student keeping `n_attn` attention layers.

    head-interleaved: layers floor(i * n_layers / n_attn), i = 0..n_attn-1 (2 of 8: [0, 4];
                      8 of 32: 0, 4, ..., 28 as in the paper); tail-interleaved: the mirror image
                      (2 of 8: [3, 7]); head-stacked: the first n_attn; tail-stacked: the last n_attn.
    """
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if not isinstance(n_attn, int) or isinstance(n_attn, bool) or not 0 <= n_attn <= n_layers:
        raise ValueError(f"n_attn must be an int in [0, {n_layers}], got {n_attn!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    head = [i * n_layers // n_attn for i in range(n_attn)]
    keep = {"head-interleaved": head,
            "tail-interleaved": [n_layers - 1 - i for i in reversed(head)],
            "head-stacked": list(range(n_attn)),
            "tail-stacked": list(range(n_layers - n_attn, n_layers))}[placement]
    return ["attn" if i in keep else "mamba2" for i in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# Building blocks

def _float_type(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute norms / decays in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (for (b, L, H, P) input: per head, one weight shared by heads)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(_float_type(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down (HoVLE / InternLM2 names)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w3 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL / HoVLE pixel shuffle (v2): (n, g, g, c) -> (n, g*r, g*r, c/r^2). For r = 0.5 the
    output token (i, j) is the concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3)


class VisionStem(nn.Module):
    """HoVLE's image embedding: patchify conv + learned positions, pixel shuffle, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, s = cfg.hidden_size, cfg.shuffle
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, D))
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(D * s * s, D), nn.GELU(), nn.Linear(D, D))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_img, 3, S, S) -> (n_img, image_tokens, D)."""
        S = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (n_img, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(device=w.device, dtype=w.dtype))  # (n, D, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding                 # (n, g*g, D) row-major
        n, g = x.shape[0], self.cfg.grid
        x = pixel_shuffle(x.reshape(n, g, g, -1), self.cfg.pixel_shuffle_ratio)
        return self.pixel_shuffle_proj(x.reshape(n, -1, x.shape[-1]))


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention, as InternLM2) at positions start..start+L-1.
    x (b, heads, L, P)."""
    L, P = x.shape[-2], x.shape[-1]
    ct = _float_type(x.dtype)
    inv = 1.0 / theta ** (torch.arange(0, P, 2, device=x.device, dtype=ct) / P)       # (P/2,)
    pos = torch.arange(start, start + L, device=x.device, dtype=ct)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)                  # (L, P)
    xf = x.to(ct)
    x1, x2 = xf[..., : P // 2], xf[..., P // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * ang.cos() + rot * ang.sin()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Caches

class KVCache:
    """Keys and values (after RoPE) of one attention layer: (b, Hkv, T, P) each. Grows with the
    context; with `capacity`, storage for that many tokens is allocated once (then grown if needed)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.k = self.v = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append (b, Hkv, L, P) keys/values; return all keys/values so far."""
        L, end = k.shape[2], self.length + k.shape[2]
        if self.k is None:
            size = max(end, self.capacity or 0)
            self.k = k.new_zeros(k.shape[0], k.shape[1], size, k.shape[3])
            self.v = v.new_zeros(v.shape[0], v.shape[1], size, v.shape[3])
        elif end > self.k.shape[2]:                      # grow to exactly what is needed
            extra = end - self.k.shape[2]
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], extra, self.k.shape[3])], 2)
            self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], extra, self.v.shape[3])], 2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class MambaCache:
    """Fixed-size state of one Mamba-2 layer: conv_state (b, C, conv_width-1), the last conv inputs
    (channels [v, k, q]), and ssm_state (b, H, P, N) in float32 (float64 for float64 models)."""

    def __init__(self):
        self.conv_state = None
        self.ssm_state = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_state, self.ssm_state) if t is not None)


class Cache:
    """Per-layer caches plus the number of tokens seen (`length`, the RoPE offset)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by all layers' cache tensors (allocated storage)."""
        return sum(c.nbytes() for c in self.layers)


# ----------------------------------------------------------------------------------------------
# Mixers

class Attention(nn.Module):
    """Causal GQA softmax attention with RoPE (the teacher's mixer), via SDPA."""
    kind = "attn"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(D, H * P, bias=False)
        self.wk = nn.Linear(D, Hkv * P, bias=False)
        self.wv = nn.Linear(D, Hkv * P, bias=False)
        self.wo = nn.Linear(H * P, D, bias=False)

    def heads(self, u: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """softmax(Q K^T / sqrt(P)) V per head, before wo: (b, L, D) -> (b, L, H, P).
        Tokens are at positions start..start+L-1; with a cache, earlier keys/values come from it."""
        cfg = self.cfg
        b, L, _ = u.shape
        H, Hkv, P = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = rope(self.wq(u).view(b, L, H, P).transpose(1, 2), start, cfg.rope_theta)      # (b, H, L, P)
        k = rope(self.wk(u).view(b, L, Hkv, P).transpose(1, 2), start, cfg.rope_theta)    # (b, Hkv, L, P)
        v = self.wv(u).view(b, L, Hkv, P).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=True)
        elif L == 1:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:                                            # a chunk after earlier tokens
            T = k.shape[2]
            mask = torch.arange(T, device=u.device)[None, :] <= torch.arange(past, past + L, device=u.device)[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2)                                                         # (b, L, H, P)

    def forward(self, u, start: int = 0, cache: KVCache | None = None):
        o = self.heads(u, start, cache)
        return self.wo(o.reshape(*o.shape[:2], -1))

    def probs(self, u: torch.Tensor, head: int) -> torch.Tensor:
        """The attention map softmax(q_h k^T / sqrt(P)) of query head `head` over a whole sequence
        with the causal mask, (b, L, L): row t says how token t spreads its attention over tokens
        0..t (stage 0's grounding hints supervise heads with it; `heads` never builds it)."""
        cfg = self.cfg
        b, L, _ = u.shape
        H, Hkv, P = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if not 0 <= head < H:
            raise ValueError(f"head must be in [0, {H}), got {head}")
        g = head // (H // Hkv)                                                           # its KV head
        q = rope(self.wq(u).view(b, L, H, P)[:, :, head, None].transpose(1, 2), 0, cfg.rope_theta)  # (b, 1, L, P)
        k = rope(self.wk(u).view(b, L, Hkv, P)[:, :, g, None].transpose(1, 2), 0, cfg.rope_theta)   # (b, 1, L, P)
        scores = (q @ k.transpose(-1, -2))[:, 0] / math.sqrt(P)                         # (b, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril()
        return scores.to(_float_type(scores.dtype)).masked_fill(~causal, float("-inf")).softmax(-1)


class Mamba2Mixer(nn.Module):
    """The mmMamba Mamba-2 mixer (DESIGN section 5); see the module docstring for the equations.
    Parameter names: wq, wk, wv, wo (inherited from attention by seed.py), and the new ones
    conv1d.{weight,bias}, wdt.weight, dt_bias, A_log, norm.weight, wg.weight."""
    kind = "mamba2"
    INHERITED = ("wq", "wk", "wv", "wo")
    NEW = ("conv1d", "wdt", "dt_bias", "A_log", "norm", "wg")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, P = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(D, H * P, bias=False)         # -> C
        self.wk = nn.Linear(D, Hkv * P, bias=False)       # -> B
        self.wv = nn.Linear(D, Hkv * P, bias=False)       # -> x
        self.wo = nn.Linear(H * P, D, bias=False)
        self.conv_channels = (2 * Hkv + H) * P            # [v, k, q]
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, cfg.conv_width,
                                groups=self.conv_channels, bias=True)   # causal padding done by hand
        self.wdt = nn.Linear(D, H, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.norm = RMSNorm(P, cfg.norm_eps)              # per head, weight (P,) shared by heads
        self.wg = nn.Linear(D, H * P, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Stock initialisation (the `scratch` mode of seed.py): projections normal(0, init_std);
        conv, wdt and wg PyTorch's default init; dt_bias = softplus^-1(dt), dt log-uniform in
        [DT_MIN, DT_MAX]; A = -U(1, 16) stored as A_log = log(-A); norm weight 1."""
        if self.A_log.is_meta:
            return
        cfg, H = self.cfg, self.cfg.n_heads
        for lin in (self.wq, self.wk, self.wv, self.wo):
            _init_(lin.weight, lambda t: t.normal_(0.0, cfg.init_std, generator=generator))
        for lin in (self.wdt, self.wg):
            _init_(lin.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
        _init_(self.conv1d.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
        bound = 1.0 / math.sqrt(cfg.conv_width)            # fan_in of a depthwise conv = width
        _init_(self.conv1d.bias, lambda t: t.uniform_(-bound, bound, generator=generator))
        self.dt_bias.copy_(softplus_inverse(log_uniform_dt(H, generator)))
        a = torch.empty(H, dtype=torch.float64).uniform_(*A_INIT_RANGE, generator=generator)
        self.A_log.copy_(torch.log(a))
        self.norm.weight.fill_(1.0)

    def _conv(self, xbc: torch.Tensor, cache: MambaCache | None):
        """Causal depthwise conv + SiLU over (b, L, C); updates cache.conv_state."""
        b, L, C = xbc.shape
        W = self.cfg.conv_width
        x = xbc.transpose(1, 2)                                                          # (b, C, L)
        prev = cache.conv_state if cache is not None and cache.conv_state is not None else x.new_zeros(b, C, W - 1)
        xp = torch.cat([prev.to(x.dtype), x], dim=2)                                     # (b, C, W-1+L)
        if cache is not None:
            cache.conv_state = xp[:, :, xp.shape[2] - (W - 1):].detach().clone()
        if L == 1:                                                                       # decode: one window
            y = (xp * self.conv1d.weight[:, 0, :]).sum(-1, keepdim=True) + self.conv1d.bias[:, None]
        else:
            y = F.conv1d(xp, self.conv1d.weight, self.conv1d.bias, groups=C)
        return F.silu(y).transpose(1, 2)                                                 # (b, L, C)

    def ssm(self, u: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """The SSD output y before the per-head norm and the gate: (b, L, D) -> (b, L, H, P)."""
        cfg = self.cfg
        b, L, _ = u.shape
        H, Hkv, P, R = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_groups
        xbc = self._conv(torch.cat([self.wv(u), self.wk(u), self.wq(u)], dim=-1), cache)
        v, k, q = torch.split(xbc, [Hkv * P, Hkv * P, H * P], dim=-1)
        x = v.reshape(b, L, Hkv, P).repeat_interleave(R, dim=2)                          # (b, L, H, P)
        B = k.reshape(b, L, Hkv, P).repeat_interleave(R, dim=2)                          # (b, L, H, N=P)
        C = q.reshape(b, L, H, P)                                                        # (b, L, H, N=P)
        ct = _float_type(u.dtype)
        dt = F.softplus(self.wdt(u).to(ct) + self.dt_bias.to(ct))                        # (b, L, H)
        A = -torch.exp(self.A_log.to(ct))                                                # (H,)
        state = cache.ssm_state if cache is not None else None
        if cache is not None and L == 1:                                                 # decode step
            if state is None:
                state = torch.zeros(b, H, P, P, device=u.device, dtype=ct)
            y, state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)
            y = y[:, None]
        else:
            y, state = ssd(x, dt, A, B, C, initial_state=state, chunk_size=cfg.ssd_chunk_size, impl=cfg.ssd_impl)
        if cache is not None:
            cache.ssm_state = state.detach()
        return y

    def heads(self, u: torch.Tensor, start: int = 0, cache: MambaCache | None = None) -> torch.Tensor:
        """Per-head output before wo: RMSNorm_per_head(y) * SiLU(wg u), (b, L, H, P).
        `start` is unused (no positions in the SSM); it keeps the signature of Attention.heads."""
        y = self.ssm(u, cache)
        g = F.silu(self.wg(u)).view(*u.shape[:2], self.cfg.n_heads, self.cfg.head_dim)
        return self.norm(y.to(u.dtype)) * g

    def forward(self, u, start: int = 0, cache: MambaCache | None = None):
        o = self.heads(u, start, cache)
        return self.wo(o.reshape(*o.shape[:2], -1))


def log_uniform_dt(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n values log-uniform in [DT_MIN, DT_MAX] (float64, CPU), floored at DT_FLOOR as mamba_ssm."""
    r = torch.empty(n, dtype=torch.float64).uniform_(generator=generator)
    return torch.exp(r * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp_min(DT_FLOOR)


@torch.no_grad()
def _init_(p: torch.Tensor, fn) -> None:
    """Run an in-place init `fn` on a CPU float copy of p (so a CPU generator works for any device)."""
    if p.is_meta:
        return
    t = torch.empty(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
    fn(t)
    p.copy_(t)


# ----------------------------------------------------------------------------------------------
# The model

class Block(nn.Module):
    """Pre-norm block: h += mixer(attention_norm(h)); h += feed_forward(ffn_norm(h))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = Attention(cfg) if kind == "attn" else Mamba2Mixer(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, start: int = 0, cache=None):
        h = h + self.mixer(self.attention_norm(h), start, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file."""


class Model(nn.Module):
    """Decoder-only VLM; `cfg.layers` says which layers are attention and which Mamba-2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionStem(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def set_config(self, cfg: ModelConfig) -> None:
        """Point the model and every submodule at `cfg` (they share one config object)."""
        for m in self.modules():
            if hasattr(m, "cfg"):
                m.cfg = cfg

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Projections and embeddings normal(0, init_std), biases 0, norms 1, the patch conv
        PyTorch's default; Mamba-2 mixers their stock init (Mamba2Mixer.reset_parameters)."""
        std = self.cfg.init_std
        normal = lambda t: t.normal_(0.0, std, generator=generator)
        for m in self.modules():
            if isinstance(m, Mamba2Mixer):
                m.reset_parameters(generator)
            elif isinstance(m, (Attention, FeedForward)):
                for lin in m.children():
                    _init_(lin.weight, normal)
        for lin in self.vision.pixel_shuffle_proj:
            if isinstance(lin, nn.Linear):
                _init_(lin.weight, normal)
                _init_(lin.bias, torch.Tensor.zero_)
        _init_(self.vision.position_embedding, normal)
        _init_(self.embed_tokens.weight, normal)
        _init_(self.lm_head.weight, normal)

    # -- inputs
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision stem's output per image token: (n_img, 3, S, S) -> (n_img, image_tokens, D)."""
        return self.vision(pixel_values)

    def embed(self, input_ids, pixel_values=None, image_embeds=None) -> torch.Tensor:
        """Token embeddings with image features at `<IMG_CONTEXT>` positions, (b, L, D). Images fill
        the placeholders in order of appearance (row by row); their count must match exactly."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (b, L), got {tuple(input_ids.shape)}")
        h = self.embed_tokens(input_ids)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.vision_features(pixel_values)
        mask = input_ids == self.cfg.img_context_id
        n_slots = int(mask.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            n_img = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(f"input_ids hold {n_slots} <IMG_CONTEXT> tokens (id {self.cfg.img_context_id}) but "
                             f"{n_img} image(s) give {n_feats} image tokens ({self.cfg.image_tokens} per image)")
        if n_feats:
            h = h.masked_scatter(mask[..., None], image_embeds.to(h.dtype))
        return h

    # -- forward
    def forward(self, input_ids, pixel_values=None, *, image_embeds=None, cache: Cache | None = None,
                return_hidden: bool = False, last_only: bool = False):
        """Logits (b, L, V) (or (b, 1, V) with last_only). With `cache`, the tokens continue the
        cached context and the cache is updated. With return_hidden, returns (logits, hidden) where
        hidden[i] (b, L, D) is the residual stream entering layer i and hidden[n_layers] the last
        layer's output (before the final norm)."""
        h = self.embed(input_ids, pixel_values, image_embeds)
        start = cache.length if cache is not None else 0
        hidden = []
        for i, block in enumerate(self.layers):
            if return_hidden:
                hidden.append(h)
            h = block(h, start, cache.layers[i] if cache is not None else None)
        if return_hidden:
            hidden.append(h)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        return (logits, hidden) if return_hidden else logits

    def mixer_inputs(self, input_ids, pixel_values=None, *, image_embeds=None) -> list:
        """Teacher forcing: the normed mixer input u_i = layers[i].attention_norm(hidden[i]) of every
        layer, from one pass of this model. Feed u_i to any model's `layers[i].mixer.heads(u_i)`."""
        _, hidden = self(input_ids, pixel_values, image_embeds=image_embeds, return_hidden=True, last_only=True)
        return [block.attention_norm(h) for block, h in zip(self.layers, hidden)]

    # -- inference
    def new_cache(self, capacity: int | None = None) -> Cache:
        """An empty cache; `capacity` preallocates KV storage for that many tokens."""
        return Cache([KVCache(capacity) if b.kind == "attn" else MambaCache() for b in self.layers])

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32, eos_id: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None, *,
                 image_embeds=None, cache: Cache | None = None) -> torch.Tensor:
        """Prefill the prompt (b, T) (equal-length rows, no padding) with the full-sequence path,
        then decode one token at a time through the cache. temperature 0: greedy; > 0: sampling
        from softmax(logits / temperature) with `generator`. `<IMG_CONTEXT>` is never generated.
        Returns the new tokens (b, T_new), T_new <= max_new_tokens; stops once every row has
        produced eos_id, and rows that finished earlier are padded with eos_id. Pass `cache`
        (empty) to inspect it afterwards."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, T = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids.new_zeros(b, 0)
        if cache is None:
            cache = self.new_cache(capacity=T + max_new_tokens)
        logits = self(input_ids, pixel_values, image_embeds=image_embeds, cache=cache, last_only=True)[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for i in range(max_new_tokens):
            tok = self._pick(logits, temperature, generator)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out.append(tok)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self(tok[:, None], cache=cache)[:, -1]
        return torch.stack(out, dim=1)

    def _pick(self, logits, temperature, generator):
        logits = logits.float().clone()
        logits[:, self.cfg.img_context_id] = float("-inf")
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # -- bookkeeping
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str) -> None:
        """Write directory/config.json and directory/model.safetensors (each atomically)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(os.path.join(directory, WEIGHTS_NAME),
                      lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        self.cfg.save(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu", dtype: torch.dtype | None = None) -> "Model":
        """Load a `save_pretrained` folder. Tensors keep their stored dtype unless `dtype` is given.
        Raises CheckpointError (naming the file) for an unreadable config or weights file, or for
        tensors that do not fit the config (listing missing, unexpected and mis-shaped keys)."""
        from safetensors.torch import load_file
        cfg = ModelConfig.load(os.path.join(directory, CONFIG_NAME))
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such weights file")
        try:
            state = load_file(path, device=str(device))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        with torch.device("meta"):
            model = cls(cfg)
        check_state_dict(model, state, source=path)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype) if dtype is not None else model


load_pretrained = Model.from_pretrained


def check_state_dict(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """Raise CheckpointError naming `source` unless `state` has exactly the model's keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or misshaped:
        lines = [f"{source}: tensors do not fit the model config"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", misshaped)):
            if items:
                lines.append(f"  {name} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))


def read_json(path: str) -> dict:
    """A JSON object from `path`; a missing file, bad JSON or a non-object names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _atomic_write(path: str, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                    # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically (_atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# Self-check

def sample_batch(cfg: ModelConfig, batch: int = 2, text_len: int = 32, seed: int = 0):
    """Random prompts: text, one image's placeholders, text; plus random images (for checks)."""
    g = torch.Generator().manual_seed(seed)
    a = text_len // 2
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, text_len), generator=g)
    ids[ids >= cfg.img_context_id] += 1                   # never the placeholder by chance
    img = torch.full((batch, cfg.image_tokens), cfg.img_context_id)
    ids = torch.cat([ids[:, :a], img, ids[:, a:]], dim=1)
    px = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return ids, px


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = ModelConfig()
    print(f"tiny default: hidden {base.hidden_size}, {base.n_layers} layers, {base.n_heads} heads / "
          f"{base.n_kv_heads} KV heads (head dim {base.head_dim}), MLP {base.intermediate_size}, "
          f"vocab {base.vocab_size}, {base.image_size} px / {base.patch_size} px patches -> "
          f"{base.image_tokens} image tokens")
    ids, px = sample_batch(base)
    print(f"{'layout':<28}{'params':>10}{'prefill ms':>12}{'decode ms/tok':>15}{'cache KB':>10}{'cache err':>11}")
    for name, layers in (("teacher (all attn)", ["attn"] * base.n_layers),
                         ("linear (all mamba2)", make_layers(base.n_layers, 0)),
                         ("hybrid (2 attn, head-int.)", make_layers(base.n_layers, 2))):
        model = Model(base.replace(layers=layers)).eval()
        with torch.no_grad():
            full = model(ids, px)
            cache = model.new_cache()
            t0 = time.perf_counter()
            pre = model(ids[:, :-8], px, cache=cache)
            t1 = time.perf_counter()
            steps = [model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1] - 8, ids.shape[1])]
            t2 = time.perf_counter()
            err = ((torch.cat([pre, *steps], 1) - full).norm() / full.norm()).item()
            gen = model.generate(ids, px, max_new_tokens=args.new_tokens)
        print(f"{name:<28}{model.num_params():>10,}{1e3 * (t1 - t0):>12.1f}{1e3 * (t2 - t1) / 8:>15.2f}"
              f"{cache.nbytes() / 1024:>10.1f}{err:>11.1e}   generated {tuple(gen.shape)}")


if __name__ == "__main__":
    main()

"""Checkpoint formats: HoVLE, the released mmMamba students and this project's own folders read into
`Model`; students written in our format or in the released layout.

Paper map (mmMamba, arXiv 2502.13145): Sec. 3.1 / 4.1 distil HoVLE-2.6B (8 holistic-embedding layers
+ InternLM2-1.8B) into Mamba-2 (mmMamba-linear) or a hybrid keeping some attention layers
(mmMamba-hybrid, Table 6). `load_model` reads the teacher and the released students as published,
so that distill.py, ask.py and experiments/bench.py take them; `save_mmmamba` writes a student as
the official conversion does, `save_model` in our format; `hovle_config` is HoVLE-2.6B's shapes.
A folder holds config.json and model.safetensors, or model.safetensors.index.json and its shards.
Tensors keep their stored dtype unless `dtype`. Errors are `CheckpointError` (a ValueError), one
line naming the file and the key. No q/k rows are permuted: model.rope is rotate-half, as stored.

HoVLE (layout of hovle/*.py in the official repository): embedding_config and llm_config must agree
on every shape model.py shares between layers. Unsupported: biases, rope_scaling, non-SiLU MLPs,
layer scale, special_token_maps, pixel_shuffle_loc other than "pre", a tied LM head. Our layers:
embedding_model.encoder.{i}, then language_model.model.layers.{i}. The position table has the
unused class token in slot 0; the class embedding and the LLM's tok_embeddings are unused by HoVLE's
forward (the LLM receives hidden states) and ignored. Any other unknown key is an error.

mmMamba (the released students): HoVLE's layout plus per-half "layers_block_type" lists ("mamba2"
or "mha"), as convert_weight.py writes them (config edits: REPO/convert_weight.py#L76-L102). A
"mamba2" layer's `attention.` holds what Mamba2_Attention.change_weight leaves (MAMBA2#L779-L806):
    wvkqgdt.weight           ((2 H + 2 Hkv) P + H, D): rows [v | k | q | g | dt] -> wv wk wq wg wdt
    conv1d.weight, .bias     ((H + 2 Hkv) P, 1, 2), ((H + 2 Hkv) P,): channels [v, k, q], d_conv 2
    dt_bias, A_log_bias      (H,), (H,): dt = softplus(W_dt u + dt_bias), A = -exp(A_log_bias)
    g_norm_swish_gate.weight (P,): RMSNorm over P (eps 1e-5), times SiLU(g)
    o_proj.weight            (D, H P): the attention's wo
as its forward uses them (MAMBA2#L669-L748). Where the official code is silent or inconsistent:
  - an "mha" layer holds HoVLE's attention (wqkv, wo): the hybrid trains its kept layers as attention
    (REPO/src/model/convert_model.py#L20-L55); convert_weight.py as written converts every layer;
  - "architectures" is the string "mmMambaChatModel", as REPO/convert_weight.py#L81 writes it (a
    list is read too); transformers finds the remote classes through auto_map;
  - export writes HoVLE's unused tensors (class embedding, position slot 0: zeros; tok_embeddings: a
    copy of the text embeddings), so that the key list is the official one.
REPO = https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb
MAMBA2 = REPO/src/model/linear_attention/mamba2.py

Run:  python convert.py SRC --out DIR [--dtype float32]
      python convert.py STUDENT --out DIR --mmmamba --like HOVLE_TEACHER_DIR
Tests: python -m pytest -q tests/test_convert.py tests/test_released.py
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Model, ModelConfig
from utils import InputError, atomic_write, read_json, run_main, write_json

INDEX_NAME = "model.safetensors.index.json"
E = "embedding_model."
L = "language_model."


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file."""


# config.json's "architectures" (or "model_type") -> format
ARCHITECTURES = {"InternVLChatModel": "hovle", "internvl_chat": "hovle",
                 "mmMambaChatModel": "mmmamba", "mmMamba_chat": "mmmamba"}
BLOCK_TYPES = {"mha": "attn", "mamba2": "mamba2"}       # mmMamba's layers_block_type -> model.py's
BLOCK_NAMES = {"attn": "mha", "mamba2": "mamba2"}

# {our key: theirs} in one layer; the fused projections are split apart (_layer_names)
NORMS_FFN = {f"{k}.weight": f"{k}.weight" for k in ("attention_norm", "ffn_norm", "feed_forward.w1",
                                                    "feed_forward.w2", "feed_forward.w3")}
INTERNLM2_LAYER = {"mixer.wo.weight": "attention.wo.weight", **NORMS_FFN}
MAMBA2_LAYER = {"mixer.conv1d.weight": "attention.conv1d.weight",
                "mixer.conv1d.bias": "attention.conv1d.bias",
                "mixer.dt_bias": "attention.dt_bias", "mixer.A_log": "attention.A_log_bias",
                "mixer.norm.weight": "attention.g_norm_swish_gate.weight",
                "mixer.wo.weight": "attention.o_proj.weight", **NORMS_FFN}

# {our key: theirs} outside the layers
OUTSIDE = {"embed_tokens.weight": E + "llm_text_embeddings.weight",
           "vision.patch_embedding.weight": E + "vision_embeddings.patch_embedding.weight",
           "vision.patch_embedding.bias": E + "vision_embeddings.patch_embedding.bias",
           **{f"vision.pixel_shuffle_proj.{k}": f"{E}pixel_shuffle_proj.{k}"
              for k in ("0.weight", "0.bias", "2.weight", "2.bias")},
           "norm.weight": L + "model.norm.weight", "lm_head.weight": L + "output.weight"}
POSITIONS = E + "vision_embeddings.position_embedding"      # (1, 1 + g*g, D): class token first
CLASS_TOKEN = E + "vision_embeddings.class_embedding"        # unused by HoVLE's forward
LLM_TOKENS = L + "model.tok_embeddings.weight"               # unused: the LLM gets hidden states
SHAPE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
              "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"}

# convert_weight.py#L81-L89: the classes of the remote code (.py files) of the released folders
CHAT_AUTO_MAP = {"AutoConfig": "configuration_mmMamba_chat.mmMambaChatConfig",
                 "AutoModel": "modeling_mmMamba_chat.mmMambaChatModel",
                 "AutoModelForCausalLM": "modeling_mmMamba_chat.mmMambaChatModel"}
LLM_AUTO_MAP = {"AutoConfig": "configuration_mmMamba.mmMambaConfig",
                "AutoModel": "modeling_mmMamba.mmMambaForCausalLM",
                "AutoModelForCausalLM": "modeling_mmMamba.mmMambaForCausalLM"}
# what the tokenizer's and the model's save_pretrained write beside them (convert_weight.py#L73-L74)
COPIED_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "generation_config.json")


def hovle_config(layers: list | None = None, **overrides) -> ModelConfig:
    """HoVLE-2.6B, the paper's teacher: 8 holistic-embedding + 24 InternLM2-1.8B layers, as its
    config.json gives them. 92546 is <IMG_CONTEXT> in the InternVL2 / InternLM2 tokenizer."""
    shapes = dict(vocab_size=92553, hidden_size=2048, intermediate_size=8192, n_heads=16,
                  n_kv_heads=8, layers=layers or ["attn"] * 32, rope_theta=1e6, image_size=448,
                  patch_size=14, img_context_id=92546)
    return ModelConfig(**{**shapes, **overrides})


def split_wqkv(w: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """InternLM2's fused `wqkv.weight` ((H + 2 Hkv) P, D), rows laid out (kv head j, slot, p) with
    slots [q x G, k, v] (G = H / Hkv), into wq (H P, D), wk (Hkv P, D), wv (Hkv P, D). Query head
    j*G + g is slot g of KV group j, so query head h uses KV head h // G, as model.Attention."""
    G = n_heads // n_kv_heads
    D = w.shape[-1]
    w = w.reshape(n_kv_heads, G + 2, head_dim, D)
    parts = (w[:, :G], w[:, G], w[:, -1])
    return tuple(t.reshape(-1, D).clone(memory_format=torch.contiguous_format) for t in parts)


def fuse_wqkv(wq, wk, wv, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of split_wqkv."""
    groups = [w.unflatten(0, (n_kv_heads, -1, head_dim)) for w in (wq, wk, wv)]
    return torch.cat(groups, dim=1).flatten(0, 2)


def _layer_names(kind: str) -> tuple:
    """For a layer of `kind`: ({our key: theirs}, their fused projection's key, our projections in
    its row order). InternLM2's wqkv interleaves by KV group (split_wqkv); mmMamba's wvkqgdt stacks
    [v | k | q | g | dt] (MAMBA2#L797)."""
    if kind == "mamba2":
        return MAMBA2_LAYER, "attention.wvkqgdt.weight", ("wv", "wk", "wq", "wg", "wdt")
    return INTERNLM2_LAYER, "attention.wqkv.weight", ("wq", "wk", "wv")


def _prefix(i: int, n_embed: int) -> str:
    """Their key prefix of layer i: HoVLE's embedding model holds the first n_embed layers."""
    if i < n_embed:
        return f"{E}encoder.{i}."
    return f"{L}model.layers.{i - n_embed}."


class _Tensors:
    """The tensors of a folder: model.safetensors, or the shards model.safetensors.index.json lists.
    `get` checks presence and shape before reading and records the key as used."""

    def __init__(self, directory: str):
        self.listing = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, "model.safetensors")
        self.files = {}
        self.used = set()
        if os.path.isfile(self.listing):
            weight_map = read_json(self.listing).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{self.listing}: missing key 'weight_map' (tensor key -> shard)")
        elif os.path.isfile(single):
            self.listing = single
            weight_map = dict.fromkeys(self._open(single).keys(), "model.safetensors")
        else:
            raise CheckpointError(f"{directory}: no weights: expected model.safetensors or {INDEX_NAME}")
        self.where = {key: os.path.join(directory, str(shard)) for key, shard in weight_map.items()}
        for key, path in self.where.items():
            if not os.path.isfile(path):
                raise CheckpointError(f"{self.listing}: shard '{weight_map[key]}' (holding key '{key}', "
                                      f"among others) is missing: no file {path}")

    def _open(self, path: str):
        if path not in self.files:
            try:
                self.files[path] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:          # safetensors has its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        return self.files[path]

    def get(self, key: str, *shapes) -> torch.Tensor:
        """The tensor `key`, which must have one of `shapes` (derived from config.json)."""
        if key not in self.where:
            raise CheckpointError(f"{self.listing}: missing key '{key}'")
        path = self.where[key]
        f = self._open(path)
        if key not in f.keys():
            raise CheckpointError(f"{path}: missing key '{key}' (listed in {self.listing})")
        shape = tuple(f.get_slice(key).get_shape())
        shapes = [tuple(s) for s in shapes]
        if shape not in shapes:
            raise CheckpointError(f"{path}: key '{key}' has shape {shape}, expected "
                                  f"{' or '.join(map(str, shapes))} from config.json")
        self.used.add(key)
        return f.get_tensor(key)

    def take(self, own: dict, names: dict) -> dict:
        """{our key: their tensor} for names = {our key: their key}, shaped as our `own` tensors."""
        return {ours: self.get(theirs, own[ours].shape) for ours, theirs in names.items()}

    def check_all_used(self) -> None:
        left = sorted(k for k in self.where if k not in self.used and not k.endswith("inv_freq"))
        if left:
            raise CheckpointError(f"{self.listing}: {len(left)} unexpected key(s) that model.py has no "
                                  f"place for (e.g. attention biases): {', '.join(map(repr, left))}")


class _Config:
    """A config.json: values by dotted key ("llm_config.vocab_size"), null as absent."""

    def __init__(self, path: str):
        self.path = path
        self.d = read_json(path)

    def get(self, key: str, default=...):
        """The value at `key`; without `default`, an absent key is an error."""
        v = self.d
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is None and default is ...:
            raise CheckpointError(f"{self.path}: missing key '{key}'")
        if v is None:
            return default
        return v

    def number(self, key: str, default=..., integer: bool = True):
        """A positive int, or (integer=False) a positive number as a float."""
        v = self.get(key, default)
        if integer:
            kinds = int
            what = "integer"
        else:
            kinds = (int, float)
            what = "number"
        if not isinstance(v, kinds) or isinstance(v, bool) or not v > 0:
            raise CheckpointError(f"{self.path}: key '{key}' must be a positive {what}, got {v!r}")
        if integer:
            return v
        return float(v)

    def supported(self, *checks) -> None:
        """Each check (dotted key, the one supported value, why) passes if the key is absent or has it."""
        for key, value, why in checks:
            if (v := self.get(key, value)) != value:
                raise CheckpointError(f"{self.path}: key '{key}' = {v!r} is not supported ({why})")


def _decoder(c: _Config, prefix: str) -> dict:
    """The SHAPE_KEYS and num_hidden_layers of either half of HoVLE (InternLM2's keys), checked; a
    bias, layer scale or tied head has tensors that load_model finds no place for."""
    c.supported((prefix + "hidden_act", "silu", "model.py's MLP is SwiGLU with SiLU"),
                (prefix + "rope_scaling", None, "model.rope has no scaling"))
    keys = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    out = {k: c.number(prefix + k) for k in keys}
    out["num_key_value_heads"] = c.number(prefix + "num_key_value_heads", out["num_attention_heads"])
    out["rope_theta"] = c.number(prefix + "rope_theta", 10000.0, integer=False)
    out["rms_norm_eps"] = c.number(prefix + "rms_norm_eps", 1e-6, integer=False)
    return out


def _model_config(c: _Config, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError, ZeroDivisionError) as e:         # a zero size divides
        raise CheckpointError(f"{c.path}: invalid model config: {e}") from e


def _kinds(c: _Config, prefix: str, n_layers: int, fmt: str) -> list:
    """model.py's layer kinds of one half of HoVLE: all attention, or mmMamba's layers_block_type."""
    if fmt == "hovle":
        return ["attn"] * n_layers
    key = prefix + "layers_block_type"
    kinds = c.get(key)
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise CheckpointError(f"{c.path}: key '{key}' must list {n_layers} block types "
                              f"({prefix}num_hidden_layers), got {kinds!r}")
    for i, kind in enumerate(kinds):
        if kind not in BLOCK_TYPES:
            raise CheckpointError(f"{c.path}: key '{key}' has unknown block type {kind!r} at index {i} "
                                  f"(known: {', '.join(map(repr, BLOCK_TYPES))})")
    return [BLOCK_TYPES[k] for k in kinds]


def _hovle_config(c: _Config, fmt: str) -> ModelConfig:
    """HoVLE's or mmMamba's config.json as a ModelConfig; both halves must share every shape."""
    e = "embedding_config."
    l = "llm_config."
    c.supported((e + "pixel_shuffle_loc", "pre", "model.py shuffles the patches before the layers"),
                (e + "special_token_maps", {}, "no embeddings beyond the LLM vocabulary"))
    ce = _decoder(c, e)
    cl = _decoder(c, l)
    vocab = c.number(l + "vocab_size")
    size = c.number(e + "image_size")
    D = ce["hidden_size"]
    pairs = [(e + k, ce[k], l + k, cl[k]) for k in SHAPE_KEYS] + [
        (e + "llm_hidden_size", c.number(e + "llm_hidden_size", D), e + "hidden_size", D),
        (e + "llm_vocab_size", c.number(e + "llm_vocab_size", vocab), l + "vocab_size", vocab),
        ("force_image_size", c.get("force_image_size", size), e + "image_size", size)]
    for key_a, a, key_b, b in pairs:
        if a != b:
            raise CheckpointError(f"{c.path}: key '{key_a}' = {a!r} but '{key_b}' = {b!r}; model.py needs "
                                  f"them equal (one set of shapes for all layers, no resized positions)")
    layers = _kinds(c, e, ce["num_hidden_layers"], fmt) + _kinds(c, l, cl["num_hidden_layers"], fmt)
    ratio = c.number(e + "downsample_ratio", c.number("downsample_ratio", 0.5, integer=False),
                     integer=False)
    img = c.get(e + "img_context_token_id", c.get("img_context_token_id", 92546))  # <IMG_CONTEXT>
    shapes = {ours: ce[theirs] for theirs, ours in SHAPE_KEYS.items()}
    return _model_config(c, **shapes, layers=layers, vocab_size=vocab, image_size=size,
                         pixel_shuffle_ratio=ratio, patch_size=c.number(e + "patch_size"),
                         img_context_id=img)


def detect_format(directory: str) -> str:
    """"native" (save_model's config.json), "hovle" or "mmmamba"."""
    path = os.path.join(directory, "config.json")
    d = read_json(path)
    if "layers" in d:
        return "native"
    arch = d.get("architectures") or d.get("model_type")
    if isinstance(arch, list) and arch:
        arch = arch[0]
    fmt = ARCHITECTURES.get(str(arch))
    if str(arch).startswith("HoVLE"):
        fmt = "hovle"
    if fmt is None:
        raise CheckpointError(f"{path}: unknown architecture '{arch}' (key 'architectures'); supported: "
                              "InternVLChatModel or HoVLE* (HoVLE), mmMambaChatModel, or our own format")
    if "embedding_config" not in d or "llm_config" not in d:
        raise CheckpointError(f"{path}: architecture '{arch}' without keys 'embedding_config' and "
                              f"'llm_config': only HoVLE (no separate vision encoder) is supported")
    return fmt


def _state(t: _Tensors, cfg: ModelConfig, c: _Config, own: dict) -> dict:
    """Our tensors from HoVLE's or mmMamba's: the embedding model's layers, the LLM's, the rest;
    `own`: our state dict (the shapes)."""
    n_embed = c.get("embedding_config.num_hidden_layers")
    state = {}
    for i in range(cfg.n_layers):
        names, fused, parts = _layer_names(cfg.layers[i])
        prefix = _prefix(i, n_embed)
        ours = f"layers.{i}."
        state.update(t.take(own, {ours + k: prefix + v for k, v in names.items()}))
        rows = [own[f"{ours}mixer.{p}.weight"].shape[0] for p in parts]
        w = t.get(prefix + fused, (sum(rows), cfg.hidden_size))
        if fused.endswith("wqkv.weight"):
            pieces = split_wqkv(w, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        else:
            pieces = [x.clone() for x in w.split(rows)]
        state.update({f"{ours}mixer.{p}.weight": x for p, x in zip(parts, pieces)})
    g2 = cfg.grid ** 2
    pos = t.get(POSITIONS, (1, 1 + g2, cfg.hidden_size), (1, g2, cfg.hidden_size))
    state["vision.position_embedding"] = pos[:, -g2:].clone()    # without the class token's slot
    t.used |= {CLASS_TOKEN, LLM_TOKENS}
    state.update(t.take(own, OUTSIDE))
    return state


def load_model(directory: str, dtype: torch.dtype | None = None, device="cpu") -> Model:
    """Any supported checkpoint folder as a Model (see `detect_format`): the one loader of every
    entry point."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    fmt = detect_format(directory)
    c = _Config(os.path.join(directory, "config.json"))
    if fmt == "native":
        cfg = _model_config(c, **c.d)
    else:
        cfg = _hovle_config(c, fmt)
    with torch.device("meta"):
        model = Model(cfg)
    own = model.state_dict()
    t = _Tensors(directory)
    if fmt == "native":                                  # every tensor as stored, checked below
        state = {k: t._open(path).get_tensor(k) for k, path in t.where.items()}
    else:
        state = _state(t, cfg, c, own)
        t.check_all_used()
    shared = set(own) & set(state)
    problems = {"missing keys": sorted(set(own) - set(state)),
                "unexpected keys": sorted(set(state) - set(own)),
                "mis-shaped keys": sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                                          f"{tuple(own[k].shape)}" for k in shared
                                          if state[k].shape != own[k].shape)}
    if any(problems.values()):
        raise CheckpointError(f"{t.listing}: tensors do not fit the model config: " + "; ".join(
            f"{name} ({len(ks)}): {', '.join(ks)}" for name, ks in problems.items() if ks))
    model.load_state_dict(state, strict=True, assign=True)
    del state, t              # the model holds the tensors: a cast below frees each stored one in turn
    return model.to(device=device, dtype=dtype)


def save_model(model: Model, directory: str) -> None:
    """Our format: directory/config.json and directory/model.safetensors, each written atomically."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _write_shards(directory, state, shard_bytes=float("inf"))       # one file; a former save's go
    write_json(os.path.join(directory, "config.json"), dataclasses.asdict(model.cfg))


# ----------------------------------------------------------------------------------------------
# Export in the released layout

def _official_state(model: Model, n_embed: int) -> dict:
    """{their key: tensor} of `model` in the released layout, the embedding model's keys first."""
    cfg = model.cfg
    state = model.state_dict()
    pos = state["vision.position_embedding"]                               # (1, g*g, D)
    slot0 = pos.new_zeros(1, 1, cfg.hidden_size)
    out = {CLASS_TOKEN: slot0.clone(), POSITIONS: torch.cat([slot0, pos], dim=1)}
    outside = {theirs: state[ours] for ours, theirs in OUTSIDE.items()}
    out.update({k: v for k, v in outside.items() if k.startswith(E)})
    for i in range(cfg.n_layers):
        names, fused, parts = _layer_names(cfg.layers[i])
        prefix = _prefix(i, n_embed)
        out.update({prefix + theirs: state[f"layers.{i}.{ours}"] for ours, theirs in names.items()})
        weights = [state[f"layers.{i}.mixer.{p}.weight"] for p in parts]
        if fused.endswith("wqkv.weight"):
            out[prefix + fused] = fuse_wqkv(*weights, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        else:
            out[prefix + fused] = torch.cat(weights)
    out.update({k: v for k, v in outside.items() if k.startswith(L)})
    out[LLM_TOKENS] = state["embed_tokens.weight"].clone()
    return out


def _write_shards(directory: str, tensors: dict, shard_bytes: int) -> None:
    """model.safetensors, or shards of at most shard_bytes (no tensor split) and their index, named
    as transformers' save_pretrained names them."""
    groups = [{}]
    size = 0
    for key, v in tensors.items():
        if groups[-1] and size + v.nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = v
        size += v.nbytes
    names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    if len(groups) == 1:
        names = ["model.safetensors"]
    for name, group in zip(names, groups):
        write = functools.partial(save_file, group, metadata={"format": "pt"})
        atomic_write(os.path.join(directory, name), write)
    written = {os.path.join(directory, name) for name in names}
    if len(groups) > 1:
        weight_map = {key: name for name, group in zip(names, groups) for key in group}
        write_json(os.path.join(directory, INDEX_NAME), {
            "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
            "weight_map": dict(sorted(weight_map.items()))})
        written.add(os.path.join(directory, INDEX_NAME))
    for path in glob.glob(os.path.join(directory, "model*.safetensors*")):
        if path not in written:                  # a former save's, as transformers cleans up too
            os.remove(path)


def save_mmmamba(model: Model, directory: str, like: str, dtype: torch.dtype = torch.bfloat16,
                 shard_bytes: int = 5 * 10 ** 9) -> None:
    """Write `model` as convert_weight.py writes a student: the released key names and shapes, every
    tensor in `dtype` (bfloat16: the script loads the teacher in bfloat16), shards of <= 5 GB
    (transformers' default) with an index, and config.json: that of `like` (the HoVLE teacher, or an
    mmMamba folder, of the model's shapes: the script starts from the teacher's) with the script's
    edits for the model's layer kinds. The tokenizer files of `like` are copied, and the remote code
    (*.py) of an mmMamba `like`: it is what runs the released students (docs/usage.md)."""
    fmt = detect_format(like)
    c = _Config(os.path.join(like, "config.json"))
    if fmt == "native":
        raise InputError(f"{like}: `like` must be a HoVLE or mmMamba folder, got format '{fmt}'")
    cfg = model.cfg
    theirs = _hovle_config(c, fmt)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "n_layers",
              "image_size", "patch_size", "pixel_shuffle_ratio", "img_context_id", "rope_theta"):
        if getattr(theirs, f) != getattr(cfg, f):
            raise InputError(f"{c.path}: its {f} is {getattr(theirs, f)}, the model's {getattr(cfg, f)}")
    n_embed = c.get("embedding_config.num_hidden_layers")
    kinds = [BLOCK_NAMES[k] for k in cfg.layers]
    d = dict(c.d, _name_or_path=directory, architectures="mmMambaChatModel", model_type="mmMamba_chat",
             torch_dtype=str(dtype).removeprefix("torch."))           # convert_weight.py#L80-L102
    d["auto_map"] = {**d.get("auto_map", {}), **CHAT_AUTO_MAP}
    d["embedding_config"] = dict(d["embedding_config"], model_type="mmMamba_embedding",
                                 layers_block_type=kinds[:n_embed])
    d["llm_config"] = dict(d["llm_config"], architectures="mmMambaForCausalLM", model_type="mmMamba",
                           layers_block_type=kinds[n_embed:])
    d["llm_config"]["auto_map"] = {**d["llm_config"].get("auto_map", {}), **LLM_AUTO_MAP}
    os.makedirs(directory, exist_ok=True)
    state = _official_state(model, n_embed)
    _write_shards(directory, {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
                  shard_bytes)
    write_json(os.path.join(directory, "config.json"), d)
    copied = [os.path.join(like, f) for f in COPIED_FILES]
    if fmt == "mmmamba":
        copied += glob.glob(os.path.join(like, "*.py"))
    for path in filter(os.path.isfile, copied):
        shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Read a checkpoint folder (HoVLE, mmMamba, ours); "
                                            "write it in our format or mmMamba's")
    p.add_argument("src", help="checkpoint folder (any supported format)")
    p.add_argument("--out", help="write the model to this folder (our format unless --mmmamba)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                   help="cast the weights (--mmmamba: default bfloat16)")
    p.add_argument("--mmmamba", action="store_true", help="write --out in the released mmMamba layout")
    p.add_argument("--like", help="with --mmmamba: the HoVLE teacher (or an mmMamba) folder whose "
                                  "config and tokenizer the export starts from, as convert_weight.py")
    args = p.parse_args(argv)
    if args.mmmamba and not (args.out and args.like):
        raise InputError("--mmmamba: needs --out and --like")
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    model = load_model(args.src, dtype=dtype)
    if args.mmmamba:
        save_mmmamba(model, args.out, args.like, getattr(torch, args.dtype or "bfloat16"))
    elif args.out:
        save_model(model, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    line = (f"{args.src}: {detect_format(args.src)}, {n_params:,} parameters, {model.cfg.n_layers} "
            f"layers ({model.cfg.layers.count('attn')} attention)")
    if args.out:
        line += f"; wrote {args.out}"
    print(line)


if __name__ == "__main__":
    run_main(main)

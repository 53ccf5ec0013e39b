"""Import real checkpoints (HoVLE, InternLM2, Llama) into this project's `Model`; export students.

Paper map (mmMamba, arXiv 2502.13145): Sec. 3.1 / Sec. 4.1 distil HoVLE-2.6B (8 holistic-embedding
layers + InternLM2-1.8B) into Mamba-2. This file reads such a teacher, as published, into
`model.ModelConfig` + `model.Model` (DESIGN section 4), so that `distill.py --teacher DIR` can start
from it, and writes distilled students back out as a folder (`export`).

API
    load_model(dir, dtype=None, device="cpu", img_context_id=None) -> Model
                        dispatches on dir/config.json (`detect_format`): this project's own folder
                        (`Model.from_pretrained`), HoVLE, InternLM2 (text only) or Llama (text only)
    load_hovle(dir, ...), load_internlm2(dir, ...), load_llama(dir, ...)   one format each
    detect_format(dir) -> "native" | "hovle" | "internlm2" | "llama"
    export(model, dir)  dir/config.json + dir/model.safetensors (loads back with Model.from_pretrained)
    import_checkpoint(src, out, dtype=None)   load_model(src) then export(out)
    split_wqkv / fuse_wqkv                    InternLM2's fused q/k/v rows <-> separate wq, wk, wv
    write_tiny_hovle / write_tiny_internlm2 / write_tiny_llama   small random checkpoints in the
                        published layouts (tests; a teacher for a quick `distill.py` run)
Every failure raises `model.CheckpointError` (a ValueError) whose message names the file and, where
there is one, the key: a shard listed in the index but absent, a missing or mis-shaped tensor, an
unexpected tensor, an unknown architecture, a missing or unsupported config.json key, a config.json
that is not JSON.

Folder layout read (Hugging Face style): config.json, and either model.safetensors or
model.safetensors.index.json ({"weight_map": {key: shard file}}) with its shards. Tensors keep their
stored dtype unless `dtype` is given (distill.py casts the teacher to float32).

HoVLE (assumptions; inferred from the published HoVLE / mmMamba code, HolisticEmbeddingConfig and
InternLM2Config, since the weights cannot be downloaded here)
  config.json: top level "architectures": ["InternVLChatModel"] (the class HoVLE's remote code
  defines; any name starting with "HoVLE" is accepted too) with two sub-configs:
    embedding_config (HolisticEmbeddingConfig, model_type "holistic_embedding"): num_hidden_layers
      (8), hidden_size, num_attention_heads, num_key_value_heads (default = heads),
      intermediate_size, rope_theta, rms_norm_eps, image_size, patch_size, num_channels (3),
      downsample_ratio (0.5; also read from the top level), img_context_token_id (default 92546),
      llm_vocab_size / llm_hidden_size (checked against the tensors), use_pixel_shuffle_proj (must
      be true; default true), pixel_shuffle_loc (must be "pre"), special_token_maps (must be empty),
      attention_bias / mlp_bias (must be false), hidden_act ("silu"), rope_scaling (null).
    llm_config (InternLM2Config, "InternLM2ForCausalLM"): num_hidden_layers (24), hidden_size,
      num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, rope_theta,
      rms_norm_eps, bias (false), hidden_act, rope_scaling (null), tie_word_embeddings (false).
  model.py has ONE set of these for all layers, so hidden_size, heads, KV heads, intermediate_size,
  rope_theta and rms_norm_eps must agree between the two sub-configs (an error names the key if
  not). force_image_size at the top level, when present, must equal embedding_config.image_size
  (HoVLE would bicubic-resize its position table at run time; that is not done here).
  Weights (DESIGN section 4): embedding_model.encoder.{i}.* and language_model.model.layers.{i}.*
  with attention.wqkv (rows (kv head, [q x groups, k, v], head dim): see split_wqkv), attention.wo,
  feed_forward.w1 (gate) / w3 (up) / w2 (down), attention_norm, ffn_norm; language_model.model.norm,
  language_model.output (untied LM head); embedding_model.vision_embeddings.patch_embedding.{weight,
  bias} (Conv2d(3, D, p, stride p)); ...vision_embeddings.position_embedding, shape (1, 1 + g*g, D):
  slot 0 belongs to the unused class token (HoVLE adds position_embedding[:, 1:] to the g x g
  patches, row-major; a (1, g*g, D) table without that slot is accepted too);
  embedding_model.pixel_shuffle_proj.{0,2}.{weight,bias} (Linear(4D, D), GELU, Linear(D, D) after
  the InternVL pixel shuffle); embedding_model.llm_text_embeddings (the text embedding).
  Ignored (present in HoVLE but unused by its forward): ...vision_embeddings.class_embedding,
  language_model.model.tok_embeddings.weight (the LLM receives the embedding model's hidden
  states), any *.rotary_emb.inv_freq. Any other tensor is an error (e.g. attention biases).
  Our layers = the embedding model's layers followed by the LLM's, all "attn"; positions run
  0..L-1 through both, as in HoVLE.

Text-only decoders (InternLM2ForCausalLM: model.tok_embeddings, model.layers.{i}.attention.wqkv,
  ..., model.norm, output; LlamaForCausalLM: model.embed_tokens, model.layers.{i}.self_attn.
  {q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm,
  lm_head, tied to embed_tokens when tie_word_embeddings and no lm_head is stored). `Model` always
  has a vision stem, so these get a zero stem of the smallest shape (1 px images, 1 px patches, no
  shuffle: one image token): IMAGE INPUTS ARE NOT SUPPORTED for them, and since `Model` treats the
  id `img_context_id` as an image placeholder, that id is reserved: by default the last vocabulary
  id (pass img_context_id= to choose another). A prompt containing it makes Model.embed raise, and
  generate() never emits it. Not supported (an error names the key): attention / MLP biases,
  rope_scaling (e.g. Llama 3.1), head_dim != hidden_size / heads, activations other than SiLU.

RoPE: model.rope uses the rotate-half layout (dimension i pairs with i + P/2, frequency
theta^(-2i/P)), which is what HF Llama and InternLM2 (hence HoVLE) compute, and HF Llama checkpoints
already store q/k rows for that layout; so no row permutation is applied (Meta's original
interleaved `consolidated.*.pth` files are not read).

Run:
    python convert.py SRC --out DIR            # import any supported folder, save in our format
    python convert.py --write-tiny-hovle DIR   # tiny random HoVLE checkpoint (2 shards), fits data.py
    python distill.py --stage 1 --teacher DIR  # distil it (the teacher is imported on the fly)
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from model import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, Model, ModelConfig, _atomic_write, check_state_dict, read_json

INDEX_NAME = "model.safetensors.index.json"
HOVLE_ARCHS = ("InternVLChatModel",)            # plus any name starting with "HoVLE"
INTERNLM2_ARCHS = ("InternLM2ForCausalLM",)
LLAMA_ARCHS = ("LlamaForCausalLM",)
FORMATS = ("native", "hovle", "internlm2", "llama")
HOVLE_IMG_CONTEXT_ID = 92546                    # <IMG_CONTEXT> in the InternLM2 / InternVL2 tokenizer
_REQUIRED = object()


# ----------------------------------------------------------------------------------------------
# Fused q/k/v (InternLM2, HoVLE)

def split_wqkv(w: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """InternLM2's fused `wqkv.weight` ((H + 2 Hkv) P, D), rows laid out (kv head j, slot, p) with
    slots [q x G, k, v] (G = H / Hkv), into wq (H P, D), wk (Hkv P, D), wv (Hkv P, D). Query head
    j*G + g is slot g of KV group j, so query head h uses KV head h // G, as model.Attention."""
    G = n_heads // n_kv_heads
    w = w.reshape(n_kv_heads, G + 2, head_dim, w.shape[-1])
    wq = w[:, :G].reshape(n_heads * head_dim, -1)
    wk = w[:, G].reshape(n_kv_heads * head_dim, -1)
    wv = w[:, G + 1].reshape(n_kv_heads * head_dim, -1)
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (wq, wk, wv))


def fuse_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_heads: int, n_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """The inverse of split_wqkv."""
    G, D = n_heads // n_kv_heads, wq.shape[-1]
    parts = [wq.reshape(n_kv_heads, G, head_dim, D), wk.reshape(n_kv_heads, 1, head_dim, D),
             wv.reshape(n_kv_heads, 1, head_dim, D)]
    return torch.cat(parts, dim=1).reshape(-1, D)


# ----------------------------------------------------------------------------------------------
# Reading a folder

class _Tensors:
    """The tensors of a folder: model.safetensors, or the shards that model.safetensors.index.json
    lists. `get` checks presence and shape (before reading) and records the key as used."""

    def __init__(self, directory: str, device="cpu"):
        self.device = str(device)
        self.handles = {}
        self.used = set()
        index, single = os.path.join(directory, INDEX_NAME), os.path.join(directory, WEIGHTS_NAME)
        if os.path.isfile(index):
            d = read_json(index)
            wm = d.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: missing key 'weight_map' (a non-empty object key -> shard file)")
            self.listing, self.where = index, {}
            for key, shard in wm.items():
                if not isinstance(shard, str):
                    raise CheckpointError(f"{index}: weight_map['{key}'] must be a file name, got {shard!r}")
                path = os.path.join(directory, shard)
                if not os.path.isfile(path):
                    n = sum(1 for s in wm.values() if s == shard)
                    raise CheckpointError(f"{index}: shard '{shard}' (holding {n} tensor(s), e.g. key '{key}') "
                                          f"is missing: no file {path}")
                self.where[key] = path
        elif os.path.isfile(single):
            self.listing = single
            self.where = {k: single for k in self._handle(single).keys()}
        else:
            raise CheckpointError(f"{directory}: no weights: expected {WEIGHTS_NAME} or {INDEX_NAME} "
                                  f"(with its *.safetensors shards)")

    def _handle(self, path: str):
        if path not in self.handles:
            from safetensors import safe_open
            try:
                self.handles[path] = safe_open(path, framework="pt", device=self.device)
            except Exception as e:   # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        return self.handles[path]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple:
        if key not in self.where:
            raise CheckpointError(f"{self.listing}: missing key '{key}'")
        path = self.where[key]
        h = self._handle(path)
        if key not in h.keys():
            raise CheckpointError(f"{path}: missing key '{key}' (listed in {self.listing})")
        return tuple(h.get_slice(key).get_shape())

    def get(self, key: str, shape: tuple | None = None, what: str = "") -> torch.Tensor:
        """The tensor `key`, which must have `shape`; `what` explains the expected shape."""
        if key not in self.where:
            exp = f" (expected shape {tuple(shape)}{what})" if shape is not None else ""
            raise CheckpointError(f"{self.listing}: missing key '{key}'{exp}")
        got = self.shape(key)
        if shape is not None and got != tuple(shape):
            raise CheckpointError(f"{self.where[key]}: key '{key}' has shape {got}, expected "
                                  f"{tuple(shape)}{what} from config.json")
        self.used.add(key)
        return self._handle(self.where[key]).get_tensor(key)

    def check_all_used(self, ignore=lambda key: False) -> None:
        left = sorted(k for k in self.where if k not in self.used and not ignore(k))
        if left:
            items = ", ".join(f"'{k}' ({os.path.basename(self.where[k])})" for k in left[:20])
            more = f" and {len(left) - 20} more" if len(left) > 20 else ""
            raise CheckpointError(f"{self.listing}: {len(left)} unexpected key(s) that model.py has no place "
                                  f"for (e.g. attention biases): {items}{more}")


class _Conf:
    """Typed access to a (sub-)config of config.json, with errors naming the file and the key."""

    def __init__(self, d: dict, path: str, prefix: str = ""):
        self.d, self.path, self.prefix = d, path, prefix

    def sub(self, key: str) -> "_Conf":
        v = self.get(key)
        if not isinstance(v, dict):
            raise CheckpointError(f"{self.path}: key '{self.prefix}{key}' must be an object, got {type(v).__name__}")
        return _Conf(v, self.path, f"{self.prefix}{key}.")

    def get(self, key: str, default=_REQUIRED):
        if key in self.d and self.d[key] is not None:
            return self.d[key]
        if default is _REQUIRED:
            raise CheckpointError(f"{self.path}: missing key '{self.prefix}{key}'")
        return default

    def int(self, key: str, default=_REQUIRED) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{self.path}: key '{self.prefix}{key}' must be a positive integer, got {v!r}")
        return v

    def float(self, key: str, default=_REQUIRED) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise CheckpointError(f"{self.path}: key '{self.prefix}{key}' must be a positive number, got {v!r}")
        return float(v)

    def require(self, key: str, allowed, default, why: str) -> None:
        v = self.d.get(key, default)
        if v not in allowed:
            raise CheckpointError(f"{self.path}: key '{self.prefix}{key}' = {v!r} is not supported ({why})")


def _same(a: _Conf, b: _Conf, key: str, va, vb) -> None:
    if va != vb:
        raise CheckpointError(f"{a.path}: key '{a.prefix}{key}' = {va!r} but '{b.prefix}{key}' = {vb!r}; "
                              f"model.py uses one value for all layers")


def _decoder_checks(c: _Conf, bias_key: str) -> None:
    c.require(bias_key, (False,), False, "model.py's attention has no biases")
    c.require("mlp_bias", (False,), False, "model.py's MLP has no biases")
    c.require("hidden_act", ("silu",), "silu", "model.py's MLP is SwiGLU with SiLU")
    c.require("rope_scaling", (None,), None, "model.rope has no scaling")


def _architecture(d: dict, path: str):
    a = d.get("architectures")
    if isinstance(a, list):
        if len(a) != 1 or not isinstance(a[0], str):
            raise CheckpointError(f"{path}: key 'architectures' must name one architecture, got {a!r}")
        return a[0]
    if a is not None and not isinstance(a, str):
        raise CheckpointError(f"{path}: key 'architectures' must be a list of names, got {a!r}")
    return a


def detect_format(directory: str) -> str:
    """"native" (a ModelConfig config.json), "hovle", "internlm2" or "llama", from config.json."""
    path = os.path.join(directory, CONFIG_NAME)
    d = read_json(path)
    arch = _architecture(d, path)
    supported = ", ".join(HOVLE_ARCHS + ("HoVLE*",) + INTERNLM2_ARCHS + LLAMA_ARCHS)
    if arch is None:
        mt = d.get("model_type")
        if "embedding_config" in d and "llm_config" in d:
            return "hovle"
        if mt in ("internlm2", "llama"):
            return mt
        known = {f for f in ModelConfig.__dataclass_fields__}
        if "layers" in d and set(d) <= known:
            return "native"
        raise CheckpointError(f"{path}: cannot tell the checkpoint format: no key 'architectures' (supported: "
                              f"{supported}) and not a ModelConfig (unknown keys {sorted(set(d) - known)[:8]})")
    if arch in HOVLE_ARCHS or arch.startswith("HoVLE"):
        if "embedding_config" not in d:
            raise CheckpointError(f"{path}: architecture '{arch}' without key 'embedding_config': only HoVLE "
                                  f"(holistic embedding, no separate vision encoder) is supported")
        return "hovle"
    if arch in INTERNLM2_ARCHS:
        return "internlm2"
    if arch in LLAMA_ARCHS:
        return "llama"
    raise CheckpointError(f"{path}: unknown architecture '{arch}' (key 'architectures'); supported: {supported}, "
                          f"or this project's own config.json")


def _finish(cfg: ModelConfig, state: dict, source: str, dtype, device) -> Model:
    with torch.device("meta"):
        model = Model(cfg)
    check_state_dict(model, state, source=source)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def _block(state: dict, i: int, wq, wk, wv, wo, w1, w2, w3, attn_norm, ffn_norm) -> None:
    p = f"layers.{i}."
    state.update({p + "attention_norm.weight": attn_norm, p + "mixer.wq.weight": wq, p + "mixer.wk.weight": wk,
                  p + "mixer.wv.weight": wv, p + "mixer.wo.weight": wo, p + "ffn_norm.weight": ffn_norm,
                  p + "feed_forward.w1.weight": w1, p + "feed_forward.w2.weight": w2,
                  p + "feed_forward.w3.weight": w3})


def _internlm2_block(t: _Tensors, state: dict, i: int, prefix: str, cfg: ModelConfig) -> None:
    """One InternLM2 decoder layer at `prefix` (attention.wqkv / wo, feed_forward, norms)."""
    D, H, Hkv, P, I = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    wqkv = t.get(prefix + "attention.wqkv.weight", ((H + 2 * Hkv) * P, D), " = ((heads + 2 kv heads) * head dim, hidden)")
    wq, wk, wv = split_wqkv(wqkv, H, Hkv, P)
    _block(state, i, wq, wk, wv,
           wo=t.get(prefix + "attention.wo.weight", (D, H * P)),
           w1=t.get(prefix + "feed_forward.w1.weight", (I, D)),
           w2=t.get(prefix + "feed_forward.w2.weight", (D, I)),
           w3=t.get(prefix + "feed_forward.w3.weight", (I, D)),
           attn_norm=t.get(prefix + "attention_norm.weight", (D,)),
           ffn_norm=t.get(prefix + "ffn_norm.weight", (D,)))


def _text_only_stem(state: dict, D: int, dtype: torch.dtype) -> None:
    """Zero vision stem of the smallest shape (1 px image, 1 px patch, no shuffle)."""
    z = lambda *s: torch.zeros(*s, dtype=dtype)
    state.update({"vision.patch_embedding.weight": z(D, 3, 1, 1), "vision.patch_embedding.bias": z(D),
                  "vision.position_embedding": z(1, 1, D),
                  "vision.pixel_shuffle_proj.0.weight": z(D, D), "vision.pixel_shuffle_proj.0.bias": z(D),
                  "vision.pixel_shuffle_proj.2.weight": z(D, D), "vision.pixel_shuffle_proj.2.bias": z(D)})


def _model_config(path: str, **kw) -> ModelConfig:
    try:
        return ModelConfig(**kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the config does not give a valid model: {e}") from e


def _text_only_ids(vocab: int, img_context_id) -> int:
    if img_context_id is None:
        return vocab - 1
    if not isinstance(img_context_id, int) or not 0 <= img_context_id < vocab:
        raise ValueError(f"img_context_id must be a token id in [0, {vocab}), got {img_context_id!r}")
    return img_context_id


# ----------------------------------------------------------------------------------------------
# The formats

def hovle_config(d: dict, path: str, img_context_id: int | None = None) -> ModelConfig:
    """The ModelConfig of a HoVLE config.json (see the module docstring for the keys read)."""
    top = _Conf(d, path)
    e, l = top.sub("embedding_config"), top.sub("llm_config")
    _decoder_checks(e, "attention_bias")
    _decoder_checks(l, "bias")
    e.require("use_pixel_shuffle_proj", (True,), True, "model.py's vision stem always has the pixel-shuffle MLP")
    e.require("pixel_shuffle_loc", ("pre",), "pre", "model.py shuffles the patches before the layers")
    e.require("use_ls", (False,), False, "layer scale is not in model.py (HoVLE asserts it off too)")
    e.require("num_channels", (3,), 3, "the patch conv of model.py takes RGB")
    if e.get("special_token_maps", {}):
        raise CheckpointError(f"{path}: key 'embedding_config.special_token_maps' is not empty: extra special-token "
                              f"embeddings beyond the LLM vocabulary are not supported")
    l.require("tie_word_embeddings", (False,), False, "HoVLE's LM head is untied (language_model.output)")
    vals = {}
    for key, kind in (("hidden_size", "int"), ("num_attention_heads", "int"), ("intermediate_size", "int"),
                      ("rope_theta", "float"), ("rms_norm_eps", "float")):
        a, b = getattr(e, kind)(key), getattr(l, kind)(key)
        _same(e, l, key, a, b)
        vals[key] = a
    kv_e = e.int("num_key_value_heads", vals["num_attention_heads"])
    kv_l = l.int("num_key_value_heads", vals["num_attention_heads"])
    _same(e, l, "num_key_value_heads", kv_e, kv_l)
    D = vals["hidden_size"]
    if e.int("llm_hidden_size", D) != D:
        raise CheckpointError(f"{path}: key 'embedding_config.llm_hidden_size' = {e.get('llm_hidden_size')} but "
                              f"hidden_size = {D}")
    vocab = l.int("vocab_size")
    if e.int("llm_vocab_size", vocab) != vocab:
        raise CheckpointError(f"{path}: key 'embedding_config.llm_vocab_size' = {e.get('llm_vocab_size')} but "
                              f"'llm_config.vocab_size' = {vocab}: the text embedding and the LM head must agree")
    image_size = e.int("image_size")
    force = d.get("force_image_size")
    if force is not None and force != image_size:
        raise CheckpointError(f"{path}: key 'force_image_size' = {force!r} differs from 'embedding_config.image_size' "
                              f"= {image_size}: resizing the position table is not supported")
    ratio = e.float("downsample_ratio", top.float("downsample_ratio", 0.5))
    if img_context_id is None:
        img_context_id = e.get("img_context_token_id", top.get("img_context_token_id", HOVLE_IMG_CONTEXT_ID))
    n_layers = e.int("num_hidden_layers") + l.int("num_hidden_layers")
    return _model_config(path, vocab_size=vocab, hidden_size=D, intermediate_size=vals["intermediate_size"],
                         n_heads=vals["num_attention_heads"], n_kv_heads=kv_e, layers=["attn"] * n_layers,
                         rope_theta=vals["rope_theta"], norm_eps=vals["rms_norm_eps"], image_size=image_size,
                         patch_size=e.int("patch_size"), pixel_shuffle_ratio=ratio, img_context_id=img_context_id)


def load_hovle(directory: str, dtype: torch.dtype | None = None, device="cpu",
               img_context_id: int | None = None) -> Model:
    """A HoVLE folder as a Model: the 8 embedding layers then the 24 LLM layers, all attention."""
    path = os.path.join(directory, CONFIG_NAME)
    d = read_json(path)
    cfg = hovle_config(d, path, img_context_id)
    n_embed = d["embedding_config"]["num_hidden_layers"]
    t = _Tensors(directory)
    D, V, s, g = cfg.hidden_size, cfg.vocab_size, cfg.shuffle, cfg.grid
    E, L = "embedding_model.", "language_model."
    state = {}
    for i in range(cfg.n_layers):
        prefix = f"{E}encoder.{i}." if i < n_embed else f"{L}model.layers.{i - n_embed}."
        _internlm2_block(t, state, i, prefix, cfg)
    pos_key = E + "vision_embeddings.position_embedding"
    pshape = t.shape(pos_key)
    if pshape == (1, g * g, D):                            # a table without the class-token slot
        pos = t.get(pos_key)
    else:                                                  # slot 0: the (unused) class token
        pos = t.get(pos_key, (1, g * g + 1, D), f" = (1, 1 + (image_size/patch_size)^2, hidden)")[:, 1:].clone()
    p = cfg.patch_size
    state.update({
        "vision.patch_embedding.weight": t.get(E + "vision_embeddings.patch_embedding.weight", (D, 3, p, p)),
        "vision.patch_embedding.bias": t.get(E + "vision_embeddings.patch_embedding.bias", (D,)),
        "vision.position_embedding": pos,
        "vision.pixel_shuffle_proj.0.weight": t.get(E + "pixel_shuffle_proj.0.weight", (D, D * s * s),
                                                    " = (hidden, hidden / downsample_ratio^2)"),
        "vision.pixel_shuffle_proj.0.bias": t.get(E + "pixel_shuffle_proj.0.bias", (D,)),
        "vision.pixel_shuffle_proj.2.weight": t.get(E + "pixel_shuffle_proj.2.weight", (D, D)),
        "vision.pixel_shuffle_proj.2.bias": t.get(E + "pixel_shuffle_proj.2.bias", (D,)),
        "embed_tokens.weight": t.get(E + "llm_text_embeddings.weight", (V, D), " = (vocab_size, hidden)"),
        "norm.weight": t.get(L + "model.norm.weight", (D,)),
        "lm_head.weight": t.get(L + "output.weight", (V, D), " = (vocab_size, hidden)"),
    })
    ignored = (E + "vision_embeddings.class_embedding", L + "model.tok_embeddings.weight")
    t.check_all_used(lambda k: k in ignored or k.endswith("rotary_emb.inv_freq"))
    return _finish(cfg, state, t.listing, dtype, device)


def _text_config(c: _Conf, path: str, bias_key: str, img_context_id) -> ModelConfig:
    _decoder_checks(c, bias_key)
    D, H = c.int("hidden_size"), c.int("num_attention_heads")
    if "head_dim" in c.d and c.d["head_dim"] is not None and c.d["head_dim"] * H != D:
        raise CheckpointError(f"{path}: key 'head_dim' = {c.d['head_dim']} != hidden_size / num_attention_heads "
                              f"= {D / H:g}: not supported by model.py")
    vocab = c.int("vocab_size")
    return _model_config(path, vocab_size=vocab, hidden_size=D, intermediate_size=c.int("intermediate_size"),
                         n_heads=H, n_kv_heads=c.int("num_key_value_heads", H),
                         layers=["attn"] * c.int("num_hidden_layers"), rope_theta=c.float("rope_theta", 10000.0),
                         norm_eps=c.float("rms_norm_eps", 1e-6), image_size=1, patch_size=1,
                         pixel_shuffle_ratio=1.0, img_context_id=_text_only_ids(vocab, img_context_id))


def load_internlm2(directory: str, dtype: torch.dtype | None = None, device="cpu",
                   img_context_id: int | None = None) -> Model:
    """An InternLM2ForCausalLM folder as a text-only Model (zero vision stem; see the docstring)."""
    path = os.path.join(directory, CONFIG_NAME)
    c = _Conf(read_json(path), path)
    c.require("tie_word_embeddings", (False,), False, "InternLM2 stores its LM head as output.weight")
    cfg = _text_config(c, path, "bias", img_context_id)
    t = _Tensors(directory)
    D, V = cfg.hidden_size, cfg.vocab_size
    state = {}
    for i in range(cfg.n_layers):
        _internlm2_block(t, state, i, f"model.layers.{i}.", cfg)
    emb = t.get("model.tok_embeddings.weight", (V, D), " = (vocab_size, hidden)")
    state.update({"embed_tokens.weight": emb, "norm.weight": t.get("model.norm.weight", (D,)),
                  "lm_head.weight": t.get("output.weight", (V, D), " = (vocab_size, hidden)")})
    _text_only_stem(state, D, emb.dtype)
    t.check_all_used(lambda k: k.endswith("rotary_emb.inv_freq"))
    return _finish(cfg, state, t.listing, dtype, device)


def load_llama(directory: str, dtype: torch.dtype | None = None, device="cpu",
               img_context_id: int | None = None) -> Model:
    """A LlamaForCausalLM folder as a text-only Model (zero vision stem; see the docstring)."""
    path = os.path.join(directory, CONFIG_NAME)
    c = _Conf(read_json(path), path)
    cfg = _text_config(c, path, "attention_bias", img_context_id)
    t = _Tensors(directory)
    D, H, Hkv, P, I, V = (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size,
                          cfg.vocab_size)
    state = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        _block(state, i,
               wq=t.get(p + "self_attn.q_proj.weight", (H * P, D)),
               wk=t.get(p + "self_attn.k_proj.weight", (Hkv * P, D)),
               wv=t.get(p + "self_attn.v_proj.weight", (Hkv * P, D)),
               wo=t.get(p + "self_attn.o_proj.weight", (D, H * P)),
               w1=t.get(p + "mlp.gate_proj.weight", (I, D)),
               w2=t.get(p + "mlp.down_proj.weight", (D, I)),
               w3=t.get(p + "mlp.up_proj.weight", (I, D)),
               attn_norm=t.get(p + "input_layernorm.weight", (D,)),
               ffn_norm=t.get(p + "post_attention_layernorm.weight", (D,)))
    emb = t.get("model.embed_tokens.weight", (V, D), " = (vocab_size, hidden)")
    if "lm_head.weight" in t or not c.get("tie_word_embeddings", False):
        head = t.get("lm_head.weight", (V, D), " = (vocab_size, hidden); tie_word_embeddings is false")
    else:
        head = emb.clone()
    state.update({"embed_tokens.weight": emb, "norm.weight": t.get("model.norm.weight", (D,)), "lm_head.weight": head})
    _text_only_stem(state, D, emb.dtype)
    t.check_all_used(lambda k: k.endswith("rotary_emb.inv_freq"))
    return _finish(cfg, state, t.listing, dtype, device)


def load_model(directory: str, dtype: torch.dtype | None = None, device="cpu",
               img_context_id: int | None = None) -> Model:
    """Any supported folder as a Model, dispatching on config.json (`detect_format`)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    fmt = detect_format(directory)
    if fmt == "native":
        model = Model.from_pretrained(directory, device=device, dtype=dtype)
        if img_context_id is not None and img_context_id != model.cfg.img_context_id:
            raise ValueError(f"{directory}: img_context_id is fixed by its config.json ({model.cfg.img_context_id})")
        return model
    loader = {"hovle": load_hovle, "internlm2": load_internlm2, "llama": load_llama}[fmt]
    return loader(directory, dtype=dtype, device=device, img_context_id=img_context_id)


# ----------------------------------------------------------------------------------------------
# Export

def export(model: Model, directory: str) -> str:
    """Write a (distilled) model as directory/config.json + directory/model.safetensors, which
    `Model.from_pretrained` (and load_model) read back. Returns the directory."""
    kinds = [b.kind for b in model.layers]
    if kinds != list(model.cfg.layers):
        raise ValueError(f"model.cfg.layers {model.cfg.layers} does not match the model's blocks {kinds}")
    model.save_pretrained(directory)
    return directory


def import_checkpoint(src: str, out: str, dtype: torch.dtype | None = None, img_context_id: int | None = None) -> Model:
    """load_model(src) and export it to `out` in this project's format."""
    model = load_model(src, dtype=dtype, img_context_id=img_context_id)
    export(model, out)
    return model


# ----------------------------------------------------------------------------------------------
# Tiny random checkpoints in the published layouts

def _save_folder(directory: str, config: dict, tensors: dict, shards: int, shard_of) -> None:
    """config.json plus model.safetensors (shards == 1) or `shards` files and an index."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        names = [f"model-{j + 1:05d}-of-{shards:05d}.safetensors" for j in range(shards)]
        groups = [{} for _ in names]
        for k, v in tensors.items():
            groups[min(shard_of(k), shards - 1)][k] = v
        for name, group in zip(names, groups):
            save_file(group, os.path.join(directory, name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": {k: names[min(shard_of(k), shards - 1)] for k in sorted(tensors)}}
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


class _Rand:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.g, self.dtype = torch.Generator().manual_seed(seed), dtype

    def __call__(self, *shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=self.g, dtype=torch.float64)).to(self.dtype)

    def linear(self, out: int, inp: int) -> torch.Tensor:
        return self(out, inp, std=inp ** -0.5)

    def norm(self, dim: int) -> torch.Tensor:
        return self(dim, mean=1.0, std=0.2)


def _internlm2_layer_tensors(r: _Rand, prefix: str, D, H, Hkv, I) -> dict:
    P = D // H
    return {prefix + "attention.wqkv.weight": r.linear((H + 2 * Hkv) * P, D),
            prefix + "attention.wo.weight": r.linear(D, H * P),
            prefix + "feed_forward.w1.weight": r.linear(I, D), prefix + "feed_forward.w3.weight": r.linear(I, D),
            prefix + "feed_forward.w2.weight": r.linear(D, I),
            prefix + "attention_norm.weight": r.norm(D), prefix + "ffn_norm.weight": r.norm(D)}


def _internlm2_config(vocab_size, hidden_size, n_heads, n_kv_heads, intermediate_size, n_layers, rope_theta,
                      norm_eps) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": vocab_size,
            "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "hidden_act": "silu",
            "rms_norm_eps": norm_eps, "rope_theta": rope_theta, "rope_scaling": None, "bias": False,
            "tie_word_embeddings": False, "max_position_embeddings": 32768, "torch_dtype": "float32"}


def write_tiny_hovle(directory: str, *, vocab_size: int = 463, img_context_id: int = 6, hidden_size: int = 64,
                     n_heads: int = 4, n_kv_heads: int = 2, intermediate_size: int = 128, n_embed_layers: int = 2,
                     n_llm_layers: int = 2, image_size: int = 128, patch_size: int = 8,
                     downsample_ratio: float = 0.5, rope_theta: float = 1e6, norm_eps: float = 1e-5,
                     shards: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A random HoVLE-layout checkpoint (published key names, fused wqkv, class-token slot in the
    position table, unused class_embedding / tok_embeddings included as HoVLE has them), in
    `shards` files with an index (embedding model in the first, LLM in the second). The defaults fit
    data.py (vocab 463, <IMG_CONTEXT> = 6, 128 px, 8 px patches, 0.5 shuffle: 64 tokens per image).
    Returns the tensors written."""
    r = _Rand(seed, dtype)
    D, H, Hkv, I, V = hidden_size, n_heads, n_kv_heads, intermediate_size, vocab_size
    g, E, L = image_size // patch_size, "embedding_model.", "language_model."
    t = {}
    for i in range(n_embed_layers):
        t.update(_internlm2_layer_tensors(r, f"{E}encoder.{i}.", D, H, Hkv, I))
    for i in range(n_llm_layers):
        t.update(_internlm2_layer_tensors(r, f"{L}model.layers.{i}.", D, H, Hkv, I))
    t.update({
        E + "vision_embeddings.class_embedding": r(1, 1, D),
        E + "vision_embeddings.patch_embedding.weight": r(D, 3, patch_size, patch_size, std=(3 * patch_size ** 2) ** -0.5),
        E + "vision_embeddings.patch_embedding.bias": r(D, std=0.1),
        E + "vision_embeddings.position_embedding": r(1, g * g + 1, D, std=0.5),
        E + "pixel_shuffle_proj.0.weight": r.linear(D, round(D / downsample_ratio ** 2)),
        E + "pixel_shuffle_proj.0.bias": r(D, std=0.1),
        E + "pixel_shuffle_proj.2.weight": r.linear(D, D),
        E + "pixel_shuffle_proj.2.bias": r(D, std=0.1),
        E + "llm_text_embeddings.weight": r(V, D),
        L + "model.tok_embeddings.weight": r(V, D),
        L + "model.norm.weight": r.norm(D),
        L + "output.weight": r.linear(V, D),
    })
    llm = _internlm2_config(V, D, H, Hkv, I, n_llm_layers, rope_theta, norm_eps)
    emb = {"architectures": ["HolisticEmbedding"], "model_type": "holistic_embedding",
           "num_hidden_layers": n_embed_layers, "num_channels": 3, "patch_size": patch_size, "image_size": image_size,
           "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": Hkv, "attention_bias": False,
           "max_position_embeddings": 32768, "rope_theta": rope_theta, "rope_scaling": None,
           "intermediate_size": I, "mlp_bias": False, "hidden_act": "silu", "rms_norm_eps": norm_eps,
           "use_ls": False, "special_token_maps": {}, "llm_vocab_size": V, "llm_hidden_size": D,
           "downsample_ratio": downsample_ratio, "img_context_token_id": img_context_id,
           "pixel_shuffle_loc": "pre", "use_pixel_shuffle_proj": True}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
              "downsample_ratio": downsample_ratio, "force_image_size": image_size, "ps_version": "v2",
              "select_layer": -1, "dynamic_image_size": False, "use_thumbnail": False, "torch_dtype": "float32",
              "embedding_config": emb, "llm_config": llm}
    _save_folder(directory, config, t, shards, lambda k: 0 if k.startswith(E) else 1)
    return t


def write_tiny_internlm2(directory: str, *, vocab_size: int = 64, hidden_size: int = 32, n_heads: int = 4,
                         n_kv_heads: int = 2, intermediate_size: int = 64, n_layers: int = 2,
                         rope_theta: float = 1e6, norm_eps: float = 1e-5, shards: int = 1, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict:
    """A random InternLM2ForCausalLM checkpoint; returns the tensors written."""
    r = _Rand(seed, dtype)
    D, V = hidden_size, vocab_size
    t = {}
    for i in range(n_layers):
        t.update(_internlm2_layer_tensors(r, f"model.layers.{i}.", D, n_heads, n_kv_heads, intermediate_size))
    t.update({"model.tok_embeddings.weight": r(V, D), "model.norm.weight": r.norm(D), "output.weight": r.linear(V, D)})
    config = _internlm2_config(V, D, n_heads, n_kv_heads, intermediate_size, n_layers, rope_theta, norm_eps)
    _save_folder(directory, config, t, shards, lambda k: 1 if k.startswith("model.layers.1") else 0)
    return t


def write_tiny_llama(directory: str, *, vocab_size: int = 64, hidden_size: int = 32, n_heads: int = 4,
                     n_kv_heads: int = 2, intermediate_size: int = 64, n_layers: int = 2, rope_theta: float = 10000.0,
                     norm_eps: float = 1e-6, tie_word_embeddings: bool = False, shards: int = 1, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> dict:
    """A random LlamaForCausalLM checkpoint (HF layout; no lm_head.weight when tied); returns the
    tensors written."""
    r = _Rand(seed, dtype)
    D, H, Hkv, I, V = hidden_size, n_heads, n_kv_heads, intermediate_size, vocab_size
    P = D // H
    t = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r.linear(H * P, D), p + "self_attn.k_proj.weight": r.linear(Hkv * P, D),
                  p + "self_attn.v_proj.weight": r.linear(Hkv * P, D), p + "self_attn.o_proj.weight": r.linear(D, H * P),
                  p + "mlp.gate_proj.weight": r.linear(I, D), p + "mlp.up_proj.weight": r.linear(I, D),
                  p + "mlp.down_proj.weight": r.linear(D, I),
                  p + "input_layernorm.weight": r.norm(D), p + "post_attention_layernorm.weight": r.norm(D)})
    t.update({"model.embed_tokens.weight": r(V, D), "model.norm.weight": r.norm(D)})
    if not tie_word_embeddings:
        t["lm_head.weight"] = r.linear(V, D)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
              "intermediate_size": I, "num_hidden_layers": n_layers, "num_attention_heads": H,
              "num_key_value_heads": Hkv, "hidden_act": "silu", "rms_norm_eps": norm_eps, "rope_theta": rope_theta,
              "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
              "tie_word_embeddings": tie_word_embeddings, "max_position_embeddings": 2048, "torch_dtype": "float32"}
    _save_folder(directory, config, t, shards, lambda k: 1 if k.startswith("model.layers.1") else 0)
    return t


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Import HoVLE / InternLM2 / Llama checkpoints; write tiny test checkpoints.")
    p.add_argument("src", nargs="?", help="checkpoint folder to import (any supported format)")
    p.add_argument("--out", help="with SRC: write the imported model here (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], help="cast the weights")
    p.add_argument("--img-context-id", type=int, help="<IMG_CONTEXT> token id (HoVLE default: from config.json)")
    p.add_argument("--write-tiny-hovle", metavar="DIR", help="write a tiny random HoVLE checkpoint (fits data.py)")
    p.add_argument("--write-tiny-llama", metavar="DIR", help="write a tiny random Llama checkpoint")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.write_tiny_hovle:
        t = write_tiny_hovle(args.write_tiny_hovle, seed=args.seed)
        print(f"wrote {args.write_tiny_hovle}: HoVLE layout, {len(t)} tensors in 2 shards")
    if args.write_tiny_llama:
        t = write_tiny_llama(args.write_tiny_llama, seed=args.seed)
        print(f"wrote {args.write_tiny_llama}: Llama layout, {len(t)} tensors")
    if args.src:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_model(args.src, dtype=dtype, img_context_id=args.img_context_id)
        c = model.cfg
        print(f"{args.src}: {detect_format(args.src)}, {model.num_params():,} parameters, {c.n_layers} layers, "
              f"hidden {c.hidden_size}, {c.n_heads} heads / {c.n_kv_heads} KV heads, vocab {c.vocab_size}, "
              f"{c.image_size} px / {c.patch_size} px patches -> {c.image_tokens} image tokens")
        if args.out:
            export(model, args.out)
            print(f"wrote {args.out}")
    elif not (args.write_tiny_hovle or args.write_tiny_llama):
        p.print_help()


if __name__ == "__main__":
    main()

"""Import real checkpoints (HoVLE, InternLM2, Llama) into this project's `Model`.

Paper map (mmMamba, arXiv 2502.13145): Sec. 3.1 / 4.1 distil HoVLE-2.6B (8 holistic-embedding layers
+ InternLM2-1.8B) into Mamba-2. `load_model` reads such a teacher, as published, so that
`distill.py --teacher DIR` can start from it; `Model.save_pretrained` writes students back out.

API
    load_model(dir, dtype=None, device="cpu", img_context_id=None) -> Model   any supported folder
    detect_format(dir) -> "native" (Model.save_pretrained) | "hovle" | "internlm2" | "llama"
    split_wqkv / fuse_wqkv      InternLM2's fused q/k/v rows <-> separate wq, wk, wv
Errors are `model.CheckpointError` (a ValueError) naming the file and, where there is one, the key.

Folder read (Hugging Face style): config.json, and model.safetensors or model.safetensors.index.json
({"weight_map": {key: shard file}}) with its shards. Tensors keep their stored dtype unless `dtype`.

HoVLE (inferred from the published HoVLE / mmMamba code; the weights cannot be downloaded here).
  config.json: "architectures": ["InternVLChatModel"] (or a name starting with "HoVLE") with
  embedding_config (HolisticEmbeddingConfig) and llm_config (InternLM2Config). model.py has one set
  of shapes for all layers, so hidden_size, heads, KV heads, intermediate_size, rope_theta and
  rms_norm_eps must agree between the two; force_image_size must equal embedding_config.image_size
  (no resizing of the position table). Unsupported: biases, rope_scaling, non-SiLU MLPs, layer scale,
  special_token_maps, pixel_shuffle_loc other than "pre", a tied LM head.
  Weights: embedding_model.encoder.{i}.* then language_model.model.layers.{i}.* (InternLM2 layers:
  attention.wqkv (see split_wqkv), attention.wo, feed_forward.w1 gate / w3 up / w2 down,
  attention_norm, ffn_norm), language_model.model.norm, language_model.output (untied LM head),
  embedding_model.llm_text_embeddings (the text embedding), embedding_model.vision_embeddings.
  patch_embedding (Conv2d(3, D, p, stride p)) and .position_embedding (1, 1 + g*g, D): slot 0 is the
  unused class token (a (1, g*g, D) table is accepted too); embedding_model.pixel_shuffle_proj.{0,2}.
  Ignored (unused by HoVLE's forward): vision_embeddings.class_embedding, language_model.model.
  tok_embeddings (the LLM receives hidden states), *.rotary_emb.inv_freq; any other key is an error.
  Our layers: the embedding model's then the LLM's, all "attn", positions 0..L-1 through both.

Text-only decoders (InternLM2ForCausalLM; LlamaForCausalLM, with its LM head tied to embed_tokens
  when tie_word_embeddings and no lm_head is stored). `Model` always has a vision stem, so they get a
  zero stem of the smallest shape (1 px images and patches, one image token): IMAGES ARE NOT
  SUPPORTED, and the id img_context_id is reserved as the image placeholder (default: the last
  vocabulary id): a prompt containing it makes Model.embed raise, and generate() never emits it.

RoPE: model.rope is the rotate-half layout (dim i pairs with i + P/2), as HF Llama and InternLM2
compute it and as HF Llama stores q/k rows, so no rows are permuted (Meta's original interleaved
consolidated.*.pth files are not read).

Run:  python convert.py SRC --out DIR [--dtype float32] [--img-context-id N]
"""
from __future__ import annotations

import argparse
import os

import torch
from safetensors import safe_open

from model import CheckpointError, Model, ModelConfig, check_state_dict
from utils import InputError, read_json, run_main

INDEX_NAME = "model.safetensors.index.json"
ARCHITECTURES = {"InternVLChatModel": "hovle", "internvl_chat": "hovle", "InternLM2ForCausalLM": "internlm2",
                 "internlm2": "internlm2", "LlamaForCausalLM": "llama", "llama": "llama"}   # also model_type
HOVLE_IMG_CONTEXT_ID = 92546            # <IMG_CONTEXT> in the InternLM2 / InternVL2 tokenizer
E, L = "embedding_model.", "language_model."
LLAMA_LAYER = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               **{f"mixer.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkvo"},
               "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
               "feed_forward.w2.weight": "mlp.down_proj.weight"}
INTERNLM2_LAYER = {"mixer.wo.weight": "attention.wo.weight",      # plus attention.wqkv, split
                   **{k: k for k in ("attention_norm.weight", "ffn_norm.weight", "feed_forward.w1.weight",
                                     "feed_forward.w2.weight", "feed_forward.w3.weight")}}
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
# Tensors

class _Tensors:
    """The tensors of a folder: model.safetensors, or the shards model.safetensors.index.json lists.
    `get` checks presence and shape before reading and records the key as used."""

    def __init__(self, directory: str):
        index, single = os.path.join(directory, INDEX_NAME), os.path.join(directory, "model.safetensors")
        self.files, self.used = {}, set()
        if os.path.isfile(index):
            self.listing, weight_map = index, read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: missing key 'weight_map' (an object: tensor key -> shard file)")
            self.where = {key: os.path.join(directory, str(shard)) for key, shard in weight_map.items()}
            for key, path in self.where.items():
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index}: shard '{weight_map[key]}' (holding key '{key}', among others) "
                                          f"is missing: no file {path}")
        elif os.path.isfile(single):
            self.listing = single
            self.where = dict.fromkeys(self._open(single).keys(), single)
        else:
            raise CheckpointError(f"{directory}: no weights: expected model.safetensors or {INDEX_NAME} "
                                  f"with its shards")

    def _open(self, path: str):
        if path not in self.files:
            try:
                self.files[path] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:          # safetensors has its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        return self.files[path]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, *shapes) -> torch.Tensor:
        """The tensor `key`, which must have one of `shapes` (derived from config.json)."""
        if key not in self.where:
            raise CheckpointError(f"{self.listing}: missing key '{key}'")
        path = self.where[key]
        f = self._open(path)
        if key not in f.keys():
            raise CheckpointError(f"{path}: missing key '{key}' (listed in {self.listing})")
        shape, shapes = tuple(f.get_slice(key).get_shape()), [tuple(s) for s in shapes]
        if shape not in shapes:
            raise CheckpointError(f"{path}: key '{key}' has shape {shape}, expected "
                                  f"{' or '.join(map(str, shapes))} from config.json")
        self.used.add(key)
        return f.get_tensor(key)

    def take(self, own: dict, names: dict) -> dict:
        """{our key: their tensor} for names = {our key: their key}, shaped as our `own` tensors."""
        return {ours: self.get(theirs, own[ours].shape) for ours, theirs in names.items()}

    def check_all_used(self) -> None:
        left = sorted(k for k in self.where if k not in self.used and not k.endswith("rotary_emb.inv_freq"))
        if left:
            more = f" and {len(left) - 20} more" if len(left) > 20 else ""
            raise CheckpointError(f"{self.listing}: {len(left)} unexpected key(s) that model.py has no place "
                                  f"for (e.g. attention biases): {', '.join(repr(k) for k in left[:20])}{more}")


# ----------------------------------------------------------------------------------------------
# config.json

def _get(d: dict, path: str, key: str, default=_REQUIRED):
    """The value at the dotted `key` ("llm_config.vocab_size") of config.json `d`; null is absent."""
    v = d
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if v is None and default is _REQUIRED:
        raise CheckpointError(f"{path}: missing key '{key}'")
    return default if v is None else v


def _number(d: dict, path: str, key: str, default=_REQUIRED, integer: bool = True):
    v = _get(d, path, key, default)
    if not isinstance(v, int if integer else (int, float)) or isinstance(v, bool) or not v > 0:
        raise CheckpointError(f"{path}: key '{key}' must be a positive {'integer' if integer else 'number'}, "
                              f"got {v!r}")
    return v if integer else float(v)


def _supported(d: dict, path: str, checks) -> None:
    """Each check (dotted key, the one supported value, why) passes if the key is absent or has it."""
    for key, value, why in checks:
        v = _get(d, path, key, value)
        if v != value:
            raise CheckpointError(f"{path}: key '{key}' = {v!r} is not supported ({why})")


def _decoder(d: dict, path: str, prefix: str, bias_key: str) -> dict:
    """The decoder keys of InternLM2, Llama and both halves of HoVLE, checked, by their HF names."""
    _supported(d, path, [(prefix + bias_key, False, "model.py's attention has no biases"),
                         (prefix + "mlp_bias", False, "model.py's MLP has no biases"),
                         (prefix + "hidden_act", "silu", "model.py's MLP is SwiGLU with SiLU"),
                         (prefix + "rope_scaling", None, "model.rope has no scaling")])
    num = lambda key, default=_REQUIRED, integer=True: _number(d, path, prefix + key, default, integer)
    D, H = num("hidden_size"), num("num_attention_heads")
    head_dim = _get(d, path, prefix + "head_dim", None)
    if head_dim is not None and head_dim * H != D:
        raise CheckpointError(f"{path}: key '{prefix}head_dim' = {head_dim!r} != hidden_size / num_attention_heads "
                              f"= {D / H:g}: not supported by model.py")
    return {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": num("num_key_value_heads", H),
            "intermediate_size": num("intermediate_size"), "rope_theta": num("rope_theta", 10000.0, False),
            "rms_norm_eps": num("rms_norm_eps", 1e-6, False), "num_hidden_layers": num("num_hidden_layers")}


def _model_config(path: str, c: dict, n_layers: int, **kw) -> ModelConfig:
    try:
        return ModelConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                           n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                           layers=["attn"] * n_layers, rope_theta=c["rope_theta"], norm_eps=c["rms_norm_eps"], **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the config does not give a valid model: {e}") from e


def _hovle_config(d: dict, path: str) -> ModelConfig:
    e, l = "embedding_config.", "llm_config."
    _supported(d, path, [(e + "use_pixel_shuffle_proj", True, "model.py's vision stem always has the shuffle MLP"),
                         (e + "pixel_shuffle_loc", "pre", "model.py shuffles the patches before the layers"),
                         (e + "use_ls", False, "model.py has no layer scale"),
                         (e + "num_channels", 3, "model.py's patch conv takes RGB"),
                         (e + "special_token_maps", {}, "no embeddings beyond the LLM vocabulary"),
                         (l + "tie_word_embeddings", False, "HoVLE's LM head is language_model.output")])
    ce, cl = _decoder(d, path, e, "attention_bias"), _decoder(d, path, l, "bias")
    vocab, image_size = _number(d, path, l + "vocab_size"), _number(d, path, e + "image_size")
    pairs = [(e + k, ce[k], l + k, cl[k]) for k in ce if k != "num_hidden_layers"] + [
        (e + "llm_hidden_size", _number(d, path, e + "llm_hidden_size", ce["hidden_size"]), e + "hidden_size",
         ce["hidden_size"]),
        (e + "llm_vocab_size", _number(d, path, e + "llm_vocab_size", vocab), l + "vocab_size", vocab),
        ("force_image_size", _get(d, path, "force_image_size", image_size), e + "image_size", image_size)]
    for key_a, a, key_b, b in pairs:
        if a != b:
            raise CheckpointError(f"{path}: key '{key_a}' = {a!r} but '{key_b}' = {b!r}; model.py needs them "
                                  f"equal (one set of shapes for all layers, no resized position table)")
    ratio = _number(d, path, e + "downsample_ratio", _number(d, path, "downsample_ratio", 0.5, False), False)
    img = _get(d, path, e + "img_context_token_id", _get(d, path, "img_context_token_id", HOVLE_IMG_CONTEXT_ID))
    return _model_config(path, ce, ce["num_hidden_layers"] + cl["num_hidden_layers"], vocab_size=vocab,
                         image_size=image_size, patch_size=_number(d, path, e + "patch_size"),
                         pixel_shuffle_ratio=ratio, img_context_id=img)


def _text_config(d: dict, path: str, fmt: str) -> ModelConfig:
    if fmt == "internlm2":
        _supported(d, path, [("tie_word_embeddings", False, "InternLM2 stores its LM head as output.weight")])
    c = _decoder(d, path, "", "bias" if fmt == "internlm2" else "attention_bias")
    vocab = _number(d, path, "vocab_size")
    return _model_config(path, c, c["num_hidden_layers"], vocab_size=vocab, image_size=1, patch_size=1,
                         pixel_shuffle_ratio=1.0, img_context_id=vocab - 1)


def detect_format(directory: str) -> str:
    """"native" (a config.json of Model.save_pretrained), "hovle", "internlm2" or "llama"."""
    path = os.path.join(directory, "config.json")
    d = read_json(path)
    if "layers" in d:
        return "native"
    hovle = "embedding_config" in d and "llm_config" in d
    arch = d.get("architectures") or d.get("model_type") or ("InternVLChatModel" if hovle else None)
    arch = str(arch[0] if isinstance(arch, list) and arch else arch)
    fmt = "hovle" if arch.startswith("HoVLE") else ARCHITECTURES.get(arch)
    if fmt is None:
        raise CheckpointError(f"{path}: unknown architecture '{arch}' (key 'architectures'); supported: "
                              f"{', '.join(a for a in ARCHITECTURES if a[0].isupper())}, HoVLE*, or this "
                              f"project's own config.json")
    if fmt == "hovle" and not hovle:
        raise CheckpointError(f"{path}: architecture '{arch}' without keys 'embedding_config' and 'llm_config': "
                              f"only HoVLE (holistic embedding, no separate vision encoder) is supported")
    return fmt


# ----------------------------------------------------------------------------------------------
# Weights, renamed to model.py's keys; `own` is the model's state dict (for the expected shapes)

def _internlm2_layer(t: _Tensors, cfg: ModelConfig, own: dict, i: int, prefix: str) -> dict:
    H, Hkv, P, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_size
    wqkv = t.get(prefix + "attention.wqkv.weight", ((H + 2 * Hkv) * P, D))
    state = dict(zip((f"layers.{i}.mixer.{w}.weight" for w in ("wq", "wk", "wv")), split_wqkv(wqkv, H, Hkv, P)))
    return {**state, **t.take(own, {f"layers.{i}.{ours}": prefix + theirs for ours, theirs in INTERNLM2_LAYER.items()})}


def _hovle_state(t: _Tensors, cfg: ModelConfig, d: dict, own: dict) -> dict:
    n_embed, state = d["embedding_config"]["num_hidden_layers"], {}
    for i in range(cfg.n_layers):
        prefix = f"{E}encoder.{i}." if i < n_embed else f"{L}model.layers.{i - n_embed}."
        state.update(_internlm2_layer(t, cfg, own, i, prefix))
    g2, D = cfg.grid ** 2, cfg.hidden_size
    pos = t.get(E + "vision_embeddings.position_embedding", (1, 1 + g2, D), (1, g2, D))
    state["vision.position_embedding"] = pos[:, -g2:].clone()      # without the class token's slot 0
    vision = {f"vision.{k}": f"{E}vision_embeddings.{k}" for k in ("patch_embedding.weight", "patch_embedding.bias")}
    vision.update({f"vision.pixel_shuffle_proj.{j}.{w}": f"{E}pixel_shuffle_proj.{j}.{w}"
                   for j in (0, 2) for w in ("weight", "bias")})
    state.update(t.take(own, {**vision, "embed_tokens.weight": E + "llm_text_embeddings.weight",
                              "norm.weight": L + "model.norm.weight", "lm_head.weight": L + "output.weight"}))
    t.used |= {E + "vision_embeddings.class_embedding", L + "model.tok_embeddings.weight"}   # unused by HoVLE
    return state


def _text_state(t: _Tensors, cfg: ModelConfig, d: dict, own: dict, fmt: str) -> dict:
    """An InternLM2 / Llama decoder, and a zero vision stem (text only: see the module docstring)."""
    if fmt == "internlm2":
        state = {}
        for i in range(cfg.n_layers):
            state.update(_internlm2_layer(t, cfg, own, i, f"model.layers.{i}."))
        names = {"embed_tokens.weight": "model.tok_embeddings.weight", "lm_head.weight": "output.weight"}
    else:
        state = t.take(own, {f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}"
                             for i in range(cfg.n_layers) for ours, theirs in LLAMA_LAYER.items()})
        names = {"embed_tokens.weight": "model.embed_tokens.weight"}
        if "lm_head.weight" in t or not d.get("tie_word_embeddings"):
            names["lm_head.weight"] = "lm_head.weight"
    state.update(t.take(own, {**names, "norm.weight": "model.norm.weight"}))
    if "lm_head.weight" not in state:                                  # tied (a copy: safetensors will not
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()  # save two names for one tensor)
    dtype = state["embed_tokens.weight"].dtype
    state.update({k: torch.zeros(v.shape, dtype=dtype) for k, v in own.items() if k.startswith("vision.")})
    return state


def load_model(directory: str, dtype: torch.dtype | None = None, device="cpu",
               img_context_id: int | None = None) -> Model:
    """Any supported checkpoint folder as a Model (see `detect_format`): the one loader of every
    entry point. img_context_id overrides the <IMG_CONTEXT> id (imported formats only)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    fmt = detect_format(directory)
    if fmt == "native":
        model = Model.from_pretrained(directory, device=device, dtype=dtype)
        if img_context_id not in (None, model.cfg.img_context_id):
            raise InputError(f"{directory}: img_context_id is fixed by its config.json "
                             f"({model.cfg.img_context_id}), got {img_context_id}")
        return model
    path = os.path.join(directory, "config.json")
    d = read_json(path)
    cfg = _hovle_config(d, path) if fmt == "hovle" else _text_config(d, path, fmt)
    if img_context_id is not None:
        if not isinstance(img_context_id, int) or not 0 <= img_context_id < cfg.vocab_size:
            raise InputError(f"{directory}: img_context_id {img_context_id!r} is not a token id "
                             f"(vocab_size {cfg.vocab_size})")
        cfg = cfg.replace(img_context_id=img_context_id)
    with torch.device("meta"):
        model = Model(cfg)
    own, t = model.state_dict(), _Tensors(directory)
    state = _hovle_state(t, cfg, d, own) if fmt == "hovle" else _text_state(t, cfg, d, own, fmt)
    t.check_all_used()
    check_state_dict(model, state, source=t.listing)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Import a HoVLE / InternLM2 / Llama checkpoint folder (or describe "
                                            "one of ours) and save it as config.json + model.safetensors.")
    p.add_argument("src", help="checkpoint folder (any supported format)")
    p.add_argument("--out", help="write the imported model to this folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], help="cast the weights")
    p.add_argument("--img-context-id", type=int, help="<IMG_CONTEXT> token id (HoVLE default: from config.json)")
    args = p.parse_args(argv)
    model = load_model(args.src, dtype=args.dtype and getattr(torch, args.dtype), img_context_id=args.img_context_id)
    if args.out:
        model.save_pretrained(args.out)
    c, n_params = model.cfg, sum(p.numel() for p in model.parameters())
    print(f"{args.src}: {detect_format(args.src)}, {n_params:,} parameters, {c.n_layers} layers, "
          f"hidden {c.hidden_size}, {c.n_heads} heads / {c.n_kv_heads} KV heads, vocab {c.vocab_size}, "
          f"{c.image_size} px / {c.patch_size} px patches -> {c.image_tokens} image tokens"
          + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    run_main(main)

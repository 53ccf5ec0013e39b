"""Import real checkpoints (HoVLE, InternLM2, Llama) into this project's `Model`.

Paper map (mmMamba, arXiv 2502.13145): Sec. 3.1 / 4.1 distil HoVLE-2.6B (8 holistic-embedding layers
+ InternLM2-1.8B) into Mamba-2. `load_model` reads such a teacher, as published, so that
`distill.py --teacher DIR` can start from it; `Model.save_pretrained` writes students back out.

API
    load_model(dir, dtype=None, device="cpu", img_context_id=None) -> Model   any supported folder
    detect_format(dir) -> "native" (Model.save_pretrained) | "hovle" | "internlm2" | "llama"
    split_wqkv / fuse_wqkv      InternLM2's fused q/k/v rows <-> separate wq, wk, wv
A folder holds config.json and model.safetensors, or model.safetensors.index.json ({"weight_map":
{key: shard file}}) and its shards. Tensors keep their stored dtype unless `dtype`. Errors are
`CheckpointError` (a ValueError) naming the file and, where there is one, the key. No q/k rows
are permuted: model.rope is the rotate-half layout (dim i pairs with i + P/2), as HF Llama and
InternLM2 compute it and HF Llama stores q/k rows (Meta's interleaved .pth files are not read).

HoVLE (inferred from the published HoVLE / mmMamba code; the weights cannot be downloaded here):
config.json has "architectures": ["InternVLChatModel"] (or "HoVLE...") with embedding_config and
llm_config, which must agree on hidden_size, heads, KV heads, intermediate_size, rope_theta and
rms_norm_eps (model.py has one set for all layers); force_image_size must equal
embedding_config.image_size (no resized position table). Unsupported: biases, rope_scaling, non-SiLU
MLPs, layer scale, special_token_maps, pixel_shuffle_loc other than "pre", a tied LM head. Our layers:
embedding_model.encoder.{i} then language_model.model.layers.{i}, all "attn", positions 0..L-1 through
both (key names: the tables below); the position table (1, 1 + g*g, D) has the unused class token in
slot 0 ((1, g*g, D) is accepted too). Ignored, as by HoVLE's forward: the class embedding,
language_model.model.tok_embeddings (the LLM receives hidden states), *.rotary_emb.inv_freq; any other
key is an error.

Text-only decoders (InternLM2ForCausalLM; LlamaForCausalLM, its LM head tied to embed_tokens when
tie_word_embeddings and no lm_head is stored) get a zero vision stem of the smallest shape (1 px images
and patches, one image token): IMAGES ARE NOT SUPPORTED, and the id img_context_id (default: the last
vocabulary id) is reserved: a prompt with it makes Model.embed raise; generate() never emits it.

Run:  python convert.py SRC --out DIR [--dtype float32] [--img-context-id N]
"""
from __future__ import annotations

import argparse
import os

import torch
from safetensors import safe_open

from model import Model, ModelConfig
from utils import InputError, read_json, run_main

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file."""
ARCHITECTURES = {"InternVLChatModel": "hovle", "internvl_chat": "hovle", "InternLM2ForCausalLM": "internlm2",
                 "internlm2": "internlm2", "LlamaForCausalLM": "llama", "llama": "llama"}   # also model_type
E, L = "embedding_model.", "language_model."
# {our key: theirs} in layer i (InternLM2 also stores attention.wqkv: split_wqkv), outside the layers
LLAMA_LAYER = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               **{f"mixer.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkvo"},
               **{f"feed_forward.w{j}.weight": f"mlp.{x}_proj.weight" for j, x in zip("132", ("gate", "up", "down"))}}
INTERNLM2_LAYER = {"mixer.wo.weight": "attention.wo.weight", **{f"{k}.weight": f"{k}.weight" for k in (
    "attention_norm", "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}}
OUTSIDE = {"hovle": (E + "llm_text_embeddings.weight", L + "model.norm.weight", L + "output.weight"),  # embedding,
           "internlm2": ("model.tok_embeddings.weight", "model.norm.weight", "output.weight"),    # final norm,
           "llama": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}         # LM head
HOVLE_VISION = {f"vision.{k}": E + k.replace("patch_", "vision_embeddings.patch_") for k in (
    "patch_embedding.weight", "patch_embedding.bias", "pixel_shuffle_proj.0.weight", "pixel_shuffle_proj.0.bias",
    "pixel_shuffle_proj.2.weight", "pixel_shuffle_proj.2.bias")}
SHAPE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_attention_heads": "n_heads",
              "num_key_value_heads": "n_kv_heads", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"}


def split_wqkv(w: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """InternLM2's fused `wqkv.weight` ((H + 2 Hkv) P, D), rows laid out (kv head j, slot, p) with
    slots [q x G, k, v] (G = H / Hkv), into wq (H P, D), wk (Hkv P, D), wv (Hkv P, D). Query head
    j*G + g is slot g of KV group j, so query head h uses KV head h // G, as model.Attention."""
    G, D = n_heads // n_kv_heads, w.shape[-1]
    w = w.reshape(n_kv_heads, G + 2, head_dim, D)
    return tuple(t.reshape(-1, D).clone(memory_format=torch.contiguous_format) for t in (w[:, :G], w[:, G], w[:, -1]))


def fuse_wqkv(wq, wk, wv, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of split_wqkv."""
    return torch.cat([w.unflatten(0, (n_kv_heads, -1, head_dim)) for w in (wq, wk, wv)], dim=1).flatten(0, 2)


class _Tensors:
    """The tensors of a folder: model.safetensors, or the shards model.safetensors.index.json lists.
    `get` checks presence and shape before reading and records the key as used."""

    def __init__(self, directory: str):
        self.listing, single = os.path.join(directory, INDEX_NAME), os.path.join(directory, "model.safetensors")
        self.files, self.used = {}, set()
        if os.path.isfile(self.listing):
            weight_map = read_json(self.listing).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{self.listing}: missing key 'weight_map' (an object: tensor key -> shard file)")
        elif os.path.isfile(single):
            self.listing, weight_map = single, dict.fromkeys(self._open(single).keys(), "model.safetensors")
        else:
            raise CheckpointError(f"{directory}: no weights: expected model.safetensors or {INDEX_NAME} with shards")
        self.where = {key: os.path.join(directory, str(shard)) for key, shard in weight_map.items()}
        for key, path in self.where.items():
            if not os.path.isfile(path):
                raise CheckpointError(f"{self.listing}: shard '{weight_map[key]}' (holding key '{key}', among "
                                      f"others) is missing: no file {path}")

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
        path, f = self.where[key], self._open(self.where[key])
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
            raise CheckpointError(f"{self.listing}: {len(left)} unexpected key(s) that model.py has no place for "
                                  f"(e.g. attention biases): {', '.join(map(repr, left[:20]))}"
                                  + (f" and {len(left) - 20} more" if len(left) > 20 else ""))


class _Config:
    """A config.json: values by dotted key ("llm_config.vocab_size"), null as absent, required unless a default."""

    def __init__(self, path: str):
        self.path, self.d = path, read_json(path)

    def get(self, key: str, default=...):
        v = self.d
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is None and default is ...:
            raise CheckpointError(f"{self.path}: missing key '{key}'")
        return default if v is None else v

    def number(self, key: str, default=..., integer: bool = True):
        v = self.get(key, default)
        if not isinstance(v, int if integer else (int, float)) or isinstance(v, bool) or not v > 0:
            raise CheckpointError(f"{self.path}: key '{key}' must be a positive "
                                  f"{'integer' if integer else 'number'}, got {v!r}")
        return v if integer else float(v)

    def supported(self, *checks) -> None:
        """Each check (dotted key, the one supported value, why) passes if the key is absent or has it."""
        for key, value, why in checks:
            if (v := self.get(key, value)) != value:
                raise CheckpointError(f"{self.path}: key '{key}' = {v!r} is not supported ({why})")


def _decoder(c: _Config, prefix: str, bias_key: str) -> dict:
    """The SHAPE_KEYS and num_hidden_layers of InternLM2, Llama or either half of HoVLE, checked."""
    c.supported((prefix + bias_key, False, "model.py's attention has no biases"),
                (prefix + "mlp_bias", False, "model.py's MLP has no biases"),
                (prefix + "hidden_act", "silu", "model.py's MLP is SwiGLU with SiLU"),
                (prefix + "rope_scaling", None, "model.rope has no scaling"))
    num = lambda key, *default: c.number(prefix + key, *default)
    D, H = num("hidden_size"), num("num_attention_heads")
    if (head_dim := c.get(prefix + "head_dim", None)) is not None and head_dim * H != D:
        raise CheckpointError(f"{c.path}: key '{prefix}head_dim' = {head_dim!r} != hidden_size / "
                              f"num_attention_heads = {D / H:g}: not supported by model.py")
    return {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": num("num_key_value_heads", H),
            "intermediate_size": num("intermediate_size"), "rope_theta": num("rope_theta", 10000.0, False),
            "rms_norm_eps": num("rms_norm_eps", 1e-6, False), "num_hidden_layers": num("num_hidden_layers")}


def _model_config(c: _Config, dec: dict, n_layers: int, **kw) -> ModelConfig:
    try:
        return ModelConfig(**{o: dec[hf] for hf, o in SHAPE_KEYS.items()}, layers=["attn"] * n_layers, **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{c.path}: the config does not give a valid model: {e}") from e


def _hovle_config(c: _Config) -> ModelConfig:
    e, l = "embedding_config.", "llm_config."
    c.supported((e + "use_pixel_shuffle_proj", True, "model.py's vision stem always has the shuffle MLP"),
                (e + "pixel_shuffle_loc", "pre", "model.py shuffles the patches before the layers"),
                (e + "use_ls", False, "model.py has no layer scale"),
                (e + "num_channels", 3, "model.py's patch conv takes RGB"),
                (e + "special_token_maps", {}, "no embeddings beyond the LLM vocabulary"),
                (l + "tie_word_embeddings", False, "HoVLE's LM head is language_model.output"))
    ce, cl = _decoder(c, e, "attention_bias"), _decoder(c, l, "bias")
    vocab, image_size, D = c.number(l + "vocab_size"), c.number(e + "image_size"), ce["hidden_size"]
    pairs = [(e + k, ce[k], l + k, cl[k]) for k in SHAPE_KEYS] + [
        (e + "llm_hidden_size", c.number(e + "llm_hidden_size", D), e + "hidden_size", D),
        (e + "llm_vocab_size", c.number(e + "llm_vocab_size", vocab), l + "vocab_size", vocab),
        ("force_image_size", c.get("force_image_size", image_size), e + "image_size", image_size)]
    for key_a, a, key_b, b in pairs:
        if a != b:
            raise CheckpointError(f"{c.path}: key '{key_a}' = {a!r} but '{key_b}' = {b!r}; model.py needs them "
                                  f"equal (one set of shapes for all layers, no resized position table)")
    ratio = c.number(e + "downsample_ratio", c.number("downsample_ratio", 0.5, False), False)
    img = c.get(e + "img_context_token_id", c.get("img_context_token_id", 92546))  # InternLM2's <IMG_CONTEXT>
    return _model_config(c, ce, ce["num_hidden_layers"] + cl["num_hidden_layers"], vocab_size=vocab,
                         image_size=image_size, patch_size=c.number(e + "patch_size"), pixel_shuffle_ratio=ratio,
                         img_context_id=img)


def _text_config(c: _Config, fmt: str) -> ModelConfig:
    if fmt == "internlm2":
        c.supported(("tie_word_embeddings", False, "InternLM2 stores its LM head as output.weight"))
    dec, vocab = _decoder(c, "", "bias" if fmt == "internlm2" else "attention_bias"), c.number("vocab_size")
    return _model_config(c, dec, dec["num_hidden_layers"], vocab_size=vocab, image_size=1, patch_size=1,
                         pixel_shuffle_ratio=1.0, img_context_id=vocab - 1)


def detect_format(directory: str) -> str:
    """"native" (a config.json of Model.save_pretrained), "hovle", "internlm2" or "llama"."""
    d = read_json(path := os.path.join(directory, "config.json"))
    if "layers" in d:
        return "native"
    hovle = "embedding_config" in d and "llm_config" in d
    arch = d.get("architectures") or d.get("model_type") or ("InternVLChatModel" if hovle else None)
    arch = str(arch[0] if isinstance(arch, list) and arch else arch)
    fmt = "hovle" if arch.startswith("HoVLE") else ARCHITECTURES.get(arch)
    if fmt is None:
        raise CheckpointError(f"{path}: unknown architecture '{arch}' (key 'architectures'); supported: "
                              f"{', '.join(a for a in ARCHITECTURES if a[0].isupper())}, HoVLE*, or our own format")
    if fmt == "hovle" and not hovle:
        raise CheckpointError(f"{path}: architecture '{arch}' without keys 'embedding_config' and 'llm_config': "
                              f"only HoVLE (holistic embedding, no separate vision encoder) is supported")
    return fmt


def _layer(t: _Tensors, cfg: ModelConfig, own: dict, i: int, prefix: str, fmt: str) -> dict:
    """Layer i's weights under model.py's keys, from theirs under `prefix`; `own`: our state dict (shapes)."""
    names = {f"layers.{i}.{ours}": prefix + theirs
             for ours, theirs in (LLAMA_LAYER if fmt == "llama" else INTERNLM2_LAYER).items()}
    if fmt == "llama":
        return t.take(own, names)
    H, Hkv, P, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_size
    wqkv = split_wqkv(t.get(prefix + "attention.wqkv.weight", ((H + 2 * Hkv) * P, D)), H, Hkv, P)
    return {**dict(zip((f"layers.{i}.mixer.{w}.weight" for w in ("wq", "wk", "wv")), wqkv)), **t.take(own, names)}


def _state(t: _Tensors, cfg: ModelConfig, c: _Config, own: dict, fmt: str) -> dict:
    """HoVLE: the embedding model's layers then the LLM's. A text-only decoder: its layers, a zero
    vision stem (see the module docstring) and, if tied, the LM head copied from the embedding."""
    n_embed = c.get("embedding_config.num_hidden_layers") if fmt == "hovle" else 0
    state, names = {}, dict(zip(("embed_tokens.weight", "norm.weight", "lm_head.weight"), OUTSIDE[fmt]))
    for i in range(cfg.n_layers):
        prefix = f"{E}encoder.{i}." if i < n_embed else f"{L}model.layers.{i - n_embed}."
        state.update(_layer(t, cfg, own, i, prefix if fmt == "hovle" else f"model.layers.{i}.", fmt))
    if fmt == "hovle":
        g2, D = cfg.grid ** 2, cfg.hidden_size
        pos = t.get(E + "vision_embeddings.position_embedding", (1, 1 + g2, D), (1, g2, D))
        state["vision.position_embedding"] = pos[:, -g2:].clone()      # without the class token's slot 0
        t.used |= {E + "vision_embeddings.class_embedding", L + "model.tok_embeddings.weight"}  # unused by HoVLE
        names.update(HOVLE_VISION)
    elif c.get("tie_word_embeddings", False) and "lm_head.weight" not in t.where:
        del names["lm_head.weight"]
    state.update(t.take(own, names))
    if fmt != "hovle":                                     # tied: a copy (safetensors will not save one
        state.setdefault("lm_head.weight", state["embed_tokens.weight"].clone())  # tensor under two names)
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
    if fmt == "native":                                  # Model.save_pretrained's folder
        cfg = ModelConfig.load(os.path.join(directory, "config.json"))
        if img_context_id not in (None, cfg.img_context_id):
            raise InputError(f"{directory}: img_context_id is fixed by its config.json "
                             f"({cfg.img_context_id}), got {img_context_id}")
    else:
        c = _Config(os.path.join(directory, "config.json"))
        cfg = _hovle_config(c) if fmt == "hovle" else _text_config(c, fmt)
    if img_context_id is not None and fmt != "native":
        if not isinstance(img_context_id, int) or not 0 <= img_context_id < cfg.vocab_size:
            raise InputError(f"{directory}: img_context_id {img_context_id!r} is not a token id "
                             f"(vocab_size {cfg.vocab_size})")
        cfg = cfg.replace(img_context_id=img_context_id)
    with torch.device("meta"):
        model = Model(cfg)
    t = _Tensors(directory)
    if fmt == "native":                                  # every tensor as stored, checked below
        state = {k: t._open(path).get_tensor(k) for k, path in t.where.items()}
    else:
        state = _state(t, cfg, c, model.state_dict(), fmt)
        t.check_all_used()
    own = model.state_dict()
    problems = {"missing keys": sorted(set(own) - set(state)), "unexpected keys": sorted(set(state) - set(own)),
                "mis-shaped keys": sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                          for k in set(own) & set(state) if state[k].shape != own[k].shape)}
    if any(problems.values()):
        raise CheckpointError(f"{t.listing}: tensors do not fit the model config\n" + "\n".join(
            f"  {name} ({len(ks)}): {', '.join(ks)}" for name, ks in problems.items() if ks))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Import a HoVLE / InternLM2 / Llama checkpoint folder (or describe ours)")
    p.add_argument("src", help="checkpoint folder (any supported format)")
    p.add_argument("--out", help="write the imported model to this folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], help="cast the weights")
    p.add_argument("--img-context-id", type=int, help="<IMG_CONTEXT> token id (HoVLE default: from config.json)")
    args = p.parse_args(argv)
    model = load_model(args.src, dtype=args.dtype and getattr(torch, args.dtype), img_context_id=args.img_context_id)
    if args.out:
        model.save_pretrained(args.out)
    c, n_params = model.cfg, sum(p.numel() for p in model.parameters())
    print(f"{args.src}: {detect_format(args.src)}, {n_params:,} parameters, {c.n_layers} layers, hidden "
          f"{c.hidden_size}, {c.n_heads} heads / {c.n_kv_heads} KV heads, vocab {c.vocab_size}, {c.image_size} px / "
          f"{c.patch_size} px patches -> {c.image_tokens} image tokens" + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    run_main(main)

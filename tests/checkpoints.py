"""Tiny random checkpoints in the published layouts (HoVLE, the released mmMamba students), written
as Hugging Face folders (config.json + model.safetensors, or shards + model.safetensors.index.json),
and a tiny SentencePiece tokenizer folder, for the tests of convert.py,
hovle.py and ask.py. Key names, fused wqkv / wvkqgdt, the class-token slot of HoVLE's position table
and the tensors HoVLE stores but does not use are as published; the mmMamba layout and config edits
are written here from the official convert_weight.py and Mamba2_Attention.change_weight, not from
convert.py.
"""
import io
import json
import os

import torch
from safetensors.torch import save_file

# convert_weight.py#L81-L89 (hustvl/mmMamba at 85143d0): the remote code's classes
MMMAMBA_AUTO_MAP = {"AutoConfig": "configuration_mmMamba_chat.mmMambaChatConfig",
                    "AutoModel": "modeling_mmMamba_chat.mmMambaChatModel",
                    "AutoModelForCausalLM": "modeling_mmMamba_chat.mmMambaChatModel"}
MMMAMBA_LLM_AUTO_MAP = {"AutoConfig": "configuration_mmMamba.mmMambaConfig",
                        "AutoModel": "modeling_mmMamba.mmMambaForCausalLM",
                        "AutoModelForCausalLM": "modeling_mmMamba.mmMambaForCausalLM"}

def _save_folder(directory: str, config: dict, tensors: dict, shards: int, shard_of) -> None:
    """config.json plus model.safetensors (shards == 1) or `shards` files and an index."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{j + 1:05d}-of-{shards:05d}.safetensors" for j in range(shards)]
        groups = [{} for _ in names]
        for k, v in tensors.items():
            groups[min(shard_of(k), shards - 1)][k] = v
        for name, group in zip(names, groups):
            save_file(group, os.path.join(directory, name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": {k: names[min(shard_of(k), shards - 1)] for k in sorted(tensors)}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
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


def _mamba2_layer_tensors(r: _Rand, prefix: str, D, H, Hkv, I) -> dict:
    """A converted layer as Mamba2_Attention.change_weight leaves it (mamba2.py#L779-L806): fused
    wvkqgdt rows [v (Hkv P) | k (Hkv P) | q (H P) | g (H P) | dt (H)], conv1d over channels [v, k, q]
    with d_conv = 2, dt_bias, A_log_bias, g_norm_swish_gate (P), o_proj; the norms and MLP as InternLM2."""
    P = D // H
    channels = (H + 2 * Hkv) * P
    t = _internlm2_layer_tensors(r, prefix, D, H, Hkv, I)
    del t[prefix + "attention.wqkv.weight"]
    t[prefix + "attention.o_proj.weight"] = t.pop(prefix + "attention.wo.weight")
    t.update({prefix + "attention.wvkqgdt.weight": r.linear((2 * H + 2 * Hkv) * P + H, D),
              prefix + "attention.conv1d.weight": r(channels, 1, 2, std=0.5),
              prefix + "attention.conv1d.bias": r(channels, std=0.1),
              prefix + "attention.dt_bias": r(H, mean=-2.0, std=0.5),
              prefix + "attention.A_log_bias": r(H, mean=1.0, std=0.5),
              prefix + "attention.g_norm_swish_gate.weight": r.norm(P)})
    return t


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
                     shards: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                     block_types: list | None = None) -> dict:
    """A random HoVLE-layout checkpoint (published key names, fused wqkv, class-token slot in the
    position table, unused class_embedding / tok_embeddings included as HoVLE has them), in
    `shards` files with an index (embedding model in the first, LLM in the second). The defaults fit
    data.py (vocab 463, <IMG_CONTEXT> = 6, 128 px, 8 px patches, 0.5 shuffle: 64 tokens per image).
    block_types ("mamba2" or "mha" per layer, embedding model first): an mmMamba student instead,
    its "mamba2" layers as change_weight leaves them and config.json as convert_weight.py edits it
    (lines 80-102; torch_dtype from `dtype`). Returns the tensors written."""
    r = _Rand(seed, dtype)
    D, H, Hkv, I, V = hidden_size, n_heads, n_kv_heads, intermediate_size, vocab_size
    g, E, L = image_size // patch_size, "embedding_model.", "language_model."
    kinds = block_types or ["mha"] * (n_embed_layers + n_llm_layers)
    prefixes = [f"{E}encoder.{i}." for i in range(n_embed_layers)]
    prefixes += [f"{L}model.layers.{i}." for i in range(n_llm_layers)]
    t = {}
    for prefix, kind in zip(prefixes, kinds, strict=True):
        layer = _mamba2_layer_tensors if kind == "mamba2" else _internlm2_layer_tensors
        t.update(layer(r, prefix, D, H, Hkv, I))
    t.update({
        E + "vision_embeddings.class_embedding": r(1, 1, D),
        E + "vision_embeddings.patch_embedding.weight": r(D, 3, patch_size, patch_size,
                                                          std=(3 * patch_size ** 2) ** -0.5),
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
    llm["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                       "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                       "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
              "downsample_ratio": downsample_ratio, "force_image_size": image_size, "ps_version": "v2",
              "select_layer": -1, "dynamic_image_size": False, "use_thumbnail": False, "torch_dtype": "float32",
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                           "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
              "embedding_config": emb, "llm_config": llm}
    if block_types is not None:                                  # convert_weight.py#L80-L102
        config.update(_name_or_path=directory, architectures="mmMambaChatModel", model_type="mmMamba_chat",
                      torch_dtype=str(dtype).split(".")[-1])
        config["auto_map"].update(MMMAMBA_AUTO_MAP)
        emb.update(model_type="mmMamba_embedding", layers_block_type=list(block_types[:n_embed_layers]))
        llm.update(architectures="mmMambaForCausalLM", model_type="mmMamba",
                   layers_block_type=list(block_types[n_embed_layers:]))
        llm["auto_map"].update(MMMAMBA_LLM_AUTO_MAP)
    _save_folder(directory, config, t, shards, lambda k: 0 if k.startswith(E) else 1)
    return t


SENTENCES = ["What color is the square?", "The square is red.", "How many circles are there?",
             "There are three circles.", "Describe the image.", "A blue triangle above a green cross.",
             "user\n", "assistant\n", "system\n", "Is there a yellow diamond? Yes, 2 of them."]


def write_tiny_tokenizer(directory: str) -> dict:
    """A SentencePiece tokenizer.model trained here (BPE, 300 pieces, byte fallback, no normaliser,
    <|im_start|> / <|im_end|> as user-defined pieces, as InternLM2's) and the files transformers
    writes beside it, adding <img>, </img>, <IMG_CONTEXT> after the pieces (ids 300-302, as InternVL
    adds them after InternLM2's 92544). Returns {special token: id}."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"], hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4,
                "<img>": 300, "</img>": 301, "<IMG_CONTEXT>": 302}
    added = {k: v for k, v in specials.items() if v >= 300}
    config = {"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False,
              "added_tokens_decoder": {str(i): {"content": k, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
                                       for k, i in specials.items()}}
    files = {"tokenizer_config.json": config, "added_tokens.json": added,
             "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                         "pad_token": "</s>", "additional_special_tokens": list(specials)[3:]}}
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    return specials

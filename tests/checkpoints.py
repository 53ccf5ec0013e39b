"""Tiny random checkpoints in the published layouts (HoVLE, InternLM2, Llama), written as Hugging
Face folders (config.json + model.safetensors, or shards + model.safetensors.index.json), for the
tests of convert.py. Key names, fused wqkv, the class-token slot of HoVLE's position table and the
tensors HoVLE stores but does not use are as published.
"""
import json
import os

import torch
from safetensors.torch import save_file

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
        t.update({p + "self_attn.q_proj.weight": r.linear(H * P, D),
                  p + "self_attn.k_proj.weight": r.linear(Hkv * P, D),
                  p + "self_attn.v_proj.weight": r.linear(Hkv * P, D),
                  p + "self_attn.o_proj.weight": r.linear(D, H * P),
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

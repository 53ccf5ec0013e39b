"""convert.py: HoVLE checkpoints imported into Model compute what the published model computes;
saved imports load back; every error names the file and the key.

The reference forwards below are written from the published model code (HoVLE's
modeling_holistic_embedding.py / InternLM2), directly on the raw tensors read from the written
safetensors files, in float64; they share nothing with convert.py or model.py.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import convert
from checkpoints import write_tiny_hovle
from convert import CheckpointError
from model import Model
from utils import InputError

F64 = torch.float64
TINY = dict(vocab_size=50, img_context_id=6, hidden_size=32, n_heads=4, n_kv_heads=2, intermediate_size=48,
            n_embed_layers=2, n_llm_layers=2, image_size=16, patch_size=4, downsample_ratio=0.5,
            rope_theta=10000.0, norm_eps=1e-5)


# ----------------------------------------------------------------------------------------------
# Independent reference (float64)

def raw_tensors(d):
    """Every tensor of a folder, read with safetensors directly (index or single file)."""
    index = os.path.join(d, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return {k: v.to(F64) for k, v in out.items()}


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, theta):
    """HF Llama / InternLM2 rotary embedding, x (b, heads, L, P), positions 0..L-1."""
    L, P = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, P, 2, dtype=F64) / P)
    freqs = torch.outer(torch.arange(L, dtype=F64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def repeat_kv(x, n_rep):
    b, hkv, L, P = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, L, P).reshape(b, hkv * n_rep, L, P)


def attention(q, k, v, wo, theta):
    """q (b, L, H, P), k, v (b, L, Hkv, P): causal softmax attention as the published eager code."""
    b, L, H, P = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, theta), apply_rope(k, theta)
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    s = q @ k.transpose(2, 3) / math.sqrt(P)
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    return o.transpose(1, 2).reshape(b, L, H * P) @ wo.T


def internlm2_layer(h, raw, p, H, Hkv, theta, eps):
    """InternLM2DecoderLayer: fused wqkv split on the activations as `rearrange(qkv, "b q (h gs d)
    -> b q h gs d", gs=2 + groups)`, q = slots [:groups], k = slot -2, v = slot -1."""
    b, L, D = h.shape
    P, G = D // H, H // Hkv
    x = rms_norm(h, raw[p + "attention_norm.weight"], eps)
    qkv = (x @ raw[p + "attention.wqkv.weight"].T).reshape(b, L, Hkv, G + 2, P)
    q = qkv[..., :G, :].reshape(b, L, H, P)
    h = h + attention(q, qkv[..., -2, :], qkv[..., -1, :], raw[p + "attention.wo.weight"], theta)
    x = rms_norm(h, raw[p + "ffn_norm.weight"], eps)
    ff = raw[p + "feed_forward.w2.weight"]
    return h + (F.silu(x @ raw[p + "feed_forward.w1.weight"].T) * (x @ raw[p + "feed_forward.w3.weight"].T)) @ ff.T


def hovle_vision(raw, px, patch, sf):
    """HoVLE VisionEmbeddings (use_cls_token=False) + pixel_shuffle ("pre") + pixel_shuffle_proj."""
    E = "embedding_model."
    x = F.conv2d(px, raw[E + "vision_embeddings.patch_embedding.weight"],
                 raw[E + "vision_embeddings.patch_embedding.bias"], stride=patch)
    n, D, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = raw[E + "vision_embeddings.position_embedding"][:, 1:, :]
    pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    pos = pos.reshape(1, -1, gh * gw).permute(0, 2, 1)
    x = x + pos
    n, l, c = x.size()
    h = w = int(l ** 0.5)
    x = x.reshape(n, w, int(h * sf), int(c / sf)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * sf), int(w * sf), int(c / (sf * sf))).permute(0, 2, 1, 3)
    x = x.reshape(n, int(l * sf * sf), int(c / (sf * sf)))
    x = F.gelu(x @ raw[E + "pixel_shuffle_proj.0.weight"].T + raw[E + "pixel_shuffle_proj.0.bias"])
    return x @ raw[E + "pixel_shuffle_proj.2.weight"].T + raw[E + "pixel_shuffle_proj.2.bias"]


def hovle_reference(raw, ids, px, c):
    E, L = "embedding_model.", "language_model."
    h = raw[E + "llm_text_embeddings.weight"][ids]
    vis = hovle_vision(raw, px, c["patch_size"], c["downsample_ratio"])
    h[ids == c["img_context_id"]] = vis.flatten(0, 1)
    args = (c["n_heads"], c["n_kv_heads"], c["rope_theta"], c["norm_eps"])
    for i in range(c["n_embed_layers"]):
        h = internlm2_layer(h, raw, f"{E}encoder.{i}.", *args)
    for i in range(c["n_llm_layers"]):                   # the LLM takes the embedding model's hidden states
        h = internlm2_layer(h, raw, f"{L}model.layers.{i}.", *args)
    return rms_norm(h, raw[L + "model.norm.weight"], c["norm_eps"]) @ raw[L + "output.weight"].T


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def prompt(c, n_img_tokens, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c["vocab_size"] - 1, (batch, 11), generator=g)
    ids[ids >= c["img_context_id"]] += 1
    img = torch.full((batch, n_img_tokens), c["img_context_id"])
    return torch.cat([ids[:, :3], img, ids[:, 3:]], dim=1)


@pytest.fixture(scope="module")
def hovle_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hovle"))
    write_tiny_hovle(d, **TINY)
    return d


def copy_of(src, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(src, d)
    return d


# ----------------------------------------------------------------------------------------------
# Layout and numerics

def test_hovle_layout_is_the_published_one(hovle_dir):
    E, L = "embedding_model.", "language_model."
    layer = ["attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
             "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"]
    want = {f"{E}encoder.{i}.{k}" for i in range(2) for k in layer}
    want |= {f"{L}model.layers.{i}.{k}" for i in range(2) for k in layer}
    want |= {L + "model.norm.weight", L + "output.weight", L + "model.tok_embeddings.weight",
             E + "vision_embeddings.patch_embedding.weight", E + "vision_embeddings.patch_embedding.bias",
             E + "vision_embeddings.position_embedding", E + "vision_embeddings.class_embedding",
             E + "pixel_shuffle_proj.0.weight", E + "pixel_shuffle_proj.0.bias", E + "pixel_shuffle_proj.2.weight",
             E + "pixel_shuffle_proj.2.bias", E + "llm_text_embeddings.weight"}
    wm = json.load(open(os.path.join(hovle_dir, "model.safetensors.index.json")))["weight_map"]
    assert set(wm) == want and len(set(wm.values())) == 2
    raw = raw_tensors(hovle_dir)
    D, H, Hkv, g = 32, 4, 2, 4
    assert raw[E + "encoder.0.attention.wqkv.weight"].shape == ((H + 2 * Hkv) * D // H, D)
    assert raw[E + "vision_embeddings.position_embedding"].shape == (1, 1 + g * g, D)
    assert raw[E + "pixel_shuffle_proj.0.weight"].shape == (D, 4 * D)
    assert convert.detect_format(hovle_dir) == "hovle"


def test_hovle_logits_match_reference(hovle_dir):
    model = convert.load_model(hovle_dir, dtype=F64)
    c = model.cfg
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.image_tokens, c.vocab_size) == (4, 4, 2, 4, 50)
    assert c.img_context_id == 6 and c.layers == ["attn"] * 4
    ids = prompt(TINY, c.image_tokens)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        got = model(ids, px)
    want = hovle_reference(raw_tensors(hovle_dir), ids, px, TINY)
    assert rel_err(got, want) <= 1e-10
    # the check has teeth: the same reference with another RoPE base is far off
    assert rel_err(hovle_reference(raw_tensors(hovle_dir), ids, px, {**TINY, "rope_theta": 1e6}), want) > 1e-3


def test_split_wqkv_gqa_order():
    H, Hkv, P, D = 6, 2, 3, 5
    G = H // Hkv
    rows = torch.arange((H + 2 * Hkv) * P, dtype=F64)[:, None].expand(-1, D)
    wq, wk, wv = convert.split_wqkv(rows, H, Hkv, P)
    for h in range(H):                                 # query head h = slot h % G of KV group h // G
        j, s = divmod(h, G)
        assert torch.equal(wq[h * P:(h + 1) * P, 0], torch.arange(P, dtype=F64) + (j * (G + 2) + s) * P)
    assert torch.equal(wk[P:2 * P, 0], torch.arange(P, dtype=F64) + (1 * (G + 2) + G) * P)
    assert torch.equal(wv[:P, 0], torch.arange(P, dtype=F64) + (G + 1) * P)
    assert torch.equal(convert.fuse_wqkv(wq, wk, wv, H, Hkv, P), rows)


def test_saved_import_loads_back(hovle_dir, tmp_path):
    model = convert.load_model(hovle_dir)
    out = str(tmp_path / "exported")
    convert.save_model(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert convert.detect_format(out) == "native"
    back = convert.load_model(out)
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_distill_load_teacher_accepts_hovle(hovle_dir):
    import distill
    teacher = distill.load_teacher(hovle_dir)
    assert teacher.cfg.n_layers == 4 and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.lm_head.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Errors name the file and the key

def test_missing_shard(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError) as e:
        convert.load_model(d)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and "model-00002-of-00002.safetensors" in msg
    assert "'language_model." in msg


def test_missing_key(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    index = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(index))
    del idx["weight_map"]["language_model.model.norm.weight"]
    json.dump(idx, open(index, "w"))
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors\.index\.json: missing key 'language_model\.model\.norm\.weight'"):
        convert.load_model(d)


def test_key_listed_but_absent_from_its_shard(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    shard = os.path.join(d, "model-00001-of-00002.safetensors")
    t = load_file(shard)
    del t["embedding_model.pixel_shuffle_proj.2.bias"]
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: "
                                              r"missing key 'embedding_model\.pixel_shuffle_proj\.2\.bias'"):
        convert.load_model(d)


def test_misshaped_key(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    t = load_file(shard)
    key = "language_model.model.layers.1.attention.wqkv.weight"
    t[key] = t[key][:-1]
    save_file(t, shard)
    with pytest.raises(CheckpointError) as e:
        convert.load_model(d)
    msg = str(e.value)
    assert "model-00002-of-00002.safetensors" in msg and f"'{key}'" in msg and "(63, 32)" in msg and "(64, 32)" in msg


def test_unexpected_key(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    shard = os.path.join(d, "model-00001-of-00002.safetensors")
    t = load_file(shard)
    t["embedding_model.encoder.0.attention.wqkv.bias"] = torch.zeros(64)
    save_file(t, shard)
    index = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(index))
    idx["weight_map"]["embedding_model.encoder.0.attention.wqkv.bias"] = "model-00001-of-00002.safetensors"
    json.dump(idx, open(index, "w"))
    with pytest.raises(CheckpointError,
                       match=r"index\.json: 1 unexpected key.*'embedding_model\.encoder\.0\.attention\.wqkv\.bias'"):
        convert.load_model(d)


def test_unknown_architecture(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError,
                       match=r"config\.json: unknown architecture 'Qwen2ForCausalLM' \(key 'architectures'\)"):
        convert.load_model(d)


def test_config_not_json(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):   # utils.read_json's error
        convert.load_model(d)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c["llm_config"].pop("vocab_size"), r"config\.json: missing key 'llm_config\.vocab_size'"),
    (lambda c: c["llm_config"].update(rope_theta=1e6),
     r"config\.json: key 'embedding_config\.rope_theta' = 10000\.0 but 'llm_config\.rope_theta' = 1000000\.0"),
    (lambda c: c["embedding_config"].update(pixel_shuffle_loc="post"),
     r"config\.json: key 'embedding_config\.pixel_shuffle_loc' = 'post' is not supported"),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"config\.json: key 'llm_config\.rope_scaling'"),
    (lambda c: c["llm_config"].update(hidden_size=-32),
     r"config\.json: key 'llm_config\.hidden_size' must be a positive integer, got -32"),
    (lambda c: c.update(force_image_size=32),
     r"config\.json: key 'force_image_size' = 32 but 'embedding_config\.image_size' = 16"),
    (lambda c: c["embedding_config"].update(special_token_maps={"<x>": 1}),
     r"config\.json: key 'embedding_config\.special_token_maps' = .* is not supported"),
])
def test_bad_config_keys(hovle_dir, tmp_path, edit, pattern):
    d = copy_of(hovle_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=pattern):
        convert.load_model(d)


def test_position_table_without_class_slot(hovle_dir, tmp_path):
    d = copy_of(hovle_dir, tmp_path)
    shard = os.path.join(d, "model-00001-of-00002.safetensors")
    t = load_file(shard)
    key = "embedding_model.vision_embeddings.position_embedding"
    full = t[key]
    t[key] = full[:, 1:].contiguous()                   # (1, g*g, D): accepted, same model
    save_file(t, shard)
    assert torch.equal(convert.load_model(d).vision.position_embedding, full[:, 1:])
    t[key] = full[:, 2:].contiguous()                   # neither shape: both are named
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: key '.*position_embedding' has "
                                              r"shape \(1, 15, 32\), expected \(1, 17, 32\) or \(1, 16, 32\)"):
        convert.load_model(d)


def test_no_folder_no_weights(hovle_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint folder"):
        convert.load_model(str(tmp_path / "nowhere"))
    d = copy_of(hovle_dir, tmp_path)
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(d, f))
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    with pytest.raises(CheckpointError, match=r"ckpt: no weights: expected model\.safetensors"):
        convert.load_model(d)


def test_cli_imports_and_saves(hovle_dir, tmp_path, capsys):
    out = str(tmp_path / "imported")
    convert.main([hovle_dir, "--out", out, "--dtype", "float64"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "hovle" in line and "4 layers" in line and f"wrote {out}" in line
    model = convert.load_model(out)
    assert convert.detect_format(out) == "native" and model.lm_head.weight.dtype == F64
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = str(tmp_path / "nowhere")
    r = subprocess.run([sys.executable, os.path.join(root, "convert.py"), bad], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == f"error: {bad}: no such checkpoint folder\n"

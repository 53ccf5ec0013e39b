"""The released mmMamba students (issue 28): convert.py reads and writes the official layout, hovle.py
tokenizes, tiles and templates as HoVLE's code, ask.py answers with a released-layout folder
(distill.py --eval points to ask.py).

The folders are written by tests/checkpoints.py from the official rules (convert_weight.py,
Mamba2_Attention.change_weight), never by convert.py. The reference forward below is the official
stage-3 forward of a converted layer (src/model/linear_attention/mamba2.py#L669-L748 at
hustvl/mmMamba 85143d0) written from its equations on the raw tensors in float64, with
mamba_chunk_scan_combined as its recurrence; it shares nothing with convert.py or model.py.
"""
import json
import os
import re
import shutil
import sys

import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ask
import convert
import distill
import evaluate
import hovle
from checkpoints import MMMAMBA_AUTO_MAP, MMMAMBA_LLM_AUTO_MAP, write_tiny_hovle, write_tiny_tokenizer
from convert import CheckpointError
from test_convert import hovle_vision, internlm2_layer, raw_tensors, rel_err, rms_norm
from utils import InputError, run_main

F64 = torch.float64
E = "embedding_model."
L = "language_model."
TINY = dict(vocab_size=303, img_context_id=302, hidden_size=32, n_heads=4, n_kv_heads=2, intermediate_size=48,
            n_embed_layers=2, n_llm_layers=2, image_size=16, patch_size=4, downsample_ratio=0.5,
            rope_theta=10000.0, norm_eps=1e-5)
LINEAR = ["mamba2"] * 4
HYBRID = ["mha", "mamba2", "mamba2", "mha"]          # one attention layer kept in each half


def tiny_folder(directory, kinds, dtype=torch.bfloat16, tokenizer=True):
    """A released-layout folder (bfloat16, as the official conversion writes) with a tokenizer."""
    write_tiny_hovle(str(directory), **TINY, block_types=kinds, dtype=dtype, shards=2)
    if tokenizer:
        write_tiny_tokenizer(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {"linear": tiny_folder(root / "linear", LINEAR), "hybrid": tiny_folder(root / "hybrid", HYBRID)}


# ----------------------------------------------------------------------------------------------
# Reference forward of the official layout (float64)

def mamba2_layer(h, raw, p, H, Hkv, eps, order="vkq", gqa="repeat_kv"):
    """A converted InternLM2 layer: RMSNorm, then Mamba2_Attention: wvkqgdt split into v, k, q, g,
    dt rows; causal conv (d_conv 2) over the channels [v, k, q] and SiLU; k, v repeated to H heads
    (repeat_kv: head h reads KV head h // G); dt = softplus(dt + dt_bias), A = -exp(A_log_bias);
    h_t = exp(dt A) h_{t-1} + dt v_t k_t^T, y_t = h_t q_t; RMSNorm_P(y) g_norm weight * SiLU(g);
    o_proj; then the SwiGLU MLP. order / gqa: wrong readings, to show the check has teeth."""
    b, T, D = h.shape
    P = D // H
    G = H // Hkv
    sizes = {"v": Hkv * P, "k": Hkv * P, "q": H * P}
    u = rms_norm(h, raw[p + "attention_norm.weight"], eps)
    proj = u @ raw[p + "attention.wvkqgdt.weight"].T
    rows = [sizes[c] for c in order] + [H * P, H]
    parts = dict(zip(list(order) + ["g", "dt"], proj.split(rows, dim=-1)))
    vkq = torch.cat([parts["v"], parts["k"], parts["q"]], dim=-1).transpose(1, 2)       # (b, channels, T)
    w = raw[p + "attention.conv1d.weight"]                                                # (channels, 1, 2)
    vkq = F.conv1d(vkq, w, raw[p + "attention.conv1d.bias"], padding=1, groups=w.shape[0])[..., :T]
    v, k, q = F.silu(vkq).transpose(1, 2).split([Hkv * P, Hkv * P, H * P], dim=-1)
    v, k, q = v.view(b, T, Hkv, P), k.view(b, T, Hkv, P), q.view(b, T, H, P)
    if gqa == "repeat_kv":
        v, k = v.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    else:
        v, k = v.repeat(1, 1, G, 1), k.repeat(1, 1, G, 1)
    dt = F.softplus(parts["dt"] + raw[p + "attention.dt_bias"])                          # (b, T, H)
    A = -torch.exp(raw[p + "attention.A_log_bias"])                                       # (H,)
    state = torch.zeros(b, H, P, P, dtype=h.dtype)                                        # (b, H, P, N)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + dt[:, t, :, None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((state * q[:, t, :, None, :]).sum(-1))                                  # (b, H, P)
    y = rms_norm(torch.stack(ys, dim=1), raw[p + "attention.g_norm_swish_gate.weight"], 1e-5)
    y = y * F.silu(parts["g"].view(b, T, H, P))
    h = h + y.flatten(2) @ raw[p + "attention.o_proj.weight"].T
    x = rms_norm(h, raw[p + "ffn_norm.weight"], eps)
    up = F.silu(x @ raw[p + "feed_forward.w1.weight"].T) * (x @ raw[p + "feed_forward.w3.weight"].T)
    return h + up @ raw[p + "feed_forward.w2.weight"].T


def mmmamba_reference(raw, ids, px, kinds, **wrong):
    """HoVLE's forward with each layer as its layers_block_type says ("mha": InternLM2 attention)."""
    c = TINY
    h = raw[E + "llm_text_embeddings.weight"][ids]
    h[ids == c["img_context_id"]] = hovle_vision(raw, px, c["patch_size"], c["downsample_ratio"]).flatten(0, 1)
    prefixes = [f"{E}encoder.{i}." for i in range(2)] + [f"{L}model.layers.{i}." for i in range(2)]
    for prefix, kind in zip(prefixes, kinds):
        if kind == "mha":
            h = internlm2_layer(h, raw, prefix, c["n_heads"], c["n_kv_heads"], c["rope_theta"], c["norm_eps"])
        else:
            h = mamba2_layer(h, raw, prefix, c["n_heads"], c["n_kv_heads"], c["norm_eps"], **wrong)
    return rms_norm(h, raw[L + "model.norm.weight"], c["norm_eps"]) @ raw[L + "output.weight"].T


def prompt(n_images, length=90, seed=1):
    """(1, length) ids with n_images x 4 <IMG_CONTEXT> after 3 tokens: 90 crosses an SSD chunk (64)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (1, length - 4 * n_images), generator=g)
    return torch.cat([ids[:, :3], torch.full((1, 4 * n_images), 302), ids[:, 3:]], dim=1)


@pytest.mark.parametrize("name, kinds", [("linear", LINEAR), ("hybrid", HYBRID)])
def test_import_matches_official_forward(folders, name, kinds):
    model = convert.load_model(folders[name], dtype=F64)
    assert convert.detect_format(folders[name]) == "mmmamba"
    assert model.cfg.layers == [{"mha": "attn", "mamba2": "mamba2"}[k] for k in kinds]
    ids = prompt(2)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        got = model(ids, px)
    raw = raw_tensors(folders[name])
    want = mmmamba_reference(raw, ids, px, kinds)
    assert rel_err(got, want) <= 1e-10
    # teeth: rows read as [k | v | q], or KV heads tiled instead of repeated, are far off
    assert rel_err(mmmamba_reference(raw, ids, px, kinds, order="kvq"), want) > 1e-3
    assert rel_err(mmmamba_reference(raw, ids, px, kinds, gqa="tile"), want) > 1e-3


def test_block_types_as_a_list_architecture(folders, tmp_path):
    d = shutil.copytree(folders["hybrid"], tmp_path / "ckpt")
    edit_config(d, lambda c: c.update(architectures=["mmMambaChatModel"]))
    assert convert.load_model(str(d)).cfg.layers == ["attn", "mamba2", "mamba2", "attn"]


# ----------------------------------------------------------------------------------------------
# Export: round trip, and the layout convert_weight.py writes

@pytest.mark.parametrize("name", ["linear", "hybrid"])
def test_round_trip_is_exact(folders, name, tmp_path):
    model = convert.load_model(folders[name])                      # bfloat16, as stored
    out = str(tmp_path / "exported")
    convert.save_mmmamba(model, out, like=folders[name], shard_bytes=20_000)
    back = convert.load_model(out)
    assert back.cfg == model.cfg
    mine = model.state_dict()
    theirs = back.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype == torch.bfloat16 and torch.equal(mine[k], theirs[k]), k
    ids = prompt(1)
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.float()(ids, px), back.float()(ids, px))
    # float32 weights exported in float32 come back bit for bit too
    convert.save_mmmamba(model, str(tmp_path / "f32"), like=folders[name], dtype=torch.float32)
    again = convert.load_model(str(tmp_path / "f32")).state_dict()
    assert all(again[k].dtype == torch.float32 and torch.equal(again[k], v) for k, v in model.state_dict().items())


def official_layout(config: dict) -> dict:
    """{key: shape} of a converted folder, from the official rules: HoVLE's modules (hovle/*.py)
    with every "mamba2" layer's attention as change_weight leaves it and every "mha" layer's as
    InternLM2Attention (wqkv, wo)."""
    emb = config["embedding_config"]
    llm = config["llm_config"]
    D, H, Hkv, I, V = (emb["hidden_size"], emb["num_attention_heads"], emb["num_key_value_heads"],
                       emb["intermediate_size"], llm["vocab_size"])
    P = D // H
    g = emb["image_size"] // emb["patch_size"]
    p = emb["patch_size"]
    s = round(1 / emb["downsample_ratio"])
    out = {E + "vision_embeddings.class_embedding": (1, 1, D),
           E + "vision_embeddings.patch_embedding.weight": (D, 3, p, p),
           E + "vision_embeddings.patch_embedding.bias": (D,),
           E + "vision_embeddings.position_embedding": (1, 1 + g * g, D),
           E + "llm_text_embeddings.weight": (V, D),
           E + "pixel_shuffle_proj.0.weight": (D, D * s * s), E + "pixel_shuffle_proj.0.bias": (D,),
           E + "pixel_shuffle_proj.2.weight": (D, D), E + "pixel_shuffle_proj.2.bias": (D,),
           L + "model.tok_embeddings.weight": (V, D), L + "model.norm.weight": (D,), L + "output.weight": (V, D)}
    prefixes = [f"{E}encoder.{i}." for i in range(emb["num_hidden_layers"])]
    prefixes += [f"{L}model.layers.{i}." for i in range(llm["num_hidden_layers"])]
    for prefix, kind in zip(prefixes, emb["layers_block_type"] + llm["layers_block_type"], strict=True):
        out.update({prefix + "attention_norm.weight": (D,), prefix + "ffn_norm.weight": (D,),
                    prefix + "feed_forward.w1.weight": (I, D), prefix + "feed_forward.w3.weight": (I, D),
                    prefix + "feed_forward.w2.weight": (D, I)})
        if kind == "mha":
            out.update({prefix + "attention.wqkv.weight": ((H + 2 * Hkv) * P, D),
                        prefix + "attention.wo.weight": (D, H * P)})
        else:
            out.update({prefix + "attention.wvkqgdt.weight": ((H + 2 * Hkv + H) * P + H, D),
                        prefix + "attention.conv1d.weight": ((H + 2 * Hkv) * P, 1, 2),
                        prefix + "attention.conv1d.bias": ((H + 2 * Hkv) * P,),
                        prefix + "attention.dt_bias": (H,), prefix + "attention.A_log_bias": (H,),
                        prefix + "attention.g_norm_swish_gate.weight": (P,),
                        prefix + "attention.o_proj.weight": (D, H * P)})
    return out


def converted_config(teacher: dict, kinds: list, directory: str) -> dict:
    """convert_weight.py#L76-L102 applied to HoVLE's config.json (torch_dtype: save_pretrained's)."""
    c = json.loads(json.dumps(teacher))
    c["_name_or_path"] = directory
    c["architectures"] = "mmMambaChatModel"
    c["auto_map"].update(MMMAMBA_AUTO_MAP)
    c["embedding_config"]["model_type"] = "mmMamba_embedding"
    c["llm_config"]["architectures"] = "mmMambaForCausalLM"
    c["llm_config"]["auto_map"].update(MMMAMBA_LLM_AUTO_MAP)
    c["llm_config"]["model_type"] = "mmMamba"
    c["model_type"] = "mmMamba_chat"
    n = c["embedding_config"]["num_hidden_layers"]
    c["embedding_config"]["layers_block_type"] = kinds[:n]
    c["llm_config"]["layers_block_type"] = kinds[n:]
    c["torch_dtype"] = "bfloat16"
    return c


@pytest.mark.parametrize("kinds", [LINEAR, HYBRID])
def test_export_writes_the_official_layout(folders, tmp_path, kinds):
    teacher = str(tmp_path / "hovle")                                # the HoVLE teacher the student came from
    write_tiny_hovle(teacher, **TINY)
    write_tiny_tokenizer(teacher)
    name = "linear" if kinds == LINEAR else "hybrid"
    model = convert.load_model(folders[name], dtype=torch.float32)
    out = str(tmp_path / "student")
    convert.save_mmmamba(model, out, like=teacher, shard_bytes=20_000)          # bfloat16 by default
    config = json.load(open(os.path.join(teacher, "config.json")))
    assert json.load(open(os.path.join(out, "config.json"))) == converted_config(config, kinds, out)
    want = official_layout(converted_config(config, kinds, out))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(want)
    total = 0
    for key, shard in index["weight_map"].items():
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            t = f.get_tensor(key)
        assert tuple(t.shape) == want[key] and t.dtype == torch.bfloat16, key
        total += t.numel() * 2
    assert index["metadata"]["total_size"] == total and list(index["weight_map"]) == sorted(want)
    assert {f for f in os.listdir(out) if f.startswith("tokenizer")} == {"tokenizer.model", "tokenizer_config.json"}
    # the fused rows, labelled: wvkqgdt stacks [v | k | q | g | dt] (mamba2.py#L797)
    layer = model.layers[1].mixer
    labels = {"wv": 1.0, "wk": 2.0, "wq": 3.0, "wg": 4.0, "wdt": 5.0}
    for w, value in labels.items():
        getattr(layer, w).weight.data.fill_(value)
    convert.save_mmmamba(model, out, like=teacher)              # one file now: the former shards go
    assert sorted(f for f in os.listdir(out) if f.startswith("model")) == ["model.safetensors"]
    fused = load_file(os.path.join(out, "model.safetensors"))[E + "encoder.1.attention.wvkqgdt.weight"]
    rows = [16, 16, 32, 32, 4]                                       # Hkv P, Hkv P, H P, H P, H
    assert torch.equal(fused[:, 0], torch.cat([torch.full((n,), v) for n, v in zip(rows, labels.values())]).bfloat16())


def test_export_checks_the_like_folder(folders, tmp_path):
    model = convert.load_model(folders["linear"])
    other = str(tmp_path / "other")
    write_tiny_hovle(other, **{**TINY, "intermediate_size": 64})
    with pytest.raises(InputError, match=r"other/config\.json: its intermediate_size is 64, the model's 48"):
        convert.save_mmmamba(model, str(tmp_path / "out"), like=other)
    with pytest.raises(InputError, match="--mmmamba: needs --out and --like"):
        convert.main([folders["linear"], "--mmmamba", "--out", str(tmp_path / "out")])
    out = str(tmp_path / "cli")                     # the command line: one file under 5 GB, bfloat16
    convert.main([folders["hybrid"], "--out", out, "--mmmamba", "--like", folders["hybrid"], "--dtype", "float32"])
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    assert convert.load_model(out).cfg == convert.load_model(folders["hybrid"]).cfg


# ----------------------------------------------------------------------------------------------
# Bad folders: one line naming the file and the key

def edit_config(d, edit):
    path = os.path.join(d, "config.json")
    c = json.load(open(path))
    edit(c)
    json.dump(c, open(path, "w"))


def edit_shard(d, shard, edit, index_too=None):
    path = os.path.join(d, shard)
    t = load_file(path)
    edit(t)
    save_file(t, path)
    if index_too:
        index = os.path.join(d, "model.safetensors.index.json")
        idx = json.load(open(index))
        idx["weight_map"][index_too] = shard
        json.dump(idx, open(index, "w"))


SHARD2 = "model-00002-of-00002.safetensors"
WVKQGDT = L + "model.layers.0.attention.wvkqgdt.weight"


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: os.remove(os.path.join(d, SHARD2)),
     rf"index\.json: shard '{SHARD2}' \(holding key '{L}.*'.*\) is missing"),
    (lambda d: edit_shard(d, SHARD2, lambda t: t.update({L + "model.layers.0.attention.D": torch.ones(4)}),
                          index_too=L + "model.layers.0.attention.D"),
     r"index\.json: 1 unexpected key\(s\).*'language_model\.model\.layers\.0\.attention\.D'"),
    (lambda d: edit_shard(d, SHARD2, lambda t: t.update({WVKQGDT: t[WVKQGDT][:-1]})),
     rf"{SHARD2}: key '{WVKQGDT}' has shape \(99, 32\), expected \(100, 32\)"),
    (lambda d: edit_shard(d, SHARD2, lambda t: t.pop(L + "model.layers.0.attention.A_log_bias")),
     rf"{SHARD2}: missing key '{L}model\.layers\.0\.attention\.A_log_bias'"),
    (lambda d: edit_config(d, lambda c: c["llm_config"].update(layers_block_type=["mamba2", "mamba1"])),
     r"config\.json: key 'llm_config\.layers_block_type' has unknown block type 'mamba1' at index 1"),
    (lambda d: edit_config(d, lambda c: c["embedding_config"].update(layers_block_type=["mamba2"])),
     r"config\.json: key 'embedding_config\.layers_block_type' must list 2 block types"),
    (lambda d: edit_config(d, lambda c: c["llm_config"].update(layers_block_type=["mamba2", "mamba2"])),
     r"index\.json: missing key 'language_model\.model\.layers\.1\.attention\.conv1d\.weight'"),
])
def test_bad_folder_is_one_line(folders, tmp_path, monkeypatch, capsys, damage, pattern):
    d = str(shutil.copytree(folders["hybrid"], tmp_path / "ckpt"))
    damage(d)
    monkeypatch.setattr(sys, "argv", ["convert.py", d])
    with pytest.raises(SystemExit) as e:
        run_main(convert.main, CheckpointError)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(pattern, err), err


# ----------------------------------------------------------------------------------------------
# hovle.py: tokenizer, template, tiles

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tokenizer"))
    write_tiny_tokenizer(d)
    return d


def test_tokenizer_round_trip(tokenizer_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    tok = hovle.Tokenizer(tokenizer_dir)
    for text in ["What color is the square?", "Ein Würfel: 3 × 4 = 12 ✓", "line one\nline two\n", "  spaced  out ",
                 "你好，世界", ""]:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids) == text, text
    ids = tok.encode("a<img>b<IMG_CONTEXT><IMG_CONTEXT></img><|im_end|>")      # cut at special tokens
    assert ids == [1] + sp.encode("a") + [300] + sp.encode("b") + [302, 302, 301, 4]
    assert tok.decode(ids + [5000]) == "ab"                      # special ids, and ids without a piece, dropped


def test_chat_template_ids(tokenizer_dir):
    """HoVLE's chat(): "<image>\\n" + question in the internlm2-chat template (MPT style: system, then
    each role + message + <|im_end|>, the assistant's turn open), <image> -> <img> <IMG_CONTEXT> x n
    </img>, <s> first; the text between special tokens encoded by SentencePiece piece by piece."""
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    tok = hovle.Tokenizer(tokenizer_dir)
    text = hovle.chat_prompt("What color is the square?", 3)
    assert text == ("<|im_start|>system\n" + hovle.SYSTEM + "<|im_end|><|im_start|>user\n<img>"
                    + "<IMG_CONTEXT>" * 3 + "</img>\nWhat color is the square?<|im_end|><|im_start|>assistant\n")
    want = ([1, 3] + sp.encode("system\n" + hovle.SYSTEM) + [4, 3] + sp.encode("user\n") + [300, 302, 302, 302, 301]
            + sp.encode("\nWhat color is the square?") + [4, 3] + sp.encode("assistant\n"))
    assert tok.encode(text) == want


def test_tokenizer_errors(tmp_path, tokenizer_dir):
    with pytest.raises(InputError, match=r"tokenizer\.model: no such file"):
        hovle.Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"tokenizer\.model: not a SentencePiece model"):
        hovle.Tokenizer(str(tmp_path))
    d = shutil.copytree(tokenizer_dir, tmp_path / "t")
    for name in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(d / name)
    with pytest.raises(InputError, match=r"the tokenizer has no token '<img>'"):
        hovle.Tokenizer(str(d))


RED = (255, 0, 0)


def normalised(rgb):
    """ImageNet normalisation of one pixel, by hand."""
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((448, 448), 6, (1, 1)),          # square: one tile, no thumbnail
    ((896, 448), 6, (2, 1)),          # 2:1
    ((448, 1344), 6, (1, 3)),         # 1:3
    ((1000, 600), 6, (3, 2)),         # 1.67: 3:2 (diff 0.17) beats 2:1 (0.33); 5:3 has 15 > 6 tiles
    ((100, 700), 6, (1, 6)),          # 1:7: 1:6 (diff 0.024) beats 1:5 (0.057)
    ((2000, 2000), 6, (2, 2)),        # tie 1:1 / 2:2, over half of 2:2's 896 x 896 px: the larger grid
    ((300, 300), 6, (1, 1)),          # the same tie, too small for 2:2
    ((3000, 3000), 12, (3, 3)),       # ties up to 3:3 with 12 tiles
    ((896, 448), 1, (1, 1)),          # one tile at most: the image squeezed
])
def test_tile_grid(size, max_tiles, grid):
    assert hovle.grid(*size, 448, max_tiles) == grid
    x = hovle.tiles(Image.new("RGB", size, RED), 448, max_tiles)
    n = grid[0] * grid[1]
    assert x.shape == (n + (n > 1), 3, 448, 448) and x.dtype == torch.float32
    assert torch.allclose(x, normalised(RED)[None, :, None, None].expand_as(x), atol=1e-6)


def test_tile_layout():
    """A 2 x 3 grid of colour blocks (896 x 1344): tile k is block (row k // 2, column k % 2), exactly;
    the thumbnail last shows every block where it lies."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = Image.new("RGB", (896, 1344))
    for k, colour in enumerate(colours):
        image.paste(colour, ((k % 2) * 448, (k // 2) * 448, (k % 2 + 1) * 448, (k // 2 + 1) * 448))
    x = hovle.tiles(image, 448, 6)
    assert x.shape == (7, 3, 448, 448)
    for k, colour in enumerate(colours):
        assert torch.allclose(x[k], normalised(colour)[:, None, None].expand(3, 448, 448), atol=1e-6), k
        row, col = k // 2, k % 2
        centre = x[6, :, int((row + 0.5) * 448 / 3), int((col + 0.5) * 224)]
        assert torch.allclose(centre, normalised(colour), atol=1e-6), k


# ----------------------------------------------------------------------------------------------
# ask.py with a released-layout folder

def test_ask_answers_with_a_released_folder(folders, tmp_path, capsys):
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "wide.png")       # 2 x 1 tiles + thumbnail
    for name in ("linear", "hybrid"):
        for dtype in ("float32", "bfloat16"):
            answer = ask.main([folders[name], str(tmp_path / "wide.png"), "What color is it?", "--dtype", dtype,
                               "--max-new-tokens", "5"])
            out = capsys.readouterr().out
            assert isinstance(answer, str) and out.startswith(answer + "\n") and "tokens/s" in out
            tok = hovle.Tokenizer(folders[name])
            n_prompt = len(tok.encode(hovle.chat_prompt("What color is it?", 3 * 4)))   # 3 tiles, 4 tokens each
            assert f"prompt {n_prompt} tokens" in out and dtype in out


def test_ask_released_folder_errors(folders, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    d = shutil.copytree(folders["linear"], tmp_path / "no_tokenizer")
    os.remove(d / "tokenizer.model")
    with pytest.raises(InputError, match=r"no_tokenizer: its vocabulary \(303 tokens\) is not data\.py's"):
        ask.main([str(d), str(tmp_path / "ok.png"), "q?"])
    d = shutil.copytree(folders["linear"], tmp_path / "template")
    edit_config(d, lambda c: c.update(template="vicuna_v1.1"))
    with pytest.raises(InputError, match=r"config\.json: key 'template' = 'vicuna_v1\.1' is not supported"):
        ask.main([str(d), str(tmp_path / "ok.png"), "q?"])
    with pytest.raises(InputError, match=r"missing\.png: no such image file"):
        ask.main([folders["linear"], str(tmp_path / "missing.png"), "q?"])


def test_eval_of_a_released_folder_is_one_line(folders, monkeypatch, capsys):
    """distill.py --eval FOLDER with HoVLE's tokenizer: one line naming the folder and ask.py, before
    any weights are read."""
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(evaluate, "load_model", no_load)
    for name in ("linear", "hybrid"):
        monkeypatch.setattr(sys, "argv", ["distill.py", "--eval", folders[name]])
        with pytest.raises(SystemExit) as e:
            run_main(distill.main)
        err = capsys.readouterr().err
        assert e.value.code == 1
        assert err == (f"error: {folders[name]}: a HoVLE / mmMamba folder (tokenizer.model) cannot be "
                       f"scored with data.py's tokenizer; ask it: python ask.py {folders[name]} IMAGE "
                       "QUESTION\n")

"""Tests of model.py: config, layouts, vision stem, mixers against hand-written oracles, caches,
generation, checkpoints. Small configs only (2 shared CPU cores)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from convert import CheckpointError, hovle_config, load_model, save_model
from model import Attention, Cache, LayerCache, Mamba2Mixer, Model, ModelConfig, make_layers
from utils import InputError

IMG = 5


def small_cfg(layers=("attn", "mamba2", "attn"), **kw):
    d = dict(vocab_size=64, hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2,
             layers=list(layers), image_size=32, patch_size=8, img_context_id=IMG, ssd_chunk_size=8,
             rope_theta=100.0)
    d.update(kw)
    return ModelConfig(**d)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def perturb_mamba(model, seed=0):
    """Make the Mamba-2 parameters non-trivial: input-dependent dt, a real conv, varied decays."""
    g = torch.Generator().manual_seed(seed)
    for block in model.layers:
        m = block.mixer
        if isinstance(m, Mamba2Mixer):
            r = lambda t, s: t.add_(s * torch.randn(t.shape, generator=g, dtype=t.dtype))
            r(m.conv1d.weight, 0.5)
            r(m.conv1d.bias, 0.1)
            m.wdt.weight.copy_(0.2 * torch.randn(m.wdt.weight.shape, generator=g))
            m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(-1.0, 1.0, generator=g))
            r(m.norm.weight, 0.2)
    return model


def prompt(cfg, b=2, before=3, after=5, seed=0):
    """Each row: `before` text tokens, one image, `after` text tokens; and the images."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(IMG + 1, cfg.vocab_size, (b, before + after), generator=g)
    img = torch.full((b, cfg.image_tokens), cfg.img_context_id)
    ids = torch.cat([text[:, :before], img, text[:, before:]], dim=1)
    px = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return ids, px


# ----------------------------------------------------------------------------------------------
# Config

def test_default_config_and_presets():
    cfg = ModelConfig()
    assert (cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (192, 8, 6, 2, 32)
    assert cfg.grid == 16 and cfg.image_tokens == 64 and cfg.conv_width == 2
    h = hovle_config()
    assert (h.hidden_size, h.n_layers, h.n_heads, h.n_kv_heads, h.head_dim) == (2048, 32, 16, 8, 128)
    assert (h.intermediate_size, h.rope_theta, h.image_size, h.patch_size, h.vocab_size) == (8192, 1e6, 448, 14, 92553)
    assert h.image_tokens == 256
    with torch.device("meta"):                      # shapes only, no memory
        m = Model(hovle_config(layers=make_layers(32, 8)))
    sd = m.state_dict()
    assert sd["layers.0.mixer.wk.weight"].shape == (1024, 2048)
    assert sd["layers.1.mixer.conv1d.weight"].shape == ((2 * 8 + 16) * 128, 1, 2)
    assert sd["vision.pixel_shuffle_proj.0.weight"].shape == (2048, 4 * 2048)
    assert sd["vision.position_embedding"].shape == (1, 1024, 2048)


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size=66), "divisible by n_heads"),
    (dict(n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(hidden_size=12, n_heads=4, n_kv_heads=2), "even"),
    (dict(image_size=30), "divisible by patch_size"),
    (dict(image_size=24), "pixel_shuffle_ratio"),      # grid 3 is not divisible by 2
    (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio"),
    (dict(layers=["attn", "mamba"]), "layers must be a non-empty list"),
    (dict(layers=[]), "non-empty"),
    (dict(img_context_id=64), "img_context_id"),
    (dict(ssd_impl="cuda"), "ssd_impl"),
])
def test_config_validation(changes, words):
    with pytest.raises(ValueError, match=words):
        small_cfg(**changes)


# ----------------------------------------------------------------------------------------------
# Layouts

def kept(layers):
    return [i for i, k in enumerate(layers) if k == "attn"]


def test_placements_two_of_eight():
    assert kept(make_layers(8, 2, "head-interleaved")) == [0, 4]
    assert kept(make_layers(8, 2, "tail-interleaved")) == [3, 7]
    assert kept(make_layers(8, 2, "head-stacked")) == [0, 1]
    assert kept(make_layers(8, 2, "tail-stacked")) == [6, 7]


def test_placements_other_counts():
    assert kept(make_layers(32, 8)) == list(range(0, 32, 4))            # the paper's hybrid
    assert kept(make_layers(32, 8, "tail-interleaved")) == list(range(3, 32, 4))
    for p in ("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked"):
        assert make_layers(8, 0, p) == ["mamba2"] * 8
        assert make_layers(8, 8, p) == ["attn"] * 8
        for n in range(9):
            layers = make_layers(8, n, p)
            assert len(layers) == 8 and layers.count("attn") == n
    assert kept(make_layers(8, 3)) == [0, 2, 5]
    assert kept(make_layers(8, 1, "tail-interleaved")) == [7]


@pytest.mark.parametrize("args", [(8, 9), (8, -1), (0, 0), (8, 2, "middle"), (8, 1.5)])
def test_placements_bad_input(args):
    with pytest.raises(ValueError):
        make_layers(*args)


# ----------------------------------------------------------------------------------------------
# Vision stem and embedding

def test_pixel_shuffle_groups_two_by_two():
    """Token (i, j) is the concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    (InternVL's pixel shuffle, as HoVLE): checked with the MLP replaced by identities."""
    cfg = small_cfg(hidden_size=8, n_heads=2, n_kv_heads=1, image_size=16, patch_size=4)
    stem = Model(cfg).vision
    with torch.no_grad():
        stem.pixel_shuffle_proj = torch.nn.Identity()
        stem.position_embedding.zero_()
    px = torch.randn(2, 3, 16, 16)
    patches = stem.patch_embedding(px).flatten(2).transpose(1, 2).reshape(2, 4, 4, 8)   # (n, row, col, d)
    y = stem(px).reshape(2, 2, 2, 32)
    for i in range(2):
        for j in range(2):
            want = torch.cat([patches[:, 2 * i, 2 * j], patches[:, 2 * i, 2 * j + 1], patches[:, 2 * i + 1, 2 * j],
                              patches[:, 2 * i + 1, 2 * j + 1]], -1)
            assert torch.equal(y[:, i, j], want)


def test_vision_features_and_placeholders():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = Model(cfg)
    ids, px = prompt(cfg)
    feats = model.vision(px)
    assert feats.shape == (2, cfg.image_tokens, cfg.hidden_size)
    # oracle for the stem: conv as a matmul over flattened patches, shuffle, MLP
    v, p, g = model.vision, cfg.patch_size, cfg.grid
    patches = px.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * p * p)
    x = patches @ v.patch_embedding.weight.reshape(cfg.hidden_size, -1).T + v.patch_embedding.bias
    x = (x + v.position_embedding).reshape(2, g // 2, 2, g // 2, 2, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(2, cfg.image_tokens, 4 * cfg.hidden_size)
    lin0, lin2 = v.pixel_shuffle_proj[0], v.pixel_shuffle_proj[2]
    want = lin2(F.gelu(lin0(x)))
    assert rel(feats, want) < 1e-5
    # image tokens land on the placeholders, in order of appearance
    h = model.embed(ids, px)
    assert torch.equal(h[ids == IMG], feats.reshape(-1, cfg.hidden_size))
    assert torch.equal(h[ids != IMG], model.embed_tokens(ids[ids != IMG]))
    assert torch.equal(model(ids, image_embeds=feats), model(ids, px))
    with pytest.raises(ValueError, match="8 <IMG_CONTEXT> tokens but the images give 4"):
        model(ids, px[:1])
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        model(ids)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(ids, px[:, :, :16])


# ----------------------------------------------------------------------------------------------
# Mixers against independent oracles (float64)

def test_attention_heads_oracle():
    torch.manual_seed(1)
    cfg = small_cfg()
    attn = Attention(cfg).double()
    for lin in (attn.wq, attn.wk, attn.wv):
        torch.nn.init.normal_(lin.weight, std=0.3)
    b, L, H, Hkv, P = 2, 7, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    u = torch.randn(b, L, cfg.hidden_size, dtype=torch.float64)
    q = (u @ attn.wq.weight.T).view(b, L, H, P)
    k = (u @ attn.wk.weight.T).view(b, L, Hkv, P)
    v = (u @ attn.wv.weight.T).view(b, L, Hkv, P)

    def rot(x, t):                                   # pairs (i, i + P/2) as complex numbers
        z = torch.complex(x[..., : P // 2], x[..., P // 2:])
        ang = t * cfg.rope_theta ** (-torch.arange(0, P, 2, dtype=torch.float64) / P)
        z = z * torch.exp(1j * ang)
        return torch.cat([z.real, z.imag], -1)

    y = torch.zeros(b, L, H, P, dtype=torch.float64)
    for t in range(L):
        for h in range(H):
            kv = h // cfg.heads_per_kv
            s = torch.stack([(rot(q[:, t, h], t) * rot(k[:, j, kv], j)).sum(-1) for j in range(t + 1)], -1)
            w = torch.softmax(s / math.sqrt(P), -1)                              # (b, t+1)
            y[:, t, h] = (w[..., None] * v[:, : t + 1, kv]).sum(1)
    assert rel(attn.heads(u), y) < 1e-12
    assert rel(attn(u), y.reshape(b, L, -1) @ attn.wo.weight.T) < 1e-12


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-2])
def test_mamba2_mixer_oracle(norm_eps):
    """The mixer against a token loop written from its equations (Mamba2Mixer's docstring). The
    per-head RMSNorm's eps is the official code's 1e-5, whatever the config's norm_eps (the
    blocks' norms) is."""
    torch.manual_seed(2)
    cfg = small_cfg(norm_eps=norm_eps)
    model = perturb_mamba(Model(cfg).double())
    m = model.layers[1].mixer
    b, L, H, Hkv, P, W = 2, 11, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.conv_width
    u = torch.randn(b, L, cfg.hidden_size, dtype=torch.float64)
    raw = torch.cat([u @ m.wv.weight.T, u @ m.wk.weight.T, u @ m.wq.weight.T], -1)      # (b, L, C)
    cw, cb = m.conv1d.weight[:, 0], m.conv1d.bias                                         # (C, W)
    A = -torch.exp(m.A_log)
    S = torch.zeros(b, H, P, P, dtype=torch.float64)
    out = torch.zeros(b, L, H, P, dtype=torch.float64)
    for t in range(L):
        window = torch.stack([raw[:, t - W + 1 + j] if t - W + 1 + j >= 0 else torch.zeros_like(raw[:, 0])
                              for j in range(W)], -1)                                     # (b, C, W)
        c = F.silu((window * cw).sum(-1) + cb)
        v, k, q = c[:, : Hkv * P].view(b, Hkv, P), c[:, Hkv * P: 2 * Hkv * P].view(b, Hkv, P), c[:, 2 * Hkv * P:].view(b, H, P)
        dt = F.softplus(u[:, t] @ m.wdt.weight.T + m.dt_bias)                            # (b, H)
        gate = F.silu(u[:, t] @ m.wg.weight.T).view(b, H, P)
        for h in range(H):
            kv = h // cfg.heads_per_kv
            S[:, h] = torch.exp(dt[:, h] * A[h])[:, None, None] * S[:, h] + dt[:, h, None, None] * v[:, kv, :, None] * k[:, kv, None, :]
            y = (S[:, h] @ q[:, h, :, None])[..., 0]                                          # (b, P)
            y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight
            out[:, t, h] = y * gate[:, h]
    assert rel(m.heads(u), out) < 1e-10
    assert rel(m(u), out.reshape(b, L, -1) @ m.wo.weight.T) < 1e-10
    assert model.layers[0].attention_norm.eps == norm_eps                # the blocks' norms follow cfg


def test_mixer_norm_eps_matters():
    """The eps the oracle pins changes the output: the 1e-5 of the test above is checked, not moot."""
    torch.manual_seed(2)
    m = perturb_mamba(Model(small_cfg()).double()).layers[1].mixer
    u = 0.05 * torch.randn(2, 11, 64, dtype=torch.float64)               # small y: eps is visible
    y = m.heads(u, gate=False)
    g = F.silu(u @ m.wg.weight.T).view(y.shape)
    norm = lambda eps: y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * m.norm.weight * g
    assert rel(m.heads(u), norm(1e-5)) < 1e-12 and rel(m.heads(u), norm(1e-6)) > 1e-3


# ----------------------------------------------------------------------------------------------
# Caches

LAYOUTS = {"teacher": ["attn"] * 3, "linear": ["mamba2"] * 3, "hybrid": ["mamba2", "attn", "mamba2"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decode_matches_full_forward(layout):
    torch.manual_seed(3)
    cfg = small_cfg(LAYOUTS[layout])
    model = perturb_mamba(Model(cfg)).eval()
    ids, px = prompt(cfg)                           # 3 text + 4 image + 5 text = 12 tokens
    more = torch.randint(IMG + 1, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    full_ids = torch.cat([ids, more], 1)            # 21 tokens; ssd chunk size 8
    with torch.no_grad():
        full = model(full_ids, px)
        # a) one prefill, then token by token (KV cache grown on demand)
        cache = model.new_cache()
        parts = [model(ids, px, cache=cache)]
        parts += [model(full_ids[:, t:t + 1], cache=cache) for t in range(12, 21)]
        assert cache.length == 21
        assert rel(torch.cat(parts, 1), full) <= 1e-5
        # b) prefill in two chunks (the second continues the cache), then token by token,
        #    with preallocated KV storage
        cache = model.new_cache(capacity=21)
        parts = [model(full_ids[:, :7], px, cache=cache), model(full_ids[:, 7:12], cache=cache)]
        parts += [model(full_ids[:, t:t + 1], cache=cache) for t in range(12, 21)]
        assert rel(torch.cat(parts, 1), full) <= 1e-5
        # last_only keeps the last position
        assert rel(model(full_ids, px, last_only=True), model(full_ids, px)[:, -1:]) < 1e-6


def test_mamba_decode_with_autograd_on_keeps_no_graph_between_tokens():
    """Each decode step's output has its own graph (backward works step by step) and, with autograd
    on, reaches every weight; the conv and SSM states and the cached values carry none, so nothing
    chains across tokens."""
    torch.manual_seed(3)
    cfg = small_cfg(LAYOUTS["linear"])
    model = perturb_mamba(Model(cfg))
    ids, px = prompt(cfg)
    cache = model.new_cache()
    model(ids, px, cache=cache)
    for _ in range(3):
        model(ids[:, -1:], cache=cache).sum().backward()
        mixer = model.layers[0].mixer
        assert mixer.wo.weight.grad is not None and mixer.wq.weight.grad is not None   # by the step itself
    for c in cache.layers:
        assert c.conv_state.grad_fn is None and c.ssm_state.grad_fn is None


def test_every_projection_is_a_module_call():
    """Every nn.Linear runs through its module (a forward hook sees it) in the full forward, in a
    segment of a prefill and in a decode step: no projection is computed from its weight directly."""
    torch.manual_seed(3)
    cfg = small_cfg(LAYOUTS["hybrid"])
    model = Model(cfg).eval()
    linears = {m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    called = set()
    for m in linears:
        m.register_forward_hook(lambda mod, args, out: called.add(mod))
    ids, px = prompt(cfg)
    with torch.no_grad():
        model(ids, px)
        assert called == linears
        cache = model.new_cache()
        model.prefill(ids, px, cache, segment=5)
        called.clear()
        model(ids[:, -1:], cache=cache)                                  # a decode step
    assert called == linears - set(model.vision.pixel_shuffle_proj)      # no image in a step


def test_cache_size_constant_for_linear_and_linear_growth_for_attention():
    torch.manual_seed(5)
    tiny = dict(vocab_size=32, hidden_size=32, intermediate_size=32, n_heads=2, n_kv_heads=1,
                image_size=16, patch_size=8, img_context_id=1, ssd_chunk_size=64)
    sizes = {}
    for name, layers in (("linear", ["mamba2"] * 2), ("teacher", ["attn"] * 2)):
        model = Model(ModelConfig(layers=layers, **tiny)).eval()
        ids = torch.randint(2, 32, (1, 4096), generator=torch.Generator().manual_seed(0))
        cache = model.new_cache()
        got = []
        with torch.no_grad():
            for s in range(0, 4096, 1024):
                model(ids[:, s:s + 1024], cache=cache)
                got.append(cache.nbytes())
            model(ids[:, :1], cache=cache)              # and one decode step
        sizes[name] = got
    lin, att = sizes["linear"], sizes["teacher"]
    # conv state (b, C, W-1) + SSM state (b, H, P, N) float32, per layer
    assert lin[0] == lin[3] == 2 * (4 * 16 * 1 * 4 + 2 * 16 * 16 * 4)
    assert att[3] == 4 * att[0] == 2 * 2 * 4096 * 16 * 4   # layers x (k, v) x T x (Hkv P) x 4 bytes


def test_cache_objects():
    kv = LayerCache(capacity=10)
    k = torch.randn(1, 2, 3, 4)
    kk, vv = kv.append(k, 2 * k)
    assert kv.k.shape[2] == 10 and torch.equal(kk, k) and torch.equal(vv, 2 * k)
    kk, _ = kv.append(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4))    # past capacity: grows
    assert kk.shape[2] == 12 and torch.equal(kk[:, :, :3], k)
    assert LayerCache().nbytes() == 0 and Cache([kv]).nbytes() == kv.nbytes() == 2 * 12 * 2 * 4 * 4


def test_recompute_keeps_only_block_inputs_and_gives_the_same_gradients():
    """Activation checkpointing (model.recompute): the same gradients, and the autograd graph holds
    far fewer bytes (what the forward saves for backward, counted by a saved-tensor hook)."""
    torch.manual_seed(3)
    cfg = small_cfg(LAYOUTS["hybrid"])
    ids, px = prompt(cfg)
    model = perturb_mamba(Model(cfg))
    grads, saved = [], []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        model.recompute = recompute
        kept = {}
        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, px).pow(2).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        saved.append(sum(kept.values()))
    assert all(torch.equal(grads[0][n], g) for n, g in grads[1].items())
    assert saved[1] < 0.3 * saved[0]


# ----------------------------------------------------------------------------------------------
# Teacher-forcing interface

def test_return_hidden_and_mixer_inputs():
    torch.manual_seed(6)
    cfg = small_cfg(["attn", "mamba2", "attn"])
    model = Model(cfg)
    ids, px = prompt(cfg)
    logits, hidden = model(ids, px, return_hidden=True)
    assert len(hidden) == cfg.n_layers + 1 and torch.equal(hidden[0], model.embed(ids, px))
    for i, block in enumerate(model.layers):
        assert torch.allclose(block(hidden[i]), hidden[i + 1], atol=1e-6)
        u = block.attention_norm(hidden[i])
        o = block.mixer.heads(u)
        assert o.shape == (2, ids.shape[1], cfg.n_heads, cfg.head_dim)
        assert torch.allclose(block.mixer.wo(o.flatten(2)), block.mixer(u), atol=1e-6)
    assert torch.allclose(logits, model.lm_head(model.norm(hidden[-1])), atol=1e-6)
    us = model.mixer_inputs(ids, px)
    assert all(torch.equal(a, blk.attention_norm(h)) for a, blk, h in zip(us, model.layers, hidden))


# ----------------------------------------------------------------------------------------------
# Generation

def test_generate_greedy_matches_recompute_and_eos_padding():
    torch.manual_seed(7)
    cfg = small_cfg(["mamba2", "attn", "mamba2"])
    model = perturb_mamba(Model(cfg)).eval()
    ids, px = prompt(cfg)
    out = model.generate(ids, px, max_new_tokens=6)
    assert out.shape == (2, 6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):                          # oracle: argmax of a full forward, no cache
            logits = model(seq, px)[:, -1]
            logits[:, IMG] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, ids.shape[1]:])
    # eos: a row that produced eos is padded with it; generation stops once all rows are done
    eos = int(out[0, 1])
    out2 = model.generate(ids, px, max_new_tokens=6, eos_id=eos)
    first = [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in out]
    assert torch.equal(out2[0, :2], out[0, :2]) and bool((out2[0, 1:] == eos).all())
    if first[1] is None:
        assert out2.shape == (2, 6) and torch.equal(out2[1], out[1])
    else:
        assert out2.shape[1] == max(first) + 1


def test_generate_sampling_is_reproducible():
    torch.manual_seed(8)
    cfg = small_cfg()
    model = Model(cfg).eval()
    ids, px = prompt(cfg)
    a = model.generate(ids, px, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, px, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    c = model.generate(ids, px, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not (a == IMG).any()
    cache = model.new_cache()
    model.generate(ids, px, 4, cache=cache)
    assert cache.length == ids.shape[1] + 3         # the last token is returned, not fed back


# ----------------------------------------------------------------------------------------------
# Checkpoints

def test_save_load_bit_identical(tmp_path):
    torch.manual_seed(9)
    cfg = small_cfg(["mamba2", "attn", "mamba2"])
    model = perturb_mamba(Model(cfg)).eval()
    (tmp_path / "ckpt").mkdir()                     # a former sharded save's files, which load_model
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text("{}")    # would read first
    (tmp_path / "ckpt" / "model-00001-of-00002.safetensors").write_bytes(b"")
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = load_model(tmp_path / "ckpt").eval()
    assert again.cfg == cfg
    ids, px = prompt(cfg)
    with torch.no_grad():
        assert torch.equal(again(ids, px), model(ids, px))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_load_errors_name_file_and_keys(tmp_path):
    torch.manual_seed(10)
    d = tmp_path / "ckpt"
    save_model(Model(small_cfg(["attn", "attn", "attn"])), d)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    good = json.loads(cfg_path.read_text())

    # the config says layer 1 is Mamba-2: its new tensors are missing
    cfg_path.write_text(json.dumps(dict(good, layers=["attn", "mamba2", "attn"])))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert str(w_path) in msg and "missing keys" in msg and "layers.1.mixer.A_log" in msg
    assert "layers.1.mixer.conv1d.weight" in msg and "unexpected" not in msg

    # a wider MLP: mis-shaped keys, with both shapes
    cfg_path.write_text(json.dumps(dict(good, intermediate_size=128)))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "mis-shaped keys (9)" in msg and "layers.0.feed_forward.w1.weight: checkpoint (96, 64) vs model (128, 64)" in msg

    # a Mamba-2 checkpoint read as all attention: unexpected keys
    save_model(Model(small_cfg(["attn", "mamba2", "attn"])), d)
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(7\): layers\.1\.mixer\.A_log"):
        load_model(d)

    # broken files
    cfg_path.write_text("{not json")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        load_model(d)
    cfg_path.write_text(json.dumps(dict(good, n_heads=5)))
    with pytest.raises(InputError, match="config.json: invalid model config"):
        load_model(d)
    cfg_path.write_text(json.dumps(dict(good, n_heads=0)))
    with pytest.raises(InputError, match="config.json: invalid model config"):
        load_model(d)
    cfg_path.write_text(json.dumps(dict(good, n_expert=4)))
    with pytest.raises(InputError, match="config.json: invalid model config.*n_expert"):
        load_model(d)
    cfg_path.write_text(json.dumps(good))
    w_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(d)
    w_path.unlink()
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors"):
        load_model(d)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_segmentwise_prefill_equals_one_pass(layout):
    """Prefill in segments that do not divide the prompt, with each row's image at another place
    and images straddling segment borders: the same last logits as one pass, and the same decode."""
    torch.manual_seed(11)
    cfg = small_cfg(LAYOUTS[layout])
    model = perturb_mamba(Model(cfg)).eval()
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(IMG + 1, cfg.vocab_size, (2, 23), generator=g)
    ids[0, 2:2 + cfg.image_tokens] = IMG                    # row 0: image at 2..5
    ids[1, 9:9 + cfg.image_tokens] = IMG                    # row 1: image at 9..12
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        full = model(ids, px)[:, -1]
        nxt = torch.randint(IMG + 1, cfg.vocab_size, (2, 1), generator=g)
        want = model(torch.cat([ids, nxt], 1), px)[:, -1]
        for seg in (5, 3, 1, 23, None):
            cache = model.new_cache()
            assert rel(model.prefill(ids, px, cache, segment=seg), full) <= 1e-5, seg
            assert cache.length == 23
            assert rel(model(nxt, cache=cache)[:, -1], want) <= 1e-5, seg
        with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
            model.prefill(ids, px[:1], model.new_cache(), segment=5)


def test_generate_with_segments_equals_one_pass():
    cfg = small_cfg()
    model = perturb_mamba(Model(cfg)).eval()
    ids, px = prompt(cfg)
    out = model.generate(ids, px, 5)
    assert out.shape == (2, 5) and torch.equal(model.generate(ids, px, 5, segment=3), out)
    assert model.generate(ids, px, 0).shape == (2, 0)

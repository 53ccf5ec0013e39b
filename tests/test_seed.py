"""Tests of seed.py: the seeded mixer against a hand-written causal linear attention, the exact
starting values of each mode (as the official code sets them), whole-model conversion."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import Attention, Mamba2Mixer, Model, ModelConfig, make_layers
from seed import seed_mixer, seed_student as convert


def small_cfg(layers=("attn",) * 4, **kw):
    d = dict(vocab_size=64, hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2,
             layers=list(layers), image_size=32, patch_size=8, img_context_id=5, ssd_chunk_size=8)
    d.update(kw)
    return ModelConfig(**d)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def teacher_attention(cfg, seed_=0, dtype=torch.float32):
    torch.manual_seed(seed_)
    attn = Attention(cfg).to(dtype)
    for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
        torch.nn.init.normal_(lin.weight, std=0.2)
    return attn


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_seeded_mixer_is_causal_linear_attention(n_kv_heads):
    """Conv identity (mimic), no decay (A = 0), dt = 1, norm and gate bypassed (gate=False): the seeded
    mixer is y_t = sum_{s<=t} (silu(q_t) . silu(k_s)) silu(v_s) on the teacher's W_Q, W_K, W_V."""
    cfg = small_cfg(n_kv_heads=n_kv_heads)
    attn = teacher_attention(cfg, dtype=torch.float64)
    mixer = seed_mixer(attn, cfg, "inherit+mimic", torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixer.A_log.fill_(float("-inf"))                  # A = -exp(-inf) = 0: no decay
        mixer.dt_bias.fill_(math.log(math.e - 1.0))       # softplus(0 + b) = 1 (wdt is 0)
    b, L, H, P = 2, 13, cfg.n_heads, cfg.head_dim
    u = torch.randn(b, L, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = F.silu(u @ attn.wq.weight.T).view(b, L, H, P)
    k = F.silu(u @ attn.wk.weight.T).view(b, L, n_kv_heads, P)
    v = F.silu(u @ attn.wv.weight.T).view(b, L, n_kv_heads, P)
    want = torch.zeros(b, L, H, P, dtype=torch.float64)
    for t in range(L):
        for h in range(H):
            g = h // (H // n_kv_heads)                      # GQA: the teacher's KV head for query head h
            for s in range(t + 1):
                want[:, t, h] += (q[:, t, h] * k[:, s, g]).sum(-1, keepdim=True) * v[:, s, g]
    assert rel(mixer.heads(u, gate=False), want) <= 1e-6
    # the full per-head output is norm(y) * silu(wg u) on top of it
    o = want / torch.sqrt(want.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * F.silu(u @ mixer.wg.weight.T).view(b, L, H, P)
    assert rel(mixer.heads(u), o) <= 1e-6


def test_mimic_starting_values_and_inherited_weights():
    cfg = small_cfg()
    attn = teacher_attention(cfg)
    m = seed_mixer(attn, cfg, generator=torch.Generator().manual_seed(0))   # default: inherit+mimic
    assert isinstance(m, Mamba2Mixer)
    for name in ("wq", "wk", "wv", "wo"):
        t, s = getattr(attn, name).weight, getattr(m, name).weight
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    W = cfg.conv_width
    assert m.conv1d.weight.shape == ((2 * cfg.n_kv_heads + cfg.n_heads) * cfg.head_dim, 1, W)
    assert torch.equal(m.conv1d.weight[:, 0, W - 1], torch.ones(m.conv1d.weight.shape[0]))
    assert torch.equal(m.conv1d.weight[:, 0, : W - 1], torch.zeros(m.conv1d.weight.shape[0], W - 1))
    assert torch.equal(m.conv1d.bias, torch.zeros_like(m.conv1d.bias))
    assert torch.equal(m.wdt.weight, torch.zeros_like(m.wdt.weight))
    assert torch.equal(m.A_log, torch.ones(cfg.n_heads))
    assert torch.allclose(-torch.exp(m.A_log), torch.full((cfg.n_heads,), -math.e))
    assert torch.equal(m.norm.weight, torch.ones(cfg.head_dim))
    dt0 = F.softplus(m.dt_bias.double())
    assert ((dt0 >= 1e-3 * (1 - 1e-6)) & (dt0 <= 0.1 * (1 + 1e-6))).all() and len(set(dt0.tolist())) == cfg.n_heads
    # W_G: Xavier uniform with gain 2^-2.5
    fan_out, fan_in = m.wg.weight.shape
    bound = 2 ** -2.5 * math.sqrt(6.0 / (fan_in + fan_out))
    assert m.wg.weight.abs().max() <= bound
    assert abs(m.wg.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    # reproducible with a generator
    again = seed_mixer(attn, cfg, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_dt0_is_log_uniform():
    cfg = small_cfg(hidden_size=512, n_heads=256, n_kv_heads=128)
    m = seed_mixer(teacher_attention(cfg), cfg, generator=torch.Generator().manual_seed(0))
    logdt = torch.log(F.softplus(m.dt_bias.double()))
    lo, hi = math.log(1e-3), math.log(0.1)
    assert logdt.min() >= lo - 1e-6 and logdt.max() <= hi + 1e-6
    assert abs(logdt.mean().item() - (lo + hi) / 2) < 0.4     # uniform in log space: mean in the middle


def test_inherit_and_scratch_modes():
    """The official non-mimic values (mamba2.py): dt_bias 0, A = -U(1, 16), conv and W_dt at
    PyTorch's default init, W_G Xavier with gain 2^-2.5; scratch draws W_Q, W_K, W_V as nn.Linear
    does and, like every mode, inherits W_O."""
    cfg = small_cfg()
    attn = teacher_attention(cfg)
    g = lambda: torch.Generator().manual_seed(0)
    inh = seed_mixer(attn, cfg, "inherit", g())
    scr = seed_mixer(attn, cfg, "scratch", g())
    for name in ("wq", "wk", "wv", "wo"):
        assert torch.equal(getattr(inh, name).weight, getattr(attn, name).weight)
    assert torch.equal(scr.wo.weight, attn.wo.weight)                      # W_O inherited in every mode
    D = cfg.hidden_size
    for name in ("wq", "wk", "wv"):                                         # nn.Linear's U(-1/sqrt(D), 1/sqrt(D))
        w = getattr(scr, name).weight
        assert not torch.equal(w, getattr(attn, name).weight) and w.abs().max() <= D ** -0.5
        assert abs(w.std().item() / (D ** -0.5 / math.sqrt(3)) - 1) < 0.1
    for m in (inh, scr):
        assert torch.equal(m.dt_bias, torch.zeros(cfg.n_heads))            # dt = softplus(0) = 0.69
        A = torch.exp(m.A_log.double())
        assert ((A >= 1) & (A <= 16)).all() and A.std() > 0
        W = cfg.conv_width                                                  # kaiming_uniform(a=sqrt 5): U(+-1/sqrt(W))
        assert m.conv1d.weight.abs().max() <= W ** -0.5 and m.conv1d.bias.abs().max() <= W ** -0.5
        assert not torch.equal(m.conv1d.weight[:, 0, :-1], torch.zeros_like(m.conv1d.weight[:, 0, :-1]))
        assert 0 < m.wdt.weight.abs().max() <= D ** -0.5
        assert torch.equal(m.norm.weight, torch.ones(cfg.head_dim))
        fan_out, fan_in = m.wg.weight.shape
        assert m.wg.weight.abs().max() <= 2 ** -2.5 * math.sqrt(6.0 / (fan_in + fan_out))
    with pytest.raises(ValueError, match="mode"):
        seed_mixer(attn, cfg, "mimic")


@pytest.mark.parametrize("layers", [make_layers(4, 0), make_layers(4, 2, "head-interleaved"),
                                    make_layers(4, 1, "tail-stacked")])
def test_convert_copies_everything_but_converted_mixers(layers):
    torch.manual_seed(0)
    teacher = Model(small_cfg())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = convert(teacher, layers, generator=torch.Generator().manual_seed(0))
    assert student.cfg.layers == layers and teacher.cfg.layers == ["attn"] * 4
    assert [b.kind for b in student.layers] == layers
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in s_sd.items():
        converted = k.startswith("layers.") and layers[int(k.split(".")[1])] == "mamba2" and ".mixer." in k
        if not converted or k.split(".")[3] in ("wq", "wk", "wv", "wo"):
            assert torch.equal(v, t_sd[k]), k                 # copied (inherited projections included)
            assert v.data_ptr() != t_sd[k].data_ptr(), k      # ... as new tensors
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())   # teacher untouched
    # the student runs, and the kept attention layers behave exactly as the teacher's
    ids = torch.tensor([[7, 8] + [5] * 4 + [9, 10, 11]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        student(ids, px)
        us = teacher.mixer_inputs(ids, px)
        for i, kind in enumerate(layers):
            if kind == "attn":
                assert torch.equal(student.layers[i].mixer.heads(us[i]), teacher.layers[i].mixer.heads(us[i]))


def test_convert_rejects_bad_layouts():
    teacher = Model(small_cfg())
    with pytest.raises(ValueError, match="entries"):
        convert(teacher, ["mamba2"] * 3)
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        convert(teacher, ["mamba2", "rnn", "attn", "attn"])
    linear = convert(teacher, ["mamba2"] * 4)
    with pytest.raises(ValueError, match="cannot become attention"):
        convert(linear, ["attn"] * 4)

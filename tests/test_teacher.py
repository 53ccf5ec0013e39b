"""Tests of teacher/: the grounding loss against its definition written out by hand, the answer
cross-entropy by hand, and a short stage 0 whose loss falls."""
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch

import data
from convert import save_model
from model import Model, ModelConfig
from teacher import grounding, train
from teacher.grounding import GroundingConfig, grounding_loss

TOK = data.TOKENIZER
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = GroundingConfig(look=(0, 1), gather_first=(1, 0), gather_last=(1, 3), read=(0, 2))


def tiny(layers=("attn",) * 3):
    return Model(ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, hidden_size=32,
                             intermediate_size=64, n_heads=4, n_kv_heads=2, layers=list(layers), ssd_chunk_size=16))


def hand_attributes(cells, named):
    """count (capped at 5); colour, shape, row, column of a single object; -100 otherwise."""
    kinds = [data.describe_cell(cells[c]) for c in named]
    if len(named) == 1 and kinds[0][0] == "object":
        return [1, data.COLOR_NAMES.index(kinds[0][2]), data.SHAPES.index(kinds[0][1]), named[0] // 8, named[0] % 8]
    return [min(len(named), 5)] + [-100] * 4


def probe_ce(linear, h, labels):
    """Summed CE over the attributes of one position; h (D,)."""
    logits = linear(h / h.pow(2).mean().add(torch.finfo(h.dtype).eps).sqrt())
    total, at = 0.0, 0
    for j, label in enumerate(labels):
        n = grounding.ATTRIBUTES[j % 5][1]
        if label != -100:
            total = total - logits[at:at + n].log_softmax(-1)[label]
        at += n
    return total


def head_map(model, hidden, layer, head, k, n):
    """Attention map (n, n) of one query head, written out: q, k with RoPE as complex rotations,
    softmax(q k^T / sqrt(P)) under the causal mask."""
    cfg, block = model.cfg, model.layers[layer]
    P, theta = cfg.head_dim, cfg.rope_theta
    u = block.attention_norm(hidden[layer][k, :n]).double()
    q = (u @ block.mixer.wq.weight.double().T).view(n, cfg.n_heads, P)[:, head]
    key = (u @ block.mixer.wk.weight.double().T).view(n, cfg.n_kv_heads, P)[:, head // cfg.heads_per_kv]
    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, P, 2, dtype=torch.float64) / P)
    rot = lambda x: (torch.view_as_real(torch.complex(x[:, :P // 2], x[:, P // 2:]) * torch.exp(1j * ang))
                     .transpose(1, 2).reshape(n, P))
    scores = rot(q) @ rot(key).T / P ** 0.5
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def test_role_probs_is_one_heads_attention_map():
    torch.manual_seed(1)
    model = tiny().double()
    batch = data.collate([data.sample_at(data.DataConfig(), "train", 0, i) for i in range(2)])
    _, hidden = model(batch["input_ids"], batch["pixel_values"].double(), return_hidden=True)
    n = batch["input_ids"].shape[1]
    for layer, head in ((0, 0), (1, 3), (2, 1)):
        got = grounding.role_probs(model, hidden, layer, head)
        for k in range(2):
            assert ((got[k] - head_map(model, hidden, layer, head, k, n)).norm() / got[k].norm()).item() < 1e-12


def hand_loss(model, hidden, k, s, roles, probes):
    """One sample's loss, from its question and cells, without grounding.targets."""
    ids, _ = data.chat_ids(s.turns)
    prompt = data.chat_ids(s.turns, last_answer=False)[0]
    q = TOK.encode(s.question)
    assert TOK.decode(prompt[-(len(q) + 4):]) == s.question + "<|im_end|><|im_start|>assistant\n"
    q0 = len(prompt) - len(q) - 4                                     # the question's first token
    words = [(q0 + j, TOK.decode([i]).strip()) for j, i in enumerate(q)
             if TOK.decode([i]).strip() in grounding.OBJECT_WORDS]
    image = [t for t, i in enumerate(prompt) if i == data.IMG_CONTEXT_ID]
    answer_from = range(len(prompt) - 1, len(ids) - 1)               # positions predicting answer + <|im_end|>

    def p(role):
        return head_map(model, hidden, *getattr(roles, role), k, len(ids)).float()

    total = 0.0
    if s.cells is not None and words:
        look = p("look")
        per_word = []
        for t, w in words:
            keys = [0] + [image[c] for c in grounding.word_cells(w, s.cells)]
            per_word.append(-sum(look[t, key].log() for key in keys) / len(keys))
        total = total + sum(per_word) / len(per_word)
        after_look = hidden[roles.look[0] + 1][k]
        total = total + sum(probe_ce(probes.look, after_look[t], hand_attributes(s.cells, grounding.word_cells(w, s.cells)))
                            for t, w in words) / len(words)
        after_gather = hidden[roles.gather_first[0] + 1][k]
        both = (hand_attributes(s.cells, grounding.word_cells(words[0][1], s.cells))
                + hand_attributes(s.cells, grounding.word_cells(words[-1][1], s.cells)))
        total = total + sum(probe_ce(probes.answer, after_gather[t], both) for t in answer_from) / len(answer_from)
    if words:
        for role, (t_word, _) in (("gather_first", words[0]), ("gather_last", words[-1])):
            rows = p(role)
            total = total - sum(rows[t, t_word].log() for t in answer_from) / len(answer_from)
    if s.cells is not None and s.category == "text":
        glyphs = grounding.word_cells("text", s.cells)
        rows = p("read")
        total = total - sum(rows[len(prompt) - 1 + j, image[c]].log() for j, c in enumerate(glyphs)) / len(glyphs)
        after_read = hidden[roles.read[0] + 1][k]
        h = lambda t: after_read[t] / after_read[t].pow(2).mean().add(torch.finfo(after_read.dtype).eps).sqrt()
        total = total - sum(probes.read(h(len(prompt) - 1 + j)).log_softmax(-1)[data.GLYPHS.index(ch)]
                            for j, ch in enumerate(s.answer)) / len(glyphs)
    return total


def test_grounding_loss_matches_a_hand_computed_sum():
    torch.manual_seed(0)
    model = tiny()
    samples = [data.sample_at(data.DataConfig(), "train", 3, i) for i in range(14)]  # two per category
    # a user's sample without cells (gather only) and one whose question names nothing (adds 0)
    samples += [data.Sample(samples[0].images, [(samples[1].question, "2")], "custom", None),
                data.Sample(samples[0].images, [("What is in the image?", "shapes")], "custom", samples[0].cells)]
    batch = data.collate(samples)
    _, hidden = model(batch["input_ids"], batch["pixel_values"], return_hidden=True)
    probes = grounding.Probes(32)
    got = grounding_loss(model, hidden, batch, ROLES, probes)
    want = sum(hand_loss(model, hidden, k, s, ROLES, probes) for k, s in enumerate(samples))
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()                                                    # the layer above the roles gets nothing
    assert all(p.grad is None for p in model.layers[2].parameters())
    assert model.layers[0].mixer.wq.weight.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in (probes.look, probes.answer, probes.read))


def grounding_probe():
    """experiments/grounding_probe.py (a research tool outside the library), imported by path."""
    spec = importlib.util.spec_from_file_location("grounding_probe", os.path.join(ROOT, "experiments",
                                                                                   "grounding_probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_on_target_reports_every_role_per_category(tmp_path, capsys):
    """The progress measure: one entry per role and category with such queries; an untrained
    model's heads spread their attention, so every mass is far below 1. The command line prints
    one row per role on a checkpoint with the default heads."""
    probe = grounding_probe()
    torch.manual_seed(0)
    model = tiny().eval()
    batch = data.collate([data.sample_at(data.DataConfig(), "test", 0, i) for i in range(7)])
    fresh = probe.attention_on_target(model, batch, ROLES)
    assert set(fresh) == {"look", "gather_first", "gather_last", "read"} and set(fresh["read"]) == {"text"}
    assert all(v < 0.5 for per in fresh.values() for v in per.values())
    save_model(tiny(("attn",) * 6), str(tmp_path / "m"))           # default heads: layers 2, 4, 5
    probe.main([str(tmp_path / "m"), "--n", "7"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["role", *data.CATEGORIES]
    assert [line.split()[0] for line in lines[1:]] == ["look", "gather_first", "gather_last", "read"]


def test_roles_must_name_attention_heads():
    with pytest.raises(ValueError, match="grounding role read"):
        dataclasses.replace(ROLES, read=(3, 0)).check(tiny().cfg)
    with pytest.raises(ValueError, match="grounding role look"):
        dataclasses.replace(ROLES, look=(0, 4)).check(tiny().cfg)
    with pytest.raises(ValueError, match="grounding role look"):
        ROLES.check(tiny(("mamba2", "attn", "attn")).cfg)
    with pytest.raises(ValueError, match="look must be a"):
        GroundingConfig(look=(0,))
    with pytest.raises(ValueError, match="grounding role"):
        train.TeacherLoss(train.TeacherConfig(ground_weight=1.0), tiny())  # the default roles need 6 layers


def test_answer_ce_counts_answer_tokens_only():
    labels = torch.tensor([[-100, -100, 4, 7], [-100, 5, -100, -100]])
    logits = torch.zeros(2, 4, 10)
    total, n = train.answer_ce(logits, labels)
    assert n.item() == 3 and total.item() == pytest.approx(3 * math.log(10))


def test_stage0_loss_falls(tmp_path, capsys):
    """The command on a small model (the default roles need 6 layers: the model is patched smaller)."""
    small = lambda **kw: ModelConfig(**{**kw, "hidden_size": 32, "intermediate_size": 64, "n_heads": 4,
                                         "n_kv_heads": 2, "layers": ["attn"] * 6, "ssd_chunk_size": 16})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "ModelConfig", small)
        summary = train.main(["--out", str(tmp_path), "--steps", "12", "--batch-size", "8", "--lr", "1e-2",
                              "--save-every", "100", "--eval-per-category", "1"])
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "stage0" / "log.jsonl")]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert os.path.exists(tmp_path / "stage0" / "model" / "model.safetensors")
    assert set(summary["accuracy"]["accuracy"]) == set(data.CATEGORIES)
    assert "stage 0 done" in capsys.readouterr().out


def test_multi_image_hints_point_at_the_needle():
    """Several images in a row: look goes from the question's object word to the one cell, among
    all the images' cells, that it names (found here from the sample's own cells), and <s>; the
    answer probe labels its row and column within its image."""
    cfg = data.DataConfig()
    samples = [data.multi_sample_at(cfg, "train", 0, i, 3, target=i % 3) for i in range(6)]
    batch = data.collate(samples)
    roles, probes = grounding.targets(batch)
    for k, s in enumerate(samples):
        row = batch["input_ids"][k].tolist()
        image = [t for t, i in enumerate(row) if i == TOK.img_context_id]
        word = [t for t, i in enumerate(row) if i in grounding.WORD_OF_ID][-1]
        name = grounding.WORD_OF_ID[row[word]]
        needle = [c for c in range(3 * 64) if data.describe_cell(s.cells[c])[0] == "object"
                  and name in data.describe_cell(s.cells[c])[1:]]
        assert len(needle) == 1 and needle[0] // 64 == k % 3
        look, queries = roles["look"]
        assert queries[k].nonzero().flatten().tolist() == [word]
        assert look[k, word, image[needle[0]]] == pytest.approx(0.5) and look[k, word, 0] == pytest.approx(0.5)
        labels, _ = probes["answer"]
        answer = batch["answer_mask"][k].nonzero()[0].item()
        assert labels[k, answer - 1, 3:5].tolist() == list(divmod(needle[0] % 64, 8))

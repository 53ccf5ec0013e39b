"""Tests of experiments/ablate.py: the whole driver on a tiny teacher (two steps per stage): every row of every
table is written, a stage-subset row trains exactly the stages it names, shared students are
trained once, a second call trains nothing, and the report judges orderings as it says; the
data-chosen placement against a hand-run swap."""
import os

import pytest
import torch

import data
import distill
from convert import save_model
from experiments import ablate
from model import Model, ModelConfig
from seed import seed_student


def tiny_cfg():
    return ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, hidden_size=32,
                       intermediate_size=64, n_heads=4, n_kv_heads=2, layers=["attn"] * 3, ssd_chunk_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    save_model(Model(tiny_cfg()), str(path))
    return str(path)


def test_every_row_once_then_nothing(teacher_dir, tmp_path, monkeypatch):
    args = ["--teacher", teacher_dir, "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
            "--seeds", "0", "--steps", "2", "--batch-size", "2", "--eval-per-category", "1"]
    trained, real = [], distill.train
    monkeypatch.setattr(distill, "train", lambda cfg, *a, **k: (trained.append(cfg.stage_dir), real(cfg, *a, **k))[1])
    found = ablate.main(args)
    rows = ablate.rows(["3", "4", "5", "6"], 3)
    assert {(r.table, r.name) for r in rows} == {(t, name) for t, by in found.items() for name in by}
    assert len(trained) == len(set(trained))                       # every student trained once
    for r in rows:
        (res,) = found[r.table][r.name]
        assert res["seed"] == 0 and set(res["accuracy"]) == set(data.CATEGORIES)
        if r.stages is not None:
            assert res["trained"] == list(r.stages)                # exactly the stages the row names
        assert len(res["attention_layers"]) == (3 if r.name == "teacher" else r.n_attn)
    assert found["3"]["none"][0]["trained"] == [] and found["3"]["2+3"][0]["trained"] == [2, 3]
    # stage runs are named relative to --work, so a seed's wall time counts each run once
    assert list(found["3"]["1+2"][0]["stage_seconds"]) == ["seed0/inherit+mimic/s1/stage1",
                                                           "seed0/inherit+mimic/s1-s2/stage2"]
    assert found["6"]["head-stacked, k=2"][0]["attention_layers"] == [0, 1]
    auto = found["6"]["auto, k=1"][0]["attention_layers"]
    assert len(auto) == 1 and os.path.exists(tmp_path / "work" / "seed0" / "auto_k1.json")
    md = open(tmp_path / "res" / "tables.md").read()
    assert all(f"## Table {t}" in md for t in "3456") and "1+2+3 > 1+2:" in md and "inherit > scratch:" in md
    # a second call finds every row done and trains nothing
    monkeypatch.setattr(distill, "train", lambda *a, **k: pytest.fail("trained again"))
    again = ablate.main(args)
    assert {t: list(by) for t, by in again.items()} == {t: list(by) for t, by in found.items()}


def test_data_chosen_placement_is_the_largest_swap_kl():
    """choose_attention_layers against the swap done by hand: a model built from the teacher's
    layers with layer i's mixer replaced, its KL from the teacher on the same batches."""
    torch.manual_seed(2)
    teacher = Model(tiny_cfg()).eval()
    student = seed_student(teacher, ["mamba2"] * 3, generator=torch.Generator().manual_seed(0))
    chosen = ablate.choose_attention_layers(student, teacher, 2, seed=0, n_batches=2)
    batches = [distill.train_batch(s, distill.TrainConfig(stage="3", seed=0), 0, 1, None) for s in range(2)]
    kl = []
    for i in range(3):
        probe = seed_student(teacher, ["attn"] * 3)                   # a copy of the teacher
        probe.layers[i] = student.layers[i]
        with torch.no_grad():
            sums = [distill.kl_per_token(teacher(b["input_ids"], b["pixel_values"]),
                                         probe(b["input_ids"], b["pixel_values"]), b["attention_mask"]) for b in batches]
        kl.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert chosen == sorted(sorted(range(3), key=lambda i: -kl[i])[:2])
    assert all(isinstance(b.mixer, torch.nn.Module) for b in teacher.layers) and teacher.cfg.layers == ["attn"] * 3
    assert all(b.kind == "attn" for b in teacher.layers)              # the teacher got its layers back


def test_verdicts():
    n = 1400  # test questions: the sampling noise of a difference is sqrt(2 p (1 - p) / n), ~1 point here
    assert ablate.verdict([0.9, 0.92, 0.91], [0.5, 0.52, 0.51], n)[0] == "holds"
    assert ablate.verdict([0.5, 0.52, 0.51], [0.9, 0.92, 0.91], n)[0] == "does not hold"
    v, diff, sd = ablate.verdict([0.90, 0.80, 0.85], [0.84, 0.86, 0.82], n)
    assert v == "within noise" and diff == pytest.approx(0.01) and sd == pytest.approx(((0.05 ** 2 + 0.02 ** 2) / 2) ** 0.5)
    # one seed each: judged against the test set's sampling noise, not a zero std
    v, diff, sd = ablate.verdict([0.964], [0.963], n)
    assert v == "within noise" and sd == pytest.approx((2 * 0.9635 * 0.0365 / n) ** 0.5)
    assert ablate.verdict([0.964], [0.946], n)[0] == "holds"

"""Tests of distill.py: trainable sets per stage, gradient isolation, losses against hand-computed
values, the data-chosen placement against a hand-run swap, training on a user's JSONL, resume, NaN
stop, one-line errors (and those of the --eval mode, evaluate.py), DDP."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import distill
import evaluate
from convert import save_model
from model import Model, ModelConfig
from seed import seed_student
from utils import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(layers=("attn",) * 3):
    return ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, hidden_size=32,
                       intermediate_size=64, n_heads=4, n_kv_heads=2, layers=list(layers), ssd_chunk_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    save_model(Model(tiny_cfg()), str(path))
    return str(path)


def cfg_for(stage, out, teacher_dir, **kw):
    base = dict(stage=str(stage), out=str(out), teacher=teacher_dir, steps=6, batch_size=4, save_every=2,
                eval_per_category=1)
    return distill.TrainConfig(**{**base, **kw})


def train(cfg, student, teacher):
    """One stage of the loop, as run_stage trains it."""
    distill.set_trainable(student, teacher, int(cfg.stage))
    return distill.train(cfg, distill.Distillation(cfg, student, teacher))


def test_default_model_matches_tokenizer():
    cfg = ModelConfig()
    assert cfg.vocab_size == data.VOCAB_SIZE and cfg.img_context_id == data.IMG_CONTEXT_ID
    assert cfg.image_tokens == data.IMAGE_TOKENS


# ---------------------------------------------------------------- the recipe

MIXER_NEW = ["conv1d.weight", "conv1d.bias", "wdt.weight", "dt_bias", "A_log", "norm.weight", "wg.weight"]


@pytest.mark.parametrize("stage,names", [
    (1, MIXER_NEW),
    (2, MIXER_NEW + ["wq.weight", "wk.weight", "wv.weight"]),
    (3, ["conv1d.weight", "conv1d.bias", "wdt.weight", "norm.weight", "wg.weight",
         "wq.weight", "wk.weight", "wv.weight"]),
])
def test_trainable_parameters_per_stage(stage, names):
    teacher = Model(tiny_cfg())
    student = seed_student(teacher, ["mamba2"] * 3)
    got = distill.set_trainable(student, teacher, stage)
    want = {f"layers.{i}.mixer.{n}" for i in range(3) for n in names}
    assert set(got) == want
    assert {n for n, p in student.named_parameters() if p.requires_grad} == want


def test_stage3_hybrid_freezes_kept_attention(teacher_dir, tmp_path):
    teacher = distill.load_teacher(teacher_dir)
    save_model(seed_student(teacher, ["mamba2"] * 3), str(tmp_path / "stage2" / "model"))
    cfg = cfg_for(3, tmp_path, teacher_dir, layers="hybrid", n_attn=1, placement="tail-stacked")
    student = distill.build_student(cfg, teacher)
    assert student.cfg.layers == ["mamba2", "mamba2", "attn"]
    for k, v in teacher.layers[2].state_dict().items():
        assert torch.equal(student.layers[2].state_dict()[k], v)
    got = set(distill.set_trainable(student, teacher, 3))
    assert got and all(n.startswith(("layers.0.", "layers.1.")) for n in got)
    assert not any(p.requires_grad for p in student.layers[2].parameters())


def test_any_stage_can_start_from_the_seeded_student(teacher_dir, tmp_path):
    """The Table 3 rows "2", "3", "2+3": a stage starts from the freshly seeded student."""
    teacher = distill.load_teacher(teacher_dir)
    want = seed_student(teacher, ["mamba2"] * 3, "inherit", torch.Generator().manual_seed(5))
    for stage in (2, 3):
        got = distill.build_student(cfg_for(stage, tmp_path, teacher_dir, student="seeded", init="inherit", seed=5),
                                    teacher)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


@pytest.mark.parametrize("stage", [1, 2])
def test_layer_loss_isolates_layers(stage):
    """Teacher forcing: each layer's parameters get the gradient of that layer's own term alone
    (computed here by hand on the teacher's hidden state), none from another layer's."""
    torch.manual_seed(0)
    teacher = Model(tiny_cfg())
    student = seed_student(teacher, ["mamba2"] * 3)
    names = distill.set_trainable(student, teacher, stage)
    batch = data.collate([data.sample_at(data.DataConfig(), "train", 0, i) for i in range(2)])
    loss, count = distill.layer_loss(student, teacher, batch, distill.TrainConfig(stage=str(stage)))
    (loss / count).backward()
    params = dict(student.named_parameters())
    mask = batch["attention_mask"]
    with torch.no_grad():
        _, hidden = teacher(batch["input_ids"], batch["pixel_values"], return_hidden=True)
    for i in range(3):
        u = teacher.layers[i].attention_norm(hidden[i]).detach()
        d = (student.layers[i].mixer.heads(u) - teacher.layers[i].mixer.heads(u).detach()).pow(2)
        own = 1000 * (d.mean(dim=(2, 3)) * mask).sum() / count                 # layer i's term alone
        mine = [n for n in names if n.startswith(f"layers.{i}.")]
        grads = torch.autograd.grad(own, [params[n] for n in mine])
        for n, g in zip(mine, grads):
            assert params[n].grad.abs().sum() > 0 and torch.allclose(params[n].grad, g, rtol=1e-4, atol=1e-9), n
    assert all(p.grad is None for p in teacher.parameters())


def test_layer_loss_is_the_mean_squared_error_by_hand():
    torch.manual_seed(1)
    teacher = Model(tiny_cfg())
    student = seed_student(teacher, ["mamba2"] * 3)
    batch = data.collate([data.sample_at(data.DataConfig(), "train", 0, i) for i in range(3)])
    with torch.no_grad():
        total, count = distill.layer_loss(student, teacher, batch, distill.TrainConfig(stage="1"))
        _, hidden = teacher(batch["input_ids"], batch["pixel_values"], return_hidden=True)
        errs = []
        for i in range(3):
            u = teacher.layers[i].attention_norm(hidden[i])
            d = (student.layers[i].mixer.heads(u) - teacher.layers[i].mixer.heads(u)).pow(2)   # (b, L, H, P)
            errs.append(d[batch["attention_mask"]].mean())                                 # padding left out
    assert (total / count).item() == pytest.approx(1000 * sum(errs).item() / 3, rel=1e-5)


# ---------------------------------------------------------------- losses


def test_kl_identical_is_zero():
    logits = torch.randn(2, 5, 11)
    total, n = distill.kl_per_token(logits, logits.clone(), torch.ones(2, 5, dtype=torch.bool))
    assert total.item() == 0.0 and n.item() == 10


def test_kl_known_pair_per_token():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)   # KL(p || q) = 0.1438...
    t = torch.stack([p.log(), p.log(), q.log()])[None]                  # (1, 3, 2)
    s = torch.stack([q.log(), p.log(), p.log()])[None]
    mask = torch.tensor([[True, True, False]])                          # the third token is padding
    total, n = distill.kl_per_token(t + 3.0, s - 1.0, mask)             # logits up to a constant
    assert n.item() == 2
    assert (total / n).item() == pytest.approx(by_hand / 2, rel=1e-6)


def test_train_batch_draws_from_the_task(monkeypatch):
    """The synthetic stream is data.TASKS[--task] at the global sample indices of the step."""
    cfg = distill.TrainConfig(stage="1", batch_size=4, seed=3)
    assert cfg.task == "single" and data.TASKS["single"] is data.sample_at
    field = {f.name: f for f in dataclasses.fields(distill.TrainConfig)}["task"]
    assert field.metadata["choices"] == tuple(data.TASKS)
    want = data.collate([data.sample_at(data.DataConfig(), "train", 3, 4 + i) for i in range(4)])   # step 1
    got = distill.train_batch(1, cfg, 0, 1, None)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k
    drawn = []
    monkeypatch.setitem(data.TASKS, "other", lambda c, split, seed, j: drawn.append((split, seed, j))
                        or data.sample_at(c, split, seed, j))
    distill.train_batch(1, dataclasses.replace(cfg, task="other"), 1, 2, None)              # rank 1 of 2
    assert drawn == [("train", 3, 6), ("train", 3, 7)]


def test_wsd_schedule():
    cfg = distill.TrainConfig(stage="1", steps=100, lr=1.0)
    lrs = [distill.wsd_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == 1.0 and lrs[50] == 1.0
    assert lrs[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- the loop


def test_stage1_lowers_layer_mse(teacher_dir, tmp_path):
    teacher = distill.load_teacher(teacher_dir)
    cfg = cfg_for(1, tmp_path, teacher_dir, steps=15, lr=1e-2)
    batch = data.collate(evaluate.test_samples(2))
    student = distill.build_student(cfg, teacher)
    before = distill.layer_mse(student, teacher, batch)
    train(cfg, student, teacher)
    assert distill.layer_mse(student, teacher, batch) < 0.5 * before


@pytest.mark.parametrize("stage", [1, 3])
def test_recompute_and_bf16_against_float32(teacher_dir, tmp_path, stage):
    """--recompute (activation checkpointing) gives the float32 run's losses and weights exactly;
    --bf16 (autocast) stays within 1% of its losses over 4 steps (measured: <= 0.15%; bfloat16
    keeps 8 bits of mantissa, 0.4% per rounding)."""
    teacher = distill.load_teacher(teacher_dir)
    runs = {}
    for name, kw in (("fp32", {}), ("recompute", {"recompute": True}), ("bf16", {"bf16": True})):
        cfg = cfg_for(stage, tmp_path / name, teacher_dir, steps=4, student="seeded", **kw)
        student = distill.build_student(cfg, teacher)
        runs[name] = (train(cfg, student, teacher), student.state_dict())
    losses, weights = runs["fp32"]
    assert runs["recompute"][0] == losses
    assert all(torch.equal(runs["recompute"][1][k], w) for k, w in weights.items())
    assert runs["bf16"][0] == pytest.approx(losses, rel=0.01) and runs["bf16"][0] != losses


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, n):
    """Make the n+1-th training batch raise, as if the run were killed after n steps."""
    calls, real = [0], distill.train_batch

    def batch(*a):
        calls[0] += 1
        if calls[0] > n:
            raise Interrupt
        return real(*a)
    monkeypatch.setattr(distill, "train_batch", batch)


def test_resume_gives_same_weights(teacher_dir, tmp_path, monkeypatch):
    teacher = distill.load_teacher(teacher_dir)
    full = distill.build_student(cfg_for(1, tmp_path / "a", teacher_dir), teacher)
    train(cfg_for(1, tmp_path / "a", teacher_dir), full, teacher)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Interrupt):
            cfg = cfg_for(1, tmp_path / "b", teacher_dir)
            train(cfg, distill.build_student(cfg, teacher), teacher)
    assert torch.load(tmp_path / "b" / "stage1" / "ckpt.pt", weights_only=False)["step"] == 2   # the last save
    cfg = cfg_for(1, tmp_path / "b", teacher_dir, resume=True)
    resumed = distill.build_student(cfg, teacher)
    train(cfg, resumed, teacher)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    logs = [json.loads(line) for line in open(tmp_path / "b" / "stage1" / "log.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]                     # no step logged twice


def test_nan_loss_stops_and_keeps_last_checkpoint(teacher_dir, tmp_path, monkeypatch):
    teacher = distill.load_teacher(teacher_dir)
    calls, real = [0], distill.STAGES[1].loss

    def nan_at_step_3(student, teacher, batch, cfg):
        calls[0] += 1
        total, n = real(student, teacher, batch, cfg)
        return (total * float("nan"), n) if calls[0] == 4 else (total, n)
    monkeypatch.setitem(distill.STAGES, 1, dataclasses.replace(distill.STAGES[1], loss=nan_at_step_3))
    cfg = cfg_for(1, tmp_path, teacher_dir)
    with pytest.raises(distill.NonFiniteLoss, match=r"loss is nan at step 3.*ckpt\.pt \(step 2\)"):
        train(cfg, distill.build_student(cfg, teacher), teacher)
    ckpt = torch.load(tmp_path / "stage1" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and not os.path.exists(tmp_path / "stage1" / "model")
    monkeypatch.setitem(distill.STAGES, 1, dataclasses.replace(distill.STAGES[1], loss=real))
    ref_cfg = cfg_for(1, tmp_path / "ref", teacher_dir, steps=6, save_every=100)
    ref = distill.build_student(ref_cfg, teacher)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(Interrupt):
            train(ref_cfg, ref, teacher)
    for k, v in ref.state_dict().items():
        assert torch.equal(ckpt["objective"]["student." + k], v), k


def test_a_nan_loss_ends_the_command_with_one_line(teacher_dir, tmp_path, monkeypatch, capsys):
    nan = lambda *args: (torch.tensor(float("nan"), requires_grad=True), torch.tensor(1.0))
    monkeypatch.setitem(distill.STAGES, 1, dataclasses.replace(distill.STAGES[1], loss=nan))
    with pytest.raises(SystemExit) as e:
        run_main(lambda: distill.main(["--stage", "1", "--teacher", teacher_dir, "--out", str(tmp_path)]),
                 distill.NonFiniteLoss)
    err = capsys.readouterr().err.strip().splitlines()[-1]           # after the progress bar
    assert e.value.code == 1 and err.startswith("error: ") and "loss is nan at step 0" in err


def test_command_line_errors_are_one_line(tmp_path):
    """Bad input ends with `error: <file>: <problem>` and exit status 1, no traceback."""
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [(["--stage", "1", "--teacher", str(tmp_path / "nope")], "nope: no such checkpoint folder"),
             (["--stage", "2", "--out", str(tmp_path)], "stage1/model: stage 2 starts from this folder"),
             (["--eval", "checkpoints/teacher", "--eval-data", str(tmp_path / "x.jsonl")],
              "x.jsonl: no such data file"),
             (["--eval", "checkpoints/teacher", "--eval-data", str(tmp_path / "empty.jsonl")],
              "empty.jsonl: no samples"),
             (["--eval", "checkpoints/teacher", "--eval-per-category", "0"],
              "--eval-per-category 0: no test questions"),
             (["--stage", "1", "--data", str(tmp_path / "empty.jsonl")], "empty.jsonl: no samples"),
             (["--steps", "0"], "--steps 0: must be positive")]
    for args, message in cases + [(["-m", "teacher.train", "--lr", "0"], "--lr 0.0: must be positive")]:
        args = args if args[0] == "-m" else ["distill.py", *args]
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr[-500:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def write_own_jsonl(root):
    """A user's own data: PNGs of other sizes, no cells, one multi-turn record."""
    (root / "pics").mkdir()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(root / "pics" / "red.png")
    Image.new("RGB", (200, 150), (0, 0, 255)).save(root / "pics" / "blue.png")
    records = [{"image": "pics/red.png", "category": "colour", "conversations": [
                   {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": "red"}]},
               {"image": "pics/blue.png", "category": "colour", "conversations": [
                   {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": "blue"},
                   {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "no"}]}]
    (root / "own.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root / "own.jsonl"


def test_distil_and_evaluate_on_own_jsonl(teacher_dir, tmp_path, capsys, monkeypatch):
    path = write_own_jsonl(tmp_path)
    samples = data.load_jsonl(path)
    batch = data.collate(samples)                                   # both answers of the multi-turn record train
    assert batch["answer_mask"][1].sum() == len(data.TOKENIZER.encode("blue")) + len(data.TOKENIZER.encode("no")) + 2
    out = tmp_path / "run"
    distill.main(["--stage", "1", "--teacher", teacher_dir, "--data", str(path), "--steps", "3", "--batch-size", "2",
                  "--out", str(out), "--eval-per-category", "0"])
    distill.main(["--stage", "3", "--teacher", teacher_dir, "--data", str(path), "--steps", "3", "--batch-size", "2",
                  "--out", str(out), "--student", str(out / "stage1" / "model"), "--eval-per-category", "0"])
    assert len(open(out / "stage3" / "log.jsonl").readlines()) == 3
    monkeypatch.chdir(tmp_path)                                     # predictions go to runs/eval/ here
    result = distill.main(["--eval", str(out / "stage3" / "model"), "--eval-data", str(path)])
    table = capsys.readouterr().out
    assert "colour" in table and "model" in table
    saved = json.load(open(tmp_path / "runs" / "eval" / f"run_stage3_model@{path.stem}.json"))
    assert [s["answer"] for s in saved["samples"]] == ["red", "no"] and saved["n"] == {"colour": 2}
    assert [s["question"] for s in saved["samples"]] == ["What color is the picture?", "Is it red?"]
    hits = sum(data.normalize_answer(s["prediction"]) == data.normalize_answer(s["answer"]) for s in saved["samples"])
    assert saved["accuracy"]["colour"] == hits / 2 == result["accuracy"]["colour"]


def test_a_bad_record_stops_before_training(teacher_dir, tmp_path):
    path = write_own_jsonl(tmp_path)
    path.write_text(path.read_text() + '{"image": "pics/missing.png", "conversations": [{"from": "human", "value": '
                    '"q"}, {"from": "gpt", "value": "a"}]}\n')
    with pytest.raises(data.DataError, match=r"own\.jsonl:3: .*missing\.png: no such image file"):
        distill.main(["--stage", "1", "--teacher", teacher_dir, "--data", str(path), "--out", str(tmp_path / "r")])
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.slow
def test_two_processes_match_one(teacher_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the loss trajectory of 1 process, same global batch."""
    args = ["--stage", "1", "--teacher", teacher_dir, "--steps", "4", "--batch-size", "4",
            "--eval-per-category", "1", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "distill.py", *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "distill.py", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    read = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "stage1" / "log.jsonl")]
    l1, l2 = read("one"), read("two")
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-5)

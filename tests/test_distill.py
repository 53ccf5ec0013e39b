"""Tests of distill.py: trainable sets per stage, gradient isolation, KL, resume, NaN stop, DDP."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import distill
from grounding import GroundingConfig
from model import Model, ModelConfig, make_layers
from seed import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMALL_GROUNDING = GroundingConfig(look=(0, 0), gather_first=(1, 0), gather_last=(1, 3), read=(2, 0))


def tiny_cfg(layers=("attn",) * 3):
    return ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, hidden_size=32,
                       intermediate_size=64, n_heads=4, n_kv_heads=2, layers=list(layers), ssd_chunk_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    teacher = Model(tiny_cfg())
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(str(path))
    return str(path)


def cfg_for(stage, out, teacher_dir, **kw):
    base = dict(stage=stage, out=str(out), teacher=teacher_dir, steps=6, batch_size=4, save_every=2,
                eval_per_category=1)
    base.update(kw)
    return distill.DistillConfig(**base)


def test_default_model_matches_tokenizer():
    cfg = ModelConfig()
    assert cfg.vocab_size == data.VOCAB_SIZE and cfg.img_context_id == data.IMG_CONTEXT_ID
    assert cfg.image_tokens == data.IMAGE_TOKENS


# ---------------------------------------------------------------- trainable sets (DESIGN section 6)

MIXER_NEW = ["conv1d.weight", "conv1d.bias", "wdt.weight", "dt_bias", "A_log", "norm.weight", "wg.weight"]


@pytest.mark.parametrize("stage,names", [
    (1, MIXER_NEW),
    (2, MIXER_NEW + ["wq.weight", "wk.weight", "wv.weight"]),
    (3, ["conv1d.weight", "conv1d.bias", "wdt.weight", "norm.weight", "wg.weight",
         "wq.weight", "wk.weight", "wv.weight"]),
])
def test_trainable_parameters_per_stage(stage, names):
    teacher = Model(tiny_cfg())
    student = convert(teacher, ["mamba2"] * 3)
    got = distill.set_trainable(student, teacher, stage)
    want = {f"layers.{i}.mixer.{n}" for i in range(3) for n in names}
    assert set(got) == want
    assert {n for n, p in student.named_parameters() if p.requires_grad} == want


def test_stage3_hybrid_freezes_kept_attention(teacher_dir, tmp_path):
    teacher = distill.load_teacher(teacher_dir)
    convert(teacher, ["mamba2"] * 3).save_pretrained(str(tmp_path / "stage2" / "model"))
    cfg = cfg_for(3, tmp_path, teacher_dir, layers="hybrid", n_attn=1, placement="tail-stacked")
    student = distill.initial_student(cfg, teacher)
    assert student.cfg.layers == ["mamba2", "mamba2", "attn"]
    for k, v in teacher.layers[2].state_dict().items():
        assert torch.equal(student.layers[2].state_dict()[k], v)
    got = set(distill.set_trainable(student, teacher, 3))
    assert got and all(n.startswith(("layers.0.", "layers.1.")) for n in got)
    assert not any(p.requires_grad for p in student.layers[2].parameters())


@pytest.mark.parametrize("stage", [1, 2])
def test_layerwise_loss_isolates_layers(stage):
    """Teacher forcing: layer i's loss sends no gradient to any other layer's parameters."""
    torch.manual_seed(0)
    teacher = Model(tiny_cfg())
    student = convert(teacher, ["mamba2"] * 3)
    distill.set_trainable(student, teacher, stage)
    batch = data.collate([data.sample_at(data.DataConfig(), "train", 0, i) for i in range(2)])
    loss, count = distill.layerwise_loss(student, teacher, batch, [1])
    (loss / count).backward()
    for n, p in student.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif n.startswith("layers.1."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, n
    assert all(p.grad is None for p in teacher.parameters())


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


def test_kl_answer_mask_is_the_positions_that_predict_answer_tokens():
    # oracle: logits[t] predict token t+1, so the answer-only KL must see exactly the positions t
    # with labels[t+1] scored (the positions answer_ce uses), and nothing else
    dcfg = data.DataConfig()
    batch = data.collate([data.sample_at(dcfg, "train", 0, i) for i in range(4)])
    b, L = batch["input_ids"].shape
    predicts_answer = torch.zeros(b, L, dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != data.IGNORE_INDEX
    torch.manual_seed(0)
    t = torch.randn(b, L, 7)
    on_answer = torch.where(predicts_answer[..., None], t + torch.randn(b, L, 7), t)
    off_answer = torch.where(predicts_answer[..., None], t, t + torch.randn(b, L, 7))
    mask = distill.kl_mask(batch, "answer")
    total_on, n = distill.kl_per_token(t, on_answer, mask)
    total_off, _ = distill.kl_per_token(t, off_answer, mask)
    assert n.item() == predicts_answer.sum().item() == (batch["labels"] != data.IGNORE_INDEX).sum().item()
    assert total_on.item() > 0 and total_off.item() == 0.0
    assert torch.equal(distill.kl_mask(batch, "all"), batch["attention_mask"])


def test_answer_ce_counts_answer_tokens_only():
    labels = torch.tensor([[-100, -100, 4, 7], [-100, 5, -100, -100]])
    logits = torch.zeros(2, 4, 10)
    total, n = distill.answer_ce(logits, labels)
    assert n.item() == 3 and total.item() == pytest.approx(3 * math.log(10))


def test_wsd_schedule():
    cfg = distill.DistillConfig(stage=1, steps=100, lr=1.0)
    lrs = [distill.wsd_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == 1.0 and lrs[50] == 1.0
    assert lrs[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- the loop


def test_stage0_loss_falls(tmp_path):
    torch.manual_seed(0)
    cfg = distill.DistillConfig(stage=0, out=str(tmp_path), steps=12, batch_size=8, lr=1e-2, save_every=100,
                                ground_weight=1.0, embed_std=0.5, grounding=SMALL_GROUNDING)
    student = distill.train_stage(cfg, student=Model(tiny_cfg()))
    losses = student.train_losses
    assert len(losses) == 12 and sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert os.path.exists(tmp_path / "stage0" / "model" / "model.safetensors")


def test_stage1_lowers_layer_mse(teacher_dir, tmp_path):
    teacher = distill.load_teacher(teacher_dir)
    cfg = cfg_for(1, tmp_path, teacher_dir, steps=15, lr=1e-2)
    batch = distill.eval_batch(n=8)
    before = distill.mean_layer_mse(distill.initial_student(cfg, teacher), teacher, batch)
    student = distill.train_stage(cfg, teacher)
    after = distill.mean_layer_mse(student, teacher, batch)
    assert after < 0.5 * before


def test_resume_gives_same_weights(teacher_dir, tmp_path):
    full = distill.train_stage(cfg_for(1, tmp_path / "a", teacher_dir))
    distill.train_stage(cfg_for(1, tmp_path / "b", teacher_dir), stop_after=3)   # "interrupted" after step 3
    ckpt = torch.load(tmp_path / "b" / "stage1" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2                                                     # the last save
    resumed = distill.train_stage(cfg_for(1, tmp_path / "b", teacher_dir, resume=True))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    logs = [json.loads(l) for l in open(tmp_path / "b" / "stage1" / "log.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]                       # no step logged twice


def test_nan_loss_stops_and_keeps_last_checkpoint(teacher_dir, tmp_path):
    hook = lambda step, loss: float("nan") if step == 3 else loss               # step index 3 = 4th step
    with pytest.raises(distill.NonFiniteLoss, match=r"loss is nan at step 3.*ckpt\.pt \(step 2\)"):
        distill.train_stage(cfg_for(1, tmp_path, teacher_dir), loss_hook=hook)
    ckpt = torch.load(tmp_path / "stage1" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2
    ref = distill.train_stage(cfg_for(1, tmp_path / "ref", teacher_dir, steps=6), stop_after=2)
    for k, v in ref.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    assert not os.path.exists(tmp_path / "stage1" / "model")


def test_main_exits_with_message_on_nan(monkeypatch, capsys):
    def boom(cfg):
        raise distill.NonFiniteLoss("stage 1: the loss is nan at step 7; stopped.")
    monkeypatch.setattr(distill, "run_stage", boom)
    with pytest.raises(SystemExit) as e:
        distill.main(["--stage", "1"])
    assert e.value.code == 1 and "nan at step 7" in capsys.readouterr().err


def test_missing_previous_stage_is_a_clear_error(teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        distill.initial_student(cfg_for(2, tmp_path, teacher_dir), distill.load_teacher(teacher_dir))


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
    read = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "stage1" / "log.jsonl")]
    l1, l2 = read("one"), read("two")
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-5)

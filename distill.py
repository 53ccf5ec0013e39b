"""Distillation: mmMamba's three stages (Sec. 3.3) in one loop.

Stages 1 and 2 distil layer by layer with teacher forcing: every converted layer receives the
TEACHER's hidden state, so all layers train at once in one pass and no layer sees another student
layer's error. Stage 3 distils end to end. The recipe, all of it in the table `STAGES` below:

    stage  trains, in every converted Mamba-2 mixer        loss                     steps  lr    batch
    1      NEW: conv, W_dt, dt_bias, A_log, norm, W_G      layer MSE                300    5e-3  16
    2      NEW + W_Q, W_K, W_V                             layer MSE                600    3e-3  16
    3      W_Q, W_K, W_V, conv, W_dt, norm, W_G            KL(teacher || student)   1000   3e-4  16
           (A_log and dt_bias freeze)

    layer MSE  mean over converted layers of ||student mixer - teacher attention||^2 per head before
               W_O, on the teacher's normed hidden state, times 1000 (as the official code)
    KL         KL(p_teacher || p_student) of the logits at temperature 1, per token
W_O, the MLPs, norms, embeddings, LM head and (hybrid, stage 3) the kept attention layers never
train. Stages 1-2 train every layer's mixer; stage 3 of a hybrid puts the teacher's attention
back in the kept layers. Optimiser: AdamW (betas 0.9, 0.95), weight decay 0.05 on matrices,
gradient clip 2.0, warmup-stable-decay schedule. The loop (`train`) trains any objective module:
teacher/train.py uses it to train the bundled teacher, the stand-in for HoVLE (not in the paper).

Official code, followed except where the README says why not (per-token KL, whole-model
checkpoints, padding masked, lr and steps):
    layer MSE  https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/trainer/distill_every_layer.py#L49-L64
    KL         https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb/src/trainer/default_lm.py#L464-L478

A run folder holds one folder per stage: stageK/ckpt.pt (resume with --resume), stageK/model/ (the
student when the stage ends), stageK/log.jsonl, stageK/summary.json; `--stage all` adds fidelity.png.

Run:
    python distill.py --stage 1                    # then 2, 3 (each starts from the previous one)
    python distill.py --stage all                  # 1, 2, 3 -> runs/linear
    python distill.py --stage all --layers hybrid --n-attn 2 --placement head-interleaved
    python distill.py --eval checkpoints/teacher   # accuracy table of any checkpoint folder
    torchrun --nproc_per_node=2 distill.py --stage 1   # data parallel (gloo on CPU, NCCL on GPU)
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from convert import load_model, save_model
from evaluate import (accuracy, evaluate_folder, mixer_fidelity, plot_fidelity, stage_report,
                      test_samples)
from model import PLACEMENTS, Mamba2Mixer, Model, make_layers, recomputed
from seed import MODES, seed_student
from utils import all_sum, arg, atomic_write, dist_setup, parse_config, run_main, write_json


# ----------------------------------------------------------------------------------------------
# The losses. Each returns (sum over this process's tokens, token count); the loop divides by the
# count summed over processes, so any number of processes gives the same global mean.

def layer_loss(student: Model, teacher: Model, batch: dict, cfg: TrainConfig):
    """Stages 1-2: per converted layer, the squared error between the student mixer's and the
    teacher attention's per-head outputs (b, L, H, P), both on the teacher's normed hidden state,
    summed over non-padding tokens and layers, times cfg.mse_scale (the count makes it the mean
    over tokens, heads, head dims and layers)."""
    layers = converted_layers(student, teacher)
    mask = batch["attention_mask"]                                                # (b, L)
    with torch.no_grad():
        us = teacher.mixer_inputs(batch["input_ids"], batch["pixel_values"])      # per layer (b, L, d_model)
        targets = [teacher.layers[i].mixer.heads(us[i]) for i in layers]         # (b, L, H, P)
    total = 0.0
    for i, target in zip(layers, targets):
        heads = student.layers[i].mixer.heads
        out = recomputed(heads, us[i], enabled=student.recompute)                # (b, L, H, P)
        se = (out.float() - target.float()).pow(2).mean(dim=(2, 3))              # (b, L)
        total = total + (se * mask).sum()
    return cfg.mse_scale * total, mask.sum().float() * len(layers)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor):
    """Sum over the masked positions (b, L) of KL(p_teacher || p_student), and their number."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum(), mask.sum().float()


def kl_loss(student: Model, teacher: Model, batch: dict, cfg: TrainConfig):
    """Stage 3: the per-token KL on every non-padding token."""
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], batch["pixel_values"])
    s_logits = student(batch["input_ids"], batch["pixel_values"])
    return kl_per_token(t_logits, s_logits, batch["attention_mask"])


# ----------------------------------------------------------------------------------------------
# The recipe: per stage, what trains in each converted mixer, the loss, steps, lr and batch size.

@dataclass(frozen=True)
class Stage:
    trains: tuple                  # parameter-name prefixes in a converted mixer
    loss: Callable                 # (student, teacher, batch, cfg) -> (sum, count)
    steps: int
    lr: float
    batch: int


QKV = ("wq", "wk", "wv")
STAGES = {
    1: Stage(Mamba2Mixer.NEW, layer_loss, 300, 5e-3, 16),
    2: Stage(Mamba2Mixer.NEW + QKV, layer_loss, 600, 3e-3, 16),
    3: Stage(QKV + ("conv1d", "wdt", "norm", "wg"), kl_loss, 1000, 3e-4, 16),
}


def converted_layers(student: Model, teacher: Model) -> list:
    """Layers that are Mamba-2 in the student and attention in the teacher."""
    kinds = zip(student.cfg.layers, teacher.cfg.layers)
    return [i for i, (s, t) in enumerate(kinds) if s == "mamba2" and t == "attn"]


def set_trainable(student: Model, teacher: Model, stage: int) -> list:
    """Freeze everything, then unfreeze the stage's parameters; return their names."""
    student.requires_grad_(False)
    names = []
    for i in converted_layers(student, teacher):
        for n, p in student.layers[i].mixer.named_parameters():
            if n.split(".")[0] in STAGES[stage].trains:
                p.requires_grad_(True)
                names.append(f"layers.{i}.mixer.{n}")
    return names


# ----------------------------------------------------------------------------------------------
# The student, built from the teacher

def load_teacher(path: str) -> Model:
    """Any checkpoint folder convert.load_model reads, in float32, frozen."""
    return load_model(path).float().eval().requires_grad_(False)


def build_student(cfg: TrainConfig, teacher: Model) -> Model:
    """Stage 1 (or --student seeded): the teacher seeded into all-Mamba-2 (--init). Otherwise the
    previous stage's model (or --student DIR). Stage 3 of a hybrid puts the teacher's attention
    back in the kept layers."""
    if cfg.student == "seeded" or (cfg.stage == "1" and not cfg.student):
        g = torch.Generator().manual_seed(cfg.seed)
        student = seed_student(teacher, ["mamba2"] * teacher.cfg.n_layers, cfg.init, generator=g)
    else:
        src = cfg.student or os.path.join(cfg.out, f"stage{int(cfg.stage) - 1}", "model")
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src}: stage {cfg.stage} starts from this folder, which does not "
                                    f"exist (run stage {int(cfg.stage) - 1} first, or pass --student DIR "
                                    "or seeded)")
        student = load_model(src).float()
    if cfg.stage == "3" and cfg.layers == "hybrid":
        kinds = make_layers(teacher.cfg.n_layers, cfg.n_attn, cfg.placement)
        keep_attention(student, teacher, [i for i, kind in enumerate(kinds) if kind == "attn"])
    return student


def keep_attention(student: Model, teacher: Model, keep: list) -> Model:
    """A hybrid: the teacher's attention back in layers `keep` (they never train)."""
    for i in keep:
        student.layers[i] = copy.deepcopy(teacher.layers[i])
    student.set_config(student.cfg.replace(layers=[b.kind for b in student.layers]))
    return student


# ----------------------------------------------------------------------------------------------
# One training loop

@dataclass
class LoopConfig:
    """What the training loop reads (teacher/train.py's config extends it too)."""
    stage: str = arg("1", "1, 2: layer-wise; 3: end to end; all: 1, 2, 3", choices=("1", "2", "3", "all"))
    out: str = arg("", "run folder, one sub-folder per stage (default runs/linear or runs/hybrid)")
    steps: int | None = arg(None, "optimiser steps (default: the stage's in STAGES)")
    lr: float | None = arg(None, "peak learning rate (default: the stage's)")
    batch_size: int | None = arg(None, "global batch, split over processes (default: the stage's)")
    weight_decay: float = arg(0.05, "AdamW weight decay on matrices")
    grad_clip: float = arg(2.0, "gradient norm clip")
    warmup_frac: float = arg(0.05, "linear warmup over this fraction of the steps")
    decay_frac: float = arg(0.2, "linear decay to 0 over this last fraction")
    task: str = arg("single", "training stream: single-image benchmark, or the multi-image mix",
                    choices=tuple(data.TASKS))
    data: str = arg("", "train on this LLaVA-style JSONL instead of the synthetic stream")
    save_every: int = arg(50, "checkpoint every N steps")
    seed: int = arg(0, "seed of the new parameters and of the data order")
    resume: bool = arg(False, "continue interrupted stages from their checkpoints")
    bf16: bool = arg(False, "bfloat16 autocast of the forward passes (weights, gradients, AdamW stay float32)")
    recompute: bool = arg(False, "activation checkpointing: keep each block's (stages 1-2: each mixer's) "
                                 "input only and run it again in the backward pass")

    def __post_init__(self):
        for name in ("steps", "lr", "batch_size", "save_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be positive")

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.out, f"stage{self.stage}")


class Distillation(nn.Module):
    """One stage's loss as a module, so that DistributedDataParallel can wrap it: the student's
    parameters that set_trainable chose train; the teacher is held in a list (not registered:
    never trained, saved or synchronised)."""

    def __init__(self, cfg: TrainConfig, student: Model, teacher: Model):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher = [teacher]

    def forward(self, batch: dict):
        loss = STAGES[int(self.cfg.stage)].loss
        return loss(self.student, self.teacher[0], batch, self.cfg)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def train_samples(cfg: LoopConfig):
    """A user's JSONL in a seeded order (every record is checked before any training), or None:
    the synthetic stream."""
    if not cfg.data:
        return None
    samples = data.load_jsonl(cfg.data)
    random.Random(cfg.seed).shuffle(samples)
    return samples


def train_batch(step: int, cfg: LoopConfig, rank: int, world: int, samples: list | None) -> dict:
    """This process's share of batch `step`: global samples step*B + rank*B/world + i (the data
    position is the step: a resumed run sees the same batches); a file's samples cycle."""
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by the number of processes {world}")
    local = cfg.batch_size // world
    idx = [step * cfg.batch_size + rank * local + i for i in range(local)]
    if samples is None:
        sample_at = data.TASKS[cfg.task]
        return data.collate([sample_at(data.DataConfig(), "train", cfg.seed, j) for j in idx])
    return data.collate([samples[j % len(samples)] for j in idx])


def wsd_lr(step: int, cfg: LoopConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay to 0 at the last step."""
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    decay = max(1, round(cfg.decay_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * min(1.0, (cfg.steps - step) / decay)


def train(cfg: LoopConfig, objective: nn.Module, samples: list | None = None) -> list:
    """Train the trainable parameters of `objective` (a module: batch -> (loss sum, count), holding
    the model as .student) in place; return the losses. Checkpoints (the whole objective, optimiser,
    step) every save_every steps; with cfg.resume, continues from the stage's checkpoint."""
    rank, world = dist_setup()
    ckpt_path = os.path.join(cfg.stage_dir, "ckpt.pt")
    log_path = os.path.join(cfg.stage_dir, "log.jsonl")
    os.makedirs(cfg.stage_dir, exist_ok=True)
    student = objective.student
    student.recompute = cfg.recompute
    device = student.lm_head.weight.device.type                     # autocast's device type
    params = [p for p in objective.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    if rank == 0:
        n = sum(p.numel() for p in params)
        print(f"stage {cfg.stage}: {len(params)} trainable tensors, {n:,} parameters"
              + (f"; resuming from {ckpt_path} at step {start}" if start else ""))
        with open(log_path, "a+") as f:                  # keep the steps the checkpoint holds
            f.seek(0)
            kept = f.readlines()[:start]
            f.truncate(0)
            f.writelines(kept)
    model = objective
    if world > 1:
        model = nn.parallel.DistributedDataParallel(objective)
    losses = []
    last_good = start
    t0 = time.time()
    student.train()
    for step in tqdm(range(start, cfg.steps), desc=f"stage {cfg.stage}", initial=start, total=cfg.steps,
                     disable=rank != 0, dynamic_ncols=True):
        lr = wsd_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device, torch.bfloat16, enabled=cfg.bf16):
            loss_sum, count = model(train_batch(step, cfg, rank, world, samples))
        total = all_sum(count.detach()).clamp_min(1)
        loss = (all_sum(loss_sum.detach()) / total).item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"{cfg.stage_dir}: the loss is {loss} at step {step}; stopped. The last good "
                                f"checkpoint is {ckpt_path} (step {last_good})")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / total * world).backward()           # DDP averages the gradients over processes
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(loss)
        if rank == 0:
            record = {"step": step + 1, "loss": loss, "lr": lr, "time": round(time.time() - t0, 3)}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state = {"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step + 1}
                atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
                last_good = step + 1
    student.eval()
    if rank == 0:
        save_model(student, os.path.join(cfg.stage_dir, "model"))
    return losses


# ----------------------------------------------------------------------------------------------
# A stage with its report, and the command line

@dataclass
class TrainConfig(LoopConfig):
    teacher: str = arg("checkpoints/teacher", "teacher checkpoint folder (ours, HoVLE, InternLM2 or Llama)")
    student: str = arg("", "start the (first) stage from this model folder, or 'seeded' for the freshly "
                           "seeded student (default: stage 1 seeded, later stages the previous stage's model)")
    layers: str = arg("linear", "student layout: all Mamba-2, or a hybrid keeping --n-attn attention "
                                "layers in stage 3", choices=("linear", "hybrid"))
    n_attn: int = arg(2, "attention layers a hybrid keeps")
    placement: str = arg("head-interleaved", "where a hybrid keeps them (the paper's Table 6)",
                         choices=PLACEMENTS)
    init: str = arg("inherit+mimic", "seeding mode (the paper's Table 4)", choices=MODES)
    mse_scale: float = arg(1000.0, "stages 1-2: loss scale (the official code's)")
    eval: str = arg("", "print the accuracy table of this checkpoint folder and exit")
    eval_data: str = arg("", "evaluate on this JSONL instead of the synthetic test split")
    eval_per_category: int = arg(50, "synthetic test questions per category (0: no accuracy after a stage)")

    def __post_init__(self):
        if self.stage in ("1", "2", "3"):
            stage = STAGES[int(self.stage)]
            if self.steps is None:
                self.steps = stage.steps
            if self.lr is None:
                self.lr = stage.lr
            if self.batch_size is None:
                self.batch_size = stage.batch
        self.out = self.out or f"runs/{self.layers}"
        super().__post_init__()


@torch.no_grad()
def layer_mse(student: Model, teacher: Model, batch: dict) -> float:
    """The stage 1-2 loss without its scale: the mean squared error per token, head, dim and layer."""
    total, count = layer_loss(student, teacher, batch, TrainConfig(mse_scale=1.0))
    return (total / count).item()


def run_stage(cfg: TrainConfig, teacher: Model, student: Model | None = None, samples=None) -> dict:
    """Train one stage and report (rank 0): per-layer fidelity, accuracy beside the teacher's, one
    summary line (evaluate.stage_report). Writes and returns stageK/summary.json."""
    if student is None:
        student = build_student(cfg, teacher)
    probe = data.collate(test_samples(5)[:32])                  # a fixed held-out batch for the layer numbers
    layerwise = cfg.stage in ("1", "2")
    before = mixer_fidelity(teacher, student, probe["input_ids"], probe["pixel_values"])
    mse_before = layer_mse(student, teacher, probe) if layerwise else None
    t0 = time.time()
    set_trainable(student, teacher, int(cfg.stage))
    losses = train(cfg, Distillation(cfg, student, teacher), samples)
    summary = {"stage": int(cfg.stage), "steps": cfg.steps, "seconds": round(time.time() - t0, 1),
               "loss_first": None, "loss_last": None, "layers": student.cfg.layers, "config": asdict(cfg),
               "fidelity_before": before,
               "fidelity": mixer_fidelity(teacher, student, probe["input_ids"], probe["pixel_values"])}
    if losses:
        summary.update(loss_first=losses[0], loss_last=losses[-1])
    if dist_setup()[0] != 0:
        return summary
    if layerwise:
        summary.update(mse_before=mse_before, mse_after=layer_mse(student, teacher, probe))
    if cfg.eval_per_category:
        tests = test_samples(cfg.eval_per_category)
        summary["accuracy"] = accuracy(student, tests)
        summary["teacher_accuracy"] = accuracy(teacher, tests)
    print(stage_report(summary))
    write_json(os.path.join(cfg.stage_dir, "summary.json"), summary)
    return summary


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, "mmMamba distillation: stages 1-3, evaluation.")
    if cfg.eval:
        return evaluate_folder(cfg.eval, cfg.eval_data, cfg.eval_per_category)
    teacher = load_teacher(cfg.teacher)
    samples = train_samples(cfg)
    stages = [cfg.stage]
    if cfg.stage == "all":
        stages = ["1", "2", "3"]
    summaries = []
    for k in stages:
        student = cfg.student
        if k != stages[0]:
            student = ""                                       # later stages: the previous stage's model
        summaries.append(run_stage(replace(cfg, stage=k, student=student), teacher, None, samples))
    if len(stages) == 3 and dist_setup()[0] == 0:
        print(f"per-layer fidelity: {plot_fidelity(cfg.out, summaries)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, NonFiniteLoss)

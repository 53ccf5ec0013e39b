"""Distillation: stage 0 (teacher training) and mmMamba's three stages, in one training loop.

mmMamba (arXiv 2502.13145, Sec. 3.3) distils a trained decoder-only VLM into Mamba-2 in three
stages. The stage decides which parameters train and which loss is used (DESIGN section 6):

    stage 0  (this project only: HoVLE's weights cannot be downloaded) train the all-attention
             teacher: next-token cross-entropy on answer tokens + a per-image-token auxiliary
             classification of what each grid cell holds (the grounding role of HoVLE's own
             first stage); optionally (--ground-weight) grounding hints that tell three attention
             heads where to look (grounding.py).
    stage 1  layer-wise, new parameters only (W_dt, dt_bias, A_log, conv, W_G, norm): every layer
             gets the TEACHER's normed hidden state (teacher forcing); MSE between the student
             mixer's and the teacher attention's per-head outputs before W_O, averaged over layers.
    stage 2  layer-wise, whole mixer: the same loss, W_Q, W_K, W_V train too.
    stage 3  end-to-end: KL(teacher || student) on the logits, per token; the mixers' Q/K/V, gate,
             norm, W_dt and conv train; A_log, dt_bias, W_O, MLPs, embeddings, LM head and kept
             attention layers (hybrid) are frozen.

Stages 1 and 2 train every layer's mixer (the student is all Mamba-2); stage 3 of a hybrid puts
the teacher's attention back in the kept layers. A run folder holds one folder per stage:
`stageK/ckpt.pt` (whole model, optimiser, step: an interrupted stage resumes with --resume),
`stageK/model/` (config.json + model.safetensors, written when the stage ends), `stageK/log.jsonl`
and `stageK/summary.json`. Each stage starts from the previous stage's model in the same folder.

Run:
    python distill.py --stage 0 --out runs/teacher          # train the teacher (2,500 steps, ~70 min on 2 cores)
    python distill.py --stage 1                             # then 2, 3; or --stage all
    python distill.py --stage all --layers hybrid --n-attn 2 --placement head-interleaved
    python distill.py --eval checkpoints/teacher            # accuracy table of any checkpoint
    python distill.py --stage 0 --ground-weight 0 --embed-std 0.02  # stage 0 without grounding hints
    torchrun --nproc_per_node=2 distill.py --stage 1        # data parallel (gloo on CPU, NCCL on GPU)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from convert import load_model
from grounding import GroundingConfig, Probes, grounding_loss
from model import Mamba2Mixer, Model, ModelConfig, PLACEMENTS, make_layers, _atomic_write, write_json
from seed import MODES, convert, mixer_fidelity

# Trainable parameters of a converted (Mamba-2) mixer per stage (DESIGN section 6).
STAGE1_PARAMS = ("conv1d.weight", "conv1d.bias", "wdt.weight", "dt_bias", "A_log", "norm.weight", "wg.weight")
STAGE2_PARAMS = STAGE1_PARAMS + ("wq.weight", "wk.weight", "wv.weight")
STAGE3_PARAMS = ("conv1d.weight", "conv1d.bias", "wdt.weight", "norm.weight", "wg.weight",
                 "wq.weight", "wk.weight", "wv.weight")
AUX_SCALE = 16.0  # stage 0: logit scale of the cosine cell classifier
STAGE_PARAMS = {1: STAGE1_PARAMS, 2: STAGE2_PARAMS, 3: STAGE3_PARAMS}

# Per-stage defaults, tuned for the bundled tiny teacher on a 2-core CPU. Stage 0's lr: at 1e-3 and
# above the teacher learnt nothing from the image in 3,000 steps (experiments/README.md); at 5e-4
# with the grounding hints, 2,500 steps of batch 32 take ~70 minutes on 2 cores. Stages 1-3 (sweeps
# in README "Distillation"): stage 1 at lr 5e-3 reaches the 5x MSE reduction in 300 steps; stage 2
# needs 600 steps at 3e-3 before the look head (layer 2) stops losing count/exist; stage 3 gains up
# to ~1,000 steps at 3e-4 (600 steps at 1e-3 is worse). All three: 11m28s on 2 cores (README).
STAGE_DEFAULTS = {  # stage: (steps, lr, batch size)
    0: (2500, 5e-4, 32),
    1: (300, 5e-3, 16),
    2: (600, 3e-3, 16),
    3: (1000, 3e-4, 16),
}


@dataclass
class DistillConfig:
    stage: int = 1                         # 0 (teacher), 1, 2 or 3
    out: str = "runs/linear"               # run folder: one sub-folder per stage
    teacher: str = "checkpoints/teacher"   # teacher checkpoint folder (stages 1-3)
    student: str | None = None             # start from this model folder instead of the previous stage's
    layers: str = "linear"                 # "linear" (all Mamba-2) or "hybrid" (stage 3 keeps n_attn attention layers)
    n_attn: int = 2                        # attention layers kept by a hybrid
    placement: str = "head-interleaved"    # where a hybrid keeps them (the paper's Table 6)
    init: str = "inherit+mimic"            # seeding mode of stage 1 (the paper's Table 4)
    steps: int | None = None               # optimiser steps (default: STAGE_DEFAULTS)
    lr: float | None = None                # peak learning rate (default: STAGE_DEFAULTS)
    batch_size: int | None = None          # global batch (default: STAGE_DEFAULTS), split over processes
    weight_decay: float = 0.05             # AdamW, on matrices only (not biases, norms, A_log, dt_bias)
    grad_clip: float = 2.0
    warmup_frac: float = 0.05              # warmup-stable-decay schedule: linear warmup ...
    decay_frac: float = 0.2                # ... and linear decay to 0 over the last 20% of steps
    mse_scale: float = 1000.0              # stage 1-2 loss scale, as in the paper's code
    kl_tokens: str = "all"                 # stage 3: KL on "all" non-padding tokens or "answer" tokens only
    aux_weight: float = 1.0                # stage 0: weight of the per-cell auxiliary loss
    ground_weight: float = 1.0             # stage 0: weight of the grounding hints (grounding.py; 0: off)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)  # stage 0: which heads the hints guide
    embed_std: float = 0.5                 # stage 0: std of the fresh token embeddings
    seed: int = 0
    data_seed: int = 0                     # training data stream (test data uses split "test")
    eval_per_category: int = 50            # test questions per category after each stage
    save_every: int = 50                   # checkpoint every N steps (and at the end)
    resume: bool = False                   # continue an interrupted stage from its ckpt.pt

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.layers not in ("linear", "hybrid"):
            raise ValueError(f"layers must be 'linear' or 'hybrid', got {self.layers!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.init not in MODES:
            raise ValueError(f"init must be one of {MODES}, got {self.init!r}")
        if self.kl_tokens not in ("all", "answer"):
            raise ValueError(f"kl_tokens must be 'all' or 'answer', got {self.kl_tokens!r}")
        steps, lr, bs = STAGE_DEFAULTS[self.stage]
        self.steps = steps if self.steps is None else self.steps
        self.lr = lr if self.lr is None else self.lr
        self.batch_size = bs if self.batch_size is None else self.batch_size
        if self.embed_std <= 0:
            raise ValueError(f"embed_std must be positive, got {self.embed_std}")
        if self.aux_weight < 0 or self.ground_weight < 0:
            raise ValueError(f"aux_weight and ground_weight must be >= 0, got {self.aux_weight}, {self.ground_weight}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size and lr must be positive, got {self.steps}, {self.batch_size}, {self.lr}")

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.out, f"stage{self.stage}")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# Processes (torchrun sets RANK / WORLD_SIZE; a plain run is rank 0 of 1)

def dist_setup() -> tuple:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in a single process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------------
# Which parameters train

def converted_layers(student: Model, teacher: Model) -> list:
    """Indices of layers where the student has Mamba-2 and the teacher attention."""
    return [i for i, (s, t) in enumerate(zip(student.cfg.layers, teacher.cfg.layers))
            if s == "mamba2" and t == "attn"]


def set_trainable(student: Model, teacher: Model, stage: int) -> list:
    """Freeze everything, then unfreeze the stage's parameters of the converted mixers.
    Returns the names of the trainable parameters."""
    student.requires_grad_(stage == 0)
    if stage == 0:
        return [n for n, _ in student.named_parameters()]
    names = []
    for i in converted_layers(student, teacher):
        for n, p in student.layers[i].mixer.named_parameters():
            if n in STAGE_PARAMS[stage]:
                p.requires_grad_(True)
                names.append(f"layers.{i}.mixer.{n}")
    return names


def make_optimizer(module: nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only: biases, norm weights, A_log and dt_bias
    (all 1-D) are not decayed."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def wsd_lr(step: int, cfg: DistillConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay to 0 at the last step."""
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    decay = max(1, round(cfg.decay_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * min(1.0, (cfg.steps - step) / decay)


# ----------------------------------------------------------------------------------------------
# The losses. Each returns (sum over this process's tokens, token count); the loop divides by the
# token count summed over processes, so any number of processes gives the same global mean.

def layerwise_loss(student: Model, teacher: Model, batch: dict, layers: list, scale: float = 1.0):
    """Stages 1-2: sum over layers of the MSE between the student mixer's and the teacher
    attention's per-head outputs (b, L, H, P) on the teacher's normed hidden state, over the
    non-padding tokens; divide by the count for the mean over tokens, heads, dims and layers."""
    mask = batch["attention_mask"]                                    # (b, L)
    with torch.no_grad():
        us = teacher.mixer_inputs(batch["input_ids"], batch["pixel_values"])  # per layer (b, L, D)
        targets = [teacher.layers[i].mixer.heads(us[i]) for i in layers]       # (b, L, H, P)
    total = 0.0
    for i, y_t in zip(layers, targets):
        y_s = student.layers[i].mixer.heads(us[i])                     # (b, L, H, P)
        se = (y_s.float() - y_t.float()).pow(2).mean(dim=(2, 3))      # (b, L)
        total = total + (se * mask).sum()
    count = mask.sum().to(torch.float32) * len(layers)
    return scale * total, count


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor):
    """Stage 3: sum over masked positions of KL(p_teacher || p_student) at temperature 1, and the
    number of positions. logits (b, L, V), mask (b, L) bool."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                     # (b, L)
    return (kl * mask).sum(), mask.sum().to(torch.float32)


def kl_mask(batch: dict, kl_tokens: str) -> torch.Tensor:
    """Stage 3: the positions whose logits the KL is taken on, (b, L) bool. "all": every
    non-padding token; "answer": the positions that predict an answer token or <|im_end|>, i.e.
    answer_mask shifted left by one (logits[t] predict token t+1, as in answer_ce)."""
    if kl_tokens == "all":
        return batch["attention_mask"]
    answer = batch["answer_mask"]                                      # (b, L)
    mask = torch.zeros_like(answer)
    mask[:, :-1] = answer[:, 1:]
    return mask


def answer_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Stage 0: next-token cross-entropy summed over answer tokens, and their number."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]           # logits[t] predicts labels[t+1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=data.IGNORE_INDEX, reduction="sum")
    return ce, (labels != data.IGNORE_INDEX).sum().to(torch.float32)


class Objective(nn.Module):
    """One stage's loss as a module, so that DistributedDataParallel can wrap it: the student
    (and stage 0's auxiliary head) train, the teacher is frozen."""

    def __init__(self, stage: int, student: Model, teacher: Model | None, cfg: DistillConfig):
        super().__init__()
        self.stage, self.student, self.cfg = stage, student, cfg
        self.teacher = [teacher]                       # a list: not registered, never trained
        if stage == 0:                                 # per-image-token "what is in this cell" head
            self.aux_head = nn.Linear(student.cfg.hidden_size, data.NUM_CELL_CLASSES, bias=False)
            if cfg.ground_weight:
                cfg.grounding.check(student.cfg)
                self.probes = Probes(student.cfg.hidden_size)   # grounding.py's attribute probes
        if stage in (1, 2):
            self.layers = converted_layers(student, teacher)

    def forward(self, batch: dict):
        """Returns (loss sum, count) for this process's share of the batch."""
        s, teacher = self.student, self.teacher[0]
        if self.stage == 0:
            feats = s.vision_features(batch["pixel_values"])          # (b, 64, D)
            logits, hidden = s(batch["input_ids"], image_embeds=feats, return_hidden=True)
            ce, n = answer_ce(logits, batch["labels"])
            if self.cfg.ground_weight:
                ce = ce + self.cfg.ground_weight * grounding_loss(s, hidden, batch, self.cfg.grounding, self.probes)
            cells = batch["cells"]                                     # (b, 64)
            # classify each cell with a cosine classifier of fixed scale: a plain linear head is
            # satisfied by features that are one large shared offset plus small class parts
            # (seen: image-token norm ~1400 vs ~0.4 for text embeddings, and answers that did not
            # depend on the image), which attention, reading normed tokens, cannot tell apart
            logits = AUX_SCALE * F.normalize(feats, dim=-1) @ F.normalize(self.aux_head.weight, dim=-1).T
            aux = F.cross_entropy(logits.flatten(0, 1).float(), cells.flatten(),
                                  ignore_index=data.IGNORE_INDEX, reduction="sum")
            n_cells = (cells != data.IGNORE_INDEX).sum().clamp_min(1)
            # the auxiliary loss is a per-cell mean, rescaled to the answer-token count
            return ce + self.cfg.aux_weight * aux * n / n_cells, n
        if self.stage in (1, 2):
            return layerwise_loss(s, teacher, batch, self.layers, self.cfg.mse_scale)
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"], batch["pixel_values"])
        return kl_per_token(t_logits, s(batch["input_ids"], batch["pixel_values"]), kl_mask(batch, self.cfg.kl_tokens))


# ----------------------------------------------------------------------------------------------
# Data

def train_batch(step: int, cfg: DistillConfig, rank: int, world: int, dcfg: data.DataConfig) -> dict:
    """This process's share of the global batch of `step`: samples step*B + rank*B/world + i of
    the training stream (the data position is the step: a resumed run sees the same batches)."""
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by the number of processes {world}")
    local = cfg.batch_size // world
    start = step * cfg.batch_size + rank * local
    return data.collate([data.sample_at(dcfg, "train", cfg.data_seed, start + i) for i in range(local)])


def test_samples(n_per_category: int, seed: int = 0, dcfg: data.DataConfig | None = None) -> list:
    """The held-out split: categories come round-robin, so n_per_category of each."""
    dcfg = dcfg or data.DataConfig()
    return [data.sample_at(dcfg, "test", seed, i) for i in range(n_per_category * len(dcfg.categories))]


@torch.no_grad()
def evaluate(model: Model, n_per_category: int = 50, seed: int = 0, progress: bool = False) -> dict:
    """Greedy generation + exact match on the test split; data.score's result."""
    model.eval()
    gen = lambda ids, px, n, eos: model.generate(ids, px, max_new_tokens=n, eos_id=eos)
    return data.score(gen, test_samples(n_per_category, seed), batch_size=64, progress=progress)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: str, model: Model, objective: Objective, optimizer, step: int) -> None:
    """The whole model (not only what trains), the optimiser, the step (= schedule and data
    position), written atomically."""
    state = {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
             "objective": {k: v for k, v in objective.state_dict().items() if not k.startswith("student.")},
             "optimizer": optimizer.state_dict(), "step": step}
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Building each stage's models

def load_teacher(path: str) -> Model:
    """Our own folder, or a HoVLE / InternLM2 / Llama one imported on the fly (convert.load_model)."""
    teacher = load_model(path).float().eval()
    teacher.requires_grad_(False)
    return teacher


def initial_student(cfg: DistillConfig, teacher: Model | None) -> Model:
    """Stage 0: a fresh all-attention model. Stage 1: the teacher seeded into all-Mamba-2.
    Stages 2-3: the previous stage's model (or --student); stage 3 of a hybrid puts the teacher's
    attention back into the kept layers."""
    if cfg.stage == 0:
        torch.manual_seed(cfg.seed)
        model = Model(ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID))
        # Token embeddings of std 0.02 (norm ~0.3) drown under what layer 0 adds from the image
        # tokens (norm ~7 at text positions after 550 steps), and the question's words get lost;
        # std 0.5 keeps them readable (experiments/README.md; part of the bundled teacher's recipe).
        if cfg.embed_std != model.cfg.init_std:    # (equal: the init as before, bit for bit)
            with torch.no_grad():
                model.embed_tokens.weight.normal_(0.0, cfg.embed_std)
        return model
    n = teacher.cfg.n_layers
    if cfg.stage == 1 and cfg.student is None:
        g = torch.Generator().manual_seed(cfg.seed)
        return convert(teacher, ["mamba2"] * n, cfg.init, generator=g)
    src = cfg.student or os.path.join(cfg.out, f"stage{cfg.stage - 1}", "model")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"stage {cfg.stage} starts from {src}, which does not exist: "
                                f"run stage {cfg.stage - 1} first (or pass --student DIR)")
    student = Model.from_pretrained(src).float()
    if cfg.stage == 3 and cfg.layers == "hybrid":
        layers = make_layers(n, cfg.n_attn, cfg.placement)
        for i, kind in enumerate(layers):
            if kind == "attn" and student.cfg.layers[i] != "attn":
                student.layers[i] = copy.deepcopy(teacher.layers[i])     # frozen in stage 3
        student.set_config(student.cfg.replace(layers=[b.kind for b in student.layers]))
    return student


# ----------------------------------------------------------------------------------------------
# The loop

def train_stage(cfg: DistillConfig, teacher: Model | None = None, student: Model | None = None,
                stop_after: int | None = None, loss_hook=None) -> Model:
    """Train one stage; returns the student. `stop_after` ends the loop early after that step
    (simulating an interruption, for tests); `loss_hook(step, loss)` may replace the loss (tests)."""
    rank, world = dist_setup()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.stage_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.stage_dir, "ckpt.pt")
    if cfg.stage > 0 and teacher is None:
        teacher = load_teacher(cfg.teacher)
    if student is None:
        student = initial_student(cfg, teacher)
    trainable = set_trainable(student, teacher, cfg.stage)
    objective = Objective(cfg.stage, student, teacher, cfg)
    if rank == 0:
        n_params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        print(f"stage {cfg.stage}: {len(trainable)} trainable student tensors, {n_params:,} trainable parameters")
    optimizer = make_optimizer(objective, cfg)
    step = 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        student.load_state_dict(state["model"])
        objective.load_state_dict({**state["objective"], **{f"student.{k}": v for k, v in state["model"].items()}})
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"stage {cfg.stage}: resuming from {ckpt_path} at step {step}")
    wrapped = objective
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(objective)
    dcfg = data.DataConfig()
    log_path = os.path.join(cfg.stage_dir, "log.jsonl")
    if rank == 0 and os.path.exists(log_path):        # keep only the steps the checkpoint holds
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    last_good, t0, losses = step, time.time(), []
    bar = tqdm(range(step, cfg.steps), desc=f"stage {cfg.stage}", initial=step, total=cfg.steps,
               disable=rank != 0, dynamic_ncols=True)
    student.train()
    for s in bar:
        batch = train_batch(s, cfg, rank, world, dcfg)
        for g in optimizer.param_groups:
            g["lr"] = wsd_lr(s, cfg)
        loss_sum, count = wrapped(batch)
        total = all_sum(count.detach())
        loss = loss_sum / total.clamp_min(1) * world      # DDP averages gradients over processes
        value = (all_sum(loss_sum.detach()) / total.clamp_min(1)).item()
        if loss_hook is not None:
            value = loss_hook(s, value)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"stage {cfg.stage}: the loss is {value} at step {s}; stopped. The last "
                                f"good checkpoint is {ckpt_path} (step {last_good})"
                                + ("" if os.path.exists(ckpt_path) else " (none written yet)"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4g}", lr=f"{wsd_lr(s, cfg):.2e}")
        done = s + 1
        saving = done % cfg.save_every == 0 or done == cfg.steps
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": done, "loss": value, "lr": wsd_lr(s, cfg),
                                    "time": round(time.time() - t0, 3)}) + "\n")
            if saving:
                save_checkpoint(ckpt_path, student, objective, optimizer, done)
        last_good = done if saving else last_good
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    student.eval()
    if rank == 0 and (stop_after is None or stop_after >= cfg.steps):
        student.save_pretrained(os.path.join(cfg.stage_dir, "model"))
    if dist.is_initialized():
        dist.barrier()
    student.train_losses = losses
    return student


# ----------------------------------------------------------------------------------------------
# Reports: layer fidelity, accuracy beside the teacher, one-line summaries

def eval_batch(n: int = 32, seed: int = 0) -> dict:
    """A fixed held-out batch for the layer-wise numbers."""
    return data.collate(test_samples(max(1, n // len(data.CATEGORIES)) + 1, seed=seed + 1)[:n])


@torch.no_grad()
def mean_layer_mse(student: Model, teacher: Model, batch: dict) -> float:
    """Mean over converted layers of the per-head output MSE (unscaled), teacher forcing."""
    layers = converted_layers(student, teacher)
    if not layers:
        return 0.0
    total, count = layerwise_loss(student, teacher, batch, layers)
    return (total / count).item()


def teacher_accuracy(cfg: DistillConfig, teacher: Model) -> dict:
    """The teacher's test accuracy, cached in the run folder (it does not change between stages)."""
    path = os.path.join(cfg.out, "teacher_eval.json")
    key = {"teacher": os.path.abspath(cfg.teacher), "n": cfg.eval_per_category}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["result"]
    result = evaluate(teacher, cfg.eval_per_category)
    result.pop("predictions")
    os.makedirs(cfg.out, exist_ok=True)
    write_json(path, {"key": key, "result": result})
    return result


def accuracy_table(results: dict) -> str:
    """Columns: category, chance, then one column per model (name -> data.score result)."""
    names = list(results)
    cats = list(next(iter(results.values()))["accuracy"])
    lines = [f"{'category':<10} {'chance':>7} " + " ".join(f"{n:>10}" for n in names)]
    for c in cats:
        lines.append(f"{c:<10} {100 * data.CHANCE.get(c, float('nan')):6.1f}% "
                     + " ".join(f"{100 * r['accuracy'][c]:9.1f}%" for r in results.values()))
    lines.append(f"{'mean':<10} {100 * sum(data.CHANCE[c] for c in cats) / len(cats):6.1f}% "
                 + " ".join(f"{100 * r['mean']:9.1f}%" for r in results.values()))
    return "\n".join(lines)


def fidelity_table(rows: list) -> str:
    lines = [f"{'layer':>5} {'kind':<7} {'rel err':>8} {'cosine':>7}"]
    lines += [f"{r['layer']:>5} {r['kind']:<7} {r['rel_err']:8.3f} {r['cosine']:7.3f}" for r in rows]
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_stage(cfg: DistillConfig) -> dict:
    """Train one stage, then report (rank 0): summary line, layer fidelity, accuracy table.
    Writes stageK/summary.json and returns it."""
    rank, _ = dist_setup()
    teacher = load_teacher(cfg.teacher) if cfg.stage > 0 else None
    student = initial_student(cfg, teacher)
    batch = eval_batch(seed=cfg.seed)
    mse_before = mean_layer_mse(student, teacher, batch) if cfg.stage in (1, 2) else None
    t0 = time.time()
    student = train_stage(cfg, teacher, student)
    seconds = time.time() - t0
    if rank != 0:
        return {}
    losses = student.train_losses
    summary = {"stage": cfg.stage, "steps": cfg.steps, "seconds": round(seconds, 1),
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "layers": student.cfg.layers, "config": asdict(cfg)}
    line = f"stage {cfg.stage} done in {fmt_time(seconds)}: {cfg.steps} steps"
    if losses:
        line += f", loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    print()
    if cfg.stage > 0:
        rows = mixer_fidelity(teacher, student, batch["input_ids"], batch["pixel_values"])
        summary["fidelity"] = rows
        if cfg.stage in (1, 2):
            mse_after = mean_layer_mse(student, teacher, batch)
            summary.update(mse_before=mse_before, mse_after=mse_after)
            line += f", layer MSE {mse_before:.3g} -> {mse_after:.3g} ({mse_before / max(mse_after, 1e-30):.1f}x lower)"
        print(fidelity_table(rows))
    result = evaluate(student, cfg.eval_per_category)
    result.pop("predictions")
    summary["accuracy"] = result
    tables = {"student": result}
    if cfg.stage > 0:
        t_res = teacher_accuracy(cfg, teacher)
        summary["teacher_accuracy"] = t_res
        tables = {"teacher": t_res, "student": result}
        line += f", accuracy {100 * result['mean']:.1f}% (teacher {100 * t_res['mean']:.1f}%, " \
                f"{100 * result['mean'] / max(t_res['mean'], 1e-9):.1f}% of it)"
    else:
        line += f", accuracy {100 * result['mean']:.1f}%"
    print(accuracy_table(tables))
    print(line)
    write_json(os.path.join(cfg.stage_dir, "summary.json"), summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description="mmMamba distillation: stage 0 (teacher), stages 1-3, evaluation.")
    p.add_argument("--stage", default="1", choices=["0", "1", "2", "3", "all"],
                   help="0: train the teacher; 1, 2: layer-wise; 3: end-to-end; all: 1, 2, 3 then evaluate")
    p.add_argument("--eval", metavar="DIR", help="print the accuracy table of the checkpoint in DIR and exit")
    p.add_argument("--out", help="run folder (default runs/teacher for stage 0, runs/linear or runs/hybrid)")
    p.add_argument("--teacher", default="checkpoints/teacher", help="teacher checkpoint folder")
    p.add_argument("--student", help="start the stage from this model folder instead of the previous stage's")
    p.add_argument("--layers", default="linear", choices=["linear", "hybrid"], help="student layout of stage 3")
    p.add_argument("--n-attn", type=int, default=2, help="attention layers a hybrid keeps")
    p.add_argument("--placement", default="head-interleaved", choices=list(PLACEMENTS), help="where a hybrid keeps them")
    p.add_argument("--init", default="inherit+mimic", choices=list(MODES), help="seeding mode of stage 1")
    p.add_argument("--steps", type=int, help="optimiser steps (default per stage)")
    p.add_argument("--lr", type=float, help="peak learning rate (default per stage)")
    p.add_argument("--batch-size", type=int, help="global batch size (default per stage)")
    p.add_argument("--kl-tokens", default="all", choices=["all", "answer"], help="stage 3: tokens the KL is taken on")
    p.add_argument("--aux-weight", type=float, default=1.0, help="stage 0: weight of the per-cell auxiliary loss")
    p.add_argument("--embed-std", type=float, default=0.5, help="stage 0: std of the fresh token embeddings")
    p.add_argument("--ground-weight", type=float, default=1.0, help="stage 0: weight of the grounding hints (grounding.py; 0: off)")
    p.add_argument("--eval-per-category", type=int, default=50, help="test questions per category after a stage")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation")
    p.add_argument("--resume", action="store_true", help="continue interrupted stages from their checkpoints")
    args = p.parse_args(argv)

    if args.eval:
        model = Model.from_pretrained(args.eval).float()
        result = evaluate(model, args.eval_per_category, progress=True)
        print(data.format_table(result))
        return
    stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
    out = args.out or ("runs/teacher" if stages == [0] else f"runs/{args.layers}")
    for k in stages:
        cfg = DistillConfig(stage=k, out=out, teacher=args.teacher, student=args.student if k == stages[0] else None,
                            layers=args.layers, n_attn=args.n_attn, placement=args.placement, init=args.init,
                            steps=args.steps, lr=args.lr, batch_size=args.batch_size, kl_tokens=args.kl_tokens,
                            aux_weight=args.aux_weight, ground_weight=args.ground_weight, embed_std=args.embed_std,
                            eval_per_category=args.eval_per_category, save_every=args.save_every,
                            seed=args.seed, resume=args.resume)
        try:
            run_stage(cfg)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

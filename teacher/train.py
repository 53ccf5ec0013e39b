"""Stage 0: train the bundled tiny teacher (checkpoints/teacher), this project's stand-in for HoVLE.

Not part of mmMamba: the paper distils a trained HoVLE-2.6B, whose weights cannot be downloaded
here, so this project first trains a small all-attention VLM on its synthetic benchmark (data.py)
with distill.py's training loop (`distill.train`: AdamW, warmup-stable-decay, checkpoints, resume,
NaN stop, data parallel). The loss, per batch:

    answer CE      next-token cross-entropy on the answer tokens (and their <|im_end|>)
    + aux          a cosine classifier (fixed scale 16) of what each grid cell holds, on the vision
                   stem's image tokens, rescaled to the answer-token count (a plain linear head let
                   image features grow to norm ~1400, and the answers ignored the image)
    + hints        teacher/grounding.py: four attention heads told where to look, and three probes

Token embeddings start at std 0.5, not 0.02, so that the question's words do not drown under the
image's. The aux head and the probes are dropped after training: the teacher is a plain `Model`.
experiments/README.md has the history of this recipe (2,500 steps: 97.1% on the test split).

Run (from the repository root):
    python -m teacher.train                          # 2500 steps, about 70 min on 2 CPU cores -> runs/teacher
    python -m teacher.train --steps 12 --out /tmp/t  # a smoke run
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import distill
from convert import load_model
from evaluate import evaluate, test_samples
from model import Model, ModelConfig
from teacher import grounding
from utils import arg, dist_setup, parse_config, run_main, write_json


@dataclass
class TeacherConfig(distill.LoopConfig):
    stage: str = "0"                                        # the run folder's stage0/ (not an option)
    out: str = arg("runs/teacher", "run folder (stage0/ inside)")
    steps: int = arg(2500, "optimiser steps")
    lr: float = arg(5e-4, "peak learning rate")
    batch_size: int = arg(32, "global batch, split over processes")
    aux_weight: float = arg(1.0, "weight of the per-image-token cell classifier")
    ground_weight: float = arg(1.0, "weight of the grounding hints (teacher/grounding.py; 0: off)")
    embed_std: float = arg(0.5, "std of the fresh token embeddings")
    eval_per_category: int = arg(50, "test questions per category scored after training (0: none)")
    hints: grounding.GroundingConfig = field(default_factory=grounding.GroundingConfig)   # the roles' heads
    start: str = arg("", "fine-tune this checkpoint folder instead of training from scratch")


def answer_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Next-token cross-entropy summed over the answer tokens (labels != -100), and their number."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]                     # logits[t] predict labels[t+1]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE_INDEX, reduction="sum")
    return ce, (labels != data.IGNORE_INDEX).sum().float()


class TeacherLoss(nn.Module):
    """The stage-0 objective for distill.train: the whole model trains, with the aux head and probes."""

    def __init__(self, cfg: TeacherConfig, model: Model):
        super().__init__()
        self.cfg, self.student = cfg, model.requires_grad_(True)
        self.aux_head = nn.Linear(model.cfg.hidden_size, data.NUM_CELL_CLASSES, bias=False)
        self.probes = grounding.Probes(model.cfg.hidden_size) if cfg.ground_weight else None
        if cfg.ground_weight:
            cfg.hints.check(model.cfg)

    def forward(self, batch: dict):
        """(answer CE + aux + hints summed over this process's samples, answer-token count).
        Samples without `cells` add no aux or grounding loss."""
        feats = self.student.vision(batch["pixel_values"])                     # (b, T_img, d_model)
        logits, hidden = self.student(batch["input_ids"], image_embeds=feats, return_hidden=True)
        ce, n = answer_ce(logits, batch["labels"])
        if self.cfg.ground_weight:
            ce = ce + self.cfg.ground_weight * grounding.grounding_loss(self.student, hidden, batch, self.cfg.hints,
                                                                        self.probes)
        cells = batch["cells"]                                                 # (b, T_img)
        cls = 16.0 * F.normalize(feats, dim=-1) @ F.normalize(self.aux_head.weight, dim=-1).T
        aux = F.cross_entropy(cls.flatten(0, 1).float(), cells.flatten(), ignore_index=data.IGNORE_INDEX,
                              reduction="sum")
        return ce + self.cfg.aux_weight * aux * n / (cells != data.IGNORE_INDEX).sum().clamp_min(1), n


def main(argv=None) -> dict:
    cfg = parse_config(TeacherConfig, argv, "Stage 0: train the tiny all-attention teacher (not part of mmMamba).")
    torch.manual_seed(cfg.seed)
    if cfg.start:
        model = load_model(cfg.start).float()
    else:
        model = Model(ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID))
        with torch.no_grad():
            model.embed_tokens.weight.normal_(0.0, cfg.embed_std)
    t0 = time.time()
    losses = distill.train(cfg, TeacherLoss(cfg, model), distill.train_samples(cfg))
    summary = {"stage": 0, "steps": cfg.steps, "seconds": round(time.time() - t0, 1), "loss_first": losses[0]
               if losses else None, "loss_last": losses[-1] if losses else None, "config": asdict(cfg)}
    if dist_setup()[0] != 0:
        dist.destroy_process_group()
        return summary
    line = f"stage 0 done in {summary['seconds'] / 60:.1f} min: {cfg.steps} steps"
    line += f", loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses else ""
    if cfg.eval_per_category:
        result = evaluate(model, test_samples(cfg.eval_per_category))
        summary["accuracy"] = {k: v for k, v in result.items() if k != "predictions"}
        print(data.format_table({"teacher": result}))
        line += f", accuracy {100 * result['mean']:.1f}%"
    print(line + f"; the teacher: {os.path.join(cfg.stage_dir, 'model')}")
    write_json(os.path.join(cfg.stage_dir, "summary.json"), summary)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_main(main, distill.NonFiniteLoss)

"""Memory per GPU of a HoVLE-size distillation stage (convert.hovle_config(): 32 layers, d_model
2048), with and without distill.py's --bf16 (autocast) and --recompute (activation checkpointing).

    weights      the frozen teacher and the student, float32 (autocast keeps float32 weights)
    gradients    float32, the stage's trainable set (distill.STAGES, set_trainable)
    AdamW        two float32 moments per trainable parameter
    activations  what the forward saves for backward, per token of this GPU's batch, counted by
                 a saved-tensor hook (the storages the graph still holds) on HoVLE-width models at
                 two lengths (the slope is per token): 1 layer, plus 31 times what a second layer
                 adds; the LM head and KL grown from a small vocabulary to HoVLE's by a second,
                 twice larger one. What does not grow with the length (autocast's bfloat16 copies
                 of the weights the backward needs; with --recompute only those outside the
                 blocks stay) is given apart. Added by hand, what the loss holds but autograd does
                 not save: the teacher's targets in stages 1-2 ((H, P) float32 per layer), its
                 logits in stage 3.
Parameter counts come from models on the meta device (no memory). DDP keeps all of it on every GPU
(and a bucket copy of the gradients). Not counted: the forward's transient buffers, one block's
activations while --recompute runs it again in backward (1/32 of the fp32 column), the CUDA context.

Run (CPU, about 5 minutes):  python experiments/train_memory.py
"""
from __future__ import annotations

import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
import distill  # noqa: E402
from convert import hovle_config  # noqa: E402
from model import Model  # noqa: E402
from seed import seed_student  # noqa: E402

GiB = 2 ** 30
SMALL_VOCAB = 1024
TOKENS = 8192                                        # the official stage 3: batch 1 of up to 8,192 tokens
LENGTHS = (128, 256)                                 # >= 2 SSD chunks: linear from there


def counts(stage: int) -> tuple:
    """(teacher parameters, student parameters, trainable parameters) of the HoVLE-size stage."""
    with torch.device("meta"):
        teacher = Model(hovle_config())
        student = Model(hovle_config(layers=["mamba2"] * 32))
    trainable = distill.set_trainable(student, teacher, stage)
    params = dict(student.named_parameters())
    n = sum(params[name].numel() for name in trainable)
    return sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters()), n


def saved_bytes(stage: int, n_layers: int, L: int, vocab: int, bf16: bool, recompute: bool) -> int:
    """Bytes the stage's loss saves for backward, on a HoVLE-width model of n_layers and a `vocab`
    vocabulary, one row of L tokens."""
    torch.manual_seed(0)
    cfg = hovle_config(layers=["attn"] * n_layers, vocab_size=vocab, img_context_id=0)
    teacher = Model(cfg).requires_grad_(False)
    student = seed_student(teacher, ["mamba2"] * n_layers)
    distill.set_trainable(student, teacher, stage)
    student.recompute = recompute
    ids = torch.randint(1, vocab, (1, L))
    batch = {"input_ids": ids, "pixel_values": None, "attention_mask": torch.ones(1, L, dtype=torch.bool)}
    loss_cfg = distill.TrainConfig(stage=str(stage))
    kept = []

    def pack(t):
        kept.append(weakref.ref(t))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = distill.STAGES[stage].loss(student, teacher, batch, loss_cfg)
    alive = [ref() for ref in kept if ref() is not None]        # what the graph of `loss` still holds
    weights = {p.data_ptr() for m in (student, teacher) for p in m.parameters()}      # counted apart
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    storages = {ptr: n for ptr, n in storages.items() if ptr not in weights}
    del loss
    return sum(storages.values())


def fit(stage: int, n_layers: int, vocab: int, bf16: bool, recompute: bool) -> tuple:
    """(bytes per token, bytes independent of the length) of a model, from two lengths."""
    a, b = (saved_bytes(stage, n_layers, L, vocab, bf16, recompute) for L in LENGTHS)
    per_token = (b - a) / (LENGTHS[1] - LENGTHS[0])
    return per_token, a - per_token * LENGTHS[0]


def activations(stage: int, bf16: bool, recompute: bool) -> tuple:
    """(bytes per token, bytes independent of the length) of the 32-layer HoVLE stage: a 1-layer
    model (layer 0, whose input needs no gradient, the embedding and the head), 31 times what a
    second layer adds, and for stage 3 the head's growth with the vocabulary, up to HoVLE's."""
    V = hovle_config().vocab_size
    one = torch.tensor(fit(stage, 1, SMALL_VOCAB, bf16, recompute))
    two = torch.tensor(fit(stage, 2, SMALL_VOCAB, bf16, recompute))
    total = one + 31 * (two - one)
    if stage == 3:
        wider = torch.tensor(fit(stage, 1, 2 * SMALL_VOCAB, bf16, recompute))
        total += (wider - one) * (V - SMALL_VOCAB) / SMALL_VOCAB
        total[0] += V * 4                                # the teacher's logits, float32
    else:
        total[0] += 32 * 2048 * 4                        # the teacher's targets, (H, P) float32 per layer
    return total[0].item(), total[1].item()


def main() -> None:
    torch.set_num_threads(1)
    modes = ((False, False), (True, False), (False, True), (True, True))     # (bf16, recompute)
    print(f"| stage | trainable | weights (teacher + student) | gradients | AdamW | bf16 weight copies | "
          f"activations per token | total at {TOKENS:,} tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for stage in (1, 2, 3):
        n_teacher, n_student, n_train = counts(stage)
        fixed = 4 * (n_teacher + n_student) + 4 * n_train + 8 * n_train        # weights, gradients, AdamW
        acts = {mode: activations(stage, *mode) for mode in modes}
        copies = max(acts[True, False][1], 0.0)
        per_token = " / ".join(f"{acts[mode][0] / 2 ** 20:.2f}" for mode in modes)
        totals = " / ".join(f"{(fixed + max(acts[m][1], 0.0) + TOKENS * acts[m][0]) / GiB:.0f}" for m in modes)
        print(f"| {stage} | {n_train / 1e6:.0f}M | {4 * (n_teacher + n_student) / GiB:.1f} GiB | "
              f"{4 * n_train / GiB:.2f} GiB | {8 * n_train / GiB:.2f} GiB | {copies / GiB:.1f} GiB | "
              f"{per_token} MiB | {totals} GiB |", flush=True)
    print("(activations and totals: fp32 / bf16 / fp32 + recompute / bf16 + recompute)")


if __name__ == "__main__":
    main()

"""Diagnostics of a stage-0 checkpoint: does the model look up what the question names?

Two measurements behind the "Attention-focus loss" section of experiments/README.md:

1. Where one attention head (layer 3, head 0 by default: the head `--focus-weight` supervises)
   looks, per category, on 140 test questions: its attention mass on the cells the question names
   (data.focus_cells) and on the other objects, at the best question token and at the token before
   the answer.
2. Whether the lookup is learnable from the frozen layer inputs: a fresh rank-P bilinear score
   (a head of the model's size, no RoPE) fitted on colour questions ("What color is the square?")
   to pick the named cell, with the query at the shape word, at the "?" after it, and at the token
   before the answer (Adam, lr 1e-2, 300 steps, 448 train / 64 test questions).

Run:
    python experiments/focus_probe.py runs/teacher/stage0/ckpt.pt      # or a model folder
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from model import Model, ModelConfig  # noqa: E402


def load(path: str) -> Model:
    """A model folder (config.json + model.safetensors) or a distill.py ckpt.pt."""
    if os.path.isdir(path):
        return Model.from_pretrained(path).float().eval()
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = Model(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


@torch.no_grad()
def head_focus(model: Model, layer: int, head: int, n: int = 140) -> None:
    samples = [data.sample_at(data.DataConfig(), "test", 0, i) for i in range(n)]
    b = data.collate(samples)
    ids = b["input_ids"]
    B, T = ids.shape
    t = torch.arange(T)
    _, hidden = model(ids, b["pixel_values"], return_hidden=True)
    block = model.layers[layer]
    p = block.mixer.probs(block.attention_norm(hidden[layer]), head)           # (B, T, T)
    first = (b["labels"] != data.IGNORE_INDEX).int().argmax(1, keepdim=True)  # (B, 1)
    start = ((ids == data.TOKENIZER.img_end_id).int() * t).amax(1, keepdim=True) + 2
    span = (t >= start) & (t < first)                                          # question .. answer - 1
    img = ids == model.cfg.img_context_id
    named = torch.zeros(B, T).masked_scatter(img, b["focus"].float())
    others = torch.zeros(B, T).masked_scatter(img, ((b["cells"] > 0) & ~b["focus"]).float())
    on_named = (p * named[:, None]).sum(-1).masked_fill(~span, -1.0)           # (B, T) per query token
    best = on_named.argmax(1)
    on_others = (p * others[:, None]).sum(-1)[torch.arange(B), best]
    last = on_named[torch.arange(B), first[:, 0] - 1]
    print(f"layer {layer} head {head}: attention mass on the named cells / other objects")
    for cat in data.CATEGORIES:
        k = [i for i, s in enumerate(samples) if s.category == cat]
        print(f"  {cat:9s} best question token {on_named.amax(1)[k].mean():.2f} / {on_others[k].mean():.2f}"
              f"   token before the answer {last[k].mean():.2f}")


def fit_lookup(model: Model, layer: int, n: int = 512, steps: int = 300) -> None:
    torch.manual_seed(0)
    samples = [data.sample_at(data.DataConfig(categories=("color",)), "train", 5, i) for i in range(n)]
    b = data.collate(samples)
    ids = b["input_ids"]
    B, D, P = ids.shape[0], model.cfg.hidden_size, model.cfg.head_dim
    with torch.no_grad():
        _, hidden = model(ids, b["pixel_values"], return_hidden=True)
        u = model.layers[layer].attention_norm(hidden[layer])                  # (B, T, D)
    first = (b["labels"] != data.IGNORE_INDEX).int().argmax(1)
    keys = u[ids == model.cfg.img_context_id].view(B, -1, D)                  # (B, 64, D)
    target = b["focus"].float()                                                # one named cell
    train = torch.arange(B) < n - 64
    print(f"fresh rank-{P} lookup fitted on frozen layer-{layer} inputs, colour questions:")
    for back, name in ((6, "shape word"), (5, "'?'"), (1, "token before the answer")):
        query = u[torch.arange(B), first - back]                               # (B, D)
        wq = (0.02 * torch.randn(P, D)).requires_grad_()
        wk = (0.02 * torch.randn(P, D)).requires_grad_()
        opt = torch.optim.Adam([wq, wk], lr=1e-2)
        for _ in range(steps):
            score = torch.einsum("bp,bnp->bn", query @ wq.T, keys @ wk.T) / math.sqrt(P)  # (B, 64)
            ce = -(score.log_softmax(-1) * target).sum(-1)
            opt.zero_grad()
            ce[train].mean().backward()
            opt.step()
        hit = (score.argmax(-1) == target.argmax(-1))[~train].float().mean()
        print(f"  query at the {name:24s} test CE {ce[~train].mean():.3f}, named cell on top {hit:.0%}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Does a stage-0 checkpoint look up what the question names?")
    p.add_argument("checkpoint", help="model folder or distill.py ckpt.pt")
    p.add_argument("--layer", type=int, default=3, help="layer of the head and of the frozen inputs")
    p.add_argument("--head", type=int, default=0, help="query head to inspect")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = load(args.checkpoint)
    head_focus(model, args.layer, args.head)
    fit_lookup(model, args.layer)


if __name__ == "__main__":
    main()

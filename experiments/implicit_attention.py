"""What the mixer attends to: the linear student's implicit attention beside the teacher's softmax.

The SSD's dual form writes the Mamba-2 mixer as attention without a softmax: per head,
M[t, s] = (C_t . B_s) exp(dt_{s+1} A + ... + dt_t A) dt_s (ssd.implicit_attention), y = M x. Seeding
copies W_Q, W_K, W_V into C, B, x, so a freshly seeded mixer's M is the teacher's q k^T without
the softmax, without RoPE and times a decay; stages 1-2 fit it to the teacher's output per layer;
stage 3 to the teacher's answers. This draws, for one multi-image prompt and two heads, the
teacher's softmax(q k^T / sqrt(P)) and the student's M after seeding, after stage 2 and after
stage 3, each on its own model's hidden states: the matrices (|M|, each row scaled to sum 1, log
colour), and the row of the question's object word over the prompt, with the images marked and
the cell the question is about.

Run (after distilling the recall students, see the README):
    python experiments/implicit_attention.py           # -> results/implicit_attention.png
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the library
import data  # noqa: E402
from convert import load_model  # noqa: E402
from seed import seed_student  # noqa: E402
from ssd import implicit_attention  # noqa: E402
from teacher.grounding import role_probs  # noqa: E402
from utils import arg, parse_config, run_main  # noqa: E402


@dataclass
class PictureConfig:
    teacher: str = arg("checkpoints/teacher_multi", "the teacher checkpoint folder")
    run: str = arg("runs/recall/linear", "the linear student's run folder (stage2/, stage3/)")
    heads: list[str] = arg(["2:0", "6:1"], "layer:head pairs to draw")
    n_images: int = arg(4, "images in the prompt")
    index: int = arg(0, "which test question")
    out: str = arg("results/implicit_attention.png", "the picture")


def mixer_attention(model, hidden: list, layer: int) -> torch.Tensor:
    """A Mamba-2 mixer's implicit attention M of one layer, (H, L, L): its SSD inputs are caught
    on their way into Mamba2Mixer.ssd."""
    mixer = model.layers[layer].mixer
    caught = {}
    ssd = mixer.ssd

    def catch(x, dt, A, B, C, cache):
        caught.update(dt=dt, A=A, B=B, C=C)
        return ssd(x, dt, A, B, C, cache)
    mixer.ssd = catch
    try:
        mixer.heads(model.layers[layer].attention_norm(hidden[layer]))
    finally:
        del mixer.ssd
    return implicit_attention(caught["dt"], caught["A"], caught["B"], caught["C"])[0]


@torch.no_grad()
def attention_maps(model, batch: dict, heads: list) -> list:
    """For each (layer, head): the (L, L) map of that head, softmax or implicit."""
    _, hidden = model(batch["input_ids"], batch["pixel_values"], return_hidden=True)
    maps = []
    for layer, head in heads:
        if model.layers[layer].kind == "attn":
            maps.append(role_probs(model, hidden, layer, head)[0])
        else:
            maps.append(mixer_attention(model, hidden, layer)[head])
    return maps


def row_scaled(m: torch.Tensor) -> torch.Tensor:
    """|M| with each row scaled to sum 1 (a softmax row already does)."""
    a = m.abs().double()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def main(argv=None) -> str:
    cfg = parse_config(PictureConfig, argv, "The linear student's implicit attention beside the teacher's.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    heads = [tuple(int(v) for v in pair.split(":")) for pair in cfg.heads]
    teacher = load_model(cfg.teacher).float().eval()
    seeded = seed_student(teacher, ["mamba2"] * teacher.cfg.n_layers, "inherit+mimic",
                          generator=torch.Generator().manual_seed(0))
    models = {"teacher (softmax)": teacher, "seeded": seeded}
    for stage in (2, 3):
        models[f"after stage {stage}"] = load_model(os.path.join(cfg.run, f"stage{stage}", "model")).float()
    sample = data.multi_sample_at(data.DataConfig(), "test", 0, cfg.index, cfg.n_images, cfg.n_images // 2)
    batch = data.collate([sample])
    row = batch["input_ids"][0].tolist()
    answer_start = batch["answer_mask"][0].nonzero()[0].item()
    query = answer_start - 1                     # the position whose logits give the answer's first token
    object_ids = {data.TOKENIZER.encode(" " + w)[0] for w in data.SHAPES + data.COLOR_NAMES}
    word = max(t for t, i in enumerate(row) if i in object_ids)   # the question's object word
    images = [t for t, i in enumerate(row) if i == data.IMG_CONTEXT_ID]
    maps = {name: attention_maps(m.eval(), batch, heads) for name, m in models.items()}
    fig, axes = plt.subplots(2 * len(heads), len(models), figsize=(4 * len(models), 5.8 * len(heads)),
                             gridspec_kw={"height_ratios": [3, 1.4] * len(heads)})
    for r, (layer, head) in enumerate(heads):
        for c, (name, per_head) in enumerate(maps.items()):
            m = row_scaled(per_head[r][:query + 1, :query + 1]).numpy()
            ax = axes[2 * r, c]
            ax.imshow(m + 1e-6, norm=LogNorm(vmin=1e-4, vmax=1), cmap="magma", interpolation="nearest")
            ax.set_title(f"{name}\nlayer {layer}, head {head}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            line = axes[2 * r + 1, c]
            line.plot(m[word], lw=0.8, label="from the object word")
            line.plot(m[query], lw=0.8, alpha=0.7, label="from the answer position")
            for k in range(cfg.n_images):
                first = images[k * data.IMAGE_TOKENS]
                color = "C2" if k == cfg.n_images // 2 else "grey"    # green: the image asked about
                line.axvspan(first, first + data.IMAGE_TOKENS - 1, color=color, alpha=0.15)
            line.set_yscale("log")
            line.set_ylim(1e-5, 1.5)
            line.set_xlabel("key position (grey: images; green: the one asked about)", fontsize=8)
            if c == 0:
                line.legend(fontsize=7)
    fig.suptitle(f"{sample.question.splitlines()[-1]}  ({cfg.n_images} images, {len(row)} tokens): "
                 f"|attention| per row, scaled to sum 1", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    fig.savefig(cfg.out, dpi=100)
    plt.close(fig)
    print(f"implicit attention: {cfg.out}")
    return cfg.out


if __name__ == "__main__":
    run_main(main)

"""Stage-0 grounding hints: supervised attention that teaches the teacher where to look.

Not part of the paper. mmMamba distils a *trained* VLM (HoVLE); this project must first train its
own tiny teacher (stage 0 of distill.py), and with the answer tokens as the only signal a small
decoder trained from scratch on a 2-core CPU does not learn to find the object a question names
within the time budget (experiments/README.md). HoVLE learns grounding from a vision encoder and
billions of tokens; here four attention heads are told, during stage 0 only, where to look. At
inference the teacher is a plain all-attention model: nothing here runs outside training.

Each role is one attention head and a cross-entropy between its attention row at some query
positions and a target distribution over keys (all in the token positions of data.collate):

    look    layer 2, head 0       from each object word of the question ("circle", "squares", "red",
                                  "text": data.OBJECT_WORDS) to the cells it names
                                  (data.word_cells) and <s>, evenly: <s> is a sink whose share
                                  1/(n+1) says how many cells matched (all of it when none did)
    gather  layer 4, heads 0, 3   from each position that predicts an answer token to the first /
                                  the last object word of the question (what the look head found
                                  there is then one hop away)
    read    layer 5, head 0       text questions: from the position that predicts the k-th glyph of
                                  the answer to the k-th glyph cell (row-major order)

Attention in the right place is not enough: the heads' values must also carry what they found,
and with the answer token as the only signal that was still slow (600 CPU steps with all four
heads on target: answers at chance). So two linear probes (`Probes`, trained with the model and
dropped after stage 0, like the auxiliary cell head) read the residual stream and classify what the
named cells hold (`ATTRIBUTES`: how many, and for a single object its colour, shape, row, column):

    look probe    after the look layer, at each object word: its own cells
    answer probe  after the gather layer, at each position that predicts an answer token: the first
                  and the last object word's cells
    read probe    after the read layer, where the read head has a target: the glyph it reads

The loss of one sample is the sum over roles and probes of the mean over their query positions, so
every sample weighs the same whatever its length; a role with no query position in a sample (no
object word, unknown cells, not a text question) adds nothing.

Run (prints the attention mass each role puts on its targets, per category):
    python grounding.py checkpoints/teacher
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from convert import load_model
from model import Attention, Model, ModelConfig

# token id -> object word; every object word is one token (with its leading space)
WORD_OF_ID = {data.TOKENIZER.encode(" " + w)[0]: w for w in data.OBJECT_WORDS}
assert all(len(data.TOKENIZER.encode(" " + w)) == 1 for w in data.OBJECT_WORDS)


# what the probes classify about a set of named cells: (name, classes); -100 where undefined
ATTRIBUTES = (("count", 6), ("color", len(data.COLORS)), ("shape", len(data.SHAPES)), ("row", 16), ("col", 16))


def attributes(named: list, cells: list, grid: int) -> list:
    """Labels of ATTRIBUTES for the cells `named` (indices into the row-major `cells`): their number
    (capped at 5); colour, shape, row and column when they are exactly one object, else -100."""
    out = [min(len(named), 5)] + [data.IGNORE_INDEX] * 4
    if len(named) == 1 and data.describe_cell(cells[named[0]])[0] == "object":
        _, shape, color = data.describe_cell(cells[named[0]])
        row, col = divmod(named[0], grid)
        out[1:] = [data.COLOR_NAMES.index(color), data.SHAPES.index(shape), min(row, 15), min(col, 15)]
    return out


@dataclass
class GroundingConfig:
    look: tuple[int, int] = (2, 0)          # (layer, head): object word -> the cells it names (+ <s>)
    gather_first: tuple[int, int] = (4, 0)  # (layer, head): answer position -> first object word
    gather_last: tuple[int, int] = (4, 3)   # (layer, head): answer position -> last object word
    read: tuple[int, int] = (5, 0)          # (layer, head): k-th glyph's answer position -> k-th glyph cell

    def __post_init__(self):
        for name, lh in self.roles().items():
            if len(lh) != 2 or not all(isinstance(v, int) and v >= 0 for v in lh):
                raise ValueError(f"{name} must be a (layer, head) pair of ints >= 0, got {lh}")

    def roles(self) -> dict:
        return {"look": self.look, "gather_first": self.gather_first, "gather_last": self.gather_last,
                "read": self.read}

    def check(self, cfg: ModelConfig) -> None:
        """Every role must name a head of an attention layer of the model."""
        for name, (layer, head) in self.roles().items():
            if not (layer < cfg.n_layers and cfg.layers[layer] == "attn" and head < cfg.n_heads):
                raise ValueError(f"grounding role {name} = (layer {layer}, head {head}) must name a head of an "
                                 f"attention layer of the model (layers {cfg.layers}, {cfg.n_heads} heads)")


def targets(batch: dict) -> tuple[dict, dict]:
    """(roles, probes). roles: per role, (target (b, T, T) float, queries (b, T) bool); row t of a
    target is the distribution over keys that query position t should attend to (rows outside
    `queries` are 0). probes: {"look": (labels (b, T, 5), queries), "answer": (labels (b, T, 10), queries),
    "read": (labels (b, T, 1), queries)}: the ATTRIBUTES of the named cells (first then last object
    word for "answer"), the index in data.GLYPHS of the glyph read."""
    ids, labels, cells = batch["input_ids"], batch["labels"], batch["cells"]  # (b, T), (b, T), (b, n)
    b, T = ids.shape
    out = {r: (torch.zeros(b, T, T), torch.zeros(b, T, dtype=torch.bool))
           for r in ("look", "gather_first", "gather_last", "read")}
    n_attr = len(ATTRIBUTES)
    probe = {"look": (torch.full((b, T, n_attr), data.IGNORE_INDEX), torch.zeros(b, T, dtype=torch.bool)),
             "answer": (torch.full((b, T, 2 * n_attr), data.IGNORE_INDEX), torch.zeros(b, T, dtype=torch.bool)),
             "read": (torch.full((b, T, 1), data.IGNORE_INDEX), torch.zeros(b, T, dtype=torch.bool))}
    grid = round(cells.shape[1] ** 0.5)

    def put(role, k, q, keys):
        out[role][0][k, q, keys] = 1.0 / len(keys)
        out[role][1][k, q] = True

    tok = data.TOKENIZER
    for k in range(b):
        row = ids[k].tolist()
        if tok.img_end_id not in row:
            continue
        q0 = row.index(tok.img_end_id)                                  # the question follows </img>
        q1 = row.index(tok.im_end_id, q0)                               # ... up to its <|im_end|>
        words = [(t, WORD_OF_ID[row[t]]) for t in range(q0, q1) if row[t] in WORD_OF_ID]
        answer = (labels[k] != data.IGNORE_INDEX).nonzero().flatten().tolist()  # answer tokens + <|im_end|>
        image = [t for t, i in enumerate(row) if i == tok.img_context_id]       # row-major cells
        known = bool((cells[k] != data.IGNORE_INDEX).all()) and len(image) == cells.shape[1]
        if known:
            row_cells = cells[k].tolist()
            named = [data.word_cells(w, row_cells) for _, w in words]
            for (t, w), cs in zip(words, named):
                put("look", k, t, [0] + [image[c] for c in cs])
                probe["look"][0][k, t] = torch.tensor(attributes(cs, row_cells, grid))
                probe["look"][1][k, t] = True
        if words:
            for t in answer:                                            # logits[t - 1] predicts token t
                put("gather_first", k, t - 1, [words[0][0]])
                put("gather_last", k, t - 1, [words[-1][0]])
                if known:
                    probe["answer"][0][k, t - 1] = torch.tensor(attributes(named[0], row_cells, grid)
                                                                + attributes(named[-1], row_cells, grid))
                    probe["answer"][1][k, t - 1] = True
        if known and [w for _, w in words] == ["text"]:
            glyphs = data.word_cells("text", cells[k].tolist())
            said = tok.decode([row[t] for t in answer[:-1]])
            chars = "".join(data.describe_cell(cells[k, c].item())[1] for c in glyphs)
            if said == chars and len(answer) - 1 == len(glyphs):        # one token per glyph
                for t, c in zip(answer, glyphs):
                    put("read", k, t - 1, [image[c]])
                    probe["read"][0][k, t - 1, 0] = data.GLYPHS.index(data.describe_cell(cells[k, c].item())[1])
                    probe["read"][1][k, t - 1] = True
    return out, probe


def role_probs(model: Model, hidden: list, layer: int, head: int) -> torch.Tensor:
    """Attention map softmax(q_h k^T / sqrt(P)) of query head `head` of layer `layer`, with the
    causal mask, (b, T, T), from the residual stream entering the layer (row t: how token t spreads
    its attention over tokens 0..t)."""
    attn: Attention = model.layers[layer].mixer
    q, k, _ = attn.qkv(model.layers[layer].attention_norm(hidden[layer]))           # (b, H, T, P), (b, Hkv, T, P)
    scores = q[:, head] @ k[:, head // attn.cfg.heads_per_kv].transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32).masked_fill(~causal, float("-inf")).softmax(-1)


class Probes(nn.Module):
    """The three probes: linear maps of the RMS-normalised residual stream to the logits of
    ATTRIBUTES (the answer probe: for the first and the last object word), or of the glyph read."""

    def __init__(self, hidden_size: int):
        super().__init__()
        n = sum(c for _, c in ATTRIBUTES)
        self.look = nn.Linear(hidden_size, n)
        self.answer = nn.Linear(hidden_size, 2 * n)
        self.read = nn.Linear(hidden_size, len(data.GLYPHS))

    def loss(self, name: str, h: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Sum over samples of the mean over queries of the summed CE over attributes.
        h (b, T, D), labels (b, T, n_attr), queries (b, T) bool."""
        logits = getattr(self, name)(F.rms_norm(h.float(), (h.shape[-1],)))  # (b, T, sum of classes)
        labels, queries = labels.to(h.device), queries.to(h.device)
        sizes = [len(data.GLYPHS)] if name == "read" else [n for _, n in ATTRIBUTES] * (labels.shape[-1] // len(ATTRIBUTES))
        ce = 0.0
        for k, part in enumerate(logits.split(sizes, dim=-1)):               # one attribute: (b, T, classes)
            ce = ce + F.cross_entropy(part.transpose(1, 2), labels[..., k], ignore_index=data.IGNORE_INDEX,
                                      reduction="none")                       # (b, T)
        return ((ce * queries).sum(1) / queries.sum(1).clamp_min(1)).sum()


def grounding_loss(model: Model, hidden: list, batch: dict, cfg: GroundingConfig,
                   probes: Probes | None = None) -> torch.Tensor:
    """Sum over samples and roles of the mean over the role's query positions of
    CE(target row, attention row) = -sum_keys target * log p; plus, with `probes`, their loss on
    the residual after the look layer and after the gather layer. `hidden` from
    model(..., return_hidden=True)."""
    total = hidden[0].new_zeros(())
    found, probe = targets(batch)
    if probes is not None:
        for name, layer in (("look", cfg.look[0]), ("answer", max(cfg.gather_first[0], cfg.gather_last[0])),
                            ("read", cfg.read[0])):
            labels, queries = probe[name]
            if queries.any():
                total = total + probes.loss(name, hidden[layer + 1], labels, queries)
    for role, (target, queries) in found.items():
        if not queries.any():
            continue
        layer, head = cfg.roles()[role]
        p = role_probs(model, hidden, layer, head)                          # (b, T, T)
        target = target.to(p.device, p.dtype)
        ce = -(target * p.clamp_min(1e-9).log()).sum(-1)                   # (b, T) per query
        queries = queries.to(p.device)
        n = queries.sum(1)                                                 # (b,)
        total = total + ((ce * queries).sum(1) / n.clamp_min(1)).sum()
    return total


@torch.no_grad()
def attention_on_target(model: Model, batch: dict, cfg: GroundingConfig) -> dict:
    """{role: {category: mean attention mass on the role's target keys}}, a progress measure:
    look's best is n/(n+1) on the cells plus 1/(n+1) on <s>, i.e. 1 in total."""
    _, hidden = model(batch["input_ids"], batch["pixel_values"], return_hidden=True)
    result = {}
    found, _ = targets(batch)
    for role, (target, queries) in found.items():
        layer, head = cfg.roles()[role]
        p = role_probs(model, hidden, layer, head).float()
        mass = (p * (target > 0)).sum(-1)                                  # (b, T)
        per = {}
        for k, cat in enumerate(batch["category"]):
            if queries[k].any():
                per.setdefault(cat, []).append(mass[k][queries[k]].mean().item())
        result[role] = {c: sum(v) / len(v) for c, v in per.items()}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Attention mass of each grounding role on its targets, per category")
    p.add_argument("checkpoint", help="a model folder (config.json + model.safetensors)")
    p.add_argument("--n", type=int, default=140, help="test questions (round-robin over the categories)")
    p.add_argument("--seed", type=int, default=0, help="test split seed")
    args = p.parse_args(argv)
    model = load_model(args.checkpoint).float().eval()
    samples = [data.sample_at(data.DataConfig(), "test", args.seed, i) for i in range(args.n)]
    result = attention_on_target(model, data.collate(samples), GroundingConfig())
    cats = list(data.CATEGORIES)
    print(f"{'role':<14}" + "".join(f"{c:>9}" for c in cats))
    for role, per in result.items():
        print(f"{role:<14}" + "".join(f"{per[c]:9.2f}" if c in per else f"{'-':>9}" for c in cats))


if __name__ == "__main__":
    main()

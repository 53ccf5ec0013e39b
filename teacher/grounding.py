"""Grounding hints: supervised attention that taught the bundled teacher where to look (stage 0).

Not part of the paper. mmMamba distils a *trained* VLM (HoVLE); this project first trains its own
tiny teacher (teacher/train.py), and with the answer tokens as the only signal a small decoder
trained from scratch on a 2-core CPU does not learn, within the time budget, to find the object a
question names (experiments/README.md). So during stage 0 four attention heads are told where to
look; at inference the teacher is a plain all-attention model and nothing here runs.

Each role is one head and a cross-entropy between its attention row at some query positions and a
target distribution over keys (token positions of data.collate):

    look          layer 2, head 0     from each object word of the question (OBJECT_WORDS) to
                                      the cells it names (data.word_cells) and <s>, evenly: <s> is a
                                      sink whose share 1/(n+1) says how many cells matched
    gather_first  layer 4, head 0     from each position that predicts an answer token to the first
    gather_last   layer 4, head 3     / the last object word (what look found is one hop away)
    read          layer 5, head 0     text questions: from the position that predicts the k-th glyph
                                      of the answer to the k-th glyph cell (row-major order)

Attention in the right place was not enough (600 CPU steps with all four heads on target: answers
at chance), so three linear `Probes`, trained with the model and dropped after stage 0, read the
residual stream and classify what the named cells hold (`ATTRIBUTES`): the look probe after the
look layer at each object word (its cells), the answer probe after the gather layer at each answer
position (the first and the last object word's cells), the read probe after the read layer where
the read head has a target (the glyph it reads).

The loss of one sample is the sum over roles and probes of the mean over their query positions, so
every sample weighs the same whatever its length; a role without query positions in a sample (no
object word, unknown cells, not a text question) adds nothing. experiments/grounding_probe.py
prints the attention mass each role puts on its targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import Attention, Model, ModelConfig

# The words by which a question names objects: one attribute each ("circle", "squares", "red"
# as in "the red object"), or "text" for the glyphs. The look head learns to look, from each such
# word, at the cells it names.
OBJECT_WORDS = data.SHAPES + data.PLURALS + data.COLOR_NAMES + ("text",)


def word_cells(word: str, cells: list) -> list[int]:
    """The cells (row-major indices) that an object word names: the objects of that shape (singular
    or plural) or of that colour, or the glyph cells for "text"."""
    if word not in OBJECT_WORDS:
        raise ValueError(f"word must be one of {OBJECT_WORDS}, got {word!r}")
    if word in data.PLURALS:
        word = data.SHAPES[data.PLURALS.index(word)]
    kinds = [data.describe_cell(c) for c in cells]
    if word == "text":
        return [k for k, d in enumerate(kinds) if d[0] == "glyph"]
    return [k for k, d in enumerate(kinds) if d[0] == "object" and word in d[1:]]


WORD_OF_ID = {data.TOKENIZER.encode(" " + w)[0]: w for w in OBJECT_WORDS}   # each is one token, with its space
assert all(len(data.TOKENIZER.encode(" " + w)) == 1 for w in OBJECT_WORDS)

# what the probes classify about a set of named cells: (name, classes); -100 where undefined
ATTRIBUTES = (("count", 6), ("color", len(data.COLORS)), ("shape", len(data.SHAPES)), ("row", 16), ("col", 16))


def attributes(named: list, cells: list, grid: int) -> list:
    """Labels of ATTRIBUTES for the cells `named` (indices into the row-major `cells`): their number
    (capped at 5); colour, shape, row and column when they are exactly one object, else -100."""
    out = [min(len(named), 5)] + [data.IGNORE_INDEX] * 4
    if len(named) == 1 and data.describe_cell(cells[named[0]])[0] == "object":
        _, shape, color = data.describe_cell(cells[named[0]])
        row, col = divmod(named[0] % (grid * grid), grid)          # within its image
        out[1:] = [data.COLOR_NAMES.index(color), data.SHAPES.index(shape), min(row, 15), min(col, 15)]
    return out


@dataclass
class GroundingConfig:
    """The (layer, head) of each role."""
    look: tuple[int, int] = (2, 0)
    gather_first: tuple[int, int] = (4, 0)
    gather_last: tuple[int, int] = (4, 3)
    read: tuple[int, int] = (5, 0)

    def __post_init__(self):
        for name, lh in self.roles().items():
            if len(lh) != 2 or not all(isinstance(v, int) and v >= 0 for v in lh):
                raise ValueError(f"{name} must be a (layer, head) pair of ints >= 0, got {lh}")

    def roles(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, cfg: ModelConfig) -> None:
        """Every role must name a head of an attention layer of the model."""
        for name, (layer, head) in self.roles().items():
            if not (layer < cfg.n_layers and cfg.layers[layer] == "attn" and head < cfg.n_heads):
                raise ValueError(f"grounding role {name} = (layer {layer}, head {head}) must name a head of an "
                                 f"attention layer of the model (layers {cfg.layers}, {cfg.n_heads} heads)")


def targets(batch: dict) -> tuple[dict, dict]:
    """(roles, probes), each {name: (target, queries (b, T) bool)}. A role's target is (b, T, T):
    row t is the distribution over keys that query position t should attend to (0 outside
    `queries`). A probe's target is its labels: look (b, T, 5) and answer (b, T, 10) the ATTRIBUTES
    of the named cells (first then last object word for answer), read (b, T, 1) the index in
    data.GLYPHS of the glyph read."""
    ids, labels, cells = batch["input_ids"], batch["labels"], batch["cells"]  # (b, T), (b, T), (n_img, n)
    (b, T), grid, tok = ids.shape, round(cells.shape[1] ** 0.5), data.TOKENIZER
    image_row = batch["image_row"]                                            # (n_img,): each image's row
    roles = {r: (torch.zeros(b, T, T), torch.zeros(b, T, dtype=torch.bool)) for r in GroundingConfig().roles()}
    probes = {p: (torch.full((b, T, n), data.IGNORE_INDEX), torch.zeros(b, T, dtype=torch.bool))
              for p, n in (("look", len(ATTRIBUTES)), ("answer", 2 * len(ATTRIBUTES)), ("read", 1))}

    def put(role, k, t, keys):
        roles[role][0][k, t, keys] = 1.0 / len(keys)
        roles[role][1][k, t] = True

    def label(probe, k, t, values):
        probes[probe][0][k, t] = torch.tensor(values)
        probes[probe][1][k, t] = True

    for k in range(b):
        row = ids[k].tolist()
        if tok.img_end_id not in row:
            continue
        row_cells = cells[image_row == k].flatten().tolist()           # the row's images, one after another
        q0 = len(row) - 1 - row[::-1].index(tok.img_end_id)             # the question: last </img> .. <|im_end|>
        words = [(t, WORD_OF_ID[row[t]]) for t in range(q0, row.index(tok.im_end_id, q0)) if row[t] in WORD_OF_ID]
        answer = (labels[k] != data.IGNORE_INDEX).nonzero().flatten().tolist()  # answer tokens + <|im_end|>
        image = [t for t, i in enumerate(row) if i == tok.img_context_id]       # row-major cells
        known = data.IGNORE_INDEX not in row_cells and len(image) == len(row_cells)
        named = [word_cells(w, row_cells) for _, w in words] if known else []
        for (t, _), cs in zip(words, named):
            put("look", k, t, [0] + [image[c] for c in cs])
            label("look", k, t, attributes(cs, row_cells, grid))
        for t in answer if words else ():                               # logits[t - 1] predicts token t
            put("gather_first", k, t - 1, [words[0][0]])
            put("gather_last", k, t - 1, [words[-1][0]])
            if known:
                label("answer", k, t - 1, attributes(named[0], row_cells, grid)
                      + attributes(named[-1], row_cells, grid))
        if known and [w for _, w in words] == ["text"]:
            chars = [data.describe_cell(row_cells[c])[1] for c in named[0]]
            if tok.decode([row[t] for t in answer[:-1]]) == "".join(chars) and len(answer) - 1 == len(chars):
                for t, c, ch in zip(answer, named[0], chars):           # one token per glyph
                    put("read", k, t - 1, [image[c]])
                    label("read", k, t - 1, [data.GLYPHS.index(ch)])
    return roles, probes


def role_probs(model: Model, hidden: list, layer: int, head: int) -> torch.Tensor:
    """Attention map softmax(q_h k^T / sqrt(P)) of query head `head` of layer `layer`, with the
    causal mask, (b, T, T), from the residual stream entering the layer (row t: how token t spreads
    its attention over tokens 0..t); float32, or float64 for a float64 model."""
    attn: Attention = model.layers[layer].mixer
    q, k, _ = attn.qkv(model.layers[layer].attention_norm(hidden[layer]))   # (b, H, T, P), (b, Hkv, T, P)
    scores = q[:, head] @ k[:, head // attn.cfg.heads_per_kv].transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    scores = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def _per_sample_mean(ce: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the mean of ce (b, T) over the sample's queries (b, T) bool."""
    return ((ce * queries).sum(1) / queries.sum(1).clamp_min(1)).sum()


class Probes(nn.Module):
    """The three probes: linear maps of the RMS-normalised residual stream to the logits of
    ATTRIBUTES (the answer probe: for the first and the last object word), or of the glyph read."""

    def __init__(self, hidden_size: int):
        super().__init__()
        sizes = [n for _, n in ATTRIBUTES]
        self.sizes = {"look": sizes, "answer": 2 * sizes, "read": [len(data.GLYPHS)]}
        self.look, self.answer, self.read = (nn.Linear(hidden_size, sum(s)) for s in self.sizes.values())

    def loss(self, name: str, h: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Sum over samples of the mean over queries of the summed CE over the labels.
        h (b, T, D), labels (b, T, n_labels), queries (b, T) bool."""
        logits = getattr(self, name)(F.rms_norm(h.float(), (h.shape[-1],)))  # (b, T, sum of classes)
        labels = labels.to(h.device)
        ce = sum(F.cross_entropy(part.transpose(1, 2), labels[..., k], ignore_index=data.IGNORE_INDEX,
                                 reduction="none")                    # one label: (b, T)
                 for k, part in enumerate(logits.split(self.sizes[name], dim=-1)))
        return _per_sample_mean(ce, queries.to(h.device))


def grounding_loss(model: Model, hidden: list, batch: dict, cfg: GroundingConfig,
                   probes: Probes | None = None) -> torch.Tensor:
    """Sum over samples and roles of the mean over the role's query positions of
    CE(target row, attention row) = -sum_keys target * log p; plus, with `probes`, their loss on
    the residual after the look, the gather and the read layer. `hidden` from
    model(..., return_hidden=True)."""
    total = hidden[0].new_zeros(())
    roles, labels = targets(batch)
    if probes is not None:
        after = {"look": cfg.look[0], "answer": max(cfg.gather_first[0], cfg.gather_last[0]), "read": cfg.read[0]}
        for name, (y, queries) in labels.items():
            if queries.any():
                total = total + probes.loss(name, hidden[after[name] + 1], y, queries)
    for role, (target, queries) in roles.items():
        if queries.any():
            p = role_probs(model, hidden, *cfg.roles()[role])               # (b, T, T)
            ce = -(target.to(p.device, p.dtype) * p.clamp_min(1e-9).log()).sum(-1)  # (b, T) per query
            total = total + _per_sample_mean(ce, queries.to(p.device))
    return total

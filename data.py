"""The benchmark: synthetic images and questions (pillow), LLaVA-style JSONL, tokenizer, chat
template, batching, scoring.

The paper (Tables 1, 3-6) scores its students on POPE, MME, TextVQA, GQA, ScienceQA and others.
Those and HoVLE cannot be downloaded here, so this file draws a benchmark with the same skills:

    category  mirrors              example question                             answers
    exist     POPE, MME existence  Is there a circle? / Is there a red object?  yes / no
    count     MME count            How many triangles are there?                0 .. 4
    color     MME color            What color is the square?                    6 colours
    shape     MME / GQA attribute  What shape is the blue object?               5 shapes
    position  GQA, MME position    Is the circle to the left of the cross?      yes / no
    text      TextVQA, MME OCR     What does the text say?                      2-4 glyphs
    reason    ScienceQA / MMBench  Are there more circles than squares?         yes / no

and, with K images in one prompt (not in the paper: a needle among K images, ~66 tokens each,
that stresses a fixed-size state):

    recall    What color is the square? / What shape is the red object?     the only square (red
              object) of all K images is in one of them; the others are ordinary scenes

A scene is a 128 px image cut into an 8 x 8 grid of 16 px cells, each empty, one object (a shape in
a colour) or one glyph (the glyphs of a scene form one word, left to right in one row; row 0 is
the top). With 8 px patches and a 0.5 pixel shuffle every cell is one image token, row-major, and
`cells` (64 ints per image) says what each holds (stage 0's auxiliary target). Answers are drawn
uniformly, independently of the wording, so no question is answerable without the image;
`CHANCE` is the accuracy of guessing.

On disk, LLaVA-style JSONL with images beside it (paths relative to the JSONL's folder):
    {"image": "images/000123.png", "category": "count", "cells": [... 64 ints ...],
     "conversations": [{"from": "human", "value": "<image>\\nHow many circles are there?"},
                       {"from": "gpt", "value": "3"}]}
A multi-image record has a list of paths and one "<image>" tag per image in its first question
(as multi-image LLaVA data): {"image": ["images/a.png", "images/b.png"], "conversations":
[{"from": "human", "value": "<image>\\n<image>\\nWhat color is the square?"}, ...]}.
`load_jsonl` reads these and a user's own file (`cells`, `category` optional; several human / gpt
pairs make a multi-turn sample: every answer is trained on, the last one is scored).

Chat template (HoVLE's InternLM2 format; the answers and their <|im_end|> are trained on):
    <s><|im_start|>user\\n<img><IMG_CONTEXT> x 64</img>\\n{question}<|im_end|><|im_start|>assistant\\n
    {answer}<|im_end|>[<|im_start|>user\\n{question 2}<|im_end|><|im_start|>assistant\\n{answer 2}<|im_end|>]
A question's "<image>" tags become <img><IMG_CONTEXT> x 64</img> in place; without tags the
images come first, each followed by "\\n".

Run:  python data.py --out data/test --n 1400 --seed 0 --split test  # write a test set
      python data.py --out data/multi --n 20 --images 4             # 4 images per prompt
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from utils import InputError, run_main

# ----------------------------------------------------------------------------------------------
# The closed world of the benchmark. These are constants (not config fields) because the
# tokenizer's vocabulary and the cell classes are built from them and must not change with a run.

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = ("circles", "squares", "triangles", "diamonds", "crosses")
COLORS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 100, 240),
          "yellow": (245, 220, 40), "purple": (170, 70, 220), "white": (255, 255, 255)}
COLOR_NAMES = tuple(COLORS)
GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"  # no I/1, O/0, Q: they look alike in a 5 x 7 font
RELATIONS = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("exist", "count", "color", "shape", "position", "text", "reason")
MULTI_CATEGORIES = ("recall",)                          # about one of K images (_gen_recall)

BACKGROUND = (0, 0, 0)                                  # the image
TILE = (190, 190, 190)                                  # the tile behind a glyph
INK = (0, 0, 0)                                         # the glyph
# Cell classes: 0 = empty, then one per (shape, colour), then one per glyph.
N_OBJECT_CLASSES = len(SHAPES) * len(COLORS)
NUM_CELL_CLASSES = 1 + N_OBJECT_CLASSES + len(GLYPHS)  # 62
IGNORE_INDEX = -100  # "unknown" in batched cells and labels (torch cross_entropy's ignore_index)


def object_class(shape: int, color: int) -> int:
    return 1 + shape * len(COLORS) + color


def glyph_class(ch: str) -> int:
    return 1 + N_OBJECT_CLASSES + GLYPHS.index(ch)


def describe_cell(cls: int) -> tuple:
    """Inverse of the two above: ("empty",), ("object", shape, colour) or ("glyph", char)."""
    if cls == 0:
        return ("empty",)
    if cls <= N_OBJECT_CLASSES:
        shape, color = divmod(cls - 1, len(COLORS))
        return ("object", SHAPES[shape], COLOR_NAMES[color])
    return ("glyph", GLYPHS[cls - 1 - N_OBJECT_CLASSES])


# 64: 128 px, 8 px patches, pixel shuffle 0.5: one token per 16 px cell
IMAGE_TOKENS = (128 // 8 // 2) ** 2


@dataclass
class DataConfig:
    """The benchmark's drawing parameters; every caller uses the defaults."""
    image_size: int = 128  # side of the square RGB image in pixels (user images are resized to it)
    cell_size: int = 16  # side of one grid cell in pixels; one cell = one image token
    grid: int = 8  # cells per side: grid * cell_size == image_size
    min_objects: int = 3  # objects drawn per scene, at least (a question may need more)
    max_objects: int = 8  # objects drawn per scene, at most (before what a question needs)
    max_count: int = 4  # count answers are 0 .. max_count; reason compares counts in that range
    text_min_len: int = 2  # shortest word in the `text` category
    text_max_len: int = 4  # longest word in the `text` category
    text_prob: float = 0.3  # chance that a scene of another category also shows a word
    categories: tuple[str, ...] = CATEGORIES  # categories to draw, in round-robin order
    max_images: int = 8  # the training mix's multi-image prompts hold 1 .. max_images images


# A uniform guess, DataConfig().
CHANCE = {"exist": 0.5, "count": 1 / 5, "color": 1 / len(COLORS), "shape": 1 / len(SHAPES),
          "position": 0.5, "text": 1 / sum(len(GLYPHS) ** n for n in (2, 3, 4)), "reason": 0.5,
          "recall": (1 / len(COLORS) + 1 / len(SHAPES)) / 2}


# ----------------------------------------------------------------------------------------------
# Drawing: the image is a pure function of the 64 cell classes.

@lru_cache(maxsize=None)
def _glyph_mask(ch: str, scale: int) -> Image.Image:
    """The glyph in PIL's built-in bitmap font, cropped to a common 6 x 7 box, scaled up crisply."""
    load = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)  # Pillow >= 10.1
    canvas = Image.new("L", (10, 14), 0)
    ImageDraw.Draw(canvas).text((1, 1), ch, fill=255, font=load())
    return canvas.crop((1, 3, 7, 10)).resize((6 * scale, 7 * scale), Image.NEAREST)


def _draw_object(d: ImageDraw.ImageDraw, shape: str, rgb: tuple, x0: int, y0: int, size: int):
    m = size // 8  # inset: objects never touch their cell's border
    l, t = x0 + m, y0 + m                                 # left, top
    r, b = x0 + size - 1 - m, y0 + size - 1 - m           # right, bottom
    cx = (l + r) / 2
    cy = (t + b) / 2
    if shape == "circle":
        d.ellipse((l, t, r, b), fill=rgb)
    elif shape == "square":
        d.rectangle((l + 1, t + 1, r - 1, b - 1), fill=rgb)
    elif shape == "triangle":
        d.polygon([(cx, t), (r, b), (l, b)], fill=rgb)
    elif shape == "diamond":
        d.polygon([(cx, t), (r, cy), (cx, b), (l, cy)], fill=rgb)
    else:  # cross; arms of thickness size // 4
        w = size // 8
        d.rectangle((l, round(cy) - w, r, round(cy) + w - 1), fill=rgb)
        d.rectangle((round(cx) - w, t, round(cx) + w - 1, b), fill=rgb)


def draw_scene(cells: Sequence[int], cfg: DataConfig) -> Image.Image:
    """Draw the RGB image (cfg.image_size square) whose grid cells hold the classes `cells`."""
    size = cfg.cell_size
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    scale = max(1, (size - 2) // 7)
    for i, cls in enumerate(cells):
        kind = describe_cell(cls)
        y0 = (i // cfg.grid) * size
        x0 = (i % cfg.grid) * size
        if kind[0] == "object":
            _draw_object(d, kind[1], COLORS[kind[2]], x0, y0, size)
        elif kind[0] == "glyph":
            d.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), fill=TILE)
            mask = _glyph_mask(kind[1], scale)
            img.paste(INK, (x0 + (size - mask.width) // 2, y0 + (size - mask.height) // 2), mask)
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W). Samples keep uint8 (4x smaller than float)."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels))


def pixel_values(image: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float32 normalised to [-1, 1] (x / 127.5 - 1), the model's input."""
    return image.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Samples and the single-image question generators

@dataclass
class Sample:
    images: torch.Tensor  # uint8 (K, 3, S, S), K >= 1
    turns: list  # [(question, answer), ...]: the human / gpt pairs (see chat_ids for "<image>")
    category: str = "custom"
    cells: list | None = None  # per-cell classes, row-major, image after image; None: unknown
    source: str = ""  # "file:line" for loaded samples, "split/seed/index" for synthetic ones

    @property
    def question(self) -> str:       # the turn that is scored
        return self.turns[-1][0]

    @property
    def answer(self) -> str:
        return self.turns[-1][1]


def _scene(rng: random.Random, cfg: DataConfig, required: list, no_shapes=(), no_colors=(),
           text: str | None = None) -> list[int]:
    """Cells holding the (shape, colour) objects `required`, random other objects of none of the
    shapes `no_shapes` and colours `no_colors`, and optionally the word `text`; every object is a
    distinct (shape, colour) pair."""
    cells = [0] * (cfg.grid * cfg.grid)
    if text is None and rng.random() < cfg.text_prob:
        text = _random_word(rng, cfg)
    if text:
        row = rng.randrange(cfg.grid)
        start = rng.randrange(cfg.grid - len(text) + 1)
        for k, ch in enumerate(text):
            cells[row * cfg.grid + start + k] = glyph_class(ch)
    pool = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))
            if (s, c) not in required and s not in no_shapes and c not in no_colors]
    total = max(len(required), rng.randint(cfg.min_objects, cfg.max_objects))
    objects = list(required) + rng.sample(pool, min(len(pool), total - len(required)))
    free = [i for i in range(len(cells)) if cells[i] == 0]
    for (s, c), i in zip(objects, rng.sample(free, len(objects))):
        cells[i] = object_class(s, c)
    return cells


def _random_word(rng: random.Random, cfg: DataConfig) -> str:
    length = rng.randint(cfg.text_min_len, cfg.text_max_len)
    return "".join(rng.choice(GLYPHS) for _ in range(length))


def _yes_no(flag: bool) -> str:
    return ("no", "yes")[flag]


def _gen_exist(rng, cfg):
    # POPE-style: one object named by its shape or by its colour, present (once) or absent
    yes = rng.random() < 0.5
    if rng.random() < 0.5:
        s = rng.randrange(len(SHAPES))
        required = []
        if yes:
            required = [(s, rng.randrange(len(COLORS)))]
        cells = _scene(rng, cfg, required, no_shapes=(s,))
        return cells, f"Is there a {SHAPES[s]}?", _yes_no(yes)
    c = rng.randrange(len(COLORS))
    required = []
    if yes:
        required = [(rng.randrange(len(SHAPES)), c)]
    cells = _scene(rng, cfg, required, no_colors=(c,))
    return cells, f"Is there a {COLOR_NAMES[c]} object?", _yes_no(yes)


def _gen_count(rng, cfg):
    n = rng.randint(0, cfg.max_count)
    if rng.random() < 0.5:  # count a shape, in distinct colours
        s = rng.randrange(len(SHAPES))
        required = [(s, c) for c in rng.sample(range(len(COLORS)), n)]
        cells = _scene(rng, cfg, required, no_shapes=(s,))
        return cells, f"How many {PLURALS[s]} are there?", str(n)
    c = rng.randrange(len(COLORS))  # count a colour, on distinct shapes
    required = [(s, c) for s in rng.sample(range(len(SHAPES)), n)]
    cells = _scene(rng, cfg, required, no_colors=(c,))
    return cells, f"How many {COLOR_NAMES[c]} objects are there?", str(n)


def _gen_color(rng, cfg):
    s = rng.randrange(len(SHAPES))                    # the only object of shape s
    c = rng.randrange(len(COLORS))
    cells = _scene(rng, cfg, [(s, c)], no_shapes=(s,))
    return cells, f"What color is the {SHAPES[s]}?", COLOR_NAMES[c]


def _gen_shape(rng, cfg):
    s = rng.randrange(len(SHAPES))
    c = rng.randrange(len(COLORS))                    # the only object of colour c
    cells = _scene(rng, cfg, [(s, c)], no_colors=(c,))
    return cells, f"What shape is the {COLOR_NAMES[c]} object?", SHAPES[s]


def _object_name(obj: tuple, by_shape: bool) -> str:
    if by_shape:
        return SHAPES[obj[0]]
    return f"{COLOR_NAMES[obj[1]]} object"


def _gen_position(rng, cfg):
    # two objects, each the only one of its shape (or each the only one of its colour)
    rel = rng.randrange(len(RELATIONS))
    yes = rng.random() < 0.5
    by_shape = rng.random() < 0.5
    if by_shape:
        sa, sb = rng.sample(range(len(SHAPES)), 2)
        a = (sa, rng.randrange(len(COLORS)))
        b = (sb, rng.randrange(len(COLORS)))
        banned = {"no_shapes": (sa, sb)}
    else:
        ca, cb = rng.sample(range(len(COLORS)), 2)
        a = (rng.randrange(len(SHAPES)), ca)
        b = (rng.randrange(len(SHAPES)), cb)
        banned = {"no_colors": (ca, cb)}
    horizontal = rel < 2                               # left of / right of compare columns
    while True:  # redraw until the compared coordinate differs, so the relation is well defined
        cells = _scene(rng, cfg, [a, b], **banned)
        row_col_a = divmod(cells.index(object_class(*a)), cfg.grid)
        row_col_b = divmod(cells.index(object_class(*b)), cfg.grid)
        ka = row_col_a[horizontal]
        kb = row_col_b[horizontal]
        if ka != kb:
            break
    truth = ka > kb                                    # right of / below: larger column / row
    if rel in (0, 2):                                  # left of / above: smaller column / row
        truth = ka < kb
    if truth != yes:  # swapping the two objects' roles flips a strict relation
        a, b = b, a
    question = f"Is the {_object_name(a, by_shape)} {RELATIONS[rel]} the {_object_name(b, by_shape)}?"
    return cells, question, _yes_no(yes)


def _gen_text(rng, cfg):
    word = _random_word(rng, cfg)
    return _scene(rng, cfg, [], text=word), "What does the text say?", word


def _gen_reason(rng, cfg):
    counts = sorted(rng.sample(range(cfg.max_count + 1), 2), reverse=True)   # (more, fewer)
    yes = rng.random() < 0.5
    if not yes:
        counts.reverse()
    if rng.random() < 0.5:  # compare two shapes
        s1, s2 = rng.sample(range(len(SHAPES)), 2)
        colors = [rng.sample(range(len(COLORS)), n) for n in counts]
        required = [(s1, c) for c in colors[0]] + [(s2, c) for c in colors[1]]
        cells = _scene(rng, cfg, required, no_shapes=(s1, s2))
        question = f"Are there more {PLURALS[s1]} than {PLURALS[s2]}?"
    else:  # compare two colours
        c1, c2 = rng.sample(range(len(COLORS)), 2)
        shapes = [rng.sample(range(len(SHAPES)), n) for n in counts]
        required = [(s, c1) for s in shapes[0]] + [(s, c2) for s in shapes[1]]
        cells = _scene(rng, cfg, required, no_colors=(c1, c2))
        question = f"Are there more {COLOR_NAMES[c1]} objects than {COLOR_NAMES[c2]} objects?"
    return cells, question, _yes_no(yes)


GENERATORS = {"exist": _gen_exist, "count": _gen_count, "color": _gen_color, "shape": _gen_shape,
              "position": _gen_position, "text": _gen_text, "reason": _gen_reason}


# ----------------------------------------------------------------------------------------------
# The multi-image generator: K scenes, a question about the one at index `target` (0-based)

def _gen_recall(rng, cfg, n_images: int, target: int):
    # the needle, a (shape, colour) object, is the only one of its shape (or of its colour) in
    # all K images: the question names that attribute and asks for the other
    s = rng.randrange(len(SHAPES))
    c = rng.randrange(len(COLORS))
    if rng.random() < 0.5:
        others = {"no_shapes": (s,)}
        question = f"What color is the {SHAPES[s]}?"
        answer = COLOR_NAMES[c]
    else:
        others = {"no_colors": (c,)}
        question = f"What shape is the {COLOR_NAMES[c]} object?"
        answer = SHAPES[s]
    scenes = [_scene(rng, cfg, [(s, c)] * (k == target), **others) for k in range(n_images)]
    return scenes, question, answer


# ----------------------------------------------------------------------------------------------
# The streams: sample `index` of a split is a pure function of (split, seed, index)

def sample_rng(split: str, seed: int, index: int) -> random.Random:
    """The generator of sample `index`: a pure function of (split, seed, index), so train and test
    never share a stream even with the same seed, and any sample is redrawn without the others."""
    return random.Random(f"{split}/{seed}/{index}")  # str seeds are hashed with SHA-512: stable


def sample_at(cfg: DataConfig, split: str, seed: int, index: int) -> Sample:
    """Sample `index` of a synthetic split (about a millisecond): categories go round-robin."""
    category = cfg.categories[index % len(cfg.categories)]
    cells, question, answer = GENERATORS[category](sample_rng(split, seed, index), cfg)
    image = image_to_tensor(draw_scene(cells, cfg))
    return Sample(image[None], [(question, answer)], category, cells, f"{split}/{seed}/{index}")


def multi_sample_at(cfg: DataConfig, split: str, seed: int, index: int, n_images: int,
                    target: int | None = None) -> Sample:
    """Sample `index` of the multi-image stream (recall) with `n_images` images, the needle in
    image `target` + 1 (None: a uniform draw)."""
    rng = sample_rng(f"{split}-multi-{n_images}", seed, index)
    if target is None:
        target = rng.randrange(n_images)
    scenes, question, answer = _gen_recall(rng, cfg, n_images, target)
    tags = "<image>\n" * n_images                       # one per image, as multi-image LLaVA data
    images = torch.stack([image_to_tensor(draw_scene(cells, cfg)) for cells in scenes])
    cells = [c for scene in scenes for c in scene]
    source = f"{split}-multi-{n_images}/{seed}/{index}"
    return Sample(images, [(tags + question, answer)], "recall", cells, source)


MIX_GROUP = 16   # consecutive samples of the mix share their kind and K: a batch of 16 is one


def mix_sample_at(cfg: DataConfig, split: str, seed: int, index: int) -> Sample:
    """The training mix (--task mix): groups of MIX_GROUP consecutive indices alternate between
    the single-image benchmark and multi-image prompts whose K, uniform in 1 .. cfg.max_images, is
    drawn per group (equal lengths in a batch: little padding)."""
    group = index // MIX_GROUP
    if group % 2 == 0:
        return sample_at(cfg, split, seed, index)
    n_images = sample_rng(f"{split}-mix", seed, group).randint(1, cfg.max_images)
    return multi_sample_at(cfg, split, seed, index, n_images)


# The training streams by name (distill.py --task): index -> Sample, a pure function of (split, seed).
TASKS = {"single": sample_at, "mix": mix_sample_at}


# ----------------------------------------------------------------------------------------------
# Writing and loading LLaVA-style JSONL

class DataError(InputError):
    """Bad input data; the message starts with "file:line:"."""


def write_dataset(out: str | Path, n: int, seed: int = 0, split: str = "train",
                  n_images: int = 1) -> Path:
    """Write samples 0..n-1 of (split, seed) as out/data.jsonl plus out/images/*.png; with
    n_images > 1 the multi-image stream."""
    cfg = DataConfig()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i in tqdm(range(n), desc=f"writing {out / 'data.jsonl'}"):
            if n_images == 1:
                s = sample_at(cfg, split, seed, i)
                human = "<image>\n" + s.question
            else:
                s = multi_sample_at(cfg, split, seed, i, n_images)
                human = s.question
            names = [f"images/{i:06d}_{k}.png" for k in range(n_images)]
            for name, image in zip(names, s.images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / name)
            record = {"id": s.source, "image": names[0] if n_images == 1 else names,
                      "category": s.category, "cells": s.cells,
                      "conversations": [{"from": "human", "value": human},
                                        {"from": "gpt", "value": s.answer}]}
            f.write(json.dumps(record) + "\n")
    return out / "data.jsonl"


def open_image(file: str | Path) -> Image.Image:
    """An image file as RGB; DataError naming the file if it is missing or unreadable."""
    if not Path(file).is_file():
        raise DataError(f"{file}: no such image file")
    try:
        with Image.open(file) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"{file}: cannot read the image ({e})") from None


def load_image(file: str | Path, image_size: int = 128) -> torch.Tensor:
    """An image file as uint8 (3, S, S): RGB, resized (bicubic, aspect ratio not kept) to image_size."""
    im = open_image(file)
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    return image_to_tensor(im)


def _record_pairs(rec, where: str) -> list:
    """The (question, answer) pairs of a record's conversations, in order."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: expected an object whose 'conversations' is a list of "
                        f'{{"from": ..., "value": ...}} objects')
    pairs = []
    question = None
    for t in turns:
        role = str(t.get("from", "")).lower()
        value = str(t.get("value", "")).strip()
        if role in ("human", "user"):
            question = value
        elif role in ("gpt", "assistant") and question is not None and value:
            pairs.append((question, value))
            question = None
    if not pairs:
        raise DataError(f"{where}: no question with an answer (a 'human' turn followed by a 'gpt' turn)")
    return pairs


def load_jsonl(path: str | Path, image_size: int = 128) -> list[Sample]:
    """Read a LLaVA-style JSONL file (the format above; one image's "<image>" tag is dropped, the
    template puts it first). A bad record or an empty file raises DataError naming the file (line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    samples = []
    for lineno, raw in enumerate(open(path, "rb"), 1):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: malformed JSON or not UTF-8 ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        pairs = _record_pairs(rec, where)
        files = rec.get("image")
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise DataError(f"{where}: record has no 'image' path (a string or a list of strings)")
        tags = pairs[0][0].count("<image>")
        if len(files) == 1:
            pairs[0] = (pairs[0][0].replace("<image>\n", "").replace("<image>", "").strip(), pairs[0][1])
        elif tags not in (0, len(files)):
            raise DataError(f"{where}: {tags} '<image>' tags for {len(files)} images")
        cells = rec.get("cells")
        n_cells = IMAGE_TOKENS * len(files)
        if cells is not None and not (isinstance(cells, list) and len(cells) == n_cells and all(
                type(x) is int and (0 <= x < NUM_CELL_CLASSES or x == IGNORE_INDEX) for x in cells)):
            raise DataError(f"{where}: 'cells' must be {n_cells} ints in [0, {NUM_CELL_CLASSES}) or -100")
        try:
            images = torch.stack([load_image(path.parent / f, image_size) for f in files])
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        samples.append(Sample(images, pairs, str(rec.get("category", "custom")), cells, where))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


# ----------------------------------------------------------------------------------------------
# Tokenizer

SPECIALS = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
WORDS = ("yes no is there a an the how many are what color shape object objects does text say "
         "more than to left right of above below in image user assistant").split()
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s")


class Tokenizer:
    """Word level over the benchmark's closed vocabulary, with a fallback, so that any text encodes
    and decode(encode(s)) == s. Text is cut into pieces (a word, a digit or a punctuation mark with
    its leading space, or one whitespace character); a known piece is one token, else each
    character is (a known one, else its UTF-8 bytes: 256 byte tokens). Special tokens are only
    inserted by the template; their spelling inside text is ordinary text."""

    def __init__(self):
        names = WORDS + list(SHAPES + PLURALS + COLOR_NAMES)
        words = [p for w in names for p in (w, " " + w, w.capitalize())]
        marks = [p for ch in "0123456789?.,:!'-()" for p in (ch, " " + ch)]
        pieces = list(dict.fromkeys(words + marks + list(GLYPHS) + [" ", "\n"]))
        self.specials = list(SPECIALS)
        self.vocab = self.specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
        self.piece_to_id = {p: len(self.specials) + 256 + k for k, p in enumerate(pieces)}
        self.id_to_piece = {i: p for p, i in self.piece_to_id.items()}
        self.pad_id = SPECIALS.index("<pad>")
        self.bos_id = SPECIALS.index("<s>")
        self.im_start_id = SPECIALS.index("<|im_start|>")
        self.im_end_id = SPECIALS.index("<|im_end|>")
        self.img_start_id = SPECIALS.index("<img>")
        self.img_end_id = SPECIALS.index("</img>")
        self.img_context_id = SPECIALS.index("<IMG_CONTEXT>")
        self.eos_id = self.im_end_id                   # generation stops here
        self.vocab_size = len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _PIECE.findall(text):
            if piece in self.piece_to_id:
                ids.append(self.piece_to_id[piece])
                continue
            for ch in piece:
                if ch in self.piece_to_id:
                    ids.append(self.piece_to_id[ch])
                else:
                    ids += [len(SPECIALS) + b for b in ch.encode()]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        out = []
        buf = bytearray()
        first = len(SPECIALS)
        for i in map(int, list(ids) + [-1]):            # -1: flush the bytes at the end
            if first <= i < first + 256:
                buf.append(i - first)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if 0 <= i < first and not skip_special:
                out.append(SPECIALS[i])
            elif i >= first + 256:
                if i not in self.id_to_piece:
                    raise ValueError(f"token id {i} out of range (vocab_size {self.vocab_size})")
                out.append(self.id_to_piece[i])
        return "".join(out)


TOKENIZER = Tokenizer()
VOCAB_SIZE = TOKENIZER.vocab_size
IMG_CONTEXT_ID = TOKENIZER.img_context_id


# ----------------------------------------------------------------------------------------------
# Chat template and batching

def _user_ids(question: str, n_images: int, n_image_tokens: int) -> list[int]:
    """The first question's ids: each "<image>" tag becomes an image, else the images come first."""
    tok = TOKENIZER
    image = [tok.img_start_id] + [tok.img_context_id] * n_image_tokens + [tok.img_end_id]
    if "<image>" not in question:
        return (image + tok.encode("\n")) * n_images + tok.encode(question)
    parts = question.split("<image>")
    if len(parts) - 1 != n_images:
        raise ValueError(f"the question has {len(parts) - 1} '<image>' tags for {n_images} images")
    ids = tok.encode(parts[0])
    for part in parts[1:]:
        ids += image + tok.encode(part)
    return ids


def chat_ids(turns: Sequence, n_image_tokens: int = IMAGE_TOKENS, last_answer: bool = True,
             n_images: int = 1) -> tuple:
    """The template's token ids of (question, answer) turns, the images in the first, and a mask
    that is True on the answer tokens and their <|im_end|>. last_answer=False leaves the last
    answer out: the prompt that generation continues."""
    tok = TOKENIZER
    ids = [tok.bos_id]
    mask = [False]
    for k, (question, answer) in enumerate(turns):
        text = tok.encode(question)
        if k == 0:
            text = _user_ids(question, n_images, n_image_tokens)
        user = [tok.im_start_id] + tok.encode("user\n") + text
        user += [tok.im_end_id, tok.im_start_id] + tok.encode("assistant\n")
        ids += user
        mask += [False] * len(user)
        if last_answer or k < len(turns) - 1:
            reply = tok.encode(answer) + [tok.im_end_id]
            ids += reply
            mask += [True] * len(reply)
    return ids, mask


def collate(samples: Sequence[Sample]) -> dict:
    """A batch for teacher forcing, right-padded with pad_id: input_ids (b, T) long, attention_mask
    (b, T) bool, answer_mask (b, T) bool (True on the answer tokens and their <|im_end|>), labels
    (b, T) long (input_ids on the answers, -100 elsewhere; NOT shifted: logits[:, t] predict
    labels[:, t + 1]), pixel_values (n_img, 3, S, S) float in [-1, 1] (the samples' images in
    order), image_row (n_img,) long (the row of each image), cells (n_img, 64) long (-100 where
    unknown), category (list of str)."""
    encoded = [chat_ids(s.turns, n_images=len(s.images)) for s in samples]
    T = max(len(ids) for ids, _ in encoded)
    b = len(samples)
    input_ids = torch.full((b, T), TOKENIZER.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, T, dtype=torch.bool)
    answer_mask = torch.zeros(b, T, dtype=torch.bool)
    for k, (ids, mask) in enumerate(encoded):
        input_ids[k, :len(ids)] = torch.tensor(ids)
        attention_mask[k, :len(ids)] = True
        answer_mask[k, :len(ids)] = torch.tensor(mask)
    images = torch.cat([s.images for s in samples])                       # (n_img, 3, S, S)
    cells = torch.full((len(images), IMAGE_TOKENS), IGNORE_INDEX, dtype=torch.long)
    image_row = torch.cat([torch.full((len(s.images),), k) for k, s in enumerate(samples)])
    first = 0
    for s in samples:
        if s.cells is not None:
            cells[first:first + len(s.images)] = torch.tensor(s.cells).view(-1, IMAGE_TOKENS)
        first += len(s.images)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
            "labels": input_ids.masked_fill(~answer_mask, IGNORE_INDEX),
            "pixel_values": pixel_values(images), "image_row": image_row, "cells": cells,
            "category": [s.category for s in samples]}


# ----------------------------------------------------------------------------------------------
# Scoring

def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lowercase, collapse whitespace, drop a trailing full stop."""
    return " ".join(text.lower().split()).rstrip(".").strip()


@torch.no_grad()
def score(generate, samples: Sequence[Sample], batch_size: int = 32,
          max_new_tokens: int | None = None, progress: bool = False) -> dict:
    """Greedy generation and exact match of the last turn's answer; accuracy per category.
    generate(input_ids (b, T), pixel_values (n_img, 3, S, S), max_new_tokens, eos_id) -> new
    tokens (b, T'), each row cut at its first eos_id. Prompts are batched by equal length (no
    padding). Returns {"accuracy": {category: acc}, "n": {category: count}, "mean": macro mean,
    "predictions": [str]}."""
    if not samples:
        raise ValueError("no samples to score")
    tok = TOKENIZER
    if max_new_tokens is None:
        max_new_tokens = max(len(tok.encode(s.answer)) for s in samples) + 1
    prompts = [chat_ids(s.turns, last_answer=False, n_images=len(s.images))[0] for s in samples]
    by_length = defaultdict(list)
    for k, p in enumerate(prompts):
        by_length[len(p)].append(k)
    batches = [ks[i:i + batch_size] for ks in by_length.values() for i in range(0, len(ks), batch_size)]
    predictions = [""] * len(samples)
    for idx in tqdm(batches, desc="scoring", disable=not progress):
        pixels = pixel_values(torch.cat([samples[k].images for k in idx]))
        new = generate(torch.tensor([prompts[k] for k in idx]), pixels, max_new_tokens, tok.eos_id)
        for k, row in zip(idx, new.tolist()):
            row.append(tok.eos_id)                          # cut at the first eos
            predictions[k] = tok.decode(row[:row.index(tok.eos_id)], skip_special=True)
    hits = Counter()
    counts = Counter()
    for s, p in zip(samples, predictions):
        counts[s.category] += 1
        hits[s.category] += normalize_answer(p) == normalize_answer(s.answer)
    known = CATEGORIES + MULTI_CATEGORIES
    order = [c for c in known if c in counts] + sorted(set(counts) - set(known))
    accuracy = {c: hits[c] / counts[c] for c in order}
    return {"accuracy": accuracy, "n": {c: counts[c] for c in order},
            "mean": sum(accuracy.values()) / len(accuracy), "predictions": predictions}


def _percent(x: float | None) -> str:
    if x is None:
        return f"{'-':>9}"
    return f"{100 * x:8.1f}%"


def format_table(results: dict, chance: dict[str, float] = CHANCE) -> str:
    """One column per `score` result ({name: result}), one row per category, chance beside each."""
    cats = list(dict.fromkeys(c for r in results.values() for c in r["accuracy"]))
    lines = [f"{'category':<10}{'n':>6}{'chance':>9}" + "".join(f" {n[:13]:>13}" for n in results)]
    for c in cats:
        n = next(r["n"][c] for r in results.values() if c in r["n"])
        row = "".join(f" {_percent(r['accuracy'].get(c)):>13}" for r in results.values())
        lines.append(f"{c:<10}{n:>6}{_percent(chance.get(c))}" + row)
    known = [chance[c] for c in cats if c in chance]
    mean_chance = None
    if known:
        mean_chance = sum(known) / len(known)
    total = sum(next(iter(results.values()))["n"].values())
    means = "".join(f" {_percent(r['mean']):>13}" for r in results.values())
    return "\n".join(lines + [f"{'mean':<10}{total:>6}{_percent(mean_chance)}" + means])


def main(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description="Write the benchmark as LLaVA-style JSONL and PNGs.")
    p.add_argument("--out", required=True, help="folder for data.jsonl and images/")
    p.add_argument("--n", type=int, default=1400, help="number of samples (categories round-robin)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--split", choices=("train", "test"), default="train", help="disjoint streams")
    p.add_argument("--images", type=int, default=1, help="images per prompt (> 1: multi-image)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise InputError(f"--n {args.n}: must be at least 1")
    if args.images < 1:
        raise InputError(f"--images {args.images}: must be at least 1")
    path = write_dataset(args.out, args.n, args.seed, args.split, n_images=args.images)
    print(f"wrote {args.n} samples to {path}")


if __name__ == "__main__":
    run_main(main)

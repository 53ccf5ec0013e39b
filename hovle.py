"""What a HoVLE or mmMamba folder needs to answer a question: its tokenizer, image tiles and chat
template. Not part of the paper's method: the released models (Sec. 4.1: HoVLE-2.6B, mmMamba-linear,
mmMamba-hybrid) take their input this way, and ask.py needs it to ask them anything: `Tokenizer`
(InternLM2's SentencePiece tokenizer.model, through `sentencepiece`, the library made for that
format), `tiles` (InternVL's dynamic preprocessing), `chat_prompt` (the "internlm2-chat" template).
Official code, REPO = https://github.com/hustvl/mmMamba/blob/85143d03b62a8f8279ef8d019dc01a94674256fb:
the tokenizer REPO/internvl/model/internlm2/tokenization_internlm2.py#L34-L186, the tiles
REPO/eval/mmMamba.py#L26-L104 (as docs/usage.md), the prompt REPO/hovle/modeling_internvl_chat.py#L349-L406
with the template REPO/hovle/conversation.py#L239-L248 and #L741-L756.

Run:   python ask.py HOVLE_OR_MMMAMBA_DIR picture.jpg "Describe the image."
Tests: python -m pytest -q tests/test_released.py
"""
from __future__ import annotations

import os
import re

import numpy as np
import sentencepiece
import torch
from PIL import Image

from utils import InputError, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"   # conversation.py#L745
          "英文名叫InternVL, 是一个有用无害的人工智能助手。")
TEMPLATE = "internlm2-chat"                                  # config.json "template" of HoVLE
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")


class Tokenizer:
    """InternLM2's tokenizer as transformers' slow InternLM2Tokenizer runs it: the text is cut at
    the folder's special tokens (added_tokens.json, tokenizer_config.json's added_tokens_decoder and
    special_tokens_map.json: <s>, <|im_start|>, <|im_end|>, <img>, <IMG_CONTEXT>, ...), which become
    their ids; SentencePiece encodes each piece between them; encode() prepends <s> (add_bos_token).
    decode() drops the special ids (and any without a piece) and lets SentencePiece join the rest."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "tokenizer.model")
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file (a HoVLE / mmMamba folder has one)")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{path}: not a SentencePiece model ({e})") from e
        self.specials = {}                                   # text -> id
        for tokens in _special_tokens(directory):
            for text, i in tokens.items():
                if i is None:                                # special_tokens_map.json: by name
                    i = self.specials.get(text, self.sp.piece_to_id(text))
                self.specials[text] = int(i)
        for text in CHAT_TOKENS:                             # listed, or SentencePiece pieces
            if text not in self.specials and self.sp.piece_to_id(text) == self.sp.unk_id():
                raise InputError(f"{directory}: the tokenizer has no token {text!r}")
            self.specials.setdefault(text, self.sp.piece_to_id(text))
        controls = {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()}
        self.special_ids = set(self.specials.values()) | controls
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self.bos_id = self.sp.bos_id()
        self.vocab_size = max([self.sp.get_piece_size() - 1, *self.specials.values()]) + 1

    def encode(self, text: str) -> list[int]:
        """<s>, then the ids of `text`."""
        ids = [self.bos_id]
        for piece in self.split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def decode(self, ids) -> str:
        """The text of `ids`, special ids left out."""
        pieces = range(self.sp.get_piece_size())
        return self.sp.decode([i for i in map(int, ids) if i in pieces and i not in self.special_ids])


def _special_tokens(directory: str) -> list:
    """{text: id or None} from each file a transformers tokenizer folder lists tokens in."""
    added = _read(os.path.join(directory, "added_tokens.json"))
    config = _read(os.path.join(directory, "tokenizer_config.json"))
    decoder = config.get("added_tokens_decoder", {})
    tokens = []
    for value in _read(os.path.join(directory, "special_tokens_map.json")).values():
        for t in value if isinstance(value, list) else [value]:
            tokens.append(t["content"] if isinstance(t, dict) else t)
    return [added, {v["content"]: int(k) for k, v in decoder.items()}, dict.fromkeys(tokens)]


def _read(path: str) -> dict:
    """A JSON object, or {} if the file is absent."""
    if not os.path.isfile(path):
        return {}
    return read_json(path)


def grid(width: int, height: int, size: int, max_tiles: int) -> tuple:
    """(columns, rows) of the tiles: among the grids of <= max_tiles tiles, the one whose aspect
    ratio is nearest width / height; a tie goes to the later grid in the official candidate order
    (a set sorted by tile count) if the image has over half the pixels of that grid."""
    candidates = {(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1)
                  for j in range(1, n + 1) if i * j <= max_tiles}
    best = (1, 1)
    best_diff = float("inf")
    for cols, rows in sorted(candidates, key=lambda g: g[0] * g[1]):
        diff = abs(width / height - cols / rows)
        larger_wins = diff == best_diff and width * height > 0.5 * size * size * cols * rows
        if diff < best_diff or larger_wins:
            best = (cols, rows)
            best_diff = min(diff, best_diff)
    return best


def tiles(image: Image.Image, size: int = 448, max_tiles: int = 6) -> torch.Tensor:
    """(n, 3, size, size) float32: the image resized (bicubic, as PIL's default) to the grid's
    columns x rows tiles, cut row by row, then (if there is more than one tile) the whole image as
    a thumbnail; values (x / 255 - mean) / std with ImageNet's mean and std."""
    image = image.convert("RGB")
    cols, rows = grid(image.width, image.height, size, max_tiles)
    resized = image.resize((cols * size, rows * size), Image.BICUBIC)
    crops = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if len(crops) > 1:
        crops.append(image.resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def chat_prompt(question: str, n_image_tokens: int) -> str:
    """HoVLE's chat() prompt for one question about one image (n_image_tokens <IMG_CONTEXT> in all):
    the "internlm2-chat" template (system, user, then the assistant's turn left open), the question
    after "<image>\\n", and <image> replaced by <img> <IMG_CONTEXT> x n_image_tokens </img>."""
    image = "<img>" + "<IMG_CONTEXT>" * n_image_tokens + "</img>"
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>"
            f"<|im_start|>user\n{image}\n{question}<|im_end|>"
            f"<|im_start|>assistant\n")


def check_template(directory: str) -> None:
    """HoVLE's template is chat_prompt's; another config.json "template" is an error."""
    path = os.path.join(directory, "config.json")
    template = _read(path).get("template", TEMPLATE)
    if template != TEMPLATE:
        raise InputError(f"{path}: key 'template' = {template!r} is not supported ({TEMPLATE!r} is)")

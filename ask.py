"""Ask a model about an image: the first thing one does with a vision-language model.

Two kinds of folder, told apart by the tokenizer.model a HoVLE / mmMamba folder holds:
  - this project's checkpoints (the teacher, linear or hybrid students): data.py's tokenizer and
    chat template, the image (any size) resized to the model's (128 px) as data.py's loader does;
  - HoVLE, mmMamba-linear, mmMamba-hybrid (the paper's teacher and its released students, or a
    student exported with `convert.py --mmmamba`): their own tokenizer, InternVL's 448 px tiles and
    thumbnail, HoVLE's chat template (hovle.py); up to --max-tiles tiles (6: VLMEvalKit's default
    for most benchmarks in eval/mmMamba.py; every tile is 256 more prompt tokens).
Prints the answer (greedy, or sampled with --temperature) and the speed. On a CPU in float32, or
--dtype bfloat16: a 2.6B-parameter model needs about 10.2 GB, or 5.1 GB.

Run:  python ask.py checkpoints/teacher picture.png "What color is the square?"
      python ask.py path/to/mmMamba-linear photo.jpg "Describe the image." --dtype bfloat16
      python data.py --out data/test --n 14 --split test     # pictures with known answers
Tests: python -m pytest -q tests/test_ask.py tests/test_released.py
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import torch

import data
import hovle
from convert import load_model
from model import Model
from utils import InputError, run_main


def ours(model: Model, folder: str, image_file: str, question: str) -> tuple:
    """(prompt ids, pixel values, eos id, decode) with data.py's tokenizer and template."""
    cfg = model.cfg
    if cfg.vocab_size != data.VOCAB_SIZE or cfg.img_context_id != data.IMG_CONTEXT_ID:
        raise InputError(f"{folder}: its vocabulary ({cfg.vocab_size} tokens) is not data.py's "
                         f"tokenizer's ({data.VOCAB_SIZE}), and the folder has no tokenizer.model")
    image = data.load_image(image_file, cfg.image_size)
    ids, _ = data.chat_ids([(question, "")], n_image_tokens=cfg.image_tokens, last_answer=False)
    decode = functools.partial(data.TOKENIZER.decode, skip_special=True)
    return ids, data.pixel_values(image[None]), data.TOKENIZER.eos_id, decode


def released(model: Model, tok: hovle.Tokenizer, folder: str, image_file: str, question: str,
             max_tiles: int) -> tuple:
    """(prompt ids, pixel values, eos id, decode) as HoVLE's chat() builds them (hovle.py)."""
    cfg = model.cfg
    image_id = tok.specials["<IMG_CONTEXT>"]
    if tok.vocab_size > cfg.vocab_size or image_id != cfg.img_context_id:
        raise InputError(f"{folder}: its tokenizer ({tok.vocab_size} ids, <IMG_CONTEXT> {image_id}) does "
                         f"not fit config.json ({cfg.vocab_size} ids, <IMG_CONTEXT> {cfg.img_context_id})")
    pixels = hovle.tiles(data.open_image(image_file), cfg.image_size, max_tiles)
    ids = tok.encode(hovle.chat_prompt(question, cfg.image_tokens * len(pixels)))
    return ids, pixels, tok.specials["<|im_end|>"], lambda new: tok.decode(new).strip()  # as chat()


@torch.no_grad()
def answer(model: Model, ids: list, pixels: torch.Tensor, eos_id: int, max_new_tokens: int = 32,
           temperature: float = 0.0, seed: int = 0) -> tuple:
    """(new token ids up to eos, their number, prefill seconds, decode seconds). The prompt but its
    last token is prefilled (timed alone), then model.generate runs on from that token."""
    prompt = torch.tensor([ids])
    generator = torch.Generator().manual_seed(seed)
    cache = model.new_cache(capacity=len(ids) + max_new_tokens)
    t0 = time.perf_counter()
    model.prefill(prompt[:, :-1], pixels, cache)
    t1 = time.perf_counter()
    new = model.generate(prompt[:, -1:], None, max_new_tokens, eos_id, temperature, generator, cache=cache)
    decode_s = time.perf_counter() - t1
    new = new[0].tolist()
    n = len(new)
    if eos_id in new:
        new = new[:new.index(eos_id)]
    return new, n, t1 - t0, decode_s


def main(argv=None):
    p = argparse.ArgumentParser(description="Ask a checkpoint a question about an image.")
    p.add_argument("checkpoint", help="a folder: ours (teacher, student) or HoVLE / mmMamba")
    p.add_argument("image", help="an image file (any size and format pillow reads)")
    p.add_argument("question", help='e.g. "What color is the square?"')
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="of the sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights")
    p.add_argument("--max-tiles", type=int, default=6, help="HoVLE / mmMamba: 448 px tiles at most")
    args = p.parse_args(argv)
    is_released = os.path.isfile(os.path.join(args.checkpoint, "tokenizer.model"))
    if is_released:                         # checked before the weights (GBs) are read
        hovle.check_template(args.checkpoint)
        tok = hovle.Tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, dtype=getattr(torch, args.dtype)).eval()
    if is_released:
        prompt = released(model, tok, args.checkpoint, args.image, args.question, args.max_tiles)
    else:
        prompt = ours(model, args.checkpoint, args.image, args.question)
    ids, pixels, eos_id, decode = prompt
    new, n, prefill_s, decode_s = answer(model, ids, pixels, eos_id, args.max_new_tokens,
                                         args.temperature, args.seed)
    text = decode(new)
    print(text)
    n_attn = model.cfg.layers.count("attn")
    print(f"({n} tokens in {decode_s:.2f} s: {n / decode_s:.1f} tokens/s; prompt {len(ids)} tokens in "
          f"{prefill_s:.2f} s; {n_attn} of {model.cfg.n_layers} layers attention, {args.dtype})")
    return text


if __name__ == "__main__":
    run_main(main)

"""Ask a model about an image: the first thing one does with a vision-language model.

Loads any checkpoint folder this project reads (the teacher, a linear or hybrid student), puts the
image (any size: resized as data.py's loader does) and the question into the chat template of
data.py, and prints the answer (greedy, or sampled with --temperature) and the decoding speed.
The tokenizer is data.py's, so the checkpoint must use its vocabulary (all of this project's do).

Run:  python ask.py checkpoints/teacher picture.png "What color is the square?"
      python data.py --out data/test --n 14 --split test     # pictures with known answers
"""
from __future__ import annotations

import argparse
import time

import torch

import data
from convert import load_model
from model import Model
from utils import InputError, run_main


@torch.no_grad()
def ask(model: Model, image: torch.Tensor, question: str, max_new_tokens: int = 32, temperature: float = 0.0,
        seed: int = 0) -> tuple:
    """(answer, number of new tokens, seconds) for a uint8 (3, S, S) image and a question."""
    ids, _ = data.chat_ids([(question, "")], n_image_tokens=model.cfg.image_tokens, last_answer=False)
    t0 = time.perf_counter()
    new = model.generate(torch.tensor([ids]), data.pixel_values(image[None]), max_new_tokens, data.TOKENIZER.eos_id,
                         temperature, torch.Generator().manual_seed(seed))[0].tolist()
    seconds = time.perf_counter() - t0
    answer = new[:new.index(data.TOKENIZER.eos_id)] if data.TOKENIZER.eos_id in new else new
    return data.TOKENIZER.decode(answer, skip_special=True), len(new), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description="Ask a checkpoint a question about an image.")
    p.add_argument("checkpoint", help="a checkpoint folder (teacher, linear or hybrid student)")
    p.add_argument("image", help="an image file (any size and format pillow reads)")
    p.add_argument("question", help='e.g. "What color is the square?"')
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="of the sampling")
    args = p.parse_args(argv)
    model = load_model(args.checkpoint).float().eval()
    if model.cfg.vocab_size != data.VOCAB_SIZE or model.cfg.img_context_id != data.IMG_CONTEXT_ID:
        raise InputError(f"{args.checkpoint}: its vocabulary ({model.cfg.vocab_size} tokens) is not data.py's "
                         f"tokenizer's ({data.VOCAB_SIZE}); ask needs the tokenizer the model was trained with")
    image = data.load_image(args.image, model.cfg.image_size)
    answer, n, seconds = ask(model, image, args.question, args.max_new_tokens, args.temperature, args.seed)
    print(answer)
    print(f"({n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s; {model.cfg.layers.count('attn')} of "
          f"{model.cfg.n_layers} layers attention)")
    return answer


if __name__ == "__main__":
    run_main(main)

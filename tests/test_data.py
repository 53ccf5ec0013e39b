"""Tests of data.py: the synthetic benchmark, JSONL loading, tokenizer, template, batching, scoring."""
import json
import random
import re
from collections import Counter

import pytest
import torch
from PIL import Image

import data
from data import (CATEGORIES, COLOR_NAMES, GENERATORS, IMAGE_TOKENS, NUM_CELL_CLASSES, PLURALS,
                  SHAPES, TOKENIZER, DataConfig, DataError, Sample, chat_ids, collate, describe_cell,
                  draw_scene, image_to_tensor, load_jsonl, sample_at, sample_rng, score)
from teacher import grounding

CFG = DataConfig()


def image_key(uint8_image):
    return uint8_image.numpy().tobytes()


def oracle(samples, answer=lambda s: s.answer):
    """A stub generate(): finds the sample from the prompt's question and the pixels, answers it
    correctly, then keeps emitting junk after <|im_end|> (which scoring must cut off)."""
    table = {(s.question.split("<image>\n")[-1], image_key(s.images)): answer(s) for s in samples}

    def generate(input_ids, pixel_values, max_new_tokens, eos_id):
        assert input_ids.dtype == torch.long and pixel_values.shape[1:] == (3, 128, 128)
        assert pixel_values.min() >= -1 and pixel_values.max() <= 1
        rows = []
        first = 0
        for ids in input_ids.tolist():
            text = TOKENIZER.decode(ids)
            question = text.split("<|im_start|>user\n")[-1].split("</img>\n")[-1].split("<|im_end|>")[0]
            n_images = ids.count(data.IMG_CONTEXT_ID) // IMAGE_TOKENS
            px = pixel_values[first:first + n_images]
            first += n_images
            uint8 = ((px + 1) * 127.5).round().to(torch.uint8)
            out = TOKENIZER.encode(table[(question, image_key(uint8))]) + [eos_id]
            out = (out + TOKENIZER.encode(" junk junk junk junk"))[:max_new_tokens]
            rows.append(out + [eos_id] * (max_new_tokens - len(out)))
        return torch.tensor(rows)
    return generate


def garbage(input_ids, pixel_values, max_new_tokens, eos_id):
    return torch.tensor([TOKENIZER.encode("zzz")] * len(input_ids))


def test_constants_and_config():
    assert IMAGE_TOKENS == 64 == CFG.grid * CFG.grid
    assert NUM_CELL_CLASSES == 1 + len(SHAPES) * len(COLOR_NAMES) + len(data.GLYPHS)
    assert set(data.CHANCE) == set(CATEGORIES) | {"recall"} and max(data.CHANCE.values()) <= 0.5


def test_cli_jsonl_round_trips(tmp_path, capsys):
    data.main(["--out", str(tmp_path), "--n", "16", "--seed", "3"])
    assert "wrote 16 samples" in capsys.readouterr().out
    loaded = load_jsonl(tmp_path / "data.jsonl")
    assert len(loaded) == 16 and len(list((tmp_path / "images").glob("*.png"))) == 16
    for i, s in enumerate(loaded):
        ref = sample_at(CFG, "train", 3, i)
        assert (s.question, s.answer, s.category, s.cells) == \
               (ref.question, ref.answer, ref.category, ref.cells)
        assert s.source.endswith(f"data.jsonl:{i + 1}")
        assert torch.equal(s.images, ref.images)
        assert torch.equal(s.images[0], image_to_tensor(draw_scene(s.cells, CFG)))
    assert [s.category for s in loaded[:7]] == list(CATEGORIES)


def write_hand_dataset(root):
    """A user's own LLaVA-style data: own PNGs of other sizes, no `cells`, no `category`."""
    (root / "pics").mkdir()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(root / "pics" / "red.png")
    Image.new("L", (200, 200), 128).save(root / "pics" / "grey.png")
    Image.new("RGBA", (128, 128), (0, 0, 255, 255)).save(root / "blue.png")
    records = [
        {"image": "pics/red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour fills this picture?"},
            {"from": "gpt", "value": "Red"}]},
        {"image": "pics/grey.png", "conversations": [  # no <image> placeholder, extra turns
            {"from": "human", "value": "Is the picture grey?"}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"image": str(root / "blue.png"), "category": "mine", "conversations": [  # absolute path
            {"from": "human", "value": "Décris l'image <image>"},
            {"from": "gpt", "value": "bleu uni"}]},
    ]
    with open(root / "mine.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")  # a trailing blank line
    return root / "mine.jsonl"


def test_hand_written_dataset_loads_batches_and_scores(tmp_path):
    samples = load_jsonl(write_hand_dataset(tmp_path))
    assert [s.turns for s in samples] == [[("What colour fills this picture?", "Red")],
                                          [("Is the picture grey?", "yes"), ("Sure?", "yes")],
                                          [("Décris l'image", "bleu uni")]]
    assert [s.question for s in samples] == ["What colour fills this picture?", "Sure?", "Décris l'image"]
    assert [s.answer for s in samples] == ["Red", "yes", "bleu uni"]
    assert [s.category for s in samples] == ["custom", "custom", "mine"]
    assert all(s.cells is None and s.images.shape == (1, 3, 128, 128) for s in samples)
    assert samples[0].images[0, :, 0, 0].tolist() == [255, 0, 0]
    batch = collate(samples)
    assert batch["pixel_values"].shape == (3, 3, 128, 128)
    assert (batch["cells"] == -100).all() and batch["cells"].shape == (3, 64)
    result = score(oracle(samples), samples, batch_size=2)
    assert result["accuracy"] == {"custom": 1.0, "mine": 1.0} and result["mean"] == 1.0
    result = score(garbage, samples)
    assert result["mean"] == 0.0
    table = data.format_table({"garbage": result})
    assert "custom" in table and "mine" in table and "0.0%" in table and "garbage" in table


def test_scoring_synthetic_with_oracle_and_table():
    samples = [sample_at(CFG, "test", 0, i) for i in range(14)]
    result = score(oracle(samples), samples, batch_size=3)
    assert list(result["accuracy"]) == list(CATEGORIES)
    assert all(a == 1.0 for a in result["accuracy"].values()) and result["n"]["text"] == 2
    assert result["predictions"] == [s.answer for s in samples]
    table = data.format_table({"oracle": result, "twice": result})
    assert "chance" in table and "50.0%" in table and "100.0%" in table
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["oracle", "twice"] and lines[1].split()[-2:] == ["100.0%", "100.0%"]
    # scoring normalises case, surrounding whitespace and a final full stop
    shout = oracle(samples, answer=lambda s: f"  {s.answer.upper()}. ")
    assert score(shout, samples, max_new_tokens=16)["mean"] == 1.0


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"image": "ok.png", "conversations": [
    {"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]})


@pytest.mark.parametrize("bad_line, message", [
    ('{"image": "ok.png", "conversations": [', "malformed JSON"),
    (GOOD.replace("ok.png", "missing.png"), "missing.png: no such image file"),
    (GOOD.replace("ok.png", "broken.png"), "broken.png: cannot read the image"),
    (json.dumps({"image": "ok.png", "conversations": [{"from": "human", "value": "q?"}]}),
     "no question with an answer"),
])
def test_bad_data_names_file_and_line(tmp_path, bad_line, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError, match=message) as err:
        load_jsonl(path)
    assert isinstance(err.value, ValueError)
    assert f"{path}:3:" in str(err.value)


def test_tokenizer_round_trip():
    tok = TOKENIZER
    assert tok.vocab_size == data.VOCAB_SIZE == len(tok.vocab)
    assert (tok.pad_id, tok.img_context_id, tok.eos_id) == (0, data.IMG_CONTEXT_ID, tok.im_end_id)
    first_word_id = len(tok.specials) + 256
    for i in range(70):
        s = sample_at(CFG, "train", 1, i)
        for text in (s.question, s.answer, "<image>\n" + s.question):
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            if "<" not in text:  # benchmark text is all word-level: no byte fallback
                assert min(ids) >= first_word_id
    assert len(tok.encode("Is there a red circle?")) == 6
    assert len(tok.encode("K7BZ")) == 4  # one token per glyph
    for text in ("Héllo wörld, naïve 🙂!", "tabs\tand  double  spaces \n\n end ",
                 "<|im_end|> is just text here", "", "zxq 123 ??"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.im_end_id not in ids and all(0 <= i < tok.vocab_size for i in ids)
    unknown = tok.encode(" zxq")
    assert all(len(tok.specials) <= i < first_word_id for i in unknown[1:])  # bytes
    assert tok.decode([tok.bos_id, *tok.encode("no"), tok.im_end_id], skip_special=True) == "no"


def test_template_and_answer_mask():
    samples = [sample_at(CFG, "train", 2, i) for i in range(7)]
    batch = collate(samples)
    ids, mask, att = batch["input_ids"], batch["answer_mask"], batch["attention_mask"]
    assert ids.shape == mask.shape == att.shape == batch["labels"].shape
    assert len(set(att.sum(1).tolist())) > 1  # lengths differ, so padding is exercised
    for k, s in enumerate(samples):
        row = ids[k][att[k]].tolist()
        assert (ids[k][~att[k]] == TOKENIZER.pad_id).all() and not mask[k][~att[k]].any()
        assert row.count(TOKENIZER.img_context_id) == IMAGE_TOKENS == 64
        assert TOKENIZER.decode(ids[k][mask[k]]) == s.answer + "<|im_end|>"
        assert TOKENIZER.decode(row) == ("<s><|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 64 +
                                         "</img>\n" + s.question + "<|im_end|><|im_start|>"
                                         "assistant\n" + s.answer + "<|im_end|>")
        prompt = chat_ids(s.turns, last_answer=False)[0]
        assert row[:len(prompt)] == prompt
        assert torch.equal(batch["labels"][k][mask[k]], ids[k][mask[k]])
        assert (batch["labels"][k][~mask[k]] == -100).all()
        assert batch["cells"][k].tolist() == s.cells
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["category"] == list(CATEGORIES)


def test_multi_turn_template_trains_every_answer():
    turns = [("What color is the square?", "red"), ("Is it big?", "no")]
    ids, mask = chat_ids(turns)
    text = TOKENIZER.decode(ids)
    assert text == ("<s><|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 64 + "</img>\nWhat color is the square?"
                    "<|im_end|><|im_start|>assistant\nred<|im_end|><|im_start|>user\nIs it big?<|im_end|>"
                    "<|im_start|>assistant\nno<|im_end|>")
    assert TOKENIZER.decode([i for i, m in zip(ids, mask) if m]) == "red<|im_end|>no<|im_end|>"
    prompt, _ = chat_ids(turns, last_answer=False)                   # what generation continues
    assert prompt == ids[:len(prompt)] and TOKENIZER.decode(ids[len(prompt):]) == "no<|im_end|>"


def draw_questions(n, split="train", seed=0):
    """(category, cells, question, answer) without drawing images: fast."""
    out = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        out.append((cat, *GENERATORS[cat](sample_rng(split, seed, i), CFG)))
    return out


def solve(question, cells):
    """An independent solver that answers a question from the cells alone."""
    objs = {}  # (colour, shape) -> list of (row, col)
    glyphs = []
    for i, c in enumerate(cells):
        d = describe_cell(c)
        if d[0] == "object":
            objs.setdefault((d[2], d[1]), []).append(divmod(i, 8))
        elif d[0] == "glyph":
            glyphs.append((i, d[1]))
    assert all(len(v) == 1 for v in objs.values())  # every object is a distinct (colour, shape)
    shape_of = {p: SHAPES[PLURALS.index(p)] for p in PLURALS}

    def count(word):
        if word in shape_of:
            return sum(s == shape_of[word] for _, s in objs)
        return sum(c == word for c, _ in objs)

    if m := re.fullmatch(r"Is there a (\w+)(?: object)?\?", question):  # by shape or by colour
        return "yes" if any(m[1] in o for o in objs) else "no"
    if m := re.fullmatch(r"How many (\w+)(?: objects)? are there\?", question):
        return str(count(m[1]))
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (match,) = [c for c, s in objs if s == m[1]]
        return match
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (match,) = [s for c, s in objs if c == m[1]]
        return match
    if m := re.fullmatch(r"Is the (\w+)(?: object)? (.+) the (\w+)(?: object)?\?", question):
        (a,) = [o for o in objs if m[1] in o]  # each named object is the only one with that word
        (b,) = [o for o in objs if m[3] in o]
        (ra, ca), (rb, cb) = objs[a][0], objs[b][0]
        key = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb,
               "below": ra > rb}
        assert (ca != cb) if "of" in m[2] else (ra != rb)
        return "yes" if key[m[2]] else "no"
    if question == "What does the text say?":
        idx = [i for i, _ in glyphs]
        assert idx == list(range(idx[0], idx[0] + len(idx))) and idx[0] // 8 == idx[-1] // 8
        return "".join(ch for _, ch in glyphs)
    if m := re.fullmatch(r"Are there more (\w+)(?: objects)? than (\w+)(?: objects)?\?", question):
        assert count(m[1]) != count(m[2])
        return "yes" if count(m[1]) > count(m[2]) else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_answers_follow_from_cells_and_are_balanced():
    samples = draw_questions(2100)
    answers = {c: Counter() for c in CATEGORIES}
    for cat, cells, q, a in samples:
        assert len(cells) == 64 and all(0 <= c < NUM_CELL_CLASSES for c in cells)
        assert solve(q, cells) == a, (cat, q, a)
        answers[cat][a] += 1
    for cat, counter in answers.items():
        n = sum(counter.values())
        top = counter.most_common(1)[0][1] / n
        assert top < 0.6, (cat, counter)  # a constant guess stays far below 80%
        if data.CHANCE[cat] == 0.5:
            assert 0.42 < top < 0.58
        else:
            assert top < 3 * data.CHANCE[cat] or cat == "text"
    assert len(answers["text"]) > 250  # nearly every word is new
    assert set(answers["count"]) == {str(k) for k in range(CFG.max_count + 1)}
    assert set(answers["color"]) == set(COLOR_NAMES) and set(answers["shape"]) == set(SHAPES)


def test_question_wording_does_not_give_the_answer():
    """Within each question wording (with the colour/shape words masked), answers stay balanced."""
    by_template = {}
    for cat, _, q, a in draw_questions(2100, seed=1):
        if data.CHANCE[cat] == 0.5:
            template = re.sub("|".join(SHAPES + PLURALS + COLOR_NAMES), "X", q)
            by_template.setdefault(template, Counter())[a] += 1
    for template, counter in by_template.items():
        if sum(counter.values()) >= 60:
            assert counter.most_common(1)[0][1] / sum(counter.values()) < 0.7, (template, counter)


def test_splits_and_seeds_differ():
    key = lambda s: (s[2], s[3], tuple(s[1]))
    train = {key(s) for s in draw_questions(200, "train", 0)}
    test = {key(s) for s in draw_questions(200, "test", 0)}
    other_seed = {key(s) for s in draw_questions(200, "train", 1)}
    assert not train & test and not train & other_seed
    assert draw_questions(5, "train", 0) == draw_questions(5, "train", 0)  # deterministic


def test_word_cells_are_the_cells_the_answer_depends_on():
    """word_cells (the look target of stage 0's grounding hints) checked against each answer."""
    for cat, cells, q, a in draw_questions(700, seed=2):
        named = [w for w in re.findall(r"[a-z]+", q.lower()) if w in grounding.OBJECT_WORDS]
        found = [grounding.word_cells(w, cells) for w in named]
        kinds = [[describe_cell(cells[k]) for k in f] for f in found]
        assert all(f == sorted(set(f)) for f in found)
        if cat == "exist":
            assert len(named) == 1 and len(found[0]) == (a == "yes")
        elif cat == "count":
            assert len(named) == 1 and len(found[0]) == int(a) and all(d[0] == "object" for d in kinds[0])
        elif cat == "color":
            assert len(named) == 1 and [d[2] for d in kinds[0]] == [a]
        elif cat == "shape":
            assert len(named) == 1 and [d[1] for d in kinds[0]] == [a]
        elif cat == "position":
            assert len(named) == 2 and [len(f) for f in found] == [1, 1]
        elif cat == "text":
            assert named == ["text"] and "".join(d[1] for d in kinds[0]) == a
        else:  # reason: "more X than Y" is yes exactly when X names more cells
            assert len(named) == 2 and (len(found[0]) > len(found[1])) == (a == "yes")
    with pytest.raises(ValueError, match="word must be one of"):
        grounding.word_cells("object", cells)


# ----------------------------------------------------------------------------------------------
# Multi-image prompts

def solve_multi(question, cells, n_images):
    """An independent solver of the multi-image questions from the cells alone: the one object of
    all the images that the question names, and the attribute it asks for; and that object's image."""
    objects = [(k // 64, describe_cell(c)[1:]) for k, c in enumerate(cells) if describe_cell(c)[0] == "object"]
    m = re.fullmatch(r"What (color|shape) is the (\w+)(?: object)?\?", question)
    found = [(k, obj) for k, obj in objects if m[2] in obj]
    assert len(found) == 1, (question, found)
    k, (shape, color) = found[0]
    return (color if m[1] == "color" else shape), k


@pytest.mark.parametrize("n_images", [1, 3, 8])
def test_multi_image_answers_follow_from_cells(n_images):
    answers = Counter()
    for i in range(60):
        target = [None, 0, n_images // 2, n_images - 1][i % 4]
        s = data.multi_sample_at(CFG, "test", 0, i, n_images, target)
        assert s.images.shape == (n_images, 3, 128, 128) and len(s.cells) == 64 * n_images
        assert s.category == "recall"
        for k in range(n_images):
            assert torch.equal(s.images[k], image_to_tensor(draw_scene(s.cells[k * 64:(k + 1) * 64], CFG)))
        tags, question = s.question.rsplit("\n", 1)
        assert tags.split("\n") == ["<image>"] * n_images
        answer, where = solve_multi(question, s.cells, n_images)
        assert answer == s.answer and (target is None or where == target)
        answers[s.answer] += 1
        ids = TOKENIZER.encode(question)
        assert TOKENIZER.decode(ids) == question and min(ids) >= len(TOKENIZER.specials) + 256  # known words
    assert len(answers) > 6                           # answers vary


def test_mix_groups_share_kind_and_image_count():
    ks = set()
    for group in range(6):
        samples = [data.mix_sample_at(CFG, "train", 0, group * data.MIX_GROUP + i) for i in range(data.MIX_GROUP)]
        counts = {len(s.images) for s in samples}
        assert len(counts) == 1
        if group % 2 == 0:
            assert counts == {1} and {s.category for s in samples} <= set(CATEGORIES)
            assert samples[0].question == sample_at(CFG, "train", 0, group * data.MIX_GROUP).question
        else:
            assert {s.category for s in samples} == {"recall"}
            ks |= counts
    assert ks <= set(range(1, CFG.max_images + 1)) and len(ks) > 1
    assert data.TASKS["single"] is sample_at and data.TASKS["mix"] is data.mix_sample_at


def test_image_tags_place_images():
    single = chat_ids([("<image>\nWhat color is the square?", "red")])
    assert single == chat_ids([("What color is the square?", "red")])    # a leading tag: as before
    ids, _ = chat_ids([("A: <image>\nB: <image>\nq?", "a")], n_images=2)
    text = TOKENIZER.decode(ids)
    image = "<img>" + "<IMG_CONTEXT>" * 64 + "</img>"
    assert text == f"<s><|im_start|>user\nA: {image}\nB: {image}\nq?<|im_end|><|im_start|>assistant\na<|im_end|>"
    untagged, _ = chat_ids([("q?", "a")], n_images=2)                     # no tags: images first
    assert TOKENIZER.decode(untagged).startswith(f"<s><|im_start|>user\n{image}\n{image}\nq?")
    with pytest.raises(ValueError, match="2 '<image>' tags for 3 images"):
        chat_ids([("<image><image>q?", "a")], n_images=3)


def test_multi_image_jsonl_round_trips_batches_and_scores(tmp_path, capsys):
    data.main(["--out", str(tmp_path), "--n", "6", "--images", "2", "--seed", "1"])
    assert "wrote 6 samples" in capsys.readouterr().out
    loaded = load_jsonl(tmp_path / "data.jsonl")
    assert len(list((tmp_path / "images").glob("*.png"))) == 12
    for i, s in enumerate(loaded):
        ref = data.multi_sample_at(CFG, "train", 1, i, 2)
        assert (s.turns, s.category, s.cells) == (ref.turns, ref.category, ref.cells)
        assert torch.equal(s.images, ref.images)
    batch = collate(loaded[:2] + [sample_at(CFG, "train", 0, 0)])
    assert batch["pixel_values"].shape == (5, 3, 128, 128) and batch["cells"].shape == (5, 64)
    assert batch["image_row"].tolist() == [0, 0, 1, 1, 2]
    assert batch["cells"][2:4].flatten().tolist() == loaded[1].cells
    assert (batch["input_ids"] == data.IMG_CONTEXT_ID).sum(1).tolist() == [128, 128, 64]
    result = score(oracle(loaded), loaded, batch_size=4)
    assert result["mean"] == 1.0 and set(result["accuracy"]) == set(data.MULTI_CATEGORIES)
    bad = tmp_path / "bad.jsonl"
    rec = json.loads((tmp_path / "data.jsonl").read_text().splitlines()[0])
    rec["conversations"][0]["value"] = "<image>\nonly one tag?"
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 1 '<image>' tags for 2 images"):
        load_jsonl(bad)


@pytest.mark.parametrize("args, message", [(["--n", "-3"], "--n -3: must be at least 1"),
                                           (["--images", "0"], "--images 0: must be at least 1")])
def test_cli_rejects_bad_counts(tmp_path, args, message):
    import subprocess
    import sys
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "data.py", "--out", str(tmp_path / "x"), *args], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == f"error: {message}\n"
    assert not (tmp_path / "x").exists()

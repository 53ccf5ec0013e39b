"""experiments/recall.py (a research script run on the library) and experiments/implicit_attention.py
on tiny random models: every point written once and skipped when there; the table and the plot."""
import importlib
import os

import torch

import data
from convert import save_model
from model import Model, ModelConfig
from seed import seed_student


def script(name):
    return importlib.import_module(f"experiments.{name}")


def tiny_teacher():
    torch.manual_seed(0)
    return Model(ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, hidden_size=32,
                             intermediate_size=64, n_heads=4, n_kv_heads=2, layers=["attn"] * 2,
                             ssd_chunk_size=16))


def test_recall_points_are_written_once_and_reported(tmp_path, capsys):
    recall = script("recall")
    teacher = tiny_teacher()
    save_model(teacher, str(tmp_path / "t"))
    save_model(seed_student(teacher, ["mamba2", "attn"], "inherit+mimic"), str(tmp_path / "s"))
    out = tmp_path / "out"
    args = ["--models", f"teacher={tmp_path / 't'}", f"hybrid={tmp_path / 's'}", "--ks", "1", "3",
            "--n", "6", "--out", str(out)]
    points = recall.main(args)
    assert set(points) == {("teacher", 1), ("teacher", 3), ("hybrid", 1), ("hybrid", 3)}
    p = points["hybrid", 3]
    assert p["K"] == 3 and p["n"] == 6 and 0 <= p["accuracy"] <= 1 and set(p["by_position"]) == set(recall.POSITIONS)
    assert p["prompt_tokens"] == len(data.chat_ids(recall.questions(3, 1, 0)[0].turns, last_answer=False,
                                                   n_images=3)[0])
    stamp = os.path.getmtime(out / "teacher_K3.json")
    recall.main(args)                                               # done points are skipped
    assert os.path.getmtime(out / "teacher_K3.json") == stamp
    table = (out / "table.md").read_text()
    assert "| 3 |" in table and "teacher" in table and (out / "recall.png").exists()
    assert [recall.target_index(q, 8) for q in recall.POSITIONS] == [0, 4, 7]


def test_recall_scores_by_the_asked_position(tmp_path, monkeypatch):
    """A model that answers only questions about the first image: by_position 1 / 0 / 0. Which
    image a question asks about (the needle's) is found here by drawing the sample with target 0."""
    recall = script("recall")
    cfg = data.DataConfig()

    def first_only(model, samples, batch_size):
        predictions = []
        for s in samples:
            index = int(s.source.split("/")[-1])
            first = data.multi_sample_at(cfg, "test", 0, index, 4, target=0)
            predictions.append(s.answer if torch.equal(s.images, first.images) else "no answer")
        return {"accuracy": {"recall": 0.0}, "predictions": predictions}
    monkeypatch.setattr(recall, "evaluate", first_only)
    monkeypatch.setattr(recall, "load_model", lambda folder: tiny_teacher())
    point = recall.score_point("unused", 4, 9, 0)
    assert point["by_position"] == {"first": 1.0, "middle": 0.0, "last": 0.0}
    assert point["accuracy"] == 3 / 9


def test_implicit_attention_picture(tmp_path):
    picture = script("implicit_attention")
    teacher = tiny_teacher()
    save_model(teacher, str(tmp_path / "t"))
    student = seed_student(teacher, ["mamba2"] * 2, "inherit+mimic")
    for stage in (2, 3):
        save_model(student, str(tmp_path / "run" / f"stage{stage}" / "model"))
    out = tmp_path / "ia.png"
    picture.main(["--teacher", str(tmp_path / "t"), "--run", str(tmp_path / "run"), "--heads", "0:0", "1:3",
                  "--n-images", "2", "--out", str(out)])
    assert out.stat().st_size > 10_000


def test_eval_scores_a_multi_image_jsonl(tmp_path, capsys, monkeypatch):
    """distill.py --eval CKPT --eval-data FILE.jsonl on a file with two images per sample: every
    prediction is scored against its reference, under the multi-image category."""
    import json

    import distill
    monkeypatch.chdir(tmp_path)                     # --eval writes runs/eval/<name>.json
    save_model(tiny_teacher(), str(tmp_path / "t"))
    data.main(["--out", str(tmp_path / "d"), "--n", "5", "--images", "2", "--split", "test"])
    result = distill.main(["--eval", str(tmp_path / "t"), "--eval-data", str(tmp_path / "d" / "data.jsonl")])
    assert result["n"] == {"recall": 5}
    wanted = [json.loads(line)["conversations"][1]["value"] for line in open(tmp_path / "d" / "data.jsonl")]
    assert [s["answer"] for s in result["samples"]] == wanted
    hits = [data.normalize_answer(s["prediction"]) == data.normalize_answer(s["answer"]) for s in result["samples"]]
    assert result["accuracy"]["recall"] == sum(hits) / 5
    assert "recall" in capsys.readouterr().out

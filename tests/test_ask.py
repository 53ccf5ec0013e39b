"""Tests of ask.py with this project's checkpoints: the bundled teacher answers a question about an
image data.py drew (one it gets right on the test split), from a PNG file; bad input is one line
naming the file, exit status 1. With a released (HoVLE / mmMamba) folder: tests/test_released.py."""
import os
import subprocess
import sys

from PIL import Image

import ask
import data
from convert import load_model, save_model
from seed import seed_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "checkpoints", "teacher")


def test_teacher_answers_a_question_about_a_png(tmp_path, capsys):
    teacher = load_model(TEACHER).eval()
    samples = [data.sample_at(data.DataConfig(), "test", 0, i) for i in range(14)]
    result = data.score(lambda ids, px, n, eos: teacher.generate(ids, px, n, eos), samples)
    right = [s for s, p in zip(samples, result["predictions"]) if p == s.answer]
    s = next(s for s in right if s.category == "color")               # one the teacher gets right
    image = s.images[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    answer = ask.main([TEACHER, str(tmp_path / "scene.png"), s.question])
    out = capsys.readouterr().out
    assert answer == s.answer and out.splitlines()[0] == s.answer and "tokens/s" in out
    # any size: the same scene at 300 x 300 is resized as the loader does, and still answered
    Image.fromarray(image.permute(1, 2, 0).numpy()).resize((300, 300), Image.NEAREST).save(tmp_path / "big.png")
    assert data.load_image(tmp_path / "big.png").shape == (3, 128, 128)
    assert ask.main([TEACHER, str(tmp_path / "big.png"), s.question]) == s.answer
    # a linear student built from the teacher loads and answers too (sampling, reproducibly)
    student_dir = tmp_path / "student"
    save_model(seed_student(teacher, ["mamba2"] * 8), str(student_dir))
    a = ask.main([str(student_dir), str(tmp_path / "scene.png"), s.question, "--temperature", "1", "--seed", "3"])
    assert a == ask.main([str(student_dir), str(tmp_path / "scene.png"), s.question, "--temperature", "1",
                          "--seed", "3"])


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    cases = [([TEACHER, str(tmp_path / "missing.png"), "q?"], "missing.png: no such image file"),
             ([TEACHER, str(tmp_path / "broken.png"), "q?"], "broken.png: cannot read the image"),
             ([str(tmp_path / "nowhere"), str(tmp_path / "ok.png"), "q?"], "nowhere: no such checkpoint folder")]
    for args, message in cases:
        r = subprocess.run([sys.executable, "ask.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1

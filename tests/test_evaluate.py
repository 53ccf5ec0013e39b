"""Tests of evaluate.py: per-layer fidelity against the numbers it names; the fidelity of seeded
students per mode (experiments/seed_fidelity.py), one-line errors. (Accuracy and the --eval mode:
tests/test_distill.py.)"""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from evaluate import mixer_fidelity
from experiments import seed_fidelity
from model import Model, ModelConfig, make_layers
from seed import MODES, seed_student


def small_cfg(layers=("attn",) * 4, **kw):
    d = dict(vocab_size=64, hidden_size=64, intermediate_size=96, n_heads=4, n_kv_heads=2,
             layers=list(layers), image_size=32, patch_size=8, img_context_id=5, ssd_chunk_size=8)
    d.update(kw)
    return ModelConfig(**d)


def test_fidelity_and_cli(capsys):
    torch.manual_seed(0)
    teacher = Model(small_cfg())
    ids = torch.tensor([[7, 8] + [5] * 4 + [9, 10, 11]])
    px = torch.randn(1, 3, 32, 32)
    student = seed_student(teacher, make_layers(4, 2))
    rows = mixer_fidelity(teacher, student, ids, px)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    us = teacher.mixer_inputs(ids, px)
    for r, u, tb, sb in zip(rows, us, teacher.layers, student.layers):
        if r["kind"] == "attn":                                # kept layers: identical outputs
            assert r["rel_err"] == 0 and abs(r["cosine"] - 1) < 1e-9
        else:                                                  # the numbers are what they say
            t, s = tb.mixer.heads(u).double().flatten(), sb.mixer.heads(u).double().flatten()
            assert abs(r["rel_err"] - ((s - t).norm() / t.norm()).item()) < 1e-9
            assert abs(r["cos_y"] - F.cosine_similarity(sb.mixer.heads(u, gate=False).double().flatten(), t, dim=0).item()) < 1e-9
    results = seed_fidelity.main(["--n", "3"])                     # the bundled teacher, every mode
    out = capsys.readouterr().out
    assert set(results) == set(MODES) and all(len(v) == 8 for v in results.values())
    assert "inherit+mimic" in out and "rel.err" in out and "mean" in out
    mean = {m: sum(r["cos_y"] for r in rs) / 8 for m, rs in results.items()}
    assert mean["inherit+mimic"] > mean["inherit"] + 0.1       # what mimic buys: y already points the teacher's way


def test_command_line_errors_are_one_line(tmp_path):
    """seed_fidelity.py and data.py end bad input with one line naming the path, and exit status 1."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = str(tmp_path / "nowhere")
    fidelity = os.path.join("experiments", "seed_fidelity.py")
    for args in ([fidelity, "--checkpoint", bad], ["data.py", "--out", str(tmp_path / "file" / "x"), "--n", "1"]):
        if args[0] == "data.py":
            (tmp_path / "file").write_text("a file, not a folder")
        r = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert str(tmp_path) in r.stderr, r.stderr

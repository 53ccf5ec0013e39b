"""Tests of bench.py: the smoke run (JSON schema, ratios, plots, last line), timed generation
against Model.generate, model construction on the meta path, fresh-process points and how
failures are recorded. Tiny sizes only (2 shared CPU cores)."""
import json
import math
import os

import pytest
import torch

import bench
from model import Model, make_layers


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_schema_plots_and_summary(tmp_path, capsys):
    res = bench.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == res["summary"] and printed[-1].startswith("at L=128: linear ")

    with open(tmp_path / "bench.json") as f:
        data = json.load(f)
    for key in ("commit", "dirty", "torch", "machine", "config", "paper", "layouts", "model_config",
                "model", "kernel", "summary", "plots", "elapsed_s", "date_utc"):
        assert key in data, key
    assert data["commit"] and data["torch"] == torch.__version__
    for key in ("platform", "cpu_count", "torch_threads", "torch"):
        assert key in data["machine"], key
    assert data["layouts"]["teacher"] == ["attn"] * 8
    assert data["layouts"]["linear"] == ["mamba2"] * 8
    assert data["layouts"]["hybrid"] == make_layers(8, 2, "head-interleaved")

    model = data["model"]
    assert model["memory_metric"] == "run_mib"
    pts = model["points"]
    assert sorted((p["kind"], p["layout"], p["L"]) for p in pts) == sorted(
        [("table2", lay, None) for lay in bench.LAYOUTS]
        + [("length", lay, L) for L in (64, 128) for lay in bench.LAYOUTS])
    for p in pts:
        assert p["status"] == "ok", p
        for key in ("prefill_s", "decode_s", "total_s", "decode_ms_per_token", "tokens_per_s",
                    "prefill_tokens_per_s", "peak_mib", "baseline_mib", "cache_mib"):
            assert _positive(p[key]), (key, p)
        assert isinstance(p["run_mib"], float) and p["repeats"] >= 1 and p["decode_steps"] == 7
        assert p["total_s"] == pytest.approx(p["prefill_s"] + p["decode_s"])
        assert p["tokens_per_s"] == pytest.approx(8 / p["total_s"])
    t2 = [p for p in pts if p["kind"] == "table2"]
    assert all(p["image_tokens"] == 64 and p["n_images"] == 1 and p["prompt_tokens"] == 72 for p in t2)
    # the caches: the teacher's KV cache grows with L, the linear student's state does not
    by = {(p["layout"], p["L"]): p for p in pts if p["kind"] == "length"}
    assert by[("teacher", 128)]["cache_mib"] > 1.8 * by[("teacher", 64)]["cache_mib"]
    assert by[("linear", 128)]["cache_mib"] == by[("linear", 64)]["cache_mib"]

    ratios = model["ratios"]
    assert sorted((r["L"], r["layout"]) for r in ratios) == [(64, "hybrid"), (64, "linear"),
                                                              (128, "hybrid"), (128, "linear")]
    for r in ratios:
        for key in ("speedup", "prefill_speedup", "decode_speedup", "cache_ratio"):
            assert _positive(r[key]), (key, r)
        assert r["memory_saving"] is None or math.isfinite(r["memory_saving"])
        t, s = by[("teacher", r["L"])], by[(r["layout"], r["L"])]
        assert r["speedup"] == pytest.approx(t["total_s"] / s["total_s"])
    checks = model["checks"]
    assert checks["longest_common_L"] == 128
    assert {"linear_decode_ms_growth", "linear_decode_flat_within_20pct", "linear_memory_grows_slower",
            "teacher_memory_slope_kib_per_token"} <= set(checks)

    kern = data["kernel"]
    assert {"ssd_naive", "ssd_chunked", "sdpa_causal"} <= set(kern["kernels"])
    assert kern["modes"] == ["fwd", "fwd+bwd"] and _positive(kern["bandwidth_gb_s"])
    rows = kern["results"]
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert r["status"] == "ok" and _positive(r["ms"]), r
        if r["mode"] == "fwd" and r["kernel"].startswith("ssd"):
            assert _positive(r["floor_ms"])

    assert sorted(data["plots"]) == ["kernel.png", "model_memory.png", "model_time.png"]
    for name in data["plots"]:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "table.txt").read_text().strip().splitlines()[-1] == res["summary"]


def test_generate_timed_is_model_generate():
    cfg = bench.model_config("tiny", "hybrid")
    model = bench.build_model(cfg, "cpu", torch.float32, seed=3)
    ids, px = bench.make_prompt(cfg, None, image_tokens=64, text_tokens=6, device="cpu", dtype=torch.float32)
    tp, td, cache_bytes, tokens = bench.generate_timed(model, ids, px, new_tokens=6)
    assert tokens.shape == (1, 6) and tp > 0 and td > 0 and cache_bytes > 0
    assert torch.equal(tokens, model.generate(ids, px, max_new_tokens=6))
    assert not (tokens == cfg.img_context_id).any()


def test_build_model_via_meta_path():
    cfg = bench.model_config("tiny", "hybrid", hybrid_attn=3, placement="tail-stacked")
    assert cfg.layers == ["mamba2"] * 5 + ["attn"] * 3
    model = bench.build_model(cfg, "cpu", torch.bfloat16, seed=0, via_meta=True)
    assert isinstance(model, Model) and not model.training
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all(), name
    mixer = model.layers[0].mixer
    A = mixer.A_log.float().exp()
    dt = torch.nn.functional.softplus(mixer.dt_bias.float())
    assert (A >= 0.99).all() and (A <= 16.1).all() and (dt > 5e-5).all() and (dt < 0.11).all()
    assert (model.norm.weight == 1).all() and (model.vision.pixel_shuffle_proj[0].bias == 0).all()
    ids = bench.random_text_ids(cfg, 20, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(model(ids, last_only=True).float()).all()


def test_presets_and_lengths():
    c = bench.resolve(bench.BenchConfig())
    assert (c.device, c.dtype) == ("cpu", "float32")
    assert c.lengths == [1024, 2048, 4096, 8192, 16384, 32768]
    assert c.out == os.path.join("bench_results", "tiny_cpu")
    c = bench.resolve(bench.BenchConfig(preset="hovle", device="cpu"))
    assert c.dtype == "bfloat16" and c.lengths[-2:] == [65536, 103000]
    assert bench.resolve(bench.BenchConfig(max_len=5000)).lengths == [1024, 2048, 4096, 5000]
    assert bench.resolve(bench.BenchConfig(lengths=[300, 100], max_len=200)).lengths == [100]
    hv = bench.model_config("hovle", "hybrid")
    assert hv.hidden_size == 2048 and hv.attn_indices == list(range(0, 32, 4))
    with pytest.raises(SystemExit):
        bench.resolve(bench.BenchConfig(new_tokens=1))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            bench.resolve(bench.BenchConfig(preset="hovle"))


def _spec(**kw):
    d = dict(kind="length", preset="tiny", device="cpu", dtype="float32", layout="linear", L=32,
             new_tokens=3, repeats=2, point_budget_s=5.0, seed=0, threads=1)
    d.update(kw)
    return d


def test_fresh_process_point_and_failures():
    r = bench.run_point_subprocess(_spec(), timeout_s=300)
    assert r["status"] == "ok" and r["prompt_tokens"] == 32 and r["repeats"] == 2
    assert r["peak_reset"] is True and _positive(r["peak_mib"]) and r["threads"] == 1
    bad = bench.run_point_subprocess(_spec(layout="bogus"), timeout_s=300)
    assert bad["status"] == "error" and "bogus" in bad["error"]
    assert bench.run_point_subprocess(_spec(), timeout_s=0.01)["status"] == "timeout"


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                                 MemoryError()])
def test_out_of_memory_is_recorded(monkeypatch, capsys, exc):
    def boom(spec):
        raise exc
    monkeypatch.setattr(bench, "run_point", boom)
    r = bench.point_main(_spec())
    assert r["status"] == "oom"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(bench.POINT_TAG) and json.loads(line[len(bench.POINT_TAG):])["status"] == "oom"


def test_ratios_checks_and_summary_with_an_oom_teacher():
    def pt(layout, L, total, mem, ms_tok, status="ok"):
        if status != "ok":
            return dict(kind="length", layout=layout, L=L, status=status)
        return dict(kind="length", layout=layout, L=L, status="ok", total_s=total, prefill_s=total / 2,
                    decode_s=total / 2, decode_ms_per_token=ms_tok, run_mib=mem, cache_mib=mem / 2)
    points = [pt("teacher", 1000, 4.0, 100.0, 10.0), pt("linear", 1000, 2.0, 50.0, 5.0),
              pt("hybrid", 1000, 8.0, 150.0, 5.0),
              pt("teacher", 2000, 0, 0, 0, status="oom"), pt("linear", 2000, 2.2, 55.0, 5.5),
              pt("hybrid", 2000, 3.0, 60.0, 5.0)]
    ratios = bench.compute_ratios(points, "run_mib")
    assert [(r["L"], r["layout"]) for r in ratios] == [(1000, "linear"), (1000, "hybrid")]
    lin = ratios[0]
    assert lin["speedup"] == 2.0 and lin["decode_speedup"] == 2.0 and lin["memory_saving"] == 0.5
    line = bench.summary_line(ratios, points, None, 256)
    assert line == ("at L=1000: linear 2.0x faster, 50% less memory; hybrid 2.0x slower, 50% more memory "
                    "than the teacher (prefill + 256 tokens); teacher oom at L=2000")
    checks = bench.compute_checks(points, "run_mib")
    assert checks["longest_common_L"] == 1000 and checks["linear_faster_than_teacher"] is True
    assert checks["linear_decode_ms_growth"] == pytest.approx(1.1)
    assert checks["linear_decode_flat_within_20pct"] is True
    assert "teacher_decode_ms_growth" not in checks          # one successful teacher length only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hovle_preset_on_gpu(tmp_path):
    res = bench.main(["--preset", "hovle", "--lengths", "1024", "--new-tokens", "4", "--repeats", "1",
                      "--table2-image-tokens", "256", "--naive-max-len", "256", "--out", str(tmp_path)])
    assert all(p["status"] == "ok" for p in res["model"]["points"]), res["model"]["points"]
    assert res["model"]["memory_metric"] == "peak_mib"
    assert "ssd_triton" in res["kernel"]["kernels"]
    assert all(r["status"] == "ok" for r in res["kernel"]["results"])


def test_killed_run_keeps_the_points_measured(tmp_path, monkeypatch):
    """A run interrupted after two model points leaves bench.partial.json with those two points;
    a complete run removes it (bench.json holds everything)."""
    real, calls = bench.run_point_safe, []

    def interrupted(spec):
        if len(calls) == 2:
            raise KeyboardInterrupt               # stands for a kill at the third point
        calls.append(spec)
        return real(spec)
    monkeypatch.setattr(bench, "run_point_safe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--skip-kernel", "--out", str(tmp_path)])
    with open(tmp_path / "bench.partial.json") as f:
        part = json.load(f)
    assert part["partial"] is True and not (tmp_path / "bench.json").exists()
    assert [(p["kind"], p["layout"]) for p in part["model_points"]] == \
        [(s["kind"], s["layout"]) for s in calls]
    assert all(p["status"] == "ok" for p in part["model_points"])
    monkeypatch.setattr(bench, "run_point_safe", real)
    bench.main(["--smoke", "--skip-kernel", "--out", str(tmp_path)])
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.partial.json").exists()

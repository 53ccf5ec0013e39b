"""Tests of bench.py: the smoke run (schema, plots, tables, summary), a point's times against what
Model.generate measured, a point in a fresh process and how failures are recorded, ratios and checks
against hand-computed values, the budget, a killed run. Tiny sizes only (2 shared CPU cores)."""
import dataclasses
import json
import math
import os

import pytest
import torch

import bench
from model import Model, ModelConfig, make_layers


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_schema_plots_and_summary(tmp_path, capsys):
    res = bench.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == res["summary"] and res["summary"].startswith("speed-up at L=128 vs the one-pass")
    assert (tmp_path / "table.txt").read_text().strip().splitlines()[-1] == res["summary"]
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("commit", "machine", "config", "paper", "layouts", "model_config", "model", "kernel", "summary",
                "plots", "elapsed_s", "date_utc"):
        assert key in data, key
    assert data["machine"]["torch"] == torch.__version__ and data["commit"]
    assert data["layouts"] == {"teacher": ["attn"] * 8, "teacher-seg": ["attn"] * 8, "linear": ["mamba2"] * 8,
                               "hybrid": make_layers(8, 2, "head-interleaved")}
    assert not (tmp_path / "bench.partial.json").exists()

    model = data["model"]
    assert model["memory_metric"] == "run_mib"
    pts = model["points"]
    assert sorted((p["kind"], p["layout"], p["L"] or 0) for p in pts) == sorted(
        [("table2", lay, 0) for lay in ("teacher", "linear", "hybrid")]
        + [("length", lay, L) for L in (64, 128) for lay in bench.LAYOUTS])
    for p in pts:
        assert p["status"] == "ok", p
        for key in ("prefill_s", "decode_s", "decode_ms_per_token", "tokens_per_s", "peak_mib", "cache_mib"):
            assert _positive(p[key]), (key, p)
        assert p["repeats"] == 1 and p["total_s"] == pytest.approx(p["prefill_s"] + p["decode_s"])
        assert p["tokens_per_s"] == pytest.approx(8 / p["total_s"])
        assert p["decode_ms_per_token"] == pytest.approx(1e3 * p["decode_s"] / 7)
        assert p["segment"] == (None if p["layout"] == "teacher" else 48)
    assert all(p["image_tokens"] == 64 and p["prompt_tokens"] == 96 for p in pts if p["kind"] == "table2")
    by = {(p["layout"], p["L"]): p for p in pts if p["kind"] == "length"}
    # the teacher's KV cache (capacity prompt + 8 new tokens) grows with L; the linear state does not
    assert by[("teacher", 128)]["cache_mib"] == pytest.approx(by[("teacher", 64)]["cache_mib"] * 136 / 72)
    assert by[("linear", 128)]["cache_mib"] == by[("linear", 64)]["cache_mib"]

    for r in model["ratios"]:
        t, s = by[(r["vs"], r["L"])], by[(r["layout"], r["L"])]
        assert r["speedup"] == pytest.approx(t["total_s"] / s["total_s"])
    assert len(model["ratios"]) == 2 * 2 * 2
    assert set(model["checks"]) == {"linear_memory_flat", "linear_saving_32k", "linear_saving_seg_32k",
                                    "hybrid_saving_32k", "linear_decode_ms", "linear_decode_flat", "table2_speedup"}
    assert model["checks"]["linear_saving_32k"] == {**model["checks"]["linear_saving_32k"], "value": None, "pass": None}
    # the decode goals are judged on the interleaved one-process measurement: 16 rounds per length
    dec = model["decode"]
    assert sorted(dec["ms"]) == ["128", "64"]
    assert all(len(v) == 16 and all(map(_positive, v)) for v in dec["ms"].values())
    median16 = lambda v: sum(sorted(v)[7:9]) / 2
    med = [median16(dec["ms"][L]) for L in ("64", "128")]
    t64, t128 = dec["ms"]["64"], dec["ms"]["128"]     # flatness: each time over its round's mean, median over rounds
    rel = [median16([2 * a / (a + b) for a, b in zip(t64, t128)]), median16([2 * b / (a + b) for a, b in zip(t64, t128)])]
    assert [dec["relative"][L] for L in ("64", "128")] == pytest.approx(rel)
    assert model["checks"]["linear_decode_flat"]["value"] == pytest.approx(max(rel) / min(rel) - 1)
    assert model["checks"]["linear_decode_ms"]["value"] == pytest.approx(max(med))
    assert "linear decode in one process" in (tmp_path / "table.txt").read_text()
    t2 = model["checks"]["table2_speedup"]
    tps = {p["layout"]: p["tokens_per_s"] for p in pts if p["kind"] == "table2"}
    assert t2["value"] == pytest.approx(tps["linear"] / tps["teacher"]) and t2["pass"] == (t2["value"] >= 2)

    kern = data["kernel"]
    assert kern["kernels"] == ["ssd_naive", "ssd_chunked", "sdpa_causal"] and kern["modes"] == ["fwd", "fwd+bwd"]
    assert kern["shape"] == {"H": 6, "Hkv": 2, "P": 32, "N": 32, "Q": 64, "dtype": "float32"}
    assert len(kern["results"]) == 3 * 2 * 2 and _positive(kern["copy_gb_s"])
    for r in kern["results"]:
        assert r["status"] == "ok" and _positive(r["ms"]) and _positive(r["floor_ms"]), r
    row = next(r for r in kern["results"] if (r["kernel"], r["mode"], r["L"]) == ("ssd_chunked", "fwd", 64))
    # x, B (64, 2 heads, 32), dt (64, 6), C and y (64, 6, 32), float32: the bytes of the GQA layout
    assert row["bytes"] == 4 * (64 * 2 * 32 * 2 + 64 * 6 + 64 * 6 * 32 * 2)
    assert row["gb_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)

    assert sorted(data["plots"]) == ["kernel.png", "model_memory.png", "model_time.png"]
    for name in data["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.txt").read_text()
    assert "goal" in table and "paper tok/s" in table and "one-pass | segment-wise" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("linear_decode_ms "))
    ch = model["checks"]["linear_decode_ms"]
    assert f"{ch['value']:.3g}" in row and "<= 3 ms" in row and ("PASS" if ch["pass"] else "FAIL") in row


def _config(**kw):
    """The smoke configuration with `kw` on top, as a point's spec carries it."""
    return dataclasses.asdict(dataclasses.replace(bench.resolve(bench.BenchConfig(smoke=True)), **kw))


def test_point_times_are_what_model_generate_measured(monkeypatch):
    """The point's times are the stats of its Model.generate calls (the first call is the warm-up)."""
    calls, real = [], Model.generate

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append((kw.get("stats"), kw.get("segment"), out.shape))
        return out
    monkeypatch.setattr(Model, "generate", spy)
    spec = {"config": _config(repeats=3, new_tokens=5, point_budget_s=1e9), "kind": "length", "layout": "teacher",
            "L": 32}
    r = bench.run_point(spec)
    timed = [s for s, _, _ in calls[1:]]                                           # warm-up, 3 timed runs
    assert calls[0][0] is None and len(timed) == 3 == r["repeats"]
    assert [(seg, tuple(shape)) for _, seg, shape in calls] == [(None, (1, 4))] + [(None, (1, 5))] * 3   # one pass
    assert r["prefill_all_s"] == [s["prefill_s"] for s in timed]
    assert r["decode_all_s"] == [s["decode_s"] for s in timed]
    assert r["prefill_s"] == sorted(s["prefill_s"] for s in timed)[1]
    # KV cache by hand: 8 layers x (k, v) x Hkv 2 x (32 + 5 tokens) x P 32 x 4 bytes
    assert r["cache_mib"] * 2 ** 20 == 8 * 2 * 2 * 37 * 32 * 4 and r["prompt_tokens"] == 32


def test_model_built_on_the_device_is_model_cfg():
    c = bench.BenchConfig(**_config(hybrid_attn=3, seed=4))
    model = bench.build_model(c, "hybrid")
    assert model.cfg.layers == make_layers(8, 3) and not model.training
    torch.manual_seed(4)
    ref = Model(ModelConfig(layers=make_layers(8, 3)))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert bench.model_config(c, "teacher-seg").layers == ["attn"] * 8
    hovle = dataclasses.replace(c, preset="hovle", hybrid_attn=None)
    hv = bench.model_config(hovle, "hybrid")
    assert hv.hidden_size == 2048 and [i for i, k in enumerate(hv.layers) if k == "attn"] == list(range(0, 32, 4))


def test_resolve_presets_flags_and_command_line(capsys):
    c = bench.resolve(bench.BenchConfig())
    assert (c.device, c.dtype, c.budget_s) == ("cpu", "float32", 585.0)
    assert c.lengths == [1024, 4096, 8192, 32768, 131072] and c.out == os.path.join("bench_results", "tiny_cpu")
    long = bench.resolve(bench.parse_config(bench.BenchConfig, ["--long", "--timeout-s", "7200"]))
    assert (long.lengths, long.parts, long.budget_s, long.timeout_s) == ([103000], ["model"], 0.0, 7200.0)
    assert long.out == os.path.join("bench_results", "tiny_cpu_long")
    assert bench.resolve(bench.BenchConfig(smoke=True)).out == os.path.join("bench_results", "tiny_cpu_smoke")
    gpu = bench.parse_config(bench.BenchConfig, ["--preset", "hovle", "--device", "cpu", "--batch", "1", "8",
                                                 "--parts", "kernel", "--no-backward"])
    gpu = bench.resolve(gpu)
    assert (gpu.dtype, gpu.batch, gpu.parts, gpu.backward, gpu.lengths[-2:]) == \
        ("bfloat16", [1, 8], ["kernel"], False, [103000, 131072])
    for bad in (dict(new_tokens=1), dict(parts=["speed"]), dict(dtype="int8"), dict(preset="huge")):
        with pytest.raises(ValueError):
            bench.resolve(bench.BenchConfig(**bad))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            bench.resolve(bench.BenchConfig(preset="hovle"))
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "--budget-s" in capsys.readouterr().out


def _spec(**kw):
    return {"config": _config(new_tokens=3, repeats=2, point_budget_s=60.0, **kw), "kind": "length",
            "layout": "linear", "L": 32}


def test_peak_rss_is_repeatable_and_follows_the_live_tensors():
    """Two fresh processes measuring the same point agree on the memory above the baseline (glibc's
    dynamic mmap threshold gave 18 to 48 MiB for one linear point at 16K); and a run that also holds
    a 64 MiB tensor measures 64 MiB more."""
    spec = {"config": _config(new_tokens=2, repeats=1, segment=2048), "kind": "length", "layout": "linear", "L": 4096}
    a, b = (bench.run_point_subprocess(spec, timeout_s=300) for _ in range(2))
    assert a["status"] == b["status"] == "ok" and a["run_mib"] > 10
    assert a["run_mib"] == pytest.approx(b["run_mib"], rel=0.03)
    held = []
    base, peak = bench.memory_run(lambda: held.append(torch.ones(16 * 2 ** 20)), torch.device("cpu"))
    empty = bench.memory_run(lambda: None, torch.device("cpu"))
    assert (peak - base) - (empty[1] - empty[0]) == pytest.approx(64 * 2 ** 20, rel=0.05)


def test_fresh_process_point_and_failures():
    r = bench.run_point_subprocess(_spec(), timeout_s=300)
    assert r["status"] == "ok" and r["prompt_tokens"] == 32 and r["repeats"] == 2 and r["threads"] == 1
    assert _positive(r["peak_mib"]) and r["baseline_mib"] > 50                   # a whole interpreter
    bad = bench.run_point_subprocess(_spec(dtype="bogus"), timeout_s=300)
    assert bad["status"] == "error" and "bogus" in bad["error"]
    assert bench.run_point_subprocess(_spec(), timeout_s=0.01)["status"] == "timeout"


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                                 MemoryError()])
def test_out_of_memory_is_recorded(monkeypatch, capsys, exc):
    def boom(spec):
        raise exc
    monkeypatch.setattr(bench, "run_point", boom)
    assert bench.main(["--point", json.dumps(_spec())])["status"] == "oom"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(bench.TAG) and json.loads(line[len(bench.TAG):])["status"] == "oom"


def _pt(layout, L, total, mem, ms_tok, status="ok", kind="length", tps=None):
    if status != "ok":
        return dict(kind=kind, layout=layout, L=L, status=status, error="x")
    return dict(kind=kind, layout=layout, L=L, status="ok", total_s=total, prefill_s=total / 2, decode_s=total / 2,
                decode_ms_per_token=ms_tok, run_mib=mem, cache_mib=mem / 2, tokens_per_s=tps, repeats=1)


def test_ratios_and_checks_computed_by_hand():
    points = [_pt("teacher", None, 0, 0, 0, kind="table2", tps=40.0), _pt("linear", None, 0, 0, 0, kind="table2",
                                                                          tps=100.0)]
    for L, (t, ts, lin, hyb) in {4096: (4, 3, 2, 3), 32768: (40, 30, 5, 10)}.items():
        points += [_pt("teacher", L, t, 100.0 * t, 10.0), _pt("teacher-seg", L, ts, 20.0 * ts, 10.0),
                   _pt("linear", L, lin, 50.0, 2.0), _pt("hybrid", L, hyb, 60.0, 2.5)]
    points += [_pt("teacher", 131072, 0, 0, 0, status="oom"), _pt("linear", 131072, 20, 54.0, 2.2)]
    ratios = bench.compute_ratios(points, "run_mib")
    assert [(r["L"], r["layout"], r["vs"]) for r in ratios] == [
        (L, lay, vs) for L in (4096, 32768) for lay in ("linear", "hybrid") for vs in ("teacher", "teacher-seg")]
    r = ratios[4]                                        # linear vs the one-pass teacher at 32K
    assert (r["speedup"], r["decode_speedup"], r["memory_saving"]) == (8.0, 5.0, 1 - 50 / 4000)
    assert ratios[5]["memory_saving"] == pytest.approx(1 - 50 / 600)              # vs the segment-wise teacher
    ch = {k: (v["value"], v["pass"]) for k, v in bench.compute_checks(points, "run_mib").items()}
    assert ch["linear_memory_flat"] == (pytest.approx(54 / 50 - 1), True)         # 8% from 4K to 128K
    assert ch["linear_saving_32k"] == (pytest.approx(0.9875), True)
    assert ch["linear_saving_seg_32k"] == (pytest.approx(1 - 50 / 600), True)
    assert ch["hybrid_saving_32k"] == (pytest.approx(1 - 60 / 4000), True)
    assert ch["linear_decode_ms"] == (2.2, True)
    assert ch["linear_decode_flat"] == (pytest.approx(0.1), True)
    assert ch["table2_speedup"] == (2.5, True)
    points[-1]["run_mib"] = 60.0                                                  # 20% growth: fails
    assert bench.compute_checks(points, "run_mib")["linear_memory_flat"]["pass"] is False
    assert bench.ratio_text(ratios, "speedup") == ("speed-up at L=32768 vs the one-pass | segment-wise teacher: "
                                                   "linear 8.0x | 6.0x, hybrid 4.0x | 3.0x")


def test_budget_skips_points_predicted_to_end_too_late(monkeypatch):
    """Fake points of 10 s (5 s prefill + 5 s decode) at 1K for the attention layouts: at 4K a run is
    predicted at 16 x 5 + 4 x 5 = 100 s (times 1 timed run + the memory run), past the 85 s left, and
    skipped with their longer lengths; linear (1 s at 1K) goes on."""
    monkeypatch.setattr(bench, "run_point_subprocess", lambda spec, timeout_s: {
        **_pt(spec["layout"], spec["L"], (1.0 if spec["layout"] == "linear" else 10.0) * spec["L"] / 1024, 1, 1),
        "prefill_all_s": [0.0], "decode_all_s": [0.0]})
    c = bench.resolve(bench.BenchConfig(lengths=[1024, 4096, 16384], parts=["model"], budget_s=100.0, repeats=1))
    pts = bench.model_section(c, __import__("time").time(), lambda rows: None)
    status = {(p["layout"], p["L"]): p["status"] for p in pts}
    assert [status[("linear", L)] for L in (1024, 4096, 16384)] == ["ok"] * 3
    for lay in ("hybrid", "teacher-seg", "teacher"):
        assert [status[(lay, L)] for L in (1024, 4096, 16384)] == ["ok"] + ["skipped (budget)"] * 2
    p = next(p for p in pts if p["layout"] == "teacher" and p["L"] == 1024)
    p["wall_s"] = 40.0                                   # 15 s of overhead + 10 s x (1 timed + 1.5 memory runs)
    assert bench.predict_s(c, [p], "teacher", 4096) == pytest.approx(15.0 + 100.0 * 2.5)
    q = next(p for p in pts if p["layout"] == "linear" and p["L"] == 1024)
    q["wall_s"] = 13.5                                   # 10 s + 1 s x (1 timed + 2.5 memory runs)
    assert bench.predict_s(c, [q], "linear", 4096) == pytest.approx(10.0 + (0.5 * 4 + 0.5) * 3.5)


def test_plot_ticks_are_plain_numbers(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1024, 131072], [11.5, 43.0], "o-", label="x")
    bench._axes(ax, [1024, 131072], "ms", "decode")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and all(float(s) > 0 for s in labels), labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1K", "128K"]
    plt.close(fig)


def test_killed_run_keeps_the_points_measured(tmp_path, monkeypatch):
    """A run interrupted after two model points leaves bench.partial.json with those two; a complete
    run removes it (bench.json holds everything)."""
    real, calls = bench.run_point_safe, []

    def interrupted(spec):
        if len(calls) == 2:
            raise KeyboardInterrupt                      # stands for a kill at the third point
        calls.append(spec)
        return real(spec)
    monkeypatch.setattr(bench, "run_point_safe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--parts", "table2", "model", "--out", str(tmp_path)])
    part = json.loads((tmp_path / "bench.partial.json").read_text())
    assert part["partial"] is True and not (tmp_path / "bench.json").exists()
    assert [(p["kind"], p["layout"]) for p in part["model_points"]] == [(s["kind"], s["layout"]) for s in calls]
    assert all(p["status"] == "ok" for p in part["model_points"])
    monkeypatch.setattr(bench, "run_point_safe", real)
    bench.main(["--smoke", "--parts", "table2", "--out", str(tmp_path)])
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.partial.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_on_gpu(tmp_path):
    res = bench.main(["--smoke", "--device", "cuda", "--out", str(tmp_path)])
    assert all(p["status"] == "ok" for p in res["model"]["points"]), res["model"]["points"]
    assert res["model"]["memory_metric"] == "peak_mib" and "ssd_triton" in res["kernel"]["kernels"]
    assert all(r["status"] == "ok" for r in res["kernel"]["results"]), res["kernel"]["results"]

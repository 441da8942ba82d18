"""Smoke test of the benchmark harness (benchmarks/): a tiny CPU run through the public entry
points, checking the files and their fields. Never asserts on speed."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

bench = pytest.importorskip("benchmarks.bench")
from benchmarks import impls as bench_impls  # noqa: E402
from benchmarks import presets  # noqa: E402
from benchmarks.bytes_model import min_bytes  # noqa: E402
from benchmarks.report import CSV_FIELDS  # noqa: E402

@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a loaded 2-core machine torch's OpenMP regions stall for whole scheduler
    slices, which makes the run slow (not wrong). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(device="cpu", min_run_time=0.003, rounds=1, time_budget=0, progress=False, chart=True)


def test_presets_cover_what_the_quick_run_promises():
    cases = presets.expand(presets.PRESETS["quick"])
    assert {c.layout for c in cases} == {"nchw", "nhwc"}
    assert {c.dtype for c in cases} == {"fp32"}
    assert {m for c in cases for m in c.modes} == set(presets.MODES)
    assert {3, 17, 1000} <= {c.shape[1] for c in cases}
    assert set(presets.VARIANTS) == {c.variant for c in cases}  # every Keras variant, next to plain
    # one torch.compile baseline: compiling costs tens of seconds on a small CPU
    assert [(c.shape, c.layout) for c in cases if c.compile] == [((8, 256, 14, 14), "nchw")]
    for name, preset in presets.PRESETS.items():
        assert presets.expand(preset), name
    assert presets.parse_shape("32x64x56x56") == (32, 64, 56, 56)
    with pytest.raises(ValueError, match="at least 2"):
        presets.parse_shape("7")


def test_tiny_cpu_run_writes_consistent_results(tmp_path):
    doc = bench.run(bench.BenchConfig(shapes=[(8, 3, 5, 5), (6, 7)], variants=list(presets.VARIANTS),
                                      out=str(tmp_path), **TINY))
    assert doc["failed"] is False
    names = {Path(f).name for f in doc["files"]}
    assert {"custom.json", "custom.csv", "custom.md"} <= names
    if os.environ.get("BN_CUDA_REQUIRE_TF") != "1":  # CI installs matplotlib: there the chart must exist
        pytest.importorskip("matplotlib")
    assert (tmp_path / "custom.png").stat().st_size > 0

    data = json.loads((tmp_path / "custom.json").read_text())
    for key in ("device_name", "torch", "torch_cuda", "cpu_model", "torch_threads", "bn_cuda_build"):
        assert key in data["machine"]
    assert "bytes_model" in data["settings"] and "timing" in data["settings"]
    plain = [r for r in data["rows"] if r["variant"] == "plain"]
    assert len(plain) == 3 * 4  # 8x3x5x5 in NCHW and NHWC, 6x7 in NC; four modes each
    for r in plain:
        assert r["check_ok"] is True, r
        assert r["impls"]["bn_cuda"]["ms"] > 0 and r["impls"]["torch"]["ms"] > 0
        assert r["speedup"]["torch"] > 0
        assert r["torch_backend"] == "native"
        shape = tuple(int(s) for s in r["shape"].split("x"))
        assert r["bytes"] == min_bytes(shape, torch.float32, r["mode"])
    for variant in ("layer", "ghost", "renorm", "ghost-renorm", "adjust"):
        rows = [r for r in data["rows"] if r["variant"] == variant]
        assert len(rows) == 3 * 3, variant  # training modes of the three cases; never inference
        for r in rows:
            if variant.startswith("ghost") and r["shape"] == "6x7":  # batch too small for ghost batches
                assert any(n.startswith("skipped") for n in r["notes"]), r
            else:  # timed against the composite path after agreeing with it
                assert r["check_ok"] is True and r["speedup"]["composite"] > 0, r
    summary = "\n".join(data["summary"])
    assert "fwd+bwd per variant" in summary and "adjust" in summary
    assert "relative to the plain layer" in summary

    with open(tmp_path / "custom.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        lines = list(reader)
    assert len(lines) == len(data["rows"])
    for line in lines:
        if line["variant"] == "plain":
            assert line["check_ok"] == "True" and float(line["speedup_vs_torch"]) > 0


def test_params_in_the_input_dtype(tmp_path, capsys):
    """--params input: the plain rows' weight, bias and running statistics in the input's dtype (a
    model converted with .bfloat16()), checked against torch with them, and said in the report."""
    rc = bench.main(["--shape", "6x5x3x3", "--dtype", "bf16,fp16", "--variant", "plain", "--params", "input",
                     "--device", "cpu", "--no-compile", "--min-run-time", "0.003", "--rounds", "1",
                     "--out", str(tmp_path), "--no-chart", "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "custom.json").read_text())
    assert "input's dtype" in data["settings"]["params"]
    assert len(data["rows"]) == 2 * 2 * 4 and all(r["check_ok"] is True for r in data["rows"])
    assert "running statistics (plain rows): the input's dtype" in (tmp_path / "custom.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--params", "fp64"])
    assert "--params" in capsys.readouterr().err


def test_failed_check_is_loud_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    def wrong(x, rm, rv, w, b, training, momentum, eps):
        return F.batch_norm(x, rm, rv, w, b, training, momentum, eps) * 1.5

    monkeypatch.setattr(bench_impls, "_bn_cuda_fn", wrong)
    rc = bench.main(["--shape", "4x3x2x2", "--layout", "nchw", "--mode", "inference", "--device", "cpu",
                     "--min-run-time", "0.003", "--rounds", "1", "--out", str(tmp_path), "--no-chart", "--no-progress"])
    assert rc == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "CORRECTNESS FAILURES" in out.out
    data = json.loads((tmp_path / "custom.json").read_text())
    assert data["failed"] is True and data["rows"][0]["check_ok"] is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_timing():
    """--cuda-graphs: bn_cuda's and torch's training calls are captured and replayed (graphed=True);
    a call that cannot be captured (a host sync) falls back to eager timing with a note."""
    from benchmarks.timing import Timing, TimingConfig, measure

    import bn_cuda

    x = torch.randn(8, 16, 7, 7, device="cuda")
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    fns = {
        "bn_cuda": lambda: bn_cuda.functional.batch_norm(x, rm, rv, training=True),
        "torch": lambda: F.batch_norm(x, rm, rv, training=True),
        "sync": lambda: x.sum().item(),
    }
    out = measure(fns, torch.device("cuda"), TimingConfig(cuda_graphs=True, gpu_min_reps=3, gpu_max_reps=5))
    for name in ("bn_cuda", "torch"):
        assert isinstance(out[name], Timing) and out[name].graphed and out[name].median_s > 0, out[name]
    assert isinstance(out["sync"], Timing) and not out["sync"].graphed and "capture failed" in out["sync"].note


def _result(device_name, stamp, times, graphed=False, preset="gpu-default", device="cuda"):
    rows = [{"group": "g", "shape": shape, "layout": "NCHW", "dtype": "fp16", "variant": "plain", "mode": mode,
             "impls": {"bn_cuda": {"status": "ok", "ms": ms, "graphed": graphed}, "torch": {"status": "ok", "ms": 2 * ms}},
             "speedup": {"torch": tq}} for (shape, mode, ms, tq) in times]
    return {"preset": preset, "rows": rows,
            "machine": {"device": device, "device_name": device_name, "timestamp_utc": stamp, "git_commit": stamp[-4:]}}


def test_compare_two_runs(tmp_path, capsys):
    """benchmarks/compare.py: per-case time ratios and ratios against torch, matched on the case;
    --against-latest picks the newest earlier run of the same preset, device type and timing, the
    same GPU model first."""
    from benchmarks import compare

    old = _result("H200", "2026-12-04T20:00:00Z", [("8x3x7x7", "inference", 0.2, 1.0), ("8x3x7x7", "backward", 0.1, 2.0),
                                                   ("1x1x1x1", "fwd-train", 0.1, 1.0)])
    new = _result("H200", "2026-12-06T10:00:00Z", [("8x3x7x7", "inference", 0.1, 2.0), ("8x3x7x7", "backward", 0.2, 1.0),
                                                   ("9x9x9x9", "fwd-train", 0.1, 1.0)])
    res = compare.compare(old, new)
    assert res["same_device"] and len(res["cases"]) == 2  # (the unmatched shapes dropped)
    by_mode = {c["key"][5]: c for c in res["cases"]}
    assert by_mode["inference"]["time_ratio"] == pytest.approx(2.0)
    assert by_mode["inference"]["vs_torch_ratio"] == pytest.approx(2.0)
    assert by_mode["backward"]["time_ratio"] == pytest.approx(0.5)
    text = compare.format_report(res, top=1)
    assert "| inference | 1 | 2.00x | 1 / 0 | 2.00x |" in text and "| backward | 1 | 0.50x | 0 / 1 | 0.50x |" in text
    assert "Different devices" not in text
    # --against-latest: the newest earlier eager gpu-default run, the same GPU model before a newer other one
    root = tmp_path / "results"
    for name, data in {"h200/a.json": old,
                       "h200/older.json": _result("H200", "2026-11-27T12:00:00Z", [("8x3x7x7", "inference", 9.0, 1.0)]),
                       "h100/newer.json": _result("H100", "2026-12-05T12:00:00Z", [("8x3x7x7", "inference", 9.0, 1.0)]),
                       "h200/graphs.json": _result("H200", "2026-12-05T13:00:00Z", [("8x3x7x7", "inference", 9.0, 1.0)],
                                                   graphed=True),
                       "cpu/quick.json": _result("EPYC", "2026-12-05T14:00:00Z", [], preset="quick", device="cpu"),
                       "h200/new.json": new}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    assert compare.latest_under(str(root), new) == str(root / "h200/a.json")
    h100_run = _result("H100", "2026-12-07T10:00:00Z", [("8x3x7x7", "inference", 0.1, 2.0)])
    assert compare.latest_under(str(root), h100_run) == str(root / "h100/newer.json")
    out = tmp_path / "cmp.md"
    assert compare.main(["--against-latest", str(root), str(root / "h200/new.json"), "--out", str(out)]) == 0
    assert "a.json" in capsys.readouterr().out and "| inference | 1 | 2.00x |" in out.read_text()
    assert "Different devices" in compare.format_report(compare.compare(old, h100_run))


def test_host_time_writes_every_row(tmp_path):
    """benchmarks/host_time.py (host microseconds per call against torch): every row measured, the
    files written. Times are not checked (a loaded CI machine decides them)."""
    from benchmarks import host_time

    doc = host_time.main(["--rounds", "1", "--calls", "3", "--out", str(tmp_path)])
    rows = doc["rows"]
    names = [r["call"] for r in rows]
    assert len(names) == len(set(names)) == 12
    for r in rows:
        assert r["ours_us"] > 0, r
        if r["call"].startswith("Keras layer"):
            assert r["torch_us"] is None and r["torch_over_ours"] is None
        else:
            assert r["torch_us"] > 0 and r["torch_over_ours"] == pytest.approx(r["torch_us"] / r["ours_us"], rel=0.02)
    saved = json.loads((tmp_path / "host-time.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["calls"] == 3
    text = (tmp_path / "host-time.md").read_text()
    assert all(f"| {n} |" in text for n in names)


def test_compile_eval_writes_every_row(tmp_path):
    """benchmarks/compile_eval.py (an evaluation-mode batch norm inside compiled models, torch's
    against ours four ways): every model and dtype measured, the same outputs as torch's model, the
    files written. (The eager backend: Inductor's compiles cost minutes on a small CPU; the device
    check runs Inductor.) Times are not checked."""
    from benchmarks import compile_eval

    doc = compile_eval.main(["--backend", "eager", "--rounds", "1", "--min-run-time", "0.001", "--shape", "2x5x6x6",
                             "--dtypes", "fp32,bf16", "--out", str(tmp_path)])
    rows = doc["rows"]
    assert [(r["model"], r["dtype"], r["layout"]) for r in rows] == [
        ("bn-relu", "float32", "contiguous"), ("conv-bn-relu", "float32", "contiguous"),
        ("bn-relu", "bfloat16", "channels_last"), ("conv-bn-relu", "bfloat16", "channels_last")]
    for r in rows:
        assert set(r["ms"]) == set(compile_eval.IMPLS) and all(v > 0 for v in r["ms"].values()), r
        assert r["torch_over"]["ours"] == pytest.approx(r["ms"]["torch"] / r["ms"]["ours"], rel=0.01)
        assert r["max_abs_diff"] <= (1e-5 if r["dtype"] == "float32" else 0.05), r
    saved = json.loads((tmp_path / "compile-eval.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "compile-eval.md").read_text().count("| bn-relu |") == 2

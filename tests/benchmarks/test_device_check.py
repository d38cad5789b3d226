"""benchmarks/device_check.py: the prepared accelerator check, run on the CPU (``--smoke``)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts benchmarks/ on sys.path for its sibling module
    return mod


def _check(out, *flags):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--smoke", *flags],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_both_files(tmp_path):
    p = _check(tmp_path, "--budget-scale", "4")  # the machine running CI is shared
    rep = json.loads((tmp_path / "device_check.json").read_text())
    assert p.returncode == 0, (p.stdout[-3000:], json.dumps(rep["sections"], default=str)[-3000:])
    secs = rep["sections"]
    assert list(secs) == ["matmul", "requant", "curvature", "run"]
    assert all(s["status"] == "ok" for s in secs.values())
    items = {i["name"]: i for s in secs.values() for i in s["items"]}
    assert items["exact: Pallas int8/uint8/int4 vs XLA int8 dot"]["exact"] is True
    tp = [i for n, i in items.items() if n.startswith("throughput")]
    assert len(tp) == 4 and all(i["exact"] for i in tp)
    assert {"xla int8", "bf16", "triton int8", "triton int4"} == set(tp[0]["tops"])
    assert secs["matmul"]["interpret"] is True
    # the sweep's fastest valid tile is proposed, and flagged as no measurement
    pd = rep["proposed_default"]
    assert pd["measured"] is False and pd["backend"] == "triton" and "kernels/tiles.py" in pd["where"]
    rq = [i for n, i in items.items() if n.startswith("requant")]
    assert rq and all(i["exact"] for i in rq)
    # hqjax's rows always; PyHessian's only where this interpreter has torch (else a note)
    cv = items["curvature mlp"]
    assert "trace" in cv["hqjax"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("pyhessian"):
        assert cv["agreement"]["hvp_rel"] < 1e-4 and "trace" in cv["ratios"]
    else:
        assert "ratios" not in cv
        assert any("skipped" in n for n in secs["curvature"]["notes"])
    # the per-example batching comparison: both ways timed, on the device loop
    pb = items["per-example batching resnet20"]
    assert pb["one vmap"]["s"] > 0 and pb["one pass at a time"]["s"] > 0
    run = next(i for n, i in items.items() if n.startswith("hqjax run"))  # matplotlib is here
    assert run["wall_s_job"] > 0 and "integer_only" in json.dumps(run["metrics"])
    # interpret-mode timings are never judged against the goals
    assert rep["goals"] and all(g["met"] is None for g in rep["goals"])
    md = (tmp_path / "device_check.md").read_text()
    assert sum(n.startswith("sweep") for n in items) == 2
    assert "## Per-example Gauss-Newton traces" in md
    assert "## Integer matmul" in md and "## Triton tile sweep" in md and "## Fused requant" in md and "## The whole job" in md


def test_a_section_past_its_limit_is_stopped_and_recorded(tmp_path):
    p = _check(tmp_path, "--sections", "run", "--budget-scale", "0.3")  # 7.5 s for `hqjax run`
    assert p.returncode == 1
    rep = json.loads((tmp_path / "device_check.json").read_text())
    run = rep["sections"]["run"]
    assert run["status"] in ("timeout", "partial"), run
    assert run["wall_s"] < 30
    assert "run" in (tmp_path / "device_check.md").read_text()


def test_bad_input_exits_2_before_writing(tmp_path, capsys):
    dc = _load()
    assert dc.main(["--out", str(tmp_path / "o"), "--sections", "matmul,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert dc.main(["--out", str(tmp_path / "o"), "--budget-scale", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_markdown_reports_failures_goals_and_skips():
    dc = _load()
    report = {
        "smoke": False, "device": {"device_kind": "NVIDIA H100", "platform": "gpu", "jax": "x"},
        "started": "t", "wall_s": 400.0, "budget_s": 450,
        "sections": {
            "matmul": {"status": "partial", "wall_s": 100, "limit_s": 130, "notes": [],
                       "items": [{"name": "throughput square 4096", "status": "ok",
                                  "shape": [4096, 4096, 4096], "tops": {"xla int8": 600.0, "triton int8": 500.0}},
                                 {"name": "sweep triton int8 at 4096^3 128/128/128/8/3", "status": "ok",
                                  "ms": 0.3, "tops": 450.0},
                                 {"name": "sweep triton int8 at 4096^3 256/256/64/8/3", "status": "error",
                                  "error": "lowering failed"}],
                       "goals": [{"goal": "triton int8 / XLA int8", "value": 500 / 600, "target": 0.8, "met": True},
                                 {"goal": "triton int8 / bf16", "value": 1.2, "target": 1.6, "met": False}]},
            "curvature": {"status": "timeout", "error": "stopped", "wall_s": 190, "limit_s": 190,
                          "items": [], "notes": ["PyTorch/PyHessian side skipped: no torch"], "goals": []},
        },
    }
    report["goals"] = report["sections"]["matmul"]["goals"]
    md = dc.markdown(report)
    assert "| square 4096 | 4096 | 4096 | 4096 | 600.000 | 500.000 |" in md
    assert "| triton int8 / XLA int8 | 0.83 | 0.8 | yes |" in md
    assert "| triton int8 / bf16 | 1.20 | 1.6 | NO |" in md
    assert "| 128 | 128 | 128 | 8 | 3 | 0.300 | 450.000 |" in md
    assert "| 256 | 256 | 64 | 8 | 3 |  | error: lowering failed |" in md
    assert "matmul / sweep triton int8 at 4096^3 256/256/64/8/3: error: lowering failed" in md
    assert "curvature: timeout: stopped" in md and "no torch" in md


def test_full_settings_are_valid_before_a_gpu_sees_them():
    # what only the GPU run uses, checked here: a typo must not cost a device session
    _load()
    import _device_sections as S

    import hqjax.kernels as K
    from hqjax.cli import build_parser, resolve_config

    for cfg in (S.FULL, S.SMOKE):
        for tile in cfg["sweep"]:
            K.TritonBlocks(*tile).check()
        args = build_parser().parse_args(["run", "--model", cfg["run_model"], "--out", "unused",
                                          *cfg["run_flags"]])
        config = resolve_config(args)
        assert config.model == cfg["run_model"] and config.epochs >= 1
        assert set(cfg["curvature"]["models"]) <= {"resnet20", "mlp", "encoder"}
    assert S.FULL["square"] == 4096 and S.FULL["curvature"]["models"] == ("resnet20", "encoder")
    dc = _load()
    assert sum(dc.BUDGET.values()) <= 450  # sections' limits; with start-up, under 8 minutes

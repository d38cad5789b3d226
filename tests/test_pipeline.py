"""The end-to-end job (hqjax/pipeline.py through hqjax/cli.py): outputs, consistency, resume.

One tiny job (3 epochs, 4 probes, 1 QAT epoch on digits) is shared by the module; the
resume test kills a second job's analysis part-way with SIGKILL in a subprocess, resumes
it, and compares with the shared uninterrupted job.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

import hqjax
from hqjax.cli import main
from hqjax.config import RunConfig

TINY = ["--model", "cnn", "--dataset", "digits", "--epochs", "3", "--probes", "4", "--hessian-examples", "64",
        "--hessian-batch", "64", "--top-k", "1", "--eig-iters", "4", "--density-steps", "6", "--qat-epochs", "1",
        "--calib-examples", "64", "--bits", "2,4,8", "--budget", "0.45", "--no-progress"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("HQJAX_CACHE")
    os.environ["HQJAX_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("HQJAX_CACHE", None)
    else:
        os.environ["HQJAX_CACHE"] = old


@pytest.fixture(scope="module")
def job(tmp_path_factory, cache_dir):
    out = str(tmp_path_factory.mktemp("job") / "out")
    assert main(["run", "--out", out, *TINY]) == 0
    return out


def _json(out, name):
    """A job's JSON output without its schema stamp (checked by read_json)."""
    from hqjax._workdir import read_json

    return read_json(os.path.join(out, name))


def test_every_output_exists_and_parses(job):
    for name in ("config.json", "sensitivity.json", "bit_config.json", "metrics.json", "allocation.json",
                 "pareto.json", "density.json", "train.json"):
        _json(job, name)
    for name in ("density.png", "traces.png", "bits.png", "pareto.png"):
        with open(os.path.join(job, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(os.path.join(job, "report.md")).read()
    for name in ("density.png", "traces.png", "bits.png", "pareto.png"):
        assert f"]({name})" in report
    # the integer model is exactly where the report says, and loads
    assert os.path.isdir(os.path.join(job, "int_model"))
    assert not [f for f in os.listdir(job) if f.startswith(".int_model")]  # no temporary left behind
    assert isinstance(hqjax.load_integer_model(os.path.join(job, "int_model")), hqjax.IntegerModel)


def test_outputs_agree(job):
    cfg = RunConfig.from_dict(_json(job, "config.json"))
    assert cfg.num_probes == 4 and cfg.weight_bits == (2, 4, 8)  # the exact config is saved
    sens = _json(job, "sensitivity.json")["layers"]
    bits = _json(job, "bit_config.json")
    metrics = _json(job, "metrics.json")
    assert [r["layer"] for r in sens] == list(bits) == ["conv1", "conv2", "dense"]
    for r in sens:
        # hawq_v3 reads traces only: no eigenvalues are computed for it
        assert r["trace_stderr"] >= 0 and r["n_params"] > 0 and r["top_eigenvalues"] == []
        assert 2 <= r["num_probes"] <= 4 and r["curvature"] == "hessian"
    # The ReLU CNN is piecewise linear in each layer: its Hessian blocks are the Gauss-Newton
    # blocks, so the probed remainder is 0 and every trace is the exact Gauss-Newton one.
    ggn = _json(job, os.path.join("analysis", "ggn.json"))["result"]
    assert ggn["block_names"] == [r["layer"] for r in sens]
    for r, g in zip(sens, ggn["traces"]):
        assert r["trace"] == pytest.approx(g, rel=1e-5) and r["trace_stderr"] <= 1e-6 * abs(r["trace"])
        p = {int(b): v for b, v in r["perturbation"].items()}
        assert p[2] > p[4] > p[8] >= 0  # fewer bits, larger ||Q(W) - W||^2
    assert all(b["weight_bits"] in (2, 4, 8) and b["act_bits"] == 8 for b in bits.values())
    # the bits satisfy the budget recorded in metrics.json, recomputed from the layer sizes
    costs = _json(job, "allocation.json")["costs_table"]
    size = sum(costs["n_weights"][n] * b["weight_bits"] / 8 + costs["n_bias"][n] * 4 for n, b in bits.items())
    budget = metrics["budget"]
    assert budget["kind"] == "size" and size == pytest.approx(budget["used"]) and size <= budget["value"] * (1 + 1e-9)
    # a fractional budget is a fraction of the allocated layers' INT8 size; the first and
    # last layer are pinned at 8 bits (edge_bits) and counted at that size
    int8 = {n: costs["n_weights"][n] + costs["n_bias"][n] * 4 for n in bits}
    assert budget["value"] == pytest.approx(0.45 * int8["conv2"] + int8["conv1"] + int8["dense"])
    assert bits["conv1"]["weight_bits"] == bits["dense"]["weight_bits"] == 8
    stages = metrics["stages"]
    assert set(stages) == {"full_precision", "ptq_fake_quant", "qat_fake_quant", "integer_only"}
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in stages.values())
    assert stages["full_precision"]["accuracy"] == pytest.approx(_json(job, "train.json")["test_accuracy"])
    assert stages["qat_fake_quant"]["size_bytes"] == pytest.approx(size)
    # integer-only inference tracks the fake-quant model it was converted from
    assert abs(stages["integer_only"]["accuracy"] - stages["qat_fake_quant"]["accuracy"]) < 0.05
    chosen = _json(job, "pareto.json")["chosen"]
    assert chosen["bits"] == {n: b["weight_bits"] for n, b in bits.items()}


def test_changed_budget_reruns_only_allocation_onwards(job, capsys):
    capsys.readouterr()
    assert main(["allocate", "--out", job, "--budget", "0.9"]) == 0
    log = capsys.readouterr().out
    assert "[train] up to date, skipped" in log and "[analyze] up to date, skipped" in log
    bits = _json(job, "bit_config.json")
    costs = _json(job, "allocation.json")["costs_table"]
    size = sum(costs["n_weights"][n] * b["weight_bits"] / 8 + costs["n_bias"][n] * 4 for n, b in bits.items())
    int8 = sum(costs["n_weights"][n] + costs["n_bias"][n] * 4 for n in bits)
    assert 0.45 * int8 < size <= 0.9 * int8  # a larger budget is used (more bits), and respected
    assert _json(job, "config.json")["budget"] == "0.9"


# The command in a process that SIGKILLs itself (a real, uncatchable kill) once argv[1]
# analysis units were written: the fault is injected here, the pipeline carries no hook.
_KILLED_AFTER_UNITS = """
import os, signal, sys
from hqjax import pipeline
from hqjax.cli import main

written = pipeline.Job.unit_written


def unit_written(self):
    written(self)
    if self.units_written >= int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)


pipeline.Job.unit_written = unit_written
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def killed_after_units():
    """``cmd(n, *argv)``: the ``hqjax`` command line run in a process killed after ``n`` units."""
    return lambda n, *argv: [sys.executable, "-c", _KILLED_AFTER_UNITS, str(n), *argv]


@pytest.mark.slow
def test_killed_analysis_resumes_to_identical_results(job, tmp_path, cache_dir, killed_after_units):
    out = str(tmp_path / "resumed")
    # the two processes share a persistent XLA cache, so the resumed one does not compile again
    env = {**os.environ, "HQJAX_CACHE": cache_dir, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    argv = ["analyze", "--out", out, *TINY]
    proc = subprocess.run(killed_after_units(2, *argv), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = sorted(os.listdir(os.path.join(out, "analysis")))
    # killed after the Gauss-Newton pass and one layer, nothing half-written
    assert done == ["ggn.json", "layer_000.json"]
    assert not os.path.exists(os.path.join(out, "sensitivity.json"))
    mtimes = {f: os.stat(os.path.join(out, "analysis", f)).st_mtime_ns for f in done}
    proc = subprocess.run([sys.executable, "-m", "hqjax.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done before, reused") == 1  # finished layers are not recomputed
    assert {f: os.stat(os.path.join(out, "analysis", f)).st_mtime_ns for f in done} == mtimes
    assert _json(out, "sensitivity.json") == _json(job, "sensitivity.json")
    assert _json(out, "density.json") == _json(job, "density.json")
    # the report of an analysis-only folder shows what exists and runs nothing else
    assert main(["report", "--out", out]) == 0
    made = set(os.listdir(out))
    assert {"density.png", "traces.png", "report.md"} <= made and not {"bits.png", "metrics.json"} & made


def test_sensitivity_json_of_the_job_is_read_by_the_alloc_command(job, tmp_path, capsys):
    """Round trip: hqjax run -> sensitivity.json -> python -m hqjax.alloc --table gives the job's bits."""
    from hqjax.alloc.cli import main as alloc_main
    from hqjax.quant import load_bit_config

    alloc = _json(job, "allocation.json")
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(alloc["costs_table"]))
    out = tmp_path / "bits.json"
    assert alloc_main(["--table", os.path.join(job, "sensitivity.json"), "--costs", str(costs), "--bits", "2,4,8",
                       "--budget", f"size={alloc['budget']!r}", "--metric", "hawq_v3", "--out", str(out)]) == 0
    assert load_bit_config(out) == load_bit_config(os.path.join(job, "bit_config.json"))


def test_every_json_output_carries_its_schema_and_versions(job):
    for root, _, files in os.walk(job):
        for name in files:
            if name.endswith(".json") and "int_model" not in root:
                with open(os.path.join(root, name)) as f:
                    doc = json.load(f)
                assert doc["schema_version"] == 1 and doc["schema"].startswith("hqjax."), (root, name)
                assert set(doc["versions"]) == {"hqjax", "jax", "flax"}


@pytest.mark.slow
def test_ggn_source_and_an_eigenvalue_metric_change_what_is_computed(job, tmp_path):
    import shutil

    from hqjax.pipeline import Job, stage_analyze

    out = str(tmp_path / "ggn")
    shutil.copytree(job, out)
    shutil.rmtree(os.path.join(out, "analysis"))
    cfg = RunConfig.from_dict(_json(job, "config.json")).replace(out=out, curvature="ggn", metric="hawq_v1")
    stage_analyze(Job(cfg, log=lambda s: None, progress=False))
    rows = _json(out, "sensitivity.json")["layers"]
    base = _json(job, "sensitivity.json")["layers"]
    assert [r["layer"] for r in rows] == [r["layer"] for r in base]
    for r, b in zip(rows, base):
        # exact Gauss-Newton traces (no probe error), and hawq_v1 gets its top eigenvalue
        assert r["curvature"] == "ggn" and r["trace_stderr"] == 0 and r["trace"] > 0
        assert len(r["top_eigenvalues"]) == 1
        # the Gauss-Newton trace is within a factor of a few of the Hessian trace
        assert 0.2 < r["trace"] / b["trace"] < 5
    assert os.path.exists(os.path.join(out, "analysis", "ggn.json"))


def test_edge_bits_pin_the_first_and_last_layer_in_call_order():
    """Call order, not name order, decides the edges; the ILP then chooses the rest exactly."""
    import itertools

    from hqjax.alloc import LayerCosts
    from hqjax.pipeline import _allocate, edge_layers, resolve_budget

    names = ["z_stem", "b", "a", "c", "head"]  # the order layer_shapes records calls in
    n = dict(zip(names, (72, 900, 1400, 600, 330)))
    costs = LayerCosts(n_weights=n, macs={k: 10 * v for k, v in n.items()}, n_bias={k: 8 for k in names})
    scores = {k: {b: (i + 1) * 4.0 ** -b for b in (2, 4, 8)} for i, k in enumerate(names)}
    cfg = RunConfig(budget=0.4, weight_bits=(2, 4, 8))
    assert edge_layers(cfg, costs.names) == {"z_stem": (8, 8), "head": (8, 8)}
    size = lambda k, b: costs.cost("size", k, b, 8)  # noqa: E731
    limit = resolve_budget(cfg, costs, costs.names)
    assert limit == pytest.approx(0.4 * sum(size(k, 8) for k in ("b", "a", "c")) + size("z_stem", 8) + size("head", 8))
    got = _allocate(scores, costs, cfg, limit).weight_bits
    best = min((c for c in itertools.product((2, 4, 8), repeat=3)
                if size("z_stem", 8) + size("head", 8) + sum(size(k, b) for k, b in zip(("b", "a", "c"), c)) <= limit),
               key=lambda c: sum(scores[k][b] for k, b in zip(("b", "a", "c"), c)))
    assert got == {"z_stem": 8, "b": best[0], "a": best[1], "c": best[2], "head": 8}
    free = cfg.replace(edge_bits=None)
    assert edge_layers(free, costs.names) == {}
    assert resolve_budget(free, costs, costs.names) == pytest.approx(0.4 * sum(size(k, 8) for k in names))
    limit = resolve_budget(free, costs, costs.names)
    best = min((c for c in itertools.product((2, 4, 8), repeat=5) if sum(size(k, b) for k, b in zip(names, c)) <= limit),
               key=lambda c: sum(scores[k][b] for k, b in zip(names, c)))
    assert _allocate(scores, costs, free, limit).weight_bits == dict(zip(names, best))
    assert best[0] < 8 or best[-1] < 8  # the pins mattered


def test_make_quantize_finetune_serves_every_configuration_of_a_user_model(tmp_path):
    """One fine-tune function for a model hqjax has never seen: each configuration gets the
    numbers of the job's own per-configuration path, and its integer model agrees."""
    import jax
    import numpy as np

    from hqjax.data import load_digits
    from hqjax.pipeline import make_quantize_finetune, quantize_finetune
    from tests.user_models import ProjectionResNet, init_linen

    d = load_digits()
    data = (d.x_train[:256], d.y_train[:256], d.x_test[:128], d.y_test[:128])
    model = ProjectionResNet()
    job = hqjax.run(model, init_linen(model), data, out=str(tmp_path / "out"), until="train", qat_epochs=1,
                    batch_size=64, calib_examples=64, log=lambda s: None, progress=False)
    names = list(job.blocks.names)
    template = hqjax.uniform_bit_config(names, 8, 8)
    finetune = make_quantize_finetune(job, template, pack_int4=False)
    rng = np.random.default_rng(0)
    for _ in range(2):
        cfg = {n: {"weight_bits": int(rng.choice([2, 4, 8])), "act_bits": int(rng.choice([4, 8]))} for n in names}
        r = finetune(cfg)
        qmodel, ptq, qat, integer = quantize_finetune(job, cfg)
        jax.tree.map(np.testing.assert_array_equal, r.ptq["quant_stats"], ptq["quant_stats"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), r.qat["params"],
                     qat["params"])
        fq = np.asarray(r.qmodel.apply(r.qat, data[2], bit_widths=r.bit_widths))
        np.testing.assert_allclose(fq, np.asarray(qmodel.apply(qat, data[2])), rtol=1e-3, atol=1e-3)
        agree = np.mean(np.asarray(r.integer(data[2])).argmax(-1) == fq.argmax(-1))
        assert agree >= 0.95, agree

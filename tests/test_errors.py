"""Bad input at every entry point (hqjax/_errors.py): one line, exit code 2, in seconds, nothing written.

The table runs ``hqjax`` (run, analyze, report), ``hqjax sweep`` and ``python -m hqjax.alloc``
in-process with the arguments a user could get wrong, and asserts for each: exit code 2,
exactly one line on stderr naming the problem (no traceback), the time it took (user errors
are found before training or solving), and that the output folder holds no new file. A few
real subprocess runs check the console entry points, and the public API raises clear
exceptions for the same mistakes.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import hqjax
from hqjax._bits import ACT_BITS, WEIGHT_BITS
from hqjax._schema import SCHEMA_VERSION, sensitivity_document, stamp
from hqjax.alloc.cli import main as alloc_main
from hqjax.cli import main as hqjax_main
from hqjax.config import RunConfig, UserError

LIMIT_S = 20.0  # generous for a loaded 2-core machine; training alone takes longer


def _write(path, obj):
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _rows():
    # rows in the form hqjax analyze writes them (extra fields: index, avg_trace, ...)
    return [{"layer": n, "index": i, "n_params": 10, "n_weights": 9, "trace": t, "trace_stderr": 0.1,
             "num_probes": 4, "avg_trace": t / 10, "top_eigenvalues": [t], "perturbation": {"4": 1.0, "8": 0.1},
             "weight_norm_sq": 1.0} for i, (n, t) in enumerate([("a", 1.0), ("b", 2.0), ("c", 0.5)])]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Input files, good and bad, shared by the table (never written to by the commands)."""
    d = tmp_path_factory.mktemp("inputs")
    _write(d / "sens.json", sensitivity_document(_rows(), model="toy"))
    _write(d / "costs.json", hqjax.LayerCosts({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}).to_dict())
    _write(d / "costs_missing.json", hqjax.LayerCosts({"a": 10}, {"a": 1}).to_dict())
    _write(d / "corrupt.json", '{"layers": [')
    _write(d / "newer.json", {**sensitivity_document(_rows()), "schema_version": SCHEMA_VERSION + 98})
    _write(d / "bitcfg.json", stamp("bit_config", {"a": {"weight_bits": 8, "act_bits": 8}}))
    _write(d / "empty.json", sensitivity_document([]))
    _write(d / "afile", "not a folder")
    os.makedirs(d / "newer_out")
    _write(d / "newer_out" / "config.json", {**stamp("config", {"seed": 1}), "schema_version": 99})
    return d


def _listing(folder):
    return sorted((os.path.relpath(os.path.join(r, f), folder), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(folder) for f in fs)


# (entry point, arguments with {d} = inputs and {t} = this test's empty folder, text in the message)
CASES = [
    # hqjax run / analyze / report (the output folder is {t}/out unless the case names another)
    ("hqjax", "--bits 1,8", "[1] cannot be quantized"),
    ("hqjax", "--bits 4,16 --act-bits 12", "[16] cannot be quantized"),
    ("hqjax", "--act-bits 12", "act_bits=12 is not a supported activation width"),
    ("hqjax", "--bits two,four", "comma-separated integers"),
    ("hqjax", "--model nosuch", "unknown model 'nosuch'"),
    ("hqjax", "--dataset nosuch", "unknown dataset 'nosuch'"),
    ("hqjax", "--metric nosuch", "unknown metric 'nosuch'"),
    ("hqjax", "--budget abc", "cannot read budget 'abc'"),
    ("hqjax", "--budget 0.01 --bits 4,8", "smallest feasible size budget"),
    ("hqjax", "--budget-kind flops", "invalid choice: 'flops'"),
    ("hqjax", "--epochs 0", "epochs must be a positive integer"),
    ("hqjax", "--learning-rate 0", "learning_rate must be a positive number"),
    ("hqjax", "--config {d}/missing.toml", "does not exist"),
    ("hqjax", "--config {d}/corrupt.json", "cannot read config file"),
    ("hqjax", "--no-such-flag", "unrecognized arguments: --no-such-flag"),
    ("hqjax", "--out {d}/afile/out", "is a file"),
    ("hqjax", "--out {d}/newer_out", "newer than this hqjax"),
    ("hqjax analyze", "--top-k 0", "top_k must be a positive integer"),
    ("hqjax report", "", "holds no hqjax results"),
    # hqjax sweep (output folder {t}/sweep)
    ("sweep", "--metrics nosuch", "unknown metric(s) ['nosuch']"),
    ("sweep", "--subsets 0", "--subsets must be a positive integer"),
    ("sweep", "--subset-size 0", "--subset-size must be a positive integer"),
    ("sweep", "--model nosuch", "unknown model 'nosuch'"),
    ("sweep", "--dataset nosuch", "unknown dataset 'nosuch'"),
    ("sweep", "--params {d}/missing.msgpack", "does not exist"),
    ("sweep", "--params {d}/corrupt.json", "not a flax.serialization msgpack file"),
    pytest.param("sweep", "--layers nosuch", "not layers of 'cnn'", marks=pytest.mark.slow),  # loads the data
    pytest.param("sweep", "--subsets 100 --subset-size 128", "need 12800 examples", marks=pytest.mark.slow),
    ("sweep", "--tol 0", "--tol must be positive"),
    ("sweep", "--eigen-method qr", "invalid choice: 'qr'"),
    # python -m hqjax.alloc (good table and costs unless overridden; --out {t}/bits.json)
    ("alloc", "--table {d}/missing.json", "does not exist"),
    ("alloc", "--table {d}/corrupt.json", "is not valid JSON"),
    ("alloc", "--table {d}/newer.json", "newer than this hqjax"),
    ("alloc", "--table {d}/bitcfg.json", "not 'hqjax.sensitivity'"),
    ("alloc", "--table {d}/empty.json", "has no layers"),
    ("alloc", "--costs {d}/corrupt.json", "is not valid JSON"),
    ("alloc", "--costs {d}/costs_missing.json", "have no costs"),
    ("alloc", "--metric nosuch", "unknown metric 'nosuch'"),
    ("alloc", "--fix nosuch=8", "no layer 'nosuch'"),
    ("alloc", "--fix a=x", "use LAYER=BITS"),
    ("alloc", "--fix a=16", "16 bits cannot be quantized"),
    ("alloc", "--bits 2,4,8", "no weight perturbation for 2 bits"),
    ("alloc", "--bits 1,8", "weight bits [1] cannot be quantized"),
    ("alloc", "--act-bits 12", "activation bits [12] cannot be quantized"),
    ("alloc", "--import no_such_module_xyz", "--import 'no_such_module_xyz' failed"),
    ("alloc", "--backend GUROBI", "unknown backend 'GUROBI'"),
    ("alloc", "--budget size=1", "no bit assignment meets the budgets"),
    ("alloc", "--budget flops=3", "KIND one of size, bops, latency"),
    ("alloc", "--tie a,nosuch", "no layers ['nosuch']"),
    ("alloc", "--out {d}/nodir/bits.json", "not a writable folder"),
    ("alloc", "--time-limit 0", "--time-limit must be positive"),
    ("alloc", "--budget latency=5", "needs a latency table"),
]


def _argv(entry, text, d, t):
    extra = text.format(d=d, t=t).split()
    if entry.startswith("hqjax"):
        command = entry.split()[1] if " " in entry else "run"
        return hqjax_main, "hqjax", [command, "--out", f"{t}/out", "--no-progress", *extra]
    if entry == "sweep":
        return hqjax_main, "hqjax sweep", ["sweep", "--out", f"{t}/sweep", *extra]
    base = ["--table", f"{d}/sens.json", "--costs", f"{d}/costs.json", "--bits", "4,8", "--budget", "size=alpha:0.5",
            "--out", f"{t}/bits.json"]
    return alloc_main, "python -m hqjax.alloc", [*base, *extra]


def _check_one_line(err, prog, expected):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.match(rf"{re.escape(prog)}( [a-z]+)?: error: ", lines[0]), lines[0]  # 'hqjax run: error: ...' too
    assert expected in lines[0], lines[0]


def _id(case):
    entry, text, _ = case.values if hasattr(case, "values") else case
    return f"{entry}:{text or 'no-args'}"


@pytest.mark.parametrize("entry,text,expected", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_in_seconds_writing_nothing(entry, text, expected, d, tmp_path, capsys):
    fn, prog, argv = _argv(entry, text, d, tmp_path)
    before = _listing(d)
    t0 = time.perf_counter()
    try:
        code = fn(argv)
    except SystemExit as e:  # argparse's exit for bad flags
        code = e.code
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    _check_one_line(err, prog, expected)
    assert elapsed < LIMIT_S
    assert _listing(tmp_path) == [], "the output folder holds files after a user error"
    assert _listing(d) == before


@pytest.mark.parametrize("fn,argv,prog,expected", [
    (alloc_main, ["--table", "x.json"], "python -m hqjax.alloc", "--table and --costs are required"),
    (hqjax_main, ["sweep"], "hqjax sweep", "the following arguments are required: --out"),
    (hqjax_main, ["frobnicate"], "hqjax", "invalid choice: 'frobnicate'"),
])
def test_missing_required_arguments(fn, argv, prog, expected, capsys):
    try:
        code = fn(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    _check_one_line(capsys.readouterr().err, prog, expected)


def test_a_bug_is_exit_1_with_its_traceback(tmp_path, capsys, monkeypatch):
    import hqjax.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(hqjax.pipeline, "run_stages", broken)
    assert hqjax_main(["run", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: simulated bug" in err and "bug in hqjax" in err


# ----------------------------------------------------------------------------- real processes
def _hqjax_command():
    script = os.path.join(os.path.dirname(sys.executable), "hqjax")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "hqjax.cli"]


@pytest.mark.parametrize("cmd,expected", [
    (lambda t: [*_hqjax_command(), "--bits", "1,8", "--out", f"{t}/out"], "hqjax: error: weight_bits"),
    (lambda t: [*_hqjax_command(), "sweep", "--subsets", "0", "--out", f"{t}/sweep"],
     "hqjax sweep: error: --subsets must be a positive integer"),
    (lambda t: [sys.executable, "-m", "hqjax.alloc", "--table", f"{t}/missing.json", "--costs", f"{t}/c.json"],
     "python -m hqjax.alloc: error: file"),
])
def test_console_entry_points_in_a_subprocess(cmd, expected, tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(expected), proc.stderr
    assert proc.stdout == ""
    assert elapsed < 60.0  # process start and imports included
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------- the API
def _api_cases(d):
    return [
        (lambda: hqjax.load_bit_config(d / "corrupt.json"), ValueError, "corrupt.json' is not valid JSON"),
        (lambda: hqjax.load_bit_config(d / "missing.json"), ValueError, "missing.json' does not exist"),
        (lambda: hqjax.load_bit_config(d / "sens.json"), ValueError, "not 'hqjax.bit_config'"),
        (lambda: hqjax.allocate(hqjax.SensitivityTable({}), hqjax.LayerCosts({"a": 1}, {"a": 1}), {}, (4, 8)), ValueError,
         "sensitivity table has no layers"),
        (lambda: hqjax.allocate({"a": {4: 1.0, 8: 0.0}}, hqjax.LayerCosts({"a": 1}, {"a": 1}), {}, (4, 8),
                                act_candidates="follow"), ValueError, "'weights'"),
        (lambda: RunConfig(weight_bits=(1, 8)), UserError, "[1] cannot be quantized"),
        (lambda: RunConfig(act_bits=12), UserError, "act_bits=12"),
        (lambda: hqjax.SensitivityTable.from_json(str(d / "newer.json")), ValueError, "newer than this hqjax"),
        (lambda: hqjax.SensitivityTable.from_json(str(d / "corrupt.json")), ValueError, "corrupt.json"),
        (lambda: hqjax.save_bit_config({"a": {"weight_bits": 16, "act_bits": 8}}, d / "never.json"), ValueError,
         "weight_bits=16 is not supported"),
    ]


@pytest.mark.parametrize("i", range(10))
def test_the_api_raises_a_clear_exception(i, d):
    call, exc, text = _api_cases(d)[i]
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)
    assert not os.path.exists(d / "never.json")


def test_one_bit_width_policy_for_config_quantizers_and_bit_configs():
    from hqjax.quant import QuantSpec, validate_bit_config

    def accepts(f):
        try:
            f()
            return True
        except (ValueError, UserError):
            return False

    for b in range(0, 33):
        config = accepts(lambda: RunConfig(weight_bits=(b,)))
        bitcfg = accepts(lambda: validate_bit_config({"x": {"weight_bits": b, "act_bits": 8}}))
        assert config == bitcfg == (b in WEIGHT_BITS), b
        if config:
            assert accepts(lambda: QuantSpec(bits=b))
        act = accepts(lambda: RunConfig(act_bits=b))
        assert act == accepts(lambda: validate_bit_config({"x": {"weight_bits": 8, "act_bits": b}})) == (b in ACT_BITS)
        if act:
            assert accepts(lambda: QuantSpec(bits=b, mode="unsigned"))


# ----------------------------------------------------------------------------- help and logging
@pytest.mark.parametrize("fn,argv", [(hqjax_main, ["run", "--help"]), (hqjax_main, ["sweep", "--help"]),
                                     (alloc_main, ["--help"])])
def test_help_shows_defaults_without_markup(fn, argv, capsys):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "default" in out and "``" not in out and ":func:" not in out
    assert "--quiet" in out and "--verbose" in out


def test_quiet_and_verbose_set_the_hqjax_logger(d, tmp_path, capsys):
    import logging

    logger = logging.getLogger("hqjax")
    args = ["--table", f"{d}/sens.json", "--costs", f"{d}/costs.json", "--bits", "4,8", "--budget", "size=20"]
    assert alloc_main([*args, "-q"]) == 0
    assert logger.level == logging.WARNING
    assert alloc_main([*args, "-v", "--backend", "HIGHS"]) == 0
    assert logger.level == logging.DEBUG
    captured = capsys.readouterr()
    assert "Highs" not in captured.out  # solver output, if any, went to the log
    assert alloc_main(args) == 0
    assert logger.level == logging.INFO
    assert sum(getattr(h, "_hqjax_cli", False) for h in logger.handlers) == 1


# ----------------------------------------------------------------------------- one schema
def test_sensitivity_written_like_hqjax_run_is_read_by_the_alloc_command(d, tmp_path, capsys):
    out = tmp_path / "bits.json"
    assert alloc_main(["--table", f"{d}/sens.json", "--costs", f"{d}/costs.json", "--bits", "4,8",
                       "--budget", "size=20", "--out", str(out)]) == 0
    table = hqjax.SensitivityTable.from_json(str(d / "sens.json"))
    assert table.names == ("a", "b", "c") and table["b"].eigenvalues == (2.0,) and table["b"].trace == 2.0
    costs = hqjax.LayerCosts({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1})
    expected = hqjax.allocate(table, costs, {"size": 20.0}, (4, 8)).bit_config
    assert hqjax.load_bit_config(out) == expected
    written = json.loads(out.read_text())
    assert written["schema"] == "hqjax.bit_config" and written["schema_version"] == SCHEMA_VERSION
    assert set(written["versions"]) == {"hqjax", "jax", "flax"}


def test_table_round_trip_and_version_0_files_migrate(tmp_path):
    table = hqjax.SensitivityTable({"a": hqjax.LayerSensitivity(10, {4: 1.0}, trace=1.0, eigenvalues=(3.0, 1.0))})
    doc = json.loads(table.to_json())
    assert doc["schema"] == "hqjax.sensitivity" and doc["layers"][0]["top_eigenvalues"] == [3.0, 1.0]
    assert hqjax.SensitivityTable.from_dict(doc) == table
    # version 0, both layouts: SensitivityTable.to_dict's mapping and hqjax run's layer list
    old_table = {"a": {"n_params": 10, "perturbation": {"4": 1.0}, "trace": 1.0, "eigenvalues": [3.0, 1.0]}}
    assert hqjax.SensitivityTable.from_dict(old_table) == table
    old_run = {"model": "cnn", "layers": [{"layer": "a", "n_params": 10, "perturbation": {"4": 1.0}, "trace": 1.0,
                                           "top_eigenvalues": [3.0, 1.0], "index": 0, "avg_trace": 0.1}]}
    assert hqjax.SensitivityTable.from_dict(old_run) == table
    np.testing.assert_equal(json.loads(json.dumps(doc))["versions"]["jax"], __import__("jax").__version__)


@pytest.mark.slow
def test_an_unwritable_weights_cache_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from hqjax.data import load_dataset
    from hqjax.models import get_model
    from hqjax.train import TrainConfig, train_cached

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HQJAX_CACHE", str(blocker / "cache"))  # under a file: nothing can be created there
    data = load_dataset("digits", None, seed=0)
    data = dataclasses.replace(data, x_train=data.x_train[:64], y_train=data.y_train[:64])
    with caplog.at_level("WARNING", logger="hqjax"):
        variables, cached = train_cached(get_model("mlp", num_classes=data.num_classes), "mlp", data,
                                         TrainConfig(epochs=1, batch_size=32), progress=False)
    assert not cached and "params" in variables
    assert "could not write the trained-weights cache" in caplog.text
    shutil.rmtree(tmp_path, ignore_errors=True)

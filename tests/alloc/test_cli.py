"""``python -m hqjax.alloc``: tables and costs from JSON, metrics by name, BitConfig out."""

import json
import sys

import hqjax
from hqjax.alloc import sensitivity as sens
from hqjax.alloc.cli import main


def _write_inputs(tmp_path):
    table = hqjax.SensitivityTable({
        "a": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, trace=1.0, weight_norm_sq=1.0),
        "b": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, trace=2.0, weight_norm_sq=100.0),
        "c": hqjax.LayerSensitivity(10, {4: 1.0, 8: 0.1}, trace=0.5, weight_norm_sq=1.0),
    })
    costs = hqjax.LayerCosts({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1})
    table.to_json(str(tmp_path / "t.json"))
    (tmp_path / "c.json").write_text(json.dumps(costs.to_dict()))
    return ["--table", str(tmp_path / "t.json"), "--costs", str(tmp_path / "c.json"), "--bits", "4,8"]


def test_cli_allocates_with_a_user_metric_imported_by_module(tmp_path, monkeypatch, capsys):
    args = _write_inputs(tmp_path)
    (tmp_path / "my_metrics.py").write_text(
        "import hqjax\n\n@hqjax.register_metric('cli_trace_per_norm')\n"
        "def m(row, bits):\n    return row.trace * row.perturbation[bits] / row.weight_norm_sq\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "bits.json")
    try:
        # hawq_v3: b is the most sensitive (trace 2); one layer fits at 8 bits (sizes 5/10 B each).
        assert main(args + ["--budget", "size=20", "--out", out]) == 0
        assert hqjax.load_bit_config(out)["b"]["weight_bits"] == 8
        # The user metric divides by ||W||^2 = 100 for b, so a (trace 1) wins the 8 bits instead.
        assert main(args + ["--budget", "size=20", "--metric", "cli_trace_per_norm", "--import", "my_metrics", "--out", out]) == 0
        cfg = hqjax.load_bit_config(out)  # activations at 8 bits: the default policy (hqjax._bits)
        assert cfg == {"a": {"weight_bits": 8, "act_bits": 8}, "b": {"weight_bits": 4, "act_bits": 8}, "c": {"weight_bits": 4, "act_bits": 8}}
        assert json.load(open(out))["schema"] == "hqjax.bit_config"
        assert main(["--list-metrics"]) == 0
        assert "cli_trace_per_norm" in capsys.readouterr().out
    finally:
        sens._METRICS.pop("cli_trace_per_norm", None)
        sys.modules.pop("my_metrics", None)


def test_cli_reports_an_infeasible_budget(tmp_path, capsys):
    args = _write_inputs(tmp_path)
    assert main(args + ["--budget", "size=alpha:0.5", "--fix", "a=8", "--fix", "b=8", "--budget", "bops=100"]) == 2
    assert "smallest feasible" in capsys.readouterr().err

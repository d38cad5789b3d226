"""RunConfig, budgets, fingerprints and config precedence (hqjax/config.py, hqjax/cli.py)."""

import json

import pytest

from hqjax.cli import build_parser, resolve_config
from hqjax.config import RunConfig, UserError, load_config_file, parse_budget, stage_fingerprints


@pytest.mark.parametrize("budget, expected", [
    (0.5, ("fraction", 0.5)), ("50%", ("fraction", 0.5)), ("0.25", ("fraction", 0.25)),
    ("12k", ("absolute", 12000.0)), ("3.5M", ("absolute", 3.5e6)), (2048, ("absolute", 2048.0)),
])
def test_parse_budget(budget, expected):
    assert parse_budget(budget) == expected


@pytest.mark.parametrize("bad", ["-1", "half", 0, "0%", True])
def test_parse_budget_rejects(bad):
    with pytest.raises(UserError, match="budget"):
        parse_budget(bad)


def test_fingerprints_change_only_downstream():
    base = stage_fingerprints(RunConfig())
    changed = stage_fingerprints(RunConfig(budget=0.3))
    assert [s for s in base if base[s] == changed[s]] == ["train", "analyze"]
    probes = stage_fingerprints(RunConfig(num_probes=7))
    assert probes["train"] == base["train"] and all(probes[s] != base[s] for s in list(base)[1:])


def test_unknown_key_lists_valid_ones():
    with pytest.raises(UserError, match="valid keys are .*budget"):
        RunConfig.from_dict({"budgit": 0.5})


def test_weight_bits_from_string_and_validation():
    assert RunConfig(weight_bits="2, 4,8").weight_bits == (2, 4, 8)
    with pytest.raises(UserError, match="weight_bits"):
        RunConfig(weight_bits=(0, 4))
    with pytest.raises(UserError, match="budget kind"):
        RunConfig(budget_kind="energy")


def test_edge_bits_setting():
    assert RunConfig().edge_bits == 8
    with pytest.raises(UserError, match="edge_bits=9.*--edge-bits none"):
        RunConfig(edge_bits=9)
    args = build_parser().parse_args(["run", "--edge-bits", "none"])
    assert resolve_config(args).edge_bits is None
    assert resolve_config(build_parser().parse_args(["run", "--edge-bits", "4"])).edge_bits == 4
    assert stage_fingerprints(RunConfig(edge_bits=None))["analyze"] == stage_fingerprints(RunConfig())["analyze"]
    assert stage_fingerprints(RunConfig(edge_bits=None))["allocate"] != stage_fingerprints(RunConfig())["allocate"]


def test_precedence_saved_then_file_then_flags(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**RunConfig().to_dict(), "out": str(out), "seed": 5, "epochs": 2, "metric": "hawq_v2"}))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[hqjax]\nout = "{out}"\nepochs = 3\nbudget = "40%"\n')
    args = build_parser().parse_args(["allocate", "--config", str(toml), "--budget", "0.3"])
    cfg = resolve_config(args)
    assert (cfg.seed, cfg.metric) == (5, "hawq_v2")  # from the folder's saved config
    assert cfg.epochs == 3  # the file overrides the saved config
    assert cfg.budget == "0.3"  # the flag overrides the file


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read config file"):
        load_config_file(str(bad))


def test_analysis_reruns_for_a_metric_change_only_when_eigenvalues_become_needed():
    v3 = stage_fingerprints(RunConfig(metric="hawq_v3"))
    assert stage_fingerprints(RunConfig(metric="hawq_v2"))["analyze"] == v3["analyze"]
    assert stage_fingerprints(RunConfig(metric="hawq_v1"))["analyze"] != v3["analyze"]
    assert stage_fingerprints(RunConfig(curvature="ggn"))["analyze"] != v3["analyze"]


@pytest.mark.parametrize("bad", [{"curvature": "fischer"}, {"trace_rtol": 0}, {"trace_rtol": 1.5}])
def test_curvature_and_trace_rtol_are_validated(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        RunConfig(**bad)

"""Bad input at the command line: a message that says what would work, and exit code 2."""

import os
import subprocess
import sys

import pytest

from hqjax.cli import EXIT_USER, main
from hqjax.config import RunConfig, UserError
from hqjax.pipeline import Job, check_budget

FAST = ["--epochs", "1", "--probes", "2", "--hessian-examples", "64", "--hessian-batch", "64", "--top-k", "1",
        "--eig-iters", "2", "--density-steps", "4", "--no-progress"]


def _fails(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER, err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_model_lists_models(tmp_path, capsys):
    _fails(["run", "--out", str(tmp_path), "--model", "vgg"], capsys, "unknown model 'vgg'", "cnn", "resnet20")


def test_model_that_does_not_take_the_data_is_refused_before_writing(tmp_path, capsys):
    err = _fails(["run", "--out", str(tmp_path / "o"), "--model", "bert_tiny"], capsys,
                 "model 'bert_tiny' does not take the data's inputs (one example: shape (8, 8, 1))", "token ids")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_settings_integer_inference_cannot_take_are_refused_before_training(tmp_path, capsys):
    err = _fails(["run", "--out", str(tmp_path / "o"), "--act-bits", "16", *FAST], capsys,
                 "integer-only inference cannot lower this model", "act_bits=16 > 8")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_float_islands_flag_reaches_the_config_and_only_its_stage(tmp_path):
    from hqjax.cli import build_parser, resolve_config
    from hqjax.config import stage_fingerprints

    on = resolve_config(build_parser().parse_args(["run", "--out", str(tmp_path), "--float-islands"]))
    off = resolve_config(build_parser().parse_args(["run", "--out", str(tmp_path)]))
    assert on.float_islands and not off.float_islands
    a, b = stage_fingerprints(on), stage_fingerprints(off)
    assert [s for s in a if a[s] != b[s]] == ["quantize", "evaluate", "report"]


def test_unknown_dataset_lists_datasets(tmp_path, capsys):
    _fails(["run", "--out", str(tmp_path), "--dataset", "imagenet"], capsys, "unknown dataset 'imagenet'", "digits",
           "mnist_subset", "--data-dir")


def test_unknown_metric_lists_metrics(tmp_path, capsys):
    _fails(["run", "--out", str(tmp_path), "--metric", "hawq_v9"], capsys, "unknown metric 'hawq_v9'", "hawq_v3")


def test_missing_tfds_data_dir_says_how_to_prepare(tmp_path, capsys):
    _fails(["run", "--out", str(tmp_path / "o"), "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")],
           capsys, "does not exist", "download_and_prepare")


def test_unknown_config_key_and_bad_budget(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"modle": "cnn"}')
    _fails(["run", "--out", str(tmp_path / "o"), "--config", str(cfg)], capsys, "unknown config key", "model")
    _fails(["run", "--out", str(tmp_path / "o"), "--budget", "lots"], capsys, "cannot read budget")


def test_infeasible_budget_names_smallest_feasible_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HQJAX_CACHE", str(tmp_path / "cache"))
    err = _fails(["allocate", "--out", str(tmp_path / "o"), "--bits", "4,8", "--budget", "0.1", *FAST], capsys,
                 "infeasible", "smallest feasible size budget")
    assert not os.path.exists(tmp_path / "cache")  # refused before any training
    suggested = float(err.split("--budget ")[1].split(",")[0])
    # the suggestion is the exact boundary: all layers at 4 bits fit, a hair less does not
    cfg = RunConfig(out=str(tmp_path / "o"), weight_bits=(4, 8), budget=suggested)
    check_budget(Job(cfg))
    with pytest.raises(UserError, match="infeasible"):
        check_budget(Job(cfg.replace(budget=suggested * 0.999)))


def test_console_script_exit_codes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bad = subprocess.run([sys.executable, "-m", "hqjax.cli", "--model", "nope", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_sweep_is_delegated_to_the_distributed_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    assert e.value.code == 0 and "hqjax sweep" in capsys.readouterr().out


@pytest.mark.parametrize("exc, code, needle", [(RuntimeError("boom"), 1, "internal error"),
                                               (KeyboardInterrupt(), 130, "run the same command again")])
def test_internal_failure_and_interrupt_have_their_own_exit_codes(tmp_path, capsys, monkeypatch, exc, code, needle):
    import hqjax.pipeline

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(hqjax.pipeline, "run_stages", fail)
    assert main(["run", "--out", str(tmp_path)]) == code
    assert needle in capsys.readouterr().err

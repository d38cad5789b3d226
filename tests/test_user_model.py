"""A user's model, weights and data in the job (hqjax/user_model.py, hqjax.run, the command's
--model package.module:factory, --variables, --dataset file.npz and --import).

The command-line tests write a small package into a temporary folder, as a user's project
would be, and run ``hqjax`` from another folder with only PYTHONPATH pointing at it.
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hqjax
import user_models as um
from hqjax.cli import main
from hqjax.config import UserError

# The smallest settings that still run every stage.
SMALL = ["--probes", "2", "--hessian-examples", "32", "--hessian-batch", "32", "--top-k", "1", "--eig-iters", "2",
         "--density-steps", "3", "--calib-examples", "32", "--qat-epochs", "0", "--no-progress"]
SMALL_KW = dict(num_probes=2, hessian_examples=32, hessian_batch=32, top_k=1, eig_iters=2, density_steps=3,
                calib_examples=32, qat_epochs=0)

PACKAGE = '''
import flax.linen as nn
from flax import nnx


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="features/conv")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class NNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


def factory():
    return Net()


def nnx_factory():
    return NNet(nnx.Rngs(0))


def not_a_model():
    return 3

'''

METRIC = '''
import hqjax

@hqjax.register_metric("size_blind", overwrite=True)
def size_blind(row, bits):
    return row.perturbation[bits]
'''


def _data(n_train=96, n_test=48, seed=0):
    r = np.random.default_rng(seed)
    x = r.uniform(size=(n_train + n_test, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) * 40).astype(np.int64) % 10  # learnable, 10 classes
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project: package ``tests_pkg`` (models, a metric), a checkpoint and data."""
    root = tmp_path_factory.mktemp("project")
    pkg = root / "tests_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(PACKAGE))
    (pkg / "metrics.py").write_text(textwrap.dedent(METRIC))
    xtr, ytr, xte, yte = _data()
    np.savez(root / "data.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    np.savez(root / "no_labels.npz", x_train=xtr, y_train=ytr, x_test=xte)
    sys.path.insert(0, str(root))
    try:
        from tests_pkg.nets import Net, nnx_factory
    finally:
        sys.path.remove(str(root))
    v = Net().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    (root / "net.msgpack").write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, v)))
    wrong = jax.tree.map(np.asarray, v)
    wrong["params"]["head"]["kernel"] = np.zeros((64, 7), np.float32)
    (root / "wrong.msgpack").write_bytes(flax.serialization.msgpack_serialize(wrong))
    (root / "corrupt.msgpack").write_bytes(b"\x93not msgpack at all")
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    _, nnx_v = hqjax.from_nnx(nnx_factory())
    ckpt.save(str(root / "nnet_ckpt"), jax.tree.map(np.asarray, nnx_v))
    ckpt.wait_until_finished()
    (root / "broken_ckpt").mkdir()
    return root


def _hqjax(project, cwd, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(project), "JAX_PLATFORMS": "cpu", "HQJAX_CACHE": str(cwd / "cache")}
    env.pop("XLA_FLAGS", None)
    script = os.path.join(os.path.dirname(sys.executable), "hqjax")  # the installed console script
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "hqjax.cli"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("factory, variables, layers", [
    ("tests_pkg.nets:factory", "net.msgpack", ["features/conv", "head"]),  # Linen, msgpack
    ("tests_pkg.nets:nnx_factory", "nnet_ckpt", ["conv", "head"]),  # NNX, Orbax checkpoint folder
])
def test_user_model_variables_and_npz_from_an_unrelated_folder(project, tmp_path, factory, variables, layers):
    """``hqjax run --model tests_pkg.nets:factory --variables ckpt --dataset data.npz`` from
    another folder, end to end to the integer-only model and the report: pretrained, so
    nothing is trained; the allocation names the user's layers; a metric from --import is used."""
    out = tmp_path / "out"
    r = _hqjax(project, tmp_path, "run", "--model", factory, "--variables",
               str(project / variables), "--dataset", str(project / "data.npz"), "--out", str(out),
               "--import", "tests_pkg.metrics", "--metric", "size_blind", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((out / "train.json").read_text())
    assert train["pretrained"] is True and train["n_train"] == 96 and train["n_test"] == 48
    bits = hqjax.load_bit_config(out / "bit_config.json")
    assert sorted(bits) == layers
    assert json.loads((out / "pareto.json").read_text())["metric"] == "size_blind"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) >= {"full_precision", "qat_fake_quant", "integer_only"}
    assert (out / "report.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "nopkg.nets:factory"], r"--model 'nopkg.nets:factory': cannot import module 'nopkg.nets'"),
    (["--model", "tests_pkg.nets:nothing"], r"module 'tests_pkg.nets' has no attribute 'nothing'"),
    (["--model", "tests_pkg.nets:not_a_model"], r"returned is a int, not a Flax module"),
    (["--model", "tests_pkg.nets:factory", "--variables", "wrong.msgpack"],
     r"'params/head/kernel' has shape \(64, 7\) but the model expects \(64, 10\)"),
    (["--model", "tests_pkg.nets:factory", "--variables", "missing.msgpack"], r"'missing.msgpack' does not exist"),
    (["--model", "tests_pkg.nets:factory", "--variables", "corrupt.msgpack"], r"is not a Flax msgpack file"),
    (["--model", "tests_pkg.nets:factory", "--variables", "broken_ckpt"], r"is not a readable Orbax checkpoint"),
    (["--model", "tests_pkg.nets:factory", "--dataset", "no_labels.npz"], r"missing 'y_test'"),
    (["--model", "tests_pkg.nets:factory", "--dataset", "missing.npz"], r"'missing.npz' does not exist"),
    (["--import", "no_such_metrics_module"], r"--import 'no_such_metrics_module': cannot import it"),
])
def test_bad_user_input_is_one_line_and_exit_code_2(project, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", [str(project), *sys.path])
    out = tmp_path / "out"
    argv = ["run", "--dataset", "data.npz", *args, "--out", str(out), *SMALL]
    # the last --dataset wins, so a bad one given in args overrides data.npz
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hqjax: error: "), err
    import re
    assert re.search(message, err), err
    assert not out.exists()  # nothing half-written


def test_dataset_from_arrays_checks_keys_and_lengths():
    from hqjax.data import dataset_from_arrays

    xtr, ytr, xte, yte = _data()
    d = dataset_from_arrays((xtr, ytr, xte, yte))
    assert d.input_shape == (8, 8, 1) and d.num_classes == int(max(ytr.max(), yte.max())) + 1
    with pytest.raises(ValueError, match="missing 'y_test'"):
        dataset_from_arrays({"x_train": xtr, "y_train": ytr, "x_test": xte})
    with pytest.raises(ValueError, match="x_train has 96 examples and y_train 95"):
        dataset_from_arrays((xtr, ytr[:-1], xte, yte))


def test_check_variables_names_the_first_mismatch():
    from hqjax.user_model import check_variables

    model = um.TwinLinen()
    v = um.init_linen(model)
    assert jax.tree.structure(check_variables(model, v["params"], (8, 8, 1))) == jax.tree.structure(v)
    bad = jax.tree.map(np.asarray, v)
    bad["params"]["conv2"]["kernel"] = np.zeros((3, 3, 6, 11), np.float32)
    with pytest.raises(UserError, match=r"'params/conv2/kernel' has shape \(3, 3, 6, 11\) but the model expects "
                                        r"\(3, 3, 6, 12\)"):
        check_variables(model, bad, (8, 8, 1))
    bad["params"]["conv2"]["kernel"] = np.asarray(v["params"]["conv2"]["kernel"])
    del bad["params"]["dense"]
    with pytest.raises(UserError, match=r"'params/dense/bias' \(shape \(10,\)\) is missing"):
        check_variables(model, bad, (8, 8, 1))


def test_run_rejects_bad_arrays_before_writing(tmp_path):
    xtr, ytr, xte, _ = _data()
    with pytest.raises(UserError, match=r"\(x_train, y_train, x_test, y_test\); got 3 items"):
        hqjax.run(um.TwinLinen(), None, (xtr, ytr, xte), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="missing 'y_test'; data needs arrays"):
        hqjax.run(um.TwinLinen(), None, {"x_train": xtr, "y_train": ytr, "x_test": xte}, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_api_linen_and_nnx_twins_give_the_same_allocation(tmp_path):
    """``hqjax.run(model, variables, arrays)``: pretrained Linen variables and the NNX twin
    holding the same weights give the same sensitivity rows and bit configuration."""
    linen = um.TwinLinen()
    v = um.init_linen(linen, seed=2)
    data = _data()
    jobs = [hqjax.run(linen, v, data, out=str(tmp_path / "linen"), until="allocate", log=lambda s: None,
                      **SMALL_KW),
            hqjax.run(um.twin_nnx_from_linen(v), None, data, out=str(tmp_path / "nnx"), until="allocate",
                      log=lambda s: None, **SMALL_KW)]
    rows = [j.work.read_json("sensitivity.json")["layers"] for j in jobs]
    assert [r["layer"] for r in rows[0]] == [r["layer"] for r in rows[1]] == ["conv1", "conv2", "dense"]
    for a, b in zip(*rows):
        np.testing.assert_allclose(a["trace"], b["trace"], rtol=1e-4)
        assert a["perturbation"] == b["perturbation"]
    assert jobs[0].work.read_json("bit_config.json") == jobs[1].work.read_json("bit_config.json")
    assert all(j.work.read_json("train.json")["pretrained"] for j in jobs)


def test_a_model_without_quantizable_layers_is_refused_before_writing(tmp_path):
    import flax.linen as nn

    class Scale(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return x.reshape((x.shape[0], -1))[:, :10] * self.param("s", nn.initializers.ones, (10,))

    with pytest.raises(UserError, match="has no layer with a 'kernel' or 'embedding' parameter"):
        hqjax.run(Scale(), None, _data(), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_transformer_is_refused_before_training_unless_float_islands(tmp_path, capsys):
    """A model with ops that have no integer form (attention's softmax, LayerNorm, GELU) fails
    in one line before anything is written, naming the op and --float-islands; with it, the
    NNX ViT goes through every stage and its integer-only model is the QAT model's."""
    module = um.NNXRowViT(nnx.Rngs(0))
    with pytest.raises(UserError, match=r"cannot lower op '\w+' at module path .* --float-islands"):
        hqjax.run(module, None, _data(), out=str(tmp_path / "out"), **SMALL_KW)
    assert not (tmp_path / "out").exists()
    assert main(["run", "--model", "user_models:nnx_row_vit", "--out", str(tmp_path / "cli"), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--float-islands" in err[0] and not (tmp_path / "cli").exists()
    job = hqjax.run(module, None, _data(), out=str(tmp_path / "out"), log=lambda s: None, float_islands=True,
                    **SMALL_KW | {"qat_epochs": 1})
    acc = {k: v["accuracy"] for k, v in job.work.read_json("metrics.json")["stages"].items()}
    assert abs(acc["integer_only"] - acc["qat_fake_quant"]) <= 1 / 48 + 1e-9, acc  # at most one test example


@pytest.mark.slow
def test_job_on_token_ids_runs_hqjax_bert_through_every_stage_with_float_islands(tmp_path):
    """Token-id arrays stay integers through the job (init, analysis, QAT), BertTiny (Q-BERT's
    setting) is refused before training without --float-islands, and with it the integer-only
    model (embeddings, LayerNorm, softmax, GELU in float islands) is the QAT model's."""
    from hqjax.models import BertTiny

    r = np.random.default_rng(0)
    ids = r.integers(1, 64, size=(144, 12)).astype(np.int64)
    labels = (ids[:, 0] > 32).astype(np.int64)
    data = (ids[:96], labels[:96], ids[96:], labels[96:])
    with pytest.raises(UserError, match=r"integer inputs \(token ids.*--float-islands"):
        hqjax.run(BertTiny(num_classes=2), None, data, out=str(tmp_path / "bert"), **SMALL_KW)
    assert not (tmp_path / "bert").exists()
    job = hqjax.run(BertTiny(num_classes=2), None, data, out=str(tmp_path / "bert"), log=lambda s: None,
                    float_islands=True, **SMALL_KW | {"epochs": 3, "qat_epochs": 1})
    assert job.dataset.input_dtype == np.int32
    acc = {k: v["accuracy"] for k, v in job.work.read_json("metrics.json")["stages"].items()}
    assert abs(acc["integer_only"] - acc["qat_fake_quant"]) <= 1 / 48 + 1e-9, acc
    assert "embed/token" in job.work.read_json("bit_config.json")


def test_stacked_layers_get_their_own_bits_and_the_quantize_stage_is_refused(tmp_path, capsys):
    """A model scanning its blocks (NNX: nnx.vmap + nnx.scan) is analyzed and allocated per
    layer of the stack; `hqjax run` refuses it in one line before writing anything, since
    activations inside a scan cannot be quantized by the job."""
    assert main(["run", "--model", "user_models:nnx_scan_mlp", "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stacked layers (blocks" in err[0] and "hqjax allocate" in err[0]
    assert not (tmp_path / "run").exists()
    out = tmp_path / "alloc"
    assert main(["allocate", "--model", "user_models:nnx_scan_mlp", "--out", str(out), "--epochs", "2",
                 "--budget", "0.42", *SMALL]) == 0
    cfg = hqjax.load_bit_config(out / "bit_config.json")
    layers = {f"blocks/{fc}[{i}]" for i in range(3) for fc in ("fc1", "fc2")}
    assert set(cfg) == layers | {"embed", "head"}
    assert len({cfg[n]["weight_bits"] for n in layers}) > 1, cfg  # the layers of the stack differ
    sens = json.loads((out / "sensitivity.json").read_text())
    assert layers <= set(json.dumps(sens).split('"'))
    assert all(cfg[n]["act_bits"] is None for n in layers) and cfg["head"]["act_bits"] == 8  # stacks: weight-only
    model, variables = hqjax.from_nnx(um.nnx_scan_mlp())
    x_cal, _, x, _ = _data()
    qm = hqjax.quantize_model(model, cfg)  # the allocation applies as it is
    out = qm.apply(qm.calibrate(variables, x_cal), x)
    # the same as the stack's weights quantized first, then the rest of the allocation
    pre = {**variables, "params": hqjax.quantize_params(variables["params"], {n: cfg[n] for n in layers})}
    rest = hqjax.quantize_model(model, {n: cfg[n] for n in ("embed", "head")})
    np.testing.assert_allclose(out, rest.apply(rest.calibrate(pre, x_cal), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory, layers", [("user_models:ModelessNet", {"conv", "head"}),
                                             ("user_models:DeterministicNet", {"fc", "head"}),
                                             ("user_models:EinsumNet", {"heads", "head"}),
                                             ("user_models:nnx_einsum_net", {"heads", "head"}),
                                             ("user_models:ShardedNet", {"fc", "head"})])
def test_models_hqjax_did_not_define_run_every_stage(tmp_path, factory, layers):
    """No mode argument, or Flax's ``deterministic`` (dropout trained with masks): the job
    calls them through a wrapper sharing their scope. ``nn.Einsum`` / ``nnx.Einsum`` layers are
    costed, quantized and lowered like DenseGeneral. ``nn.with_partitioning`` kernels are
    unboxed. The integer-only model equals QAT's."""
    out = tmp_path / "out"
    assert main(["run", "--model", factory, "--out", str(out), "--epochs", "2", *SMALL[:-3], "--qat-epochs", "1",
                 "--no-progress"]) == 0
    acc = {k: v["accuracy"] for k, v in json.loads((out / "metrics.json").read_text())["stages"].items()}
    assert abs(acc["integer_only"] - acc["qat_fake_quant"]) <= 2 / 360, acc
    assert set(hqjax.load_bit_config(out / "bit_config.json")) == layers


def test_boxed_variables_of_a_partitioned_model_are_taken_as_their_arrays():
    """``model.init`` of a model written for a mesh returns ``nn.Partitioned`` boxes; given as
    pretrained variables they are checked and used as the arrays they hold."""
    model = um.ShardedNet()
    boxed = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 1)))
    assert isinstance(boxed["params"]["fc"]["kernel"], nn.Partitioned)
    from hqjax.user_model import check_variables
    plain = check_variables(model, boxed, (8, 8, 1))
    np.testing.assert_array_equal(plain["params"]["fc"]["kernel"], boxed["params"]["fc"]["kernel"].value)
    assert list(hqjax.layer_shapes(model, boxed, jnp.zeros((1, 8, 8, 1)))) == ["fc", "head"]


def test_token_ids_outside_the_vocabulary_are_refused_before_writing(tmp_path):
    r = np.random.default_rng(0)
    x = r.integers(0, 64, (200, 12)).astype(np.int32)
    y = (x[:, 0] % 10).astype(np.int32)
    for bad, message in ((64, r"token ids run from 0 to 64.*64 rows: id 64 has no row"), (-1, r"id -1 has no row")):
        xb = x.copy()
        xb[150, 3] = bad  # in the test split
        for model in (um.TokenNet(), um.NNXTokenNet(nnx.Rngs(0))):
            with pytest.raises(UserError, match=message):
                hqjax.run(model, None, (xb[:150], y[:150], xb[150:], y[150:]), out=str(tmp_path / "o"), epochs=1)
            assert not (tmp_path / "o").exists()


class _DictOut(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return {"logits": nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))}


class _FiveLogits(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(5, name="head")(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("model, message", [
    (_DictOut(), r"returns a dict for one example; .*logits of shape \[batch, classes\]"),
    (_FiveLogits(), r"gives 5 logits, but the data has 10 classes \(labels 0..9\)"),
])
def test_a_model_that_gives_no_class_logits_is_refused_before_writing(tmp_path, model, message):
    with pytest.raises(UserError, match=message):
        hqjax.run(model, None, _data(), out=str(tmp_path / "o"), epochs=1)
    assert not (tmp_path / "o").exists()

"""Full-precision training and its cache (hqjax/train.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from hqjax.data import load_digits
from hqjax.models import get_model
from hqjax.train import TrainConfig, accuracy, cache_key, cross_entropy, train_cached


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_cross_entropy_mask_ignores_padded_rows():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 10))
    y = np.arange(6) % 10
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    assert np.allclose(cross_entropy(logits, y, mask), cross_entropy(logits[:4], y[:4]), rtol=1e-6)


def test_training_learns_and_cache_returns_the_same_weights(digits, tmp_path, caplog):
    model = get_model("mlp")
    cfg = TrainConfig(epochs=4, batch_size=64, seed=1)
    with caplog.at_level("INFO", logger="hqjax"):
        v1, cached1 = train_cached(model, "mlp", digits, cfg, cache_dir=str(tmp_path), progress=False)
    # without a progress bar (a log, a pipe) every epoch says where training is
    assert [r.getMessage().split(":")[0] for r in caplog.records if "epoch" in r.getMessage()] == \
        [f"[train] epoch {e}/4" for e in range(1, 5)]
    v2, cached2 = train_cached(model, "mlp", digits, cfg, cache_dir=str(tmp_path), progress=False)
    assert (cached1, cached2) == (False, True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)))
    assert accuracy(model.apply, v1, digits.x_test, digits.y_test) > 0.8  # chance is 0.1


def test_cache_key_depends_on_what_determines_training():
    cfg = TrainConfig()
    k = cache_key("cnn", "digits", (8, 8, 1), cfg)
    assert k == cache_key("cnn", "digits", (8, 8, 1), cfg)
    for change in (dict(epochs=1), dict(seed=3), dict(learning_rate=1e-2), dict(batch_size=32)):
        assert cache_key("cnn", "digits", (8, 8, 1), dataclasses.replace(cfg, **change)) != k
    assert cache_key("mlp", "digits", (8, 8, 1), cfg) != k


def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(capsys):
    from hqjax.train import progress_bar

    bar = progress_bar(total=3, desc="quiet")  # pytest's captured stderr is not a terminal
    bar.update(3)
    bar.close()
    assert bar.disable and capsys.readouterr().err == ""
    assert not progress_bar(total=1, enabled=True).disable


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_dropout_draws_fresh_masks_each_step_and_none_in_eval(kind, digits):
    """A user's model with dropout trains (Linen needs a 'dropout' key; an NNX module's own
    keys are constants once merged), each step's key gives its own masks, eval has none."""
    import optax
    from flax import nnx

    import hqjax
    import user_models as um
    from hqjax.train import init_variables, make_train_step, train

    if kind == "linen":
        model = um.DropoutMLP()
        v = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    else:
        model, v = hqjax.from_nnx(um.NNXDropoutMLP(nnx.Rngs(0)))
    x, y = digits.x_train[:64], digits.y_train[:64]
    step = make_train_step(model, optax.sgd(0.0))
    losses = [float(step(v, optax.sgd(0.0).init(v["params"]), x, y, jax.random.PRNGKey(k))[2]) for k in (1, 1, 2)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    fwd = jax.jit(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))
    a, b = np.asarray(fwd(v, jax.random.PRNGKey(1))), np.asarray(fwd(v, jax.random.PRNGKey(2)))
    assert not np.allclose(a, b)
    evaluate = jax.jit(lambda v, k: model.apply(v, x, train=False, rngs={"dropout": k}))  # eval: no masks
    np.testing.assert_array_equal(np.asarray(evaluate(v, jax.random.PRNGKey(1))),
                                  np.asarray(evaluate(v, jax.random.PRNGKey(2))))
    trained = train(model, digits.x_train, digits.y_train, TrainConfig(epochs=10), variables=v)
    assert accuracy(model.apply, trained, digits.x_test, digits.y_test) > 0.8

"""Linen models without hqjax's ``train`` argument (hqjax/_linen.py): no mode at all, or
Flax's ``deterministic`` flag, are called through a scope-sharing wrapper."""

import jax
import jax.numpy as jnp
import numpy as np

import hqjax
import user_models as um
from hqjax._linen import TrainArg, with_train_arg
from hqjax.train import accuracy, init_variables

X = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)), jnp.float32)


def test_wrapper_keeps_the_models_variables_and_layer_paths():
    for model in (um.ModelessNet(), um.DeterministicNet()):
        wrapped = with_train_arg(model)
        assert isinstance(wrapped, TrainArg) and with_train_arg(wrapped) is wrapped
        own = model.init(jax.random.key(0), X[:1])
        via = init_variables(model, jax.random.key(0), (8, 8, 1))
        assert jax.tree.structure(own) == jax.tree.structure(via)
        assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(via)))
        assert list(hqjax.layer_shapes(model, own, X[:1])) == list(own["params"])
    assert isinstance(with_train_arg(um.VGGish()), um.VGGish)  # takes train: unchanged


def test_deterministic_is_the_negation_of_train():
    model = um.DeterministicNet()
    v = model.init(jax.random.key(0), X[:1])
    wrapped = with_train_arg(model)
    np.testing.assert_array_equal(wrapped.apply(v, X, train=False), model.apply(v, X))
    a, b = (wrapped.apply(v, X, train=True, rngs={"dropout": jax.random.key(k)}) for k in (1, 2))
    assert not np.allclose(a, b)  # dropout in training mode
    np.testing.assert_array_equal(a, model.apply(v, X, deterministic=False, rngs={"dropout": jax.random.key(1)}))


def test_library_entry_points_take_a_model_without_train():
    model = um.ModelessNet()
    v = model.init(jax.random.key(0), X[:1])
    cfg = hqjax.uniform_bit_config(hqjax.blocks(v["params"]), 4, 8)
    qm = hqjax.quantize_model(model, cfg)
    vq = jax.jit(qm.calibrate)(v, X)
    fq = np.asarray(qm.apply(vq, X))
    im = hqjax.to_integer(qm, vq, (8, 8, 1))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(im, X)), fq, atol=1e-4 * np.abs(fq).max())
    # the model's own apply, which takes no train argument: its own argmax scores 1
    labels = np.asarray(model.apply(v, X)).argmax(-1)
    assert accuracy(model.apply, v, np.asarray(X), labels) == 1.0

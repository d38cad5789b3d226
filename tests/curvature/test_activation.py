import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.curvature.activation import _perturbed_apply
from hqjax.models import get_model


def test_activation_traces_match_exact_hessian_wrt_layer_inputs(digits):
    model = get_model("mlp", features=(8,), activation="tanh")
    x, y = jnp.asarray(digits.x_train[:2]), jnp.asarray(digits.y_train[:2])
    variables = model.init(jax.random.key(0), x, train=False)
    loss_fn = lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    res = hqjax.activation_traces(model, variables, x, loss_fn, jax.random.key(1), num_probes=60)
    assert res.block_names == ("Dense_0", "Dense_1")
    eps = hqjax.activation_perturbations(model, variables, x, train=False)
    assert {k: v.shape for k, v in eps.items()} == {"Dense_0": (2, 64), "Dense_1": (2, 8)}
    flat, unravel = ravel_pytree(eps)
    H = np.asarray(jax.hessian(lambda z: loss_fn(_perturbed_apply(model, variables, x, unravel(z), None, train=False)))(flat))
    exact = [np.trace(H[:128, :128]), np.trace(H[128:, 128:])]
    for (name, (t, se)), want in zip(res.per_block().items(), exact):
        assert abs(t - want) <= 4 * se + 1e-7, (name, t, se, want)
    assert abs(float(res.total) - np.trace(H)) <= 4 * float(res.total_stderr) + 1e-7


def test_layer_paths_follow_flax_module_paths_and_unknown_layers_raise(cnn):
    eps = hqjax.activation_perturbations(cnn.model, {"params": cnn.params}, cnn.x, train=False)
    assert list(eps) == list(cnn.blocks.names) == ["conv1", "conv2", "dense"]
    assert eps["conv1"].shape == cnn.x.shape and eps["dense"].shape == (cnn.x.shape[0], 4 * 4 * 6)
    with pytest.raises(ValueError, match="no kernel-owning layer named \\['conv9'\\]"):
        hqjax.activation_traces(cnn.model, {"params": cnn.params}, cnn.x, lambda o: jnp.sum(o), jax.random.key(0),
                                layers=["conv9"])

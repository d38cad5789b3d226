import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.curvature import block_function, empirical_fisher_layer_traces, fisher_layer_traces, ggn_layer_traces


@pytest.fixture(scope="module")
def tiny(coupled):
    """The coupled CNN of conftest (tanh, a residual): its layers' curvatures interact."""
    return coupled


def _exact_ggn_block_traces(t, mask=None):
    """tr of (1/N) sum_n J_n^T (diag p - p p^T) J_n restricted to each block, via jax.jacobian."""
    out = {}
    m = np.ones(len(t["x"])) if mask is None else np.asarray(mask, np.float64)
    for name in t["blocks"].names:
        logits_b, theta = block_function(lambda p: t["model_fn"](p, t["x"]), t["params"], t["blocks"], name)
        flat, unravel = ravel_pytree(theta)
        J = np.asarray(jax.jit(jax.jacobian(lambda z: logits_b(unravel(z))))(flat), np.float64)  # [N, C, P]
        p = np.asarray(jax.nn.softmax(logits_b(theta)), np.float64)
        G = sum(m[n] * J[n].T @ (np.diag(p[n]) - np.outer(p[n], p[n])) @ J[n] for n in range(len(J))) / m.sum()
        out[name] = np.trace(G)
    return out


def test_ggn_traces_equal_the_trace_of_the_exact_gauss_newton_block(tiny):
    exact = _exact_ggn_block_traces(tiny)
    res = ggn_layer_traces(tiny["model_fn"], tiny["params"], tiny["x"], chunk_size=4)
    assert res.curvature == "ggn" and np.all(np.asarray(res.stderr) == 0)
    np.testing.assert_allclose(np.asarray(res.traces), [exact[n] for n in res.block_names], rtol=1e-4)
    # padding rows are ignored under a mask, and the device loop agrees
    mask = np.arange(16) < 11
    dev = ggn_layer_traces(tiny["model_fn"], tiny["params"], tiny["x"], mask=mask, loop="device", chunk_size=3)
    exact_m = _exact_ggn_block_traces(tiny, mask)
    np.testing.assert_allclose(np.asarray(dev.traces), [exact_m[n] for n in dev.block_names], rtol=1e-4)


def test_empirical_fisher_equals_the_mean_of_naive_per_example_gradient_norms(tiny):
    mf, p, blk = tiny["model_fn"], tiny["params"], tiny["blocks"]
    grad = jax.jit(jax.grad(lambda q, xn, yn: optax.softmax_cross_entropy_with_integer_labels(mf(q, xn), yn).sum()))
    naive = np.zeros(len(blk))
    for n in range(len(tiny["x"])):  # one example at a time, the plain way
        g = grad(p, tiny["x"][n:n + 1], tiny["y"][n:n + 1])
        naive += np.asarray(blk.dots(g, g), np.float64)
    res = empirical_fisher_layer_traces(mf, p, tiny["x"], tiny["y"], chunk_size=4)
    np.testing.assert_allclose(np.asarray(res.traces), naive / len(tiny["x"]), rtol=1e-4)


def test_monte_carlo_fisher_is_unbiased_for_the_ggn_within_its_stated_error(tiny):
    exact = _exact_ggn_block_traces(tiny)
    res = fisher_layer_traces(tiny["model_fn"], tiny["params"], tiny["x"], jax.random.key(1), num_samples=64)
    for name, (t, se) in res.per_block().items():
        assert se > 0 and abs(t - exact[name]) <= 4 * se, (name, t, se, exact[name])
    one = fisher_layer_traces(tiny["model_fn"], tiny["params"], tiny["x"], jax.random.key(1))
    assert np.all(np.asarray(one.stderr) > 0) and int(one.num_probes[0]) == 16


def test_bad_model_output_and_labels_fail_early(tiny):
    with pytest.raises(ValueError, match="logits"):
        ggn_layer_traces(lambda p, xb: tiny["model_fn"](p, xb).sum(), tiny["params"], tiny["x"])
    with pytest.raises(ValueError, match="y has shape"):
        empirical_fisher_layer_traces(tiny["model_fn"], tiny["params"], tiny["x"], tiny["y"][:3])

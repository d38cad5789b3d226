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


def test_host_and_device_loops_agree_on_a_depthwise_model_with_more_classes_than_unrolled_passes():
    """A depthwise convolution and 20 classes: the host loop runs each example's 20 backward
    passes as 10 groups of 2 (at most 16 traced one after another), the device loop as one
    vmap over chunks of examples; both equal the exact Gauss-Newton traces."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    params = {"dw": {"kernel": 0.6 * f32(3, 3, 1, 4)}, "pw": {"kernel": 0.5 * f32(1, 1, 4, 6)},
              "out": {"kernel": 0.3 * f32(6, 20)}}
    conv = lambda x, k, g: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)

    def model_fn(p, x):
        h = jnp.tanh(conv(jnp.tanh(conv(x, p["dw"]["kernel"], 4)), p["pw"]["kernel"], 1))
        return h.mean(axis=(1, 2)) @ p["out"]["kernel"]

    t = {"model_fn": model_fn, "params": params, "x": f32(7, 5, 5, 4), "blocks": hqjax.blocks(params)}
    exact = _exact_ggn_block_traces(t)
    host = ggn_layer_traces(model_fn, params, t["x"], loop="host")
    dev = ggn_layer_traces(model_fn, params, t["x"], loop="device", chunk_size=3)
    threes = ggn_layer_traces(model_fn, params, t["x"], loop="host", chunk_size=2, backward_chunk=3)  # 6x3 + 2
    for res in (host, dev, threes):
        np.testing.assert_allclose(np.asarray(res.traces), [exact[n] for n in res.block_names], rtol=1e-4)
    # the same sampled labels either way: 20 samples per example run as 10 groups of 2 on the host
    mc = [fisher_layer_traces(model_fn, params, t["x"], jax.random.key(3), num_samples=20, loop=loop)
          for loop in ("host", "device")]
    np.testing.assert_allclose(np.asarray(mc[0].traces), np.asarray(mc[1].traces), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mc[0].stderr), np.asarray(mc[1].stderr), rtol=1e-3)
    with pytest.raises(ValueError, match="backward_chunk must be >= 1"):
        ggn_layer_traces(model_fn, params, t["x"], backward_chunk=0)

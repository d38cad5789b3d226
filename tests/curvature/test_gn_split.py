import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hqjax
from hqjax.curvature import block_function, ggn_layer_traces, hessian_layer_traces, layer_traces


def test_split_is_unbiased_for_the_exact_hessian_blocks_of_a_smooth_coupled_cnn(coupled):
    """tanh layers: the remainder R_bb is not 0 and is probed; the estimate covers the exact
    per-block Hessian trace within its stated error."""
    args = (coupled["model_fn"], coupled["params"], coupled["x"], coupled["y"])
    res = hessian_layer_traces(*args, jax.random.key(3), rtol=0.0, min_probes=200, max_probes=200)
    assert res.curvature == "hessian" and res.method == "gauss_newton_split"
    plain = layer_traces(coupled["loss"], coupled["params"], jax.random.key(3), rtol=0.0, min_probes=200,
                         max_probes=200)
    for name, (t, se) in res.per_block().items():
        exact = coupled["exact"][name]
        if name == "dense":  # the logits are linear in the last layer: R_bb = 0, exact
            assert se == 0 and abs(t - exact) <= 1e-4 * abs(exact), (name, t, exact)
        else:
            assert se > 0 and abs(t - exact) <= 4 * se, (name, t, se, exact)
    # Same probes, less variance: all of it on the last layer, a little on these tanh convs
    # at random labels, where the remainder is most of the curvature.
    assert np.all(np.asarray(res.stderr) < np.asarray(plain.stderr)), (res.stderr, plain.stderr)


def test_split_stated_errors_cover_the_exact_traces(coupled):
    # 300 independent runs of 30 remainder probes per layer in one compiled program: the exact
    # trace lies within 2 stated standard errors ~95% of the time (Student t, 29 degrees of
    # freedom: 94.5%), on the probed conv layers; the last layer is exact in every run.
    args = (coupled["model_fn"], coupled["params"], coupled["x"], coupled["y"])
    run = jax.jit(jax.vmap(lambda k: hessian_layer_traces(*args, k, rtol=0.0, min_probes=30, max_probes=30,
                                                          loop="device")))
    res = run(jax.random.split(jax.random.key(2), 300))
    exact = np.array([coupled["exact"][n] for n in res.block_names])
    t, se = np.asarray(res.traces, np.float64), np.asarray(res.stderr, np.float64)
    hit = np.abs(t - exact) <= 2 * se
    conv = [res.block_names.index(n) for n in ("conv1", "conv2")]
    assert 0.88 <= hit[:, conv].mean() <= 0.99, hit.mean(0)
    d = res.block_names.index("dense")
    assert np.all(se[:, d] == 0) and np.allclose(t[:, d], exact[d], rtol=1e-4)
    assert np.all(np.abs(t.mean(0) - exact) <= 4 * t.std(0) / np.sqrt(len(t)) + 1e-5 * np.abs(exact)), (t.mean(0), exact)


class ReluResNet(nn.Module):
    """Conv -> BatchNorm (inference) -> ReLU with a residual and max pooling: piecewise linear
    in each layer's weights, so its Hessian blocks equal the Gauss-Newton blocks."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(nn.Conv(3, (3, 3), name="conv1")(x)))
        h = h + nn.relu(nn.Conv(3, (3, 3), name="conv2")(h))
        h = nn.max_pool(h, (2, 2), (2, 2))
        return nn.Dense(4, name="dense")(h.reshape(h.shape[0], -1))


def test_on_a_piecewise_linear_network_the_split_is_exact_after_min_probes():
    kx, ky, kp, kb = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (12, 6, 6, 1))
    y = jax.random.randint(ky, (12,), 0, 4)
    model = ReluResNet()
    variables = model.init(kp, x)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(kb, p.shape), variables["params"])
    rest = {"batch_stats": variables["batch_stats"]}
    model_fn = lambda p, xb: model.apply({"params": p, **rest}, xb)
    res = hessian_layer_traces(model_fn, params, x, y, jax.random.key(0), min_probes=3)
    assert np.all(np.asarray(res.num_probes) == 3) and np.all(np.abs(np.asarray(res.stderr)) < 1e-6 * np.abs(np.asarray(res.traces)))
    np.testing.assert_allclose(np.asarray(res.traces), np.asarray(ggn_layer_traces(model_fn, params, x).traces),
                               rtol=1e-5)
    blk = hqjax.blocks(params)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean()
    for name, (t, _) in res.per_block().items():
        f_b, theta = block_function(loss, params, blk, name)
        flat, unravel = ravel_pytree(theta)
        exact = float(np.trace(np.asarray(jax.jit(jax.hessian(lambda z: f_b(unravel(z))))(flat), np.float64)))
        np.testing.assert_allclose(t, exact, rtol=1e-4, err_msg=name)


def test_mask_names_and_bad_labels(coupled):
    args = (coupled["model_fn"], coupled["params"], coupled["x"])
    mask = np.arange(16) < 11
    full = hessian_layer_traces(*args, coupled["y"], jax.random.key(0), mask=mask, names=["dense"],
                                rtol=0.0, min_probes=64, max_probes=64)
    sub = hessian_layer_traces(coupled["model_fn"], coupled["params"], coupled["x"][:11], coupled["y"][:11],
                               jax.random.key(0), names=["dense"], rtol=0.0, min_probes=64, max_probes=64)
    assert full.block_names == ("dense",)
    np.testing.assert_allclose(np.asarray(full.traces), np.asarray(sub.traces), rtol=1e-4)
    with pytest.raises(ValueError, match="y has shape"):
        hessian_layer_traces(*args, coupled["y"][:3], jax.random.key(0))
    with pytest.raises(KeyError):
        hessian_layer_traces(*args, coupled["y"], jax.random.key(0), names=["nope"])

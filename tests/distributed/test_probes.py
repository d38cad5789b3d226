"""Probe-parallel and data-parallel estimators equal the single-device estimators (same keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax
from hqjax import distributed as hd
from hqjax.models import MLP

RTOL = 1e-5


@pytest.fixture(scope="module")
def problem():
    model = MLP(features=(6,), num_classes=3, activation="tanh")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=16).astype(np.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))

    matvec = hqjax.hessian(lambda p: loss_fn(p, (x, y)), params)
    return loss_fn, params, (x, y), matvec


@pytest.fixture(scope="module")
def reference(problem):
    """Single-device estimates, shared by the probe- and data-parallel comparisons."""
    _, params, _, matvec = problem
    key = jax.random.key(7)
    return key, {
        "trace": hqjax.trace(matvec, params, key, num_probes=11),  # 8 devices: 2 probes each, 5 padded
        "eigen": hqjax.top_eigenvalues(matvec, params, key, max_iters=30, tol=1e-6),
        "density": hqjax.spectral_density(matvec, params, key, num_steps=8, num_runs=3),
    }




@pytest.mark.parametrize("loop", ["host", "device"])
def test_probe_parallel_trace_equals_single_device(problem, reference, loop, assert_close):
    _, params, _, matvec = problem
    key, ref = reference[0], reference[1]["trace"]
    got = hd.probe_parallel_trace(matvec, params, key, hd.make_mesh("probe"), num_probes=11, loop=loop)
    assert int(got.num_probes) == 11 and got.block_names == ref.block_names
    assert_close(got.total, ref.total)
    assert_close(got.block_traces, ref.block_traces)
    assert_close(got.total_stderr, ref.total_stderr, rtol=1e-4)
    # A different key gives different probes: the comparison above is not vacuous.
    other = hd.probe_parallel_trace(matvec, params, jax.random.key(8), hd.make_mesh("probe"), num_probes=11, loop=loop)
    assert abs(float(other.total) - float(ref.total)) > 1e-4


def test_probe_parallel_density_equals_single_device(problem, reference, assert_close):
    _, params, _, matvec = problem
    key, ref = reference[0], reference[1]["density"]
    mesh = hd.make_mesh("probe", devices=jax.devices()[:2])  # 3 runs on 2 devices: one padded run
    got = hd.probe_parallel_density(matvec, params, key, mesh, num_steps=8, num_runs=3)
    assert got.nodes.shape == (3, 8)
    assert_close(got.nodes, ref.nodes)
    assert_close(got.weights, ref.weights)


def test_data_parallel_trace_eigen_density_equal_single_device(problem, reference, assert_close):
    loss_fn, params, batch, _ = problem
    key, ref = reference
    dp = hd.data_parallel_hessian(loss_fn, params, batch, hd.make_mesh("data"))  # 16 examples: 2 per device
    t = hqjax.trace(dp, params, key, num_probes=11)
    assert_close(t.total, ref["trace"].total)
    assert_close(t.block_traces, ref["trace"].block_traces)
    e = hqjax.top_eigenvalues(dp, params, key, max_iters=30, tol=1e-6)
    assert_close(e.eigenvalues, ref["eigen"].eigenvalues)
    d = hqjax.spectral_density(dp, params, key, num_steps=8, num_runs=3)
    assert_close(d.nodes, ref["density"].nodes)
    assert_close(d.weights, ref["density"].weights)


def test_unknown_axis_is_named(problem):
    _, params, _, matvec = problem
    with pytest.raises(ValueError, match="no axis 'probe'"):
        hd.probe_parallel_trace(matvec, params, jax.random.key(0), hd.make_mesh("data"), num_probes=2)

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


def _close(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


@pytest.mark.parametrize("loop", ["host", "device"])
def test_probe_parallel_trace_equals_single_device(problem, loop):
    _, params, _, matvec = problem
    key = jax.random.key(7)
    ref = hqjax.trace(matvec, params, key, num_probes=11)  # 11 probes: 8 devices get 2, 2, ..., padded
    got = hd.probe_parallel_trace(matvec, params, key, hd.make_mesh("probe"), num_probes=11, loop=loop)
    assert int(got.num_probes) == 11 and got.block_names == ref.block_names
    _close(got.total, ref.total)
    _close(got.block_traces, ref.block_traces)
    _close(got.total_stderr, ref.total_stderr, rtol=1e-4)
    # A different key gives different probes: the comparison above is not vacuous.
    other = hd.probe_parallel_trace(matvec, params, jax.random.key(8), hd.make_mesh("probe"), num_probes=11, loop=loop)
    assert abs(float(other.total) - float(ref.total)) > 1e-4


def test_probe_parallel_density_equals_single_device(problem):
    _, params, _, matvec = problem
    key = jax.random.key(3)
    ref = hqjax.spectral_density(matvec, params, key, num_steps=8, num_runs=3)
    mesh = hd.make_mesh("probe", devices=jax.devices()[:2])  # 3 runs on 2 devices: one padded run
    got = hd.probe_parallel_density(matvec, params, key, mesh, num_steps=8, num_runs=3)
    assert got.nodes.shape == (3, 8)
    _close(got.nodes, ref.nodes)
    _close(got.weights, ref.weights)


def test_data_parallel_trace_eigen_density_equal_single_device(problem):
    loss_fn, params, batch, matvec = problem
    dp = hd.data_parallel_hessian(loss_fn, params, batch, hd.make_mesh("data"))
    key = jax.random.key(5)
    t_ref, t_dp = (hqjax.trace(m, params, key, num_probes=4) for m in (matvec, dp))
    _close(t_dp.block_traces, t_ref.block_traces)
    e_ref, e_dp = (hqjax.top_eigenvalues(m, params, key, max_iters=30, tol=1e-6) for m in (matvec, dp))
    _close(e_dp.eigenvalues, e_ref.eigenvalues)
    d_ref, d_dp = (hqjax.spectral_density(m, params, key, num_steps=6) for m in (matvec, dp))
    _close(d_dp.nodes, d_ref.nodes)
    _close(d_dp.weights, d_ref.weights)


def test_unknown_axis_is_named(problem):
    _, params, _, matvec = problem
    with pytest.raises(ValueError, match="no axis 'probe'"):
        hd.probe_parallel_trace(matvec, params, jax.random.key(0), hd.make_mesh("data"), num_probes=2)

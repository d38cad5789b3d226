"""Data-parallel curvature equals single-device curvature (8 forced host devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hqjax
from hqjax import distributed as hd
from hqjax.models import CNN


def _loss_fn(model):
    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x, train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return loss_fn


@pytest.fixture(scope="module")
def problem():
    model = CNN(channels=(2, 4))  # convolutions, so sharding the batch axis of NHWC inputs is exercised
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=32).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    v = hqjax.tree.tree_random_like(jax.random.key(1), params)
    loss_fn = _loss_fn(model)
    f = lambda p: loss_fn(p, (x, y))
    ref = jax.jit(lambda v: jax.jvp(jax.grad(f), (params,), (v,))[1])(v)
    return loss_fn, params, (x, y), v, ref




def test_make_mesh_shapes_and_errors():
    mesh = hd.make_mesh()
    assert mesh.shape == {"data": 8}
    mesh2 = hd.make_mesh(("probe", "data"), (2, 4))
    assert mesh2.shape == {"probe": 2, "data": 4}
    with pytest.raises(ValueError, match="needs 6 devices"):
        hd.make_mesh(("a", "b"), (2, 3))


def test_shard_batch_splits_and_rejects_uneven():
    mesh = hd.make_mesh()
    xs = hd.shard_batch(np.zeros((16, 3)), mesh)
    assert xs.sharding.spec == P("data") and len(xs.addressable_shards) == 8
    assert xs.addressable_shards[0].data.shape == (2, 3)
    stacked = hd.shard_batch({"x": np.zeros((3, 8, 2))}, mesh, batch_axis=1)
    assert stacked["x"].addressable_shards[0].data.shape == (3, 1, 2)
    with pytest.raises(ValueError, match=r"\['x'\].*multiple of 8"):
        hd.shard_batch({"x": np.zeros((12, 2))}, mesh)


@pytest.mark.parametrize("n_devices", [1, 8])
def test_data_parallel_loss_hvp_matches_single_device(problem, n_devices, assert_close):
    loss_fn, params, batch, v, ref = problem
    mesh = hd.make_mesh(devices=jax.devices()[:n_devices])
    f = hd.data_parallel_loss(loss_fn, batch, mesh)
    np.testing.assert_allclose(f(params), loss_fn(params, batch), rtol=1e-6)
    hv = jax.jit(lambda v: jax.jvp(jax.grad(f), (params,), (v,))[1])(v)
    assert_close(hv, ref)


@pytest.mark.parametrize("n_devices", [8])
def test_data_parallel_hessian_matches_single_device_no_double_sum(problem, n_devices, assert_close):
    loss_fn, params, batch, v, ref = problem
    mesh = hd.make_mesh(devices=jax.devices()[:n_devices])
    hv = hd.data_parallel_hessian(loss_fn, params, batch, mesh)(v)
    # A psum after the in-shard_map gradient would give n_devices * ref here.
    assert_close(hv, ref)


def test_sharded_arrays_under_plain_jit(problem, assert_close):
    loss_fn, params, batch, v, ref = problem
    mesh = hd.make_mesh()
    sharded = hd.shard_batch(batch, mesh)
    hvp = jax.jit(lambda p, v, b: jax.jvp(jax.grad(lambda q: loss_fn(q, b)), (p,), (v,))[1])
    hv = hvp(hd.replicate(params, mesh), v, sharded)
    assert_close(hv, ref)


def test_stacked_batches_with_counts_weight_devices_by_real_examples():
    # Stacked batches sharded by batch index (batch_axis=0); the last batch is padded and its
    # count makes the global mean equal the mean over the real examples only.
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3,)).astype(np.float32))
    xs = rng.normal(size=(8, 4, 3)).astype(np.float32)  # 8 batches of 4 rows
    counts = np.array([4] * 7 + [2], np.int32)  # the last batch has 2 real rows and 2 padded
    real = np.concatenate([xs[i, :c] for i, c in enumerate(counts)])

    def loss_fn(w, d):
        xb, cb = d
        mask = jnp.arange(xb.shape[1])[None, :] < cb[:, None]
        per = jnp.sum(jnp.where(mask, jnp.tanh(xb @ w) ** 2, 0.0))
        return per / jnp.sum(cb)

    mesh = hd.make_mesh()
    f = hd.data_parallel_loss(loss_fn, (xs, counts), mesh, count_fn=lambda d: jnp.sum(d[1]).astype(jnp.float32))
    ref = lambda w: jnp.mean(jnp.tanh(real @ w) ** 2)
    np.testing.assert_allclose(f(w), ref(w), rtol=1e-6)
    hvp = lambda g: jax.jit(lambda v: jax.jvp(jax.grad(g), (w,), (v,))[1])
    v = jnp.array([1.0, -1.0, 1.0])
    np.testing.assert_allclose(hvp(f)(v), hvp(ref)(v), rtol=1e-5, atol=1e-7)

"""int_matmul / int4_matmul: every backend gives the same integers, shapes, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hqjax.kernels as K

PALLAS = {"triton": K.TritonBlocks(16, 16, 32), "mosaic": K.MosaicBlocks(32, 128, 128)}


def _run(fn, backend, *args, **kw):
    return fn(*args, backend=backend, blocks=PALLAS.get(backend), **kw)


def test_auto_is_xla_on_cpu_and_maps_platforms():
    assert K.default_backend() == "xla"
    assert K.default_backend("gpu") == "triton" and K.default_backend("tpu") == "mosaic"
    a = jnp.ones((2, 3), jnp.int8)
    np.testing.assert_array_equal(np.asarray(K.int_matmul(a, a.T)), np.full((2, 2), 3))


@pytest.mark.parametrize("backend", K.BACKENDS)
def test_leading_dims_uint8_and_epilogue_identical_on_every_backend(rng, oracle, make_requant,
                                                                   backend):
    a = rng.integers(0, 256, (2, 3, 5, 40)).astype(np.uint8)  # uint8: after a ReLU epilogue
    b = rng.integers(-128, 128, (40, 24)).astype(np.int8)
    acc = oracle.matmul(a, b)
    out = _run(K.int_matmul, backend, jnp.asarray(a), jnp.asarray(b))
    assert out.shape == (2, 3, 5, 24)
    np.testing.assert_array_equal(np.asarray(out), acc)
    rq = make_requant(24, 40, "int8")
    out = _run(K.int_matmul, backend, jnp.asarray(a), jnp.asarray(b), out_scale=rq)
    np.testing.assert_array_equal(np.asarray(out).astype(np.int64), oracle.requant(acc, rq))


@pytest.mark.parametrize("backend", K.BACKENDS)
def test_batched_weights_and_int4_identical_on_every_backend(rng, oracle, make_requant,
                                                            backend):
    a = rng.integers(-128, 128, (3, 6, 33)).astype(np.int8)
    b = rng.integers(-128, 128, (3, 33, 20)).astype(np.int8)  # one weight per batch entry
    out = _run(K.int_matmul, backend, jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, b))
    # uint8 with batched weights: the correction differs per batch entry
    au = rng.integers(0, 256, (3, 6, 33)).astype(np.uint8)
    rq = make_requant(20, 33, "int8")
    out = _run(K.int_matmul, backend, jnp.asarray(au), jnp.asarray(b), out_scale=rq)
    np.testing.assert_array_equal(np.asarray(out).astype(np.int64),
                                  oracle.requant(oracle.matmul(au, b), rq))
    w4 = rng.integers(-8, 8, (33, 20)).astype(np.int8)
    out = _run(K.int4_matmul, backend, jnp.asarray(a[0]), K.pack_int4(w4))
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a[0], w4))


def test_under_jit_with_traced_requant(rng, oracle, make_requant):
    a = rng.integers(-128, 128, (4, 16)).astype(np.int8)
    b = rng.integers(-128, 128, (16, 8)).astype(np.int8)
    rq = make_requant(8, 16, "uint8")
    f = jax.jit(lambda a, b, rq: K.int_matmul(a, b, out_scale=rq))
    np.testing.assert_array_equal(np.asarray(f(a, b, rq)).astype(np.int64),
                                  oracle.requant(oracle.matmul(a, b), rq))


def test_vector_activation(oracle):
    a = jnp.arange(-3, 3, dtype=jnp.int8)
    b = jnp.ones((6, 2), jnp.int8)
    out = K.int_matmul(a, b)
    assert out.shape == (2,)
    np.testing.assert_array_equal(np.asarray(out), [-3, -3])
    bb = jnp.arange(4 * 6 * 2, dtype=jnp.int8).reshape(4, 6, 2)  # batched weights
    out = K.int_matmul(a, bb)
    assert out.shape == (4, 2)
    np.testing.assert_array_equal(np.asarray(out), oracle.matmul(a, bb))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: K.int_matmul(jnp.ones((2, 3), jnp.float32), jnp.ones((3, 2), jnp.int8)),
         TypeError, "activations must be int8 or uint8"),
        (lambda: K.int_matmul(jnp.ones((2, 3), jnp.int8), jnp.ones((4, 2), jnp.int8)),
         ValueError, "K=3.*K=4"),
        (lambda: K.int4_matmul(jnp.ones((2, 5), jnp.int8), jnp.ones((2, 2), jnp.int8)),
         ValueError, "need 3 rows"),
        (lambda: K.int_matmul(jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.int8),
                              backend="cuda"), ValueError, "backend='cuda'"),
        (lambda: K.int_matmul(jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.int8),
                              backend="mosaic", blocks=K.TritonBlocks()), TypeError,
         "MosaicBlocks"),
        (lambda: K.int_matmul(jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.int8),
                              out_scale=K.Requant(jnp.ones(3, jnp.int32), jnp.int32(4))),
         ValueError, "2 output channels"),
    ],
)
def test_bad_input_raises_early(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("backend, platform, target",
                         [("triton", "cuda", "xla.gpu.triton"),
                          ("mosaic", "tpu", "tpu_custom_call")])
def test_public_paths_lower_for_their_platform(make_requant, backend, platform, target):
    """Batched weights (vmapped kernel), uint8 activations and the epilogue, compiled for HW."""
    rq = make_requant(200, 96, "int8")
    f = jax.jit(lambda a, b, p: (
        K.int_matmul(a, b, out_scale=rq, backend=backend, interpret=False),
        K.int4_matmul(a[0], p, backend=backend, interpret=False)))
    lowered = f.trace(jax.ShapeDtypeStruct((3, 40, 96), jnp.uint8),
                      jax.ShapeDtypeStruct((3, 96, 200), jnp.int8),
                      jax.ShapeDtypeStruct((48, 200), jnp.int8)).lower(
                          lowering_platforms=(platform,))
    assert lowered.as_text().count(target) >= 2

"""int_conv2d: im2col on every backend and XLA's integer conv equal an exact float conv."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import hqjax.kernels as K

PALLAS = {"triton": K.TritonBlocks(16, 16, 32), "mosaic": K.MosaicBlocks(32, 128, 128)}


def _exact_conv(x, w, strides, padding):
    # |sum| <= 128*128*KH*KW*C = 737,280 < 2^24 here, so float32 is exact
    out = lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                   strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(out).astype(np.int64)


@pytest.mark.parametrize("backend, method", [("xla", "im2col"), ("xla", "xla_conv"),
                                             ("triton", "auto"), ("mosaic", "auto")])
def test_conv_exact_on_every_backend(rng, backend, method):
    x = rng.integers(-128, 128, (2, 9, 7, 5)).astype(np.int8)
    w = rng.integers(-128, 128, (3, 3, 5, 6)).astype(np.int8)
    for strides, padding in (((1, 1), "SAME"), ((2, 1), "VALID")):
        out = K.int_conv2d(x, w, strides=strides, padding=padding, backend=backend,
                           blocks=PALLAS.get(backend), method=method)
        np.testing.assert_array_equal(np.asarray(out), _exact_conv(x, w, strides, padding))


@pytest.mark.slow
def test_quantized_two_layer_net_identical_on_every_backend(rng, oracle, make_requant):
    """conv -> uint8 requant (ReLU) -> flatten -> int4 dense -> int8 requant, per backend."""
    x = rng.integers(-128, 128, (2, 6, 6, 3)).astype(np.int8)
    w1 = rng.integers(-128, 128, (3, 3, 3, 4)).astype(np.int8)
    w2 = rng.integers(-8, 8, (6 * 6 * 4, 5)).astype(np.int8)
    rq1, rq2 = make_requant(4, 27, "uint8"), make_requant(5, 144, "int8", seed=3)
    h = oracle.requant(_exact_conv(x, w1, (1, 1), "SAME"), rq1).reshape(2, -1)
    want = oracle.requant(oracle.matmul(h, w2), rq2)
    outs = {}
    for backend in K.BACKENDS:
        h1 = K.int_conv2d(x, w1, out_scale=rq1, backend=backend, blocks=PALLAS.get(backend))
        assert h1.dtype == jnp.uint8
        outs[backend] = K.int4_matmul(h1.reshape(2, -1), K.pack_int4(w2), out_scale=rq2,
                                      backend=backend, blocks=PALLAS.get(backend))
        np.testing.assert_array_equal(np.asarray(outs[backend]).astype(np.int64), want)
    assert len({np.asarray(o).tobytes() for o in outs.values()}) == 1


def test_bad_conv_inputs_raise():
    x = jnp.zeros((1, 4, 4, 3), jnp.int8)
    with pytest.raises(ValueError, match="equal C"):
        K.int_conv2d(x, jnp.zeros((3, 3, 2, 4), jnp.int8))
    with pytest.raises(ValueError, match="xla_conv' needs backend='xla'"):
        K.int_conv2d(x, jnp.zeros((3, 3, 3, 4), jnp.int8), backend="triton", method="xla_conv")

"""Properties of the uniform quantizers on random inputs (hqjax/quant/quantizers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hqjax.quant.quantizers import (QuantSpec, dequantize, fake_quant, int_range, quantize, tensor_range,
                                    weight_perturbation)

BITS = st.sampled_from([2, 3, 4, 5, 6, 7, 8])
MODES = st.sampled_from(["symmetric", "asymmetric", "unsigned"])
SETTINGS = settings(max_examples=30, deadline=None)


def _x(seed, shape=(6, 8), shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(shift, 2.0, shape), jnp.float32)


@SETTINGS
@given(seed=st.integers(0, 10**6), bits=BITS, mode=MODES, axis=st.sampled_from([None, 0, -1]))
def test_values_in_integer_range_and_half_step_roundtrip(seed, bits, mode, axis):
    x = _x(seed)
    if mode == "unsigned":
        x = jnp.abs(x)
    spec = QuantSpec(bits=bits, mode=mode, axis=axis)
    qa = quantize(x, spec)
    qmin, qmax = int_range(spec)
    v = np.asarray(qa.values)
    assert qa.values.dtype == jnp.int8
    assert v.min() >= qmin and v.max() <= qmax
    # the range comes from x itself, so every element is inside it: error <= half a step
    step = np.broadcast_to(np.asarray(qa.scale), x.shape)
    err = np.abs(np.asarray(dequantize(qa)) - np.asarray(x))
    assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7)


@SETTINGS
@given(seed=st.integers(0, 10**6), bits=BITS, mode=MODES)
def test_fake_quant_is_idempotent(seed, bits, mode):
    x = _x(seed, shift=1.0 if mode == "unsigned" else 0.0)
    spec = QuantSpec(bits=bits, mode=mode, axis=-1)
    rng = tensor_range(x, spec)
    once = fake_quant(x, spec, rng)
    twice = fake_quant(once, spec, rng)
    np.testing.assert_allclose(np.asarray(twice), np.asarray(once), rtol=0, atol=1e-5 * float(jnp.abs(x).max()))


def test_unsigned_uses_all_levels_and_fits_int8():
    x = jnp.linspace(0.0, 3.0, 1000)
    qa = quantize(x, QuantSpec(bits=8, mode="unsigned"))
    assert qa.values.dtype == jnp.int8
    assert int(qa.values.min()) == -128 and int(qa.values.max()) == 127
    assert len(np.unique(np.asarray(qa.values))) == 256
    np.testing.assert_allclose(float(qa.scale.ravel()[0]), 3.0 / 255, rtol=1e-6)


def test_asymmetric_represents_zero_exactly():
    x = jnp.asarray([-0.3, 0.0, 1.7, 2.9])
    spec = QuantSpec(bits=4, mode="asymmetric")
    assert float(fake_quant(x, spec)[1]) == 0.0


@pytest.mark.parametrize("shape,axis,group,expect", [
    ((16, 12), None, None, (1, 1)),
    ((16, 12), -1, None, (1, 12)),
    ((16, 12), 0, None, (16, 1)),
    ((16, 12), -1, 4, (1, 3)),
    ((3, 3, 4, 8), -1, 2, (1, 1, 1, 4)),
])
def test_scale_shapes_per_channel_and_group(shape, axis, group, expect):
    x = _x(0, shape)
    qa = quantize(x, QuantSpec(bits=4, axis=axis, group_size=group))
    assert qa.scale.shape == expect and qa.zero_point.shape == expect


def test_group_scale_is_max_of_its_rows():
    x = _x(3, (5, 12))
    qa = quantize(x, QuantSpec(bits=8, axis=-1, group_size=4))
    groups = np.abs(np.asarray(x)).reshape(5, 3, 4).max(axis=(0, 2))
    np.testing.assert_allclose(np.asarray(qa.scale).ravel(), groups / 127, rtol=1e-6)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size=5 does not divide the 12 rows"):
        quantize(_x(0, (4, 12)), QuantSpec(bits=4, axis=-1, group_size=5))


@pytest.mark.parametrize("bits", [0, 1, 9, 12])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("clip_grad", [False, True])
def test_straight_through_gradient(clip_grad):
    x = jnp.asarray([-3.0, -0.7, 0.0, 0.4, 1.1, 2.5])
    spec = QuantSpec(bits=4, mode="symmetric", clip_grad=clip_grad)
    rng = (jnp.asarray(-1.0), jnp.asarray(1.0))  # clips -3, 1.1 and 2.5
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, spec, rng) * jnp.arange(1.0, 7.0)))(x)
    inside = np.abs(np.asarray(x)) <= 1.0
    expect = np.arange(1.0, 7.0) * (inside if clip_grad else 1.0)
    np.testing.assert_array_equal(np.asarray(g), expect)


def test_fake_quant_works_under_jit_and_vmap():
    spec = QuantSpec(bits=4, axis=-1)
    x = _x(1, (3, 6, 8))
    out = jax.jit(jax.vmap(lambda v: fake_quant(v, spec)))(x)
    ref = np.stack([np.asarray(fake_quant(v, spec)) for v in x])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6)


def test_wide_integers_for_biases():
    x = _x(2, (64,)) * 100
    qa = quantize(x, QuantSpec(bits=32))
    assert qa.values.dtype == jnp.int32
    assert int(jnp.abs(qa.values).max()) < 2**31 - 1  # no wrap-around at the ends
    # float32 carries 24 significant bits: the round trip is exact to float32 resolution
    np.testing.assert_allclose(np.asarray(dequantize(qa)), np.asarray(x), rtol=2e-7, atol=0)


def test_weight_perturbation_matches_definition_and_shrinks_with_bits():
    w = _x(4, (3, 3, 4, 8))
    deltas = [float(weight_perturbation(w, b)) for b in (2, 4, 8)]
    assert deltas[0] > deltas[1] > deltas[2] > 0
    s = np.abs(np.asarray(w)).max(axis=(0, 1, 2)) / 7
    q = np.clip(np.round(np.asarray(w) / s), -7, 7) * s
    np.testing.assert_allclose(deltas[1], np.sum((q - np.asarray(w)) ** 2), rtol=1e-5)

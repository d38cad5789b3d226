"""Dyadic requantization against exact rational arithmetic (hqjax/quant/requant.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.quant.requant import dyadic, dyadic_requantize


@pytest.mark.parametrize("magnitude", [1e-7, 1e-3, 0.05, 0.9, 7.0])
def test_dyadic_within_one_lsb_of_exact_rational(magnitude):
    rng = np.random.default_rng(int(magnitude * 1e7) % 1000)
    M = rng.uniform(0.5, 2.0, 512) * magnitude
    acc = rng.integers(-(2**31) + 1, 2**31 - 1, 512) if magnitude < 1e-2 else rng.integers(-(2**24), 2**24, 512)
    m, k = dyadic(M)
    assert m.dtype == np.int32 and np.all(m < 2**31) and np.all(m >= 2**30)
    out = np.asarray(jax.jit(dyadic_requantize)(jnp.asarray(acc, jnp.int32), m, k))
    # exact rational reference in Python integers / fractions
    from fractions import Fraction
    exact = np.array([round(Fraction(int(a)) * Fraction(float(x))) for a, x in zip(acc, M)])
    assert np.abs(out - exact).max() <= 1
    # and bit-exact against the dyadic number itself, rounded half away from zero
    ref = np.array([(1 if a >= 0 else -1) * ((abs(int(a)) * int(mm) + (1 << (int(kk) - 1))) >> int(kk))
                    for a, mm, kk in zip(acc, m, k)])
    np.testing.assert_array_equal(out, ref)


def test_per_channel_broadcast_and_ties_away_from_zero():
    m, k = dyadic(np.array([0.5, 0.25]))
    acc = jnp.asarray([[3, 6], [-3, -6], [1, 2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(dyadic_requantize(acc, m, k)), [[2, 2], [-2, -2], [1, 1]])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, 2.0**40])
def test_bad_multipliers_raise(bad):
    with pytest.raises(ValueError):
        dyadic(np.array([bad]))

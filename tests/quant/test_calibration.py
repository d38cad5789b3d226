"""Activation range calibrators (hqjax/quant/calibration.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.quant.calibration import ema, get_calibrator, minmax, mse, percentile, state_range
from hqjax.quant.quantizers import QuantSpec, fake_quant

SPEC = QuantSpec(bits=4, mode="asymmetric")


def _batches(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(0.5 * i, 1.0 + i, (64,)), jnp.float32) for i in range(n)]


def _run(cal, xs, spec=SPEC):
    state = cal.init()
    update = jax.jit(cal.update, static_argnums=2)
    for x in xs:
        state = update(state, x, spec)
    return state


def test_minmax_is_running_extremes():
    xs = _batches()
    lo, hi = state_range(_run(minmax(), xs))
    allx = np.concatenate([np.asarray(x) for x in xs])
    assert float(lo) == allx.min() and float(hi) == allx.max()


def test_ema_follows_its_recursion():
    xs = _batches()
    lo, hi = state_range(_run(ema(0.8), xs))
    e_lo, e_hi = float(xs[0].min()), float(xs[0].max())
    for x in xs[1:]:
        e_lo, e_hi = 0.8 * e_lo + 0.2 * float(x.min()), 0.8 * e_hi + 0.2 * float(x.max())
    np.testing.assert_allclose([float(lo), float(hi)], [e_lo, e_hi], rtol=1e-5)


def test_percentile_clips_outliers():
    x = jnp.concatenate([jnp.linspace(-1, 1, 999), jnp.asarray([100.0])])
    lo, hi = state_range(_run(percentile(99.0), [x]))
    assert float(hi) < 1.0 and float(lo) > -1.0


def test_unsigned_range_starts_at_zero():
    x = jnp.abs(_batches(1)[0]) + 0.5
    lo, hi = state_range(_run(minmax(), [x], QuantSpec(bits=4, mode="unsigned")))
    assert float(lo) == 0.0 and float(hi) == float(x.max())


def test_mse_clipping_beats_full_range_at_low_bits():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_t(2, 4096), jnp.float32)  # heavy tails: clipping pays
    spec = QuantSpec(bits=3, mode="asymmetric")
    lo, hi = state_range(_run(mse(64), [x], spec))
    err = lambda r: float(jnp.sum((fake_quant(x, spec, r) - x) ** 2))
    assert float(hi) < float(x.max())
    assert err((lo, hi)) < err((x.min(), x.max()))


def test_unknown_calibrator_raises():
    with pytest.raises(ValueError, match="unknown calibrator 'median'"):
        get_calibrator("median")

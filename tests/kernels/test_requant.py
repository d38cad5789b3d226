"""Dyadic requantization: exact against Python integers, validation, dyadic scales, JSON."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.kernels import Requant, requant_from_scale, requantize
from hqjax.kernels.requant import check_requant


def _near_ties(rng, n):
    """Accumulators placed at and around the rounding ties of random dyadic scales."""
    s = rng.integers(1, 63, n)
    m = rng.integers(1, 2**31, n)
    q = rng.integers(-140, 270, n)
    d = rng.integers(-2, 3, n)
    a = [((int(qq) << int(ss)) - (1 << (int(ss) - 1))) // int(mm) + int(dd)
         for qq, ss, mm, dd in zip(q, s, m, d)]
    # exact ties, both signs: m = 2^j makes acc * m / 2^s = acc / 2^(s-j), a tie at odd
    # multiples of 2^(s-j-1)
    j = rng.integers(0, 31, n)
    s2 = np.minimum(j + rng.integers(1, 25, n), 62)
    q2 = rng.integers(-200, 200, n)
    a += [(2 * int(qq) + 1) << (int(ss - jj) - 1) for qq, ss, jj in zip(q2, s2, j)]
    m = np.concatenate([m, 2 ** j])
    s = np.concatenate([s, s2])
    keep = np.array([-(2**31) <= v < 2**31 for v in a])
    return np.array(a, dtype=object)[keep].astype(np.int64), m[keep], s[keep]


@pytest.mark.parametrize("out_dtype", ["int8", "uint8"])
def test_requantize_exact_against_python_integers(rng, oracle, out_dtype):
    n = 20000
    acc = rng.integers(-(2**31), 2**31, n, dtype=np.int64)
    acc[: n // 2] = rng.integers(-(2**20), 2**20, n // 2)
    acc[:6] = [-(2**31), 2**31 - 1, 0, -1, 1, -(2**31) + 1]
    m = rng.integers(0, 2**31, n, dtype=np.int64)
    m[:6] = [2**31 - 1] * 3 + [0] * 3
    s = rng.integers(1, 63, n, dtype=np.int64)
    t_acc, t_m, t_s = _near_ties(rng, n)
    acc, m, s = (np.concatenate(p) for p in ((acc, t_acc), (m, t_m), (s, t_s)))
    f = jax.jit(lambda x, mm, ss: requantize(x, mm, ss, out_dtype=out_dtype))
    got = np.asarray(f(acc.astype(np.int32), m.astype(np.int32), s.astype(np.int32)))
    want = np.array([oracle.requant(np.array([x]), Requant(mm, ss, out_dtype=out_dtype))[0]
                     for x, mm, ss in zip(acc, m, s)])
    assert got.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(got.astype(np.int64), want)
    # the case split must be exercised: interior values, both clips, and both shift regimes
    assert ((want > want.min()) & (want < want.max())).sum() > 1000
    assert (s <= 31).any() and (s > 32).any()


def test_requantize_per_channel_bias_zero_point_clip_broadcast_over_rows(rng, oracle):
    acc = rng.integers(-(2**22), 2**22, (7, 5)).astype(np.int32)
    rq = requant_from_scale(rng.uniform(1e-5, 1e-4, 5), rng.integers(-1000, 1000, 5),
                            zero_point=rng.integers(0, 8, 5), out_dtype="uint8", clip=(0, 15))
    f = jax.jit(lambda acc, rq: requantize(acc, rq.multiplier, rq.shift, rq.bias,
                                           rq.zero_point, out_dtype="uint8", clip=(0, 15)))
    want = oracle.requant(acc, rq)
    assert 0 < (want == 15).mean() < 1 and 0 < (want == 0).mean() < 1
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(acc), rq)), want)


def test_rounding_is_half_away_from_zero():
    acc = jnp.array([-5, -3, -1, 1, 3, 5], jnp.int32)  # x / 2 = -2.5, -1.5, -0.5, ...
    got = jax.jit(requantize)(acc, jnp.int32(1), jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(got), [-3, -2, -1, 1, 2, 3])


def test_requant_from_scale_is_dyadic_approximation():
    scale = np.array([1e-9, 3.7e-5, 0.5, 0.999999, 1.0, 7.25, 1e6])
    rq = requant_from_scale(scale)
    m, s = np.asarray(rq.multiplier, np.float64), np.asarray(rq.shift, np.float64)
    assert np.all((m >= 2**30) & (m < 2**31))
    np.testing.assert_allclose(m / 2.0**s, scale, rtol=2.0**-30)


@pytest.mark.parametrize("scale", [0.0, -1.0, np.inf, 2.0**40])
def test_requant_from_scale_rejects_unrepresentable(scale):
    with pytest.raises(ValueError, match="scale"):
        requant_from_scale([1.0, scale])


@pytest.mark.parametrize(
    "rq, match",
    [
        (Requant(jnp.int32(5), jnp.int32(0)), "shift"),
        (Requant(jnp.int32(5), jnp.int32(63)), "shift"),
        (Requant(jnp.int32(-1), jnp.int32(3)), "multiplier"),
        (Requant(jnp.ones(3, jnp.int32), jnp.ones(4, jnp.int32)), r"multiplier has shape \(3,\)"),
        (Requant(jnp.ones(4, jnp.float32), jnp.ones(4, jnp.int32)), "int32"),
        (Requant(jnp.int32(5), jnp.int32(3), out_dtype="int16"), "out_dtype"),
        (Requant(jnp.int32(5), jnp.int32(3), out_dtype="uint8", clip=(-1, 15)), "clip"),
        (Requant(jnp.int32(5), jnp.int32(3), out_dtype="uint8", clip=[0, 15]), "tuple"),
    ],
)
def test_check_requant_names_the_bad_value(rq, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_requant(rq, 4)


def test_requant_json_round_trip_and_pytree():
    rq = requant_from_scale([0.01, 0.02], [3, -4], zero_point=[1, 2], out_dtype="uint8",
                            clip=(0, 15))
    back = Requant.from_json(json.loads(json.dumps(rq.to_json())))
    assert back.out_dtype == "uint8" and back.clip == (0, 15)
    for x, y in zip(jax.tree.leaves(rq), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(jax.tree.leaves(rq)) == 4  # out_dtype and clip are static metadata

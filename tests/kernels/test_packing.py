"""Signed int4 packing: every value round-trips, the documented byte layout, validation."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from hqjax.kernels import pack_int4, unpack_int4


def test_round_trip_every_value_pair():
    pairs = np.array(list(itertools.product(range(-8, 8), repeat=2)), np.int8)  # (256, 2)
    w = pairs.T.copy()  # K=2: row 0 -> low nibbles, row 1 -> high nibbles
    packed = pack_int4(w)
    assert packed.shape == (1, 256) and packed.dtype == jnp.int8
    # every byte value 0..255 appears exactly once: the packing is a bijection
    assert sorted(np.asarray(packed).view(np.uint8).ravel().tolist()) == list(range(256))
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), w)


@pytest.mark.parametrize("k", [1, 7, 8])
def test_layout_is_halves_of_k(rng, k):
    w = rng.integers(-8, 8, (k, 3)).astype(np.int8)
    packed = np.asarray(pack_int4(w)).astype(np.int64)
    h = (k + 1) // 2
    padded = np.concatenate([w, np.zeros((2 * h - k, 3), np.int8)]).astype(np.int64)
    want = (padded[:h] & 0xF) | ((padded[h:] & 0xF) << 4)
    np.testing.assert_array_equal(packed & 0xFF, want)
    back = unpack_int4(jnp.asarray(packed.astype(np.int8)), k)
    np.testing.assert_array_equal(np.asarray(back), w)


def test_pack_along_other_axis(rng):
    w = rng.integers(-8, 8, (3, 5, 4)).astype(np.int8)
    packed = pack_int4(w, axis=1)
    assert packed.shape == (3, 3, 4)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 5, axis=1)), w)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[-8, 7\].*\[-9, 3\]"):
        pack_int4(np.array([[-9], [3]], np.int8))
    with pytest.raises(TypeError, match="integers"):
        pack_int4(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="size=5"):
        unpack_int4(jnp.zeros((4, 2), jnp.int8), 5)

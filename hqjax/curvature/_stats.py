"""Running mean and standard error of probe values, shared by the Hutchinson estimators."""

from __future__ import annotations

import jax.numpy as jnp


def welford_merge(state, x, w):
    """Merge samples ``x [c, ...]`` weighted 0/1 by ``w [c]`` into ``(n, mean, m2)``.

    Chan et al.'s parallel update (1979), which stays accurate in float32 where the naive
    sum of squares cancels.
    """
    n, mean, m2 = state
    wb = w.reshape(w.shape + (1,) * (x.ndim - 1))
    nc = jnp.sum(w)
    mean_c = jnp.sum(wb * x, 0) / jnp.maximum(nc, 1)
    m2_c = jnp.sum(wb * (x - mean_c) ** 2, 0)
    tot = n + nc
    delta = mean_c - mean
    return tot, mean + delta * nc / jnp.maximum(tot, 1), m2 + m2_c + delta**2 * n * nc / jnp.maximum(tot, 1)


def stderr(n, m2):
    """Standard error of the mean: sample standard deviation over ``sqrt(n)``."""
    return jnp.sqrt(m2 / jnp.maximum(n - 1, 1) / jnp.maximum(n, 1))

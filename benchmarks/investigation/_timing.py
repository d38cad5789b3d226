"""Shared timer for the investigation scripts (JAX side): best of ``n`` calls after a warm-up, in ms."""
import time

import jax
import numpy as np


def tm(f, *a, n=11):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t)
    return np.min(ts) * 1e3

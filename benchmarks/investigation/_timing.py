"""Shared timers for the investigation scripts (JAX side), in ms."""
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


def interleaved_medians(calls, repeats=9):
    """Median time of each zero-argument call, the calls taking turns so machine drift hits all alike."""
    for f in calls:
        jax.block_until_ready(f())
    ts = [[] for _ in calls]
    for _ in range(repeats):
        for i, f in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(f())
            ts[i].append(time.perf_counter() - t)
    return [1e3 * np.median(t) for t in ts]

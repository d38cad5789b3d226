"""Probe-parallel estimators: Hutchinson probes and SLQ runs split over a mesh axis.

Stochastic estimators average independent samples, so their probes can run on different
devices and be reduced at the end: with ``d`` devices on the mesh axis, each device runs
``ceil(num_probes / d)`` probes. The probes are exactly those of the single-device
estimators -- probe ``j`` of ``hqjax.trace`` is drawn from ``fold_in(key, j)`` and SLQ run
``r`` of ``hqjax.spectral_density`` from ``fold_in(split(key)[0], r)`` -- so the same key gives the
same result on any number of devices (up to float summation order).

The operator's own inputs (parameters, data) are replicated on every device of the axis;
combine with :func:`hqjax.distributed.data_parallel_loss` on a single-axis mesh when the data
should be split instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hqjax.curvature.lanczos import check_reorth_passes, lanczos_runner, tridiagonal
from hqjax.curvature.operators import is_concrete
from hqjax.curvature.results import DensityResult, TraceResult
from hqjax.tree import Blocks, blocks as make_blocks, flat_operator, tree_dot, tree_random_like, tree_size

__all__ = ["probe_parallel_trace", "probe_parallel_density"]

PyTree = Any


def _hoist(fn: Callable, example: Any):
    """``fn(x)`` as ``g(consts, x)`` with the arrays ``fn`` closes over as explicit inputs.

    Closed-over parameters and data would otherwise be baked into the compiled program as
    constants; as inputs they are passed (replicated) to ``shard_map`` like any argument.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(example)
    out_tree = jax.tree.structure(out_shape)

    def g(consts, x):
        return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(closed.jaxpr, consts, *jax.tree.leaves(x)))

    return g, list(closed.consts)


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)} (build one with make_mesh({axis!r}))")
    return int(mesh.shape[axis])


def _run_sharded(fn: Callable, example: Any, xs: jax.Array, mesh: Mesh, axis: str, loop: str) -> jax.Array:
    """``stack([fn(x) for x in xs])`` with the rows of ``xs`` split over mesh ``axis``.

    ``loop='host'``: one jitted ``shard_map`` call per round, every device taking one row;
    XLA:CPU runs convolution gradients much slower inside loop bodies (jax-ml/jax#12868), so
    this is the CPU default. ``'device'``: one call, each device running its rows in a
    ``lax.map`` (the right default on GPU/TPU, and the only choice under ``jit``).
    """
    d = _axis_size(mesh, axis)
    rounds = xs.shape[0] // d
    g, consts = _hoist(fn, example)
    traced = not is_concrete(consts, xs)
    if loop == "auto":
        loop = "host" if (not traced and jax.default_backend() == "cpu") else "device"
    if loop not in ("host", "device"):
        raise ValueError(f"loop must be 'auto', 'host' or 'device', got {loop!r}")
    const_specs = [P()] * len(consts)
    # The body has no collectives: every device evaluates the operator independently on
    # replicated inputs. check_vma=False because replaying the hoisted jaxpr skips the
    # implicit replicated->varying casts that tracing would insert (random_fold_in rejects
    # mixing a replicated key with a per-device probe index otherwise).
    smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(const_specs, P(axis)), out_specs=P(axis), check_vma=False)
    if loop == "host" and not traced:
        step = jax.jit(smap(lambda c, x: jax.vmap(lambda r: g(c, r))(x)))
        rep = NamedSharding(mesh, P())
        consts = [jax.device_put(c, rep) for c in consts]
        # Row d * rounds + t goes to device d in round t, so the rows come back in order.
        by_round = xs.reshape(d, rounds, *xs.shape[1:])
        outs = [step(consts, by_round[:, t]) for t in range(rounds)]
        return jnp.stack(outs, axis=1).reshape(d * rounds, *outs[0].shape[1:])
    body = smap(lambda c, x: jax.lax.map(lambda r: g(c, r), x))
    return body(consts, xs) if traced else jax.jit(body)(consts, xs)


def probe_parallel_trace(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, mesh: Mesh, *,
                         axis: str = "probe", num_probes: int = 100, blocks: Blocks | None = None,
                         dist: str = "rademacher", loop: str = "auto") -> TraceResult:
    """Hutchinson's trace estimate, total and per block, with the probes split over ``axis``.

    The same estimate as ``hqjax.trace(matvec, params, key, num_probes=..., blocks=...)``
    (Hutchinson 1989; per-layer traces of HAWQ-V2, Dong et al. 2020, Eq. 4): probe ``j`` is
    drawn from ``fold_in(key, j)``, sample ``v_j . M v_j`` (and ``v_b . (M v)_b`` per block),
    mean and standard error over the ``num_probes`` samples. Device ``i`` of the axis computes
    probes ``i * ceil(num_probes / d)`` onwards; a last partial round is padded and the
    padding dropped before the reduction.

    Parameters
    ----------
    matvec : symmetric operator ``v -> M v`` over params-shaped pytrees (e.g. ``hqjax.hessian``).
    params : pytree giving the shapes.
    key : PRNG key.
    mesh, axis : the devices to spread probes over.
    num_probes : total number of probes.
    blocks : partition for per-block traces; default ``hqjax.blocks(params)``.
    dist : ``'rademacher'`` or ``'gaussian'``.
    loop : ``'auto'``, ``'host'`` or ``'device'`` (see ``_run_sharded``).
    """
    if int(num_probes) < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    blk = make_blocks(params) if blocks is None else blocks
    if blk.treedef != jax.tree.structure(params):
        raise ValueError("blocks were built for a different params structure; build them with hqjax.blocks(params)")
    d = _axis_size(mesh, axis)
    rounds = math.ceil(int(num_probes) / d)

    def sample(j):
        v = tree_random_like(jax.random.fold_in(key, j), params, dist)
        mv = matvec(v)
        return jnp.concatenate([tree_dot(v, mv)[None], blk.dots(v, mv).reshape(len(blk))])

    samples = _run_sharded(sample, jnp.int32(0), jnp.arange(d * rounds, dtype=jnp.int32), mesh, axis, loop)
    samples = samples[: int(num_probes)]
    n = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    stderr = jnp.sqrt(jnp.sum((samples - mean) ** 2, axis=0) / max(n - 1, 1) / n)
    return TraceResult(mean[0], stderr[0], mean[1:], stderr[1:], jnp.int32(n), tuple(blk.names), "hutchinson")


def probe_parallel_density(matvec: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, mesh: Mesh, *,
                           axis: str = "probe", num_steps: int = 100, num_runs: int | None = None,
                           reorth_passes: int = 2) -> DensityResult:
    """Stochastic Lanczos quadrature with the runs split over ``axis`` (one or more per device).

    The same nodes and weights as ``hqjax.spectral_density(matvec, params, key,
    num_steps=..., num_runs=..., reorth_passes=...)`` (Ghorbani et al. 2019; PyHessian, Yao et al. 2020, Alg. 3):
    run ``r`` starts from the Rademacher probe ``fold_in(split(key)[0], r)`` and uses the same Lanczos
    process, so its result does not depend on the device count. ``num_runs`` defaults to
    the axis size (one run per device). Lanczos steps are sequential, so each device runs
    its runs in a device loop.
    """
    d = _axis_size(mesh, axis)
    passes = check_reorth_passes(reorth_passes)
    num_runs = d if num_runs is None else int(num_runs)
    if int(num_steps) < 1 or num_runs < 1:
        raise ValueError(f"num_steps and num_runs must be >= 1, got {num_steps} and {num_runs}")
    rounds = math.ceil(num_runs / d)
    m = min(int(num_steps), tree_size(params))
    flat_mv, ravel, _ = flat_operator(matvec, params)
    # hqjax.spectral_density's keys: one for the probes, one for Lanczos restarts.
    key_probe, key_restart = jax.random.split(key)
    probe = lambda r: ravel(tree_random_like(jax.random.fold_in(key_probe, r), params, "rademacher"))

    def run(r):
        lanczos = lanczos_runner(flat_mv, m, probe(0), "device", key_restart, reorth_passes=passes)
        alphas, betas, _, _ = lanczos(probe(r))
        theta, S = jnp.linalg.eigh(tridiagonal(alphas, betas))
        return jnp.stack([theta, S[0] ** 2])

    out = _run_sharded(run, jnp.int32(0), jnp.arange(d * rounds, dtype=jnp.int32), mesh, axis, "device")
    out = out[:num_runs]
    return DensityResult(out[:, 0], out[:, 1])

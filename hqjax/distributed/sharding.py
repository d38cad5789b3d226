"""Meshes, sharded placement and data-parallel curvature operators.

Data parallel curvature: the batch is sharded over a mesh axis and every Hessian-vector
product is the exact dataset-level HVP, whether through :func:`data_parallel_loss` (a
``shard_map``-ped loss that any hqjax operator differentiates), :func:`data_parallel_hessian`
(the HVP itself inside ``shard_map``) or plain ``jit`` over arrays placed by
:func:`shard_batch` (XLA's SPMD partitioner inserts the reductions).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "shard_batch", "replicate", "data_parallel_loss", "data_parallel_hessian"]

PyTree = Any


def make_mesh(axis_names: str | Sequence[str] = "data", shape: Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process).

    Parameters
    ----------
    axis_names : one name (``'data'``, ``'probe'``) or several for a multi-axis mesh.
    shape : devices along each axis; default puts all devices on the first axis.
    devices : the devices to use, default ``jax.devices()``.

    The axes are ``AxisType.Auto`` so that ``jit`` reshards inputs as needed (JAX's default
    ``Explicit`` axes reject an unsharded array passed where a sharded one is expected).
    """
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    devs = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = (len(devs),) + (1,) * (len(names) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(names):
        raise ValueError(f"mesh shape {shape} has {len(shape)} axes but axis_names {names} has {len(names)}")
    if int(np.prod(shape)) != len(devs):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices but {len(devs)} are given")
    return Mesh(np.array(devs, dtype=object).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def _check_axis(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    return int(mesh.shape[axis])


def _put(x, sharding: NamedSharding) -> jax.Array:
    # make_array_from_callback also works when some devices belong to other processes,
    # provided every process holds the same global array (the sweep's situation).
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_batch(data: PyTree, mesh: Mesh, axis: str = "data", batch_axis: int = 0) -> PyTree:
    """Place every leaf of ``data`` on ``mesh``, split along ``batch_axis`` over mesh ``axis``.

    Use ``batch_axis=1`` for stacked batches ``(n_batches, batch_size, ...)`` to split every
    batch, or ``0`` to give each device whole batches. The split must be even: pad with
    ``hqjax.data.stack_batches`` (and mask padded rows) or choose a divisible size.
    """
    n = _check_axis(mesh, axis)
    flat, treedef = jax.tree_util.tree_flatten_with_path(data)
    out = []
    for path, x in flat:
        shape = np.shape(x)
        if len(shape) <= batch_axis or shape[batch_axis] % n:
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape}: its axis {batch_axis} "
                f"cannot be split evenly over the {n} devices of mesh axis {axis!r}; use a batch size that is a "
                f"multiple of {n} (pad with hqjax.data.stack_batches and mask the padded rows)"
            )
        spec = P(*([None] * batch_axis), axis)
        out.append(_put(x, NamedSharding(mesh, spec)))
    return jax.tree.unflatten(treedef, out)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a full copy of every leaf of ``tree`` on every device of ``mesh``."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _put(x, rep), tree)


# ----------------------------------------------------------------------------- data parallel
def data_parallel_loss(loss_fn: Callable[[PyTree, PyTree], jax.Array], data: PyTree, mesh: Mesh, *,
                       axis: str = "data", batch_axis: int = 0,
                       count_fn: Callable[[PyTree], jax.Array] | None = None) -> Callable[[PyTree], jax.Array]:
    """The dataset loss ``f(params)`` evaluated with ``data`` sharded over mesh ``axis``.

    Each device evaluates ``loss_fn(params, local_data)`` (a mean over its shard) and the
    global mean is ``psum(n_d * loss_d) / psum(n_d)``, with ``n_d = count_fn(local_data)``
    (default: the shard's size along ``batch_axis``; pass the number of real rows when
    padded rows are masked). ``f`` is an ordinary differentiable function of ``params``, so
    ``hqjax.hessian(f, params)``, ``hqjax.hvp`` and every estimator work on it unchanged and
    give the single-device results; gradients are taken outside the ``shard_map``.

    Parameters
    ----------
    loss_fn : ``loss_fn(params, batch) -> mean loss over the batch``.
    data : pytree of arrays with the example axis at ``batch_axis``.
    mesh, axis : where to shard.
    batch_axis : 0 for one batch, 1 for stacked batches ``(n_batches, batch_size, ...)``.
    count_fn : ``count_fn(local_data) -> number of examples in the shard``.
    """
    data = shard_batch(data, mesh, axis, batch_axis)
    count_fn = count_fn or (lambda d: jnp.asarray(jax.tree.leaves(d)[0].shape[batch_axis], jnp.float32))
    spec = P(*([None] * batch_axis), axis)

    def local(params, shard):
        n_local = count_fn(shard)
        return jax.lax.psum(n_local * loss_fn(params, shard), axis) / jax.lax.psum(n_local, axis)

    global_loss = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=P())
    return lambda params: global_loss(params, data)


def data_parallel_hessian(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, data: PyTree,
                          mesh: Mesh, *, axis: str = "data", batch_axis: int = 0,
                          count_fn: Callable[[PyTree], jax.Array] | None = None) -> Callable[[PyTree], PyTree]:
    """Matvec ``v -> H v`` of the dataset-level Hessian, each HVP one ``shard_map`` over ``axis``.

    Every device computes the forward-over-reverse HVP (Pearlmutter 1994) of its share
    ``n_d / N * loss_d`` of the global mean loss. Inside ``shard_map`` the gradient with
    respect to replicated parameters is *already summed over the devices* (the transpose of
    the implicit broadcast is a ``psum``), so the per-device results are the global HVP
    and no further ``psum``/``pmean`` is applied: one would multiply it by the device count.

    Same arguments as :func:`data_parallel_loss`; the returned matvec is jitted and accepts
    any pytree shaped like ``params``.
    """
    data = shard_batch(data, mesh, axis, batch_axis)
    params = replicate(params, mesh)
    count_fn = count_fn or (lambda d: jnp.asarray(jax.tree.leaves(d)[0].shape[batch_axis], jnp.float32))
    spec = P(*([None] * batch_axis), axis)

    def local_hvp(p, v, shard):
        n_local = count_fn(shard)
        share = lambda q: n_local * loss_fn(q, shard) / jax.lax.psum(n_local, axis)
        return jax.jvp(jax.grad(share), (p,), (v,))[1]

    hvp = jax.jit(jax.shard_map(local_hvp, mesh=mesh, in_specs=(P(), P(), spec), out_specs=P()))
    return lambda v: hvp(params, v, data)


"""Curvature operators over parameter pytrees: each is a function ``v -> M v``.

The Hessian-vector product is forward-over-reverse (Pearlmutter 1994; ``jax.jvp`` of
``jax.grad``), the cheapest exact HVP in JAX. The Gauss-Newton operator ``J^T H_L J``
(Schraudolph 2002) is positive semi-definite for convex losses, which HAWQ users prefer
when the Hessian is indefinite. ``dataset_loss`` turns a per-batch loss into the mean loss
over stacked batches with ``lax.scan``, so the dataset-level Hessian (PyHessian's
``dataloader`` mode) is traced once, not once per batch.
"""

from __future__ import annotations

import functools

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hqjax.tree import check_same_structure

__all__ = ["hvp", "hessian", "ggn", "dataset_loss", "is_concrete"]

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


def is_concrete(*trees: PyTree) -> bool:
    """True when no leaf is a tracer, i.e. we run eagerly and may inspect values."""
    return not any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def _check_loss_finite(value, what: str) -> None:
    if is_concrete(value) and not bool(np.all(np.isfinite(np.asarray(value)))):
        raise FloatingPointError(
            f"{what} is not finite ({np.asarray(value)!r}) at the given params: the curvature of "
            "a NaN/inf loss is meaningless. Check the data, the learning rate, or the loss's log/softmax."
        )


def hvp(f: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H(params) v`` of a scalar ``f``, forward-over-reverse.

    Parameters
    ----------
    f : scalar loss ``f(params)``.
    params : the point at which the Hessian is taken.
    v : direction, a pytree with the structure and shapes of ``params``.

    Returns
    -------
    ``jax.jvp(jax.grad(f), (params,), (v,))[1]``, shaped like ``params``.
    """
    check_same_structure(params, v, "params", "v")
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def hessian(f: Callable[[PyTree], jax.Array], params: PyTree, *, linearize: bool = False,
            check_finite: bool = True) -> Matvec:
    """The Hessian of ``f`` at ``params`` as an operator ``v -> H v``.

    Parameters
    ----------
    f : scalar loss ``f(params)``.
    params : the point at which the Hessian is taken.
    linearize : if True, ``jax.linearize(jax.grad(f), params)`` runs once now and every
        product reuses its residuals: each product is cheaper but the residuals (about twice the activations) stay in memory
        as long as the operator lives. If False, every product recomputes the forward pass.
    check_finite : when ``params`` are concrete (not under ``jit``), evaluate the loss (or,
        with ``linearize``, use the gradient computed anyway) once and raise
        ``FloatingPointError`` if it is NaN/inf. Under ``jit`` no check is possible here.

    Returns
    -------
    matvec : ``v -> H v`` over pytrees shaped like ``params``; works under ``jit``/``vmap``.
    """
    if linearize:
        g, lin = jax.linearize(jax.grad(f), params)
        if check_finite:
            _check_loss_finite(jnp.sum(jnp.stack([jnp.sum(x) for x in jax.tree.leaves(g)])), "the gradient of the loss")

        def matvec(v):
            check_same_structure(params, v, "params", "v")
            return lin(v)

        return matvec
    if check_finite and is_concrete(params):
        _check_loss_finite(f(params), "the loss")
    return lambda v: hvp(f, params, v)


def ggn(model_fn: Callable[[PyTree], PyTree], loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
        *, check_finite: bool = True) -> Matvec:
    """The generalized Gauss-Newton operator ``v -> J^T H_L J v`` (Schraudolph 2002).

    Parameters
    ----------
    model_fn : ``model_fn(params) -> outputs`` (e.g. logits for a fixed batch).
    loss_fn : ``loss_fn(outputs) -> scalar`` (e.g. mean cross-entropy against fixed labels).
    params : the linearization point.
    check_finite : raise ``FloatingPointError`` eagerly if the loss at ``params`` is not
        finite (only when not under ``jit``).

    Returns
    -------
    matvec : ``v -> J^T (d^2 loss / d out^2) J v``. Positive semi-definite whenever
        ``loss_fn`` is convex in the outputs (cross-entropy, squared error), whatever the model.
    """
    if check_finite and is_concrete(params):
        _check_loss_finite(loss_fn(model_fn(params)), "the loss")

    def matvec(v):
        check_same_structure(params, v, "params", "v")
        out, jv = jax.jvp(model_fn, (params,), (v,))
        hjv = jax.jvp(jax.grad(loss_fn), (out,), (jv,))[1]
        _, vjp = jax.vjp(model_fn, params)
        return vjp(hjv)[0]

    return matvec


def dataset_loss(loss_fn: Callable[[PyTree, PyTree], jax.Array], batches: PyTree, counts=None,
                 *, unroll: int | bool = 1) -> Callable[[PyTree], jax.Array]:
    """Mean loss over a data set given as stacked batches, computed with ``lax.scan``.

    ``f(params) = sum_b counts[b] * loss_fn(params, batch_b) / sum_b counts[b]``, which equals
    the mean per-example loss on the concatenated data when ``loss_fn`` returns the mean over
    its batch's (valid) examples. ``hessian(dataset_loss(...), params)`` is then the
    dataset-level Hessian of PyHessian's ``dataloader`` mode (Yao et al. 2020, Sec. 3),
    traced once for all batches.

    Parameters
    ----------
    loss_fn : ``loss_fn(params, batch) -> scalar`` mean loss over one batch. A batch is one
        slice of ``batches`` along its leading axis, e.g. ``(x, y)`` or ``(x, y, mask)``; with
        padded rows, ``loss_fn`` must average over the valid rows only and ``counts`` must
        give the number of valid rows (``hqjax.data.stack_batches`` returns both).
    batches : pytree whose leaves share a leading axis ``num_batches``.
    counts : ``[num_batches]`` examples per batch (weights); ``None`` means equal batches.
    unroll : passed to ``lax.scan``; ``True`` (or at least ``num_batches``) writes the sum
        out batch by batch with no loop. On XLA:CPU convolution gradients inside a loop body
        are slow; for conv models on CPU with few batches, ``unroll=True`` trades compile
        time for speed.

    Returns
    -------
    f : ``f(params) -> scalar``.
    """
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("dataset_loss got no batches (an empty pytree); pass e.g. (x, y) stacked as [num_batches, batch, ...]")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every leaf of batches needs the same leading (batch-index) axis; got leading sizes {sorted(sizes)}")
    num_batches = sizes.pop()
    if num_batches == 0:
        raise ValueError("dataset_loss got an empty dataset (0 batches); the mean loss over no data is undefined")
    if counts is None:
        weights = jnp.full((num_batches,), 1.0 / num_batches)
    else:
        counts = jnp.asarray(counts, jnp.result_type(float))
        if counts.shape != (num_batches,):
            raise ValueError(f"counts has shape {counts.shape}; expected ({num_batches},), one count per batch")
        if is_concrete(counts):
            c = np.asarray(counts)
            if np.any(c < 0) or c.sum() <= 0:
                raise ValueError(f"counts must be non-negative with a positive sum (an empty dataset has none); got {c.tolist()}")
        weights = counts / jnp.sum(counts)

    straight = unroll is True or (not isinstance(unroll, bool) and int(unroll) >= num_batches)

    def f(params):
        if straight:
            # No loop at all: a fully unrolled scan still lowers to a one-trip while loop,
            # and XLA:CPU runs convolution gradients in a loop body much slower.
            parts = [weights[b] * loss_fn(params, jax.tree.map(lambda a: a[b], batches)) for b in range(num_batches)]
            return functools.reduce(jnp.add, parts)

        def body(acc, xs):
            batch, w = xs
            return acc + w * loss_fn(params, batch), None

        acc0 = jnp.zeros((), jnp.result_type(float))
        total, _ = jax.lax.scan(body, acc0, (batches, weights), unroll=unroll)
        return total

    return f

"""Where an estimator's loop runs: on the device (``lax.while_loop``) or on the host.

XLA:CPU runs convolution gradients inside loop bodies much slower than outside them
(jax-ml/jax#12868; ``benchmarks/curvature_loops.py``), so on CPU an estimator's loop may run in Python over one
jitted step instead. The step is traced once with every array it closes over (params, data,
linearization residuals) hoisted into arguments, so nothing large is baked into the
compiled program as a constant. Both modes run the same step function, so they give the
same numbers for the same key.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from hqjax.curvature.operators import is_concrete

LOOPS = ("auto", "device", "host")


def resolve_loop(loop: str, *trees: Any) -> str:
    """``'device'`` or ``'host'`` for a requested mode given the estimator's inputs.

    ``'auto'`` picks the host loop when the inputs are concrete and the default backend is
    the CPU (faster there for convolutional models, see ``benchmarks/RESULTS.md``),
    and the device loop otherwise (always under ``jit``, where the host cannot loop).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    traced = not is_concrete(*trees)
    if loop == "host" and traced:
        return "device"  # under jit the host cannot see values; the device loop is the only loop
    if loop == "auto":
        return "host" if (not traced and jax.default_backend() == "cpu") else "device"
    return loop


@functools.lru_cache(maxsize=64)
def _compiled(text: str, jaxpr_box: tuple, donate: bool = False) -> Callable:
    """One jitted evaluator per distinct program text, so calling an estimator again on the
    same model and shapes (new params values, new key) reuses the compiled step.

    ``donate`` lets XLA update the state in place: without it a host-loop step copies every
    state array, e.g. SLQ's whole Krylov basis once per Lanczos step."""
    jaxpr = jaxpr_box[0]
    return jax.jit(lambda consts, leaves: jax.core.eval_jaxpr(jaxpr, consts, *leaves),
                   donate_argnums=(1,) if donate else ())


class _Box(tuple):
    """Carries the jaxpr into the cache without taking part in the cache key."""

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Box)


def _hoist(fn: Callable, example: Any, donate: bool = False):
    """``fn`` as a jitted function of ``state`` whose closed-over arrays are arguments.

    With ``donate`` the state's buffers are consumed by the call (pass a private copy).
    Returns ``None`` when ``fn`` closes over tracers (we are inside someone's transform).
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(example)
    consts = closed.consts
    if not is_concrete(consts):
        return None
    out_tree = jax.tree.structure(out_shape)
    text = str(closed.jaxpr) + repr([(jax.numpy.shape(c), jax.numpy.result_type(c)) for c in consts])
    run = _compiled(text, _Box((closed.jaxpr,)), donate)
    return lambda state: jax.tree.unflatten(out_tree, run(consts, jax.tree.leaves(state)))


def make_while(cond: Callable, body: Callable, example: Any, loop: str) -> Callable[[Any], Any]:
    """A reusable ``state -> final state`` runner with ``lax.while_loop`` semantics."""
    if loop == "host":
        # The step returns the next state and the test on it, so each iteration is one
        # dispatch and one host sync (a second dispatch is visible on small models).
        step = _hoist(lambda s: (lambda t: (t, cond(t)))(body(s)), example, donate=True)
        test = _hoist(cond, example)
        if step is not None and test is not None:
            def run_host(state):
                # a private copy: the caller's arrays survive donation, and no buffer is
                # donated twice when the initial state repeats one (e.g. two zero vectors)
                state = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), state)
                go = bool(np.asarray(test(state)))
                while go:
                    state, go = step(state)
                    go = bool(np.asarray(go))
                return state

            return run_host
    whole = lambda state: jax.lax.while_loop(cond, body, state)
    if is_concrete(example):
        run = _hoist(whole, example)
        if run is not None:
            return run  # eager call: compile the loop once per program, consts as arguments
    return whole


def map_chunks(fn: Callable, xs: Any, chunk_size: int, loop: str) -> Any:
    """``lax.map(fn, xs, batch_size=chunk_size)``, with the loop on the host if asked."""
    n = int(jax.tree.leaves(xs)[0].shape[0])
    chunk_size = max(1, min(int(chunk_size), n))
    if loop == "device":
        return jax.lax.map(fn, xs, batch_size=chunk_size)
    batched = jax.vmap(fn) if chunk_size > 1 else (lambda x: jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda y: y[0], x))))
    pad = (-n) % chunk_size
    if pad:
        xs = jax.tree.map(lambda x: jax.numpy.concatenate([x, jax.numpy.repeat(x[-1:], pad, 0)]), xs)
    take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size), xs)
    step = _hoist(lambda i: batched(take(i)), np.int32(0))
    if step is None:
        return jax.lax.map(fn, xs, batch_size=chunk_size)
    outs = [step(np.int32(i)) for i in range((n + pad) // chunk_size)]
    return jax.tree.map(lambda *o: jax.numpy.concatenate(o)[:n], *outs)

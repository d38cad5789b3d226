""":func:`accelerate`: the one entry point of the CPU backend.

It wraps a function (a loss, ``jax.grad`` of one, or a curvature operator ``v -> H v``) so
that, when called, its jaxpr is rewritten by :mod:`.rewrite` with the kernels whose
self-checks pass. Nothing in hqjax applies it implicitly; the ``hqjax`` command opts in on
the CPU because it owns its process.

The backend builds primitives on JAX internals (``jax._src``) and jaxlib's undocumented
oneDNN custom call, so it runs only under the JAX versions it was tested with
(:data:`TESTED_JAX`): under any other it logs one warning and returns functions unchanged,
without importing those internals.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from . import _library

__all__ = ["MODES", "TESTED_JAX", "accelerate", "supported"]

TESTED_JAX = ("0.10.2",)
MODES = ("auto", "native", "onednn", "layouts")


def supported() -> tuple[bool, str]:
    """``(True, "")`` when the running JAX is one the backend was tested with, else ``(False, why)``."""
    if jax.__version__ in TESTED_JAX:
        return True, ""
    return False, (f"hqjax.kernels.cpu was tested with JAX {', '.join(TESTED_JAX)}, not {jax.__version__}; "
                   "it stays off and XLA's own operations run (same values)")


def accelerate(fn: Callable, *, mode: str = "auto", native_forward: bool = True, native_matmul: bool = True,
               min_native_width: int | None = None) -> Callable:
    """``fn`` with its convolutions and matrix products run by faster XLA:CPU kernels, same values.

    Parameters
    ----------
    fn : any function JAX can trace: a loss, ``jax.grad(loss)``, or an operator such as
        ``hqjax.hessian(loss, params)``. Only what appears in ``fn``'s own jaxpr is
        rewritten, so wrap the function that holds the derivatives: the convolutions of a
        wrapped loss keep native derivatives (their primitives transpose natively), its
        matrix products do not; a wrapped operator or gradient has all of them.
    mode : ``'auto'`` (default: ``'native'`` where its kernels build and pass their
        self-checks, else ``'onednn'`` where that passes, else ``'layouts'``; ``fn`` is
        returned unchanged when JAX's default backend is not the CPU); ``'native'``
        (hqjax's C++ kernels: weight gradients, small-window convolutions, strided GEMM;
        each kernel whose self-check fails is left to oneDNN or XLA); ``'onednn'`` (jaxlib's
        oneDNN for small windows, explicit layouts for the rest); ``'layouts'`` (explicit
        layouts only, no custom call).
    native_forward : in ``'native'`` mode, run small-window convolutions through the native
        forward kernel (else oneDNN's).
    native_matmul : in ``'native'`` mode, run weight gradients over tokens, transposed weight
        gradients and batched products through the native strided GEMM.
    min_native_width : the narrowest output width the native forward kernel takes (narrower
        ones go to oneDNN); default :data:`.rewrite.MIN_NATIVE_WIDTH`.

    Returns
    -------
    A function with ``fn``'s signature, usable under ``jit``, ``grad``, ``jvp``,
    ``linearize`` and ``vmap``. The native library is compiled (once, cached in
    ``$HQJAX_CACHE_DIR``) only when a call finds something in ``fn`` to rewrite. Failures
    (a JAX version the backend was not tested with, a failed build, a failed self-check)
    are logged once as warnings on the ``"hqjax"`` logger and leave XLA's operations in place.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ok, why = supported()
    if not ok:
        _library.warn_once(why)
        return fn
    if mode == "auto" and jax.default_backend() != "cpu":
        return fn
    from .rewrite import MIN_NATIVE_WIDTH, candidates, evaluate  # jax._src-dependent: only now

    width = MIN_NATIVE_WIDTH if min_native_width is None else int(min_native_width)

    def accelerated(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        kinds = candidates(closed.jaxpr)
        if not kinds:
            return fn(*args)
        outs = evaluate(closed, jax.tree.leaves(args), _choose(mode, kinds, native_forward, native_matmul, width))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return functools.wraps(fn)(accelerated) if hasattr(fn, "__name__") else accelerated


def _choose(mode: str, kinds: set[str], native_forward: bool, native_matmul: bool, width: int):
    """The :class:`~.rewrite.Rewrites` for ``mode``, checking only the kernels ``kinds`` needs."""
    from .conv_forward import native_forward_status
    from .conv_primitives import onednn_status
    from .conv_weight_grad import native_wgrad_status
    from .matmul import native_matmul_status
    from .rewrite import Rewrites

    if mode == "layouts" or not kinds:
        return Rewrites(min_native_width=width)
    needs_conv = bool(kinds & {"onednn", "native_forward", "native_wgrad"})
    onednn = needs_conv and onednn_status()[0]
    if mode == "onednn":
        if needs_conv and not onednn:
            raise RuntimeError(f"mode='onednn' is unavailable: {onednn_status()[1]}. Use mode='layouts'.")
        return Rewrites(onednn=onednn, min_native_width=width)
    wgrad = needs_conv and native_wgrad_status()[0]  # forward convolutions transpose to weight gradients
    if mode == "native" and needs_conv and not wgrad:
        raise RuntimeError(f"mode='native' is unavailable: {native_wgrad_status()[1]}. Use mode='onednn'.")
    fwd = native_forward and wgrad and "native_forward" in kinds and native_forward_status()[0]
    mm = native_matmul and "native_matmul" in kinds and native_matmul_status()[0]
    return Rewrites(onednn=onednn, native_wgrad=wgrad, native_forward=fwd, native_matmul=mm, min_native_width=width)

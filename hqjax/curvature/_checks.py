"""Input and output checks shared by the estimators (host side; no-ops under ``jit``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from hqjax.curvature.operators import is_concrete
from hqjax.tree import check_same_structure


def check_matvec(matvec: Callable, params: Any) -> None:
    """Raise early when ``matvec`` does not map params-shaped vectors to params-shaped vectors."""
    if not jax.tree.leaves(params):
        raise ValueError("params has no leaves: there is nothing to take the curvature of")
    out = jax.eval_shape(matvec, params)
    check_same_structure(params, out, "params", "matvec(v)")


def raise_if_not_finite(*values: Any, what: str) -> None:
    """``FloatingPointError`` if a concrete result holds NaN/inf (skipped under ``jit``)."""
    if not is_concrete(values):
        return
    for v in jax.tree.leaves(values):
        if not np.all(np.isfinite(np.asarray(v))):
            raise FloatingPointError(
                f"the {what} is not finite ({np.asarray(v)!r}): the operator returned NaN/inf. "
                "Check that the loss is finite at params (hqjax.hessian checks this when built outside jit) "
                "and that the probe/params structures match."
            )

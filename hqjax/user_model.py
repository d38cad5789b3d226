"""A user's own model and weights at the job's boundary: factories, checkpoints, checks.

``hqjax run --model package.module:factory --variables PATH`` and :func:`hqjax.run` take a
model hqjax does not ship. Everything here runs before any work and raises
:class:`hqjax.config.UserError` with one line naming the problem and the fix:

- :func:`load_factory` imports ``package.module`` and returns its ``factory`` callable;
- :func:`as_flax_model` turns what it returns (a Linen module, an NNX module, or
  ``hqjax.from_nnx``'s pair) into a model with Linen's ``init`` / ``apply(variables, x,
  train=...)`` convention;
- :func:`load_variables_file` reads pretrained variables from an Orbax checkpoint folder or a
  Flax msgpack file;
- :func:`check_variables` compares them with the model's own variable shapes (from
  ``jax.eval_shape`` of its ``init``: nothing is computed) and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any, Callable

import jax
import numpy as np

from hqjax.config import UserError

__all__ = ["load_factory", "as_flax_model", "load_variables_file", "check_variables", "tree_fingerprint",
           "import_modules"]

PyTree = Any


def import_modules(names) -> None:
    """Import each module (``--import mymetrics``: modules that register metrics)."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure while importing user code is bad input
            raise UserError(f"--import {name!r}: cannot import it ({type(e).__name__}: {e}); "
                            f"put its folder on PYTHONPATH or pip install it") from None


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``'package.module:factory'``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--model {spec!r}: a user model is given as 'package.module:factory' "
                        f"(a function returning a Flax module)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing user code is bad input
        raise UserError(f"--model {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                        f"put its folder on PYTHONPATH or pip install it") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UserError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable "
                        f"returning a Flax module")
    return factory


def as_flax_model(obj, where: str = "the model") -> tuple[Any, PyTree | None]:
    """``(model, own_variables)``: a Linen module gives ``(module, None)`` (behind
    :func:`hqjax._linen.with_train_arg` when it takes ``deterministic`` or no mode flag); an
    NNX module gives ``hqjax.from_nnx(module)`` (its variables are the weights it holds)."""
    import flax.linen as nn

    from hqjax._linen import with_train_arg
    from hqjax._nnx import NNXApply, from_nnx, is_nnx_module

    if isinstance(obj, nn.Module):
        return with_train_arg(obj), None
    if is_nnx_module(obj) or isinstance(obj, NNXApply):
        return from_nnx(obj)
    raise UserError(f"{where} is a {type(obj).__name__}, not a Flax module: return a flax.linen.Module "
                    f"(called as model.apply(variables, x, train=...)) or a flax.nnx.Module")


def load_variables_file(path: str) -> PyTree:
    """Variables from an Orbax checkpoint folder or a Flax msgpack file (as NumPy arrays)."""
    if not os.path.exists(path):
        raise UserError(f"--variables {path!r} does not exist; give an Orbax checkpoint folder or a Flax "
                        f"msgpack file (flax.serialization.msgpack_serialize of the variables dict)")
    if os.path.isdir(path):
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            raise UserError(f"--variables {path!r} is a folder (an Orbax checkpoint), which needs "
                            f"orbax-checkpoint: pip install orbax-checkpoint") from None
        try:
            restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
        except Exception as e:  # noqa: BLE001 - a broken checkpoint is bad input
            raise UserError(f"--variables {path!r} is not a readable Orbax checkpoint "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        import flax.serialization

        try:
            with open(path, "rb") as f:
                restored = flax.serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 - a corrupt file is bad input
            raise UserError(f"--variables {path!r} is not a Flax msgpack file ({type(e).__name__}: {e}); "
                            f"write it with flax.serialization.msgpack_serialize(variables) or give an Orbax "
                            f"checkpoint folder") from None
    if not isinstance(restored, dict) or not restored:
        raise UserError(f"--variables {path!r} holds no variables dict (got {type(restored).__name__})")
    return jax.tree.map(np.asarray, restored)


def _shapes(tree) -> dict[str, tuple]:
    """``{'collection/module/leaf': shape}``."""
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_variables(model, variables: PyTree, input_shape: tuple[int, ...], where: str = "--variables",
                    dtype=np.float32) -> dict:
    """``variables`` as a plain dict, checked against ``model``'s own variables for one input.

    A bare params tree (no ``'params'`` collection) is accepted and wrapped. Raises
    :class:`UserError` naming the first path that is missing, extra or of another shape,
    with both shapes.
    """
    import flax
    import flax.linen as nn
    import jax.numpy as jnp

    from hqjax.train import init_variables

    variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else dict(variables)
    variables = nn.meta.unbox(variables)  # nn.with_partitioning's boxes: their arrays
    expected = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), input_shape, dtype))
    if "params" not in variables and "params" in expected:
        variables = {"params": variables}
    want, got = _shapes(expected), _shapes(variables)
    for path, shape in want.items():
        if path not in got:
            raise UserError(f"{where} do not fit the model: {path!r} (shape {shape}) is missing from them; "
                            f"they hold {sorted(got)[:4]}{'...' if len(got) > 4 else ''}")
        if got[path] != shape:
            raise UserError(f"{where} do not fit the model: {path!r} has shape {got[path]} but the model "
                            f"expects {shape}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise UserError(f"{where} do not fit the model: {extra[0]!r} (shape {got[extra[0]]}) is not a variable "
                        f"of the model ({len(extra)} such)")
    return jax.tree.map(jnp.asarray, variables)


def tree_fingerprint(*trees) -> str:
    """A short hash of arrays' shapes, dtypes and bytes (a job's fingerprint for in-memory inputs)."""
    h = hashlib.sha256()
    for tree in trees:
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            a = np.asarray(x)
            h.update(f"{jax.tree_util.keystr(p)}{a.shape}{a.dtype}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]

"""Flax NNX models seen through Linen's calling convention: ``apply(variables, x, train=...)``.

The flow (curvature operators, costs, quantization, QAT, the job) is written against pure
functions of explicit variables. An NNX module holds its state inside, so :func:`from_nnx`
splits it once into a graph definition and Linen-style collections of pure dicts:

- ``'params'``: every ``nnx.Param``, keyed by attribute path (``{'conv1': {'kernel': ...}}``),
  which are exactly the paths of the same network written in Linen;
- ``'batch_stats'``: every ``nnx.BatchStat`` (BatchNorm running mean and variance), as in Linen;
- every other variable (RNG streams, user state) stays constant inside :class:`NNXApply`.

``NNXApply.apply(variables, x, train=False, mutable=False)`` merges a fresh copy of the
graph with those values, switches it to ``train()`` or ``eval()`` mode (train vs eval is an
explicit argument, as everywhere in hqjax) and calls it, so an NNX model and its Linen twin
go through every function of hqjax alike and give the same numbers.

This module also holds the NNX graph walking shared by the NNX quantization transform and
the cost tracer: :func:`layer_modules` and :func:`with_layer_hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax

__all__ = ["NNXApply", "from_nnx", "is_nnx_module", "layer_modules", "with_layer_hooks"]

PyTree = Any
COLLECTIONS = ("params", "batch_stats")


def is_nnx_module(obj) -> bool:
    """True for an ``nnx.Module`` instance (without importing NNX for Linen users)."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx in supported versions
        return False
    return isinstance(obj, nnx.Module)


def _filters():
    from flax import nnx

    return (nnx.Param, nnx.BatchStat, ...)


def _fill(template, pure: dict | None, collection: str):
    """A copy of State ``template`` holding the arrays of ``pure`` (a pure dict)."""
    from flax import nnx

    state = jax.tree.map(lambda x: x, template)  # replace_by_pure_dict mutates in place
    if pure:
        try:
            nnx.replace_by_pure_dict(state, pure)
        except ValueError as e:
            raise ValueError(f"variables[{collection!r}] do not fit the NNX model: {e}") from None
    return state


@dataclasses.dataclass(frozen=True, eq=False)
class NNXApply:
    """An NNX module's graph with Linen's ``init`` / ``apply`` (build with :func:`from_nnx`).

    Attributes
    ----------
    graphdef : the module's ``nnx.GraphDef``.
    templates : the ``(params, batch_stats, other)`` States the module was split into; the
        first two give the structure of ``variables``, the third is held constant.
    name : the module's class name (for messages).
    """

    graphdef: Any
    templates: tuple
    name: str = "NNX module"

    def variables(self) -> dict:
        """The module's own variables as Linen-style collections of pure dicts."""
        from flax import nnx

        out = {"params": nnx.to_pure_dict(self.templates[0])}
        stats = nnx.to_pure_dict(self.templates[1])
        if stats:
            out["batch_stats"] = stats
        return out

    def init(self, key=None, *args, **kwargs) -> dict:
        """The module's variables (an NNX module initializes itself when built; ``key`` and
        the inputs are accepted for Linen's signature and not used)."""
        del key, args, kwargs
        return self.variables()

    def merge(self, variables: PyTree, *, params: PyTree | None = None):
        """A fresh NNX module holding ``variables`` (``params`` overrides ``variables['params']``
        with a State or pure dict, e.g. fake-quantized kernels)."""
        from flax import nnx

        unknown = sorted(set(variables) - set(COLLECTIONS) - {"quant_stats"})
        if unknown:
            raise ValueError(f"{self.name}: unknown variable collections {unknown}; an NNX model takes "
                             f"{list(COLLECTIONS)} (from hqjax.from_nnx)")
        p = variables.get("params") if params is None else params
        p = p if isinstance(p, nnx.State) else _fill(self.templates[0], p, "params")
        s = _fill(self.templates[1], variables.get("batch_stats"), "batch_stats")
        return nnx.merge(self.graphdef, p, s, self.templates[2], copy=True)

    @staticmethod
    def set_mode(module, train: bool, rngs: Mapping | None = None) -> None:
        """``module.train()`` or ``module.eval()`` (BatchNorm statistics, dropout).

        ``rngs`` is Linen's ``{'dropout': key, ...}``: the module's RNG streams are reseeded
        from it, so each training step draws fresh dropout masks (the keys a merged copy holds
        are constants, and what the module draws would repeat every step otherwise). A stream
        named in ``rngs`` gets that key; every other stream (``nnx.Rngs(0)``'s ``'default'``,
        which ``nnx.Dropout`` falls back to) a key folded from the first one."""
        from flax import nnx

        if train:
            module.train()
        else:
            module.eval()
        if rngs:
            tags = sorted({v.tag for _, v in nnx.iter_graph(module) if isinstance(v, nnx.RngKey)})
            first = next(iter(rngs.values()))
            keys = {t: rngs.get(t, jax.random.fold_in(first, i)) for i, t in enumerate(tags)}
            if keys:
                nnx.reseed(module, **keys, policy="match_shape")

    def collect(self, module, mutable) -> dict:
        """The mutable collections of ``module`` after a call, as pure dicts."""
        from flax import nnx

        _, params, stats, _ = nnx.split(module, *_filters())
        names = COLLECTIONS if mutable is True else tuple(mutable)
        have = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
        return {k: have[k] for k in names if k in have}

    def apply(self, variables: PyTree, *args, train: bool = False, mutable=False, **kwargs):
        """Call the module on ``args`` with ``variables``; ``(out, updated collections)`` when
        ``mutable`` names collections (``['batch_stats']`` in training mode), as in Linen."""
        module = self.merge(variables)
        self.set_mode(module, train, kwargs.pop("rngs", None))
        out = module(*args, **kwargs)
        return (out, self.collect(module, mutable)) if mutable else out


def from_nnx(module) -> tuple[NNXApply, dict]:
    """``(model, variables)`` of an NNX module in Linen's convention (see the module docstring).

    ``model.apply(variables, x, train=False)`` equals ``module.eval(); module(x)``; the
    module itself is not modified. Everything hqjax does to a Linen ``(model, variables)``
    pair (curvature, costs, quantization, QAT, the job) then applies unchanged.
    """
    from flax import nnx

    if isinstance(module, NNXApply):
        return module, module.variables()
    if not is_nnx_module(module):
        raise TypeError(f"from_nnx takes an nnx.Module, got {type(module).__name__}")
    graphdef, params, stats, other = nnx.split(module, *_filters())
    model = NNXApply(graphdef, (params, stats, other), type(module).__name__)
    return model, model.variables()


# ----------------------------------------------------------------------------- graph walking
def _layer_types():
    from flax import nnx

    return (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)


def layer_modules(module, types: tuple | None = None) -> list[tuple[tuple, str, Any]]:
    """``[(graph_path, name, layer)]`` of the weight layers of an NNX module, in graph order;
    ``name`` is the ``'/'``-joined attribute path (the layer's name in a BitConfig)."""
    from flax import nnx

    types = types or _layer_types()
    return [(path, "/".join(str(k) for k in path), node) for path, node in nnx.iter_graph(module)
            if path and isinstance(node, types)]


def _kernel_ndim(layer) -> int | None:
    """The rank of ``layer``'s kernel as the layer itself builds it (``None``: not known)."""
    from flax import nnx

    if isinstance(layer, nnx.Einsum):
        return len(layer.kernel_shape)
    if isinstance(layer, nnx.LinearGeneral):
        return len(layer.in_features) + len(layer.out_features)
    if isinstance(layer, nnx.Conv):
        return len(layer.kernel_size) + 2
    return 2 if isinstance(layer, nnx.Linear) else None


def stacked_layers(module) -> list[str]:
    """Layers whose kernel has more axes than the layer builds: made by ``nnx.vmap`` (a stack
    of layers applied under ``nnx.scan``)."""
    return [name for _, name, layer in layer_modules(module)
            if _kernel_ndim(layer) is not None and layer.kernel.ndim > _kernel_ndim(layer)]


def _get(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set(node, key, value):
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _hooked(layer, hook):
    """An NNX module calling ``hook(layer, x, *args, **kwargs)`` instead of ``layer(x, ...)``.

    Any other public attribute (``layer.kernel``, ``layer.in_features``, a tied
    ``embed.attend``) is the layer's own, so a model that reads its submodules' attributes or
    calls their other methods runs unchanged."""
    from flax import nnx

    class _Hooked(nnx.Module):
        def __init__(self, layer, hook):
            self.layer = layer
            self.hook = hook  # a plain function: static, never part of the split state

        def __call__(self, *args, **kwargs):
            return self.hook(self.layer, *args, **kwargs)

        def __getattr__(self, name):
            if name in ("layer", "hook") or name.startswith("_"):  # not set yet, or NNX's own: not forwarded
                raise AttributeError(name)
            return getattr(self.layer, name)

    return _Hooked(layer, hook)


@contextlib.contextmanager
def with_layer_hooks(module, hook_for: Callable[[str, Any], Callable | None],
                     types: tuple | None = None) -> Iterator[Any]:
    """Within the block, each weight layer ``name`` of ``module`` for which
    ``hook_for(name, layer)`` gives a function ``hook(layer, *args, **kwargs)`` is called
    through it (NNX has no ``nn.intercept_methods``). ``types`` widens the walk (e.g. to every
    ``nnx.Module``); modules that are not callable (``nnx.List``, ``nnx.Dict``) are never
    hooked, so a model iterating over its blocks runs unchanged. Nested modules are hooked
    children first. The graph is restored on exit, so a later ``nnx.split`` of ``module``
    matches the original state."""
    swapped = []
    try:
        found = layer_modules(module, types)
        for path, name, layer in sorted(found, key=lambda t: -len(t[0])):  # stable: graph order per depth
            hook = hook_for(name, layer) if callable(layer) else None
            if hook is None:
                continue
            parent = module
            for key in path[:-1]:
                parent = _get(parent, key)
            _set(parent, path[-1], _hooked(layer, hook))
            swapped.append((parent, path[-1], layer))
        yield module
    finally:
        for parent, key, layer in reversed(swapped):
            _set(parent, key, layer)

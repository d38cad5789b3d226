"""Pytree vector algebra, random probes and the partition of parameters into layer blocks.

Every curvature operator and estimator in hqjax works on vectors shaped like a params
pytree. This module is the only place that knows how to add, scale, dot and sample such
vectors, and how a params pytree splits into named layers ("blocks").

Block names are Flax module paths joined by ``/`` (``'Conv_0'``, ``'layer1/block0/conv1'``):
the same strings a person reads in ``model.tabulate`` and the keys of a BitConfig.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "tree_dot",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_norm",
    "tree_zeros_like",
    "tree_size",
    "tree_random_like",
    "tree_ravel",
    "flat_operator",
    "FlatOperator",
    "check_same_structure",
    "Blocks",
    "blocks",
    "path_name",
    "kernel_view_shape",
    "stack_layer",
]

PyTree = Any

# Leaf names that make a module a quantizable layer (a block of its own).
OWNER_LEAVES = ("kernel", "embedding")
# Top-level Flax variable collections that are not part of a module path.
_COLLECTIONS = ("params",)
# Attribute under which an NNX Variable's array sits in a flattened ``nnx.State``.
_VARIABLE_ATTRS = ("value", "raw_value")


def kernel_view_shape(kernel_shape: Sequence[int], bias_shape: Sequence[int] | None) -> tuple[int, ...]:
    """A kernel's shape with its output features merged into the last axis: what weight
    quantizers see, so that "per channel" means per output feature.

    The output features are the bias's axes: the last one for ``Dense`` and ``Conv`` (their
    shape is unchanged), several for ``DenseGeneral``/``LinearGeneral`` with tuple features
    (attention's ``(heads, head_dim)`` projections become ``(in, heads * head_dim)``, so each
    head's columns are consecutive: Q-BERT's one scale per head, Shen et al. 2020, Sec. 3.2).
    Without a bias, or with one that is not the kernel's trailing axes, the shape is unchanged.
    """
    kernel_shape = tuple(int(d) for d in kernel_shape)
    out = tuple(int(d) for d in bias_shape) if bias_shape is not None else ()
    if len(out) < 2 or kernel_shape[len(kernel_shape) - len(out):] != out:
        return kernel_shape
    return (*kernel_shape[:len(kernel_shape) - len(out)], int(np.prod(out)))


# ----------------------------------------------------------------------------- algebra
def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product ``sum_i <a_i, b_i>`` over matching leaves, accumulated in float32+."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y).real, a, b))
    return sum(leaves, jnp.zeros((), jnp.result_type(float)))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(alpha, a: PyTree) -> PyTree:
    return jax.tree.map(lambda x: alpha * x, a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf-wise."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_dot(a, a))


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def tree_size(a: PyTree) -> int:
    """Number of scalars in a pytree (static)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(a)))


def tree_ravel(tree: PyTree) -> jax.Array:
    """The leaves of ``tree`` as one flat vector, in ``jax.flatten_util.ravel_pytree``'s order.

    Written leaf by leaf into a buffer with ``dynamic_update_slice`` rather than by
    ``concatenate``: XLA:CPU's fusion emitter runs a large concatenation fusion slowly, and
    on a small model that could cost more than the Hessian-vector product it flattened.
    """
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    out = jnp.zeros((sum(x.size for x in leaves),), dtype)
    offset = 0
    for x in leaves:
        out = jax.lax.dynamic_update_slice(out, x.astype(dtype), (offset,))
        offset += x.size
    return out


class FlatOperator(NamedTuple):
    """An operator on flat vectors (:func:`flat_operator`): ``matvec [n] -> [n]``, and
    ``ravel``/``unravel`` between params-shaped pytrees and that operator's flat vectors."""

    matvec: Callable[[jax.Array], jax.Array]
    ravel: Callable[[PyTree], jax.Array]
    unravel: Callable[[jax.Array], PyTree]


def flat_operator(matvec: Callable[[PyTree], PyTree], params: PyTree) -> FlatOperator:
    """``matvec`` as a map of flat vectors ``[n] -> [n]``, with its ``ravel`` and ``unravel``.

    Estimators that keep Krylov bases or deflation vectors as ``[k, n]`` arrays work through
    this. The flat vector holds the leaves in ``jax.flatten_util.ravel_pytree``'s order.
    """
    leaves, treedef = jax.tree.flatten(params)
    shapes = [jnp.shape(x) for x in leaves]
    dtypes = [jnp.result_type(x) for x in leaves]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def ravel(tree):
        return tree_ravel(tree)

    def unravel(x):
        out = [jax.lax.slice_in_dim(x, int(offsets[i]), int(offsets[i + 1])).reshape(s).astype(dt)
               for i, (s, dt) in enumerate(zip(shapes, dtypes))]
        return jax.tree.unflatten(treedef, out)

    return FlatOperator(lambda x: ravel(matvec(unravel(x))), ravel, unravel)


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Entries +-1 with probability 1/2 each, one random bit per entry.

    ``jax.random.rademacher`` spends a whole 32-bit threefry draw on each entry; unpacking
    the 32 bits of each draw needs 32 times fewer, which matters on small models where
    drawing probes is a visible part of a Hutchinson step.
    """
    size = int(np.prod(shape))
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(-1)[:size].astype(dtype) - 1).reshape(shape)


def tree_random_like(key: jax.Array, like: PyTree, dist: str = "rademacher") -> PyTree:
    """A random vector shaped like ``like``.

    Parameters
    ----------
    key : PRNG key.
    like : pytree whose leaves give shapes and dtypes.
    dist : ``'rademacher'`` (entries ±1, the Hutchinson probe of Avron & Toledo 2011 with
        minimal variance) or ``'gaussian'`` / ``'normal'`` (standard normal entries).
    """
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, max(len(leaves), 1))
    if dist == "rademacher":
        out = [_rademacher(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    elif dist in ("gaussian", "normal"):
        out = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    else:
        raise ValueError(f"unknown probe distribution {dist!r}: use 'rademacher' or 'gaussian'")
    return jax.tree.unflatten(treedef, out)


def check_same_structure(a: PyTree, b: PyTree, what_a: str = "params", what_b: str = "vector") -> None:
    """Raise a clear error when two pytrees differ in structure or leaf shapes."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    if sa != sb:
        pa = {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]}
        pb = {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(b)[0]}
        raise ValueError(
            f"{what_b} does not have the structure of {what_a}: "
            f"only in {what_a}: {sorted(pa - pb)[:5]}, only in {what_b}: {sorted(pb - pa)[:5]}. "
            f"Build it with jax.tree.map over {what_a} (e.g. hqjax.tree.tree_random_like)."
        )
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"{what_b} leaf {path_name(p)!r} has shape {jnp.shape(y)} but {what_a} has {jnp.shape(x)}"
            )


# ----------------------------------------------------------------------------- blocks
def _is_nnx_module(obj) -> bool:
    from hqjax._nnx import is_nnx_module

    return is_nnx_module(obj)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(path: Sequence[Any]) -> str:
    """``'/'``-joined string of a pytree key path, without the ``params`` collection.

    An NNX ``State`` flattens each ``Variable`` to its array under an attribute key
    (``['conv1']['kernel'].value``); that trailing attribute is not part of the layer's
    name, so an NNX model and its Linen twin give the same names (``'conv1/kernel'``).
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name in _VARIABLE_ATTRS:
        keys = keys[:-1]
    parts = [_key_str(k) for k in keys]
    if parts and parts[0] in _COLLECTIONS:
        parts = parts[1:]
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A partition of a params pytree's leaves into named layers.

    A leaf belongs to one block, to none, or, for a *stacked* layer (a Linen ``nn.scan`` /
    ``nn.vmap`` or an NNX ``nnx.vmap`` over layers: params with a leading layer axis), to one
    block per index along its axis 0: layer ``i`` of the stack ``'stack/fc'`` is the block
    ``'stack/fc[i]'``, so every per-layer quantity (trace, ``||Q(W)-W||^2``, bit width) is
    per layer of the stack, as in an unrolled network.

    Attributes
    ----------
    names : block names in first-appearance order (Flax module paths, ``[i]`` for layer ``i``
        of a stack).
    leaf_block : for each leaf in ``jax.tree.leaves`` order, its block index, -1 when the
        leaf belongs to no block (e.g. BatchNorm scale/bias with the default rule), or for a
        stacked leaf a tuple: the block of each index along axis 0.
    leaf_paths : each leaf's path name (for messages and tables).
    treedef : the params tree structure the partition was made for.
    sizes : number of parameters in each block.
    """

    names: tuple[str, ...]
    leaf_block: tuple[int | tuple[int, ...], ...]
    leaf_paths: tuple[str, ...]
    treedef: Any
    sizes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self.names)}") from None

    def parts(self, name: str) -> list[tuple[int, int | None]]:
        """Block ``name``'s pieces as ``(leaf index, slice)``: ``slice`` is ``None`` for a
        whole leaf, else the index along axis 0 of a stacked leaf."""
        i = self.index(name)
        out = []
        for leaf, owner in enumerate(self.leaf_block):
            if isinstance(owner, tuple):
                out += [(leaf, j) for j, o in enumerate(owner) if o == i]
            elif owner == i:
                out.append((leaf, None))
        return out

    def mask(self, name: str) -> PyTree:
        """Per leaf, whether it belongs to block ``name``: a Python bool, or for a stacked
        leaf a boolean array over its axis 0."""
        i = self.index(name)
        return jax.tree.unflatten(self.treedef, [np.asarray(b) == i if isinstance(b, tuple) else b == i
                                                 for b in self.leaf_block])

    def restrict(self, tree: PyTree, name: str) -> PyTree:
        """Zero every entry outside block ``name`` (projection ``P_b v``)."""
        keep = jax.tree.leaves(self.mask(name))
        out = []
        for x, k in zip(jax.tree.leaves(tree), keep):
            if isinstance(k, np.ndarray):
                x = jnp.where(k.reshape((-1,) + (1,) * (jnp.ndim(x) - 1)), x, jnp.zeros_like(x))
            elif not k:
                x = jnp.zeros_like(x)
            out.append(x)
        return jax.tree.unflatten(self.treedef, out)

    def restrict_operator(self, matvec: Callable[[PyTree], PyTree], name: str) -> Callable[[PyTree], PyTree]:
        """The diagonal block ``P_b M P_b`` of an operator, as an operator on full vectors."""
        return lambda v: self.restrict(matvec(self.restrict(v, name)), name)

    def dots(self, a: PyTree, b: PyTree) -> jax.Array:
        """Per-block inner products ``[<a_b, b_b> for b in names]`` as one array."""
        terms: list[list] = [[] for _ in self.names]
        for x, y, owner in zip(jax.tree.leaves(a), jax.tree.leaves(b), self.leaf_block):
            if isinstance(owner, tuple):
                per_slice = jnp.sum(jnp.reshape(jnp.conj(x) * y, (len(owner), -1)), axis=1).real
                for j, o in enumerate(owner):
                    terms[o].append(per_slice[j])
            elif owner >= 0:
                terms[owner].append(jnp.vdot(x, y).real)
        if not terms:
            return jnp.zeros((0,), jnp.result_type(float))
        return jnp.stack([sum(t[1:], t[0]) for t in terms])

    def leaves_of(self, tree: PyTree, name: str) -> dict[str, jax.Array]:
        """The leaves of ``tree`` in block ``name`` (a stacked leaf's slice), keyed by their
        path names."""
        leaves = jax.tree.leaves(tree)
        return {self.leaf_paths[i]: leaves[i] if j is None else leaves[i][j] for i, j in self.parts(name)}

    def require(self, what: str = "params") -> "Blocks":
        """``self``, or a ValueError saying why there are no blocks and what to do instead.

        Per-layer work (sensitivity tables, allocation, the job) needs at least one layer;
        an empty partition means the tree is not a model's params or its layers are not
        Flax layers owning a ``kernel``/``embedding``.
        """
        if self.names:
            return self
        shown = ", ".join(repr(p) for p in self.leaf_paths[:6]) or "no leaves at all"
        raise ValueError(
            f"no layer with a 'kernel' or 'embedding' parameter found in {what} (its leaves: {shown}"
            f"{', ...' if len(self.leaf_paths) > 6 else ''}); pass the model's params (Linen: "
            f"variables['params']; NNX: nnx.split(model, nnx.Param, ...)[1] or hqjax.from_nnx(model)), "
            f"or name the layers yourself with blocks=hqjax.blocks(params, rule=...)")

    def kernel(self, tree: PyTree, name: str) -> jax.Array:
        """The block's owning weight (its ``kernel`` or ``embedding`` leaf)."""
        for p, x in self.leaves_of(tree, name).items():
            if p.rsplit("/", 1)[-1] in OWNER_LEAVES:
                return x
        raise KeyError(f"block {name!r} has no kernel/embedding leaf")

    def kernel_view(self, tree: PyTree, name: str) -> jax.Array:
        """The block's owning weight as its quantizer sees it: a kernel with its output
        features merged into the last axis (:func:`kernel_view_shape`), else unchanged."""
        leaves = self.leaves_of(tree, name)
        w = self.kernel(tree, name)
        bias = next((x for p, x in leaves.items() if p.rsplit("/", 1)[-1] == "bias"), None)
        if bias is None or not any(p.rsplit("/", 1)[-1] == "kernel" for p in leaves):
            return w
        return jnp.reshape(w, kernel_view_shape(jnp.shape(w), jnp.shape(bias)))


_STACK_LAYER = re.compile(r"^(.*)\[(\d+)\]$")


def stack_layer(name: str) -> tuple[str, int | None]:
    """A block name split into its module path and its layer in a stack:
    ``'blocks/fc1[2]'`` -> ``('blocks/fc1', 2)``; a name of no stack -> ``(name, None)``."""
    m = _STACK_LAYER.match(name)
    return (m[1], int(m[2])) if m else (name, None)


def _stack_of(path: str, stacked: Sequence[str]) -> str | None:
    return next((s for s in stacked if path == s or path.startswith(s + "/")), None)


def _stack_depths(paths: Sequence[str], shapes: Sequence[tuple], stacked: Sequence[str]) -> dict[str, int]:
    """``{stack: number of layers}``, the leading axis every param under the stack shares."""
    depth = {}
    for s in stacked:
        under = [(p, shape) for p, shape in zip(paths, shapes) if _stack_of(p, (s,))]
        if not under:
            raise ValueError(f"stacked module {s!r} has no params; stacked modules are module paths such as "
                             f"{sorted({p.rsplit('/', 1)[0] for p in paths if '/' in p})[:4]}")
        lengths = {shape[0] if shape else None for _, shape in under}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"stacked module {s!r}: its params do not share one leading layer axis "
                             f"({', '.join(f'{p} {shape}' for p, shape in under[:4])})")
        depth[s] = lengths.pop()
    return depth


def blocks(params: PyTree, rule: Callable[[str], str | None] | None = None, *,
           stacked: Sequence[str] = ()) -> Blocks:
    """Partition ``params`` into named layer blocks.

    Parameters
    ----------
    params : a Flax params pytree (with or without the top-level ``'params'`` collection).
    rule : optional function from a leaf's path name (``'layer1/conv1/kernel'``) to its block
        name, or ``None`` to leave the leaf out of every block. The default puts every leaf
        of a module that owns a ``kernel`` or ``embedding`` into a block named by the
        module path, and leaves the rest (normalization scales and biases) out.
    stacked : module paths whose params carry a leading layer axis (a Linen ``nn.scan`` /
        ``nn.vmap`` with ``variable_axes={'params': 0}``, layers made by ``nnx.vmap``);
        :func:`hqjax.stacked_modules` finds them from the model. Each layer ``i`` of such
        a stack is a block of its own, ``'<module>[i]'``, the stack's blocks ordered layer
        by layer.

    Returns
    -------
    Blocks : the partition, with names in parameter order (possibly empty: per-layer
    consumers call :meth:`Blocks.require`, which says why).
    """
    if _is_nnx_module(params):
        raise TypeError(f"blocks takes a params pytree, not the {type(params).__name__} module; for an NNX model "
                        f"pass nnx.split(model, nnx.Param, ...)[1] (or hqjax.from_nnx(model)[1]['params'])")
    if isinstance(stacked, str):
        stacked = (stacked,)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_name(p) for p, _ in flat]
    if rule is None:
        owners = {p.rsplit("/", 1)[0] if "/" in p else "" for p in paths if p.rsplit("/", 1)[-1] in OWNER_LEAVES}

        def rule(p: str) -> str | None:
            module = p.rsplit("/", 1)[0] if "/" in p else ""
            return module if module in owners else None

    depth = _stack_depths(paths, [np.shape(x) for _, x in flat], stacked)
    modules: list[str] = []  # block names before stacks are split into layers
    leaf_module = [rule(p) for p in paths]
    for m in leaf_module:
        if m is not None and m not in modules:
            modules.append(m)
    stack_of = {p: _stack_of(p, stacked) for p in paths}
    module_stack = {m: stack_of[p] for p, m in zip(paths, leaf_module) if m is not None}
    names: list[str] = []
    for m in modules:
        s = module_stack[m]
        if s is None:
            names.append(m)
        elif not any(n.startswith(f"{m}[") for n in names):
            members = [k for k in modules if module_stack[k] == s]
            names += [f"{k}[{j}]" for j in range(depth[s]) for k in members]
    index = {n: i for i, n in enumerate(names)}
    leaf_block: list = []
    sizes = [0] * len(names)
    for p, (_, x), m in zip(paths, flat, leaf_module):
        if m is None:
            leaf_block.append(-1)
        elif stack_of[p] is None:
            leaf_block.append(index[m])
            sizes[index[m]] += int(np.size(x))
        else:
            owner = tuple(index[f"{m}[{j}]"] for j in range(depth[stack_of[p]]))
            leaf_block.append(owner)
            for o in owner:
                sizes[o] += int(np.size(x)) // len(owner)
    return Blocks(tuple(names), tuple(leaf_block), tuple(paths), treedef, tuple(sizes))

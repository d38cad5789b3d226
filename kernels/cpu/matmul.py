"""Float32 matrix products that XLA:CPU transposes first, run by a native strided GEMM.

Why this exists: these kinds of ``dot_general`` in a differentiated network are slow on
XLA:CPU (the encoder and MLP rows of ``benchmarks/RESULTS.md``).

- *Weight gradients* ``dW[m, n] = sum_t x[t, m] dy[t, n]`` contract the leading (token) axes
  of both operands. XLA copies one operand transposed (a ``copy`` fusion over the whole
  activation) and runs Eigen's contraction, which packs both operands again.
- *Batched products* (attention's ``q k^T`` and ``p v`` per batch and head, and their
  gradients), many small matrices, go to Eigen or YNNPACK at a fraction of the GEMM rate.
- *Transposed weight gradients*: autodiff writes a dense layer's weight gradient as
  ``transpose(dy^T x)``, so XLA adds a transposed copy of the result, and in a linearized
  HVP a transposed add of two such products.

``native_kernels.cc`` holds a BLIS-style GEMM (a 6 x 16 AVX2 register tile over packed panels)
that reads both operands through strides, so neither needs a transposed copy, and runs the
batch and the blocks of C on XLA's thread pool. :data:`strided_matmul_p` is that product
as a primitive: the FFI call on the CPU when :func:`native_matmul_status` passes, the same
``lax.dot_general`` anywhere else. :mod:`.rewrite` routes the eligible products of
a function to it (:func:`matmul_form` says which), folding the transpose of the third kind
into the product. Only these kinds: for plain ``x @ W`` products XLA's YNNPACK kernels are
as fast, and XLA fuses the elementwise work around them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax._src.interpreters import ad, batching, mlir
from jax.extend import core as jcore

from . import _library

__all__ = ["MatmulForm", "matmul_form", "native_matmul_status", "strided_matmul", "strided_matmul_p"]

MIN_FLOPS = 1 << 22  # smaller products are not worth a custom call (the head's 32 x 128 x 10)


class MatmulForm(NamedTuple):
    """A ``dot_general`` as ``C[b, m, n] = sum_k A(b, m, k) B(b, k, n)`` over row-major operands.

    Sizes ``batch, m, n, k``; element strides of the lhs ``a_batch, a_m, a_k`` and of the rhs
    ``b_batch, b_k, b_n``. The output ``[batch..., lhs free..., rhs free...]`` of the
    ``dot_general`` is ``C`` in row-major order.
    """

    batch: int
    m: int
    n: int
    k: int
    a_batch: int
    a_m: int
    a_k: int
    b_batch: int
    b_k: int
    b_n: int


def _axes(dims, shape) -> tuple[int, int] | None:
    """``(size, stride)`` of consecutive increasing axes ``dims`` of a row-major array, else None."""
    dims = tuple(dims)
    if not dims:
        return 1, 0
    if dims != tuple(range(dims[0], dims[0] + len(dims))):
        return None
    return int(np.prod([shape[d] for d in dims])), int(np.prod(shape[dims[-1] + 1:]))


def strided_form(lhs_shape, rhs_shape, dimension_numbers) -> MatmulForm | None:
    """The strided form of any ``dot_general`` whose batch axes lead both operands and whose
    contracting and free axes are each consecutive (else None)."""
    (lc, rc), (lb, rb) = dimension_numbers
    nb = len(lb)
    if tuple(lb) != tuple(range(nb)) or tuple(rb) != tuple(range(nb)):
        return None
    if list(np.argsort(lc)) != list(np.argsort(rc)):  # the k index must run the same way in both
        return None
    lc, rc = sorted(lc), sorted(rc)
    lf = [d for d in range(nb, len(lhs_shape)) if d not in lc]
    rf = [d for d in range(nb, len(rhs_shape)) if d not in rc]
    parts = [_axes(lc, lhs_shape), _axes(rc, rhs_shape), _axes(lf, lhs_shape), _axes(rf, rhs_shape)]
    if any(p is None for p in parts):
        return None
    (k, a_k), (_, b_k), (m, a_m), (n, b_n) = parts
    batch = int(np.prod(lhs_shape[:nb]))
    return MatmulForm(batch, m, n, k, int(np.prod(lhs_shape[nb:])), a_m, a_k, int(np.prod(rhs_shape[nb:])), b_k, b_n)


def matmul_form(lhs_aval, rhs_aval, params: dict, transposed_output: bool = False) -> MatmulForm | None:
    """The :class:`MatmulForm` of a ``dot_general`` equation worth running natively, else None.

    Taken: float32 operands and result, at least :data:`MIN_FLOPS`, and either batch axes
    (attention), or no batch axes with the contracting axes leading both operands (a weight
    gradient over tokens: ``x^T dy``) and either at least as long as either free size, or
    ``transposed_output``: the product replaces ``transpose(dy^T x)``, so running it natively
    also saves XLA:CPU's transposed copy of the result (the MLP's 1024 x 1024 x 256 weight
    gradients, which XLA's own product computes as fast).
    """
    f32 = lhs_aval.dtype == jnp.float32 and rhs_aval.dtype == jnp.float32
    if not f32 or params.get("preferred_element_type") not in (None, jnp.float32):
        return None
    form = strided_form(lhs_aval.shape, rhs_aval.shape, params["dimension_numbers"])
    if form is None or 2 * form.batch * form.m * form.n * form.k < MIN_FLOPS:
        return None
    (lc, rc), (lb, _) = params["dimension_numbers"]
    if lb:
        return form
    leading = tuple(sorted(lc)) == tuple(range(len(lc))) and tuple(sorted(rc)) == tuple(range(len(rc)))
    return form if leading and (transposed_output or form.k >= max(form.m, form.n)) else None


# --------------------------------------------------------------------------------------------
# The primitive

def _reference(lhs, rhs, *, dimension_numbers):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


strided_matmul_p = jcore.Primitive("strided_matmul")
strided_matmul_p.def_impl(functools.partial(dispatch.apply_primitive, strided_matmul_p))


def _abstract_eval(lhs, rhs, *, dimension_numbers):
    out = jax.eval_shape(functools.partial(_reference, dimension_numbers=dimension_numbers),
                         jax.ShapeDtypeStruct(lhs.shape, lhs.dtype), jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))
    return jax.core.ShapedArray(out.shape, jnp.float32)


strided_matmul_p.def_abstract_eval(_abstract_eval)


def _struct(v):
    return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


# lax's transposes of the same product: XLA dots (second-order reverse mode only).
def _transpose_lhs(ct, lhs, rhs, *, dimension_numbers):
    return jax.linear_transpose(lambda l: _reference(l, rhs, dimension_numbers=dimension_numbers), _struct(lhs))(ct)[0]


def _transpose_rhs(ct, lhs, rhs, *, dimension_numbers):
    return jax.linear_transpose(lambda r: _reference(lhs, r, dimension_numbers=dimension_numbers), _struct(rhs))(ct)[0]


ad.defbilinear(strided_matmul_p, _transpose_lhs, _transpose_rhs)


def _batch_rule(args, dims, *, dimension_numbers):
    return jax.vmap(functools.partial(_reference, dimension_numbers=dimension_numbers), in_axes=dims)(*args), 0


batching.primitive_batchers[strided_matmul_p] = _batch_rule

_reference_lowering = mlir.lower_fun(_reference, multiple_results=False)
mlir.register_lowering(strided_matmul_p, _reference_lowering)


def _cpu_lowering(ctx, lhs, rhs, *, dimension_numbers):
    form = strided_form(ctx.avals_in[0].shape, ctx.avals_in[1].shape, dimension_numbers)
    if form is None or not _library.register()[0]:  # still correct, through XLA
        return _reference_lowering(ctx, lhs, rhs, dimension_numbers=dimension_numbers)
    return jax.ffi.ffi_lowering(_library.MATMUL_TARGET)(ctx, lhs, rhs, **{k: np.int64(v) for k, v in form._asdict().items()})


mlir.register_lowering(strided_matmul_p, _cpu_lowering, platform="cpu")


def _canonical(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(int(d) for d in lc), tuple(int(d) for d in rc)), (tuple(int(d) for d in lb), tuple(int(d) for d in rb))


def strided_matmul(lhs, rhs, dimension_numbers):
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` in float32 through :data:`strided_matmul_p`
    (the native GEMM on the CPU for products :func:`strided_form` accepts)."""
    return strided_matmul_p.bind(lhs, rhs, dimension_numbers=_canonical(dimension_numbers))


# --------------------------------------------------------------------------------------------
# Self-check

_PROBES = (  # (lhs shape, rhs shape, dimension numbers): edges of every block size and layout
    ((300, 13), (300, 37), (((0,), (0,)), ((), ()))),              # x^T dy, tiles cut at both edges
    ((2, 150, 7), (2, 150, 20), (((0, 1), (0, 1)), ((), ()))),     # two token axes
    ((3, 2, 9, 5), (3, 2, 5, 17), (((3,), (2,)), ((0, 1), (0, 1)))),   # batched NN
    ((3, 2, 9, 5), (3, 2, 17, 5), (((3,), (3,)), ((0, 1), (0, 1)))),   # batched NT
    ((4, 260, 8), (4, 260, 33), (((1,), (1,)), ((0,), (0,)))),         # batched TN, two K blocks
    ((2, 0, 4), (2, 0, 3), (((1,), (1,)), ((0,), (0,)))),              # empty contraction: zeros
)


def _matmul_cases(draw):
    for ls, rs, dn in _PROBES:
        lhs, rhs = draw(ls), draw(rs)
        yield (jax.jit(functools.partial(strided_matmul, dimension_numbers=dn))(lhs, rhs),
               jax.jit(functools.partial(_reference, dimension_numbers=dn))(lhs, rhs), f"{ls} x {rs}, {dn}")


@functools.lru_cache(maxsize=1)
def native_matmul_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native GEMM builds, loads and agrees with XLA.

    Once per process, like :func:`~.conv_weight_grad.native_wgrad_status` (same library), on
    products with edge tiles in every direction, several token axes, batched NN/NT/TN
    layouts, more than one reduction block and an empty contraction.
    """
    return _library.self_check("matrix product", _matmul_cases)

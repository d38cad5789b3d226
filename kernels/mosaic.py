"""Pallas Mosaic backend (TPU): int8 x int8 -> int32 on the MXU, K as the innermost grid axis.

The grid is ``(M/bm, N/bn, K/bk)``; Pallas double-buffers each input block from HBM into
VMEM while the previous one is multiplied, and an int32 VMEM scratch accumulates across the
``"arbitrary"`` K axis. The fused dyadic epilogue (:func:`.requant.requantize`) runs once on
the last K step, before the only store of the output tile.

TPU tiling: int8 arrays are laid out in (32, 128) tiles (8 sublanes x 4 packed bytes, 128
lanes), int32 in (8, 128), so ``block_m`` must be a multiple of 32 and ``block_n``,
``block_k`` multiples of 128. The int4-weight variant streams packed bytes, passes the
activations twice (block ``k`` of each K-half of :mod:`.packing`'s layout) and unpacks in
vector registers (int32 shifts, which every TPU generation's VPU has).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._tiling import ceil_to, epilogue_operands, pad2, split_k_halves
from .packing import unpack_int4_halves
from .requant import Requant, requantize

__all__ = ["MosaicBlocks", "matmul_mosaic", "int4_matmul_mosaic"]


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tile sizes: ``block_m`` a multiple of 32, ``block_n`` and ``block_k`` of 128.

    Defaults fill the 128x128 (v5e) and 256x256 (v6e) MXUs and keep double-buffered int8
    inputs plus the int32 accumulator at about 2.5 MiB of VMEM. Each block shrinks to the
    (aligned) problem size for small problems.
    """

    block_m: int = 256
    block_n: int = 256
    block_k: int = 512

    def check(self) -> None:
        for name, q in (("block_m", 32), ("block_n", 128), ("block_k", 128)):
            v = getattr(self, name)
            if v <= 0 or v % q:
                raise ValueError(f"MosaicBlocks.{name}={v}: must be a positive multiple of {q} "
                                 "(TPU int8 tiles are 32x128)")


def _fit(blocks: MosaicBlocks, m: int, n: int, k: int) -> MosaicBlocks:
    blocks.check()
    return MosaicBlocks(min(blocks.block_m, ceil_to(m, 32)), min(blocks.block_n, ceil_to(n, 128)),
                        min(blocks.block_k, ceil_to(k, 128)))


def _kernel(*refs, int4: bool, has_rq: bool, has_init: bool, rq_meta: tuple | None):
    n_ab = 3 if int4 else 2
    n_in = n_ab + (4 if has_rq else 0) + (1 if has_init else 0)
    ins, o_ref, acc_ref = refs[:n_in], refs[n_in], refs[n_in + 1]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def dot(x, y):
        return jnp.dot(x, y, preferred_element_type=jnp.int32)

    if int4:
        a_lo_ref, a_hi_ref, p_ref = ins[:3]
        w_lo, w_hi = unpack_int4_halves(p_ref[...])
        acc_ref[...] += dot(a_lo_ref[...], w_lo) + dot(a_hi_ref[...], w_hi)
    else:
        acc_ref[...] += dot(ins[0][...], ins[1][...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        acc = acc_ref[...]
        if has_rq:
            mult, shift, bias, zero = (r[...] for r in ins[n_ab:n_ab + 4])
            acc = requantize(acc, mult, shift, bias, zero, out_dtype=rq_meta[0],
                             clip=rq_meta[1])
        o_ref[...] = acc.astype(o_ref.dtype)


def _call(a, b, rq, blocks, interpret, out_init, *, int4: bool):
    m, k = a.shape
    n = b.shape[1]
    k_rows = b.shape[0] if int4 else k
    bl = _fit(blocks, m, n, k_rows)
    bm, bn, bk = bl.block_m, bl.block_n, bl.block_k
    mp, np_, kp = ceil_to(m, bm), ceil_to(n, bn), ceil_to(k_rows, bk)
    nk = kp // bk
    if int4:
        a_p = pad2(split_k_halves(a, k, k_rows, kp), mp, 2 * kp)
        operands = [a_p, a_p, pad2(b, kp, np_)]
        in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                    pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk + nk)),
                    pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))]
    else:
        operands = [pad2(a, mp, kp), pad2(b, kp, np_)]
        in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                    pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))]
    out_dtype, aliases = epilogue_operands(
        operands, in_specs, rq, out_init, n, mp, np_,
        pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
    kernel = functools.partial(_kernel, int4=int4, has_rq=rq is not None,
                               has_init=out_init is not None,
                               rq_meta=None if rq is None else (rq.out_dtype, rq.clip))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="hqjax_int4_matmul" if int4 else "hqjax_int8_matmul",
    )(*operands)
    return out[:m, :n]


def matmul_mosaic(a, b, rq: Requant | None = None, *, blocks: MosaicBlocks = MosaicBlocks(),
                  interpret: bool = False, out_init=None):
    """``a (M, K) int8 @ b (K, N) int8`` -> int32 (or ``rq``'s dtype), Pallas Mosaic TPU."""
    return _call(a, b, rq, blocks, interpret, out_init, int4=False)


def int4_matmul_mosaic(a, packed, rq: Requant | None = None, *,
                       blocks: MosaicBlocks = MosaicBlocks(), interpret: bool = False,
                       out_init=None):
    """``a (M, K) int8 @ unpack_int4(packed)`` with the unpack in vector registers, TPU."""
    return _call(a, packed, rq, blocks, interpret, out_init, int4=True)

"""Pallas Triton backend (NVIDIA GPUs): int8 x int8 -> int32 tiles on the tensor cores.

One program per (block_m, block_n) output tile; it walks K in ``block_k`` steps inside the
kernel (a ``fori_loop``, lowered to an ``scf.for`` that Triton software-pipelines), keeps the
int32 accumulator in registers, and applies the fused dyadic epilogue
(:func:`.requant.requantize`) before the single store, so a quantized layer is one launch.

The int4-weight variant reads packed bytes (half the weight traffic) and unpacks them in
registers into the two K-halves of :mod:`.packing`'s layout, multiplying each by its block
of activations: ``acc += a_lo @ w_lo + a_hi @ w_hi``. Triton wants power-of-two tiles of at
least 16 on each ``tl.dot`` dimension; operands are zero-padded to whole blocks
(:mod:`._tiling`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ._tiling import ceil_to, epilogue_operands, pad2, split_k_halves
from .packing import unpack_int4_halves
from .requant import Requant, requantize

__all__ = ["TritonBlocks", "matmul_triton", "int4_matmul_triton"]


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes and launch parameters (powers of two, each >= 16).

    The defaults are the usual int8 tensor-core tile for sm80/sm90; ``block_m`` shrinks to
    the next power of two >= M for small batches (the memory-bound, weight-streaming case).
    With the default blocks and M <= 64, a memory-bound configuration is used instead
    (``_SMALL_M_BLOCKS``). ``group_m`` row-blocks are walked together along N (Triton's grouped ordering), so
    tiles launched together share their A and B blocks in L2.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8

    def check(self) -> None:
        if self.group_m < 1:
            raise ValueError(f"TritonBlocks.group_m={self.group_m}: must be >= 1")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TritonBlocks.{name}={v}: Triton tiles must be powers of two "
                                 ">= 16 (e.g. 16, 32, 64, 128, 256)")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# Small M (decode, batch-1 inference) is memory-bound: narrower N tiles give 2x the programs
# (128 for N=8192) to spread the weight stream over more SMs, deeper K tiles fewer loop
# steps. A heuristic, not yet measured on hardware; used only when blocks are the default.
_SMALL_M = 64
_SMALL_M_BLOCKS = TritonBlocks(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)


def _fit(blocks: TritonBlocks, m: int) -> TritonBlocks:
    blocks.check()
    if m <= _SMALL_M and blocks == TritonBlocks():
        blocks = _SMALL_M_BLOCKS
    return dataclasses.replace(blocks, block_m=min(blocks.block_m, max(16, _next_pow2(m))))


def _grouped(pid, nm: int, nn: int, group_m: int):
    """(row block, column block) of program ``pid`` in grouped order (Triton tutorial 03)."""
    per_group = group_m * nn
    first_m = (pid // per_group) * group_m
    size = jnp.minimum(nm - first_m, group_m)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


def _kernel(*refs, nk: int, bk: int, k_off: int, int4: bool, has_rq: bool, has_init: bool,
            rq_meta: tuple | None):
    a_ref, b_ref = refs[:2]
    rq_refs = refs[2:6] if has_rq else ()
    o_ref = refs[-1]
    bm, bn = o_ref.shape

    def dot(x, y):
        return jnp.dot(x, y, preferred_element_type=jnp.int32)

    def body(k, acc):
        start = pl.multiple_of(k * bk, bk)
        if int4:
            w_lo, w_hi = unpack_int4_halves(b_ref[pl.ds(start, bk), :])
            acc += dot(a_ref[:, pl.ds(start, bk)], w_lo)
            return acc + dot(a_ref[:, pl.ds(start + k_off, bk)], w_hi)
        return acc + dot(a_ref[:, pl.ds(start, bk)], b_ref[pl.ds(start, bk), :])

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
    if has_rq:
        mult, shift, bias, zero = (r[...] for r in rq_refs)
        acc = requantize(acc, mult, shift, bias, zero, out_dtype=rq_meta[0], clip=rq_meta[1])
    o_ref[...] = acc.astype(o_ref.dtype)


def _call(a, b, rq, blocks, interpret, out_init, *, int4: bool):
    """Shared launcher: ``a`` (M, K), ``b`` int8 (K, N) or packed (ceil(K/2), N)."""
    m, k = a.shape
    n = b.shape[1]
    bl = _fit(blocks, m)
    bm, bn, bk = bl.block_m, bl.block_n, bl.block_k
    mp, np_ = ceil_to(m, bm), ceil_to(n, bn)
    if int4:
        kh = b.shape[0]
        khp = ceil_to(kh, bk)
        a_p = pad2(split_k_halves(a, k, kh, khp), mp, 2 * khp)
        b_p = pad2(b, khp, np_)
        nk, k_off, k_rows = khp // bk, khp, khp
    else:
        kp = ceil_to(k, bk)
        a_p, b_p = pad2(a, mp, kp), pad2(b, kp, np_)
        nk, k_off, k_rows = kp // bk, 0, kp
    nm, nn = mp // bm, np_ // bn
    ij = functools.partial(_grouped, nm=nm, nn=nn, group_m=bl.group_m)
    operands = [a_p, b_p]
    in_specs = [pl.BlockSpec((bm, a_p.shape[1]), lambda p: (ij(p)[0], 0)),
                pl.BlockSpec((k_rows, bn), lambda p: (0, ij(p)[1]))]
    out_dtype, aliases = epilogue_operands(
        operands, in_specs, rq, out_init, n, mp, np_,
        pl.BlockSpec((1, bn), lambda p: (0, ij(p)[1])))
    kernel = functools.partial(
        _kernel, nk=nk, bk=bk, k_off=k_off, int4=int4, has_rq=rq is not None,
        has_init=out_init is not None,
        rq_meta=None if rq is None else (rq.out_dtype, rq.clip))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(nm * nn,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), ij),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=bl.num_warps, num_stages=bl.num_stages),
        interpret=interpret,
        name="hqjax_int4_matmul" if int4 else "hqjax_int8_matmul",
    )(*operands)
    return out[:m, :n]


def matmul_triton(a, b, rq: Requant | None = None, *, blocks: TritonBlocks = TritonBlocks(),
                  interpret: bool = False, out_init=None):
    """``a (M, K) int8 @ b (K, N) int8`` -> int32 (or ``rq``'s dtype), Pallas Triton."""
    return _call(a, b, rq, blocks, interpret, out_init, int4=False)


def int4_matmul_triton(a, packed, rq: Requant | None = None, *,
                       blocks: TritonBlocks = TritonBlocks(), interpret: bool = False,
                       out_init=None):
    """``a (M, K) int8 @ unpack_int4(packed)`` with the unpack in registers, Pallas Triton."""
    return _call(a, packed, rq, blocks, interpret, out_init, int4=True)

"""One entry point for every integer product: backend choice, shape handling, checks.

``int_matmul`` and ``int4_matmul`` accept any leading (batch) dimensions, any M, N, K,
int8 or uint8 activations, an optional fused requantization epilogue, and run on the XLA
reference or on a Pallas kernel (Triton on GPU, Mosaic on TPU). Every backend returns the
same integers, so the backend is a speed choice only.

uint8 activations (the output of a ``uint8`` epilogue, i.e. after a ReLU) are shifted to
int8 by ``a - 128`` and the product corrected by ``128 * sum_k b[k, n]``, which is exact and
folds into the epilogue's bias, so the kernels only ever see int8 x int8.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import mosaic, reference, tiles, triton
from .packing import unpack_int4
from .requant import Requant, check_requant

__all__ = ["BACKENDS", "default_backend", "int_matmul", "int4_matmul"]

BACKENDS = ("xla", "triton", "mosaic")
_PLATFORM = {"triton": "gpu", "mosaic": "tpu"}
_BLOCKS = {"triton": triton.TritonBlocks, "mosaic": mosaic.MosaicBlocks}


def default_backend(platform: str | None = None) -> str:
    """The backend ``backend="auto"`` picks on ``platform`` (default: JAX's default backend):
    ``"triton"`` on GPU, ``"mosaic"`` on TPU, ``"xla"`` elsewhere (CPU)."""
    platform = platform or jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "tpu": "mosaic"}.get(platform, "xla")


def _resolve(backend: str, interpret: bool | None, blocks):
    if backend == "auto":
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use 'auto' or one of {BACKENDS}")
    if backend == "xla":
        if blocks is not None:
            raise ValueError("blocks apply to the Pallas backends ('triton', 'mosaic'), not 'xla'")
        return backend, False, None
    if interpret is None:  # a Pallas kernel off its platform can only run interpreted
        interpret = jax.default_backend() != _PLATFORM[backend]
    if blocks is None:  # per device and M from the tiles table, chosen when M is known
        return backend, bool(interpret), None
    if not isinstance(blocks, _BLOCKS[backend]):
        raise TypeError(f"blocks for backend {backend!r} must be {_BLOCKS[backend].__name__}, "
                        f"got {type(blocks).__name__}")
    blocks.check()
    return backend, bool(interpret), blocks


def _check_operands(a, b, what: str, k_of_b):
    if a.dtype not in (jnp.int8, jnp.uint8):
        raise TypeError(f"{what}: activations must be int8 or uint8, got {a.dtype}; "
                        "quantize them first")
    if b.dtype != jnp.int8:
        raise TypeError(f"{what}: weights must be int8, got {b.dtype}")
    if a.ndim < 1 or b.ndim < 2:
        raise ValueError(f"{what}: need a (..., M, K) and b (..., K, N), got shapes "
                         f"{a.shape} and {b.shape}")
    if k_of_b is not None and k_of_b != a.shape[-1]:
        raise ValueError(f"{what}: contraction sizes differ: a has K={a.shape[-1]}, b gives "
                         f"K={k_of_b} (shape {b.shape})")


def _with_correction(rq: Requant | None, corr):
    """Fold the uint8 correction ``corr`` (N,) into ``rq``'s bias: (rq, what is left to add)."""
    if corr is None or rq is None:
        return rq, corr
    bias = corr if rq.bias is None else rq.bias.astype(jnp.int32) + corr
    return rq.replace(bias=bias), None


def _product(a, b, rq, backend, interpret, blocks, *, int4: bool):
    """2-D ``a`` (M, K) times 2-D ``b`` on the chosen backend."""
    if backend == "xla":
        return (reference.int4_matmul_xla if int4 else reference.matmul_xla)(a, b, rq)
    if blocks is None:
        blocks = tiles.default_blocks(backend, a.shape[0])
    fn = {("triton", False): triton.matmul_triton, ("triton", True): triton.int4_matmul_triton,
          ("mosaic", False): mosaic.matmul_mosaic, ("mosaic", True): mosaic.int4_matmul_mosaic}
    return fn[backend, int4](a, b, rq, blocks=blocks, interpret=interpret)


def _matmul(a, b, out_scale, backend, interpret, blocks, *, int4: bool):
    """Checks on concrete values here; the arithmetic runs as one jitted computation."""
    backend, interpret, blocks = _resolve(backend, interpret, blocks)
    if out_scale is not None:
        check_requant(out_scale, b.shape[-1])
    return _matmul_jit(a, b, out_scale, backend=backend, interpret=interpret, blocks=blocks,
                       int4=int4)


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "blocks", "int4"))
def _matmul_jit(a, b, out_scale, *, backend, interpret, blocks, int4: bool):
    n = b.shape[-1]
    squeeze = a.ndim == 1
    a = a[None, :] if squeeze else a
    corr = None
    if a.dtype == jnp.uint8:  # a @ b = (a - 128) @ b + 128 * colsum(b), exactly
        w = unpack_int4(b, a.shape[-1], axis=-2) if int4 else b
        corr = 128 * jnp.sum(w.astype(jnp.int32), axis=-2)  # b's batch dims + (N,)
        a = (a.astype(jnp.int32) - 128).astype(jnp.int8)

    def one(x, y, c):
        rq, rest = _with_correction(out_scale, c)
        out = _product(x, y, rq, backend, interpret, blocks, int4=int4)
        return out if rest is None else out + rest

    if b.ndim == 2:  # shared weights: every leading dimension of a is rows of M
        lead = a.shape[:-1]
        out = one(a.reshape(math.prod(lead), a.shape[-1]), b, corr).reshape(*lead, n)
    else:  # batched weights: one product per broadcast batch index
        batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a_b = jnp.broadcast_to(a, batch + a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b_b = jnp.broadcast_to(b, batch + b.shape[-2:]).reshape(-1, *b.shape[-2:])
        c_b = None if corr is None else jnp.broadcast_to(corr, batch + (n,)).reshape(-1, n)
        out = jax.vmap(one, in_axes=(0, 0, None if corr is None else 0))(a_b, b_b, c_b)
        out = out.reshape(*batch, a.shape[-2], n)
    return out[..., 0, :] if squeeze else out


def int_matmul(a, b, *, out_scale: Requant | None = None, backend: str = "auto",
               interpret: bool | None = None, blocks=None):
    """Integer matrix product ``a @ b`` with int32 accumulation, optionally requantized.

    Parameters
    ----------
    a : int8 or uint8 array (..., M, K)
        Activations; leading dimensions are batch (flattened into M when ``b`` is 2-D).
    b : int8 array (K, N) or (..., K, N)
        Weights; with leading dimensions, a batched product broadcast against ``a``'s.
    out_scale : Requant, optional
        Fused epilogue: per-output-channel dyadic scale ``m / 2^s`` plus int32 bias, clipped
        to int8 or uint8 (HAWQ-V3, Yao et al. 2021, Eq. 3; exact rule in
        :func:`hqjax.kernels.requantize`). Without it the int32 accumulator is returned.
    backend : {"auto", "xla", "triton", "mosaic"}
        ``"auto"`` = :func:`default_backend`: Pallas Triton on GPU, Pallas Mosaic on TPU,
        the XLA ``dot_general`` reference on CPU.
    interpret : bool, optional
        Run a Pallas kernel in interpret mode (a correctness tool, far slower than XLA).
        Default: only when the kernel's platform is not JAX's default backend.
    blocks : TritonBlocks or MosaicBlocks, optional
        Tile sizes of the Pallas backend; default: :data:`hqjax.kernels.tiles.TILES` for the
        device and M.

    Returns
    -------
    int32 array (..., M, N), or int8/uint8 with ``out_scale``. Identical on every backend.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_operands(a, b, "int_matmul", b.shape[-2] if b.ndim >= 2 else None)
    return _matmul(a, b, out_scale, backend, interpret, blocks, int4=False)


def int4_matmul(a, packed_b, *, out_scale: Requant | None = None, backend: str = "auto",
                interpret: bool | None = None, blocks=None):
    """``int_matmul(a, unpack_int4(packed_b, K))`` with the unpacking inside the kernel.

    ``packed_b`` is :func:`hqjax.kernels.pack_int4` of an int4 weight (K, N) along K, shape
    (ceil(K/2), N) (or batched (..., ceil(K/2), N)); ``K`` is taken from ``a``. Streams half
    the weight bytes of int8, which pays when the product is memory-bound (small M). Other
    arguments as :func:`int_matmul`.
    """
    a, packed_b = jnp.asarray(a), jnp.asarray(packed_b)
    _check_operands(a, packed_b, "int4_matmul", None)
    if packed_b.shape[-2] != (a.shape[-1] + 1) // 2:
        raise ValueError(f"int4_matmul: a has K={a.shape[-1]}, so packed weights need "
                         f"{(a.shape[-1] + 1) // 2} rows, got shape {packed_b.shape}; "
                         "pack along K with pack_int4(w, axis=0)")
    return _matmul(a, packed_b, out_scale, backend, interpret, blocks, int4=True)

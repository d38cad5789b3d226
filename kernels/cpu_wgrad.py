"""Weight gradients (and forward passes) of 2-D convolutions on XLA:CPU through native XLA FFI kernels.

Why this exists: the weight gradient ``dW[kh, kw, ci, co] = sum_{b, oh, ow} x_pad[b, oh*s + kh,
ow*s + kw, ci] * dy[b, oh, ow, co]`` is a convolution whose window is as large as the image.
XLA:CPU runs it 3.5-5x slower than PyTorch/oneDNN on ResNet-20's layers, and jaxlib's oneDNN
forward convolution (used by :mod:`.cpu_conv` for small windows) falls back to a reference
loop on it. As nine GEMMs per 3x3 kernel reducing over pixels it is easy to do well:
``cpu_wgrad.cc`` (shipped with the package) is such a kernel, for float32 NHWC activations
and HWIO weights, with any kernel size, strides and padding.

The C++ source is compiled on first use with the system C++ compiler (``$CXX`` or ``c++``)
into ``$HQJAX_CACHE_DIR`` (default ``~/.cache/hqjax``), keyed by a hash of the source, the
jaxlib version, the compiler and its flags, then loaded with ``ctypes`` and registered as an
XLA FFI target. Its AVX2+FMA code is selected at run time from the CPU's features (one build
is safe on any x86-64, so a shared cache directory cannot hand a machine instructions it
lacks). :func:`native_wgrad_status` reports whether all of that worked and the kernel agrees
with ``lax`` on small cases; if not, nothing uses it and XLA's convolutions run as before.

The same library holds a direct forward convolution (``FORWARD_TARGET``: NHWC input, HWIO
kernel, strides and padding, no dilation or groups; a 6-pixel x 16-channel register tile).
:mod:`.cpu_conv` runs small-window convolutions through it (``convolutions='native'``) when
:func:`native_forward_status` passes; its primitive lives there, beside oneDNN's. It also
holds the modified Gram-Schmidt step of Lanczos reorthogonalization (:func:`gram_schmidt`,
``GRAM_SCHMIDT_TARGET``), which :mod:`hqjax.curvature.lanczos` uses when
:func:`native_gram_schmidt_status` passes: each basis row read from memory once, where XLA's
two matrix-vector products stream it twice.

:data:`conv2d_weight_grad_p` is the primitive: the FFI call on the CPU when the library is
available, XLA's own convolution anywhere else. It is bilinear in ``(x, dy)``, so ``jvp``
and ``linearize`` give weight gradients again; transposes and ``vmap`` use the ``lax``
reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax
from jax._src import dispatch
from jax._src.interpreters import ad, batching, mlir
from jax.extend import core as jcore

__all__ = ["conv2d_weight_grad", "conv2d_weight_grad_p", "forward_ffi_call", "gram_schmidt",
           "native_forward_status", "native_gram_schmidt_status", "native_wgrad_status", "reference_gram_schmidt",
           "reference_weight_grad", "weight_grad_form"]

SOURCE = Path(__file__).with_name("cpu_wgrad.cc")
FFI_TARGET = "hqjax_conv2d_weight_grad_f32"
_SYMBOL = "HqjaxConv2dWeightGradF32"
FORWARD_TARGET = "hqjax_conv2d_forward_f32"
_FORWARD_SYMBOL = "HqjaxConv2dForwardF32"
GRAM_SCHMIDT_TARGET = "hqjax_gram_schmidt_f32"
MATMUL_TARGET = "hqjax_matmul_f32"
_TARGETS = ((FFI_TARGET, _SYMBOL), (FORWARD_TARGET, _FORWARD_SYMBOL), (GRAM_SCHMIDT_TARGET, "HqjaxGramSchmidtF32"),
            (MATMUL_TARGET, "HqjaxMatmulF32"))
# No -march=native: the AVX2 path is chosen at run time (see the module docstring).
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")


# --------------------------------------------------------------------------------------------
# Reference (XLA) and primitive


def _check_geometry(x_shape, dy_shape, kernel_size, window_strides, padding) -> None:
    for n, o, k, s, (lo, hi) in zip(x_shape[1:3], dy_shape[1:3], kernel_size, window_strides, padding):
        if s < 1 or (n + lo + hi - k) // s + 1 != o:
            raise ValueError(f"dy's spatial shape {dy_shape[1:3]} does not follow from x {x_shape}, kernel "
                             f"{kernel_size}, strides {window_strides} and padding {padding}")
    if x_shape[0] != dy_shape[0]:
        raise ValueError(f"x and dy have different batch sizes: {x_shape} vs {dy_shape}")


def reference_weight_grad(x, dy, *, kernel_size, window_strides, padding):
    """The weight gradient as XLA computes it: ``lax``'s own weight-gradient convolution.

    Parameters
    ----------
    x : ``[B, H, W, CI]`` input of the forward convolution.
    dy : ``[B, OH, OW, CO]`` cotangent of its output.
    kernel_size : ``(KH, KW)``.
    window_strides : forward strides ``(sh, sw)``.
    padding : forward padding ``((lo, hi), (lo, hi))``.

    Returns
    -------
    ``[KH, KW, CI, CO]``: the ``w`` cotangent of ``lax.conv_general_dilated(x, w, strides,
    padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.
    """
    # x's channels act as the batch and its batch as the features; dy is the (dilated) window.
    # High padding is what makes the output exactly the kernel's size (negative when a
    # stride leaves the last input rows unused).
    pad = [(lo, k + (o - 1) * s - n - lo)
           for n, o, k, s, (lo, _) in zip(x.shape[1:3], dy.shape[1:3], kernel_size, window_strides, padding)]
    dn = lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(2, 3, 0, 1))
    return lax.conv_general_dilated(x, dy, (1, 1), pad, rhs_dilation=tuple(window_strides), dimension_numbers=dn,
                                    precision=lax.Precision.HIGHEST)


conv2d_weight_grad_p = jcore.Primitive("conv2d_weight_grad")
conv2d_weight_grad_p.def_impl(functools.partial(dispatch.apply_primitive, conv2d_weight_grad_p))


def _abstract_eval(x, dy, *, kernel_size, window_strides, padding):
    _check_geometry(x.shape, dy.shape, kernel_size, window_strides, padding)
    return jax.core.ShapedArray((*kernel_size, x.shape[3], dy.shape[3]), jnp.result_type(x.dtype, dy.dtype))


conv2d_weight_grad_p.def_abstract_eval(_abstract_eval)


def _struct(v):
    return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


# Transposes (second-order reverse mode only) are rare; lax's reference transposes are exact.
def _transpose_x(ct, x, dy, **params):
    return jax.linear_transpose(lambda x_: reference_weight_grad(x_, dy, **params), _struct(x))(ct)[0]


def _transpose_dy(ct, x, dy, **params):
    return jax.linear_transpose(lambda dy_: reference_weight_grad(x, dy_, **params), _struct(dy))(ct)[0]


ad.defbilinear(conv2d_weight_grad_p, _transpose_x, _transpose_dy)


def _batch_rule(args, dims, **params):
    # dW sums over the batch, so a vmapped axis cannot be folded into it: per-map results via
    # the reference (vmap of lax's convolution), correctness before speed.
    return jax.vmap(functools.partial(reference_weight_grad, **params), in_axes=dims)(*args), 0


batching.primitive_batchers[conv2d_weight_grad_p] = _batch_rule

_reference_lowering = mlir.lower_fun(reference_weight_grad, multiple_results=False)
mlir.register_lowering(conv2d_weight_grad_p, _reference_lowering)


def _cpu_lowering(ctx, x, dy, *, kernel_size, window_strides, padding):
    if not _register()[0]:  # no library: still correct, through XLA
        return _reference_lowering(ctx, x, dy, kernel_size=kernel_size, window_strides=window_strides,
                                   padding=padding)
    return jax.ffi.ffi_lowering(FFI_TARGET)(ctx, x, dy, stride_h=np.int64(window_strides[0]),
                                           stride_w=np.int64(window_strides[1]), pad_h=np.int64(padding[0][0]),
                                           pad_w=np.int64(padding[1][0]))


mlir.register_lowering(conv2d_weight_grad_p, _cpu_lowering, platform="cpu")


def conv2d_weight_grad(x, dy, *, kernel_size, window_strides, padding):
    """:func:`reference_weight_grad`'s value, through :data:`conv2d_weight_grad_p` (native on CPU)."""
    return conv2d_weight_grad_p.bind(x, dy, kernel_size=tuple(int(k) for k in kernel_size),
                                     window_strides=tuple(int(s) for s in window_strides),
                                     padding=tuple((int(lo), int(hi)) for lo, hi in padding))


# --------------------------------------------------------------------------------------------
# Recognizing weight gradients among convolutions


def weight_grad_form(lhs_aval, rhs_aval, out_aval, params: dict):
    """A function computing this ``conv_general_dilated`` with the native kernel, or None.

    Any 2-D float32 convolution with unit window strides, no input dilation and no groups is
    a weight gradient: its lhs batch dimension plays the input channels, its lhs features the
    batch, its rhs (dilated by the forward strides) is ``dy`` and its output is ``dW``. Only
    those whose window is larger than their output are taken (that is how weight gradients
    look; small windows are cheaper as ordinary convolutions), with non-negative low padding.

    Returns
    -------
    ``None`` or ``f(lhs, rhs) -> out`` (the same array as the convolution, up to rounding).
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    if len(lhs_spec) != 4:
        return None
    f32 = all(a.dtype == jnp.float32 for a in (lhs_aval, rhs_aval, out_aval))
    if not (f32 and params.get("preferred_element_type") in (None, jnp.float32)
            and tuple(params["window_strides"]) == (1, 1) and tuple(params["lhs_dilation"]) == (1, 1)
            and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
            and all(lo >= 0 for lo, _ in params["padding"])):
        return None
    window = [rhs_aval.shape[d] for d in rhs_spec[2:]]
    kernel = [out_aval.shape[d] for d in out_spec[2:]]
    if np.prod(window) <= np.prod(kernel):
        return None
    strides = tuple(int(s) for s in params["rhs_dilation"])
    x_perm = (lhs_spec[1], *lhs_spec[2:], lhs_spec[0])   # [B, H, W, CI]
    dy_perm = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])  # [B, OH, OW, CO]
    # the convolution's high padding makes its output the kernel's size, so as forward
    # padding it yields exactly dy's size (see reference_weight_grad)
    padding = tuple((int(lo), int(hi)) for lo, hi in params["padding"])
    back = [0] * 4  # dW is [KH, KW, CI, CO]; out_spec names (batch=CI, feature=CO, spatial...)
    back[out_spec[0]], back[out_spec[1]], back[out_spec[2]], back[out_spec[3]] = 2, 3, 0, 1
    perm = lambda a, p: a if tuple(p) == tuple(range(a.ndim)) else jnp.transpose(a, p)

    def f(lhs, rhs):
        dw = conv2d_weight_grad(perm(lhs, x_perm), perm(rhs, dy_perm), kernel_size=kernel,
                                window_strides=strides, padding=padding)
        return perm(dw, back)

    return f


# --------------------------------------------------------------------------------------------
# Building and loading the library


def cache_dir() -> Path:
    """``$HQJAX_CACHE_DIR``, else ``~/.cache/hqjax``."""
    return Path(os.environ.get("HQJAX_CACHE_DIR") or Path.home() / ".cache" / "hqjax")


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shlex.split(cxx)
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            return [path]
    raise FileNotFoundError("no C++ compiler: set CXX or install c++/g++/clang++")


def _build() -> Path:
    """The compiled library's path, compiling it first unless the cache has it."""
    cxx = _compiler()
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    flags = [*CXXFLAGS, f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, " ".join(cxx), version, *flags,
                                    platform.machine()]).encode()).hexdigest()[:20]
    out = cache_dir() / f"cpu_wgrad-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile beside the target, then rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cxx)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def _register() -> tuple[bool, str | ctypes.CDLL]:
    """Build, load and register the FFI targets once per process: ``(True, lib)`` or ``(False, reason)``."""
    try:
        lib = ctypes.CDLL(str(_build()))
        for target, symbol in _TARGETS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # no compiler, a failed build, an incompatible jaxlib, ...
        return False, f"{type(e).__name__}: {e}"
    return True, lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (``hqjax_wgrad_isa()``/``hqjax_wgrad_set_isa(int)``, both kernels), or None."""
    ok, lib = _register()
    return lib if ok else None


_PROBES = (  # (x shape, kernel size, strides, padding, co)
    ((2, 7, 6, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), 4),
    ((1, 9, 8, 5), (3, 3), (2, 2), ((1, 1), (1, 1)), 17),     # stride 2, batch 1, a masked co tail
    ((3, 6, 7, 8), (1, 1), (2, 2), ((0, 0), (0, 0)), 9),      # 1x1 projection
    ((2, 10, 9, 7), (3, 2), (2, 1), ((2, 0), (0, 1)), 20),    # asymmetric everything
)


def _self_check(what: str, cases) -> tuple[bool, str]:
    """``(available, reason)`` for one native kernel: it builds, loads and matches XLA.

    ``cases(draw)`` yields ``(got, want, label)`` triples; ``draw(shape)`` gives a float32
    standard-normal array on the CPU.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:
        return False, f"no CPU backend: {e}"
    ok, lib = _register()
    if not ok:
        return False, f"cannot build the native {what}: {lib}"
    rng = np.random.default_rng(0)
    draw = lambda shape: jax.device_put(rng.standard_normal(shape).astype(np.float32), cpu)
    try:
        # The first call may come while the caller's function is being traced (an estimator
        # inside jit): run the cases eagerly, not into that trace.
        with jax.ensure_compile_time_eval():
            for got, want, label in cases(draw):
                got, want = np.asarray(got), np.asarray(want)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()):
                    return False, f"the native {what} disagrees with XLA's on {label}"
    except Exception as e:
        return False, f"the native {what} failed to run: {type(e).__name__}: {e}"
    return True, "ok"


def _wgrad_cases(draw):
    for x_shape, kernel, strides, padding, co in _PROBES:
        dy_shape = (x_shape[0], *[(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                                  in zip(x_shape[1:3], kernel, strides, padding)], co)
        x, dy = draw(x_shape), draw(dy_shape)
        p = dict(kernel_size=kernel, window_strides=strides, padding=padding)
        yield (jax.jit(functools.partial(conv2d_weight_grad, **p))(x, dy),
               jax.jit(functools.partial(reference_weight_grad, **p))(x, dy), f"{x_shape}, {p}")


@functools.lru_cache(maxsize=1)
def native_wgrad_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native weight gradient builds, loads and agrees with XLA.

    Done once per process: compile (or find in the cache) and register the kernel, then
    compare it with :func:`reference_weight_grad` on cases with strides, asymmetric padding,
    1x1 kernels, batch 1 and channel counts that are not multiples of 8.
    """
    return _self_check("weight-gradient kernel", _wgrad_cases)


# --------------------------------------------------------------------------------------------
# The forward kernel


def forward_lowering(ctx, x, w, *, window_strides, padding):
    """MLIR lowering of the native forward convolution ``[B,H,W,CI] x [KH,KW,CI,CO] -> [B,OH,OW,CO]``
    (output shape from ``ctx.avals_out``; high padding is implied by it). Needs :func:`_register`."""
    return jax.ffi.ffi_lowering(FORWARD_TARGET)(ctx, x, w, stride_h=np.int64(window_strides[0]),
                                               stride_w=np.int64(window_strides[1]), pad_h=np.int64(padding[0][0]),
                                               pad_w=np.int64(padding[1][0]))


def forward_ffi_call(x, w, *, window_strides, padding):
    """The native forward convolution called directly (NHWC x HWIO -> NHWC; no autodiff, CPU only)."""
    out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(x.shape[1:3], w.shape[:2], window_strides, padding)]
    return jax.ffi.ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct((x.shape[0], *out, w.shape[3]), jnp.float32))(
        x, w, stride_h=np.int64(window_strides[0]), stride_w=np.int64(window_strides[1]),
        pad_h=np.int64(padding[0][0]), pad_w=np.int64(padding[1][0]))


_FORWARD_PROBES = (  # (x shape, w shape, strides, padding)
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((1, 9, 8, 5), (3, 3, 5, 17), (2, 2), ((1, 1), (1, 1))),     # stride 2, batch 1, a masked co tail
    ((3, 6, 7, 8), (1, 1, 8, 9), (2, 2), ((0, 0), (0, 0))),      # 1x1 projection
    ((2, 10, 9, 7), (3, 2, 7, 20), (2, 1), ((2, 0), (0, 1))),    # asymmetric everything
    ((2, 5, 16, 16), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1))),  # full 6-pixel tiles, two co blocks
)


def _forward_cases(draw):
    for x_shape, w_shape, strides, padding in _FORWARD_PROBES:
        x, w = draw(x_shape), draw(w_shape)
        ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                    precision=lax.Precision.HIGHEST)
        yield (jax.jit(functools.partial(forward_ffi_call, window_strides=strides, padding=padding))(x, w),
               jax.jit(ref)(x, w), f"{x_shape} x {w_shape}, {strides}, {padding}")


@functools.lru_cache(maxsize=1)
def native_forward_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native forward convolution builds, loads and agrees with XLA.

    Once per process, like :func:`native_wgrad_status` (same library), on cases with strides,
    asymmetric padding, 1x1 kernels, batch 1 and channel counts that are not multiples of 8.
    """
    return _self_check("forward convolution", _forward_cases)


# --------------------------------------------------------------------------------------------
# Gram-Schmidt against a block of basis rows (Lanczos reorthogonalization)


def reference_gram_schmidt(w, basis, count):
    """Modified Gram-Schmidt in XLA: ``w -= (v_i . w) v_i`` for rows ``i < count`` of ``basis``."""
    count = jnp.clip(count, 0, basis.shape[0])

    def body(i, w):
        v = lax.dynamic_index_in_dim(basis, i, 0, keepdims=False)
        return w - jnp.vdot(v, w) * v

    return lax.fori_loop(0, count, body, w)


def gram_schmidt(w, basis, count):
    """:func:`reference_gram_schmidt` by the native kernel (float32, CPU only, no autodiff).

    ``w [n]`` minus its projections on rows ``0..count-1`` of ``basis [rows, n]``, one row at
    a time, each basis row read from memory once; ``w``'s buffer is updated in place.
    """
    ok, lib = _register()
    if not ok:
        raise RuntimeError(f"the native Gram-Schmidt kernel is unavailable: {lib}")
    return jax.ffi.ffi_call(GRAM_SCHMIDT_TARGET, jax.ShapeDtypeStruct(w.shape, w.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")(w, basis, jnp.asarray(count, jnp.int32))


def _gram_schmidt_cases(draw):
    for rows, n, count in ((5, 9, 3), (4, 300_001, 4), (3, 4096 * 5 + 7, 0), (2, 1, 5)):
        w, basis = draw((n,)), draw((rows, n))
        basis = basis / jnp.linalg.norm(basis, axis=1, keepdims=True)
        yield (jax.jit(gram_schmidt)(w, basis, count), jax.jit(reference_gram_schmidt)(w, basis, count),
               f"{rows} rows of {n}, count {count}")


@functools.lru_cache(maxsize=1)
def native_gram_schmidt_status() -> tuple[bool, str]:
    """``(available, reason)``: whether the native Gram-Schmidt builds, loads and agrees with XLA.

    Once per process, like :func:`native_wgrad_status` (same library), on blocks that are one
    row, shorter than a chunk, many chunks with a remainder, and counts of 0 and past the end.
    """
    return _self_check("Gram-Schmidt kernel", _gram_schmidt_cases)

"""Building, loading and self-checking the native kernel library (``native_kernels.cc``).

The C++ source ships with the package and is compiled on first use with the system C++
compiler (``$CXX`` or ``c++``) into :func:`cache_dir` (``$HQJAX_CACHE_DIR``, default
``~/.cache/hqjax``), keyed by a hash of the source, the jaxlib version, the compiler and its
flags, then loaded with ``ctypes`` and its four handlers registered as XLA FFI targets. Its
AVX2+FMA code is selected at run time from the CPU's features, so one build is safe on any
x86-64 and a shared cache directory cannot hand a machine instructions it lacks.

A failed build is remembered on disk (a ``.failed`` file beside where the library would
be, holding the compiler's message), so a broken compiler costs one failed compile, not one
per process; deleting the file, or any change of compiler, source or jaxlib, retries.
Every failure (build, load, self-check) is logged once per process as a warning on the
``"hqjax"`` logger; the kernel concerned is then not used and XLA's operations run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib
import numpy as np

__all__ = ["CACHE_ENV", "cache_dir", "library", "register", "self_check", "warn_once"]

CACHE_ENV = "HQJAX_CACHE_DIR"
SOURCE = Path(__file__).with_name("native_kernels.cc")
WEIGHT_GRAD_TARGET = "hqjax_conv2d_weight_grad_f32"
FORWARD_TARGET = "hqjax_conv2d_forward_f32"
GRAM_SCHMIDT_TARGET = "hqjax_gram_schmidt_f32"
MATMUL_TARGET = "hqjax_matmul_f32"
_TARGETS = ((WEIGHT_GRAD_TARGET, "HqjaxConv2dWeightGradF32"), (FORWARD_TARGET, "HqjaxConv2dForwardF32"),
            (GRAM_SCHMIDT_TARGET, "HqjaxGramSchmidtF32"), (MATMUL_TARGET, "HqjaxMatmulF32"))
# No -march=native: the AVX2 path is chosen at run time (see the module docstring).
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")

_log = logging.getLogger("hqjax")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Log ``message`` as a warning on the ``"hqjax"`` logger, once per process."""
    _log.warning(message)


def cache_dir() -> Path:
    """``$HQJAX_CACHE_DIR``, else ``~/.cache/hqjax``: where the compiled library is kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hqjax")


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shlex.split(cxx)
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            return [path]
    raise FileNotFoundError("no C++ compiler: set CXX or install c++/g++/clang++")


def _build() -> Path:
    """The compiled library's path, compiling it first unless the cache has it (or a failure)."""
    cxx = _compiler()
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    flags = [*CXXFLAGS, f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, " ".join(cxx), version, *flags,
                                    platform.machine()]).encode()).hexdigest()[:20]
    out = cache_dir() / f"native_kernels-{key}.so"
    failed = out.with_suffix(".failed")
    if out.exists():
        return out
    if failed.exists():
        raise RuntimeError(f"an earlier build with this compiler failed (delete {failed} to retry): "
                           f"{failed.read_text()[-500:]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile beside the target, then rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            message = f"{' '.join(cxx)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            failed.write_text(message)
            raise RuntimeError(message)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def register() -> tuple[bool, str | ctypes.CDLL]:
    """Build, load and register the FFI targets once per process: ``(True, lib)`` or ``(False, reason)``."""
    try:
        lib = ctypes.CDLL(str(_build()))
        for target, symbol in _TARGETS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # no compiler, a failed build, an incompatible jaxlib, ...
        reason = f"{type(e).__name__}: {e}"
        warn_once(f"hqjax.kernels.cpu: the native kernels are unavailable, XLA's operations run instead ({reason})")
        return False, reason
    return True, lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (``hqjax_wgrad_isa()``/``hqjax_wgrad_set_isa(int)``), or None."""
    ok, lib = register()
    return lib if ok else None


def self_check(what: str, cases) -> tuple[bool, str]:
    """``(available, reason)`` for one native kernel: it builds, loads and matches XLA.

    ``cases(draw)`` yields ``(got, want, label)`` triples; ``draw(shape)`` gives a float32
    standard-normal array on the CPU. A failure is logged once (:func:`warn_once`).
    """
    ok, reason = _self_check(what, cases)
    if not ok and not reason.startswith("cannot build"):  # register() has logged that already
        warn_once(f"hqjax.kernels.cpu: {reason}; XLA's operations run instead")
    return ok, reason


def _self_check(what: str, cases) -> tuple[bool, str]:
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:
        return False, f"no CPU backend: {e}"
    ok, lib = register()
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

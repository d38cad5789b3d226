"""Single-threaded speed of the native GEMM (``kernels/cpu/native_kernels.cc``) on the shapes that matter.

Compiles each given version of the source (default: the repository's) with a direct entry
point to its ``gemm_run`` appended, checks every product against numpy, and times the
versions in turn on each shape (medians; GFLOP/s). One thread, no XLA: the kernel's own
rate, for tuning it. Compare with an older version by passing both, e.g.

    git show 3de80eb^:kernels/cpu_wgrad.cc > /tmp/before.cc
    python benchmarks/investigation/gemm_kernel.py /tmp/before.cc kernels/cpu/native_kernels.cc

Set OPENBLAS_NUM_THREADS=1: numpy's reference product must not leave threads spinning.
"""
import argparse
import ctypes
import hashlib
import os
import subprocess
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY = r'''
extern "C" __attribute__((visibility("default"))) void hqjax_gemm_direct(const float* a, const float* b, float* c,
                                                                          const int64_t* d) {
  const Gemm g{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9]};
  gemm_run(nullptr, g, a, b, c);
}
'''
# (M, N, K, layout): the MLP's forward and backward products, and a square one
SHAPES = [(256, 1024, 1024, "NN"), (256, 1024, 784, "NN"), (256, 1024, 1024, "NT"), (1024, 1024, 256, "TN"),
          (784, 1024, 256, "TN"), (960, 960, 960, "NN")]


def build(src: str, out_dir: str) -> ctypes.CDLL:
    code = open(src).read() + ENTRY
    key = hashlib.sha256(code.encode()).hexdigest()[:12]
    cc, so = os.path.join(out_dir, f"gemm_{key}.cc"), os.path.join(out_dir, f"gemm_{key}.so")
    with open(cc, "w") as fh:
        fh.write(code)
    subprocess.run(["c++", "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w",
                    f"-I{jax.ffi.include_dir()}", cc, "-o", so], check=True)
    return ctypes.CDLL(so)


def operands(m, n, k, layout, rng):
    """A, B, the strides ``[batch, M, N, K, a_batch, a_m, a_k, b_batch, b_k, b_n]`` and A @ B."""
    if layout == "NN":
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        return a, b, [1, m, n, k, 0, k, 1, 0, n, 1], a @ b
    if layout == "NT":
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
        return a, b, [1, m, n, k, 0, k, 1, 0, 1, k], a @ b.T
    a, b = rng.standard_normal((k, m), np.float32), rng.standard_normal((k, n), np.float32)
    return a, b, [1, m, n, k, 0, 1, m, 0, n, 1], a.T @ b


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", default=[os.path.join(HERE, "..", "..", "kernels", "cpu", "native_kernels.cc")])
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(s, tmp) for s in args.sources]
        ptr = lambda x: ctypes.c_void_p(x.ctypes.data)
        rng = np.random.default_rng(0)
        print("| M x N x K | " + " | ".join(os.path.basename(s) for s in args.sources) + " |  (GFLOP/s, one thread)")
        print("|---|" + "---:|" * len(libs))
        logs = np.zeros(len(libs))
        for m, n, k, layout in SHAPES:
            a, b, d, want = operands(m, n, k, layout, rng)
            d = np.asarray(d, np.int64)
            c = np.zeros((m, n), np.float32)
            for lib in libs:
                c[:] = 0
                lib.hqjax_gemm_direct(ptr(a), ptr(b), ptr(c), ptr(d))
                err = np.abs(c - want).max() / np.abs(want).max()
                assert err < 1e-5, f"{layout} {m}x{n}x{k}: relative error {err:.1e}"
            ts = [[] for _ in libs]
            for _ in range(args.repeats):
                for i, lib in enumerate(libs):
                    t = time.perf_counter()
                    lib.hqjax_gemm_direct(ptr(a), ptr(b), ptr(c), ptr(d))
                    ts[i].append(time.perf_counter() - t)
            rates = [2 * m * n * k / np.median(t) / 1e9 for t in ts]
            logs += np.log(rates)
            print(f"| {layout} {m} x {n} x {k} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")
        print("geometric mean GFLOP/s: " + ", ".join(f"{np.exp(x / len(SHAPES)):.1f}" for x in logs))


if __name__ == "__main__":
    main()

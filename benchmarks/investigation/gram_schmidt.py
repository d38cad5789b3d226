"""Lanczos reorthogonalization of one vector: XLA's blocked classical Gram-Schmidt against
hqjax's native modified Gram-Schmidt kernel (``hqjax.kernels.cpu_wgrad.gram_schmidt``).

A basis of ``--steps`` vectors of ``--n`` entries in ``hqjax.curvature.lanczos``'s row
blocks; one pass against its first ``j + 1`` rows, both ways, alternating calls (medians).

    python benchmarks/investigation/gram_schmidt.py --j 50
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import interleaved_medians  # noqa: E402

from hqjax.curvature import lanczos  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_863_690, help="vector length (default: the benchmark MLP's)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--j", type=int, nargs="+", default=[10, 50, 99])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    rows, nblocks = lanczos.basis_blocks(args.steps)
    key = jax.random.key(0)
    V = tuple(jax.random.normal(jax.random.fold_in(key, b), (rows + 1, args.n)) / np.sqrt(args.n)
              for b in range(nblocks))
    w = jax.random.normal(key, (args.n,))
    if not lanczos._native_gram_schmidt(w):
        sys.exit("the native Gram-Schmidt kernel is unavailable here")

    def with_native(native):
        def orth(w, V, j):
            lanczos.NATIVE_GRAM_SCHMIDT = native
            try:
                return lanczos._orthogonalize(w, V, j, 1)
            finally:
                lanczos.NATIVE_GRAM_SCHMIDT = True
        return jax.jit(orth)

    xla, native = with_native(False), with_native(True)
    print(f"one Gram-Schmidt pass, n = {args.n:,}, basis of {args.steps} in {nblocks} blocks of {rows}; "
          f"ms, median of {args.repeats}")
    print(f"{'j':>4} {'rows read':>9} {'XLA CGS':>9} {'native MGS':>11} {'ratio':>6}")
    for j in args.j:
        j = jnp.int32(j)
        gap = float(jnp.max(jnp.abs(xla(w, V, j) - native(w, V, j))))
        t = interleaved_medians([lambda: xla(w, V, j), lambda: native(w, V, j)], args.repeats)
        print(f"{int(j):4d} {int(j) + 1:9d} {t[0]:9.1f} {t[1]:11.1f} {t[0] / t[1]:5.2f}x  (max |diff| {gap:.1g})")


if __name__ == "__main__":
    main()

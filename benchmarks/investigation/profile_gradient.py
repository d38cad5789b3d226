"""Where a jitted ``value_and_grad`` of a benchmark model spends its time on XLA:CPU.

Runs the benchmark's loss for ``--model`` through ``hqjax.kernels.apply_convolutions``
(as benchmarks/curvature_vs_pyhessian.py does), then prints per-op device time from a
``jax.profiler`` trace, grouped by op kind (``--by-op`` for single ops).

    python benchmarks/investigation/profile_gradient.py --model resnet20
    python benchmarks/investigation/profile_gradient.py --model encoder --by-op
    python benchmarks/investigation/profile_gradient.py --model encoder --xla-products   # before the native GEMM
"""
import argparse
import os
import sys

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from _profile import op_times, print_op_times  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402

import hqjax  # noqa: E402
from hqjax.kernels import cpu_conv  # noqa: E402
from hqjax.kernels.cpu_conv import CONVOLUTIONS, apply_convolutions  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "mlp", "encoder"])
    ap.add_argument("--convolutions", default="auto", choices=CONVOLUTIONS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--by-op", action="store_true", help="one row per op instead of per op kind")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--xla-products", action="store_true",
                    help="keep every matrix product with XLA (hqjax.kernels.cpu_conv.NATIVE_MATMUL off)")
    ap.add_argument("--fresh-host-memory", action="store_true", help="skip hqjax.reuse_host_memory()")
    args = ap.parse_args()
    if not args.fresh_host_memory:
        hqjax.reuse_host_memory()
    cpu_conv.NATIVE_MATMUL = not args.xla_products
    _, loss, params, _, _, _ = make_problem(args.model)
    grad = jax.jit(apply_convolutions(jax.value_and_grad(loss), args.convolutions))
    times = op_times(grad, params, repeats=args.repeats, by_kind=not args.by_op)
    print(f"{args.model} value_and_grad, convolutions={args.convolutions}, ms per call (mean of {args.repeats} runs)")
    print_op_times(times, args.top)


if __name__ == "__main__":
    main()

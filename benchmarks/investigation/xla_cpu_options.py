"""A benchmark model's jitted gradient under XLA:CPU compiler options, side by side.

Each option set compiles its own executable (``jax.jit(..., compiler_options=...)``); the
calls take turns, so machine drift hits all alike. The gradient must match the default's.

    python benchmarks/investigation/xla_cpu_options.py --model encoder
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from _timing import interleaved_medians  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402

from hqjax.kernels.cpu_conv import apply_convolutions  # noqa: E402

OPTIONS = {
    "default": None,
    "oneDNN": {"xla_cpu_use_onednn": True},
    "YNN fusions off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "XNNPACK": {"xla_cpu_use_xnnpack": True},
    "fast math": {"xla_cpu_enable_fast_math": True},
    "legacy fusion emitters": {"xla_cpu_use_fusion_emitters": False},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="encoder", choices=["resnet20", "mlp", "encoder"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    _, loss, params, _, _, _ = make_problem(args.model)
    grad = apply_convolutions(jax.value_and_grad(loss), "auto")
    want = jax.jit(grad)(params)[1]
    names, calls = [], []
    for name, opts in OPTIONS.items():
        try:
            f = jax.jit(grad, compiler_options=opts)
            got = f(params)[1]
        except Exception as e:  # noqa: BLE001 - an option this jaxlib does not know
            print(f"{name}: not accepted ({type(e).__name__}: {str(e)[:120]})")
            continue
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        names.append(f"{name} (max |diff| {err:.1g})")
        calls.append((lambda f: lambda: f(params))(f))
    times = interleaved_medians(calls, args.repeats)
    print(f"{args.model} value_and_grad, median of {args.repeats} interleaved calls")
    for name, t in zip(names, times):
        print(f"{name:44s} {t:8.1f} ms")
    print(f"fastest: {names[min(range(len(times)), key=times.__getitem__)]}")


if __name__ == "__main__":
    main()

"""Flattening a pytree on XLA:CPU: ``concatenate`` against ``dynamic_update_slice``.

Why ``hqjax.tree_ravel`` writes leaf by leaf (benchmarks/RESULTS.md). Two parts, each a
table of medians of interleaved calls:
1. the flattening alone, for the benchmark MLP's parameter shapes (1.86 M scalars),
   with XLA:CPU's fusion emitters on (the default) and off (the legacy emitter);
2. one linearized HVP of the benchmark MLP as a map of flat vectors, flattened with
   ``ravel_pytree`` (a concatenation) and with ``tree_ravel``, against the pytree HVP.

    python benchmarks/investigation/ravel_concatenate.py
"""
import os
import sys

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from _timing import interleaved_medians  # noqa: E402
from curvature_vs_pyhessian import make_problem  # noqa: E402

import hqjax  # noqa: E402

LEGACY = {"xla_cpu_use_fusion_emitters": False}


def main():
    _, loss, params, _, _, _ = make_problem("mlp")
    other = jax.tree.map(lambda x: x + 1.0, params)
    concat = lambda a, b: ravel_pytree(jax.tree.map(jnp.add, a, b))[0]
    dus = lambda a, b: hqjax.tree_ravel(jax.tree.map(jnp.add, a, b))
    rows = [(name, emitters, jax.jit(f, compiler_options=None if emitters == "on" else LEGACY))
            for name, f in [("concatenate (ravel_pytree)", concat), ("dynamic_update_slice (tree_ravel)", dus)]
            for emitters in ("on", "off")]
    times = interleaved_medians([(lambda j: lambda: j(params, other))(j) for _, _, j in rows])
    print(f"{'flatten a + b (MLP shapes)':36s} {'emitters':>8s} {'ms':>8s}")
    for (name, emitters, _), t in zip(rows, times):
        print(f"{name:36s} {emitters:>8s} {t:8.2f}")

    mv = hqjax.hessian(loss, params, linearize=True, check_finite=False)
    flat, unravel = ravel_pytree(params)
    tree_mv = jax.jit(mv)
    concat_mv = jax.jit(lambda x: ravel_pytree(mv(unravel(x)))[0])
    dus_mv = jax.jit(hqjax.flat_operator(mv, params)[0])
    t_tree, t_concat, t_dus = interleaved_medians([lambda: tree_mv(params), lambda: concat_mv(flat), lambda: dus_mv(flat)])
    print(f"\n{'MLP linearized HVP':36s} {'ms':>8s}")
    for name, t in [("pytree in, pytree out", t_tree), ("flat, ravel_pytree", t_concat), ("flat, flat_operator", t_dus)]:
        print(f"{name:36s} {t:8.2f}")
    print(f"flattening overhead per HVP: concatenate {t_concat - t_tree:.1f} ms, "
          f"dynamic_update_slice {t_dus - t_tree:.1f} ms")


if __name__ == "__main__":
    main()

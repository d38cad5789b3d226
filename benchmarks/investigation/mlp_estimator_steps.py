"""Cost of one estimator step against one HVP on the benchmark's MLP (1.86 M parameters).

The linearized HVP alone, then a Hutchinson probe, a power-iteration step (host and
device loop) and a Lanczos step, 20 of each. This is how the slow flattening of operator
outputs was found (benchmarks/RESULTS.md, "Flattening an operator's output").

    python benchmarks/investigation/mlp_estimator_steps.py
"""
import os
import sys, time, numpy as np, jax
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from curvature_vs_pyhessian import make_problem
import hqjax
_, loss, params, _, _, _ = make_problem("mlp")
mv = hqjax.hessian(loss, params, linearize=True, check_finite=False)
key = jax.random.key(0)
def t(f, r=3):
    jax.block_until_ready(jax.tree.leaves(f())); ts = []
    for _ in range(r):
        s = time.perf_counter(); jax.block_until_ready(jax.tree.leaves(f())); ts.append(time.perf_counter() - s)
    return 1e3 * np.median(ts)
N = 20
jmv = jax.jit(mv)
print("lin hvp (jit of closure)  ms", t(lambda: jmv(params)))
print("trace  ms/probe", t(lambda: hqjax.trace(mv, params, key, num_probes=N)) / N)
print("power  ms/iter ", t(lambda: hqjax.top_eigenvalues(mv, params, key, max_iters=N, tol=-1.0)) / N)
print("power device ms/iter ", t(lambda: hqjax.top_eigenvalues(mv, params, key, max_iters=N, tol=-1.0, loop="device")) / N)
print("lanczos  ms/iter ", t(lambda: hqjax.top_eigenvalues(mv, params, key, max_iters=N, tol=-1.0, method="lanczos", reorth_passes=1)) / N)

"""XLA:CPU's scratch memory faulted in on every call, with and without ``hqjax.kernels.cpu.reuse_host_memory``.

For each model of ``curvature_vs_pyhessian.py``, runs its jitted gradient (through the same
convolution rewrite) in two fresh processes, one that calls ``hqjax.kernels.cpu.reuse_host_memory()``
before JAX starts and one that does not, ``--rounds`` times alternately, and reports per call:
median wall time, minor page faults and kernel (system) CPU time. Separate processes because
the allocator setting is process-wide and cannot be undone.

    python benchmarks/host_memory.py
    python benchmarks/host_memory.py --models encoder --rounds 3 --repeats 30
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {here!r})
import hqjax.kernels.cpu
status = hqjax.kernels.cpu.reuse_host_memory() if {reuse} else None
import jax
from curvature_vs_pyhessian import make_problem
_, loss, params, _, _, _ = make_problem({model!r})
g = jax.jit(hqjax.kernels.cpu.accelerate(jax.value_and_grad(loss)))
temp = g.lower(params).compile().memory_analysis().temp_size_in_bytes
for _ in range(5):  # the heap takes a few calls to settle where its blocks go
    jax.block_until_ready(g(params))
ts, faults, sys_s = [], [], []
for _ in range({repeats}):
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(g(params))
    ts.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(r1.ru_minflt - r0.ru_minflt)
    sys_s.append(r1.ru_stime - r0.ru_stime)
print(json.dumps(dict(applied=None if status is None else status.applied, temp_mb=temp / 2**20,
                      ms=ts, faults=faults, sys_ms=[1e3 * s for s in sys_s])))
"""


def run_child(model, reuse, repeats):
    code = _CHILD.format(here=HERE, reuse=reuse, model=model, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mlp,encoder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print("| model | scratch (MB) | heap kept | gradient (ms) | page faults / call | kernel time / call (ms) |")
    print("|---|---:|---|---:|---:|---:|")
    ratios = {}
    for model in args.models.split(","):
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for reuse in (False, True):
                runs[reuse].append(run_child(model, reuse, args.repeats))
        med = {}
        for reuse, rs in runs.items():
            pool = lambda k: [x for r in rs for x in r[k]]
            med[reuse] = 1e3 * np.median(pool("ms"))
            print(f"| {model} | {rs[0]['temp_mb']:.0f} | {'yes' if reuse else 'no'} | {med[reuse]:.1f} | "
                  f"{np.median(pool('faults')):,.0f} | {np.median(pool('sys_ms')):.1f} |", flush=True)
        ratios[model] = med[False] / med[True]
    print("\ngradient speed-up from reuse_host_memory (fresh / reused): "
          + ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()))


if __name__ == "__main__":
    main()

"""Curvature speed on this machine: HVP forms and estimator loops (device vs host).

For each model: the HVP as ``jvp(grad)`` and as ``linearize(grad)`` (setup once, then
apply), and a Hutchinson trace whose probe loop runs on the device (``lax.while_loop``)
or on the host (a Python loop over one jitted step). Compile time is separated from run
time: the first call compiles, later calls reuse the compiled program (timings are the
median of ``--repeats`` calls). The last line gives the host-over-device speed-up.

    python benchmarks/curvature_loops.py --model cnn --batch 128 --probes 8
    python benchmarks/curvature_loops.py --model resnet20 --batch 32 --probes 2 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import hqjax
from hqjax.data import load_digits
from hqjax.models import get_model


def _timed(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def _problem(name, batch):
    if name == "resnet20":
        key = jax.random.key(0)
        x = jax.random.normal(key, (batch, 32, 32, 3))
        y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    else:
        d = load_digits()
        x, y = jnp.asarray(d.x_train[:batch]), jnp.asarray(d.y_train[:batch])
    model = get_model(name)
    variables = model.init(jax.random.key(2), x, train=False)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        logits = model.apply({"params": p, **rest}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn", choices=["cnn", "mlp", "resnet20"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    params, loss = _problem(a.model, a.batch)
    v = hqjax.tree.tree_random_like(jax.random.key(3), params)
    print(f"model {a.model}, {hqjax.tree.tree_size(params):,} parameters, batch {a.batch}, "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    rows = []

    hvp = jax.jit(lambda p, v: hqjax.hvp(loss, p, v))
    c, r = _timed(lambda: hvp(params, v), a.repeats)
    rows.append(("HVP jvp(grad), jitted", c, r, r))
    t0 = time.perf_counter()
    lin = hqjax.hessian(loss, params, linearize=True)
    jax.block_until_ready(jax.tree.leaves(lin(v)))
    setup = time.perf_counter() - t0
    lin_j = jax.jit(lin)
    c, r = _timed(lambda: lin_j(v), a.repeats)
    rows.append((f"HVP linearized apply (setup+first {setup:.2f} s)", c, r, r))

    # Per-call costs (tracing the operator, building the step) are paid once per call, so
    # the per-probe cost is the marginal one: (time for 3P probes - time for P) / 2P.
    per_loop = {}
    for loop, lin in (("device", False), ("host", False), ("host", True)):
        mv = hqjax.hessian(loss, params, linearize=lin)
        med = {}
        for n in (a.probes, 3 * a.probes):
            c, med[n] = _timed(lambda: hqjax.trace(mv, params, jax.random.key(4), num_probes=n, loop=loop).total,
                               a.repeats)
            rows.append((f"trace {n} probes, loop={loop}{', linearized' if lin else ''}", c, med[n], med[n] / n))
        marginal = (med[3 * a.probes] - med[a.probes]) / (2 * a.probes)
        rows.append((f"  -> marginal cost per probe, loop={loop}{', linearized' if lin else ''}", float("nan"), float("nan"), marginal))
        if not lin:
            per_loop[loop] = marginal

    print(f"{'operation':52s} {'first call s':>12s} {'median s':>10s} {'per HVP s':>10s}")
    for name, first, med, per in rows:
        print(f"{name:52s} {first:12.3f} {med:10.3f} {per:10.3f}")
    print(f"host loop vs device loop, marginal cost per probe ({a.model}): {per_loop['device'] / per_loop['host']:.2f}x "
          f"({per_loop['host'] * 1e3:.0f} ms vs {per_loop['device'] * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()

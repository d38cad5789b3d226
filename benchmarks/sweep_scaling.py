"""Sweep and sharding overhead over 1, 2, 4 and 8 devices (ResNet-20 and the BERT encoder).

For each model and device count ``n`` it measures

* **job sweep**: ``hqjax.distributed.run_sweep`` of the same jobs (one layer's top Hessian
  eigenvalue on ``--jobs`` data subsets, Q-BERT style, a fixed number of power iterations)
  dealt round-robin over ``n`` devices: jobs per second, cold (first pass, compiling) and
  warm (second pass, compiled estimators loaded from the persistent compilation cache);
* **data-parallel HVP**: ``data_parallel_hessian`` with the batch split ``n`` ways: median
  time per HVP, the per-device memory XLA assigns to the compiled step (arguments +
  temporaries, ``memory_analysis``) and the relative difference from ``n = 1``;
* **per-device memory of a sweep job**: the compiled single-device HVP (every device holds
  the whole model and one subset, whatever ``n`` is).

On a CPU host the ``n`` devices are forced host devices (``--xla_force_host_platform_device_count``)
that share the same cores, so the jobs/s ratios measure sharding and threading *overhead*,
not speed-up; real scaling needs one accelerator per device. Run::

    python benchmarks/sweep_scaling.py            # both models, 1/2/4/8 devices
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hqjax  # noqa: E402
from hqjax import distributed as hd  # noqa: E402
from hqjax.models import get_model  # noqa: E402


def _problem(name: str, batch: int, num_subsets: int, seed: int = 0):
    """Model, variables, per-subset data and the loss ``loss(params, state, (x, y))``.

    The data are random (no CIFAR/GLUE download here): curvature *cost* does not depend on
    the values, and the same data enter every device count.
    """
    rng = np.random.default_rng(seed)
    n = batch * num_subsets
    if name == "resnet20":
        model = get_model("resnet20")
        x = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
        layer = "stage2/block0/conv1"
    elif name == "bert":
        from hqjax.models import MODELS

        if "bert_tiny" not in MODELS:
            raise SystemExit("this build has no hqjax.models BERT encoder ('bert_tiny'); run with --models resnet20")
        model = MODELS["bert_tiny"]()
        x = rng.integers(1, 64, size=(n, 32)).astype(np.int32)
        y = rng.integers(0, 2, n).astype(np.int32)
        layer = "encoder/layer0/attention/query"
    else:
        raise SystemExit(f"unknown model {name!r}: use resnet20 or bert")
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(seed), jnp.asarray(x[:1]), train=False))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(p, batch_):
        logits = model.apply({"params": p, **state}, batch_[0], train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch_[1][:, None], axis=1))

    subsets = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(num_subsets)]
    return params, loss, subsets, layer


def _sweep_rate(params, loss, subsets, layer, devices, iters, out_root):
    blk = hqjax.blocks(params)
    jobs = hd.make_jobs([layer], ["top_eigenvalue"], num_subsets=len(subsets))

    def compute(job, device):
        batch, p = jax.device_put((subsets[job.subset], params), device)
        mv = blk.restrict_operator(hqjax.hessian(lambda q: loss(q, batch), p), job.layer)
        # tol=0: exactly `iters` power iterations, so every job does the same work.
        res = hqjax.top_eigenvalues(mv, p, hd.job_key(jax.random.key(0), job), max_iters=iters, tol=0.0)
        return {"eigenvalue": float(res.eigenvalues[0])}

    times, results = [], None
    for rep in range(2):  # cold (compiles), warm (compiled estimators from the cache)
        out = os.path.join(out_root, f"n{len(devices)}_{rep}")
        t = time.perf_counter()
        hd.run_sweep(jobs, compute, out, devices=devices)
        times.append(time.perf_counter() - t)
        results = [r["result"]["eigenvalue"] for r in hd.load_results(out, jobs)]
    return len(jobs) / times[0], len(jobs) / times[1], results


def _dp_hvp(params, loss, batch, devices, reps):
    mesh = hd.make_mesh("data", devices=devices)
    mv = hd.data_parallel_hessian(loss, params, batch, mesh)
    v = hqjax.tree.tree_random_like(jax.random.key(1), params)
    t = time.perf_counter()
    out = jax.block_until_ready(mv(v))
    compile_s = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(mv(v))
        ts.append(time.perf_counter() - t)
    # Per-device memory of the compiled SPMD step (XLA's buffer assignment for one device).
    shard = hd.shard_batch(batch, mesh)
    rep = hd.replicate(params, mesh)
    from jax.sharding import PartitionSpec as P

    def local(p, vv, b):
        n_local = jnp.asarray(b[0].shape[0], jnp.float32)
        share = lambda q: n_local * loss(q, b) / jax.lax.psum(n_local, "data")
        return jax.jvp(jax.grad(share), (p,), (vv,))[1]

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P()))
    mem = step.lower(rep, v, shard).compile().memory_analysis()
    per_device = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    return statistics.median(ts), compile_s, per_device, out


def _job_memory(params, loss, batch):
    hvp = jax.jit(lambda p, v, b: jax.jvp(jax.grad(lambda q: loss(q, b)), (p,), (v,))[1])
    mem = hvp.lower(params, params, batch).compile().memory_analysis()
    return mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,bert")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--jobs", type=int, default=8, help="sweep jobs (data subsets) per device count")
    ap.add_argument("--batch", type=int, default=32, help="examples per subset (and per data-parallel HVP batch)")
    ap.add_argument("--iters", type=int, default=4, help="power iterations per job")
    ap.add_argument("--reps", type=int, default=5, help="timed HVPs per device count (median)")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(f"need {max(counts)} devices, have {jax.device_count()} (set XLA_FLAGS before running)")
    cache = tempfile.mkdtemp(prefix="hqjax_bench_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} CPU cores; "
          f"jobs={args.jobs} batch={args.batch} iters={args.iters}")
    print("| model | devices | sweep jobs/s cold | sweep jobs/s warm | warm vs 1 dev | job mem/device MB "
          "| DP HVP ms (median) | DP HVP vs 1 dev | DP compile s | DP mem/device MB | DP rel. diff | sweep max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst_overhead = []
    for name in args.models.split(","):
        params, loss, subsets, layer = _problem(name, args.batch, args.jobs)
        job_mb = _job_memory(params, loss, subsets[0]) / 2**20
        root = tempfile.mkdtemp(prefix=f"hqjax_bench_{name}_")
        base = {}
        for n in counts:
            devices = jax.devices()[:n]
            cold, warm, eigs = _sweep_rate(params, loss, subsets, layer, devices, args.iters, root)
            hvp_s, comp_s, dp_bytes, hv = _dp_hvp(params, loss, subsets[0], devices, args.reps)
            hv = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(hv))])
            if not base:
                base = {"warm": warm, "hvp": hvp_s, "hv": hv, "eigs": eigs}
            rel = float(np.linalg.norm(hv - base["hv"]) / np.linalg.norm(base["hv"]))
            eig_rel = max(abs(a - b) / abs(b) for a, b in zip(eigs, base["eigs"]))
            worst_overhead.append(base["warm"] / warm)
            print(f"| {name} | {n} | {cold:.2f} | {warm:.2f} | {warm / base['warm']:.2f}x | {job_mb:.1f} "
                  f"| {hvp_s * 1e3:.0f} | {hvp_s / base['hvp']:.2f}x | {comp_s:.1f} | {dp_bytes / 2**20:.1f} "
                  f"| {rel:.1e} | {eig_rel:.1e} |", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"worst warm-sweep slowdown vs 1 device on shared CPU cores: {max(worst_overhead):.2f}x")


if __name__ == "__main__":
    main()

"""The four sections of ``device_check.py``, each run in its own process under a deadline.

Each section is a function ``(record, settings)`` that adds items through ``record.item``;
an item that raises is recorded as an error and the section goes on, one that would start
after the deadline is recorded as skipped. Sizes come from :data:`FULL` (one H100, the whole
check within 8 minutes) or :data:`SMOKE` (the CPU, Pallas in interpret mode, tiny sizes:
the same code paths, timings meaningless).

Reuses ``int_matmul.py`` (random operands) and
``curvature_vs_pyhessian.py`` (models, the hqjax side, the PyHessian side in a subprocess,
agreement and table) rather than copying them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("matmul", "requant", "curvature", "run")

# Sizes. "run" flags give `hqjax run` a short schedule; the smoke run uses the small CNN
# (ResNet-20's per-layer analysis alone takes minutes on a shared CPU). "sweep" rows are
# TritonBlocks(block_m, block_n, block_k, num_warps, num_stages) (Mosaic: the first three).
FULL = dict(
    reps=20,
    square=4096,
    shapes=[("resnet20 stage1 conv (im2col)", 128 * 32 * 32, 9 * 16, 16),
            ("bert-base ffn in (8x128 tokens)", 1024, 768, 3072),
            ("decode m=16 (memory-bound)", 16, 8192, 8192)],
    exact_cases=[(1, 100, 70), (40, 100, 70), (130, 257, 300), (512, 1000, 384)],
    sweep=[(128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
           (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 256, 128, 8, 4)],
    requant_shapes=[("square 4096", 4096, 4096, 4096), ("bert-base ffn in", 1024, 768, 3072)],
    curvature=dict(models=("resnet20", "encoder"), batch=None, image=32, repeats=10,
                   estimator_repeats=2, num_probes=100, eig_iters=100, density_steps=100,
                   batching=("resnet20", "mobilenet"), quick_batching=False),
    run_model="resnet20",
    run_flags=["--epochs", "2", "--qat-epochs", "1", "--probes", "16", "--hessian-examples", "256",
               "--hessian-batch", "128", "--top-k", "1", "--eig-iters", "20",
               "--density-steps", "20", "--calib-examples", "128"],
)
SMOKE = dict(
    reps=1,
    square=64,
    shapes=[("resnet20 stage1 conv (im2col)", 128, 9 * 16, 16),
            ("bert-base ffn in (8x128 tokens)", 32, 96, 192),
            ("decode m=16 (memory-bound)", 16, 128, 128)],
    exact_cases=[(17, 40, 24)],
    sweep=[(32, 32, 32, 4, 2), (16, 32, 64, 4, 2)],
    requant_shapes=[("small", 48, 96, 40)],
    # the MLP only (the cheapest to compile), and of the estimators only the trace: XLA:CPU
    # compiles for minutes otherwise; every row runs through the same functions as the
    # full check's ResNet-20 and encoder
    curvature=dict(models=("mlp",), batch=2, image=8, repeats=1,
                   estimator_repeats=1, num_probes=2, eig_iters=0, density_steps=0,
                   batching=("resnet20",), quick_batching=True),
    run_model="cnn",
    run_flags=["--epochs", "1", "--qat-epochs", "0", "--probes", "1", "--hessian-examples", "32",
               "--hessian-batch", "32", "--top-k", "1", "--eig-iters", "2",
               "--density-steps", "2", "--calib-examples", "16"],
)


# ---- recording ---------------------------------------------------------------------------
def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": jax.default_backend(), "device_kind": d.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__}


def make_record(path: str, name: str, deadline: float):
    """``(state, item, save)``: ``item(label, fn, need_s=0)`` runs ``fn() -> dict`` unless fewer than
    ``need_s`` seconds are left, stores its outcome and rewrites ``path`` (so a section
    killed at its time limit still leaves what it finished)."""
    state = {"section": name, "status": "running", "items": [], "notes": [], "goals": []}

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=1, default=float)
        os.replace(tmp, path)

    def item(label: str, fn, need_s: float = 0.0):
        left = deadline - time.time()
        if left < need_s:
            state["items"].append({"name": label, "status": "skipped",
                                   "reason": f"time budget ({left:.0f} s left, needs ~{need_s:.0f} s)"})
        else:
            t0 = time.perf_counter()
            try:
                out = {"name": label, "status": "ok", **fn()}
            except Exception as e:  # noqa: BLE001 - one failing item must not hide the others
                out = {"name": label, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]}
            out["wall_s"] = time.perf_counter() - t0
            state["items"].append(out)
        save()
        return state["items"][-1]

    return state, item, save


def goal(state, what: str, value, target: float, measured: bool):
    state["goals"].append({"goal": what, "value": value, "target": target,
                           "met": (value is not None and value >= target) if measured else None})


# ---- Pallas integer matmul ----------------------------------------------------------------
def _pallas():
    """(backend, interpret, blocks class) for this platform; Triton interpreted on the CPU."""
    import hqjax.kernels as K

    backend = K.default_backend()
    if backend == "xla":
        return "triton", True, K.TritonBlocks
    return backend, False, (K.TritonBlocks if backend == "triton" else K.MosaicBlocks)


def _timed(fn, *args, reps: int):
    """(compile seconds, seconds per call, output) of ``jax.jit(fn)`` on ``args``.

    Each sample queues ``reps`` calls back to back and waits once, so launch latency overlaps
    the kernels as it does inside a model (a GPU kernel at 4096^3 runs a fraction of a
    millisecond); the best of three samples.
    """
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    t_compile = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            last = compiled(*args)
        jax.block_until_ready(last)
        best = min(best, (time.perf_counter() - t0) / reps)
    return t_compile, best, out


def _equal(x, y) -> bool:
    import jax.numpy as jnp

    return bool(jnp.array_equal(x, y)) and x.dtype == y.dtype


def matmul_section(state, item, cfg):
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import hqjax.kernels as K
    from int_matmul import operands

    backend, interpret, blocks_cls = _pallas()
    kw = dict(backend=backend, interpret=interpret)
    state.update(backend=backend, interpret=interpret)
    xla_dot = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),  # noqa: E731
                                           preferred_element_type=jnp.int32)

    def exact():
        r, n = np.random.default_rng(1), 0
        for m, k, nn in cfg["exact_cases"]:
            a8 = jnp.asarray(r.integers(-128, 128, (m, k)), jnp.int8)
            au = jnp.asarray(r.integers(0, 256, (m, k)), jnp.uint8)
            b = jnp.asarray(r.integers(-128, 128, (k, nn)), jnp.int8)
            w4 = jnp.asarray(r.integers(-8, 8, (k, nn)), jnp.int8)
            want = xla_dot(a8, b)
            checks = {
                "int8": (K.int_matmul(a8, b, **kw), want),
                "uint8": (K.int_matmul(au, b, **kw),
                          xla_dot(au.astype(jnp.int32), b.astype(jnp.int32))),
                "int4": (K.int4_matmul(a8, K.pack_int4(w4), **kw), xla_dot(a8, w4)),
            }
            for what, (got, ref) in checks.items():
                if not _equal(got, ref):
                    raise AssertionError(f"{backend} {what} differs from XLA's int8 dot at "
                                         f"M,K,N={m},{k},{nn}")
                n += 1
        return {"cases": n, "exact": True}

    item("exact: Pallas int8/uint8/int4 vs XLA int8 dot", exact)

    def throughput(label, m, k, n):
        a, b, w4 = operands(m, k, n)
        fns = {
            "xla int8": (xla_dot, (a, b)),
            "bf16": (jnp.dot, (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))),
            f"{backend} int8": (lambda a, b: K.int_matmul(a, b, **kw), (a, b)),
            f"{backend} int4": (lambda a, p: K.int4_matmul(a, p, **kw), (a, K.pack_int4(w4))),
        }
        ms, tops, comp, outs = {}, {}, {}, {}
        for name, (fn, args) in fns.items():
            comp[name], t, outs[name] = _timed(fn, *args, reps=cfg["reps"])
            ms[name], tops[name] = 1e3 * t, 2.0 * m * n * k / t / 1e12
        if not _equal(outs[f"{backend} int8"], outs["xla int8"]):
            raise AssertionError(f"{backend} int8 differs from XLA at {label}")
        if not _equal(outs[f"{backend} int4"], xla_dot(a, w4)):
            raise AssertionError(f"{backend} int4 differs from XLA at {label}")
        return {"shape": [m, k, n], "ms": ms, "tops": tops, "compile_s": comp, "exact": True,
                "weight_bytes": {"int8": k * n, "int4": -(-k // 2) * n}}

    sq = cfg["square"]
    shapes = [(f"square {sq}", sq, sq, sq)] + list(cfg["shapes"])
    results = {}
    for label, m, k, n in shapes:
        results[label] = item(f"throughput {label}", lambda: throughput(label, m, k, n), need_s=10)

    # one item per tile, the best so far kept as the proposal: a tile that hangs in Triton's
    # compiler and runs into the section's limit leaves the earlier ones recorded
    a_sq, b_sq, _ = operands(sq, sq, sq)
    want = xla_dot(a_sq, b_sq)

    def tile(bl):
        c, t, out = _timed(lambda a, b: K.int_matmul(a, b, blocks=bl, **kw), a_sq, b_sq,
                          reps=cfg["reps"])
        if not _equal(out, want):
            raise AssertionError(f"{backend} int8 with {bl} differs from XLA at {sq}^3")
        return {"blocks": dataclasses.asdict(bl), "ms": 1e3 * t, "tops": 2.0 * sq**3 / t / 1e12,
                "compile_s": c}

    done = []
    for cfg_b in cfg["sweep"]:
        bl = blocks_cls(*cfg_b) if blocks_cls is K.TritonBlocks else blocks_cls(*cfg_b[:3])
        r = item(f"sweep {backend} int8 at {sq}^3 " + "/".join(map(str, cfg_b)), lambda: tile(bl),
                 need_s=5)
        done += [r] if r["status"] == "ok" else []
        if done:
            best = max(done, key=lambda r: r["tops"])
            state["proposed_default"] = {
                "backend": backend, "device_kind": device_info()["device_kind"],
                "blocks": best["blocks"], "tops": best["tops"], "measured": not interpret,
                "where": f"kernels/tiles.py: TILES[{backend!r}][<device kind substring>]"}

    measured = not interpret
    s = results[f"square {sq}"]
    if s.get("status") == "ok":
        t = s["tops"]
        goal(state, f"{backend} int8 / XLA int8 at {sq}^3", t[f"{backend} int8"] / t["xla int8"], 0.8, measured)
        goal(state, f"{backend} int8 / bf16 at {sq}^3", t[f"{backend} int8"] / t["bf16"], 1.6, measured)
    for label, r in results.items():
        if r.get("status") == "ok":
            t = r["tops"]
            goal(state, f"{backend} int4 / int8 speed at {label} (half the weight bytes)",
                 t[f"{backend} int4"] / t[f"{backend} int8"], 1.0, measured)


# ---- fused requant epilogue ---------------------------------------------------------------
def requant_section(state, item, cfg):
    import numpy as np

    import hqjax.kernels as K
    from hqjax.kernels.requant import apply_requant
    from int_matmul import operands

    backend, interpret, _ = _pallas()
    kw = dict(backend=backend, interpret=interpret)
    state.update(backend=backend, interpret=interpret)

    def one(label, m, k, n):
        a, b, _ = operands(m, k, n)
        r = np.random.default_rng(2)
        scale = r.uniform(0.5, 2.0, n) / (128 * 128 * np.sqrt(k))
        rqs = {"int8": K.requant_from_scale(scale, r.integers(-1000, 1000, n),
                                            zero_point=r.integers(-5, 5, n)),
               "uint8 clip(0,15)": K.requant_from_scale(scale, r.integers(-1000, 1000, n),
                                                        out_dtype="uint8", clip=(0, 15))}
        out = {"shape": [m, k, n], "exact": True}
        for kind, rq in rqs.items():
            fns = {"fused": lambda a, b: K.int_matmul(a, b, out_scale=rq, **kw),
                   "unfused": lambda a, b: apply_requant(K.int_matmul(a, b, **kw), rq),
                   "xla": lambda a, b: K.int_matmul(a, b, out_scale=rq, backend="xla")}
            res = {name: _timed(fn, a, b, reps=cfg["reps"]) for name, fn in fns.items()}
            for name in ("fused", "unfused"):
                if not _equal(res[name][2], res["xla"][2]):
                    raise AssertionError(f"{name} {kind} requant differs from XLA at {label}")
            out[kind] = {name: {"ms": 1e3 * t, "compile_s": c} for name, (c, t, _) in res.items()}
            out[kind]["fused_speedup"] = res["unfused"][1] / res["fused"][1]
        return out

    for label, m, k, n in cfg["requant_shapes"]:
        r = item(f"requant {label}", lambda: one(label, m, k, n), need_s=10)
        if r.get("status") == "ok":
            goal(state, f"fused / unfused requant speed at {label} (int8 out)",
                 r["int8"]["fused_speedup"], 1.0, not interpret)


# ---- curvature against PyTorch + PyHessian ------------------------------------------------
def torch_status(python: str, want_cuda: bool) -> str | None:
    """None when ``python`` imports torch and PyHessian (with CUDA if wanted), else why not."""
    code = "import torch, pyhessian; print(torch.cuda.is_available())"
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e}"
    if p.returncode:
        return f"{python} cannot import torch and pyhessian: {p.stderr.strip().splitlines()[-1:]}"
    if want_cuda and p.stdout.strip() != "True":
        return f"torch in {python} sees no CUDA device"
    return None


def curvature_section(state, item, cfg, torch_python: str):
    import jax
    from jax.flatten_util import ravel_pytree

    import curvature_vs_pyhessian as cvp

    c = cfg["curvature"]
    gpu = jax.default_backend() == "gpu"
    if gpu:  # both sides in float32 without TF32, so the timings compare the same arithmetic
        jax.config.update("jax_default_matmul_precision", "highest")
        state["notes"].append("float32 without TF32 on both sides (jax_default_matmul_precision="
                              "'highest'; torch allow_tf32=False)")
    why_not = torch_status(torch_python, gpu)
    if why_not:
        state["notes"].append(f"PyTorch/PyHessian side skipped: {why_not}")
    args = SimpleNamespace(repeats=c["repeats"], estimator_repeats=c["estimator_repeats"],
                           num_probes=c["num_probes"], eig_iters=c["eig_iters"],
                           density_steps=c["density_steps"], chunk_size=1, reorth_passes=1,
                           threads=os.cpu_count(), torch_python=torch_python)

    def one(name):
        cfg_m, loss, params, stats, x, y = cvp.make_problem(name, batch=c["batch"], image=c["image"])
        cfg_m = dict(cfg_m, device="cuda" if gpu else "cpu", tf32=False)
        jres, g, hv, probe = cvp.run_jax(name, loss, params, args)
        out = {"parameters": int(ravel_pytree(params)[0].size), "batch": int(x.shape[0]),
               "hqjax": {k: float(_median(v)) for k, v in jres["times"].items()},
               "hqjax_compile_s": jres["compile"], "hqjax_values": jres["values"]}
        bad = [k for k, v in out["hqjax"].items() if not v > 0]
        if bad:  # estimator rows are wall time minus compile events, which may overlap
            state["notes"].append(f"{name}: hqjax rows {bad} have a median time <= 0 after "
                                  "subtracting compile events; not a measurement")
        if why_not:
            return out
        with tempfile.TemporaryDirectory() as tmp:
            tres, tz = cvp.run_torch(name, cfg_m, params, stats, x, y, probe, args, tmp)
            agree = cvp.agreement(jres, tres, tz, g, hv)
        lines, ratios = cvp.table(f"{name} ({out['parameters']:,} parameters, batch {out['batch']})",
                                  jres, tres)
        out.update(pyhessian={k: float(_median(v)) for k, v in tres["times"].items()},
                   torch=tres.get("torch"), torch_device=tres.get("device"),
                   ratios=ratios, agreement=agree, table=lines)
        return out

    def batching(name):
        """Exact per-layer Gauss-Newton traces on the device loop, every backward pass of a
        chunk of examples in one vmap (the default there) against one pass at a time (the
        host loop's way, faster on XLA:CPU): which the accelerator default should be."""
        import hawq_task
        import hqjax

        _, model_fn, _, params, _, x, _ = hawq_task.make_problem(name, c["quick_batching"])
        out = {"batch": int(x.shape[0])}
        for label, kw in (("one vmap", {}), ("one pass at a time", {"backward_chunk": 1})):
            # jitted, so the second call runs the compiled program and nothing else
            fn = jax.jit(lambda p, xb, kw=kw: hqjax.ggn_layer_traces(model_fn, p, xb, loop="device", **kw).traces)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            out[label] = {"first_s": first, "s": time.perf_counter() - t0}
        return out

    for name in c["models"]:
        r = item(f"curvature {name}", lambda: one(name), need_s=20)
        for row in ("hvp", "hvp_linearized", "trace"):
            if r.get("status") == "ok" and row in r.get("ratios", {}):
                goal(state, f"hqjax {row} speed / PyHessian, {name}", r["ratios"][row], 1.5, gpu)
    for name in c["batching"]:  # last: the comparison with PyHessian comes first within the budget
        item(f"per-example batching {name}", lambda: batching(name), need_s=20)


def _median(v):
    import numpy as np

    return np.median(v) if len(v) else float("nan")


# ---- the whole job ------------------------------------------------------------------------
def run_section(state, item, cfg, deadline: float):
    """``hqjax run`` (every stage) when matplotlib is importable, else ``hqjax evaluate``:
    every stage but the plots and report, so the check needs only the core wheels of
    ``device_wheels.txt``; the JSON names the command that ran."""
    missing = [m for m in ("ortools", "sklearn") if importlib.util.find_spec(m) is None]
    command = "run" if importlib.util.find_spec("matplotlib") else "evaluate"
    if command == "evaluate":
        state["notes"].append("matplotlib absent: ran `hqjax evaluate` (every stage but the "
                              "plots and report) instead of `hqjax run`")

    def job():
        if missing:  # allocation needs OR-Tools, the digits data scikit-learn
            raise ModuleNotFoundError(f"`hqjax run` needs {missing}: carry their wheels "
                                      "(benchmarks/device_wheels.txt)")
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "hqjax.cli", command, "--model", cfg["run_model"], "--out",
                   out, *cfg["run_flags"], "--no-progress"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.time() - 2))
            wall = time.perf_counter() - t0
            metrics = {}
            if os.path.isfile(os.path.join(out, "metrics.json")):
                with open(os.path.join(out, "metrics.json")) as fh:
                    metrics = json.load(fh)
        if p.returncode:
            raise RuntimeError(f"`{' '.join(cmd[2:])}` exited {p.returncode}: {p.stderr[-1500:]}")
        return {"command": " ".join(["hqjax", command, "--model", cfg["run_model"], *cfg["run_flags"]]),
                "wall_s_job": wall, "stdout_tail": p.stdout[-1500:], "metrics": metrics}

    item(f"hqjax {command} --model {cfg['run_model']} (short schedule)", job, need_s=10)

"""hqjax's curvature engine against PyHessian (Yao et al. 2020) on the same weights and batch.

Rows: one gradient, one Hessian-vector product (forward-over-reverse and linearize-once),
Hutchinson trace with ``--num-probes`` Rademacher probes, top-1 eigenvalue with
``--eig-iters`` power iterations, SLQ spectral density with ``--density-steps`` Lanczos
steps; for ResNet-20 (batch 128, CIFAR-shaped), an MLP 784-1024-1024-10 (tanh, batch 256)
and a small BERT-like encoder. Medians of repeated runs; JAX compile time is reported
separately (from ``jax.monitoring``'s compile events); ratios are PyHessian/hqjax measured in
the same run; the two sides must agree on loss, gradient and one HVP with a shared probe.

hqjax runs twice per model (``--backend both``, the default): as plain XLA (``xla``, what
``import hqjax`` does) and through the opt-in CPU backend (``cpu``:
``hqjax.kernels.cpu.accelerate`` around the forward pass, the gradient and the operators,
and its native Lanczos reorthogonalization), so the table shows where each wins on the
processor it ran on (printed first).

How to run (PyTorch lives outside the project, in its own venv; not part of CI)::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 pyhessian numpy     # CPU torch
    python benchmarks/curvature_vs_pyhessian.py                        # all models, full size
    python benchmarks/curvature_vs_pyhessian.py --models mlp --num-probes 10 --eig-iters 10 \\
        --density-steps 10 --repeats 3 --estimator-repeats 1             # a quick smoke run
    python benchmarks/curvature_vs_pyhessian.py --small --models resnet20,mlp,encoder \\
        --num-probes 2 --eig-iters 2 --density-steps 2 --repeats 1 --estimator-repeats 1   # tiny, end to end

The PyTorch side (``_pyhessian_side.py``) runs as a subprocess after the JAX side has
finished each model, so the two never compete for the CPU. On a shared machine whose speed
drifts over minutes, ``--rounds 3`` alternates the two sides three times per model and
pools the samples, so a slow spell does not land on one side only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import hqjax
import hqjax.kernels.cpu
from hqjax.models import MLP, ResNet20

HERE = os.path.dirname(os.path.abspath(__file__))
ENCODER = dict(vocab=1000, seq=64, d=128, heads=4, ffn=512, layers=2, batch=32)


# ---- a tiny BERT-like encoder (post-LN, as BERT), mirrored in _pyhessian_side.py ----------
class EncoderLayer(nn.Module):
    d: int
    heads: int
    ffn: int

    @nn.compact
    def __call__(self, x):
        B, S, D = x.shape
        h = self.heads
        split = lambda t: t.reshape(B, S, h, D // h).transpose(0, 2, 1, 3)
        q, k, v = (split(nn.Dense(D, name=n)(x)) for n in ("q", "k", "v"))
        a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // h), -1) @ v
        x = nn.LayerNorm(1e-6, name="ln1")(x + nn.Dense(D, name="o")(a.transpose(0, 2, 1, 3).reshape(B, S, D)))
        y = nn.Dense(D, name="ffn2")(jax.nn.gelu(nn.Dense(self.ffn, name="ffn1")(x), approximate=True))
        return nn.LayerNorm(1e-6, name="ln2")(x + y)


class Encoder(nn.Module):
    vocab: int
    seq: int
    d: int
    heads: int
    ffn: int
    layers: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        del train  # no dropout: the curvature of the deterministic model is what both sides compute
        x = nn.Embed(self.vocab, self.d, name="tok_emb")(tokens)
        x = x + self.param("pos_emb", nn.initializers.normal(0.02), (self.seq, self.d))
        x = nn.LayerNorm(1e-6, name="emb_ln")(x)
        for i in range(self.layers):
            x = EncoderLayer(self.d, self.heads, self.ffn, name=f"layer{i}")(x)
        return nn.Dense(self.num_classes, name="head")(x.mean(1))


_SMALL_BATCH = {"resnet20": 4, "mlp": 8, "encoder": 2}  # --small


def make_problem(name: str, seed: int = 0, batch: int | None = None, image: int = 32):
    """``(cfg, loss(params), params, batch_stats, x, y)`` for one benchmark model.

    ``batch`` (default 128, 256, 32 by model) and ``image`` (ResNet-20's side) shrink the
    problem for smoke runs (``device_check.py --smoke``).
    """
    k = jax.random.split(jax.random.key(seed), 4)
    if name == "resnet20":
        model, x = ResNet20(), jax.random.normal(k[0], (batch or 128, image, image, 3))
        cfg = {"model": name}
    elif name == "mlp":
        model, x = MLP(features=(1024, 1024), activation="tanh"), jax.random.normal(k[0], (batch or 256, 784))
        cfg = {"model": name, "sizes": [784, 1024, 1024, 10]}
    elif name == "encoder":
        e = {kk: v for kk, v in ENCODER.items() if kk != "batch"}
        model, x = Encoder(**e), jax.random.randint(k[0], (batch or ENCODER["batch"], e["seq"]), 0, e["vocab"])
        cfg = {"model": name, "encoder": e}
    else:
        raise ValueError(f"unknown model {name!r}; choose resnet20, mlp or encoder")
    y = jax.random.randint(k[1], (x.shape[0],), 0, 10)
    variables = model.init(k[2], x, train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    if stats:  # non-trivial running statistics, so the BN conversion is actually checked
        leaves, tdef = jax.tree.flatten_with_path(stats)
        ks = jax.random.split(k[3], len(leaves))
        stats = jax.tree.unflatten(tdef, [
            (0.1 * jax.random.normal(kk, a.shape) if p[-1].key == "mean" else jax.random.uniform(kk, a.shape, minval=0.5, maxval=1.5))
            for kk, (p, a) in zip(ks, leaves)])

    def loss(p):
        v = {"params": p, "batch_stats": stats} if stats else {"params": p}
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x, train=False), y).mean()

    return cfg, loss, params, stats, x, y


def flat_paths(tree, prefix):
    return {prefix + "/".join(str(getattr(q, "key", q)) for q in p): np.asarray(a)
            for p, a in jax.tree.flatten_with_path(tree)[0]}


# ---- timing ----------------------------------------------------------------------------------
_COMPILE_EVENTS: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, d, **kw: _COMPILE_EVENTS.append(d) if name.startswith("/jax/core/compile/") else None)


@contextmanager
def compile_clock():
    """Seconds spent tracing/lowering/compiling inside the block (``out[0]`` after it)."""
    start, out = len(_COMPILE_EVENTS), [0.0]
    yield out
    out[0] = float(sum(_COMPILE_EVENTS[start:]))


def block(x):
    return jax.block_until_ready(x)


def time_op(fn, repeats):
    """``(result, run seconds [repeats], compile seconds)``; the first (compiling) call is not a sample."""
    with compile_clock() as c:
        out = block(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = block(fn())
        ts.append(time.perf_counter() - t)
    return out, ts, c[0]


def time_estimator(fn, repeats):
    """Each call timed whole; compile events inside it are subtracted and reported apart."""
    ts, cs, out = [], [], None
    for _ in range(repeats):
        with compile_clock() as c:
            t = time.perf_counter()
            out = block(fn())
            dt = time.perf_counter() - t
        ts.append(dt - c[0])
        cs.append(c[0])
    return out, ts, float(np.median(cs))


def hoisted(fn, example):
    """``jit`` of ``fn`` with its closed-over arrays (e.g. linearization residuals) as arguments."""
    closed = jax.make_jaxpr(fn)(example)
    treedef = jax.tree.structure(jax.eval_shape(fn, example))
    run = jax.jit(lambda consts, leaves: jax.core.eval_jaxpr(closed.jaxpr, consts, *leaves))
    return lambda v: jax.tree.unflatten(treedef, run(closed.consts, jax.tree.leaves(v))), run, closed.consts


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def temp_mb(jitted, *args):
    m = jitted.lower(*args).compile().memory_analysis()
    return None if m is None else (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20


BACKENDS = {"xla": "hqjax (plain XLA)", "cpu": "hqjax + CPU backend"}


def processor() -> str:
    """The processor model, as the kernel reports it (Linux), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def warm_cpu_backend() -> dict:
    """Build the native library and run every self-check now, so no timed call (and no
    compile-time accounting) includes them; returns which kernels passed."""
    from hqjax.kernels.cpu.conv_forward import native_forward_status
    from hqjax.kernels.cpu.conv_primitives import onednn_status
    from hqjax.kernels.cpu.conv_weight_grad import native_wgrad_status
    from hqjax.kernels.cpu.gram_schmidt import native_gram_schmidt_status
    from hqjax.kernels.cpu.matmul import native_matmul_status

    checks = {"weight gradient": native_wgrad_status, "forward conv": native_forward_status,
              "gram-schmidt": native_gram_schmidt_status, "gemm": native_matmul_status, "oneDNN": onednn_status}
    return {name: check()[0] for name, check in checks.items()}


def run_jax(name, loss, params, args, backend="xla"):
    R, E = args.repeats, args.estimator_repeats
    T, C, M, V = {}, {}, {}, {}
    probe = hqjax.tree.tree_random_like(jax.random.key(7), params, "rademacher")
    # the same functions, as is (plain XLA) or through the opt-in CPU backend
    conv = (lambda fn: fn) if backend == "xla" else hqjax.kernels.cpu.accelerate
    orthogonalize = None if backend == "xla" else hqjax.kernels.cpu.orthogonalize
    fwd, grad = jax.jit(conv(loss)), jax.jit(conv(jax.value_and_grad(loss)))
    hvp = jax.jit(conv(lambda p, v: hqjax.hvp(loss, p, v)))
    _, T["forward"], C["forward"] = time_op(lambda: fwd(params), R)
    (lval, g), T["gradient"], C["gradient"] = time_op(lambda: grad(params), R)
    hv, T["hvp"], C["hvp"] = time_op(lambda: hvp(params, probe), R)
    M.update(forward=temp_mb(fwd, params), gradient=temp_mb(grad, params), hvp=temp_mb(hvp, params, probe))

    # linearize once (residuals kept), then each product is the linear map only
    with compile_clock() as c:
        t = time.perf_counter()
        if backend == "xla":
            lin_mv = hqjax.hessian(loss, params, linearize=True, check_finite=False)
        else:  # the rewrite inside linearize, so the explicit layouts become residuals
            lin = jax.linearize(conv(jax.grad(loss)), params)[1]
            lin_mv = lambda v: lin(v)
        apply, run, consts = hoisted(lin_mv, probe)
        block(consts)
        setup = time.perf_counter() - t
    T["hvp_setup"] = [setup - c[0]]  # linearize's own compile events are reported apart
    hv_lin, T["hvp_linearized"], C["hvp_linearized"] = time_op(lambda: apply(probe), R)
    C["hvp_setup"] = c[0]
    M["hvp_linearized"] = temp_mb(run, consts, jax.tree.leaves(probe))
    M["residuals"] = sum(np.asarray(a).nbytes for a in consts) / 2**20
    V.update(loss=float(lval), grad_norm=float(hqjax.tree.tree_norm(g)), vHv=float(hqjax.tree.tree_dot(hv, probe)),
             hvp_lin_vs_hvp=float(hqjax.tree.tree_norm(jax.tree.map(jnp.subtract, hv_lin, hv)) / hqjax.tree.tree_norm(hv)))
    M["process_after_ops"] = peak_rss_mb()

    # estimators over the faster operator of the two, as a user would pick it
    lin_faster = np.median(T["hvp_linearized"]) < np.median(T["hvp"])
    mv = lin_mv if lin_faster else conv(hqjax.hessian(loss, params, check_finite=False))
    V["estimator_operator"] = "linearized" if lin_faster else "jvp(grad)"
    key = jax.random.key(1)
    estimators = {
        "trace": (args.num_probes, lambda: hqjax.trace(mv, params, key, num_probes=args.num_probes, chunk_size=args.chunk_size),
                  lambda r: {"trace": float(r.total), "trace_stderr": float(r.total_stderr)}),
        "top_eigenvalue": (args.eig_iters, lambda: hqjax.top_eigenvalues(mv, params, key, k=1, max_iters=args.eig_iters, tol=-1.0),
                           lambda r: {"top_eigenvalue": float(r.eigenvalues[0])}),
        "density": (args.density_steps, lambda: hqjax.spectral_density(mv, params, key, num_steps=args.density_steps,
                                                                              reorth_passes=args.reorth_passes,
                                                                              orthogonalize=orthogonalize),
                    lambda r: {"density_max_node": float(jnp.max(r.nodes))}),
    }
    for row, (count, call, summary) in estimators.items():
        if not count:
            continue
        try:
            out, T[row], C[row] = time_estimator(call, E)
        except Exception as e:  # noqa: BLE001 - a broken estimator must not hide the other rows
            V[row + "_error"] = f"{type(e).__name__}: {e}"
            print(f"hqjax {row} failed: {V[row + '_error']}", flush=True)
            continue
        V.update(summary(out))
        M[row] = peak_rss_mb()
    return {"times": T, "compile": C, "mem_mb": M, "values": V}, g, hv, probe


def run_torch(name, cfg, params, stats, x, y, probe, args, workdir):
    cfg = dict(cfg, threads=args.threads, repeats=args.repeats, estimator_repeats=args.estimator_repeats,
               num_probes=args.num_probes, eig_iters=args.eig_iters, density_steps=args.density_steps)
    arrays = {"cfg": json.dumps(cfg), "x": np.asarray(x), "y": np.asarray(y)}
    arrays.update(flat_paths(params, "p:"))
    arrays.update(flat_paths(stats, "s:"))
    arrays.update(flat_paths(probe, "v:"))
    inp, out = os.path.join(workdir, f"{name}_in.npz"), os.path.join(workdir, f"{name}_torch")
    np.savez(inp, **arrays)
    subprocess.run([args.torch_python, os.path.join(HERE, "_pyhessian_side.py"), inp, out], check=True)
    with open(out + ".json") as fh:
        res = json.load(fh)
    return res, np.load(out + ".npz")


def merge_times(first, later):
    """Adds a later round's samples to the first round's; compile times and values stay the first's."""
    for row, ts in later["times"].items():
        first["times"].setdefault(row, []).extend(ts)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def agreement(jres, tres, tz, g, hv):
    gj, hj = flat_paths(g, ""), flat_paths(hv, "")
    gt = np.concatenate([tz["g:" + k].ravel() for k in gj])
    ht = np.concatenate([tz["hv:" + k].ravel() for k in hj])
    gjv = np.concatenate([a.ravel() for a in gj.values()])
    hjv = np.concatenate([a.ravel() for a in hj.values()])
    jv, tv = jres["values"], tres["values"]
    out = {"loss_rel": abs(jv["loss"] - tv["loss"]) / abs(tv["loss"]), "grad_rel": rel(gjv, gt), "hvp_rel": rel(hjv, ht),
           "grad_norm": (jv["grad_norm"], tv["grad_norm"]), "vHv": (jv["vHv"], tv["vHv"])}
    for k in ("trace", "top_eigenvalue", "density_max_node"):
        if k in jv and k in tv:
            out[k] = (jv[k], tv[k])
    return out


# (hqjax key, PyHessian key, label). One HVP from scratch: hqjax's jvp(grad) against PyHessian
# building its gradient graph and then one product; reusing work: hqjax's linearized operator
# against PyHessian's product through its cached graph (both keep the first pass's residuals).
ROWS = [("forward", "forward", "forward"), ("gradient", "gradient", "gradient"),
        ("hvp", "hvp_scratch", "hvp, one from scratch (PyHessian: graph + product)"),
        ("hvp_linearized", "hvp", "hvp, reusing the first pass (linearized vs cached graph)"),
        ("trace", "trace", "trace"), ("top_eigenvalue", "top_eigenvalue", "top_eigenvalue"), ("density", "density", "density")]


def table(name, jres_by_backend, tres):
    tt = dict(tres["times"])
    tt["hvp_scratch"] = [tt["hvp_setup"][0] + float(np.median(tt["hvp"]))]
    head = "| row | PyHessian (ms) |" + "".join(f" {BACKENDS[b]} (ms) | PyHessian / it |" for b in jres_by_backend)
    head += " hqjax compile (s) |"
    lines = [f"### {name}", "", head, "|---|---:|" + "---:|---:|" * len(jres_by_backend) + "---:|"]
    ratios = {}
    for jk, tk, label in ROWS:
        if tk not in tt or not any(jk in j["times"] for j in jres_by_backend.values()):
            continue
        a = 1e3 * np.median(tt[tk])
        cells, compile_s = [], []
        for b, jres in jres_by_backend.items():
            if jk not in jres["times"]:
                cells.append(" - | - |")
                continue
            t = 1e3 * np.median(jres["times"][jk])
            ratios[f"{b}/{jk}"] = a / t
            cells.append(f" {t:,.1f} | {a / t:.2f}x |")
            compile_s.append(f"{jres['compile'].get(jk, 0):.2f}")
        lines.append(f"| {label} | {a:,.1f} |" + "".join(cells) + f" {' / '.join(compile_s)} |")
    lines += ["", "PyHessian / it > 1: hqjax faster. Compile times in column order."]
    return lines, ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,mlp,encoder")
    ap.add_argument("--repeats", type=int, default=10, help="repeats of gradient/HVP (median)")
    ap.add_argument("--estimator-repeats", type=int, default=3, help="repeats of trace/eigen/density (median)")
    ap.add_argument("--num-probes", type=int, default=100)
    ap.add_argument("--eig-iters", type=int, default=100)
    ap.add_argument("--density-steps", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=1, help="probes per vmap chunk in hqjax.trace")
    ap.add_argument("--reorth-passes", type=int, default=1, choices=(1, 2),
                    help="Gram-Schmidt passes per Lanczos step in hqjax's density (PyHessian does 1; hqjax's default is 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    ap.add_argument("--backend", default="both", choices=("both", "xla", "cpu"),
                    help="hqjax as plain XLA, through the opt-in CPU backend (hqjax.kernels.cpu.accelerate), or both")
    ap.add_argument("--small", action="store_true", help="tiny batches, to check the script end to end quickly")
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the hqjax and PyHessian sides this many times per model; medians pool all rounds")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--fresh-host-memory", action="store_true",
                    help="skip hqjax.kernels.cpu.reuse_host_memory(), so XLA faults its scratch memory in on every call")
    args = ap.parse_args(argv)
    host = None if args.fresh_host_memory else hqjax.kernels.cpu.reuse_host_memory()
    if not os.path.exists(args.torch_python):
        sys.exit(f"no PyTorch interpreter at {args.torch_python}; create it as the module docstring says, or pass --torch-python")
    print(f"processor: {processor()}; date {time.strftime('%Y-%m-%d')}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), load average {os.getloadavg()}; "
          f"hqjax.kernels.cpu.reuse_host_memory (both columns): "
          f"{'not called' if host is None else host.applied or host.reason}")
    backends = ("xla", "cpu") if args.backend == "both" else (args.backend,)
    if "cpu" in backends:
        print(f"CPU backend kernels: {warm_cpu_backend()}")
    results, key_ratios = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cfg, loss, params, stats, x, y = make_problem(name, batch=_SMALL_BATCH[name] if args.small else None)
            n = ravel_pytree(params)[0].size
            print(f"\n== {name}: {n:,} parameters, batch {x.shape[0]}", flush=True)
            jres, first = {}, {}
            for b in backends:
                jres[b], g, hv, probe = run_jax(name, loss, params, args, b)
                first[b] = (g, hv)
            tres, tz = run_torch(name, cfg, params, stats, x, y, probe, args, tmp)
            for r in range(1, args.rounds):
                # alternate the two sides so a slow spell of a shared machine hits both
                print(f"-- {name}: round {r + 1} of {args.rounds}", flush=True)
                for b in backends:
                    merge_times(jres[b], run_jax(name, loss, params, args, b)[0])
                merge_times(tres, run_torch(name, cfg, params, stats, x, y, probe, args, tmp)[0])
            agree = {b: agreement(jres[b], tres, tz, *first[b]) for b in backends}
            lines, ratios = table(f"{name} ({n:,} parameters, batch {x.shape[0]})", jres, tres)
            print("\n".join(lines))
            print("agreement:", json.dumps(agree))
            print(f"load average {os.getloadavg()}", flush=True)
            results[name] = {"jax": jres, "torch": tres, "agreement": agree, "ratios": ratios}
            key_ratios.update({f"{name}/{k}": r for k, r in ratios.items()})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
    worst = min(key_ratios, key=key_ratios.get)
    print(f"\nslowest hqjax row relative to PyHessian: {worst} at {key_ratios[worst]:.2f}x "
          f"(>1 means hqjax faster); best {max(key_ratios, key=key_ratios.get)} at {max(key_ratios.values()):.2f}x")


if __name__ == "__main__":
    main()

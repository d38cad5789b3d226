"""The analysis stage: every layer's sensitivity, resumable layer by layer.

One per-example pass gives every layer's Gauss-Newton (or Fisher) trace; with
``curvature='hessian'`` each layer then adds the probed remainder of its Hessian trace
(:func:`hqjax.curvature.hessian_layer_traces`), one unit of work per layer, each from a
PRNG key derived from the seed and the layer's index only, so a resumed run produces
exactly the result of an uninterrupted one. Top eigenvalues (HAWQ-V1) are computed only
when the metric reads them; the whole model's eigenvalue density (PyHessian's SLQ) is one
more unit.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from hqjax._job import Job
from hqjax._schema import sensitivity_document
from hqjax.train import make_loss_fn, progress_bar

__all__ = ["stage_analyze"]


def _analysis_loss(job: Job):
    """The mean loss over the analysis batches as a function of the params."""
    from hqjax.curvature import dataset_loss

    batches, counts = job.analysis_batches()
    # Convolution gradients inside a scan body are slow on XLA:CPU; a few batches are
    # unrolled instead.
    unroll = True if counts.shape[0] <= 8 else 1
    return dataset_loss(make_loss_fn(job.model, job.variables), batches, counts, unroll=unroll)


def _needs_eigenvalues(job: Job) -> bool:
    from hqjax.config import analysis_needs_eigenvalues

    return analysis_needs_eigenvalues(job.config.metric)


def _layer_key(job: Job, index: int):
    return jax.random.fold_in(jax.random.PRNGKey(job.config.seed), index)


def _hessian_layer(job: Job, f, index: int, name: str, *, ggn=None) -> dict:
    """One layer's Hessian trace and, when the metric reads them, its top eigenvalues
    (Lanczos on the layer's own function).

    With ``ggn`` (the Gauss-Newton traces of every layer) the trace is the exact Gauss-Newton
    part plus the probed remainder (``hqjax.curvature.hessian_layer_traces``); without it,
    only the eigenvalues are computed."""
    from hqjax.curvature import block_function, hessian, hessian_layer_traces, top_eigenvalues

    c, params, blk = job.config, job.variables["params"], job.blocks
    k_trace, k_eig = jax.random.split(_layer_key(job, index))
    out = {"top_eigenvalues": []}
    if ggn is not None:
        x, y = job.analysis_examples()
        res = hessian_layer_traces(job.logits_fn(), params, x, y, k_trace, blocks=blk, names=[name], ggn=ggn,
                                   rtol=c.trace_rtol, min_probes=min(4, max(2, c.num_probes)),
                                   max_probes=max(2, c.num_probes))
        out.update(trace=float(res.traces[0]), trace_stderr=float(res.stderr[0]), num_probes=int(res.num_probes[0]))
    if _needs_eigenvalues(job):
        f_b, theta = block_function(f, params, blk, name)
        size = blk.sizes[blk.index(name)]
        eig = top_eigenvalues(hessian(f_b, theta), theta, k_eig, k=min(c.top_k, size), method="lanczos",
                              max_iters=min(max(c.eig_iters, c.top_k), size), tol=1e-3)
        out["top_eigenvalues"] = [float(x) for x in np.asarray(eig.eigenvalues)]
    return out


def _proxy_traces(job: Job):
    """Every layer's Gauss-Newton / Fisher trace at once (no probe noise for the Gauss-Newton
    trace, which is also the exact part of the ``'hessian'`` source)."""
    from hqjax.curvature import empirical_fisher_layer_traces, fisher_layer_traces, ggn_layer_traces

    c, params, blk = job.config, job.variables["params"], job.blocks
    x, y = job.analysis_examples()
    if c.curvature in ("ggn", "hessian"):
        return ggn_layer_traces(job.logits_fn(), params, x, blocks=blk)
    if c.curvature == "empirical_fisher":
        return empirical_fisher_layer_traces(job.logits_fn(), params, x, y, blocks=blk)
    return fisher_layer_traces(job.logits_fn(), params, x, _layer_key(job, 20_000), blocks=blk)


def _layer_row(job: Job, index: int, name: str, curvature: dict) -> dict:
    """One row of the sensitivity table: the curvature numbers plus the weight perturbations."""
    from hqjax.quant import weight_perturbation

    c, params, blk = job.config, job.variables["params"], job.blocks
    w = blk.kernel_view(params, name)  # per-channel means per output feature, as in quantize_params
    n = int(blk.sizes[blk.index(name)])
    pert = jax.jit(weight_perturbation, static_argnums=1)
    return {
        "layer": name,
        "index": index,
        "n_params": n,
        "n_weights": int(np.size(w)),
        "curvature": c.curvature,
        "trace": curvature["trace"],
        "trace_stderr": curvature["trace_stderr"],
        "num_probes": curvature["num_probes"],
        "avg_trace": curvature["trace"] / n,
        "top_eigenvalues": curvature.get("top_eigenvalues", []),
        "perturbation": {str(b): float(pert(w, b)) for b in c.weight_bits},
        "weight_norm_sq": float(np.sum(np.square(np.asarray(w, np.float64)))),
    }


def _density(job: Job, f) -> dict:
    from hqjax.curvature import hessian, spectral_density

    c, params = job.config, job.variables["params"]
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 10_000)
    res = spectral_density(hessian(f, params), params, key, num_steps=c.density_steps)
    return {"nodes": np.asarray(res.nodes).tolist(), "weights": np.asarray(res.weights).tolist()}


def stage_analyze(job: Job) -> None:
    """Per-layer sensitivity (resumable layer by layer) and the full-model eigenvalue density.

    The method follows the metric and the curvature source. Every source starts with one
    per-example pass over all layers (one unit of work): the Gauss-Newton traces for
    ``'hessian'`` and ``'ggn'``, the Fisher traces for ``'fisher'`` / ``'empirical_fisher'``.
    With ``curvature='hessian'`` each layer then adds the Hutchinson estimate of the
    remainder ``tr(R_bb)`` on its own (pruned) function, stopped at ``trace_rtol`` (one layer
    per unit of work; on ReLU networks the remainder is 0 and each layer stops after a few
    probes). Eigenvalues (per layer, Lanczos) only when the metric reads them.
    """
    from hqjax.curvature import LayerTraceResult

    fp, work, blk, c = job.fingerprints["analyze"], job.work, job.blocks, job.config
    f = _analysis_loss(job)
    t0 = time.perf_counter()
    unit = os.path.join("analysis", "ggn.json" if c.curvature == "hessian" else f"{c.curvature}.json")
    saved = work.read_json(unit) if work.exists(unit) else {}
    if saved.get("fingerprint") == fp and "result" in saved:
        proxy = LayerTraceResult.from_dict(saved["result"])
    else:
        proxy = _proxy_traces(job)
        work.write_json(unit, {"fingerprint": fp, "result": proxy.to_dict()})
        job.unit_written()
    proxy_rows = {n: {"trace": t, "trace_stderr": se, "num_probes": int(np.asarray(proxy.num_probes)[i])}
                  for i, (n, (t, se)) in enumerate(proxy.per_block().items())}
    rows = []
    bar = progress_bar(total=len(blk) + 1, desc="analyze", enabled=job.progress)
    for i, name in enumerate(blk.names):
        unit = os.path.join("analysis", f"layer_{i:03d}.json")
        if work.exists(unit) and work.read_json(unit).get("fingerprint") == fp:
            row = work.read_json(unit)["row"]
            job.log(f"[analyze] {name}: done before, reused")
        else:
            if c.curvature == "hessian":
                curv = _hessian_layer(job, f, i, name, ggn=proxy)
            else:
                curv = dict(proxy_rows[name], **_hessian_layer(job, f, i, name))
            row = _layer_row(job, i, name, curv)
            work.write_json(unit, {"fingerprint": fp, "row": row})
            eig = row["top_eigenvalues"]
            job.log(f"[analyze] {name}: {c.curvature} trace {row['trace']:.4g} ± {row['trace_stderr']:.2g} "
                    f"({row['num_probes']} probes)" + (", top eigenvalues " + ", ".join(f"{e:.4g}" for e in eig)
                                                      if eig else ""))
            job.unit_written()
        rows.append(row)
        bar.update(1)
    unit = os.path.join("analysis", "density.json")
    if work.exists(unit) and work.read_json(unit).get("fingerprint") == fp:
        density = work.read_json(unit)["density"]
    else:
        density = _density(job, f)
        work.write_json(unit, {"fingerprint": fp, "density": density})
        job.unit_written()
    bar.update(1)
    bar.close()
    c = job.config
    work.write_json("sensitivity.json", sensitivity_document(  # the one schema (hqjax._schema)
        rows, model=c.model, dataset=c.dataset, seed=c.seed, curvature=c.curvature, num_probes=c.num_probes,
        trace_rtol=c.trace_rtol, hessian_examples=c.hessian_examples, weight_bits=list(c.weight_bits)))
    work.write_json("density.json", density)
    job.log(f"[analyze] {len(rows)} layers and the density in {time.perf_counter() - t0:.1f} s")

"""What a person reads after a job: PNG plots, ``report.md`` and a one-screen summary table.

Everything here reads the JSON files of an output folder, so a report can be rebuilt from
the folder alone (``hqjax report --out DIR``). Plots use matplotlib's Agg backend (no
display needed) and are written atomically like every other output.
"""

from __future__ import annotations

import io

import numpy as np

from hqjax._workdir import Workdir, atomic_write_bytes

__all__ = ["plot_density", "plot_traces", "plot_bits", "plot_pareto", "write_report", "summary_table", "make_plots"]


def _figure(width=6.4, height=3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    return plt, fig, ax


def _save(plt, fig, path: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_density(density: dict, path: str, title: str = "Hessian eigenvalue density") -> str:
    """Gaussian-smoothed SLQ density (PyHessian Sec. 3.3) on a log scale, with the Ritz nodes."""
    from hqjax.curvature import DensityResult, density_on_grid

    nodes, weights = np.asarray(density["nodes"]), np.asarray(density["weights"])
    grid, dens = density_on_grid(DensityResult(nodes, weights))
    plt, fig, ax = _figure()
    ax.semilogy(np.asarray(grid), np.maximum(np.asarray(dens), 1e-12), color="C0")
    ax.plot(nodes.ravel(), np.full(nodes.size, 1e-11), "|", color="C3", alpha=0.5, label="Lanczos nodes")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_ylim(1e-12, None)
    ax.set_title(title)
    ax.legend(loc="upper right")
    return _save(plt, fig, path)


def plot_traces(layers: list[dict], path: str) -> str:
    """Per-layer average Hessian trace ``tr(H_l)/n_l`` (HAWQ-V2's sensitivity) with ±1 stderr."""
    names = [r["layer"] for r in layers]
    avg = np.array([r["trace"] / r["n_params"] for r in layers])
    err = np.array([r["trace_stderr"] / r["n_params"] for r in layers])
    plt, fig, ax = _figure(max(6.0, 0.6 * len(names) + 2))
    ax.bar(range(len(names)), avg, yerr=err, capsize=4, color="C0")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("average Hessian trace  tr(H)/n")
    ax.set_title("Per-layer sensitivity: Hutchinson trace, ±1 stderr")
    if np.all(avg > 0):
        ax.set_yscale("log")
    return _save(plt, fig, path)


def plot_bits(bit_config: dict, layers: list[dict], path: str) -> str:
    """Weight bits chosen per layer, next to each layer's sensitivity rank."""
    names = [r["layer"] for r in layers]
    bits = [bit_config[n]["weight_bits"] for n in names]
    plt, fig, ax = _figure(max(6.0, 0.6 * len(names) + 2))
    bars = ax.bar(range(len(names)), bits, color="C2")
    for b, v in zip(bars, bits):
        ax.text(b.get_x() + b.get_width() / 2, v, str(v), ha="center", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("weight bits")
    ax.set_title("Bits per layer")
    return _save(plt, fig, path)


def plot_pareto(pareto: dict, path: str) -> str:
    """Pareto frontier of cost vs. predicted sensitivity, with the chosen configuration."""
    pts = pareto["points"]
    cost = np.array([p["cost"] for p in pts])
    sens = np.array([p["sensitivity"] for p in pts])
    plt, fig, ax = _figure()
    order = np.argsort(cost)
    ax.plot(cost[order], sens[order], "o-", color="C0", label="Pareto frontier", markersize=4)
    ch = pareto.get("chosen")
    if ch:
        ax.plot([ch["cost"]], [ch["sensitivity"]], "*", color="C3", markersize=14, label="chosen")
    if pareto.get("budget") is not None:
        ax.axvline(pareto["budget"], color="C7", ls="--", label="budget")
    for u in pareto.get("uniform", []):
        ax.plot([u["cost"]], [u["sensitivity"]], "s", color="C1", markersize=5)
        ax.annotate(f"W{u['bits']}", (u["cost"], u["sensitivity"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"{pareto.get('kind', 'size')} ({pareto.get('unit', '')})")
    ax.set_ylabel(f"sensitivity ({pareto.get('metric', '')})")
    if np.all(sens > 0):
        ax.set_yscale("log")
    ax.set_title("Cost vs. sensitivity")
    ax.legend()
    return _save(plt, fig, path)


def make_plots(root: str) -> list[str]:
    """Every plot whose inputs exist in the folder; returns the written paths."""
    w = Workdir(root)
    out = []
    if w.exists("density.json"):
        out.append(plot_density(w.read_json("density.json"), w.path("density.png")))
    if w.exists("sensitivity.json"):
        layers = w.read_json("sensitivity.json")["layers"]
        out.append(plot_traces(layers, w.path("traces.png")))
        if w.exists("bit_config.json"):
            out.append(plot_bits(w.read_json("bit_config.json"), layers, w.path("bits.png")))
    if w.exists("pareto.json"):
        out.append(plot_pareto(w.read_json("pareto.json"), w.path("pareto.png")))
    return out


def _layer_table(w: Workdir) -> list[str]:
    layers = w.read_json("sensitivity.json")["layers"]
    bc = w.read_json("bit_config.json") if w.exists("bit_config.json") else {}
    lines = [f"{'layer':<24}{'params':>8}{'trace':>12}{'± stderr':>10}{'top eig':>11}{'bits':>6}"]
    for r in layers:
        bits = bc.get(r["layer"], {}).get("weight_bits", "-")
        # eigenvalues are computed only for metrics that read them
        eig = f"{r['top_eigenvalues'][0]:>11.4g}" if r.get("top_eigenvalues") else f"{'-':>11}"
        lines.append(f"{r['layer']:<24}{r['n_params']:>8}{r['trace']:>12.4g}{r['trace_stderr']:>10.2g}"
                     f"{eig}{bits!s:>6}")
    return lines


def _metrics_table(w: Workdir) -> list[str]:
    m = w.read_json("metrics.json")
    lines = [f"{'stage':<24}{'accuracy':>10}{'size (KB)':>12}{'weight bits':>14}"]
    for name, s in m["stages"].items():
        lines.append(f"{name:<24}{s['accuracy']:>10.4f}{s['size_bytes'] / 1024:>12.2f}{s.get('bits', ''):>14}")
    b = m.get("budget")
    if b:
        lines.append(f"budget: {b['kind']} {b['value']:.6g} {b.get('unit', '')}, used {b['used']:.6g} "
                     f"({'within' if b['used'] <= b['value'] * (1 + 1e-9) else 'OVER'} budget)")
    return lines


def summary_table(root: str) -> str:
    """The one-screen summary printed at the end of ``hqjax run``."""
    w = Workdir(root)
    lines = [f"hqjax results in {w.root}"]
    if w.exists("sensitivity.json"):
        lines += [""] + _layer_table(w)
    if w.exists("metrics.json"):
        lines += [""] + _metrics_table(w)
    return "\n".join(lines)


def write_report(root: str) -> str:
    """``report.md``: configuration, tables and every plot, in reading order."""
    w = Workdir(root)
    cfg = w.read_json("config.json") if w.exists("config.json") else {}
    md = ["# hqjax report", ""]
    if cfg:
        md += [f"Model `{cfg.get('model')}` on `{cfg.get('dataset')}`, seed {cfg.get('seed')}, metric "
               f"`{cfg.get('metric')}`, {cfg.get('budget_kind')} budget `{cfg.get('budget')}`, candidate bits "
               f"{cfg.get('weight_bits')}, activations {cfg.get('act_bits')} bits. Exact settings: `config.json`.", ""]
    if w.exists("metrics.json"):
        md += ["## Accuracy and size at each stage", "", "```", *_metrics_table(w), "```", ""]
    if w.exists("sensitivity.json"):
        md += ["## Per-layer sensitivity", "", "```", *_layer_table(w), "```", ""]
    sections = [("traces.png", "Average Hessian trace per layer (±1 standard error)"),
                ("bits.png", "Bits per layer"),
                ("pareto.png", "Pareto frontier and the chosen configuration"),
                ("density.png", "Hessian eigenvalue density of the whole model")]
    for fname, caption in sections:
        if w.exists(fname):
            md += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    path = w.path("report.md")
    atomic_write_bytes(path, "\n".join(md).encode())
    return path

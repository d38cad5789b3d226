"""One prepared accelerator check of hqjax: at most 8 minutes on one H100, one command.

Usage (on the GPU image: JAX with CUDA, PyTorch, Triton, Flax, Optax, Chex; no network)::

    pip install --no-index --no-deps --find-links wheels/ -r benchmarks/device_wheels.txt
    pip install --no-index --no-deps --find-links wheels/ -e .
    python benchmarks/device_check.py --out device_check_out

    python benchmarks/device_check.py --out /tmp/dc --smoke   # CPU: same code paths, < 2 min

Sections, each in its own process under a time limit (a crash, a hang or a kernel that does
not lower is recorded and the next section runs):

1. ``matmul``: Pallas int8 and packed-int4 products equal XLA's int8 ``dot_general`` exactly
   (int8, uint8 and int4 activations/weights, ragged shapes), then TOPS at 4096^3, a
   ResNet-20 im2col product, a BERT-base product and a memory-bound decode product against
   XLA int8 and bf16 ``jnp.dot``, and a sweep of Triton tiles at 4096^3 whose fastest is
   written as ``proposed_default`` (to be entered in ``kernels/tiles.py``).
2. ``requant``: the fused dyadic-requant epilogue against the unfused product + requant,
   exact, then timed.
3. ``curvature``: exact per-layer Gauss-Newton traces on the device loop with each chunk's
   backward passes in one vmap or one at a time (ResNet-20 and ``user_mobilenet.py``: which
   the accelerator default should be); gradient, HVP, Hutchinson trace, top eigenvalue and SLQ density of
   ResNet-20 and a small encoder, hqjax against PyTorch + PyHessian on the same device,
   same weights and probe (``curvature_vs_pyhessian.py``); the torch side is skipped with a
   note when ``--torch-python`` cannot import torch and pyhessian.
4. ``run``: wall time of the whole ``hqjax run --model resnet20`` on a short schedule (the
   smoke run uses the small CNN). It needs OR-Tools and scikit-learn (allocation, the
   digits data), which travel as wheels; without them it is recorded as failed.

Goals (issue 21, H100): Pallas int8 >= 0.8x XLA int8 and >= 1.6x bf16 at 4096^3; packed
int4 at least as fast as int8 with half the weight bytes; hqjax HVP and trace >= 1.5x
PyHessian. Writes ``DIR/device_check.json`` (everything, failures and skips included) and
``DIR/device_check.md`` (the tables). In ``--smoke`` mode Pallas runs in interpret mode, the
curvature rows use the MLP (trace only) and the job the small CNN, and no goal is judged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _device_sections as S  # noqa: E402 - a sibling module of this script

# Seconds per section; time a section leaves unused passes to the next. Full: 450 s of
# sections plus process start-up stays under 8 minutes.
BUDGET = {"matmul": 130, "requant": 40, "curvature": 190, "run": 90}
SMOKE_BUDGET = {"matmul": 30, "requant": 15, "curvature": 45, "run": 25}


def _section_main(args) -> int:
    """Child process: run one section and write ``DIR/sections/NAME.json``."""
    cfg = S.SMOKE if args.smoke else S.FULL
    path = os.path.join(args.out, "sections", f"{args.section}.json")
    state, item, save = S.make_record(path, args.section, args.deadline)
    if args.section != "run":  # the job's own process must find the GPU's memory free
        state["device"] = S.device_info()
    save()
    try:
        if args.section == "matmul":
            S.matmul_section(state, item, cfg)
        elif args.section == "requant":
            S.requant_section(state, item, cfg)
        elif args.section == "curvature":
            S.curvature_section(state, item, cfg, args.torch_python)
        else:
            S.run_section(state, item, cfg, args.deadline)
        state["status"] = "ok" if all(i["status"] == "ok" for i in state["items"]) else "partial"
    except Exception as e:  # noqa: BLE001 - recorded; the parent goes on with other sections
        state["status"], state["error"] = "error", f"{type(e).__name__}: {e}"[:2000]
    save()
    return 0


def _run_child(args, name: str, limit: float) -> dict:
    """Run section ``name`` in a fresh process for at most ``limit`` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--section", name,
           "--deadline", str(time.time() + limit - 3), "--torch-python", args.torch_python]
    cmd += ["--smoke"] if args.smoke else []
    env = dict(os.environ)
    if name == "curvature":  # JAX takes 75% of GPU memory by default; leave half to PyTorch
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # its own group: a timeout ends its children too
    try:
        _, err = p.communicate(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        timed_out = True
    wall = time.perf_counter() - t0
    path = os.path.join(args.out, "sections", f"{name}.json")
    rec = {"section": name, "items": [], "notes": [], "goals": []}
    if os.path.isfile(path):
        with open(path) as fh:
            rec = json.load(fh)
    if timed_out:
        rec["status"] = "timeout"
        rec["error"] = f"stopped at its time limit of {limit:.0f} s; items so far are kept"
    elif p.returncode or "status" not in rec or rec["status"] == "running":
        rec["status"] = "error"
        rec.setdefault("error", f"section process exited {p.returncode}")
    if rec["status"] in ("error", "timeout"):
        rec["stderr_tail"] = (err or "")[-3000:]
    rec.update(wall_s=wall, limit_s=limit)
    return rec


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(report: dict) -> str:
    """The tables of ``report`` (the JSON written next to it)."""
    dev = report.get("device") or {}
    smoke = report["smoke"]
    out = [f"# hqjax device check{' (smoke: CPU, Pallas interpreted, timings meaningless)' if smoke else ''}",
           "", f"Device: {dev.get('device_kind', '?')} ({dev.get('platform', '?')}), jax "
           f"{dev.get('jax', '?')}; {report['started']}; wall {report['wall_s']:.0f} s of a "
           f"{report['budget_s']} s budget.", "",
           "| section | status | wall (s) | limit (s) |", "|---|---|---:|---:|"]
    secs = report["sections"]
    out += [f"| {n} | {r['status']} | {r.get('wall_s', 0):.0f} | {r.get('limit_s', 0):.0f} |"
            for n, r in secs.items()]
    m = secs.get("matmul", {})
    rows = [i for i in m.get("items", []) if i["name"].startswith("throughput") and i["status"] == "ok"]
    if rows:
        labels = list(rows[0]["tops"])
        out += ["", "## Integer matmul (TOPS; exact against XLA's int8 dot)", "",
                "| shape | M | K | N | " + " | ".join(labels) + " |",
                "|---|---:|---:|---:|" + "---:|" * len(labels)]
        for i in rows:
            mm, k, n = i["shape"]
            out.append(f"| {i['name'][11:]} | {mm} | {k} | {n} | "
                       + " | ".join(_fmt(i["tops"][lb], ".3f") for lb in labels) + " |")
    sweep = [i for i in m.get("items", []) if i["name"].startswith("sweep")]
    if sweep:
        size = sweep[0]["name"].split(" at ")[1].split()[0]
        out += ["", f"## {m.get('backend', 'triton').capitalize()} tile sweep (int8, {size}, exact against XLA)", "",
                "| block_m | block_n | block_k | warps | stages | ms | TOPS |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sweep:
            cells = r["name"].rsplit(" ", 1)[1].split("/") + ["", ""]
            out.append("| " + " | ".join(cells[:5]) + f" | {_fmt(r.get('ms'), '.3f')} | "
                       + (_fmt(r["tops"], ".3f") if "tops" in r else f"{r['status']}: {r.get('error') or r.get('reason', '')}"[:120])
                       + " |")
        if m.get("proposed_default"):
            pdf = m["proposed_default"]
            out += ["", f"Proposed default for {pdf['device_kind']} ({'measured' if pdf['measured'] else 'interpret mode: not a measurement'}): "
                    f"`{pdf['blocks']}` -> {pdf['where']}."]
    rq = [i for i in secs.get("requant", {}).get("items", []) if i["status"] == "ok"]
    if rq:
        out += ["", "## Fused requant epilogue (ms; exact against XLA)", "",
                "| shape | out | fused | unfused | XLA | fused speed-up |", "|---|---|---:|---:|---:|---:|"]
        for i in rq:
            for kind in ("int8", "uint8 clip(0,15)"):
                d = i[kind]
                out.append(f"| {i['name'][8:]} {tuple(i['shape'])} | {kind} | {d['fused']['ms']:.3f} | "
                           f"{d['unfused']['ms']:.3f} | {d['xla']['ms']:.3f} | {d['fused_speedup']:.2f}x |")
    cv = secs.get("curvature", {})
    rows = [i for i in cv.get("items", []) if i["name"].startswith("per-example") and i["status"] == "ok"]
    if rows:
        out += ["", "## Per-example Gauss-Newton traces on the device loop (s; first call includes compilation)", "",
                "| model | batch | one vmap | first | one pass at a time | first |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {i['name'][21:]} | {i['batch']} | {i['one vmap']['s']:.3f} | {i['one vmap']['first_s']:.1f} | "
                f"{i['one pass at a time']['s']:.3f} | {i['one pass at a time']['first_s']:.1f} |" for i in rows]
    for i in cv.get("items", []):
        if i["status"] != "ok" or i["name"].startswith("per-example"):
            continue
        if "table" in i:
            out += [""] + [ln.replace("### ", "## Curvature: ") for ln in i["table"]]
            out += ["", "Agreement: " + json.dumps(i["agreement"], default=float)]
        else:
            out += ["", f"## {i['name']} (hqjax only; PyTorch side skipped)", "",
                    "| row | hqjax (ms) |", "|---|---:|"]
            out += [f"| {k} | {1e3 * v:,.2f} |" for k, v in i["hqjax"].items()]
    for i in secs.get("run", {}).get("items", []):
        if i["status"] == "ok":
            out += ["", "## The whole job", "", f"`{i['command']}`: {i['wall_s_job']:.1f} s wall."]
    goals = report["goals"]
    if goals:
        out += ["", "## Goals", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
        out += [f"| {g['goal']} | {_fmt(g['value'])} | {g['target']} | "
                f"{'not judged' if g['met'] is None else 'yes' if g['met'] else 'NO'} |" for g in goals]
    problems = [(n, i) for n, r in secs.items() for i in r.get("items", []) if i["status"] != "ok"]
    notes = [(n, x) for n, r in secs.items() for x in r.get("notes", [])]
    notes += [(n, f"{r['status']}: {r.get('error', '')}") for n, r in secs.items()
              if r["status"] in ("error", "timeout", "skipped")]
    if problems or notes:
        out += ["", "## Failures, skips and notes", ""]
        out += [f"- {n} / {i['name']}: {i['status']}: {i.get('error') or i.get('reason', '')}"
                for n, i in problems]
        out += [f"- {n}: {x}" for n, x in notes]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for device_check.json and device_check.md")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the same code paths at tiny sizes, Pallas in interpret mode")
    ap.add_argument("--sections", default=",".join(S.SECTIONS),
                    help=f"comma-separated subset of {','.join(S.SECTIONS)}")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="interpreter with torch and pyhessian for the curvature comparison")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every section's time limit (e.g. 3 on a shared, slow machine)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        return _section_main(args)
    if not args.budget_scale > 0:
        print(f"device_check: error: --budget-scale {args.budget_scale}; use a positive number",
              file=sys.stderr)
        return 2
    names = [s for s in args.sections.split(",") if s]
    bad = [s for s in names if s not in S.SECTIONS]
    if bad or not names:
        print(f"device_check: error: unknown section(s) {bad}; choose from {','.join(S.SECTIONS)}",
              file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "sections"), exist_ok=True)
    budget = {n: t * args.budget_scale for n, t in (SMOKE_BUDGET if args.smoke else BUDGET).items()}
    total = sum(budget[n] for n in names)
    start, carry, secs = time.time(), 0.0, {}
    for n in names:
        left = total - (time.time() - start)
        limit = min(budget[n] + carry, left)
        if limit < 5:
            secs[n] = {"section": n, "status": "skipped", "items": [], "notes": [], "goals": [],
                       "error": "no time left in the check's budget"}
            continue
        print(f"[device_check] {n}: up to {limit:.0f} s", flush=True)
        secs[n] = _run_child(args, n, limit)
        carry = max(0.0, limit - secs[n]["wall_s"])
        print(f"[device_check] {n}: {secs[n]['status']} in {secs[n]['wall_s']:.0f} s", flush=True)
    device = next((r["device"] for r in secs.values() if r.get("device")), None)
    report = {"check": "hqjax device_check", "smoke": args.smoke, "device": device,
              "started": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(timespec="seconds"),
              "wall_s": time.time() - start, "budget_s": total, "sections": secs,
              "proposed_default": secs.get("matmul", {}).get("proposed_default"),
              "goals": [g for r in secs.values() for g in r.get("goals", [])]}
    with open(os.path.join(args.out, "device_check.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    md = markdown(report)
    with open(os.path.join(args.out, "device_check.md"), "w") as fh:
        fh.write(md)
    print(md)
    failed = [n for n, r in secs.items() if r["status"] != "ok"]
    print(f"KEY: device check on {device and device['device_kind']}: "
          f"{len(names) - len(failed)}/{len(names)} sections ok"
          + (f"; not ok: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

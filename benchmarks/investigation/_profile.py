"""Per-op device time of a jitted call from a ``jax.profiler`` trace (XLA:CPU thunks).

``op_times(f, *args)`` runs ``f`` once to compile, then ``repeats`` times under the profiler
and returns ``{op name: ms per call}``, op names with XLA's ``.N`` suffixes stripped so the
copies of one kind of op (``ynn_fusion.3``, ``ynn_fusion.7``) add up under one name.
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax


def op_times(f, *args, repeats=5, by_kind=True):
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(f(*args))
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as fh:
            events = json.load(fh)["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if "Host" not in pids.get(e["pid"], "Host") and "CPU" not in pids.get(e["pid"], ""):
            continue
        name = e["name"]
        if not re.match(r"^[\w\-]+(\.\d+)?$", name) or name.startswith(("Pjit", "Thunk", "PjRt")):
            continue
        if by_kind:
            name = re.sub(r"\.\d+$", "", name)
        totals[name] += e["dur"] / 1e3 / repeats
    return dict(totals)


def print_op_times(times, top=25):
    total = sum(times.values())
    print(f"{'op':48s} {'ms/call':>9s} {'share':>6s}")
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name:48s} {ms:9.2f} {ms / total:6.1%}")
    print(f"{'total of listed thunks':48s} {total:9.2f}")

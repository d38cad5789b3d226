"""PyTorch / PyHessian side of ``hawq_task.py``: PyHessian's per-layer trace loop (runs in a separate venv).

Rebuilds the network with ``_pyhessian_side.py``'s models and weight loading, then for each
layer lets only that layer's parameters require a gradient (so autograd prunes the backward
pass below it, as HAWQ's PyHessian scripts do), builds PyHessian's cached gradient graph and
runs Rademacher Hutchinson probes through ``pyhessian.utils.hessian_vector_product`` until
the standard error of the running mean is at most ``rtol`` of it (after ``min_probes``), or
``max_probes``. Writes a JSON with per-layer trace, standard error, probes and seconds.

Usage (called by the JAX side): ``/work/torchvenv/bin/python _pyhessian_layers.py IN.npz OUT.json``
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pyhessian_side import build, load  # noqa: E402  (same folder, same venv)
from pyhessian import hessian as PyHessian  # noqa: E402
from pyhessian.utils import group_product, hessian_vector_product  # noqa: E402


def layer_trace(model, crit, x, y, wanted, rtol, min_probes, max_probes, gen):
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in wanted)
    t0 = time.perf_counter()
    H = PyHessian(model, crit, data=(x, y), cuda=False)
    vals = []
    while len(vals) < max_probes:
        v = [torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1 for p in H.params]
        hv = hessian_vector_product(H.gradsH, H.params, v)
        vals.append(float(group_product(hv, v)))
        n = len(vals)
        if n >= min_probes:
            mean, sd = float(np.mean(vals)), float(np.std(vals, ddof=1))
            if sd / math.sqrt(n) <= rtol * abs(mean):
                break
    n = len(vals)
    return {"trace": float(np.mean(vals)), "stderr": float(np.std(vals, ddof=1) / math.sqrt(n)), "num_probes": n,
            "seconds": time.perf_counter() - t0}


def main(inp, out):
    z = np.load(inp)
    cfg = json.loads(str(z["cfg"]))
    torch.set_num_threads(int(cfg["threads"]))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    model = build(cfg).eval()
    names = load(model, z)  # (flax path, to_torch, to_flax) per torch parameter
    x = torch.from_numpy(np.ascontiguousarray(z["x"]))
    if cfg["model"] == "resnet20":
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    y = torch.from_numpy(z["y"]).long()
    crit = nn.CrossEntropyLoss()
    block_of = {tname: path.rsplit("/", 1)[0] for (tname, _), (path, _, _) in zip(model.named_parameters(), names)}
    res = {"layers": {}, "torch": torch.__version__, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    for block in cfg["blocks"]:
        wanted = {t for t, b in block_of.items() if b == block}
        if not wanted:
            raise ValueError(f"no torch parameter for hqjax block {block!r}")
        res["layers"][block] = layer_trace(model, crit, x, y, wanted, float(cfg["rtol"]), int(cfg["min_probes"]),
                                           int(cfg["max_probes"]), gen)
        print(f"  PyHessian {block}: {res['layers'][block]}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""PyTorch / PyHessian side of ``curvature_vs_pyhessian.py`` (runs in a separate venv).

Not importable from hqjax and not part of CI: torch is not a project dependency. The JAX side
writes an ``.npz`` with the model name, the run settings, the batch, the Flax weights (keys
``p:<flax path>``, ``s:<batch_stats path>``) and a shared probe (``v:<flax path>``); this
script rebuilds the same network in PyTorch (Flax HWIO kernels -> OIHW, Dense ``[in, out]``
-> Linear ``[out, in]``, BatchNorm in eval mode), times PyHessian (Yao et al. 2020) on it
and writes a JSON of timings plus an ``.npz`` of loss, gradient and ``H v`` in Flax layout.

Usage (called by the JAX side): ``/work/torchvenv/bin/python _pyhessian_side.py IN.npz OUT``.
The settings may name ``"device": "cuda"`` (``device_check.py`` on a GPU): the model, batch
and probe then live on the GPU and every timed call ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyhessian import hessian as PyHessian
from pyhessian.utils import group_product, hessian_vector_product


def _eig_compat(T, eigenvectors=True):
    """``torch.eig`` (removed in torch 2.x) for PyHessian's symmetric tridiagonal ``T``."""
    vals, vecs = torch.linalg.eigh(T)
    return torch.stack([vals, torch.zeros_like(vals)], 1), vecs


torch.eig = _eig_compat  # PyHessian.density() calls torch.eig; patched here, not in site-packages


# ---- models, mirroring hqjax.models and the benchmark's encoder, module names = Flax paths ----
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.stride, self.cout = stride, cout

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.stride != 1 or x.shape[1] != self.cout:  # option-A shortcut, as in models/resnet.py
            x = x[:, :, :: self.stride, :: self.stride]
            pad = self.cout - x.shape[1]
            x = F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        return F.relu(x + y)


class ResNet20(nn.Module):
    def __init__(self, num_classes=10, width=16, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width, eps=1e-5)
        self.blocks = []
        cin = width
        for s in range(3):
            for b in range(n):
                cout, stride = width * 2**s, (2 if (s > 0 and b == 0) else 1)
                blk = BasicBlock(cin, cout, stride)
                self.add_module(f"stage{s + 1}/block{b}", blk)
                self.blocks.append(blk)
                cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            lin = nn.Linear(a, b)
            self.add_module(f"Dense_{i}", lin)
            self.layers.append(lin)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        for lin in self.layers[:-1]:
            x = torch.tanh(lin(x))
        return self.layers[-1](x)


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.ffn1, self.ffn2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.heads = heads

    def forward(self, x):
        B, S, D = x.shape
        h = self.heads
        split = lambda t: t.reshape(B, S, h, D // h).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // h), -1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(B, S, D)))
        return self.ln2(x + self.ffn2(F.gelu(self.ffn1(x), approximate="tanh")))


class Encoder(nn.Module):
    def __init__(self, vocab, seq, d, heads, ffn, layers, num_classes):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.zeros(seq, d))
        self.emb_ln = nn.LayerNorm(d, eps=1e-6)
        self.layers = []
        for i in range(layers):
            lyr = EncoderLayer(d, heads, ffn)
            self.add_module(f"layer{i}", lyr)
            self.layers.append(lyr)
        self.head = nn.Linear(d, num_classes)

    def forward(self, tokens):
        x = self.emb_ln(self.tok_emb(tokens) + self.pos_emb)
        for lyr in self.layers:
            x = lyr(x)
        return self.head(x.mean(1))


def build(cfg):
    if cfg["model"] == "resnet20":
        return ResNet20(cfg.get("num_classes", 10))
    if cfg["model"] == "mlp":
        return MLP(cfg["sizes"])
    if cfg["model"] == "encoder":
        e = cfg["encoder"]
        return Encoder(e["vocab"], e["seq"], e["d"], e["heads"], e["ffn"], e["layers"], cfg.get("num_classes", 10))
    raise ValueError(f"unknown model {cfg['model']!r}")


# ---- Flax <-> torch layout -------------------------------------------------------------------
def flax_names(model):
    """``{torch parameter name: (flax path, to_torch, to_flax)}`` for every parameter and buffer."""
    out = {}
    for mname, mod in model.named_modules():
        base = mname.replace(".", "/")
        pre = (base + "/") if base else ""
        if isinstance(mod, nn.Conv2d):
            out[mname + ".weight"] = (pre + "kernel", lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
        elif isinstance(mod, nn.Linear):
            out[mname + ".weight"] = (pre + "kernel", lambda a: a.T, lambda a: a.T)
            out[mname + ".bias"] = (pre + "bias", None, None)
        elif isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
            out[mname + ".weight"] = (pre + "scale", None, None)
            out[mname + ".bias"] = (pre + "bias", None, None)
            if isinstance(mod, nn.BatchNorm2d):
                out[mname + ".running_mean"] = (pre + "mean", None, None)
                out[mname + ".running_var"] = (pre + "var", None, None)
        elif isinstance(mod, nn.Embedding):
            out[mname + ".weight"] = (pre + "embedding", None, None)
    for pname, _ in model.named_parameters(recurse=False):
        out[pname] = (pname, None, None)
    return {k.lstrip("."): v for k, v in out.items()}


def load(model, z):
    names = flax_names(model)
    state = {}
    for tname, t in list(model.named_parameters()) + list(model.named_buffers()):
        if tname.endswith("num_batches_tracked"):
            continue
        path, to_t, _ = names[tname]
        prefix = "s:" if tname.endswith(("running_mean", "running_var")) else "p:"
        a = z[prefix + path]
        a = to_t(a) if to_t else a
        if tuple(a.shape) != tuple(t.shape):
            raise ValueError(f"{tname} <- {path}: shape {a.shape} != {tuple(t.shape)}")
        state[tname] = torch.from_numpy(np.ascontiguousarray(a))
    model.load_state_dict(state, strict=False)
    return [names[n] for n, _ in model.named_parameters()]


# ---- timing ----------------------------------------------------------------------------------
def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats, sync=lambda: None):
    """``sync`` waits for queued GPU work, so each sample covers the whole computation."""
    ts, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return out, ts


def main(inp, out_prefix):
    z = np.load(inp)
    cfg = json.loads(str(z["cfg"]))
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg.get("seed", 0)))
    dev = torch.device(cfg.get("device", "cpu"))  # "cuda": device_check.py on a GPU
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timed_ = lambda fn, repeats: timed(fn, repeats, sync)  # noqa: E731
    if cuda:  # device_check.py compares float32 without TF32 on both sides by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32", False))
    model = build(cfg).eval()
    names = load(model, z)
    model = model.to(dev)
    params = [p for p in model.parameters()]
    x = torch.from_numpy(np.ascontiguousarray(z["x"]))
    if cfg["model"] == "resnet20":
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    x = x.to(dev)
    y = torch.from_numpy(z["y"]).long().to(dev)
    crit = nn.CrossEntropyLoss()
    R, E = int(cfg["repeats"]), int(cfg["estimator_repeats"])
    res = {"times": {}, "values": {}, "peak_rss_mb": {}, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    T, V, M = res["times"], res["values"], res["peak_rss_mb"]

    with torch.no_grad():
        _, T["forward"] = timed_(lambda: crit(model(x), y), R)
    M["forward"] = peak_rss_mb()

    def grad():
        loss = crit(model(x), y)
        return loss, torch.autograd.grad(loss, params)

    (loss, g), T["gradient"] = timed_(grad, R)
    M["gradient"] = peak_rss_mb()
    V["loss"] = float(loss.detach())
    V["grad_norm"] = float(torch.sqrt(sum((gi * gi).sum() for gi in g)))

    # PyHessian caches the graph of the gradient once (forward + backward(create_graph=True));
    # every HVP is then one backward pass through that graph.
    sync()
    t0 = time.perf_counter()
    H = PyHessian(model, crit, data=(x, y), cuda=cuda)
    sync()
    T["hvp_setup"] = [time.perf_counter() - t0]
    v = [torch.from_numpy(np.ascontiguousarray((to_t(z["v:" + path]) if to_t else z["v:" + path]))).to(dev)
         for path, to_t, _ in names]
    hv, T["hvp"] = timed_(lambda: hessian_vector_product(H.gradsH, H.params, v), R)
    M["hvp"] = peak_rss_mb()
    V["vHv"] = float(group_product(hv, v))
    arrays = {"loss": np.float32(V["loss"])}
    for (path, _, to_f), gi, hi in zip(names, g, hv):
        gi, hi = gi.detach().cpu().numpy(), hi.detach().cpu().numpy()
        arrays["g:" + path] = to_f(gi) if to_f else gi
        arrays["hv:" + path] = to_f(hi) if to_f else hi
    np.savez(out_prefix + ".npz", **arrays)

    n_probes, n_iters, n_steps = int(cfg["num_probes"]), int(cfg["eig_iters"]), int(cfg["density_steps"])
    if n_probes:
        # tol=-inf: PyHessian's stopping rule divides by the signed running mean; a fixed count is comparable
        tr, T["trace"] = timed_(lambda: H.trace(maxIter=n_probes, tol=float("-inf")), E)
        V["trace"], V["trace_probes"] = float(np.mean(tr)), len(tr)
        M["trace"] = peak_rss_mb()
    if n_iters:
        (ev, _), T["top_eigenvalue"] = timed_(lambda: H.eigenvalues(maxIter=n_iters, tol=float("-inf"), top_n=1), E)
        V["top_eigenvalue"] = float(ev[0])
        M["top_eigenvalue"] = peak_rss_mb()
    if n_steps:
        (nodes, weights), T["density"] = timed_(lambda: H.density(iter=n_steps, n_v=1), E)
        V["density_max_node"] = float(np.max(nodes[0]))
        M["density"] = peak_rss_mb()
    with open(out_prefix + ".json", "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

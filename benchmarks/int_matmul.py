"""Integer matmul throughput: Pallas kernels vs XLA int8 dot_general vs bf16/f32 matmul.

Usage::

    python benchmarks/int_matmul.py                       # sizes per platform, 5 runs each
    python benchmarks/int_matmul.py --sizes 1024 4096 --reps 9
    python benchmarks/int_matmul.py --check-pallas        # CPU: exercise the GPU/TPU code
                                                          # path in interpret mode (no timing)

Prints, for square sizes and for the GEMMs of ResNet-20 (CIFAR, batch 128, convolutions as
im2col products) and of a BERT-base encoder (8 x 128 tokens), the median time and TOPS
(2*M*N*K / t) of: XLA int8 ``dot_general`` with int32 accumulation, bf16 and f32 matmul,
and on a GPU/TPU the Pallas int8 kernel, the Pallas int4-weight kernel and the int8 kernel
with the fused requant epilogue. Compile time is reported separately. Pallas outputs are
checked equal to XLA's before they are timed.

On the CPU, Pallas runs only in interpret mode, a correctness tool, so only XLA timings are
taken there. On a GPU the goal checks of issue 6 are printed: Pallas int8 >= 80% of XLA int8
at 4096^3 and >= 1.6x bf16, and the int4-weight kernel faster than int8 at small M.
The last line is the key figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import hqjax.kernels as K

RESNET20 = [  # (name, M, K, N): 3x3 convs as im2col GEMMs at batch 128, and the classifier
    ("resnet20 stage1 conv 32x32x16", 128 * 32 * 32, 9 * 16, 16),
    ("resnet20 stage2 conv 16x16x32", 128 * 16 * 16, 9 * 32, 32),
    ("resnet20 stage3 conv 8x8x64", 128 * 8 * 8, 9 * 64, 64),
    ("resnet20 fc", 128, 64, 10),
]
BERT = [  # BERT-base encoder layer at batch 8 x seq 128 (Q-BERT's setting)
    ("bert qkv", 1024, 768, 3 * 768),
    ("bert attn out", 1024, 768, 768),
    ("bert ffn in", 1024, 768, 3072),
    ("bert ffn out", 1024, 3072, 768),
]
MEMORY_BOUND = [("decode m=1", 1, 8192, 8192), ("decode m=16", 16, 8192, 8192)]
RESNET20_CONVS = [  # (name, H, C, O, stride) at batch 128, NHWC
    ("stage1 3x3 16->16", 32, 16, 16, 1),
    ("stage2 3x3 16->32 /2", 32, 16, 32, 2),
    ("stage2 3x3 32->32", 16, 32, 32, 1),
    ("stage3 3x3 64->64", 8, 64, 64, 1),
]


def timed(fn, *args, reps: int):
    """(compile seconds, median run seconds, output) of ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    t_compile = time.perf_counter() - t0
    out = compiled(*args)
    jax.block_until_ready(out)  # one warm-up run
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return t_compile, statistics.median(runs), out


def operands(m, k, n, seed=0):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.integers(-128, 128, (m, k)), jnp.int8)
    b = jnp.asarray(r.integers(-128, 128, (k, n)), jnp.int8)
    w4 = jnp.asarray(r.integers(-8, 8, (k, n)), jnp.int8)
    return a, b, w4


def candidates(pallas: str | None, interpret: bool, blocks, k: int, n: int):
    """name -> (fn, args-maker) of everything timed for one shape."""
    xla_i8 = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),  # noqa: E731
                                          preferred_element_type=jnp.int32)
    c = {
        "xla int8": (xla_i8, lambda a, b, w4: (a, b)),
        "bf16": (jnp.matmul, lambda a, b, w4: (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))),
        "f32": (jnp.matmul, lambda a, b, w4: (a.astype(jnp.float32), b.astype(jnp.float32))),
    }
    if pallas:
        kw = dict(backend=pallas, interpret=interpret, blocks=blocks)
        rq = K.requant_from_scale(np.full(n, 1.0 / (128 * 128 * np.sqrt(k))), np.zeros(n))
        c[f"{pallas} int8"] = (lambda a, b: K.int_matmul(a, b, **kw), lambda a, b, w4: (a, b))
        c[f"{pallas} int4"] = (lambda a, p: K.int4_matmul(a, p, **kw),
                               lambda a, b, w4: (a, K.pack_int4(w4)))
        c[f"{pallas} int8+requant"] = (lambda a, b: K.int_matmul(a, b, out_scale=rq, **kw),
                                       lambda a, b, w4: (a, b))
        c["xla int8+requant"] = (lambda a, b: K.int_matmul(a, b, out_scale=rq, backend="xla"),
                                 lambda a, b, w4: (a, b))
    return c


def bench_shape(name, m, k, n, pallas, interpret, blocks, reps):
    a, b, w4 = operands(m, k, n)
    rows, ref = {}, {}
    for label, (fn, make) in candidates(pallas, interpret, blocks, k, n).items():
        args = make(a, b, w4)
        t_c, t, out = timed(fn, *args, reps=reps)
        rows[label] = (t_c, t)
        if label.endswith("int8") or label.endswith("int4") or label.endswith("requant"):
            kind = "requant" if label.endswith("requant") else "acc"
            want = ref.setdefault(kind, out)
            if label.endswith("int4"):
                want = K.int_matmul(a, w4, backend="xla")
            if not bool(jnp.array_equal(out, want)):
                raise AssertionError(f"{label} differs from XLA on {name} ({m}x{k}x{n})")
    ops = 2.0 * m * n * k
    for label, (t_c, t) in rows.items():
        tops = "  (interpret)" if interpret and label.startswith(pallas or "-") else \
            f"{ops / t / 1e12:9.3f}"
        print(f"{name:32s} {m:>7d} {k:>6d} {n:>6d}  {label:22s} {t * 1e3:10.3f} {tops:>13s}"
              f" {t_c:9.2f}")
    return {label: ops / t / 1e12 for label, (_, t) in rows.items()}


def bench_conv(reps):
    """ResNet-20 convolutions on the XLA backend: im2col + dot vs XLA's integer conv."""
    print("\n# int_conv2d on the XLA backend (batch 128, NHWC): im2col vs lax.conv, int32 out")
    print(f"{'layer':24s} {'im2col ms':>10s} {'xla_conv ms':>12s} {'f32 conv ms':>12s}")
    r = np.random.default_rng(0)
    totals = {"im2col": 0.0, "xla_conv": 0.0}
    for name, h, c, o, s in RESNET20_CONVS:
        x = jnp.asarray(r.integers(-128, 128, (128, h, h, c)), jnp.int8)
        w = jnp.asarray(r.integers(-128, 128, (3, 3, c, o)), jnp.int8)
        t = {}
        for method in ("im2col", "xla_conv"):
            t[method] = timed(lambda x, w: K.int_conv2d(x, w, strides=s, backend="xla",
                                                        method=method), x, w, reps=reps)[1]
            totals[method] += t[method]
        t_f32 = timed(lambda x, w: lax.conv_general_dilated(
            x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
            x.astype(jnp.float32), w.astype(jnp.float32), reps=reps)[1]
        print(f"{name:24s} {t['im2col'] * 1e3:10.2f} {t['xla_conv'] * 1e3:12.2f} "
              f"{t_f32 * 1e3:12.2f}")
    print(f"{'sum':24s} {totals['im2col'] * 1e3:10.2f} {totals['xla_conv'] * 1e3:12.2f}")
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=None,
                   help="square sizes (default 1024..8192 on GPU/TPU, 1024..4096 on CPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--blocks", type=int, nargs=3, default=None, metavar=("BM", "BN", "BK"))
    p.add_argument("--no-models", action="store_true", help="square sizes only")
    p.add_argument("--conv-only", action="store_true", help="only the convolution comparison")
    p.add_argument("--check-pallas", action="store_true",
                   help="run the Pallas path in interpret mode on tiny shapes (CPU code check)")
    args = p.parse_args(argv)

    platform = jax.default_backend()
    if args.conv_only:
        conv = bench_conv(args.reps)
        print(f"KEY: conv method faster on {platform} over ResNet-20: {min(conv, key=conv.get)} "
              f"({conv['im2col'] / conv['xla_conv']:.2f}x im2col/xla_conv time)")
        return
    pallas = K.default_backend() if K.default_backend() != "xla" else None
    interpret = False
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if pallas else [1024, 2048, 4096])
    shapes = [] if args.no_models else RESNET20 + BERT + MEMORY_BOUND
    if args.check_pallas and not pallas:
        pallas, interpret = "triton", True
        sizes, shapes, args.reps = [64], [("tiny", 40, 100, 70), ("decode m=1", 1, 64, 64)], 1
    blocks = None
    if args.blocks and pallas:
        cls = K.TritonBlocks if pallas == "triton" else K.MosaicBlocks
        blocks = cls(*args.blocks)
    print(f"# platform: {platform} ({jax.devices()[0].device_kind}); jax {jax.__version__}; "
          f"pallas backend: {pallas or 'none (interpret mode only: correctness tool, not timed)'}"
          f"; medians of {args.reps} runs")
    print(f"{'shape':32s} {'M':>7s} {'K':>6s} {'N':>6s}  {'implementation':22s} {'ms':>10s} "
          f"{'TOPS':>13s} {'compile s':>9s}")
    square = {n: bench_shape(f"square {n}", n, n, n, pallas, interpret, blocks, args.reps)
              for n in sizes}
    model = {nm: bench_shape(nm, m, k, n, pallas, interpret, blocks, args.reps)
             for nm, m, k, n in shapes}
    if not interpret:
        conv = bench_conv(args.reps)
        print(f"conv method faster on {platform} over ResNet-20: "
              f"{min(conv, key=conv.get)} ({conv['im2col'] / conv['xla_conv']:.2f}x "
              f"im2col/xla_conv time)")

    key = 4096 if 4096 in square else max(square)
    s = square[key]
    if pallas == "triton" and (platform == "gpu" or interpret):
        if interpret:
            print("\n# (interpret mode: the goal lines below only check the report code)")
        ratio_xla = s["triton int8"] / s["xla int8"]
        ratio_bf16 = s["triton int8"] / s["bf16"]
        print(f"\n# goals (H100): triton int8 at {key}^3 = {ratio_xla:.2f}x XLA int8 "
              f"(goal >= 0.80: {'MET' if ratio_xla >= 0.8 else 'NOT MET'}), "
              f"{ratio_bf16:.2f}x bf16 (goal >= 1.6: {'MET' if ratio_bf16 >= 1.6 else 'NOT MET'})")
        for nm in [x[0] for x in MEMORY_BOUND if x[0] in model]:
            r = model[nm]["triton int4"] / model[nm]["triton int8"]
            print(f"# goals: int4-weight vs int8 at {nm}: {r:.2f}x "
                  f"({'MET' if r > 1 else 'NOT MET'})")
        if interpret:
            print("KEY: Pallas code path checked in interpret mode (outputs equal XLA); "
                  "no timings")
            return
        print(f"KEY: triton int8 {s['triton int8']:.1f} TOPS at {key}^3 = {ratio_xla:.2f}x XLA "
              f"int8 ({s['xla int8']:.1f}), {ratio_bf16:.2f}x bf16 ({s['bf16']:.1f})")
    elif pallas and not interpret:
        print(f"KEY: {pallas} int8 {s[f'{pallas} int8']:.1f} TOPS at {key}^3, XLA int8 "
              f"{s['xla int8']:.1f}, bf16 {s['bf16']:.1f}")
    else:
        print(f"KEY: {platform}: XLA int8 dot_general {s['xla int8']:.3f} TOPS at {key}^3 "
              f"(bf16 {s['bf16']:.3f}, f32 {s['f32']:.3f}); Pallas GPU/TPU throughput not "
              "measured (no accelerator; interpret mode is a correctness tool)")


if __name__ == "__main__":
    main()

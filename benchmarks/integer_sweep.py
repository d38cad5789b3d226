"""Integer-only models of a sweep: how many compilations, and what each call costs.

An ablation or a random search converts many configurations of one network to integer-only
models and evaluates each once. ``IntegerModel.forward`` is compiled per program, so the
figure that matters is how many distinct programs the configurations make. This script
converts the same configurations of ResNet-20 (initialized weights, first and last layer at
8 bits, min/max calibration on 256 MNIST-subset images) two ways, side by side in one run:

- ``lean``: ``hqjax.to_integer``'s default, the fewest steps for each configuration;
- ``shared``: ``share_program=True``, both branches of every residual add rescaled, so the
  program does not depend on the configuration.

Per configuration it reports the first call (compilation included when the program is new)
and the median of ``--repeats`` later calls, on ``--examples`` test images, with the number
of new compilations of the forward. The last line is the headline figure.

How to run::

    python benchmarks/integer_sweep.py            # ResNet-20, five configurations
    python benchmarks/integer_sweep.py --quick    # the small CNN, three configurations
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

CONFIGS = [(8, 8), (4, 4), (3, 4), (2, 8), (4, 8)]  # (weight bits, activation bits) of the inner layers


def _configurations(names, configs):
    inner = lambda i: 0 < i < len(names) - 1  # noqa: E731
    return [{n: {"weight_bits": w if inner(i) else 8, "act_bits": a if inner(i) else 8} for i, n in enumerate(names)}
            for w, a in configs]


def run(model_name: str, configs, examples: int, repeats: int) -> list[dict]:
    import jax
    import numpy as np

    import hqjax
    from hqjax.data import load_dataset
    from hqjax.models import get_model
    from hqjax.quant import integer

    data = load_dataset("mnist_subset")
    model = get_model(model_name, num_classes=data.num_classes)
    variables = model.init(jax.random.key(0), data.x_train[:2], train=False)
    cfgs = _configurations(hqjax.blocks(variables["params"]).names, configs)
    x = data.x_test[:examples]
    rows = []
    for mode in ("lean", "shared"):
        integer._forward.clear_cache()  # each mode from a cold cache: the same program is not reused across them
        for (w, a), cfg in zip(configs, cfgs):
            qmodel = hqjax.quantize_model(model, cfg)
            calibrated = jax.jit(lambda v, xb: qmodel.calibrate(v, xb, train=False))(variables, data.x_train[:256])
            im = hqjax.to_integer(qmodel, calibrated, data.input_shape, pack_int4=False,
                                  share_program=mode == "shared")
            before = integer._forward._cache_size()
            t0 = time.perf_counter()
            np.asarray(im(x))
            first = time.perf_counter() - t0
            compiled = integer._forward._cache_size() - before
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                np.asarray(im(x))
                times.append(time.perf_counter() - t0)
            rows.append({"mode": mode, "config": f"W{w}A{a}", "compiled": compiled, "first_s": first,
                         "median_s": statistics.median(times), "steps": len(im.meta["program"])})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small CNN, three configurations, few images")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model, configs = ("cnn", CONFIGS[:3]) if args.quick else ("resnet20", CONFIGS)
    examples = min(args.examples, 64) if args.quick else args.examples
    rows = run(model, configs, examples, args.repeats)
    print(f"{model}, {examples} images, {platform.processor() or platform.machine()}")
    print("| program | config | steps | new compilations | first call (s) | median call (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['config']} | {r['steps']} | {r['compiled']} | {r['first_s']:.2f} | "
              f"{r['median_s']:.3f} |")
    total = {m: sum(r["first_s"] + r["median_s"] for r in rows if r["mode"] == m) for m in ("lean", "shared")}
    n = {m: sum(r["compiled"] for r in rows if r["mode"] == m) for m in ("lean", "shared")}
    med = {m: statistics.median(r["median_s"] for r in rows if r["mode"] == m) for m in ("lean", "shared")}
    print(f"{len(configs)} configurations evaluated twice each: lean {n['lean']} compilations, {total['lean']:.1f} s; "
          f"shared {n['shared']} compilation(s), {total['shared']:.1f} s ({total['lean'] / total['shared']:.2f}x); "
          f"per call {med['shared'] / med['lean']:.2f}x the lean time")


if __name__ == "__main__":
    main()

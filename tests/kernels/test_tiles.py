"""The per-device tiles table the dispatcher reads when no blocks are given."""

import jax.numpy as jnp
import numpy as np

import hqjax.kernels as K
from hqjax.kernels import tiles


def test_lookup_longest_substring_then_fallback():
    table = {"": "any", "H100": "hopper", "H100 80GB": "hopper-80"}
    assert tiles.lookup(table, "NVIDIA H100 80GB HBM3") == "hopper-80"
    assert tiles.lookup(table, "NVIDIA H100 PCIe") == "hopper"
    assert tiles.lookup(table, "NVIDIA A100-SXM4-40GB") == "any"


def test_default_blocks_small_m_keeps_the_kernels_own_rule():
    # M <= 64 hands Triton its default class, which the kernel maps to the small-M tiles
    assert tiles.default_blocks("triton", 16, "NVIDIA H100") == K.TritonBlocks()
    assert tiles.default_blocks("triton", 4096, "cpu") == tiles.TILES["triton"][""]
    assert tiles.default_blocks("mosaic", 8, "TPU v5e") == tiles.TILES["mosaic"][""]
    for backend, table in tiles.TILES.items():
        for blocks in table.values():
            blocks.check()  # every entry is a valid tile for its backend


def test_dispatch_without_blocks_uses_the_table_and_stays_exact():
    r = np.random.default_rng(0)
    a = jnp.asarray(r.integers(-128, 128, (80, 40)), jnp.int8)  # M > 64: the table's entry
    b = jnp.asarray(r.integers(-128, 128, (40, 24)), jnp.int8)
    want = K.int_matmul(a, b, backend="xla")
    got = K.int_matmul(a, b, backend="triton", interpret=True)
    assert bool(jnp.array_equal(got, want))

"""Weight fake-quantization for Flax NNX models, through ``nnx.split`` / ``nnx.merge``.

NNX modules hold their parameters as attributes; splitting gives a ``State`` whose pure-dict
form has the same ``module/kernel`` paths as a Linen params tree, so
:func:`hqjax.quantize_params` applies unchanged. Activation quantizers are Linen-only for now
(they rely on ``nn.intercept_methods``).
"""

from __future__ import annotations

from typing import Mapping

from hqjax.quant.transform import WeightSpecFn, per_channel_weights, quantize_params

__all__ = ["quantize_nnx_state", "quantize_nnx"]


def quantize_nnx_state(params_state, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights):
    """Fake-quantize the kernels of an ``nnx.State`` of parameters (``nnx.split(model, nnx.Param, ...)``).

    Pure and differentiable (straight-through gradient), so it belongs inside a loss:
    ``loss(params) = f(nnx.merge(graphdef, quantize_nnx_state(params, cfg), rest))``.
    """
    import jax
    from flax import nnx

    state = jax.tree.map(lambda x: x, params_state)  # a copy: replace_by_pure_dict mutates in place
    nnx.replace_by_pure_dict(state, quantize_params(nnx.to_pure_dict(params_state), bit_config, weight_spec))
    return state


def quantize_nnx(model, bit_config: Mapping, weight_spec: WeightSpecFn = per_channel_weights):
    """A new NNX model whose configured kernels are fake-quantized (the input model is unchanged)."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, quantize_nnx_state(params, bit_config, weight_spec), rest)

"""hqjax: Hessian-aware mixed-precision quantization in JAX and Flax.

The top level holds what a user calls: curvature operators and estimators
(:mod:`hqjax.curvature`), the layer partition (:mod:`hqjax.tree`), model quantization and
integer-only inference (:mod:`hqjax.quant`) and the sensitivity table and bit allocator
(:mod:`hqjax.alloc`). Lower-level pieces (pytree algebra, quantizers, calibrators, dyadic
arithmetic, cost tables) stay in their sub-packages. The README's "Architecture" section
describes the layout; :mod:`hqjax.kernels.cpu` is an opt-in CPU backend this package never
imports.
"""

from hqjax.alloc import (
    Allocation, InfeasibleBudgetError, LayerCosts, LayerSensitivity, SensitivityTable, allocate, alpha, get_metric,
    layer_shapes, measure_latency_table, metric_names, metric_needs, pareto_frontier, plot_pareto, register_metric,
    save_latency_table, sensitivity_scores, stacked_modules, sensitivity_table, weight_perturbations,
)
from hqjax.curvature import (
    DensityResult, EigenResult, TraceResult, activation_perturbations, activation_traces, block_top_eigenvalues,
    dataset_loss, density_on_grid, ggn, hessian, hvp, result_from_dict, spectral_density, top_eigenvalues, trace,
    LayerTraceResult, layer_traces, hessian_layer_traces, deflated_layer_traces, ggn_layer_traces,
    empirical_fisher_layer_traces, fisher_layer_traces,
)
from hqjax.quant import (
    IntegerModel, QATState, QuantizedModel, QuantizedNNXModel, bit_width_arrays, coverage, group_wise_weights, init_qat_state,
    load_bit_config, load_integer_model, make_qat_step, per_channel_weights, qat_loss, quantize_model,
    quantize_nnx, quantize_nnx_model, quantize_nnx_state, quantize_params, qwix_rule_specs, save_bit_config,
    save_integer_model, state_variables, to_integer, to_qwix_rules, export_qwix, qwix_apply, uniform_bit_config, validate_bit_config,
    weight_perturbation,
)
from hqjax.tree import Blocks, blocks
from hqjax._nnx import NNXApply, from_nnx
from hqjax.pipeline import run

__version__ = "0.1.0"
__all__ = [
    # curvature
    "hvp", "hessian", "ggn", "dataset_loss", "trace", "top_eigenvalues", "block_top_eigenvalues",
    "spectral_density", "density_on_grid", "activation_traces", "activation_perturbations", "TraceResult",
    "EigenResult", "DensityResult", "result_from_dict",
    "layer_traces", "hessian_layer_traces", "deflated_layer_traces", "ggn_layer_traces", "empirical_fisher_layer_traces",
    "fisher_layer_traces", "LayerTraceResult",
    # layers
    "Blocks", "blocks",
    # your own model
    "run", "from_nnx", "NNXApply",
    # quantization
    "quantize_model", "quantize_params", "QuantizedModel", "quantize_nnx", "quantize_nnx_model",
    "quantize_nnx_state", "QuantizedNNXModel", "coverage", "per_channel_weights", "group_wise_weights",
    "weight_perturbation", "uniform_bit_config", "validate_bit_config", "bit_width_arrays", "save_bit_config",
    "load_bit_config", "init_qat_state", "make_qat_step", "qat_loss", "QATState", "state_variables", "to_integer", "IntegerModel",
    "save_integer_model", "load_integer_model", "to_qwix_rules", "qwix_rule_specs", "export_qwix", "qwix_apply",
    # allocation
    "sensitivity_table", "SensitivityTable", "LayerSensitivity", "weight_perturbations", "sensitivity_scores",
    "register_metric", "get_metric", "metric_names", "metric_needs", "layer_shapes", "stacked_modules", "LayerCosts",
    "measure_latency_table",
    "save_latency_table", "alpha", "allocate", "Allocation", "InfeasibleBudgetError", "pareto_frontier",
    "plot_pareto",
]

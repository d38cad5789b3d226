"""hqjax.alloc: per-layer costs, sensitivity metrics and the OR-Tools bit allocator.

``costs`` (size, MACs, BOPS, latency per layer and bit width), ``sensitivity`` (the
sensitivity table and the metric registry: HAWQ-V1, V2, V3, Q-BERT and user metrics),
``solve`` (the integer program of HAWQ-V3 Eq. 12 -> BitConfig) and ``pareto`` (HAWQ-V2's
frontier of sensitivity against size or BOPS).
"""

from hqjax.alloc.costs import (
    COST_KINDS, LayerCosts, LayerShape, bit_serial_op, layer_shapes, load_latency_table, stacked_modules,
    measure_latency_table,
    save_latency_table,
)
from hqjax.alloc.sensitivity import (
    LayerSensitivity, SensitivityTable, get_metric, hawq_v1_finetune_order, hawq_v1_order,
    metric_names, metric_needs, register_metric, sensitivity_scores, sensitivity_table, weight_perturbations,
)
from hqjax.alloc.solve import (
    Allocation, Alpha, InfeasibleBudgetError, allocate, alpha,
)
from hqjax.alloc.pareto import (
    ParetoFrontier, pareto_frontier, plot_pareto,
)

__all__ = [
    "COST_KINDS", "LayerCosts", "LayerShape", "layer_shapes", "stacked_modules", "load_latency_table",
    "measure_latency_table", "bit_serial_op", "save_latency_table", "LayerSensitivity", "SensitivityTable",
    "get_metric", "hawq_v1_finetune_order", "hawq_v1_order", "metric_names", "metric_needs", "register_metric",
    "sensitivity_scores", "sensitivity_table", "weight_perturbations", "Allocation", "Alpha",
    "InfeasibleBudgetError", "allocate", "alpha", "ParetoFrontier", "pareto_frontier", "plot_pareto",
]

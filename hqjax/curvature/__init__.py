"""hqjax.curvature: curvature operators over parameter pytrees and estimators that take any of them.

Operators (``hvp``, ``hessian``, ``ggn``, ``dataset_loss``) build ``v -> M v``; estimators
(``trace``, ``top_eigenvalues``, ``spectral_density``, ``activation_traces``) accept any
such matvec. See the README's Curvature section.
"""

from hqjax.curvature.operators import dataset_loss, ggn, hessian, hvp
from hqjax.curvature.results import DensityResult, EigenResult, LayerTraceResult, TraceResult, result_from_dict
from hqjax.curvature.trace import trace
from hqjax.curvature.layer_trace import block_function, layer_traces
from hqjax.curvature.deflated import deflated_layer_traces
from hqjax.curvature.proxies import empirical_fisher_layer_traces, fisher_layer_traces, ggn_layer_traces
from hqjax.curvature.gn_split import hessian_layer_traces
from hqjax.curvature.eigen import block_top_eigenvalues, top_eigenvalues
from hqjax.curvature.density import density_on_grid, spectral_density
from hqjax.curvature.activation import activation_perturbations, activation_traces

__all__ = [
    "hvp",
    "hessian",
    "ggn",
    "dataset_loss",
    "trace",
    "layer_traces",
    "hessian_layer_traces",
    "block_function",
    "deflated_layer_traces",
    "ggn_layer_traces",
    "empirical_fisher_layer_traces",
    "fisher_layer_traces",
    "top_eigenvalues",
    "block_top_eigenvalues",
    "spectral_density",
    "density_on_grid",
    "activation_traces",
    "activation_perturbations",
    "TraceResult",
    "LayerTraceResult",
    "EigenResult",
    "DensityResult",
    "result_from_dict",
]

"""hqjax.alloc: per-layer costs, sensitivity metrics and the OR-Tools bit allocator.

``costs`` (size, MACs, BOPS, latency per layer and bit width), ``sensitivity`` (the
sensitivity table and the metric registry: HAWQ-V1, V2, V3, Q-BERT and user metrics),
``solve`` (the integer program of HAWQ-V3 Eq. 12 -> BitConfig) and ``pareto`` (HAWQ-V2's
frontier of sensitivity against size or BOPS).
"""

from hqjax.alloc.costs import *  # noqa: F401,F403
from hqjax.alloc.costs import __all__ as _costs_all
from hqjax.alloc.sensitivity import *  # noqa: F401,F403
from hqjax.alloc.sensitivity import __all__ as _sensitivity_all
from hqjax.alloc.solve import *  # noqa: F401,F403
from hqjax.alloc.solve import __all__ as _solve_all
from hqjax.alloc.pareto import *  # noqa: F401,F403
from hqjax.alloc.pareto import __all__ as _pareto_all

__all__: list[str] = [*_costs_all, *_sensitivity_all, *_solve_all, *_pareto_all]

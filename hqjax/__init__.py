"""hqjax: Hessian-aware mixed-precision quantization in JAX and Flax.

The public namespace is flat: every estimator, quantizer and allocator is reachable as
``hqjax.<name>``. Sub-packages hold one concern each (see the README's architecture section).
"""

from hqjax.tree import *  # noqa: F401,F403
from hqjax.tree import __all__ as _tree_all
from hqjax.curvature import *  # noqa: F401,F403
from hqjax.curvature import __all__ as _curvature_all
from hqjax.quant import *  # noqa: F401,F403
from hqjax.quant import __all__ as _quant_all
from hqjax.alloc import *  # noqa: F401,F403
from hqjax.alloc import __all__ as _alloc_all
from hqjax.host import *  # noqa: F401,F403
from hqjax.host import __all__ as _host_all
from hqjax._nnx import NNXApply, from_nnx
from hqjax.pipeline import run

__version__ = "0.1.0"
__all__ = [*_tree_all, *_curvature_all, *_quant_all, *_alloc_all, *_host_all, "NNXApply", "from_nnx", "run"]

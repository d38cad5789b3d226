"""hqjax.quant: uniform quantizers, calibration, Flax transforms, QAT and integer-only inference.

See the README's "Quantization" section for a tour.
"""

from hqjax.quant import bitconfig as _bitconfig
from hqjax.quant import calibration as _calibration
from hqjax.quant import requant as _requant
from hqjax.quant import integer as _integer
from hqjax.quant import nnx_transform as _nnx_transform
from hqjax.quant import qat as _qat
from hqjax.quant import quantizers as _quantizers
from hqjax.quant import qwix_export as _qwix_export
from hqjax.quant import transform as _transform
from hqjax.quant.bitconfig import *  # noqa: F401,F403
from hqjax.quant.calibration import *  # noqa: F401,F403
from hqjax.quant.requant import *  # noqa: F401,F403
from hqjax.quant.integer import *  # noqa: F401,F403
from hqjax.quant.nnx_transform import *  # noqa: F401,F403
from hqjax.quant.qat import *  # noqa: F401,F403
from hqjax.quant.quantizers import *  # noqa: F401,F403
from hqjax.quant.qwix_export import *  # noqa: F401,F403
from hqjax.quant.transform import *  # noqa: F401,F403

__all__: list[str] = [
    *_bitconfig.__all__,
    *_calibration.__all__,
    *_requant.__all__,
    *_integer.__all__,
    *_nnx_transform.__all__,
    *_qat.__all__,
    *_quantizers.__all__,
    *_qwix_export.__all__,
    *_transform.__all__,
]

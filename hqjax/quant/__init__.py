"""hqjax.quant: uniform quantizers, calibration, Flax transforms, QAT and integer-only inference.

See the README's "Quantization" section for a tour.
"""

from hqjax.quant import bitconfig, calibration, qat, quantizers, transform
from hqjax.quant.bitconfig import *  # noqa: F401,F403
from hqjax.quant.calibration import *  # noqa: F401,F403
from hqjax.quant.qat import *  # noqa: F401,F403
from hqjax.quant.quantizers import *  # noqa: F401,F403
from hqjax.quant.transform import *  # noqa: F401,F403

__all__: list[str] = [
    *bitconfig.__all__,
    *calibration.__all__,
    *qat.__all__,
    *quantizers.__all__,
    *transform.__all__,
]

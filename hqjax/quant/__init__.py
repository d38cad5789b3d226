"""hqjax.quant: uniform quantizers, calibration, Flax transforms, QAT and integer-only inference.

See the README's "Quantization" section for a tour.
"""

from hqjax.quant.bitconfig import (
    bit_width_arrays, load_bit_config, save_bit_config, uniform_bit_config, validate_bit_config,
)
from hqjax.quant.calibration import (
    Calibrator, ema, get_calibrator, minmax, mse, percentile, state_range,
)
from hqjax.quant.requant import (
    MANTISSA_BITS, dyadic, dyadic_requantize,
)
from hqjax.quant.integer import (
    IntegerModel, fold_batchnorm, int_matmul, load_integer_model, save_integer_model,
    to_integer,
)
from hqjax.quant.nnx_transform import (
    QuantizedNNXApply, QuantizedNNXModel, quantize_nnx, quantize_nnx_apply, quantize_nnx_model, quantize_nnx_state,
)
from hqjax.quant.qat import (
    QATState, init_qat_state, make_qat_step, qat_loss, state_variables,
)
from hqjax.quant.quantizers import (
    QArray, QuantSpec, dequantize, fake_quant, int_range, qparams_from_range, quantize,
    tensor_range, weight_perturbation,
)
from hqjax.quant.qwix_export import (
    QwixChange, QwixExport, export_qwix, qwix_apply, qwix_rule_specs, to_qwix_rules,
)
from hqjax.quant.transform import (
    Coverage, QuantizedModel, STATS, coverage, group_wise_weights, per_channel_weights,
    quantize_model, quantize_params, weight_specs,
)

__all__ = [
    "bit_width_arrays", "load_bit_config", "save_bit_config", "uniform_bit_config", "validate_bit_config", "Calibrator",
    "ema", "get_calibrator", "minmax", "mse", "percentile", "state_range", "MANTISSA_BITS",
    "dyadic", "dyadic_requantize", "IntegerModel", "fold_batchnorm", "int_matmul",
    "load_integer_model", "save_integer_model", "to_integer", "QuantizedNNXModel", "quantize_nnx",
    "quantize_nnx_model", "quantize_nnx_state", "QuantizedNNXApply", "quantize_nnx_apply", "QATState", "init_qat_state", "make_qat_step",
    "qat_loss", "state_variables", "QArray", "QuantSpec", "dequantize", "fake_quant", "int_range",
    "qparams_from_range", "quantize", "tensor_range", "weight_perturbation", "qwix_rule_specs",
    "to_qwix_rules", "QwixChange", "QwixExport", "export_qwix", "qwix_apply", "Coverage", "QuantizedModel", "STATS", "coverage", "group_wise_weights",
    "per_channel_weights", "quantize_model", "quantize_params", "weight_specs",
]

"""Per-layer sensitivity: the table of curvature results and a registry of metrics.

A :class:`SensitivityTable` is plain data keyed by layer path (the names of
``hqjax.blocks(params)``): per layer its Hessian trace (and standard error), top
eigenvalues, eigenvalue samples over data subsets, parameter count and the squared weight
perturbation ``||Q_b(W) - W||^2`` for each candidate bit width. It round-trips through JSON.

A metric turns one row and a bit width into a number; the allocator minimizes the sum of
these numbers over layers. Metrics live in a registry and are used by name everywhere::

    @hqjax.register_metric("trace_over_norm")
    def trace_over_norm(row, bits):
        return row.trace * row.perturbation[bits] / row.weight_norm_sq

References
----------
HAWQ-V1: Dong et al., "HAWQ: Hessian AWare Quantization of Neural Networks with
Mixed-Precision", ICCV 2019 (Sec. 3.1 sensitivity λ/n, Sec. 3.2 fine-tuning order, Eq. 3).
HAWQ-V2: Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization", NeurIPS 2020 (Eq. 5).
HAWQ-V3: Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021 (Eq. 11-12).
Q-BERT: Shen et al., "Q-BERT: Hessian Based Ultra Low Precision Quantization of BERT",
AAAI 2020 (Sec. 3.2, Ω = |mean(λ)| + std(λ)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hqjax._schema import sensitivity_document, sensitivity_rows
from hqjax.alloc._json import dump_json, load_json

__all__ = [
    "LayerSensitivity",
    "SensitivityTable",
    "sensitivity_table",
    "weight_perturbations",
    "register_metric",
    "get_metric",
    "metric_names",
    "metric_needs",
    "sensitivity_scores",
    "hawq_v1_order",
    "hawq_v1_finetune_order",
]

Metric = Callable[["LayerSensitivity", int], float]


# ----------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """Curvature and perturbation facts about one layer (one row of the table).

    Attributes
    ----------
    n_params : number of parameters in the layer's block.
    perturbation : ``{bits: ||Q_b(W) - W||^2}`` for each candidate bit width.
    trace : Hutchinson estimate of the block's Hessian trace (HAWQ-V2/V3), or None.
    trace_stderr : its standard error, or None.
    eigenvalues : top Hessian eigenvalues of the block, descending (HAWQ-V1).
    eigenvalue_samples : the block's top eigenvalue over several data subsets (Q-BERT).
    weight_norm_sq : ``||W||^2`` of the layer's kernel, or None.
    act_trace : trace of the loss Hessian w.r.t. the layer's input activation, or None.
    act_perturbation : ``{bits: ||Q_b(a) - a||^2}`` for the activation, if measured.
    """

    n_params: int
    perturbation: Mapping[int, float] = dataclasses.field(default_factory=dict)
    trace: float | None = None
    trace_stderr: float | None = None
    eigenvalues: tuple[float, ...] = ()
    eigenvalue_samples: tuple[float, ...] = ()
    weight_norm_sq: float | None = None
    act_trace: float | None = None
    act_perturbation: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["perturbation"] = {str(b): float(v) for b, v in self.perturbation.items()}
        out["act_perturbation"] = {str(b): float(v) for b, v in self.act_perturbation.items()}
        out["eigenvalues"] = [float(v) for v in self.eigenvalues]
        out["eigenvalue_samples"] = [float(v) for v in self.eigenvalue_samples]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSensitivity":
        d = dict(d)
        d["perturbation"] = {int(b): float(v) for b, v in d.get("perturbation", {}).items()}
        d["act_perturbation"] = {int(b): float(v) for b, v in d.get("act_perturbation", {}).items()}
        d["eigenvalues"] = tuple(float(v) for v in d.get("eigenvalues", ()))
        d["eigenvalue_samples"] = tuple(float(v) for v in d.get("eigenvalue_samples", ()))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """Rows of :class:`LayerSensitivity` keyed by layer path, in model order."""

    rows: Mapping[str, LayerSensitivity]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.rows)

    def __getitem__(self, name: str) -> LayerSensitivity:
        try:
            return self.rows[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in the sensitivity table; layers are {list(self.rows)}") from None

    def __len__(self) -> int:
        return len(self.rows)

    def to_dict(self, **settings: Any) -> dict[str, Any]:
        """The versioned sensitivity document (``hqjax._schema``), the same schema as the
        ``sensitivity.json`` of ``hqjax run``; ``settings`` (model, dataset, ...) go along."""
        rows = [{"layer": name, **_schema_row(row.to_dict())} for name, row in self.rows.items()]
        return sensitivity_document(rows, **settings)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        """Read a sensitivity document (any layout ``hqjax._schema.sensitivity_rows`` accepts);
        row fields that are not :class:`LayerSensitivity` fields are ignored."""
        known = {f.name for f in dataclasses.fields(LayerSensitivity)}
        out = {}
        for r in sensitivity_rows(d):
            fields = {("eigenvalues" if k == "top_eigenvalues" else k): v for k, v in r.items()}
            out[str(r["layer"])] = LayerSensitivity.from_dict({k: v for k, v in fields.items() if k in known})
        return cls(out)

    def to_json(self, path: str | None = None) -> str:
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str) -> "SensitivityTable":
        return cls.from_dict(load_json(text_or_path))


def _schema_row(d: dict[str, Any]) -> dict[str, Any]:
    # the schema stores LayerSensitivity.eigenvalues as top_eigenvalues (hqjax._schema)
    return {("top_eigenvalues" if k == "eigenvalues" else k): v for k, v in d.items()}


def _default_quantizer_perturbation():
    # Lazy: hqjax.quant is written in parallel and must not be needed to import this module.
    try:
        from hqjax.quant import weight_perturbation
    except ImportError:
        raise ImportError(
            "hqjax.quant.weight_perturbation is not available in this install; pass "
            "quantizer=(w, bits) -> Q(w) to compute ||Q_b(W) - W||^2"
        ) from None
    return weight_perturbation


def weight_perturbations(
    params,
    bits: Sequence[int],
    *,
    quantizer: Callable[[jax.Array, int], jax.Array] | None = None,
    blocks=None,
) -> dict[str, dict[int, float]]:
    """``{layer: {b: ||Q_b(W) - W||^2}}`` for every layer's kernel.

    Parameters
    ----------
    params : Flax params pytree.
    bits : candidate bit widths.
    quantizer : ``(w, bits) -> Q(w)``; default ``hqjax.weight_perturbation`` (hqjax.quant).
    blocks : a ``hqjax.Blocks`` partition; default ``hqjax.blocks(params)``.
    """
    from hqjax.tree import blocks as make_blocks

    blks = (make_blocks(params) if blocks is None else blocks).require("params")
    if quantizer is None:
        perturb = _default_quantizer_perturbation()
    else:
        perturb = lambda w, b: jnp.sum(jnp.square(quantizer(w, b) - w))
    out: dict[str, dict[int, float]] = {}
    for name in blks.names:
        w = blks.kernel_view(params, name)  # the shape quantize_params quantizes
        # Eager: one small kernel per layer and bit width, not worth a compilation each.
        out[name] = {int(b): float(perturb(w, int(b))) for b in bits}
    return out


def _per_block(x, name: str):
    """A per-block value from a TraceResult/EigenResult-like object, a number or a sequence."""
    if x is None:
        return None
    if hasattr(x, "per_block"):  # TraceResult: {name: (trace, stderr)}
        return x.per_block()[name]
    if isinstance(x, Mapping):
        return x.get(name)
    raise TypeError(f"expected a mapping keyed by layer or a TraceResult, got {type(x).__name__}")


def _floats(v) -> tuple[float, ...]:
    if v is None:
        return ()
    if hasattr(v, "eigenvalues"):  # EigenResult
        v = v.eigenvalues
    return tuple(float(e) for e in np.ravel(np.asarray(v)))


def sensitivity_table(
    params,
    bits: Sequence[int],
    *,
    traces=None,
    eigenvalues=None,
    eigenvalue_samples=None,
    act_traces=None,
    act_perturbations: Mapping[str, Mapping[int, float]] | None = None,
    quantizer: Callable[[jax.Array, int], jax.Array] | None = None,
    blocks=None,
) -> SensitivityTable:
    """Assemble a :class:`SensitivityTable` from curvature results and the weights.

    Parameters
    ----------
    params : Flax params pytree; its kernels give the perturbations and norms.
    bits : candidate bit widths for ``||Q_b(W) - W||^2``.
    traces : a ``hqjax.TraceResult`` with block traces (``.per_block()``), or
        ``{layer: trace}`` / ``{layer: (trace, stderr)}``.
    eigenvalues : ``{layer: EigenResult or [λ_1, ...]}`` (e.g. ``hqjax.block_top_eigenvalues``).
    eigenvalue_samples : ``{layer: [λ over data subsets]}`` for Q-BERT.
    act_traces : ``hqjax.activation_traces`` result (or ``{layer: trace}``): the Hessian trace
        w.r.t. each layer's input activation (HAWQ-V2 Sec. 3.3).
    act_perturbations : ``{layer: {bits: ||Q_b(a) - a||^2}}`` for those activations.
    quantizer : ``(w, bits) -> Q(w)``; default the hqjax.quant weight quantizer.
    blocks : a ``hqjax.Blocks``; default ``hqjax.blocks(params)``.
    """
    from hqjax.tree import blocks as make_blocks

    blks = (make_blocks(params) if blocks is None else blocks).require("params")
    pert = weight_perturbations(params, bits, quantizer=quantizer, blocks=blks)
    rows = {}
    for name, size in zip(blks.names, blks.sizes):
        t = _per_block(traces, name)
        trace, stderr = (t if isinstance(t, (tuple, list)) else (t, None)) if t is not None else (None, None)
        w = np.asarray(blks.kernel(params, name))
        at = _per_block(act_traces, name)
        at = at[0] if isinstance(at, (tuple, list)) else at
        rows[name] = LayerSensitivity(
            n_params=int(size),
            perturbation=pert[name],
            trace=None if trace is None else float(trace),
            trace_stderr=None if stderr is None else float(stderr),
            eigenvalues=_floats(_per_block(eigenvalues, name)),
            eigenvalue_samples=_floats(_per_block(eigenvalue_samples, name)),
            weight_norm_sq=float(np.sum(np.square(w, dtype=np.float64))),
            act_trace=None if at is None else float(at),
            act_perturbation={int(b): float(v) for b, v in (act_perturbations or {}).get(name, {}).items()},
        )
    return SensitivityTable(rows)


# ----------------------------------------------------------------------------- registry
_METRICS: dict[str, Metric] = {}
_NEEDS: dict[str, frozenset[str]] = {}
# What a metric reads when it does not say: the curvature the job always computes plus the
# per-layer eigenvalues, so an undeclared user metric never finds a field missing.
_DEFAULT_NEEDS = frozenset({"trace", "eigenvalues"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerSensitivity))


def register_metric(name: str, fn: Metric | None = None, *, overwrite: bool = False,
                    needs: Iterable[str] | None = None):
    """Register ``fn(row: LayerSensitivity, bits: int) -> float`` under ``name``.

    Use as a decorator (``@register_metric("mine")``) or a call
    (``register_metric("mine", fn)``); afterwards ``allocate(..., metric="mine")`` and the
    command line's ``--metric mine`` find it. Returns ``fn``.

    ``needs`` names the :class:`LayerSensitivity` fields the metric reads (e.g.
    ``("trace",)``); the job computes only those (eigenvalues cost far more than traces).
    Undeclared, it is ``{"trace", "eigenvalues"}``.
    """
    need = _DEFAULT_NEEDS if needs is None else frozenset(needs)
    unknown = sorted(need - _FIELDS)
    if unknown:
        raise ValueError(f"metric {name!r} needs unknown field(s) {unknown}; LayerSensitivity has {sorted(_FIELDS)}")

    def add(f: Metric) -> Metric:
        if not callable(f):
            raise TypeError(f"metric {name!r} must be callable (row, bits) -> float, got {type(f).__name__}")
        if name in _METRICS and not overwrite and _METRICS[name] is not f:
            raise ValueError(f"a metric named {name!r} is already registered; pass overwrite=True to replace it")
        _METRICS[name] = f
        _NEEDS[name] = need
        return f

    return add if fn is None else add(fn)


def get_metric(metric: str | Metric) -> Metric:
    """The metric function registered as ``metric`` (a callable is returned as is)."""
    if callable(metric):
        return metric
    try:
        return _METRICS[metric]
    except KeyError:
        raise KeyError(f"unknown sensitivity metric {metric!r}; registered: {metric_names()}") from None


def metric_names() -> list[str]:
    return sorted(_METRICS)


def metric_needs(metric: str | Metric) -> frozenset[str]:
    """The table fields a metric reads (declared at registration); a bare callable is assumed
    to need ``{"trace", "eigenvalues"}``."""
    if callable(metric):
        return _DEFAULT_NEEDS
    get_metric(metric)  # KeyError naming the registered metrics
    return _NEEDS[metric]


def _need(row: LayerSensitivity, field: str, metric: str):
    value = getattr(row, field)
    if value is None or (isinstance(value, tuple) and not value):
        raise ValueError(f"metric {metric!r} needs {field!r}, which this table row lacks; compute it or pick another metric")
    return value


def _perturbation(row: LayerSensitivity, bits: int) -> float:
    try:
        return float(row.perturbation[bits])
    except KeyError:
        raise KeyError(
            f"no weight perturbation for {bits} bits (have {sorted(row.perturbation)}); "
            "build the table with these bits among its candidates"
        ) from None


@register_metric("hawq_v1", needs=("eigenvalues", "perturbation"))
def hawq_v1(row: LayerSensitivity, bits: int) -> float:
    """HAWQ-V1 sensitivity λ_max / n (Sec. 3.1) weighting the perturbation ``||Q_b(W)-W||^2``.

    λ_max / n alone does not depend on the bit width (V1 uses it to order layers, see
    :func:`hawq_v1_order`); the product with the perturbation makes it usable as an objective.
    """
    return float(_need(row, "eigenvalues", "hawq_v1")[0]) / row.n_params * _perturbation(row, bits)


@register_metric("hawq_v2", needs=("trace", "perturbation"))
def hawq_v2(row: LayerSensitivity, bits: int) -> float:
    """HAWQ-V2 Eq. 5: average trace ``Tr(H) / n`` times ``||Q_b(W) - W||^2``."""
    return float(_need(row, "trace", "hawq_v2")) / row.n_params * _perturbation(row, bits)


@register_metric("hawq_v3", needs=("trace", "perturbation"))
def hawq_v3(row: LayerSensitivity, bits: int) -> float:
    """HAWQ-V3 Eq. 12, the ILP objective: ``Ω_i(b) = (Tr(H_i) / n_i) · ||Q_b(W_i) - W_i||^2``.

    HAWQ-V3 keeps HAWQ-V2's average trace: under the second-order model
    ``ΔL ≈ ½ ΔWᵀ H ΔW`` with the error spread over the layer's ``n_i`` weights,
    ``ΔWᵀ H ΔW ≈ Tr(H)/n · ||ΔW||²``. The authors' ILP (Zhen-Dong/HAWQ, ``ILP.ipynb``) uses
    exactly this product and reproduces their shipped ResNet-18 configurations (tested).
    It equals ``hawq_v2``; V3 differs in the hardware budgets it solves under, not the metric.
    """
    return float(_need(row, "trace", "hawq_v3")) / row.n_params * _perturbation(row, bits)


@register_metric("total_trace", needs=("trace", "perturbation"))
def total_trace(row: LayerSensitivity, bits: int) -> float:
    """``Tr(H_i) · ||Q_b(W_i) - W_i||^2`` with the total, not average, trace.

    Weights a layer by an extra factor ``n_i`` against the second-order model (the
    perturbation already sums over the weights); kept as an ablation of ``hawq_v3``.
    """
    return float(_need(row, "trace", "total_trace")) * _perturbation(row, bits)


@register_metric("qbert", needs=("eigenvalue_samples", "perturbation"))
def qbert(row: LayerSensitivity, bits: int) -> float:
    """Q-BERT Sec. 3.2: ``Ω = |mean λ| + std λ`` over data subsets, times the perturbation."""
    lam = np.asarray(_need(row, "eigenvalue_samples", "qbert"), np.float64)
    return float(abs(lam.mean()) + lam.std()) * _perturbation(row, bits)


def sensitivity_scores(table: SensitivityTable, bits: Iterable[int], metric: str | Metric = "hawq_v3") -> dict[str, dict[int, float]]:
    """``{layer: {b: metric(row, b)}}`` for every layer of ``table`` and every ``b``."""
    fn = get_metric(metric)
    out: dict[str, dict[int, float]] = {}
    for name, row in table.rows.items():
        scores = {}
        for b in bits:
            try:
                v = float(fn(row, int(b)))
            except (KeyError, ValueError) as e:
                raise type(e)(f"layer {name!r}: {e}") from None
            if not math.isfinite(v):
                raise ValueError(f"metric {metric!r} gave {v} for layer {name!r} at {b} bits; it must be finite")
            scores[int(b)] = v
        out[name] = scores
    return out


def hawq_v1_order(table: SensitivityTable) -> list[str]:
    """Layers by descending HAWQ-V1 sensitivity λ_max / n (Sec. 3.1): who gets more bits.

    Ties are broken by layer name so the order is deterministic.
    """
    s = {n: float(_need(r, "eigenvalues", "hawq_v1")[0]) / r.n_params for n, r in table.rows.items()}
    return sorted(s, key=lambda n: (-s[n], n))


def hawq_v1_finetune_order(table: SensitivityTable, bit_config: Mapping[str, Any]) -> list[str]:
    """HAWQ-V1's block-wise fine-tuning order (Sec. 3.2, Eq. 3): descending ``Ω_i = λ_i ||Q(W_i)-W_i||^2``.

    ``bit_config`` gives each layer's weight bits (a BitConfig or ``{layer: bits}``); ties are
    broken by layer name.
    """
    omega = {}
    for name, row in table.rows.items():
        if name not in bit_config:
            raise KeyError(f"layer {name!r} has no bits in the bit config; it has {list(bit_config)}")
        b = bit_config[name]
        b = int(b["weight_bits"]) if isinstance(b, Mapping) else int(b)
        omega[name] = float(_need(row, "eigenvalues", "hawq_v1")[0]) * _perturbation(row, b)
    return sorted(omega, key=lambda n: (-omega[n], n))

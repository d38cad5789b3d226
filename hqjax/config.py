"""The configuration of an end-to-end job: one frozen dataclass, from flags, files or a saved run.

A job is fully described by a :class:`RunConfig`. The CLI builds it from (lowest to highest
precedence) the defaults, the ``config.json`` saved in an existing output folder, a
``--config`` file (JSON or TOML) and the flags given on the command line; the result is
saved back to the output folder, so the exact configuration used sits next to the results.

Each stage of the job depends on a subset of the fields (``STAGE_FIELDS``); a stage's
fingerprint hashes those fields and the previous stage's fingerprint, so changing the budget
re-runs allocation and what follows, while training and analysis are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from hqjax._bits import ACT_BITS, DEFAULT_ACT_BITS, WEIGHT_BITS, bad_act_bits, bad_weight_bits
from hqjax._errors import UserError
from hqjax._schema import unstamp

__all__ = [
    "UserError",  # defined in hqjax._errors, re-exported here where it was first public
    "RunConfig",
    "STAGES",
    "STAGE_FIELDS",
    "BUDGET_KINDS",
    "CURVATURES",
    "stage_fingerprints",
    "analysis_needs_eigenvalues",
    "load_config_file",
    "parse_budget",
]


STAGES = ("train", "analyze", "allocate", "quantize", "evaluate", "report")
BUDGET_KINDS = ("size", "bops", "latency")
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines the result of ``hqjax run``.

    Attributes
    ----------
    model, dataset : registered names (``hqjax.models.MODELS``; ``'digits'``,
        ``'mnist_subset'`` or a tfds name with ``data_dir``), a user model as
        ``'package.module:factory'``, a data set as an ``.npz`` path (``x_train, y_train,
        x_test, y_test``); ``hqjax.run`` records in-memory models and arrays by a hash.
    variables : pretrained variables (an Orbax checkpoint folder or a Flax msgpack file, or
        a hash for in-memory ones); when set, the train stage only records them.
    data_dir : prepared TensorFlow Datasets folder (only for tfds names).
    out : output folder.
    seed : seeds the data split, initialisation, training order and every probe.
    epochs, batch_size, learning_rate : full-precision training.
    hessian_examples, hessian_batch : training examples the curvature is measured on, and
        how they are stacked into batches (dataset-level Hessian, PyHessian Sec. 3).
    curvature : where each layer's trace comes from: ``'hessian'`` (HAWQ-V2 Sec. 3.1's
        Hessian trace, as the exact Gauss-Newton trace plus per-layer Hutchinson on the
        remainder, ``hqjax.curvature.gn_split``), ``'ggn'`` (exact Gauss-Newton trace),
        ``'fisher'`` (Monte-Carlo Fisher, one sampled label per example) or
        ``'empirical_fisher'`` (true labels); see ``hqjax.curvature.proxies``.
    num_probes : at most this many Hutchinson probes per layer on the remainder
        (``curvature='hessian'``).
    trace_rtol : a layer stops probing once its trace's standard error is this fraction of it.
    top_k, eig_iters : top Hessian eigenvalues per layer and Lanczos steps, computed only
        when the metric needs eigenvalues (HAWQ-V1).
    density_steps : Lanczos steps of the eigenvalue density (SLQ, PyHessian Sec. 3.3).
    metric : sensitivity metric registered in ``hqjax.alloc``.
    budget_kind, budget : ``'size'``, ``'bops'`` or ``'latency'``; the budget is a fraction
        of the INT8 cost (``0.5``, ``'50%'``) of the layers the allocator chooses for, with
        the layers ``edge_bits`` pins added at their pinned cost, or an absolute cost of the
        whole model with an optional k/M/G multiplier (``'12k'``: bytes for size, BOPs for
        bops, the latency table's unit).
    edge_bits : weight bits of the first and last layer (in call order), kept out of the
        allocation; HAWQ-V3 (Sec. 4, its released configurations) keeps both at 8 bits.
        ``None`` lets the allocator choose them like any other layer.
    weight_bits : candidate weight bit-widths per layer.
    act_bits : activation bit-width of every layer (8 by default, the policy of
        ``hqjax.allocate`` too; see ``hqjax._bits``).
    qat_epochs, qat_learning_rate : quantization-aware fine-tuning (HAWQ-V3 Sec. 4).
    calib_examples : examples used to calibrate activation ranges.
    float_islands : in the integer-only model, keep ops with no integer form (softmax,
        LayerNorm, GELU, ...) in float between integer layers (``hqjax.to_integer``'s
        ``float_islands``). Off by default: a model with such ops is refused before training.
    """

    model: str = "cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    variables: str | None = None
    out: str = "hqjax_out"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    hessian_examples: int = 128
    hessian_batch: int = 128
    curvature: str = "hessian"
    num_probes: int = 64
    trace_rtol: float = 0.05
    top_k: int = 2
    eig_iters: int = 50
    density_steps: int = 60
    metric: str = "hawq_v3"
    budget_kind: str = "size"
    budget: Any = 0.5
    edge_bits: int | None = 8
    weight_bits: tuple[int, ...] = (2, 3, 4, 8)
    act_bits: int = DEFAULT_ACT_BITS
    qat_epochs: int = 5
    qat_learning_rate: float = 5e-4
    calib_examples: int = 256
    float_islands: bool = False

    def __post_init__(self):
        if isinstance(self.weight_bits, (list, str)):
            bits = self.weight_bits
            if isinstance(bits, str):
                bits = [b for b in re.split(r"[,\s]+", bits) if b]
            try:
                object.__setattr__(self, "weight_bits", tuple(int(b) for b in bits))
            except (TypeError, ValueError):
                raise UserError(f"weight_bits must be comma-separated integers, e.g. 2,3,4,8; got {self.weight_bits!r}") from None
        self.validate()

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "hessian_examples", "hessian_batch", "num_probes", "top_k",
                    "eig_iters", "density_steps", "act_bits", "calib_examples")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        for name in ("learning_rate", "qat_learning_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"{name} must be a positive number, e.g. 1e-3; got {v!r}")
        for name in ("qat_epochs", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        bits = self.weight_bits if isinstance(self.weight_bits, tuple) else ()
        if not bits or bad_weight_bits(bits):
            raise UserError(f"weight_bits {list(bits) or self.weight_bits!r}: {bad_weight_bits(bits) or 'none'} "
                            f"cannot be quantized; choose weight widths from {list(WEIGHT_BITS)}, e.g. --bits 2,3,4,8")
        if bad_act_bits([self.act_bits]):
            raise UserError(f"act_bits={self.act_bits!r} is not a supported activation width; choose one of "
                            f"{list(ACT_BITS)} (e.g. --act-bits 8)")
        if self.edge_bits is not None and (isinstance(self.edge_bits, bool) or bad_weight_bits([self.edge_bits])):
            raise UserError(f"edge_bits={self.edge_bits!r} cannot be quantized; choose a weight width from "
                            f"{list(WEIGHT_BITS)} (e.g. --edge-bits 8), or --edge-bits none to allocate them too")
        if self.curvature not in CURVATURES:
            raise UserError(f"unknown curvature {self.curvature!r}; choose one of {list(CURVATURES)}")
        if isinstance(self.trace_rtol, bool) or not isinstance(self.trace_rtol, (int, float)) \
                or not 0 < self.trace_rtol < 1:
            raise UserError(f"trace_rtol must be a fraction between 0 and 1 (e.g. 0.05), got {self.trace_rtol!r}")
        if not isinstance(self.float_islands, bool):
            raise UserError(f"float_islands must be true or false, got {self.float_islands!r}")
        if self.budget_kind not in BUDGET_KINDS:
            raise UserError(f"unknown budget kind {self.budget_kind!r}; choose one of {list(BUDGET_KINDS)}")
        parse_budget(self.budget)

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_bits"] = list(self.weight_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a mapping (a saved ``config.json``'s schema stamp is checked and dropped);
        unknown keys raise :class:`UserError` listing the valid ones."""
        d = {k.replace("-", "_"): v for k, v in unstamp(d, "config", "the configuration").items()}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise UserError(f"unknown config key(s) {unknown}; valid keys are {sorted(valid)}")
        return cls(**d)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "train": ("model", "dataset", "data_dir", "variables", "seed", "epochs", "batch_size", "learning_rate"),
    "analyze": ("hessian_examples", "hessian_batch", "curvature", "num_probes", "trace_rtol", "top_k", "eig_iters",
                "density_steps", "weight_bits"),
    "allocate": ("metric", "budget_kind", "budget", "act_bits", "edge_bits"),
    "quantize": ("qat_epochs", "qat_learning_rate", "calib_examples", "float_islands"),
    "evaluate": (),
    "report": (),
}


_LATER_FIELDS = {"float_islands": False}  # {field: its default}


def stage_fingerprints(config: RunConfig) -> dict[str, str]:
    """``{stage: hash}``: a stage's fields chained with its predecessor's fingerprint."""
    out, prev = {}, ""
    d = config.to_dict()
    for stage in STAGES:
        # a field added later hashes only when set, so folders made before it stay up to date
        fields = {k: d[k] for k in STAGE_FIELDS[stage] if k not in _LATER_FIELDS or d[k] != _LATER_FIELDS[k]}
        if stage == "analyze":
            # The analysis computes eigenvalues only for metrics that read them: a metric
            # change that needs eigenvalues re-runs it, any other is an allocation change.
            fields["eigenvalues"] = analysis_needs_eigenvalues(config.metric)
        blob = json.dumps({"prev": prev, **fields}, sort_keys=True, default=str)
        prev = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def analysis_needs_eigenvalues(metric: str) -> bool:
    """Whether the metric reads per-layer eigenvalues (True for an unknown name: safe side)."""
    try:
        from hqjax.alloc.sensitivity import metric_needs

        return "eigenvalues" in metric_needs(metric)
    except KeyError:
        return True


# ----------------------------------------------------------------------------- budgets
_MULT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_budget(budget) -> tuple[str, float]:
    """``('fraction', f)`` or ``('absolute', value)`` from a number or a string.

    ``0.5`` and ``'50%'`` are fractions of the INT8 model's cost; numbers above 1 and
    strings like ``'12k'``, ``'3.5M'`` are absolute costs.
    """
    if isinstance(budget, bool):
        raise UserError(f"budget must be a number or a string like '50%' or '12k', got {budget!r}")
    if isinstance(budget, (int, float)):
        value, kind = float(budget), "fraction" if 0 < float(budget) <= 1 else "absolute"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[kKmMgG])?\s*", str(budget))
        if not m:
            raise UserError(f"cannot read budget {budget!r}: use a fraction of the INT8 cost (0.5 or '50%') "
                            f"or an absolute cost ('12000', '12k', '3.5M')")
        value, suffix = float(m.group(1)), (m.group(2) or "")
        if suffix == "%":
            value, kind = value / 100.0, "fraction"
        elif suffix:
            value, kind = value * _MULT[suffix.lower()], "absolute"
        else:
            kind = "fraction" if 0 < value <= 1 else "absolute"
    if value <= 0:
        raise UserError(f"budget must be positive, got {budget!r}")
    return kind, value


# ----------------------------------------------------------------------------- files
def load_config_file(path: str) -> dict:
    """Read a JSON or TOML config file (by extension) into a dict of RunConfig fields.

    A TOML file may put the fields at top level or under a ``[hqjax]`` table.
    """
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                d = tomllib.load(f)
            d = d.get("hqjax", d)
        else:
            with open(path) as f:
                d = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read config file {path!r}: {e} (JSON, or TOML with a .toml extension)") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path!r} must hold a mapping of option names to values")
    return unstamp(d, "config", f"config file {path!r}")

"""Quantization-aware training: a pure optax step over a :class:`QuantizedModel`.

The trainable parameters are the float "shadow" weights; the forward pass fake-quantizes
them (straight-through estimator, Bengio et al. 2013) as in HAWQ-V3's QAT (Yao et al. 2021,
Sec. 4). BatchNorm is explicit: ``batchnorm='update'`` normalizes with batch statistics and
returns updated running averages, ``'freeze'`` uses the running averages (the usual choice
late in QAT, and what integer inference folds). Optional knowledge distillation from the
full-precision model (Hinton et al. 2015; used by Q-BERT and HAWQ-V3) adds
``T^2 KL(softmax(t/T) || softmax(s/T))`` with weight ``distill_weight``.

NNX models take the same route: ``hqjax.quantize_model(nnx_module, cfg)`` gives a
:class:`hqjax.QuantizedNNXApply` with the ``QuantizedModel`` interface over
``hqjax.from_nnx`` variables (``'params'``, ``'batch_stats'``), so this step trains it
unchanged and gives the Linen twin's numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from hqjax.quant.transform import STATS, QuantizedModel  # or QuantizedNNXApply: the same interface

__all__ = ["QATState", "init_qat_state", "qat_loss", "make_qat_step", "state_variables"]

PyTree = Any


@struct.dataclass
class QATState:
    """Everything a QAT step reads and writes; a pytree, so it passes through ``jit``."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    quant_stats: PyTree
    opt_state: PyTree
    bit_widths: PyTree = None


def init_qat_state(variables: PyTree, optimizer: optax.GradientTransformation, *,
                   bit_widths: PyTree | None = None) -> QATState:
    """Start QAT from calibrated variables (``'params'``, optional ``'batch_stats'``,
    ``'quant_stats'`` from :meth:`QuantizedModel.calibrate`). ``bit_widths``
    (:func:`hqjax.bit_width_arrays`) trains at those widths instead of the model's BitConfig
    ones; they are state, not constants, so one compiled step serves every configuration."""
    params = variables["params"]
    return QATState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                    variables.get(STATS, {}), optimizer.init(params), bit_widths)


def state_variables(state: QATState) -> dict:
    """The Flax variables dict of a QAT state (for ``QuantizedModel.apply`` or export)."""
    out = {"params": state.params, STATS: state.quant_stats}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    return out


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _distill(student, teacher, temperature):
    t = jax.nn.log_softmax(teacher / temperature)
    s = jax.nn.log_softmax(student / temperature)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def qat_loss(qmodel: QuantizedModel, params: PyTree, state: QATState, x: jax.Array, y: jax.Array, *,
             batchnorm: str = "update", teacher_variables: PyTree | None = None, distill_weight: float = 0.0,
             temperature: float = 1.0, loss_fn: Callable = _xent):
    """Task loss (+ distillation) of the fake-quantized model; returns ``(loss, (batch_stats, logits))``."""
    variables = {**state_variables(state), "params": params}
    train = batchnorm == "update" and bool(state.batch_stats)
    # only passed when set, so a duck-typed model without the argument still trains
    widths = {} if state.bit_widths is None else {"bit_widths": state.bit_widths}
    if train:  # dropout masks drawn per step, from the step count
        rngs = {"dropout": jax.random.fold_in(jax.random.PRNGKey(0), state.step)}
        logits, new = qmodel.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs, **widths)
        batch_stats = new["batch_stats"]
    else:
        logits, batch_stats = qmodel.apply(variables, x, train=False, **widths), state.batch_stats
    loss = loss_fn(logits, y)
    if teacher_variables is not None and distill_weight > 0:
        teacher = jax.lax.stop_gradient(qmodel.float_apply(teacher_variables, x, train=False))
        loss = (1.0 - distill_weight) * loss + distill_weight * _distill(logits, teacher, temperature)
    return loss, (batch_stats, logits)


def make_qat_step(qmodel: QuantizedModel, optimizer: optax.GradientTransformation, *, batchnorm: str = "update",
                  distill_weight: float = 0.0, temperature: float = 1.0, loss_fn: Callable = _xent):
    """A pure QAT step ``step(state, x, y, teacher_variables=None) -> (state, metrics)``.

    Wrap it in ``jax.jit``; ``teacher_variables`` (the full-precision variables) enables
    distillation when ``distill_weight > 0``. ``metrics`` holds ``loss`` and ``accuracy``.
    """
    if batchnorm not in ("update", "freeze"):
        raise ValueError(f"batchnorm={batchnorm!r}: use 'update' (batch statistics) or 'freeze' (running averages)")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight={distill_weight} must be in [0, 1]")

    def step(state: QATState, x, y, teacher_variables=None):
        grad_fn = jax.value_and_grad(qat_loss, argnums=1, has_aux=True)
        (loss, (batch_stats, logits)), grads = grad_fn(
            qmodel, state.params, state, x, y, batchnorm=batchnorm, teacher_variables=teacher_variables,
            distill_weight=distill_weight, temperature=temperature, loss_fn=loss_fn)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new, {"loss": loss, "accuracy": acc}

    return step

"""Full-precision training with optax, evaluation, and an on-disk cache of trained weights.

The end-to-end job needs a trained full-precision model before any curvature is measured
(HAWQ-V1 Sec. 3 analyses a converged model: the Hessian of an untrained network says
nothing about quantization sensitivity). Training is the slowest stage of a small job, so
its result is cached on disk keyed by everything that determines it (model, data set,
seed, epochs, batch size, learning rate); a rerun with the same key loads it instead.

Train vs eval is explicit everywhere: ``train=True`` updates BatchNorm statistics
(``mutable=['batch_stats']``), ``train=False`` uses the running averages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hqjax._linen import with_train_arg

__all__ = [
    "TrainConfig",
    "cross_entropy",
    "init_variables",
    "make_loss_fn",
    "make_train_step",
    "train",
    "predict_logits",
    "accuracy",
    "cache_key",
    "train_cached",
    "save_variables",
    "load_variables",
    "progress_bar",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a full-precision training run (and so its cache key)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- progress
def progress_bar(iterable=None, *, total=None, desc=None, enabled: bool | None = None, **kw):
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal.

    ``enabled=None`` decides from ``sys.stderr.isatty()``, so logs, CI and tests get no
    carriage-return noise while an interactive user sees the bar.
    """
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- losses
def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the rows where ``mask`` is true (all rows if None)."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return per_example.mean()
    mask = mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def init_variables(model, key: jax.Array, input_shape: tuple[int, ...], dtype=jnp.float32) -> PyTree:
    """Flax variables (``params`` and, for BatchNorm models, ``batch_stats``) for one input
    (``dtype`` int32 for token ids), unboxed: a model annotated with ``nn.with_partitioning``
    gives plain arrays (its ``nn.Partitioned`` metadata is for placing them on a mesh)."""
    model = with_train_arg(model)
    return nn.meta.unbox(model.init(key, jnp.zeros((1, *input_shape), dtype), train=False))


def make_loss_fn(model, variables: PyTree) -> Callable[[PyTree, tuple], jax.Array]:
    """``loss_fn(params, batch) -> mean loss`` in eval mode, for curvature analysis.

    ``batch`` is ``(x, y)`` or ``(x, y, mask)``. Non-parameter collections (BatchNorm
    running statistics) are taken from ``variables`` and held fixed: the Hessian is that of
    the deployed (eval-mode) network, as in HAWQ.
    """
    rest = {k: v for k, v in variables.items() if k != "params"}
    model = with_train_arg(model)

    def loss_fn(params, batch):
        x, y = batch[0], batch[1]
        mask = batch[2] if len(batch) > 2 else None
        logits = model.apply({"params": params, **rest}, x, train=False)
        return cross_entropy(logits, y, mask)

    return loss_fn


def make_train_step(model, optimizer: optax.GradientTransformation, apply_fn: Callable | None = None):
    """A jitted ``step(variables, opt_state, x, y, key) -> (variables, opt_state, loss)``.

    ``apply_fn(variables, x, train=True, mutable=..., rngs={'dropout': key})`` defaults to
    ``model.apply``; the quantization-aware fine-tuning passes a fake-quantized apply with the
    same signature. ``key`` seeds the step's dropout masks (pass a fresh one each step).
    """
    apply_fn = apply_fn or with_train_arg(model).apply

    def loss_and_state(params, rest, x, y, key):
        variables = {"params": params, **rest}
        rngs = {"dropout": key}
        if rest:
            logits, new_rest = apply_fn(variables, x, train=True, mutable=list(rest), rngs=rngs)
        else:
            logits, new_rest = apply_fn(variables, x, train=True, rngs=rngs), rest
        return cross_entropy(logits, y), new_rest

    @jax.jit
    def step(variables, opt_state, x, y, key):
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        (loss, new_rest), grads = jax.value_and_grad(loss_and_state, has_aux=True)(params, rest, x, y, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return {"params": params, **new_rest}, opt_state, loss

    return step


def _epoch_batches(rng: np.random.Generator, n: int, batch_size: int):
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
        yield order[i : i + batch_size]


def train(model, x: np.ndarray, y: np.ndarray, config: TrainConfig = TrainConfig(), *,
          variables: PyTree | None = None, progress: bool | None = None, desc: str = "train") -> PyTree:
    """Train ``model`` on ``(x, y)`` with AdamW and a cosine schedule; return its variables.

    Parameters
    ----------
    model : a Flax module called as ``model.apply(variables, x, train=...)``.
    x, y : training images (NHWC float32) and integer labels.
    config : epochs, batch size, learning rate, weight decay and seed.
    variables : start from these instead of a fresh initialisation.
    progress : show a progress bar (``None``: only when stderr is a terminal).
    """
    if len(x) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({len(x)} examples)")
    key = jax.random.PRNGKey(config.seed)
    if variables is None:
        variables = init_variables(model, key, x.shape[1:], x.dtype)
    variables = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else dict(variables)
    steps_per_epoch = len(x) // config.batch_size
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.epochs * steps_per_epoch, 1))
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = optimizer.init(variables["params"])
    step = make_train_step(model, optimizer)
    rng = np.random.default_rng(config.seed)
    dropout = jax.random.fold_in(key, 1)
    bar = progress_bar(total=config.epochs * steps_per_epoch, desc=desc, enabled=progress)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        for i, idx in enumerate(_epoch_batches(rng, len(x), config.batch_size)):
            step_key = jax.random.fold_in(dropout, epoch * steps_per_epoch + i)
            variables, opt_state, loss = step(variables, opt_state, x[idx], y[idx], step_key)
            bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar.disable and ((epoch + 1) % max(1, config.epochs // 10) == 0 or epoch + 1 == config.epochs):
            # a log or a pipe: about ten lines instead of the bar
            logging.getLogger("hqjax").info("[%s] epoch %d/%d: last batch loss %.3f (%.1f s)", desc, epoch + 1,
                                            config.epochs, float(loss), time.perf_counter() - t0)
    bar.close()
    return variables


def predict_logits(apply_fn: Callable, variables: PyTree, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Eval-mode logits of ``apply_fn(variables, x, train=False)`` in batches (a Linen
    model's own ``apply`` without a ``train`` argument is called through its wrapper)."""
    if isinstance(getattr(apply_fn, "__self__", None), nn.Module) and apply_fn.__name__ == "apply":
        apply_fn = with_train_arg(apply_fn.__self__).apply
    fn = jax.jit(lambda v, xb: apply_fn(v, xb, train=False))
    return np.concatenate([np.asarray(fn(variables, x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def accuracy(apply_fn: Callable, variables: PyTree, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction in [0, 1]) in eval mode."""
    return float(np.mean(predict_logits(apply_fn, variables, x, batch_size).argmax(-1) == y))


# ----------------------------------------------------------------------------- cache
def cache_key(model_name: str, dataset_name: str, input_shape, config: TrainConfig, extra: dict | None = None) -> str:
    """A short stable hash of everything that determines a training run."""
    blob = json.dumps({"model": model_name, "dataset": dataset_name, "input_shape": list(input_shape),
                       "train": config.to_dict(), "extra": extra or {}}, sort_keys=True)
    return f"{model_name}-{dataset_name}-s{config.seed}-e{config.epochs}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_variables(path: str, variables: PyTree) -> None:
    """Write Flax variables as msgpack, atomically (temp file + ``os.replace``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, flax.core.unfreeze(variables))))
    os.replace(tmp, path)


def load_variables(path: str) -> PyTree:
    with open(path, "rb") as f:
        return jax.tree.map(jnp.asarray, flax.serialization.msgpack_restore(f.read()))


def default_cache_dir() -> str:
    return os.environ.get("HQJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hqjax"))


def train_cached(model, model_name: str, dataset, config: TrainConfig = TrainConfig(), *,
                 cache_dir: str | None = None, progress: bool | None = None) -> tuple[PyTree, bool]:
    """Train on ``dataset.x_train`` unless a cached result with the same key exists.

    Returns ``(variables, loaded_from_cache)``. The cache directory is ``cache_dir``, else
    ``$HQJAX_CACHE``, else ``~/.cache/hqjax``.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "fp", cache_key(model_name, dataset.name, dataset.input_shape, config) + ".msgpack")
    if os.path.exists(path):
        try:
            return load_variables(path), True
        except (OSError, ValueError) as e:  # a truncated or unreadable cache entry: train again
            logging.getLogger("hqjax").warning("ignoring unreadable cache entry %s (%s); training again", path, e)
    variables = train(model, dataset.x_train, dataset.y_train, config, progress=progress)
    try:  # the cache is best-effort: a read-only home must not lose the training just done
        save_variables(path, variables)
    except OSError as e:
        logging.getLogger("hqjax").warning(
            "could not write the trained-weights cache %s (%s); going on without it "
            "(set HQJAX_CACHE to a writable folder to keep trained weights)", path, e)
    return variables, False

"""The job's state: a configuration, its output folder, and inputs loaded and checked on first use.

The stages of :mod:`hqjax.pipeline` are functions of a :class:`Job`. User inputs (a model
object or factory, pretrained variables, arrays or a data set name) are resolved here, and
every check that can fail on bad input runs before any long work (``Job.check_inputs``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hqjax._workdir import Workdir
from hqjax.config import RunConfig, UserError, stage_fingerprints
from hqjax.train import TrainConfig, load_variables

__all__ = ["Job", "check_names"]


def check_names(config: RunConfig, *, model_given: bool = False, data_given: bool = False) -> None:
    """Fail before any work when a model, data set or metric name is unknown (a user model
    ``'package.module:factory'`` and an ``.npz`` path are checked when the job loads them)."""
    from hqjax.data import DATASETS
    from hqjax.models import MODELS

    if not model_given and ":" not in config.model and config.model not in MODELS:
        raise UserError(f"unknown model {config.model!r}; valid models: {', '.join(sorted(MODELS))}, "
                        f"or your own as 'package.module:factory'")
    if (not data_given and not config.dataset.endswith(".npz") and config.dataset not in DATASETS
            and config.data_dir is None):
        raise UserError(
            f"unknown dataset {config.dataset!r}; valid datasets: {', '.join(sorted(DATASETS))}, "
            f"an .npz file with x_train, y_train, x_test, y_test, "
            f"or a TensorFlow Datasets name together with --data-dir (its prepared folder)")
    _check_metric(config.metric)


def _check_metric(name: str) -> None:
    from hqjax.alloc import metric_names

    if name not in metric_names():
        raise UserError(f"unknown metric {name!r}; registered metrics: {', '.join(metric_names())}")


class Job:
    """A configuration, its output folder, and state loaded on first use.

    Parameters
    ----------
    config : the run's configuration.
    model : a Flax model object (Linen, or NNX) used instead of ``config.model``.
    variables : its pretrained variables (a Linen variables dict, or an NNX model's
        ``hqjax.from_nnx`` variables); an NNX ``model`` without them brings its own weights.
    data : arrays instead of ``config.dataset`` (see ``hqjax.data.dataset_from_arrays``).
    log : where one-line progress messages go (``print`` by default).
    progress : show progress bars (``None``: only when stderr is a terminal).
    """

    def __init__(self, config: RunConfig, *, model=None, variables=None, data=None,
                 log: Callable[[str], None] = print, progress: bool | None = None):
        self.config = config
        self.work = Workdir(config.out)
        self.fingerprints = stage_fingerprints(config)
        self.log = log
        self.progress = progress
        self.units_written = 0
        self._given = {"model": model, "variables": variables, "data": data}

    @functools.cached_property
    def dataset(self):
        from hqjax.data import dataset_from_arrays, load_dataset

        c = self.config
        try:
            if self._given["data"] is not None:
                return dataset_from_arrays(self._given["data"])
            return load_dataset(c.dataset, c.data_dir, seed=c.seed)
        except (FileNotFoundError, ImportError) as e:  # tfds folder not prepared, optional extra missing
            raise UserError(str(e)) from None
        except ValueError as e:  # an unknown data set name, an .npz without a key
            raise UserError(str(e)) from None

    @functools.cached_property
    def _model_and_own(self):
        """``(model in Linen convention, variables it brings or None)``."""
        from hqjax.user_model import as_flax_model, load_factory

        c = self.config
        if self._given["model"] is not None:
            return as_flax_model(self._given["model"], "the model")
        if c.model.startswith("object:") or (c.variables or "").startswith("object:"):
            raise UserError(f"{c.out!r} was made by hqjax.run with a model or variables object; run it again "
                            f"from Python with the same objects, or give --model and --variables")
        if ":" in c.model:
            factory = load_factory(c.model)
            try:
                obj = factory()
            except Exception as e:  # noqa: BLE001 - user code failing is bad input, reported in one line
                raise UserError(f"--model {c.model!r}: calling it failed ({type(e).__name__}: {e})") from None
            model, _ = as_flax_model(obj, f"what --model {c.model!r} returned")
            return model, None  # a factory's fresh NNX module is an initialisation, not trained weights
        from hqjax.models import get_model

        return get_model(c.model, num_classes=self.dataset.num_classes), None

    @property
    def model(self):
        return self._model_and_own[0]

    @property
    def user_model(self) -> bool:
        """True for a model hqjax does not ship (an object or a factory)."""
        return self._given["model"] is not None or ":" in self.config.model

    @functools.cached_property
    def pretrained(self):
        """Pretrained variables, checked against the model, or None (then the job trains)."""
        from hqjax.user_model import check_variables, load_variables_file

        c, given = self.config, self._given["variables"]
        where = "the variables"
        if given is None and c.variables and self._given["model"] is None:
            given, where = load_variables_file(c.variables), f"--variables {c.variables!r}"
        if given is None:
            given = self._model_and_own[1]
        if given is None:
            return None
        return check_variables(self.model, given, self.dataset.input_shape, where, self.dataset.input_dtype)

    def check_inputs(self) -> None:
        """Load and check the data, the model and pretrained variables (before any work)."""
        from hqjax.tree import blocks

        _ = self.dataset, self.model, self.pretrained
        shapes = self.init_shapes
        if not blocks(shapes["params"]).names:
            raise UserError(f"model {self.config.model!r} has no layer with a 'kernel' or 'embedding' parameter "
                            f"(Linen Dense/Conv/Embed, NNX Linear/Conv/Embed), so there is nothing to quantize")
        if np.issubdtype(self.dataset.input_dtype, np.integer):
            self._check_token_ids(shapes["params"])
        self._check_logits(shapes)

    def _check_logits(self, shapes) -> None:
        """The model must give one logit per class ``[batch, classes]``: the train step, the
        curvature and every accuracy read its output as classification logits."""
        d = self.dataset
        example = jax.ShapeDtypeStruct((1, *d.input_shape), d.input_dtype)
        out = jax.eval_shape(lambda v, x: self.model.apply(v, x, train=False), shapes, example)
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) != 2:
            what = f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"
            raise UserError(f"model {self.config.model!r} returns {what} for one example; hqjax trains and measures "
                            f"it on classification logits of shape [batch, classes]: give a model (or a wrapper "
                            f"module) that returns them")
        if shape[1] < d.num_classes:
            raise UserError(f"model {self.config.model!r} gives {shape[1]} logits, but the data has {d.num_classes} "
                            f"classes (labels 0..{d.num_classes - 1}); give the model {d.num_classes} outputs")

    def _check_token_ids(self, shapes) -> None:
        """Token ids index an embedding table: an id outside every table would be looked up
        as NaN (``jnp.take``'s fill) and poison training and the Hessian."""
        rows = [s.shape[0] for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
                if getattr(p[-1], "key", None) == "embedding"]
        d = self.dataset
        lo = min(int(np.min(d.x_train)), int(np.min(d.x_test)))
        hi = max(int(np.max(d.x_train)), int(np.max(d.x_test)))
        if rows and (lo < 0 or hi >= max(rows)):
            bad = lo if lo < 0 else hi
            raise UserError(f"the data's token ids run from {lo} to {hi}, but the model's largest embedding table "
                            f"has {max(rows)} rows: id {bad} has no row. Give ids in [0, {max(rows)}) (map unknown "
                            f"tokens to an id of their own), or a model with a vocabulary that covers them")

    @functools.cached_property
    def init_shapes(self):
        """Shapes of the model's variables for the data's inputs (``jax.eval_shape`` of its
        initialization: nothing is computed); a model that does not take them is a UserError."""
        from hqjax.train import init_variables

        d = self.dataset
        try:
            return jax.eval_shape(lambda: init_variables(self.model, jax.random.PRNGKey(0), d.input_shape,
                                                         d.input_dtype))
        except (TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model {self.config.model!r} does not take the data's inputs (one example: shape "
                            f"{tuple(d.input_shape)}): {first}; choose a model for this data, or data (--dataset "
                            f"file.npz, hqjax.run(..., data)) of the shape the model takes") from None

    @functools.cached_property
    def stacked(self) -> tuple[str, ...]:
        """The model's stacked modules (``nn.scan``/``nnx.scan`` over layers), from a
        shape-only trace: each of their layers is a block of its own."""
        from hqjax.alloc import stacked_modules

        d = self.dataset
        try:
            return stacked_modules(self.model, self.init_shapes,
                                   jax.ShapeDtypeStruct((1, *d.input_shape), d.input_dtype), train=False)
        except ValueError as e:  # nested stacks
            raise UserError(f"model {self.config.model!r}: {e}") from None

    def check_integer_lowering(self) -> None:
        """Lower the model (8-bit weights, the job's activation bits) on its given (or initial)
        weights, so that a model or setting integer inference cannot take is refused before
        training, not after QAT."""
        from hqjax.quant import quantize_model, to_integer, uniform_bit_config
        from hqjax.train import init_variables
        from hqjax.tree import blocks

        if self.stacked:
            raise UserError(f"model {self.config.model!r} runs stacked layers ({', '.join(self.stacked)}: nn.scan / "
                            f"nnx.scan over layers), whose activations the job's QAT and integer-only stages cannot "
                            f"quantize; `hqjax allocate` (train, analyze, allocate) and `hqjax sweep` take it, and "
                            f"hqjax.quantize_model(model, bit_config) applies its allocation (weight-only there)")
        d = self.dataset
        v = self.pretrained
        if v is None:
            trained = self.work.is_done("train", self.fingerprints["train"])
            v = self.variables if trained else init_variables(self.model, jax.random.PRNGKey(0), d.input_shape,
                                                              d.input_dtype)
        qmodel = quantize_model(self.model, uniform_bit_config(blocks(v["params"]), 8, self.config.act_bits))
        v = jax.jit(lambda v, x: qmodel.calibrate(v, x, train=False))(v, d.x_train[:8])
        try:
            to_integer(qmodel, v, d.input_shape, float_islands=self.config.float_islands, input_dtype=d.input_dtype)
        except ValueError as e:  # the model is outside what integer inference lowers: say so before training
            msg = str(e)
            if "float_islands=True" not in msg:
                raise UserError(f"integer-only inference cannot lower this model: {msg.splitlines()[0]}") from None
            cut = min(i for i in (msg.find("Supported:"), msg.find("Pass float_islands=True")) if i >= 0)
            raise UserError(msg[:cut].rstrip() + " Run with --float-islands "
                            "(hqjax.run(..., float_islands=True)) to keep such ops in float between integer "
                            "layers") from None

    @property
    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.learning_rate, seed=c.seed)

    @functools.cached_property
    def variables(self):
        """Full-precision variables written by the train stage."""
        return load_variables(self.work.path("fp_model.msgpack"))

    @functools.cached_property
    def blocks(self):
        from hqjax.tree import blocks

        return blocks(self.variables["params"], stacked=self.stacked).require(f"the params of {self.config.model}")

    def logits_fn(self) -> Callable:
        """``(params, x) -> logits`` of the deployed (eval-mode) network, its other
        collections (BatchNorm statistics) fixed: the function the curvature is measured on."""
        rest = {k: v for k, v in self.variables.items() if k != "params"}
        model = self.model
        return lambda p, xb: model.apply({"params": p, **rest}, xb, train=False)

    def analysis_batches(self):
        """The (seeded) training subset the curvature is measured on, as stacked masked
        batches ``((xs, ys, masks), counts)``."""
        from hqjax.data import stack_batches

        c, d = self.config, self.dataset
        idx = np.random.default_rng(c.seed).permutation(len(d.x_train))[: c.hessian_examples]
        xs, ys, counts = stack_batches(d.x_train[idx], d.y_train[idx], min(c.hessian_batch, len(idx)))
        masks = np.arange(xs.shape[1])[None, :] < counts[:, None]
        return (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(masks)), jnp.asarray(counts)

    def analysis_examples(self):
        """The analysis examples as one batch ``(x, y)`` (padding dropped)."""
        (xs, ys, masks), _ = self.analysis_batches()
        keep = np.asarray(masks).reshape(-1)
        x = jnp.asarray(np.asarray(xs).reshape(-1, *xs.shape[2:])[keep])
        return x, jnp.asarray(np.asarray(ys).reshape(-1)[keep])

    def unit_written(self) -> None:
        self.units_written += 1

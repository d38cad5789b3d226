import numpy as np
import pytest

from hqjax.data import load_dataset, load_digits, stack_batches


def test_digits_split_is_real_and_deterministic():
    d = load_digits(seed=0)
    assert d.x_train.shape[1:] == (8, 8, 1) and len(d.x_train) + len(d.x_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert set(np.unique(d.y_train)) == set(range(10))
    assert np.array_equal(load_digits(seed=0).y_test, d.y_test)
    assert not np.array_equal(load_digits(seed=1).y_test, d.y_test)


def test_stack_batches_pads_last_batch_with_true_count():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    xs, ys, counts = stack_batches(x, y, 4)
    assert xs.shape == (3, 4, 1) and list(counts) == [4, 4, 2]
    assert np.array_equal(xs.reshape(-1)[:10], np.arange(10))
    xs, ys, counts = stack_batches(x, y, 4, drop_remainder=True)
    assert xs.shape == (2, 4, 1)
    with pytest.raises(ValueError, match="empty"):
        stack_batches(x[:0], y[:0], 4)


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar100")


def _build_tiny_tfds(data_dir, n_train=12, n_test=5):
    """Prepare a tiny real-format tfds data set (array_record, PNG-encoded images) offline."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    d = load_digits(seed=0)

    def png(img):
        buf = io.BytesIO()
        Image.fromarray(np.round(img[..., 0] * 255).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    class TinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(d.x_train[:n_train], d.y_train[:n_train]),
                    "test": self._generate_examples(d.x_test[:n_test], d.y_test[:n_test])}

        def _generate_examples(self, xs, ys):
            for i, (x, y) in enumerate(zip(xs, ys)):
                yield i, {"image": png(x), "label": int(y)}

    TinyDigits(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return d


def test_tfds_loader_reads_a_prepared_dataset_without_downloading(tmp_path):
    from hqjax.data import load_tfds

    d = _build_tiny_tfds(tmp_path)
    ds = load_tfds("tiny_digits", str(tmp_path))
    assert ds.x_train.shape == (12, 8, 8, 1) and ds.x_test.shape == (5, 8, 8, 1) and ds.num_classes == 10
    # tfds shuffles examples by key and PNG stores 8-bit pixels: compare (image, label) multisets
    key = lambda xs, ys: sorted((np.round(x * 255).astype(np.uint8).tobytes(), int(y)) for x, y in zip(xs, ys))
    assert key(ds.x_train, ds.y_train) == key(d.x_train[:12], d.y_train[:12])
    assert key(ds.x_test, ds.y_test) == key(d.x_test[:5], d.y_test[:5])


def test_tfds_loader_says_how_to_prepare_a_missing_dataset(tmp_path):
    from hqjax.data import load_tfds

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tfds("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="download_and_prepare"):
        load_tfds("cifar10", str(tmp_path))

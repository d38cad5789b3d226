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
    from tfds_fixture import prepare_tfds

    d = load_digits(seed=0)
    prepare_tfds(data_dir, "TinyDigits", d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_test], d.y_test[:n_test])
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


@pytest.mark.slow
def test_cifar10_job_end_to_end_from_a_prepared_tfds_folder(tmp_path, monkeypatch):
    """``hqjax run --model resnet20 --dataset cifar10 --data-dir DIR``: a CIFAR-10-shaped tfds
    folder (32x32 RGB PNGs, as tfds prepares the real one) through every stage."""
    from tfds_fixture import prepare_tfds

    from hqjax.cli import main

    monkeypatch.setenv("HQJAX_CACHE", str(tmp_path / "cache"))
    d = load_digits(seed=0)
    rgb = lambda x: np.repeat(np.kron(x, np.ones((1, 4, 4, 1)))[:, :32, :32], 3, axis=-1)  # noqa: E731
    assert prepare_tfds(tmp_path / "tfds", "Cifar10", rgb(d.x_train[:48]), d.y_train[:48], rgb(d.x_test[:16]),
                        d.y_test[:16]) == "cifar10"
    out = tmp_path / "out"
    argv = ["run", "--out", str(out), "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds"),
            "--epochs", "1", "--batch-size", "16", "--probes", "2", "--hessian-examples", "16", "--hessian-batch", "16",
            "--density-steps", "2", "--qat-epochs", "1", "--calib-examples", "16", "--bits", "4,8", "--budget", "0.8",
            "--no-progress"]
    assert main(argv) == 0
    from hqjax._workdir import read_json

    train = read_json(str(out / "train.json"))
    assert (train["n_train"], train["n_test"]) == (48, 16)
    bits = read_json(str(out / "bit_config.json"))
    assert len(bits) == 20 and bits["stem"]["weight_bits"] == bits["fc"]["weight_bits"] == 8
    stages = read_json(str(out / "metrics.json"))["stages"]
    assert 0 <= stages["integer_only"]["accuracy"] <= 1


def test_arrays_of_token_ids_stay_integers_and_images_become_float():
    from hqjax.data import dataset_from_arrays

    y = np.zeros(4, np.int64)
    ids = dataset_from_arrays((np.ones((4, 7), np.int64), y, np.ones((4, 7), np.int64), y))
    assert ids.input_dtype == np.int32 and ids.input_shape == (7,)
    for dtype in (np.uint8, np.float64):
        img = dataset_from_arrays((np.ones((4, 8, 8, 1), dtype), y, np.ones((4, 8, 8, 1), dtype), y))
        assert img.input_dtype == np.float32

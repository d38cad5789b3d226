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

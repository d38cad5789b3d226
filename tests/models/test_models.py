import jax
import jax.numpy as jnp
import pytest

import hqjax
from hqjax.models import get_model


@pytest.mark.parametrize("name,shape", [("mlp", (2, 8, 8, 1)), ("cnn", (2, 8, 8, 1)), ("resnet20", (2, 32, 32, 3))])
def test_models_run_and_have_expected_size(name, shape):
    m = get_model(name)
    v = m.init(jax.random.key(0), jnp.zeros(shape), train=False)
    out = m.apply(v, jnp.ones(shape), train=False)
    assert out.shape == (2, 10)
    if name == "resnet20":
        assert hqjax.tree.tree_size(v["params"]) == 269_722  # He et al. 2016, option-A shortcuts


def test_resnet_train_mode_updates_batch_stats_and_eval_does_not():
    m = get_model("resnet20")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    v = m.init(jax.random.key(0), x, train=False)
    _, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], upd["batch_stats"])
    assert any(jax.tree.leaves(changed))
    with pytest.raises(Exception):
        m.apply(v, x)  # train must be given explicitly


def test_unknown_model_lists_registered_ones():
    with pytest.raises(ValueError, match="registered models"):
        get_model("vgg")

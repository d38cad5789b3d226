"""Models hqjax does not ship, written as a user would, to test that the flow is general.

Each takes 8x8x1 images (scikit-learn's digits) and returns 10 logits. Linen models are called
as ``model.apply(variables, x, train=...)``; NNX models as ``model(x)`` (train/eval by
``model.train()`` / ``model.eval()``, as NNX does). ``LINEN_MODELS`` and ``NNX_MODELS`` name
them for parametrized tests; ``TwinLinen`` and ``TwinNNX`` are one network written both ways,
with :func:`twin_nnx_from_linen` copying Linen variables into the NNX module. ``RowViT`` and
``NNXRowViT`` are small transformers (attention, LayerNorm, GELU: float islands in integer
inference). ``ScanMLP`` and ``NNXScanMLP`` run a stack of residual blocks whose params carry a
leading layer axis (``nn.scan``; ``nnx.vmap`` + ``nnx.scan``), as scanned transformers do.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "VGGish",
    "ProjectionResNet",
    "MobileBlockNet",
    "NNXCNN",
    "NNXMLP",
    "TwinLinen",
    "TwinNNX",
    "RowViT",
    "NNXRowViT",
    "DropoutMLP",
    "NNXDropoutMLP",
    "TokenNet",
    "NNXTokenNet",
    "ScanMLP",
    "ModelessNet",
    "EinsumNet",
    "ShardedNet",
    "NNXEinsumNet",
    "DeterministicNet",
    "NNXScanMLP",
    "twin_nnx_from_linen",
    "LINEN_MODELS",
    "NNX_MODELS",
    "init_linen",
    "nnx_cnn",
    "nnx_row_vit",
    "nnx_scan_mlp",
    "nnx_einsum_net",
]


class VGGish(nn.Module):
    """Two conv-conv-maxpool stages (VGG style), then two dense layers."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for i, width in enumerate((8, 16)):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"features/conv{i}a")(x))
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"features/conv{i}b")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32, name="classifier/fc1")(x))
        return nn.Dense(10, name="classifier/fc2")(x)


class _ResBlock(nn.Module):
    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False, name="conv_a")(x)
        y = nn.relu(bn("bn_a")(y))
        y = bn("bn_b")(nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv_b")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, name="proj")(x)
            x = bn("proj_bn")(x)
        return nn.relu(x + y)


class ProjectionResNet(nn.Module):
    """Stem, an identity block, a strided block with a 1x1 projection shortcut, global
    average pooling, a classifier; BatchNorm throughout."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        x = _ResBlock(8, 1, name="block1")(x, train)
        x = _ResBlock(16, 2, name="block2")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10, name="head")(x)


class MobileBlockNet(nn.Module):
    """An inverted-residual block (MobileNet-V2 style): 1x1 expand, 3x3 depthwise (stride 2,
    dilation-free), 1x1 project, ReLU6; then average pooling and a classifier."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        x = nn.relu6(bn("stem_bn")(nn.Conv(8, (3, 3), padding="SAME", use_bias=False, name="stem")(x)))
        y = nn.relu6(bn("expand_bn")(nn.Conv(24, (1, 1), use_bias=False, name="expand")(x)))
        y = nn.Conv(24, (3, 3), strides=2, padding="SAME", feature_group_count=24, use_bias=False,
                    name="depthwise")(y)
        y = nn.relu6(bn("depthwise_bn")(y))
        y = bn("project_bn")(nn.Conv(12, (1, 1), use_bias=False, name="project")(y))
        y = nn.avg_pool(y, (2, 2), strides=(2, 2))
        y = y.reshape((y.shape[0], -1))
        return nn.Dense(10, name="head")(y)


class NNXCNN(nnx.Module):
    """conv -> relu -> max-pool -> conv (stride 2) -> relu -> linear, in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.head(x.reshape((x.shape[0], -1)))


class NNXMLP(nnx.Module):
    """Flatten -> linear -> relu -> linear -> relu -> linear, in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 48, rngs=rngs)
        self.fc2 = nnx.Linear(48, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class TwinLinen(nn.Module):
    """The Linen half of a twin pair: conv1 -> relu -> conv2 (stride 2) -> relu -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(12, (3, 3), strides=2, padding="SAME", name="conv2")(x))
        return nn.Dense(10, name="dense")(x.reshape((x.shape[0], -1)))


class TwinNNX(nnx.Module):
    """The NNX half of a twin pair: the same network and module names as :class:`TwinLinen`."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 6, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 12, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.dense = nnx.Linear(4 * 4 * 12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.dense(x.reshape((x.shape[0], -1)))


class _LinenEncoderBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.gelu(nn.Dense(2 * self.dim, name="mlp1")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(self.dim, name="mlp2")(h)


class RowViT(nn.Module):
    """Each image row a token: embed -> 2 pre-norm encoder blocks (2-head attention, GELU MLP)
    -> LayerNorm -> mean over tokens -> head; attention's projections are ``DenseGeneral``
    with per-head output axes."""

    dim: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.Dense(self.dim, name="embed")(x.reshape((x.shape[0], 8, 8)))
        x = x + self.param("pos", nn.initializers.normal(0.02), (8, self.dim))
        for i in range(2):
            x = _LinenEncoderBlock(self.dim, name=f"block{i}")(x)
        return nn.Dense(10, name="head")(nn.LayerNorm(name="ln")(x).mean(axis=1))


class _NNXEncoderBlock(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))


class NNXRowViT(nnx.Module):
    """:class:`RowViT` in NNX as users write it: the blocks in an ``nnx.List`` iterated in
    ``__call__``, and the token width read from a submodule (``self.embed.in_features``)."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 16):
        self.embed = nnx.Linear(8, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (8, dim)))
        self.blocks = nnx.List([_NNXEncoderBlock(dim, rngs) for _ in range(2)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x.reshape((x.shape[0], -1, self.embed.in_features))) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(axis=1))


class DropoutMLP(nn.Module):
    """flatten -> dense -> relu -> dropout(0.5) -> dense, dropout active when ``train``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32, name="fc")(x.reshape((x.shape[0], -1))))
        return nn.Dense(10, name="head")(nn.Dropout(0.5, deterministic=not train)(x))


class NNXDropoutMLP(nnx.Module):
    """:class:`DropoutMLP` in NNX; the dropout draws from the module's own ``nnx.Rngs``."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(64, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.fc(x.reshape((x.shape[0], -1))))))


class TokenNet(nn.Module):
    """Token ids (not images): embed (vocabulary 64) -> dense -> relu -> mean over tokens -> head."""

    @nn.compact
    def __call__(self, ids, train: bool = False):
        del train
        x = nn.relu(nn.Dense(24, name="fc")(nn.Embed(64, 16, name="embed")(ids)))
        return nn.Dense(10, name="head")(x.mean(axis=1))


class NNXTokenNet(nnx.Module):
    """:class:`TokenNet` in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(64, 16, rngs=rngs)
        self.fc = nnx.Linear(16, 24, rngs=rngs)
        self.head = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, ids):
        return self.head(nnx.relu(self.fc(self.embed(ids))).mean(axis=1))


class ModelessNet(nn.Module):
    """conv -> relu -> dense, called as ``model.apply(variables, x)``: no mode argument."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv")(x))
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class DeterministicNet(nn.Module):
    """dense -> relu -> dropout -> dense in Flax's ``deterministic`` convention (no ``train``)."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.relu(nn.Dense(32, name="fc")(x.reshape((x.shape[0], -1))))
        return nn.Dense(10, name="head")(nn.Dropout(0.5)(x, deterministic=deterministic))


class ShardedNet(nn.Module):
    """dense -> relu -> dense with ``nn.with_partitioning`` kernels (a model written for a mesh)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        init = nn.initializers.lecun_normal()
        x = nn.relu(nn.Dense(32, kernel_init=nn.with_partitioning(init, (None, "model")), name="fc")(
            x.reshape((x.shape[0], -1))))
        return nn.Dense(10, kernel_init=nn.with_partitioning(init, ("model", None)), name="head")(x)


class EinsumNet(nn.Module):
    """Image rows as 8 tokens: ``nn.Einsum('btd,dnh->btnh')`` (2 heads of 4) -> relu -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Einsum((8, 2, 4), "btd,dnh->btnh", name="heads")(x.reshape((x.shape[0], 8, 8))))
        return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class NNXEinsumNet(nnx.Module):
    """:class:`EinsumNet` in NNX (``nnx.Einsum``)."""

    def __init__(self, rngs: nnx.Rngs):
        self.heads = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.heads(x.reshape((x.shape[0], 8, 8))))
        return self.head(x.reshape((x.shape[0], -1)))


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(16, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x))), None


class ScanMLP(nn.Module):
    """dense -> ``depth`` residual blocks (fc1 -> relu -> fc2) under ``nn.scan`` -> head."""

    depth: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Dense(16, name="embed")(x.reshape((x.shape[0], -1))))
        blocks = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(10, name="head")(nn.relu(x))


class _NNXScanBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.relu(self.fc1(x)))


class NNXScanMLP(nnx.Module):
    """:class:`ScanMLP` in NNX: the blocks made by ``nnx.vmap``, applied by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs, depth: int = 3):
        self.embed = nnx.Linear(64, 16, rngs=rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _NNXScanBlock(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.head(nnx.relu(run(nnx.relu(self.embed(x.reshape((x.shape[0], -1)))), self.blocks)))


def twin_nnx_from_linen(variables) -> TwinNNX:
    """A :class:`TwinNNX` holding the weights of :class:`TwinLinen` ``variables``."""
    model = TwinNNX(nnx.Rngs(0))
    p = variables["params"]
    for name in ("conv1", "conv2", "dense"):
        layer = getattr(model, name)
        layer.kernel.value = p[name]["kernel"]
        layer.bias.value = p[name]["bias"]
    return model


def nnx_cnn() -> NNXCNN:
    """A fresh :class:`NNXCNN`: a ``package.module:factory`` for ``--model``."""
    return NNXCNN(nnx.Rngs(0))


def nnx_row_vit() -> NNXRowViT:
    """A fresh :class:`NNXRowViT`: a ``package.module:factory`` for ``--model``."""
    return NNXRowViT(nnx.Rngs(0))


def nnx_einsum_net() -> NNXEinsumNet:
    """A fresh :class:`NNXEinsumNet`: a ``package.module:factory`` for ``--model``."""
    return NNXEinsumNet(nnx.Rngs(0))


def nnx_scan_mlp() -> NNXScanMLP:
    """A fresh :class:`NNXScanMLP`: a ``package.module:factory`` for ``--model``."""
    return NNXScanMLP(nnx.Rngs(0))


LINEN_MODELS = {"vggish": VGGish, "projection_resnet": ProjectionResNet, "mobile_block": MobileBlockNet}
NNX_MODELS = {"nnx_cnn": NNXCNN, "nnx_mlp": NNXMLP}


def init_linen(model: nn.Module, seed: int = 0, batch: int = 2):
    """Variables of a Linen model for 8x8x1 inputs."""
    return model.init(jax.random.key(seed), jnp.zeros((batch, 8, 8, 1)), train=False)

"""A MobileNet-V2-style network in Flax NNX, written as a user would, for the ablation on a
model hqjax does not ship (``accuracy_table.py --model user_mobilenet:factory`` with this
folder on ``PYTHONPATH``).

Inverted residual blocks (Sandler et al. 2018, Table 1): 1x1 expansion, 3x3 depthwise,
1x1 linear projection, BatchNorm after each, ReLU6, identity shortcut when the shape allows.
Depthwise layers hold few weights but are known to suffer most from low-bit quantization,
which is the case a per-layer allocation is for. Sized for 28x28x1 images (MNIST), 10 classes.
"""

from __future__ import annotations

from flax import nnx

__all__ = ["MobileNetV2Small", "factory"]


class InvertedResidual(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, rngs: nnx.Rngs):
        hidden = cin * expand
        bn = lambda n: nnx.BatchNorm(n, momentum=0.9, rngs=rngs)  # noqa: E731
        self.expand = nnx.Conv(cin, hidden, (1, 1), use_bias=False, rngs=rngs)
        self.expand_bn = bn(hidden)
        self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding="SAME",
                                  feature_group_count=hidden, use_bias=False, rngs=rngs)
        self.depthwise_bn = bn(hidden)
        self.project = nnx.Conv(hidden, cout, (1, 1), use_bias=False, rngs=rngs)
        self.project_bn = bn(cout)
        self.shortcut = stride == 1 and cin == cout

    def __call__(self, x):
        y = nnx.relu6(self.expand_bn(self.expand(x)))
        y = nnx.relu6(self.depthwise_bn(self.depthwise(y)))
        y = self.project_bn(self.project(y))
        return x + y if self.shortcut else y


class MobileNetV2Small(nnx.Module):
    """Stem, four inverted residual blocks (28 -> 14 -> 7), a 1x1 head, global average
    pooling and a classifier: 15 weight layers."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 10):
        self.stem = nnx.Conv(1, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.block1 = InvertedResidual(16, 24, 2, 4, rngs)
        self.block2 = InvertedResidual(24, 24, 1, 4, rngs)
        self.block3 = InvertedResidual(24, 32, 2, 4, rngs)
        self.block4 = InvertedResidual(32, 32, 1, 4, rngs)
        self.head = nnx.Conv(32, 128, (1, 1), use_bias=False, rngs=rngs)
        self.head_bn = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)
        self.classifier = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu6(self.stem_bn(self.stem(x)))
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = block(x)
        x = nnx.relu6(self.head_bn(self.head(x)))
        return self.classifier(x.mean(axis=(1, 2)))


def factory() -> MobileNetV2Small:
    """A freshly initialised network (the job trains it)."""
    return MobileNetV2Small(nnx.Rngs(0))

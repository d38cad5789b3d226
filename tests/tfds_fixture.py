"""Prepare a small TensorFlow Datasets folder offline (array_record, PNG-encoded images).

The data set is written exactly as ``tfds.builder(name).download_and_prepare()`` writes a
real one (``<data_dir>/<name>/<version>/``), so ``hqjax.data.load_tfds`` reads it as it would
read CIFAR-10 prepared on a machine with network access.
"""

import io

import numpy as np


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    pixels = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def prepare_tfds(data_dir, class_name: str, x_train, y_train, x_test, y_test, num_classes: int = 10) -> str:
    """Write the splits ``train`` and ``test`` of images in [0, 1] under ``data_dir``; returns
    the tfds name (``class_name`` in snake case, e.g. ``Cifar10`` -> ``cifar10``)."""
    import tensorflow_datasets as tfds

    shape = tuple(x_train.shape[1:])

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape), "label": tfds.features.ClassLabel(num_classes=num_classes)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(x_train, y_train), "test": self._generate_examples(x_test, y_test)}

    def _generate_examples(self, xs, ys):
        for i, (x, y) in enumerate(zip(xs, ys)):
            yield i, {"image": _png(x), "label": int(y)}

    # skip_registration: the name may be one tfds already registers (cifar10)
    cls = type(class_name, (tfds.core.GeneratorBasedBuilder,),
               {"VERSION": tfds.core.Version("1.0.0"), "_info": _info, "_split_generators": _split_generators,
                "_generate_examples": _generate_examples, "__module__": __name__}, skip_registration=True)
    builder = cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder.name

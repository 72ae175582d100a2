"""A tiny TFDS image-classification builder standing in for ImageNet in the data-step tests.

`DitJaxTinyImages` ("dit_jax_tiny_images"): 12 random RGB PNGs of 10x12 pixels in 3 classes,
prepared as ArrayRecord without TensorFlow. Importing this module registers it, so
`config.data.name="tfds:dit_jax_tiny_images"` reads it. Every preparation appends
"<pid>" to the file named by $DIT_JAX_TINY_TFDS_LOG (if set): the tests count the builds.
"""
import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

NAME = "dit_jax_tiny_images"
NUM_EXAMPLES = 12
NUM_CLASSES = 3


class DitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """12 random 10x12 RGB images, labels i % 3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    log = os.environ.get("DIT_JAX_TINY_TFDS_LOG")
    if log:
      with open(log, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(NUM_EXAMPLES):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG")
      yield i, {"image": buf.getvalue(), "label": i % NUM_CLASSES}

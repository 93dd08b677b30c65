"""CIFAR-10 one-class anomaly detection, read through tfds.data_source.

Train: the training images of the normal class. Test: all 10,000 test
images, label = (class != normal class). Images are upscaled from 32x32 to
(resize, resize) with PIL bilinear (dataset.crop is not used). No masks.

Reading needs no TensorFlow, but tfds prepares cifar10 (array_record) with
TensorFlow: run once, where TF and the internet are available,
  tfds build cifar10 --file_format=array_record --data_dir=DIR
and point config.dataset.tfds_data_dir to DIR (default: ~/tensorflow_datasets).
"""

from typing import Optional

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from simplenet_jax.data import images
from simplenet_jax.errors import UserError

# The class names, index = tfds label.
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
           'horse', 'ship', 'truck')


def class_index(category: str) -> int:
  if category in CLASSES:
    return CLASSES.index(category)
  raise UserError(f'{category!r} is not a CIFAR-10 class; use one of '
                  f'{", ".join(CLASSES)} (config.dataset.categories or '
                  'config.dataset.normal_class = 0..9).')


def _source(split: str, data_dir: Optional[str], decoders=None):
  try:
    return tfds.data_source('cifar10', split=split, data_dir=data_dir or None,
                            download=False, decoders=decoders)
  except Exception as e:  # tfds: AssertionError / FileNotFoundError / ...
    raise UserError(
        f'cannot read tfds cifar10 ({split}) from '
        f'{data_dir or "the default tfds data_dir"} ({type(e).__name__}: {e}); '
        'prepare it with `tfds build cifar10 --file_format=array_record '
        '--data_dir=DIR` (needs TensorFlow) and set '
        'config.dataset.tfds_data_dir=DIR.') from e


def _labels(split: str, data_dir: Optional[str], source) -> np.ndarray:
  """All labels of a split, without decoding the images where tfds can."""
  try:
    raw = _source(split, data_dir, decoders={'image': tfds.decode.SkipDecoding()})
    return np.asarray([int(raw[i]['label']) for i in range(len(raw))])
  except Exception:  # pylint: disable=broad-except
    # tfds.testing.mock_data cannot skip decoding without TensorFlow.
    return np.asarray([int(source[i]['label']) for i in range(len(source))])


class Cifar10OneClass:
  """One split of CIFAR-10 with `normal_class` as the normal class."""

  def __init__(self, category: str, split: str, resize: int,
               data_dir: Optional[str] = None):
    if split not in ('train', 'test'):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    self.name = category
    self.normal_class = class_index(category)
    self.split = split
    self.has_masks = False
    self.geometry = images.Geometry(square=int(resize))
    self.image_hw = (int(resize), int(resize))
    self.source = _source(split, data_dir)
    labels = _labels(split, data_dir, self.source)
    if split == 'train':
      self.indices = np.flatnonzero(labels == self.normal_class)
    else:
      self.indices = np.arange(len(labels))
    self.classes = labels[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def labels(self) -> np.ndarray:
    """(N,) int: each image's label (1 = not the normal class), as `load`
    gives it, without decoding the images."""
    return (self.classes != self.normal_class).astype(np.int64)

  def load(self, i: int) -> dict:
    j = int(self.indices[i])
    r = self.source[j]
    cls = int(r['label'])
    image = PIL.Image.fromarray(np.asarray(r['image'], np.uint8))
    return images.transform_example(
        image, None, self.geometry, expected_hw=self.image_hw,
        label=int(cls != self.normal_class),
        path=f'cifar10/{self.split}/{j:05d}', defect=CLASSES[cls])


def build(category: str, split: str, resize: int,
          data_dir: Optional[str] = None) -> Cifar10OneClass:
  return Cifar10OneClass(category, split, resize, data_dir)

"""New images to score (predict mode): a file, a directory or a glob.

`expand_inputs` lists them (reading every header, so an unreadable file is
reported before any work starts) and `ImageFiles` is a dataset of them,
brought to a trained model's input size by the training geometry.
"""

import glob
import os

from absl import logging
import numpy as np
import PIL.Image

from simplenet_jax.data import images
from simplenet_jax.errors import UserError


def expand_inputs(spec: str) -> list[str]:
  """A file, a directory (its images, sorted) or a glob -> image paths.

  Non-image files in a directory or matched by a glob are skipped with a
  warning naming them; every image's header is read here.
  """
  if not spec:
    raise UserError('config.predict.inputs is empty: give a file, a directory '
                    "or a glob, e.g. --config.predict.inputs='photos/*.png'")
  if os.path.isdir(spec):
    paths = [str(p) for p in images.list_images(spec)]
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    paths = []
    for p in sorted(glob.glob(spec, recursive=True)):
      if not os.path.isfile(p):
        continue
      if images.is_image_file(p):
        paths.append(p)
      else:
        logging.warning('Skipping %s: not an image file (accepted: %s).', p,
                        ', '.join(images.IMAGE_EXTENSIONS))
  if not paths:
    raise UserError(f'config.predict.inputs={spec!r}: no image files found')
  for p in paths:
    images.image_hw(p)  # UserError naming the file if it cannot be read.
  return paths


class ImageFiles:
  """Image files brought to a trained model's input size (no labels)."""

  def __init__(self, paths, geometry: images.Geometry, image_hw):
    self.paths, self.geometry, self.image_hw = paths, geometry, tuple(image_hw)
    self.has_masks = False

  def __len__(self):
    return len(self.paths)

  def load(self, i):
    im = self.geometry.apply(images.load_rgb(self.paths[i]))
    if (im.height, im.width) != self.image_hw:
      # Without a crop another aspect ratio gives another size: match training.
      im = im.resize(self.image_hw[::-1], PIL.Image.Resampling.BILINEAR)
    h, w = self.image_hw
    return dict(image=np.asarray(im, np.uint8), mask=np.zeros((h, w), np.uint8),
                label=0, path=self.paths[i], defect='')

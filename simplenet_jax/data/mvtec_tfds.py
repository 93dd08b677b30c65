"""MVTec AD as a tensorflow-datasets builder (array_record), read without TF.

`MvtecAd` has one builder config per MVTec AD category; any other category
name in the MVTec layout (e.g. cookies) gets a config made on the fly. Its
manual_dir is the extracted archive (`dataset.root`). Examples are stored
already decoded by `images.load_rgb` / `images.load_mask` (so EXIF, 16-bit,
palette, ... are handled as for the files path) at their original size, and
re-encoded as PNG with PIL: neither building nor reading imports TensorFlow.

Features: image (H, W, 3) uint8, mask (H, W, 1) uint8 in {0, 255},
label 0 normal / 1 anomalous, defect ('good' or the defect folder),
filename (relative to the category folder, e.g. 'test/crack/000.png').
Splits: train, test, and validation where the category has
validation/good (normal images kept out of training, as in the files
path; MVTec AD itself has none).
The prepared data lands in <data_dir>/mvtec_ad/<category>/<version>/; delete
that folder to rebuild after the source files change.
"""

from pathlib import Path
from typing import Optional

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from simplenet_jax.data import images
from simplenet_jax.data import mvtec
from simplenet_jax.errors import UserError


class _LocalInfo(tfds.core.DatasetInfo):
  """MVTec AD's DatasetInfo. This dataset is never on tfds's GCS bucket;
  tfds's lookup there, made for every builder not yet prepared, would leave
  an empty /tmp/tmp*tfds folder behind each time."""

  def initialize_from_bucket(self) -> None:
    pass


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per category."""

  name = 'mvtec_ad'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images decoded to RGB, masks binarised to 0/255.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in mvtec.CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download mvtec_anomaly_detection.tar.xz from '
      'https://www.mvtec.com/company/research/datasets/mvtec-ad, extract it '
      'and pass the extracted folder (holding bottle/, cable/, ...) as '
      'manual_dir (config.dataset.root).')

  # tfds 4.9.10 looks for a checksums file next to the builder's code via a
  # path check that imports `importlib_resources`, a package it only
  # declares for Python < 3.9. Pointing code_path at this file skips that.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(
        builder=self,
        description='MVTec AD: industrial anomaly detection, pixel masks.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'mask': tfds.features.Image(shape=(None, None, 1)),
            'label': tfds.features.ClassLabel(names=['normal', 'anomalous']),
            'defect': tfds.features.Text(),
            'filename': tfds.features.Text(),
        }),
        homepage='https://www.mvtec.com/company/research/datasets/mvtec-ad',
        disable_shuffling=True,  # Keep the sorted order of the files path.
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    category = self.builder_config.name
    splits = {split: mvtec.list_samples(root, category, split)
              for split in ('train', 'test', 'validation')}
    return {split: self._generate_examples(root / category, samples)
            for split, samples in splits.items() if samples}

  def _generate_examples(self, cat_dir, samples):
    for i, s in enumerate(samples):
      image = images.load_rgb(s.image)
      if s.mask is None:
        mask = np.zeros((image.height, image.width), np.uint8)
      else:
        m = images.load_mask(s.mask)
        if m.size != image.size:
          raise UserError(
              f'mask {s.mask} is {m.height}x{m.width} but its image {s.image} '
              f'is {image.height}x{image.width}; they must match.')
        mask = (np.asarray(m) > 0.5).astype(np.uint8) * 255
      # Zero-padded keys: sorted key order == file order.
      yield f'{i:07d}', {
          'image': image,
          'mask': PIL.Image.fromarray(mask, mode='L'),
          'label': s.label,
          'defect': s.defect,
          'filename': s.image.relative_to(cat_dir).as_posix(),
      }


def builder(category: str, data_dir: Optional[str] = None) -> MvtecAd:
  """The builder for `category` (a custom config for non-MVTec names)."""
  config = category
  if category not in mvtec.CATEGORIES:
    config = tfds.core.BuilderConfig(name=category)
  return MvtecAd(config=config, data_dir=data_dir, file_format='array_record')


def prepare(root, category: str, data_dir: Optional[str] = None) -> MvtecAd:
  """Builds (once) the category's array_record files from the MVTec tree."""
  b = builder(category, data_dir)
  if not b.is_prepared():
    for split in ('train', 'test'):  # Clear UserErrors before tfds starts.
      mvtec.list_samples(root, category, split)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(root)))
  return b


class TfdsDataset:
  """A split of a prepared MvtecAd, with the files path's transform."""

  def __init__(self, b: MvtecAd, split: str, geometry: images.Geometry,
               root: Optional[str] = None):
    self.name = b.builder_config.name
    self.source = b.as_data_source(split=split)
    self.geometry = geometry
    self.has_masks = split == 'test'
    self._root = Path(root) / self.name if root else Path(self.name)
    if len(self.source) == 0:
      raise UserError(f'{b.data_path}: split {split} is empty; delete this '
                      'folder and fix the source tree.')
    if geometry.square or geometry.crop:
      self.image_hw = geometry.output_hw((1, 1))
    else:
      self.image_hw = geometry.output_hw(self.source[0]['image'].shape[:2])

  def __len__(self) -> int:
    return len(self.source)

  def load(self, i: int) -> dict:
    r = self.source[i]
    mask = PIL.Image.fromarray((r['mask'][..., 0] > 127).astype(np.float32),
                               mode='F')
    defect = r['defect']
    defect = defect.decode() if isinstance(defect, bytes) else str(defect)
    filename = r['filename']
    filename = filename.decode() if isinstance(filename, bytes) else str(filename)
    return images.transform_example(
        PIL.Image.fromarray(r['image']), mask, self.geometry,
        expected_hw=self.image_hw, label=int(r['label']),
        path=str(self._root / filename), defect=defect)


def build(root, category: str, split: str, geometry: images.Geometry,
          data_dir: Optional[str] = None) -> Optional[TfdsDataset]:
  """Kind 'mvtec_tfds': prepares the category if needed, then reads it.

  split 'validation' is None where the prepared category has none.
  """
  if split not in ('train', 'test', 'validation'):
    raise ValueError(f"split must be 'train', 'test' or 'validation', got "
                     f'{split!r}')
  b = prepare(root, category, data_dir)
  if split == 'validation' and split not in b.info.splits:
    # The source tree may be gone once prepared: only look if it is there.
    good = Path(root) / category / split / 'good'
    if good.is_dir() and images.list_images(good):
      raise UserError(
          f'{good} holds validation images, but {b.data_path} was prepared '
          'without them; delete that folder to rebuild it with them.')
    return None
  return TfdsDataset(b, split, geometry, root=str(root))

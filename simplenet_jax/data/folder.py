"""A user's own images: one folder of normal training images, named test folders.

  dataset.train_dir = 'my/train'                   normal images only
  dataset.test_dirs = {'good': 'my/ok', 'scratch': 'my/scratch'}
  dataset.mask_dir  = 'my/masks'                   optional
  dataset.val_dir   = 'my/val'                     optional, normal images

Normal images in val_dir are not trained on; they set the decision threshold
(instead of a hold-out of the training images).

A test folder named 'good' or 'normal' holds normal images (label 0); any
other name holds anomalous ones (label 1) and is the `defect` string; names
with no folder ('') are left out, and at least one normal and one anomalous
folder must be set. On the command line any name can be given
(--config.dataset.test_dirs.<name>=DIR; cli.py). With a
mask_dir, the mask of an anomalous image <stem>.<ext> is looked up as
<stem>_mask.<ext> or <stem>.<ext> in mask_dir/<name>/, then in mask_dir/.
"""

from pathlib import Path

from simplenet_jax.data import images
from simplenet_jax.errors import UserError

NORMAL_NAMES = ('good', 'normal')


def _dir(value: str, key: str) -> Path:
  if not value:
    raise UserError(f'config.{key} is not set; point it to a folder of images.')
  path = Path(value).expanduser()
  if not path.is_dir():
    raise UserError(f'config.{key}={value}: no such folder.')
  return path


def _images(path: Path, key: str) -> list[Path]:
  found = images.list_images(path)
  if not found:
    raise UserError(f'config.{key}={path}: no images in this folder (accepted: '
                    f'{", ".join(images.IMAGE_EXTENSIONS)}).')
  return found


def list_samples(dataset_cfg, split: str) -> list[images.Sample]:
  if split == 'train':
    d = _dir(dataset_cfg.train_dir, 'dataset.train_dir')
    return [images.Sample(p, None, 0, 'good')
            for p in _images(d, 'dataset.train_dir')]
  if split == 'validation':
    if not dataset_cfg.val_dir:
      return []
    d = _dir(dataset_cfg.val_dir, 'dataset.val_dir')
    return [images.Sample(p, None, 0, 'good')
            for p in _images(d, 'dataset.val_dir')]
  if split != 'test':
    raise ValueError(f"split must be 'train', 'test' or 'validation', got "
                     f'{split!r}')
  # '' is a name the config file offers but the user did not set
  # (configs/folder.py has 'good' and 'defect'): left out.
  test_dirs = {k: v for k, v in dict(dataset_cfg.test_dirs).items() if v}
  normal = [k for k in test_dirs if k.lower() in NORMAL_NAMES]
  if not normal or len(normal) == len(test_dirs):
    missing = ('normal test images, as --config.dataset.test_dirs.good=DIR'
               if not normal else 'anomalous test images, as '
               '--config.dataset.test_dirs.<defect name>=DIR (one per defect '
               'type, e.g. test_dirs.crack=DIR)')
    raise UserError(f'config.dataset.test_dirs has no folder of {missing}.')
  mask_dir = (_dir(dataset_cfg.mask_dir, 'dataset.mask_dir')
              if dataset_cfg.mask_dir else None)
  samples = []
  for name in sorted(test_dirs):
    key = f'dataset.test_dirs.{name}'
    normal = name.lower() in NORMAL_NAMES
    for p in _images(_dir(test_dirs[name], key), key):
      mask = None
      if mask_dir is not None and not normal:
        mask = (images.find_mask(mask_dir / name, p.stem) or
                images.find_mask(mask_dir, p.stem))
        if mask is None:
          raise UserError(
              f'anomalous image {p} has no mask: expected {mask_dir / name}/'
              f'{p.stem}_mask.png or {mask_dir}/{p.stem}_mask.png (or '
              f'{p.stem}.png). Add it, or unset config.dataset.mask_dir.')
      samples.append(images.Sample(p, mask, int(not normal), name))
  return samples


def build(dataset_cfg, category: str, split: str, geometry: images.Geometry):
  """images.FileDataset; has_masks only for the test split when
  dataset.mask_dir is set. None for 'validation' without dataset.val_dir."""
  samples = list_samples(dataset_cfg, split)
  if not samples:  # Only 'validation' may be empty (the others raise).
    return None
  return images.FileDataset(
      name=category, samples=samples, geometry=geometry,
      has_masks=split == 'test' and bool(dataset_cfg.mask_dir))

"""MVTec AD layout on disk.

  <root>/<category>/train/good/*.png
  <root>/<category>/validation/good/*.png        optional (MVTec LOCO AD's)
  <root>/<category>/test/<defect>/*.png          ('good' = normal)
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png

validation/good holds normal images that are not trained on; where it exists
they set the decision threshold (evaluate.decision_threshold).

Masks are paired with images by file name, never by sorted position.
"""

from pathlib import Path

from simplenet_jax.data import images
from simplenet_jax.errors import UserError

TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood')
OBJECTS = ('bottle', 'cable', 'capsule', 'hazelnut', 'metal_nut', 'pill',
           'screw', 'toothbrush', 'transistor', 'zipper')
CATEGORIES = tuple(sorted(TEXTURES + OBJECTS))  # The released code's order.


def _subdirs(path: Path) -> list[Path]:
  return sorted(p for p in path.iterdir()
                if p.is_dir() and not p.name.startswith('.'))


def list_samples(root, category: str, split: str) -> list[images.Sample]:
  """The split's images (sorted by defect, then name) with their masks.

  split 'validation' is optional: no validation/good folder gives [].
  """
  if split not in ('train', 'test', 'validation'):
    raise ValueError(f"split must be 'train', 'test' or 'validation', got "
                     f'{split!r}')
  root = Path(root)
  if not root.is_dir():
    raise UserError(f'dataset root {root} does not exist; set '
                    '--config.dataset.root to the folder that holds the '
                    'category folders (<root>/<category>/train/good).')
  cat_dir = root / category
  if not cat_dir.is_dir():
    found = [p.name for p in _subdirs(root)]
    raise UserError(f'category folder {cat_dir} does not exist (found: '
                    f'{", ".join(found) or "nothing"}); fix '
                    '--config.dataset.categories or --config.dataset.root.')
  split_dir = cat_dir / split
  if split == 'validation':
    good = split_dir / 'good'
    return [images.Sample(image=p, mask=None, label=0, defect='good')
            for p in images.list_images(good)] if good.is_dir() else []
  if not split_dir.is_dir():
    raise UserError(f'{split_dir} does not exist; a category folder needs '
                    'train/good/ and test/<defect>/ (MVTec AD layout).')
  defect_dirs = [split_dir / 'good'] if split == 'train' else _subdirs(split_dir)
  samples = []
  for d in defect_dirs:
    if not d.is_dir():
      continue
    normal = d.name == 'good'
    for p in images.list_images(d):
      mask = None
      if not normal:
        mask = images.find_mask(cat_dir / 'ground_truth' / d.name, p.stem)
        if mask is None:
          expected = cat_dir / 'ground_truth' / d.name / f'{p.stem}_mask.png'
          raise UserError(f'defect image {p} has no mask; expected {expected}. '
                          'Add the mask or move the image out of test/.')
      samples.append(images.Sample(image=p, mask=mask, label=int(not normal),
                                   defect=d.name))
  if not samples:
    where = split_dir / 'good' if split == 'train' else split_dir / '<defect>'
    raise UserError(f'no images in {where} (accepted: '
                    f'{", ".join(images.IMAGE_EXTENSIONS)}); add images there '
                    'or fix --config.dataset.root.')
  return samples


def build(root, category: str, split: str, geometry: images.Geometry):
  """An MVTec-layout category split (images.FileDataset); has_masks for the
  test split. None for a 'validation' split the category does not have."""
  samples = list_samples(root, category, split)
  if not samples:  # Only 'validation' may be empty (list_samples raises).
    return None
  return images.FileDataset(name=category, samples=samples,
                            geometry=geometry, has_masks=split == 'test')

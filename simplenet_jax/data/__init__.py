"""Datasets for SimpleNet: `categories(cfg)` and `build(cfg, category, split)`.

A dataset has __len__, load(i) -> dict(image (H,W,3) uint8, mask (H,W) uint8
in {0,1}, label int 0 normal / 1 anomalous, path str, defect str) and the
attributes name, has_masks (False: skip pixel metrics), image_hw (H, W);
optionally labels() -> (N,) every label without reading the images (the
file kinds and cifar10: an evaluation without masks then keeps only the
maps it can show).
`loader.batches` turns one into batches; `image_ids` names its images.

dataset.kind:
  mvtec       MVTec AD layout under dataset.root (also any category in it).
  mvtec_tfds  the same tree through the tensorflow-datasets builder.
  folder      dataset.train_dir / dataset.test_dirs / dataset.mask_dir.
  cifar10     one-class CIFAR-10 via tfds (category = the normal class).
  demo        texture tiles generated into <workdir>/demo_data.
"""

from pathlib import Path
from typing import Optional
import zlib

from simplenet_jax.data import images
from simplenet_jax.data import mvtec
from simplenet_jax.errors import UserError

KINDS = ('mvtec', 'mvtec_tfds', 'folder', 'cifar10', 'demo')


def _textures(cfg) -> set[str]:
  return set(mvtec.TEXTURES) | set(cfg.textures)


def categories(dataset_cfg) -> list[tuple[str, str]]:
  """[(category, 'texture' | 'object')] that the config asks for, in order.

  The home of the category-name rules (`config_checks.validate` calls it):
  a name the dataset kind does not have raises a UserError naming
  config.dataset.categories. dataset_cfg.categories is a tuple of names
  (validate splits 'a,b' from the command line).
  """
  kind = dataset_cfg.kind
  requested = list(dataset_cfg.categories)
  if kind == 'cifar10':
    from simplenet_jax.data import cifar10  # pylint: disable=g-import-not-at-top
    if dataset_cfg.normal_class >= 0:  # -1..9: config_checks.validate.
      names = [cifar10.CLASSES[dataset_cfg.normal_class]]
    else:
      names = list(cifar10.CLASSES) if requested in ([], ['all']) else requested
      for n in names:
        cifar10.class_index(n)
    return [(n, 'object') for n in names]
  if kind == 'folder':
    if len(requested) > 1:
      raise UserError(f'config.dataset.categories={requested}: kind folder '
                      'takes one category name (or all).')
    name = 'folder' if requested in ([], ['all']) else requested[0]
    return [(name, 'texture' if name in _textures(dataset_cfg) else 'object')]
  if kind == 'demo':
    from simplenet_jax.data import demo  # pylint: disable=g-import-not-at-top
    out = []
    for n in requested or ['all']:
      for c in (demo.CATEGORIES if n == 'all' else [n]):
        if c not in demo.CATEGORIES:
          raise UserError(f'config.dataset.categories: {c!r} is not a demo '
                          f'category ({", ".join(demo.CATEGORIES)}).')
        if (c, 'texture') not in out:
          out.append((c, 'texture'))
    return out
  textures = _textures(dataset_cfg)
  out = []
  for n in requested or ['all']:
    for c in (mvtec.CATEGORIES if n == 'all' else [n]):
      entry = (c, 'texture' if c in textures else 'object')
      if entry not in out:
        out.append(entry)
  return out


def build(dataset_cfg, category: str, split: str,
          workdir: Optional[str] = None):
  """The dataset of `category`'s `split` ('train' | 'test' | 'validation').

  'validation' (normal images kept out of training, for the decision
  threshold) is optional: None where the category has none (always for
  cifar10).
  """
  if split not in ('train', 'test', 'validation'):
    raise ValueError(f"split must be 'train', 'test' or 'validation', got "
                     f'{split!r}')
  kind = dataset_cfg.kind
  if split == 'validation' and kind == 'cifar10':
    return None
  if kind == 'cifar10':
    from simplenet_jax.data import cifar10  # pylint: disable=g-import-not-at-top
    return cifar10.build(category, split, dataset_cfg.resize,
                         dataset_cfg.tfds_data_dir or None)
  if kind == 'demo':
    from simplenet_jax.data import demo  # pylint: disable=g-import-not-at-top
    if workdir is None:
      raise UserError("config.dataset.kind='demo' needs a workdir to write "
                      'its data into; pass --workdir.')
    root = demo.build(Path(workdir) / 'demo_data')
    return mvtec.build(root, category, split,
                       images.geometry_for(dataset_cfg, 'texture'))
  texture = category in _textures(dataset_cfg)
  geometry = images.geometry_for(dataset_cfg,
                                 'texture' if texture else 'object')
  if kind == 'mvtec':
    return mvtec.build(dataset_cfg.root, category, split, geometry)
  if kind == 'mvtec_tfds':
    from simplenet_jax.data import mvtec_tfds  # pylint: disable=g-import-not-at-top
    return mvtec_tfds.build(dataset_cfg.root, category, split, geometry,
                            dataset_cfg.tfds_data_dir or None)
  if kind == 'folder':
    from simplenet_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.build(dataset_cfg, category, split, geometry)
  raise ValueError(f'unknown dataset kind {kind!r} (see KINDS)')


ID_KINDS = ('crc32', 'size')


def image_ids(dataset, indices, kind: str = 'crc32') -> list[str]:
  """What identifies dataset[i] for i in `indices`, to tell whether a run's
  images are still the ones it trained on: a file's name and, with kind
  'crc32', a CRC-32 of its bytes (an image edited in place changes it, a
  copied folder keeps it; no decoding), with 'size' its size in bytes (what
  checkpoints recorded before the CRC). For the tfds-backed kinds, fixed
  once prepared: the position."""
  if kind not in ID_KINDS:
    raise ValueError(f'unknown image id kind {kind!r} (see ID_KINDS)')
  if isinstance(dataset, images.FileDataset):
    paths = (dataset.samples[int(i)].image for i in indices)
    if kind == 'size':
      return [f'{p.name}:{p.stat().st_size}' for p in paths]
    return [f'{p.name}:{zlib.crc32(p.read_bytes()):08x}' for p in paths]
  return [str(int(i)) for i in indices]


def geometry(dataset_cfg, kind: str) -> images.Geometry:
  """How `build` sizes the images of a category of `kind` (predict needs it)."""
  if dataset_cfg.kind == 'cifar10':
    return images.Geometry(square=int(dataset_cfg.resize))
  if dataset_cfg.kind == 'demo':
    kind = 'texture'
  return images.geometry_for(dataset_cfg, kind)

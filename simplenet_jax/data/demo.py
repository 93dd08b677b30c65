"""An offline demo data set made from real texture photographs.

scikit-image ships three 512x512 grayscale photographs of textures (brick,
grass, gravel; public domain). `build` tiles each into an MVTec-layout
category: training tiles from the top band of the photo except its right
edge, validation tiles (normal, for the decision threshold) from that right
edge, so they share no pixel with a training tile, test tiles from the
disjoint bottom band, and defective test tiles with synthetic defects:

  hole     dark blobs (1-3 overlapping ellipses)
  patch    a rectangle pasted from another of the three photographs
  scratch  a thin dark or bright polyline, 1-2 px wide

Every pixel inside a defect differs from the clean tile and every pixel
outside it is the clean tile's, so ground_truth masks are exact.
demo_manifest.json records where each tile was cut (for tests and audits).
"""

import json
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np
import PIL.Image
from scipy import ndimage

from simplenet_jax.errors import UserError

CATEGORIES = ('brick', 'grass', 'gravel')
DEFECTS = ('hole', 'patch', 'scratch')
MANIFEST = 'demo_manifest.json'
# Bump when the generated images change. 2: validation tiles (the training
# tiles leave the right edge to them); the test tiles are version 1's.
_VERSION = 2


def photographs() -> dict[str, np.ndarray]:
  """Category -> (512, 512) uint8 grayscale photograph from scikit-image."""
  import skimage.data  # pylint: disable=g-import-not-at-top  (demo extra)
  return {c: np.asarray(getattr(skimage.data, c)(), np.uint8) for c in CATEGORIES}


def _test_band_top(photo_h: int, tile: int) -> int:
  """First row of the bottom band that test tiles are cut from."""
  top = photo_h - (tile + 96)
  if top < tile:
    raise ValueError(f'tile={tile} too large for a {photo_h}-row photograph')
  return top


def _hole(rng, clean):
  t = clean.shape[0]
  from skimage import draw  # pylint: disable=g-import-not-at-top
  region = np.zeros_like(clean, bool)
  cy, cx = rng.integers(t // 5, t - t // 5, size=2)
  for _ in range(rng.integers(1, 4)):
    ry, rx = rng.uniform(t / 32, t / 10, size=2)
    rr, cc = draw.ellipse(cy + rng.integers(-t // 16, t // 16 + 1),
                          cx + rng.integers(-t // 16, t // 16 + 1), ry, rx,
                          shape=clean.shape, rotation=rng.uniform(0, np.pi))
    region[rr, cc] = True
  value = rng.uniform(5, 30) + rng.normal(0, 4, clean.shape)
  return region, np.clip(np.round(value), 0, 255).astype(np.uint8), {}


def _patch(rng, clean, photos, category):
  t = clean.shape[0]
  others = [c for c in CATEGORIES if c != category]
  source = others[rng.integers(len(others))]
  ph, pw = rng.integers(t // 6, t // 3 + 1, size=2)
  top, left = rng.integers(0, t - ph + 1), rng.integers(0, t - pw + 1)
  photo = photos[source]
  sy = rng.integers(0, photo.shape[0] - ph + 1)
  sx = rng.integers(0, photo.shape[1] - pw + 1)
  region = np.zeros_like(clean, bool)
  region[top:top + ph, left:left + pw] = True
  new = clean.copy()
  new[top:top + ph, left:left + pw] = photo[sy:sy + ph, sx:sx + pw]
  return region, new, {'patch_source': source}


def _scratch(rng, clean):
  t = clean.shape[0]
  from skimage import draw  # pylint: disable=g-import-not-at-top
  region = np.zeros_like(clean, bool)
  y, x = rng.uniform(t / 5, 4 * t / 5, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  for _ in range(rng.integers(1, 4)):
    length = rng.uniform(t / 8, t / 4)
    angle += rng.uniform(-0.5, 0.5)
    y2 = np.clip(y + length * np.sin(angle), 0, t - 1)
    x2 = np.clip(x + length * np.cos(angle), 0, t - 1)
    rr, cc = draw.line(int(round(y)), int(round(x)), int(round(y2)), int(round(x2)))
    region[rr, cc] = True
    y, x = y2, x2
  if rng.random() < 0.5:
    region = ndimage.binary_dilation(region, np.ones((2, 2), bool))
  base = rng.uniform(0, 35) if rng.random() < 0.5 else rng.uniform(220, 255)
  value = base + rng.normal(0, 3, clean.shape)
  return region, np.clip(np.round(value), 0, 255).astype(np.uint8), {}


def defect(rng, clean: np.ndarray, kind: str, photos, category: str):
  """(defective tile, exact bool mask, extra manifest info) for one tile."""
  if kind == 'hole':
    region, new, info = _hole(rng, clean)
  elif kind == 'patch':
    region, new, info = _patch(rng, clean, photos, category)
  elif kind == 'scratch':
    region, new, info = _scratch(rng, clean)
  else:
    raise ValueError(f'unknown defect {kind!r}')
  # Where the new value happens to equal the clean one, push it away, so the
  # mask is exactly the set of changed pixels.
  bumped = np.where(clean < 128, clean.astype(np.int16) + 48,
                    clean.astype(np.int16) - 48).astype(np.uint8)
  new = np.where(new == clean, bumped, new)
  out = np.where(region, new, clean)
  return out, region, info


def _save(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(array, mode='L').save(path)


def _write(out: Path, seed: int, tile: int, num_train: int, num_val: int,
           num_test_good: int, num_defect_each: int) -> dict:
  photos = photographs()
  files = {}
  for ci, category in enumerate(CATEGORIES):
    rng = np.random.default_rng([seed, ci])
    photo = photos[category]
    h, w = photo.shape
    band = _test_band_top(h, tile)

    def cut(rows, rel, kind, cols=(0, w), rng=rng, category=category,
            photo=photo):
      top = int(rng.integers(rows[0], rows[1] - tile + 1))
      left = int(rng.integers(cols[0], cols[1] - tile + 1))
      files[rel] = dict(source=category, top=top, left=left, size=tile,
                        defect=kind)
      return photo[top:top + tile, left:left + tile]

    # The rightmost tile-wide strip of the top band is the validation tiles'
    # only: tiles that overlap training tiles score like training data and
    # would set the threshold too low. Their own generator keeps the test
    # tiles' draws (and so the test tiles) as they were.
    val_rng = np.random.default_rng([seed, ci, 1])
    for i in range(num_train):
      rel = f'{category}/train/good/{i:03d}.png'
      _save(out / rel, cut((0, band), rel, 'good', cols=(0, w - tile)))
    for i in range(num_val):
      rel = f'{category}/validation/good/{i:03d}.png'
      _save(out / rel, cut((0, band), rel, 'good', cols=(w - tile, w),
                           rng=val_rng))
    for i in range(num_test_good):
      rel = f'{category}/test/good/{i:03d}.png'
      _save(out / rel, cut((band, h), rel, 'good'))
    for kind in DEFECTS:
      for i in range(num_defect_each):
        rel = f'{category}/test/{kind}/{i:03d}.png'
        clean = cut((band, h), rel, kind)
        image, mask, info = defect(rng, clean, kind, photos, category)
        files[rel].update(info, mask=f'{category}/ground_truth/{kind}/{i:03d}_mask.png')
        _save(out / rel, image)
        _save(out / files[rel]['mask'], mask.astype(np.uint8) * 255)
  return files


def built_version(root) -> int | None:
  """The version of the demo data under `root`, None where there is none."""
  try:
    return int(json.loads((Path(root) / MANIFEST).read_text())['params']
               ['version'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _refuse_replacing_under_runs(root: Path) -> None:
  """Older demo data under `root` is not replaced while its workdir (root's
  parent) holds checkpoints trained on it: those runs would be evaluated
  (and their thresholds reported) on tiles they were not made with."""
  old = built_version(root)
  if old is None or old == _VERSION:
    return
  workdir = root.parent
  trained = sorted(p.parent.name for p in workdir.glob('*/checkpoints'))
  if trained:
    raise UserError(
        f'{workdir} holds runs ({", ".join(trained)}) trained on version '
        f'{old} of the demo data; this version builds version {_VERSION}. '
        'Use a new --workdir (or delete that one) to train on it.')


def build(root, seed: int = 0, *, tile: int = 128, num_train: int = 20,
          num_val: int = 6, num_test_good: int = 10,
          num_defect_each: int = 5) -> Path:
  """Writes the demo data set under `root` (MVTec layout) unless it is there.

  Deterministic given the arguments; written to a temporary folder and
  renamed, so an interrupted run leaves nothing half-written. Returns root.
  Per category: num_train training tiles, num_val validation tiles,
  num_test_good normal and 3 * num_defect_each defective test tiles, all
  tile x tile grayscale PNGs.
  """
  root = Path(root)
  params = dict(version=_VERSION, seed=seed, tile=tile, num_train=num_train,
                num_val=num_val, num_test_good=num_test_good,
                num_defect_each=num_defect_each)

  def current() -> bool:
    try:
      return json.loads((root / MANIFEST).read_text())['params'] == params
    except (OSError, ValueError, KeyError):
      return False

  if current():
    return root
  _refuse_replacing_under_runs(root)
  if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
    raise UserError(f'{root} exists and is not a demo data folder (no '
                    f'{MANIFEST}); move it away or use another --workdir.')
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
  try:
    files = _write(tmp, seed, tile, num_train, num_val, num_test_good,
                   num_defect_each)
    (tmp / MANIFEST).write_text(json.dumps(dict(params=params, files=files),
                                           indent=1, sort_keys=True))
    if root.exists():  # An older demo version, or an empty folder.
      shutil.rmtree(root)
    os.rename(tmp, root)
  except OSError:
    if not current():  # Not another process finishing first: a real error.
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root

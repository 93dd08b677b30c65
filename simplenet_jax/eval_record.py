"""What the report needs from a category's final evaluation, kept on disk.

<workdir>/<category>/evaluation/record.json holds the test images' names,
labels and scores, the decision threshold, the image ROC and PRO curve
points and the gallery selections; evaluation/gallery/<index>.jpg the
gallery tiles (`visualize.gallery_tile`). `evaluate.evaluate_category` writes
them after the final evaluation and `report_html` reads them, so the report
can be rendered again from the workdir alone (no JAX, no data set).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from simplenet_jax import visualize

DIR = 'evaluation'
RECORD = 'record.json'
GALLERY_DIR = 'gallery'
# The PRO curve is stored thinned to about this many points (for the plot).
PRO_CURVE_POINTS = 1000
# (key, heading, what it shows) in the report's order.
GALLERIES = (
    ('top_defects', 'Highest-scoring defects',
     'anomalous test images with the highest image scores'),
    ('false_positives', 'Worst false positives',
     'normal test images with the highest scores'),
    ('false_negatives', 'Worst false negatives',
     'anomalous test images with the lowest scores'),
)


def directory(category_dir: str) -> str:
  return os.path.join(category_dir, DIR)


def select_galleries(scores, labels, n: int) -> dict[str, list[int]]:
  """Test-image indices of each gallery, at most n each, worst first.

  A gallery may repeat images of another (a category with three defects
  shows the same three as its top defects and its false negatives, in
  opposite orders); ties keep the test-set order.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  # nan (a broken score) sorts as the most suspicious in every gallery.
  key = np.where(np.isfinite(scores), scores, np.inf)
  anomalous = np.flatnonzero(labels)
  normal = np.flatnonzero(~labels)
  desc_a = anomalous[np.argsort(-key[anomalous], kind='stable')]
  desc_n = normal[np.argsort(-key[normal], kind='stable')]
  asc_a = anomalous[np.argsort(np.where(np.isfinite(scores[anomalous]),
                                        scores[anomalous], -np.inf),
                               kind='stable')]
  return {'top_defects': desc_a[:n].tolist(),
          'false_positives': desc_n[:n].tolist(),
          'false_negatives': asc_a[:n].tolist()}


def _finite(x):
  x = float(x)
  return x if math.isfinite(x) else None


def write(category_dir: str, record: dict, items, scale: int = 1) -> str:
  """Writes record.json and the gallery tiles of `items`.

  Args:
    category_dir: <workdir>/<category>.
    record: JSON-able fields; 'scores' may hold nan (stored as null) and
      'map_range' [lo, hi] or None (then the range of the items' maps).
    items: (index, image, anomaly map, mask or None) of the test images the
      galleries show.
    scale: the tiles' pixel scale (`visualize.display_scale`).

  Returns:
    The path of record.json. Tiles of an earlier evaluation are removed.
  """
  d = directory(category_dir)
  gallery = os.path.join(d, GALLERY_DIR)
  shutil.rmtree(gallery, ignore_errors=True)
  os.makedirs(gallery, exist_ok=True)
  items = list(items)
  lo, hi = record.get('map_range') or (None, None)
  if lo is None and items:
    lo = min(float(np.nanmin(m)) for _, _, m, _ in items)
    hi = max(float(np.nanmax(m)) for _, _, m, _ in items)
  tiles = {}
  for index, image, amap, mask in items:
    name = f'{index:05d}.jpg'
    with open(os.path.join(gallery, name), 'wb') as f:
      f.write(visualize.gallery_tile(image, amap, mask, lo, hi, scale=scale))
    tiles[str(index)] = f'{GALLERY_DIR}/{name}'
  record = dict(record, map_range=None if lo is None else [lo, hi],
                tiles=tiles, scores=[_finite(s) for s in record['scores']])
  path = os.path.join(d, RECORD)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, ensure_ascii=False, allow_nan=False)
  os.replace(tmp, path)
  return path


def load(category_dir: str) -> dict | None:
  """The record of the category's last final evaluation, or None."""
  path = os.path.join(directory(category_dir), RECORD)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def tile_path(category_dir: str, record: dict, index: int) -> str | None:
  rel = record.get('tiles', {}).get(str(index))
  return os.path.join(directory(category_dir), rel) if rel else None

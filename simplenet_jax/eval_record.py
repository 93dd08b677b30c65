"""What the report needs from a category's final evaluation, kept on disk.

<workdir>/<category>/evaluation/record.json holds the test images' names,
labels and scores, the decision threshold, the image ROC and PRO curve
points and the gallery selections; evaluation/gallery/<index>.jpg the
gallery tiles (`visualize.gallery_tile`). `evaluate.evaluate_category` writes
them after the final evaluation and `report_html` reads them, so the report
can be rendered again from the workdir alone (no JAX, no data set). With
eval.yardstick the record also holds, under KNN, kNN's maps of the same
gallery images (`add_yardstick`; tiles in evaluation/gallery_knn/).
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
# eval.yardstick: kNN's maps of the gallery images (`add_yardstick`).
KNN = 'knn'
KNN_GALLERY_DIR = 'gallery_knn'
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


def shown(galleries: dict[str, list[int]]) -> list[int]:
  """The test-image indices `galleries` show, ascending."""
  return sorted({i for v in galleries.values() for i in v})


def _range(map_range, items):
  """[lo, hi] of the maps' colours: map_range, else the items' maps."""
  if map_range:
    return [float(map_range[0]), float(map_range[1])]
  if not items:
    return None
  return [min(float(np.nanmin(m)) for _, _, m, _ in items),
          max(float(np.nanmax(m)) for _, _, m, _ in items)]


def _write_tiles(d: str, sub: str, items, map_range, **tile_kwargs) -> dict:
  """Tiles of `items` in d/sub (emptied first): {str(index): 'sub/name'}."""
  gallery = os.path.join(d, sub)
  shutil.rmtree(gallery, ignore_errors=True)
  os.makedirs(gallery, exist_ok=True)
  lo, hi = map_range or (None, None)
  tiles = {}
  for index, image, amap, mask in items:
    name = f'{index:05d}.jpg'
    with open(os.path.join(gallery, name), 'wb') as f:
      f.write(visualize.gallery_tile(image, amap, mask, lo, hi, **tile_kwargs))
    tiles[str(index)] = f'{sub}/{name}'
  return tiles


def _dump(d: str, record: dict) -> str:
  path = os.path.join(d, RECORD)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, ensure_ascii=False, allow_nan=False)
  os.replace(tmp, path)
  return path


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
    The path of record.json. Tiles of an earlier evaluation, and its
    yardstick's, are removed.
  """
  d = directory(category_dir)
  shutil.rmtree(os.path.join(d, KNN_GALLERY_DIR), ignore_errors=True)
  items = list(items)
  map_range = _range(record.get('map_range'), items)
  tiles = _write_tiles(d, GALLERY_DIR, items, map_range, scale=scale)
  record = {k: v for k, v in record.items() if k != KNN}
  record.update(map_range=map_range, tiles=tiles,
                scores=[_finite(s) for s in record['scores']])
  return _dump(d, record)


def add_yardstick(category_dir: str, items, scores: dict, map_range,
                  scale: int = 1) -> str:
  """Adds kNN's maps of the gallery images to the category's record.

  Args:
    category_dir: <workdir>/<category>, whose record (`write`) exists.
    items: (index, image, kNN anomaly map, mask or None) of the images the
      record's galleries show (`shown`).
    scores: {index: kNN image score} of those images.
    map_range: [lo, hi] of kNN's maps over the test set, or None (then the
      items' range). kNN's scores are distances: a scale of their own.
    scale: the tiles' pixel scale.

  Returns:
    The path of record.json, now with record[KNN] = {'map_range', 'tiles'
    (map-only tiles, `visualize.gallery_tile`), 'scores'}.
  """
  record = load(category_dir)
  d = directory(category_dir)
  items = list(items)
  map_range = _range(map_range, items)
  tiles = _write_tiles(d, KNN_GALLERY_DIR, items, map_range, scale=scale,
                       map_heading='kNN map (yardstick)', map_only=True)
  record[KNN] = {'map_range': map_range, 'tiles': tiles,
                 'scores': {str(i): _finite(s) for i, s in scores.items()}}
  return _dump(d, record)


def load(category_dir: str) -> dict | None:
  """The record of the category's last final evaluation, or None."""
  path = os.path.join(directory(category_dir), RECORD)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def tile_path(category_dir: str, record: dict, index: int,
              yardstick: bool = False) -> str | None:
  """The gallery tile of test image `index` (kNN's with yardstick), or None."""
  tiles = (record.get(KNN) or {}) if yardstick else record
  rel = tiles.get('tiles', {}).get(str(index))
  return os.path.join(directory(category_dir), rel) if rel else None

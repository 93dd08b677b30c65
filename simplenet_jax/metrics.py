"""Image AUROC, pixel AUROC and AUPRO (the MVTec AD definitions).

Undefined metrics (a test set with one class only, non-finite scores) give
float('nan') and a `MetricWarning` naming the metric and the reason; tables
print nan as "n/a". Nothing here raises on such data.

Pixel metrics are streamed: `PixelMetrics.add` copies each batch into one
float32 buffer of scores and one bool buffer of masks, and both metrics come
from a single descending sort of all pixel scores (O(P log P), exact at every
distinct threshold, tied pixels entering together). The same sort also gives
the PRO curve up to the AUPRO limit, and `image_roc` the image ROC curve, for
the report's plots.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage


class MetricWarning(UserWarning):
  """A metric is undefined on the given data and was reported as nan."""


# Each category's warning matters; the default filter would show one per line.
warnings.filterwarnings('always', category=MetricWarning)


def _undefined(metric: str, why: str) -> float:
  warnings.warn(f'{metric} is undefined ({why}); reporting nan.',
                MetricWarning, stacklevel=3)
  return float('nan')


def _sklearn_metrics():
  """sklearn.metrics, imported on first use: it takes about a second to
  import, and predict and export, which import this module, never need it."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return metrics


def image_auroc(scores, labels) -> float:
  """Area under the ROC curve of image scores.

  Args:
    scores: (N,) anomaly scores, higher = more anomalous.
    labels: (N,) ints or bools, 1 = anomalous, 0 = normal.

  Returns:
    The AUROC in [0, 1] (ties count one half), or nan with a `MetricWarning`
    when the test set holds one class only or a score is not finite.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f'image_auroc: {scores.shape[0]} scores but '
                     f'{labels.shape[0]} labels.')
  if not np.isin(labels, (0, 1)).all():
    raise ValueError('image_auroc: labels must be 0 (normal) or 1 (anomalous),'
                     f' got values {np.unique(labels)[:5]}.')
  labels = labels.astype(bool)
  n_pos = int(labels.sum())
  if n_pos == 0 or n_pos == labels.size:
    kind = 'anomalous' if n_pos else 'normal'
    return _undefined('Image AUROC', f'all {labels.size} test images are '
                      f'{kind}; it needs both normal and anomalous images')
  bad = int((~np.isfinite(scores)).sum())
  if bad:
    return _undefined('Image AUROC', f'{bad} image scores are not finite')
  return float(_sklearn_metrics().roc_auc_score(labels, scores))


def image_roc(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
  """The image ROC curve: (fpr, tpr) at every distinct score, from (0, 0) to
  (1, 1); None where `image_auroc` is undefined (one class, non-finite)."""
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(bool)
  n_pos = int(labels.sum())
  if (scores.shape != labels.shape or n_pos in (0, labels.size) or
      not np.isfinite(scores).all()):
    return None
  fpr, tpr, _ = _sklearn_metrics().roc_curve(labels, scores,
                                             drop_intermediate=False)
  return fpr, tpr


def thin_curve(x, y, max_points: int):
  """At most about `max_points` points of a curve with non-decreasing x, for
  plotting: the first and last point, points evenly spaced along x and points
  evenly spaced in index (where the curve is dense), in order."""
  x = np.asarray(x)
  y = np.asarray(y)
  if x.size <= max_points:
    return x, y
  half = max(max_points // 2, 2)
  by_x = np.searchsorted(x, np.linspace(x[0], x[-1], half), side='left')
  by_index = np.linspace(0, x.size - 1, half).round().astype(np.int64)
  keep = np.unique(np.concatenate([[0, x.size - 1], by_x, by_index]))
  keep = keep[keep < x.size]
  return x[keep], y[keep]


def _clip_curve(x: np.ndarray, y: np.ndarray, x_max: float):
  """The points of y(x) with x <= x_max, ending exactly at x_max (the same
  interpolation as `_trapezoid`); x non-decreasing, x[-1] >= x_max."""
  k = int(np.searchsorted(x, x_max, side='right'))
  xs, ys = x[:k], y[:k]
  if x[k - 1] < x_max:
    x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
    xs = np.append(xs, x_max)
    ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
  return xs, ys


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Area under y(x) over [x[0], x_max]; x non-decreasing, x[-1] >= x_max.

  Repeated x values (vertical steps) are kept in order; y at x_max is
  interpolated between the last point at or before it and the next one.
  """
  k = int(np.searchsorted(x, x_max, side='right'))  # Points with x <= x_max.
  area = float(np.sum(0.5 * (y[1:k] + y[:k - 1]) * np.diff(x[:k])))
  if x[k - 1] < x_max:
    x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
    y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    area += 0.5 * (y0 + y_at) * (x_max - x0)
  return float(area)


# Regions are labelled per image: 8-connectivity in-plane (as the MVTec AD
# reference evaluation), no connection across the image axis.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class PixelMetrics:
  """Streams anomaly maps and masks; computes pixel AUROC and AUPRO exactly.

  Memory: one float32 copy of all scores and one bool copy of all masks
  (preallocated when `expected_images` is given, else grown by doubling).
  Computing the metrics takes about 25-35 more bytes per pixel (the sort
  order and per-threshold counts), freed afterwards; `compute()` gets both
  metrics from one sort.

  max_fpr: the AUPRO's FPR limit (config eval.aupro_max_fpr; the MVTec AD
  standard: 0.3), required.
  """

  def __init__(self, expected_images: int | None = None, *,
               max_fpr: float):
    if not 0.0 < max_fpr <= 1.0:
      raise ValueError(f'PixelMetrics: max_fpr must be in (0, 1], got '
                       f'{max_fpr} (config key eval.aupro_max_fpr).')
    if expected_images is not None and expected_images < 0:
      raise ValueError(f'PixelMetrics: expected_images={expected_images}.')
    self.max_fpr = float(max_fpr)
    self._capacity = expected_images or 0
    self._n = 0
    self._scores = None  # (capacity, H, W) float32, allocated on first add.
    self._masks = None  # (capacity, H, W) bool.
    self._nonfinite = 0
    self._min = np.inf
    self._max = -np.inf

  def score_range(self) -> tuple[float, float]:
    """(min, max) of the finite scores added so far, for fixed heat-map limits."""
    return float(self._min), float(self._max)

  def _reserve(self, n_new: int, hw: tuple[int, int]):
    if self._scores is None:
      cap = max(self._capacity, n_new)
      self._scores = np.empty((cap,) + hw, np.float32)
      self._masks = np.empty((cap,) + hw, bool)
      self._capacity = cap
      return
    if self._scores.shape[1:] != hw:
      raise ValueError(f'PixelMetrics.add: maps of size {hw} after maps of '
                       f'size {self._scores.shape[1:]}; all must match.')
    need = self._n + n_new
    if need <= self._capacity:
      return
    cap = max(need, 2 * self._capacity)
    for name in ('_scores', '_masks'):
      old = getattr(self, name)
      new = np.empty((cap,) + hw, old.dtype)
      new[:self._n] = old[:self._n]
      setattr(self, name, new)
      del old  # One buffer at a time is doubled, never both.
    self._capacity = cap

  def add(self, maps, masks=None):
    """Appends a batch.

    Args:
      maps: (B, H, W) anomaly maps (any float dtype; stored as float32).
      masks: (B, H, W) ground truth, nonzero = anomalous (uint8 0/1 or 0/255,
        or bool); None means all pixels normal.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
      raise ValueError(f'PixelMetrics.add: maps must be (B, H, W), got shape '
                       f'{maps.shape}.')
    if masks is not None:
      masks = np.asarray(masks)
      if masks.shape != maps.shape:
        raise ValueError(f'PixelMetrics.add: masks {masks.shape} do not match '
                         f'maps {maps.shape}.')
    b = maps.shape[0]
    self._reserve(b, maps.shape[1:])
    dst = self._scores[self._n:self._n + b]
    dst[...] = maps
    finite = np.isfinite(dst)
    n_bad = int(dst.size - np.count_nonzero(finite))
    self._nonfinite += n_bad
    if dst.size > n_bad:
      vals = dst if n_bad == 0 else dst[finite]
      self._min = min(self._min, float(vals.min()))
      self._max = max(self._max, float(vals.max()))
    if masks is None:
      self._masks[self._n:self._n + b] = False
    else:
      np.not_equal(masks, 0, out=self._masks[self._n:self._n + b])
    self._n += b

  def _check(self, metric: str) -> str | None:
    """Why `metric` is undefined, or None."""
    if self._n == 0:
      return 'no images were added'
    if self._nonfinite:
      return f'{self._nonfinite} pixel scores are not finite'
    n_pos = int(np.count_nonzero(self._masks[:self._n]))
    total = self._masks[:self._n].size
    if n_pos == 0:
      return (f'the masks of all {self._n} images have no anomalous pixel; '
              f'{metric} needs anomalous and normal pixels')
    if n_pos == total:
      return (f'all pixels of all {self._n} images are anomalous; {metric} '
              f'needs anomalous and normal pixels')
    return None

  def _compute(self, curve_points: int = 0) -> dict[str, float]:
    """Both metrics from one descending sort of all pixel scores.

    At each distinct threshold t (a group of tied scores enters at once):
    tp/fp = anomalous/normal pixels scoring >= t, and the PRO = mean over
    regions of the fraction of the region scoring >= t. With `curve_points`
    the PRO curve up to max_fpr comes too (see `compute`).
    """
    scores = self._scores[:self._n].reshape(-1)
    pos = self._masks[:self._n].reshape(-1)
    size = scores.size
    order = np.argsort(scores)[::-1]  # Tie order is irrelevant: merged below.
    # is_end[i]: sorted pixel i is the last of its group of equal scores.
    is_end = np.empty(size, bool)
    s_sorted = scores[order]
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=is_end[:-1])
    del s_sorted
    is_end[-1] = True
    ends = np.flatnonzero(is_end)
    del is_end
    pos_rank = np.flatnonzero(pos[order])  # Sorted ranks of anomalous pixels.
    labels, n_regions = ndimage.label(self._masks[:self._n],
                                      structure=_REGION_STRUCTURE)
    pos_labels = labels.reshape(-1)[order[pos_rank]]  # Region per pixel.
    del labels, order
    n_pos = pos_rank.size
    n_neg = size - n_pos
    tp = np.searchsorted(pos_rank, ends, side='right')
    fp = ends
    fp += 1
    fp -= tp
    out = {}
    # Pixel AUROC: trapezoids between successive thresholds, in exact
    # integers: sum over groups of new_fp * (tp_before + tp_after) / 2.
    d_fp = np.diff(fp, prepend=0)
    twice = int(np.dot(d_fp, tp)) + int(np.dot(d_fp[1:], tp[:-1]))
    out['pixel_auroc'] = twice / (2.0 * n_pos * n_neg)
    # AUPRO: only the curve up to the first point past max_fpr is
    # integrated; the margin of one normal pixel keeps that point in despite
    # rounding.
    limit = math.floor(self.max_fpr * n_neg) + 1
    k = int(np.searchsorted(fp, limit, side='right')) + 1
    tp, fp = tp[:k], fp[:k]
    inv_size = 1.0 / np.bincount(pos_labels, minlength=n_regions + 1)[1:]
    gain = np.concatenate([[0.0], np.cumsum(inv_size[pos_labels - 1])])
    pro_at = np.minimum(gain[tp] / n_regions, 1.0)  # Cumsum rounding.
    fpr = np.concatenate([[0.0], fp / n_neg, [1.0]])
    pro_at = np.concatenate([[0.0], pro_at, [1.0]])
    out['aupro'] = _trapezoid(fpr, pro_at, self.max_fpr) / self.max_fpr
    if curve_points:
      out['pro_curve'] = thin_curve(*_clip_curve(fpr, pro_at, self.max_fpr),
                                    curve_points)
    return out

  def maps(self, images) -> np.ndarray:
    """(k, H, W) float32: the maps of some of the images added (`images`
    indexes them in the order they were added), copied."""
    images = np.asarray(images, np.int64).reshape(-1)
    if images.size and (images.min() < 0 or images.max() >= self._n):
      raise IndexError(f'PixelMetrics.maps: images {images.tolist()} of '
                       f'{self._n} added')
    if self._scores is None:
      return np.empty((0, 0, 0), np.float32)
    return self._scores[:self._n][images]

  def subset(self, images) -> 'PixelMetrics':
    """The metrics of some of the images added: `images` indexes them in the
    order they were added. Copies those images' scores and masks."""
    images = np.asarray(images, np.int64)
    out = PixelMetrics(max_fpr=self.max_fpr)
    if self._n == 0 or not images.size:
      return out
    out._scores = self._scores[:self._n][images]
    out._masks = self._masks[:self._n][images]
    out._n = out._capacity = images.size
    finite = np.isfinite(out._scores)
    out._nonfinite = int(finite.size - np.count_nonzero(finite))
    return out

  def compute(self, curve_points: int = 0) -> dict:
    """{'pixel_auroc': ..., 'aupro': ...} from a single sort.

    Args:
      curve_points: when > 0, also 'pro_curve': (fpr, pro) arrays of the PRO
        curve from (0, 0) up to FPR = max_fpr (its last point interpolated
        there, as AUPRO integrates it), thinned to about this many points
        (`thin_curve`); None where the metrics are undefined.
    """
    why = self._check('pixel AUROC and AUPRO')
    if why:
      nan = _undefined('Pixel AUROC and AUPRO', why)
      out = {'pixel_auroc': nan, 'aupro': nan}
      if curve_points:
        out['pro_curve'] = None
      return out
    return self._compute(curve_points)


def by_defect(scores, labels, defects, pixel: PixelMetrics | None = None,
              threshold: float | None = None) -> dict[str, dict]:
  """The metrics of each kind of defect: its images against every normal
  test image.

  Args:
    scores: (N,) image scores; labels: (N,) 1 = anomalous, 0 = normal.
    defects: (N,) each image's defect type (its test folder's name).
    pixel: the same N images' maps and masks, in order (pixel AUROC and
      AUPRO per type), or None.
    threshold: the decision threshold, or None: with it, how many of each
      type's images score above it ('caught').

  Returns:
    {type: {'n': its images, 'image_auroc', 'pixel_auroc', 'aupro'
    (fractions; nan where undefined), and 'caught'}}, by type name; {} with
    fewer than two anomalous types (the whole test set's figures are then
    that type's).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(bool)
  defects = np.asarray(defects).reshape(-1)
  if not scores.shape == labels.shape == defects.shape:
    raise ValueError(f'by_defect: {scores.size} scores, {labels.size} labels '
                     f'and {defects.size} defect types.')
  kinds = sorted(set(defects[labels].tolist()))
  if len(kinds) < 2:
    return {}
  out = {}
  for kind in kinds:
    mine = labels & (defects == kind)
    images = np.flatnonzero(mine | ~labels)
    row = {'n': int(mine.sum()),
           'image_auroc': image_auroc(scores[images], labels[images]),
           'pixel_auroc': float('nan'), 'aupro': float('nan')}
    if pixel is not None:
      row.update(pixel.subset(images).compute())
    if threshold is not None:
      row['caught'] = int((scores[mine] > threshold).sum())
    out[kind] = row
  return out


def decision_counts(scores, labels, threshold: float) -> dict[str, int]:
  """What a decision threshold does to a test set: an image is called
  anomalous when its score is above the threshold.

  Returns {'normal', 'false_alarms', 'anomalous', 'caught'}: the numbers of
  normal images and of those flagged, of anomalous images and of those
  flagged. NaN scores are never flagged.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  flagged = scores > threshold
  return dict(normal=int((~labels).sum()),
              false_alarms=int((flagged & ~labels).sum()),
              anomalous=int(labels.sum()), caught=int((flagged & labels).sum()))

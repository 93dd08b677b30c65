"""Where each cell of the score grid sits in the image (eval.cells).

The released maps upsample an h-cell score grid to H pixels with torch's
bilinear resize (align_corners=False), which draws cell i at pixel
(i + 0.5) * H / h - 0.5: for a stride-8 grid, 8i + 3.5, the middle of the
cell's 8 x 8 block. Where a local feature looks is a matter of the
backbone's padding and weights, not of that convention. torchvision's
ResNets pad every convolution symmetrically, so layer2's cell i is centred
near pixel 8i, and the aggregation resizes layer3 (stride 16) onto that grid
with half-pixel centres, which puts its part of cell i near 8i - 4: with
WRN50-2 (random weights) the aggregated feature looks about 7 px up and left
of where the released map draws it, and a flipped view's cells, flipped
back, about 7 px down and right (docs/quality.md, forty-sixth round).

'measured' draws every cell where its feature looks. That place is measured
once per backbone, layers and image size, with the run's own weights: the
centroid of the squared gradient of a random projection of the cell's
local feature with respect to the image, over a lattice of cells in the
middle of the grid (away from the borders, whose padding skews it), on a
fixed random image. A cell then sits at stride * i + offset per axis.
Training stores the cells it measured with the decision threshold, so that
evaluating, predicting and exporting that model draw the very cells its
threshold and map range were set on, on any machine, without measuring
again (`to_stored`, `from_stored`).

A view flipped along an axis and its grid flipped back has its cells
mirrored: cell i sits at (size - 1) - (stride * (n - 1 - i) + offset) =
stride * i + (size - 1 - stride * (n - 1) - offset), a different offset
unless offset is the symmetric one; so each view of eval.tta='flips' is
drawn with its own offsets (`view_axis`).

An axis is (stride, offset) in pixels, floats; `Cells` is the pair (rows,
columns), hashable, so the map functions can be memoised on it.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import features

# eval.cells: 'released' (torch's half-pixel resize of the grid) or
# 'measured' (each cell at its feature's receptive-field centroid).
CELLS = ('released', 'measured')
Axis = tuple[float, float]  # (stride, offset) in pixels.
Cells = tuple[Axis, Axis]  # (rows, columns).
_LATTICE = 5  # Cells measured per axis: 25 backward passes.


def to_stored(cells: Cells) -> list[list[float]]:
  """Cells as checkpoint metadata (JSON): [[stride, offset], [stride,
  offset]]."""
  return [[float(v) for v in axis] for axis in cells]


def from_stored(stored) -> Cells:
  """`to_stored`'s lists back as Cells; ValueError where they are not two
  (stride, offset) pairs of finite numbers with a positive stride."""
  try:
    cells = tuple((float(a[0]), float(a[1])) for a in stored)
    ok = len(cells) == 2 and all(len(a) == 2 for a in stored)
  except (TypeError, ValueError, IndexError):
    ok = False
  if not ok or not all(np.isfinite(v).all() and v[0] > 0
                       for v in map(np.asarray, cells)):
    raise ValueError(f'stored cells {stored!r} are not two (stride, offset) '
                     'pairs')
  return cells


def released_axis(n: int, size: int) -> Axis:
  """The released resize's geometry for an n-cell axis over size pixels."""
  stride = size / n
  return (stride, (stride - 1.0) / 2.0)


def view_axis(axis: Axis, n: int, size: int, flipped: bool) -> Axis:
  """The axis of a view's grid after flipping it back (`scoring.tta_views`)."""
  if not flipped:
    return axis
  stride, offset = axis
  return (stride, size - 1.0 - stride * (n - 1) - offset)


def cell_matrix(n: int, size: int, axis: Axis) -> np.ndarray:
  """(size, n) float64: linear interpolation of an n-cell axis whose cell i
  sits at pixel stride * i + offset, clamped to the first and last cell.

  With `released_axis(n, size)` this is torch's bilinear resize
  (features.bilinear_matrix): source coordinate (p - offset) / stride.
  """
  stride, offset = axis
  p = np.arange(size, dtype=np.float64)
  return features.interpolation_matrix(
      np.clip((p - offset) / stride, 0.0, n - 1.0), n)


def _lattice(n: int) -> np.ndarray:
  """Up to _LATTICE cell indices spread over the middle half of n cells."""
  lo, hi = n // 4, max(n // 4, (3 * n) // 4 - 1)
  return np.unique(np.round(np.linspace(lo, hi, _LATTICE)).astype(np.int64))


def measure(features: Callable, variables, image_hw: Sequence[int],
            strides: Sequence[float]) -> Cells:
  """Receptive-field centroids of a feature function's cells.

  features: (variables, images (1, H, W, 3) float32 in [0, 1]) -> (1, h, w,
  D) local features (the backbone and the aggregation). strides: the grid's stride
  per axis in pixels. Returns the offsets that put cell (i, j) at
  (stride_h * i + offset_h, stride_w * j + offset_w), each the mean over the
  lattice of cells of centroid - stride * index.
  """
  h_img, w_img = (int(v) for v in image_hw)
  rng = np.random.default_rng(0)  # Fixed: every process measures the same.
  image = jnp.asarray(rng.uniform(0.25, 0.75, (1, h_img, w_img, 3)),
                      jnp.float32)
  shape = jax.eval_shape(features, variables, image).shape
  rows, cols = _lattice(shape[1]), _lattice(shape[2])
  cells = [(i, j) for i in rows for j in cols]
  cot = np.zeros((len(cells),) + tuple(shape), np.float32)
  for k, (i, j) in enumerate(cells):
    cot[k, 0, i, j] = rng.normal(size=shape[-1])
  sq = np.asarray(_squared_gradients(features, variables, image,
                                     jnp.asarray(cot)),
                  np.float64)  # (K, H, W)
  mass = sq.sum((1, 2))
  cy = (sq.sum(2) * np.arange(h_img)).sum(1) / mass
  cx = (sq.sum(1) * np.arange(w_img)).sum(1) / mass
  idx = np.asarray(cells, np.float64)
  return ((float(strides[0]), float(np.mean(cy - strides[0] * idx[:, 0]))),
          (float(strides[1]), float(np.mean(cx - strides[1] * idx[:, 1]))))


@functools.partial(jax.jit, static_argnums=0)
def _squared_gradients(features, variables, image, cotangents):
  """(K, H, W): per cotangent, the squared image gradient summed over RGB;
  one forward pass, the backward passes one at a time (memory of one)."""
  _, vjp = jax.vjp(lambda x: features(variables, x), image)
  return jax.lax.map(lambda c: (vjp(c)[0][0] ** 2).sum(-1), cotangents)

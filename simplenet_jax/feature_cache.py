"""The training set's local features, computed once and reused every pass.

The backbone is frozen and SimpleNet trains without augmentation, so the
aggregated features of a training image are the same in all 160 passes; the
released code recomputes them every pass. The cache holds them on the device:
(N, h*w, D), float32 by default or bfloat16 to halve it, a full copy on every
device (each step gathers a random batch from it). When it would not fit
under `train.cache_max_gb` (per device) the loop recomputes the features per
batch instead, with the same numbers up to float rounding (float32 cache).
"""

import functools
import math
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import augments
from simplenet_jax import console
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax.errors import UserError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # cache_dtype


def estimate_bytes(n_images: int, grid_hw: tuple[int, int], dim: int,
                   dtype: str) -> int:
  """Bytes of the cache on each device: N x h x w x D values."""
  return n_images * grid_hw[0] * grid_hw[1] * dim * np.dtype(
      DTYPES[dtype]).itemsize


def fits(n_images, grid_hw, dim, train_cfg) -> bool:
  """Logs the estimate and says whether the cache is used (a warning when
  it is over the cap: training is then several times slower)."""
  need = estimate_bytes(n_images, grid_hw, dim, train_cfg.cache_dtype)
  gb = need / 2**30
  use = bool(train_cfg.cache_features) and gb <= train_cfg.cache_max_gb
  if not train_cfg.cache_features:
    verdict = 'off (train.cache_features): recomputing features every pass'
  elif use:
    verdict = 'caching'
  else:
    verdict = ('over the cap: recomputing features every pass (raise '
               'train.cache_max_gb or set train.cache_dtype=bfloat16 to cache)')
  msg = (f'Feature cache: {n_images} images x {grid_hw[0]}x{grid_hw[1]} x '
         f'{dim} ({train_cfg.cache_dtype}) = {gb:.3f} GiB per device; cap '
         f'{train_cfg.cache_max_gb:g} GiB (train.cache_max_gb): {verdict}.')
  if jax.process_index() == 0:
    if train_cfg.cache_features and not use:
      logging.warning(msg)
    else:
      logging.info(msg)
  return use


@functools.lru_cache(maxsize=None)
def _ops(mesh, shape, dtype):
  """Jitted (empty cache, write a batch into it), replicated over `mesh`."""
  rep = parallel.replicated(mesh)
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=rep)

  @functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(3,),
                     out_shardings=rep)
  def write(cache, feats, start, n):
    rows = feats[:n].reshape(n, -1, feats.shape[-1]).astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(cache, rows, start, axis=0)

  return zeros, write


# train.augment (simplenet_jax/augments.py): the flips of each training
# image a pass covers, the image itself first (scoring.FLIP_AXES:
# left-right, up-down, both).
FLIP_VIEWS = {'flips': scoring.FLIP_AXES,
              **{a: ((), axes) for a, axes in zip(augments.SINGLE_FLIPS,
                                                  scoring.FLIP_AXES[1:])}}


class View(NamedTuple):
  """One view of a training image: flipped along `flip` and moved by half
  a feature cell along `shift` (axes of (B, H, W, C) images)."""
  flip: tuple = ()
  shift: tuple = ()


def views(train_cfg) -> tuple:
  """The views of every training image that training covers: the image
  alone; with train.augment='flips' the image and its three flips
  (scoring.FLIP_AXES, the views eval.tta='flips' scores), with 'flip_lr',
  'flip_ud' or 'rot180' the image and that one flip (the double flip is a
  half turn); with 'shifts' the image and its three shifts by half a
  feature cell (right, down, both): the features a grid half a cell off
  would see, which every test image that is not aligned with the training
  images does. Row r of a pass (and of the cache) of N training images is
  view r // N of image r % N."""
  if train_cfg.augment == 'auto':  # A category's config never holds it.
    raise ValueError("train.augment='auto' is resolved per category first "
                     '(view_check.resolve)')
  if train_cfg.augment in FLIP_VIEWS:
    return tuple(View(flip=a) for a in FLIP_VIEWS[train_cfg.augment])
  if train_cfg.augment == 'shifts':
    return tuple(View(shift=a) for a in scoring.FLIP_AXES)
  return (View(),)


def apply_view(images, view: View, grid_hw):
  """(B, H, W, C) images (host or device) as `view`. A shift moves the
  content by half the grid's stride, H // h // 2 rows (W // w // 2
  columns), the edge it uncovers filled by reflection, so that the grid
  samples the image between its usual cells. It is at least one pixel: on
  a grid of stride 1 (no backbone here has one) that is a whole cell."""
  xp = np if isinstance(images, np.ndarray) else jnp
  if view.flip:
    images = xp.flip(images, view.flip)
  if view.shift:
    hw = images.shape[1:3]
    pads = [(0, 0)] * images.ndim
    for a in view.shift:
      pads[a] = (max(hw[a - 1] // grid_hw[a - 1] // 2, 1), 0)
    images = xp.pad(images, pads, mode='reflect')[:, :hw[0], :hw[1]]
  return images


def view_images(images: np.ndarray, view_ids, all_views,
                grid_hw) -> np.ndarray:
  """(B, H, W, C) host images, row b as view view_ids[b] of `all_views`
  (`views`): the recomputed-features path's counterpart of the cache's
  rows."""
  view_ids = np.asarray(view_ids)
  if not view_ids.any():
    return images
  out = np.empty_like(images)
  for v in np.unique(view_ids):  # one call per view, not per image
    rows = view_ids == v
    out[rows] = apply_view(images[rows], all_views[v], grid_hw)
  return out


def build(feature_fn, backbone_vars, dataset, indices, batch_size: int,
          train_cfg, data_cfg, mesh, grid_hw=None, dim=None, desc=None,
          image_views=(View(),)):
  """Features of `dataset[indices]` -> replicated device array (V*N, h*w,
  D), one block of N rows per view of `image_views` (`views`).

  Written batch by batch into one preallocated device array (no host copy,
  no concatenation), so the peak is the cache plus one batch. In a
  multi-host run each process decodes only its rows of each batch
  (parallel.host_batches) and the writes gather them.

  Args:
    feature_fn: images (B,H,W,3) uint8 -> (B,h,w,D) features (jitted).
    backbone_vars: the frozen backbone's variables (replicated).
    dataset, indices: which training images, in this order (row i of the
      cache is dataset[indices[i]]).
    batch_size: images per feature_fn call.
    train_cfg: train.* (cache_dtype).
    data_cfg: dataset.* (num_workers, prefetch).
    mesh: the device mesh.
    grid_hw, dim: the feature grid and dimension; from one traced call of
      feature_fn when not given.
    desc: with it, a progress bar of the images on a terminal.
    image_views: `views`; row v*N + i of the cache is dataset[indices[i]]
      as view image_views[v].
  """
  dtype = DTYPES[train_cfg.cache_dtype]
  indices = np.asarray(indices).reshape(-1)
  if grid_hw is None or dim is None:
    h, w = dataset.image_hw
    shape = jax.eval_shape(feature_fn, backbone_vars,
                           jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8)).shape
    grid_hw, dim = shape[1:3], shape[3]
  rows = len(image_views) * len(indices)
  zeros, write = _ops(mesh, (rows, grid_hw[0] * grid_hw[1], int(dim)), dtype)
  try:
    cache = zeros()
    start = 0
    with console.progress(rows, desc) as bar:
      for view in image_views:
        for batch in parallel.host_batches(dataset, batch_size, mesh,
                                           indices=indices,
                                           num_workers=data_cfg.num_workers,
                                           prefetch=data_cfg.prefetch):
          images, n = parallel.put_batch(batch['image'], mesh,
                                         batch['n_global'],
                                         min_rows=batch_size)
          images = apply_view(images, view, grid_hw)
          (offset,) = parallel.global_inputs(mesh, np.int32(start))
          cache = write(cache, feature_fn(backbone_vars, images), offset, n)
          start += n
          bar.update(n)
    return jax.block_until_ready(cache)
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if isinstance(e, jax.errors.JaxRuntimeError) and (
        'RESOURCE_EXHAUSTED' not in str(e) and 'memory' not in str(e).lower()):
      raise
    raise UserError(
        'out of memory while building the feature cache of '
        f'{rows} images: lower train.cache_max_gb (the loop then '
        'recomputes features per batch), set train.cache_dtype=bfloat16, or '
        'lower eval.batch_size') from e


def steps_per_pass(n_images: int, batch_size: int) -> int:
  return math.ceil(n_images / batch_size)

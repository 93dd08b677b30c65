"""The training set's local features, computed once and reused every pass.

The backbone is frozen and SimpleNet trains without augmentation, so the
aggregated features of a training image are the same in all 160 passes; the
released code recomputes them every pass. The cache holds them on the device:
(N, h*w, D), float32 by default or bfloat16 to halve it. When it would not fit
under `train.cache_max_gb` the loop recomputes the features per batch instead,
with the same numbers.
"""

import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import parallel
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def estimate_bytes(n_images: int, grid_hw: tuple[int, int], dim: int,
                   dtype: str) -> int:
  """Device bytes of the cache: N x h x w x D values."""
  return n_images * grid_hw[0] * grid_hw[1] * dim * np.dtype(
      _DTYPES[dtype]).itemsize


def fits(n_images, grid_hw, dim, train_cfg) -> bool:
  """Logs the estimate and says whether the cache is used."""
  need = estimate_bytes(n_images, grid_hw, dim, train_cfg.cache_dtype)
  gb = need / 2**30
  use = train_cfg.cache_features and gb <= train_cfg.cache_max_gb
  logging.info(
      'Feature cache: %d images x %dx%d x %d (%s) = %.2f GiB; cap %.2f GiB '
      '(train.cache_max_gb): %s.', n_images, grid_hw[0], grid_hw[1], dim,
      train_cfg.cache_dtype, gb, train_cfg.cache_max_gb,
      'caching' if use else 'recomputing features every pass')
  return use


def build(feature_fn, backbone_vars, dataset, indices, batch_size: int,
          train_cfg, data_cfg, mesh):
  """Features of `dataset[indices]` -> replicated device array (N, h*w, D).

  Args:
    feature_fn: images (B,H,W,3) uint8 -> (B,h,w,D) features (jitted).
    backbone_vars: the frozen backbone's variables (replicated).
    dataset, indices: which training images, in this order.
  """
  dtype = _DTYPES[train_cfg.cache_dtype]
  parts = []
  try:
    for batch in loader.batches(dataset, batch_size, indices=indices,
                                num_workers=data_cfg.num_workers,
                                prefetch=data_cfg.prefetch):
      images, n = parallel.put_batch(batch['image'], mesh)
      feats = feature_fn(backbone_vars, images)
      feats = feats.reshape(feats.shape[0], -1, feats.shape[-1])[:n]
      parts.append(jax.device_get(feats.astype(dtype)))
    cache = np.concatenate(parts, axis=0)
    return parallel.put_replicated(cache, mesh)
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if isinstance(e, jax.errors.JaxRuntimeError) and (
        'RESOURCE_EXHAUSTED' not in str(e) and 'memory' not in str(e).lower()):
      raise
    raise UserError(
        'out of memory while building the feature cache of '
        f'{len(indices)} images: lower train.cache_max_gb (the loop then '
        'recomputes features per batch), set train.cache_dtype=bfloat16, or '
        'lower eval.batch_size') from e


def steps_per_pass(n_images: int, batch_size: int) -> int:
  return math.ceil(n_images / batch_size)

"""Local feature aggregation, as the released SimpleNet code does it.

For each backbone layer, every position gets its 3x3 neighbourhood (zero
padding, stride 1) flattened channel-major then 3x3, i.e. torch's Unfold
order. That C*9 vector is average-pooled to `pretrain_embed_dim` with torch's
adaptive_avg_pool1d bins; layers after the first are brought to the first
layer's grid by bilinear resizing (half-pixel centres); the per-layer vectors
are concatenated and pooled once more to `target_embed_dim`.

The released code resizes the unfolded maps before pooling. Pooling acts on
the channel axis and resizing on the spatial axes, both linearly, so the order
does not matter mathematically; pooling first resizes far fewer channels.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def adaptive_pool_taps(length: int, size: int):
  """Gather indices and weights of torch's adaptive_avg_pool1d.

  Bin i averages x[floor(i*L/n) : ceil((i+1)*L/n)].

  Returns:
    (idx, w): int32 and float32 arrays of shape (size, taps); unused taps point
    at index 0 with weight 0.
  """
  i = np.arange(size, dtype=np.int64)
  start = (i * length) // size
  end = ((i + 1) * length + size - 1) // size
  count = end - start
  taps = int(count.max())
  k = np.arange(taps, dtype=np.int64)
  valid = k[None, :] < count[:, None]
  idx = np.where(valid, start[:, None] + k[None, :], 0).astype(np.int32)
  w = np.where(valid, 1.0 / count[:, None], 0.0).astype(np.float32)
  return idx, w


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch.nn.functional.adaptive_avg_pool1d over the last axis of `x`."""
  length = x.shape[-1]
  if length % size == 0:
    # Equal, disjoint bins: a reshape-mean, no gather.
    return x.reshape(*x.shape[:-1], size, length // size).mean(-1)
  idx, w = adaptive_pool_taps(length, size)
  return jnp.einsum('...nk,nk->...n', x[..., idx], jnp.asarray(w),
                    precision=_HIGHEST)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of torch's bilinear resize.

  align_corners=False: source coordinate (dst + 0.5) * in/out - 0.5, clamped
  at 0 below; the upper neighbour is clamped at the last index.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  a = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(a, (rows, i0), 1.0 - lam)
  np.add.at(a, (rows, i1), lam)
  return a


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Resizes (h, w, C) to (H, W, C), torch bilinear, align_corners=False."""
  h, w = x.shape[:2]
  if (h, w) == tuple(out_hw):
    return x
  ah = jnp.asarray(bilinear_matrix(h, out_hw[0]), jnp.float32)
  aw = jnp.asarray(bilinear_matrix(w, out_hw[1]), jnp.float32)
  return jnp.einsum('Hh,hwc,Ww->HWc', ah, x, aw, precision=_HIGHEST)


def unfold(x: jax.Array, patch_size: int = 3) -> jax.Array:
  """(h, w, C) -> (h, w, C * p * p): torch Unfold order (channel, dy, dx)."""
  if patch_size % 2 != 1:
    raise ValueError(f'patch_size must be odd, got {patch_size}')
  h, w, c = x.shape
  pad = (patch_size - 1) // 2
  xp = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  shifts = [xp[dy:dy + h, dx:dx + w]
            for dy in range(patch_size) for dx in range(patch_size)]
  return jnp.stack(shifts, axis=-1).reshape(h, w, c * patch_size**2)


def _aggregate_one(maps, pretrain_embed_dim, target_embed_dim, patch_size):
  """One image: list of (h_i, w_i, C_i) -> (H0, W0, target_embed_dim)."""
  grid = maps[0].shape[:2]
  per_layer = []
  for m in maps:
    pooled = adaptive_avg_pool(unfold(m, patch_size), pretrain_embed_dim)
    per_layer.append(resize_bilinear(pooled, grid))
  stacked = jnp.stack(per_layer, axis=-2)  # (H0, W0, layers, P)
  stacked = stacked.reshape(*grid, len(maps) * pretrain_embed_dim)
  return adaptive_avg_pool(stacked, target_embed_dim)


@functools.partial(
    jax.jit,
    static_argnames=('pretrain_embed_dim', 'target_embed_dim', 'patch_size'))
def aggregate(feature_maps: Sequence[jax.Array],
              pretrain_embed_dim: int = 1536,
              target_embed_dim: int = 1536,
              patch_size: int = 3) -> jax.Array:
  """Aggregated local features of a batch.

  Args:
    feature_maps: NHWC maps (B, h_i, w_i, C_i), in layer order; the first
      one sets the output grid. Cast to float32.
    pretrain_embed_dim: per-layer pooled dimension.
    target_embed_dim: final dimension.
    patch_size: neighbourhood size (odd).

  Returns:
    (B, H0, W0, target_embed_dim) float32.
  """
  maps = [jnp.asarray(m, jnp.float32) for m in feature_maps]
  fn = functools.partial(_aggregate_one,
                         pretrain_embed_dim=pretrain_embed_dim,
                         target_embed_dim=target_embed_dim,
                         patch_size=patch_size)
  return jax.vmap(fn)(maps)

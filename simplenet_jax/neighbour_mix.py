"""Normal features moved toward their neighbours in other images.

`train.neighbour_mix` = a > 0 (0, off, is the released training): at every
step each training feature x of the batch becomes x + u (y - x), u ~ U(0, a)
drawn per feature, where y is the nearest cached feature of another
training image (`partners`, found once per run). The head's normal class
then covers the segments between neighbouring normal features, i.e. the
directions in which normal features vary from image to image, instead of
the training features alone; the fakes are made from the moved features
as from the originals (noise, GAS). A displacement of the same length in a
random direction instead hurt (docs/quality.md, twenty-first round): the
direction is what helps.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from simplenet_jax import knn

# The step key's fold for the mixing fractions (fold 1 picks LAS variants).
_FOLD = 2


def partners(cache: jax.Array, n_images: int, block: int = 8192,
             progress: Optional[Callable[[int], None]] = None) -> jax.Array:
  """Each cached feature's nearest feature in another training image.

  Exact (knn.nearest_neighbours), every feature against every other
  image's: time grows as the square of the number of features (R P).

  Args:
    cache: (R, P, D) training features (feature_cache.build): row r is
      view r // n_images of image r % n_images; every view of an image
      counts as that image.
    n_images: the number of training images, >= 2.
    block: features searched per jitted call (the last call padded to it).
    progress: called with the number of features done after each call
      (each then waited for), e.g. a progress bar's update.

  Returns:
    (R, P) int32 indices into cache.reshape(R * P, D).
  """
  r, p, d = cache.shape
  rows = cache.reshape(r * p, d)
  image = (jnp.arange(r * p, dtype=jnp.int32) // p) % n_images
  block = min(block, r * p)
  out = []
  for start in range(0, r * p, block):
    n = min(block, r * p - start)
    pad = ((0, block - n),)
    _, idx = knn.nearest_neighbours(
        jnp.pad(rows[start:start + n], pad + ((0, 0),)), rows,
        query_groups=jnp.pad(image[start:start + n], pad), bank_groups=image)
    out.append(idx[:n])
    if progress is not None:
      jax.block_until_ready(idx)
      progress(n)
  return jnp.concatenate(out).reshape(r, p)


def mix(cache: jax.Array, partner_idx: jax.Array, idx: jax.Array,
        key: jax.Array, amount: float) -> jax.Array:
  """The batch's features, each moved a random part of the way to its
  partner.

  Args:
    cache: (R, P, D) training features; partner_idx: (R, P) `partners`.
    idx: (B,) int rows of the cache in the batch.
    key: the step's key (folded here, so the noise's draws stay as they
      are without mixing).
    amount: the largest fraction, in (0, 1].

  Returns:
    (B, P, D) float32.
  """
  d = cache.shape[-1]
  feats = cache[idx].astype(jnp.float32)
  other = cache.reshape(-1, d)[partner_idx[idx]].astype(jnp.float32)
  u = jax.random.uniform(jax.random.fold_in(key, _FOLD),
                         feats.shape[:2] + (1,), maxval=amount)
  return feats + u * (other - feats)

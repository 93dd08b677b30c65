"""train.augment='auto': train on the images' flips where they look normal.

A flipped training image is a free normal image only if the data looks
normal mirrored. On top-down photographs of parts it does, and training on
the flips lifts every figure (docs/quality.md, nineteenth round: the cookie
photos); on photographs lit from one side it does not (a flip puts the
shadows on the other side) and the flips cost the demo's grass and gravel
5-7 points of image AUROC. Which case a data set is shows in its own
features: with a nearest-neighbour detector fitted on the other training
images, each training image's flips are scored as the image itself is
(leave its image out), and a flip counts as normal when the median of its
scores lies within the range of the images' own scores. The three flips
are trained on when all three do; where only some do (a surface lit from
above looks normal mirrored left-right, not up-down) the one that looks
most normal of those is. No constant is fitted: the comparison is with
the data's own spread.
"""

from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import augments
from simplenet_jax import console
from simplenet_jax import feature_cache
from simplenet_jax import knn
from simplenet_jax import scoring

# Enough for a stable median and range, few enough that the check costs
# about one pass over 32 images (4 views each) and a small search. It holds
# the images as they are (the search's bank, 0.25 GB at MVTec AD's 36x36
# grid of 1536-d features in float32) and one view at a time; the search
# centres a copy of the bank. Measured there (WRN50-2, 288 px, CPU): 1.3 GB
# over the process at its peak, in the search.
MAX_IMAGES = 32
POSITIONS = 64  # Per image and view: an image's score is their mean.
FLIP_NAMES = ('left-right', 'up-down', 'both')


class Verdict(NamedTuple):
  """own: (n,) each image's score (mean distance of its features to the
  nearest feature of another image); flips: (3, n) the same for its
  left-right, up-down and double flips."""
  own: np.ndarray
  flips: np.ndarray

  @property
  def medians(self) -> np.ndarray:
    """(3,) each flip's median score over the images."""
    return np.median(self.flips, 1)

  @property
  def passing(self) -> np.ndarray:
    """(3,) bool: which flips' median score is within the images' own
    range."""
    return self.medians <= self.own.max()

  @property
  def normal(self) -> bool:
    """Whether every flip looks normal."""
    return bool(self.passing.all())

  @property
  def augment(self) -> str:
    """The train.augment it gives: 'flips' when all three flips look
    normal; else the single flip that looks most normal (lowest median) of
    those that do; else 'none'."""
    if self.normal:
      return 'flips'
    if not self.passing.any():
      return 'none'
    medians = np.where(self.passing, self.medians, np.inf)
    return augments.SINGLE_FLIPS[int(np.argmin(medians))]

  def describe(self) -> str:
    medians = ' / '.join(f'{x:.1f}' for x in self.medians)
    names = ', '.join(FLIP_NAMES)
    if self.normal or not self.passing.any():
      where = 'within' if self.normal else 'beyond'
    else:
      ok = [n for n, p in zip(FLIP_NAMES, self.passing) if p]
      others = 'others' if len(ok) == 1 else 'other'
      where = f"{' and '.join(ok)} within, the {others} beyond"
    return (f'median nearest-neighbour distance of the {names} flips '
            f"{medians}: {where} the training images' own "
            f'{self.own.min():.1f}-{self.own.max():.1f} ({self.own.size} '
            'images)')


def positions(key: jax.Array, n: int, p: int):
  """(n, POSITIONS) random positions of each of n images of p positions,
  or None (every position) when p <= POSITIONS."""
  if p <= POSITIONS:
    return None
  return jax.vmap(lambda k: jax.random.permutation(k, p)[:POSITIONS])(
      jax.random.split(key, n))


def _at(features: jax.Array, pos) -> jax.Array:
  """(n, P, D) features at `positions`' (n, K) -> (n, K, D)."""
  if pos is None:
    return features
  return jnp.take_along_axis(features, pos[:, :, None], 1)


def distances(queries: jax.Array, bank: jax.Array) -> np.ndarray:
  """queries (V, n, K, D): K features of each of n images in V views; bank
  (n, P, D): the images as they are -> (V, n) each query image's mean
  distance to the nearest bank feature of another image."""
  return np.asarray(_distances(queries, bank)).mean(-1)


@jax.jit
def _distances(queries, bank):
  # Flattened inside the jit: outside it the reshape copies the whole bank.
  v, n, k, d = queries.shape
  query_image = jnp.broadcast_to(jnp.arange(n)[None, :, None], (v, n, k))
  dist, _ = knn.nearest_neighbours(
      queries.reshape(-1, d), bank.reshape(-1, d),
      query_groups=query_image.reshape(-1),
      bank_groups=jnp.repeat(jnp.arange(n), bank.shape[1]))
  return dist.reshape(v, n, k)


def image_scores(features: jax.Array, key: jax.Array) -> np.ndarray:
  """(V, n, P, D) features of n >= 2 images in V views (view 0 the images
  as they are) -> (V, n): each view's mean distance, over POSITIONS random
  positions (the same in every view), to the nearest feature of another
  image as it is."""
  pos = positions(key, features.shape[1], features.shape[2])
  return distances(jnp.stack([_at(f, pos) for f in features]), features[0])


def check_flips(feature_fn, backbone_vars, dataset, indices, config, mesh,
                key: jax.Array, grid_hw, dim) -> Verdict:
  """The Verdict on the flips of (up to MAX_IMAGES of, drawn with `key`)
  the training images `dataset[indices]`, two or more: `image_scores` of
  their four views, built one view at a time."""
  indices = np.asarray(indices)
  k_images, k_positions = jax.random.split(key)
  if len(indices) > MAX_IMAGES:
    indices = np.sort(indices[np.asarray(
        jax.random.permutation(k_images, len(indices)))[:MAX_IMAGES]])
  bank, pos, queries = None, None, []
  for axes in scoring.FLIP_AXES:  # The images as they are first.
    features = feature_cache.build(
        feature_fn, backbone_vars, dataset, indices, config.eval.batch_size,
        config.train, config.dataset, mesh, grid_hw=grid_hw, dim=dim,
        image_views=(feature_cache.View(flip=axes),))
    features = features.astype(jnp.float32).reshape(
        len(indices), -1, features.shape[-1])
    if bank is None:
      bank = features
      pos = positions(k_positions, len(indices), features.shape[1])
    queries.append(_at(features, pos))
    del features  # Not held while the next view is built.
  scores = distances(jnp.stack(queries), bank)
  return Verdict(own=scores[0], flips=scores[1:])


def describe(verdict: Verdict | None) -> str:
  """Why the verdict is what it is, for the console and the report."""
  if verdict is None:
    return 'fewer than two training images to compare'
  return verdict.describe()


def resolve(config, category: str, verdict: Verdict | None):
  """The config a category trains with under train.augment='auto': the
  verdict's augment ('flips', one flip alone, or 'none') with train.
  num_passes divided by the views a pass then covers (4 or 2: as many
  steps). Says which on the console. verdict None: fewer than two training
  images, so nothing to compare with."""
  return _resolved(config, category,
                   'none' if verdict is None else verdict.augment,
                   describe(verdict), verdict is None, '')


def resolve_as_trained(config, category: str, meta: dict):
  """The config of `resolve`, from what a category's checkpoint `meta`
  records it chose ('augment', 'augment_why'), not from the images again:
  a resumed or evaluated run takes the decision its checkpoints were
  trained with, also where the check would now round the other way (a
  close verdict on another machine) or the images changed since."""
  why = meta['augment_why']
  return _resolved(config, category, meta['augment'], why,
                   why == describe(None), ', as its checkpoints were trained')


def _resolved(config, category: str, augment: str, why: str, alone: bool,
              source: str):
  out = config.copy_and_resolve_references()
  out.train.augment = augment
  n_views = len(feature_cache.views(out.train))
  out.train.num_passes = max(1, round(config.train.num_passes / n_views))
  n = out.train.num_passes
  over = (f"{n} pass{'es' if n > 1 else ''} over them ("
          f"{'a quarter' if n_views == 4 else 'half'} of train.num_passes="
          f'{config.train.num_passes}, as many steps)')
  if alone:
    what = 'the images alone are training images'
  elif augment == 'flips':
    what = ('its flips look normal: each image and its three flips are '
            f'training images, {over}')
  elif augment in augments.SINGLE_FLIPS:
    what = (f'of its flips only some look normal: {augments.WORDS[augment]} '
            f'are training images, {over}')
  else:
    what = 'its flips do not look normal: the images alone are training images'
  message = f'{category}: train.augment=auto{source}: {what} ({why})'
  logging.info('%s', message)
  console.note(message)
  return out

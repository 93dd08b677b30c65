"""Normal features moved toward their neighbours in other images.

`train.neighbour_mix` = a > 0 (0, off, is the released training): at every
step each training feature x of the batch becomes x + u (y - x), u ~ U(0, a)
drawn per feature, where y is the nearest cached feature of another
training image: of every other image (`partners`, found once per run,
exact), or with `train.neighbour_images` = k > 0 of k other images drawn
at random at every step for each image of the batch (`sampled_partners`:
no search over the whole set, and a set holding near-copies of one part
mostly pairs a feature with another part's). The head's normal class
then covers the segments between neighbouring normal features, i.e. the
directions in which normal features vary from image to image, instead of
the training features alone; the fakes are made from the moved features
as from the originals (noise, GAS). A displacement of the same length in a
random direction instead hurt (docs/quality.md, twenty-first round): the
direction is what helps.

`train.neighbour_mix_when='flips'` keeps it to the categories that train on
their flips (`train.augment`, or what 'auto' chose for them, `resolve`):
categories whose flipped images look normal, i.e. whose parts vary from
image to image in ways a few training images do not all show, so that
normal test features lie away from the training features in the
directions normal features vary in, as on the cookie photos (3 seeds,
pixel AUROC / AUPRO with the flips: 96.7 / 89.0 -> 97.5 / 92.2 at 256 px
with the folder config's head, 97.0 / 88.2 -> 97.3 / 89.5 at 128 px with
the demo config's); on the demo's side-lit textures, whose flips do not
look normal, it cost localisation (docs/quality.md, thirty-fifth and
thirty-sixth rounds).
"""

import dataclasses
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp

from simplenet_jax import augments
from simplenet_jax import console
from simplenet_jax import knn

# The step key's folds for the mixing fractions and for the images a step
# takes its partners from (fold 1 picks LAS variants).
_FOLD = 2
_FOLD_IMAGES = 3

# train.neighbour_mix_when: 'always', or only where the category trains on
# flips (`resolve`).
WHEN = ('always', 'flips')


def gated(train_cfg) -> bool:
  """Whether the mix is asked for and left to each category's flips
  (train.neighbour_mix_when='flips'), so that `resolve` may turn it off."""
  return bool(train_cfg.neighbour_mix) and train_cfg.neighbour_mix_when != (
      'always')


def resolve(config, category: str):
  """The config a category trains with under train.neighbour_mix_when=
  'flips': train.neighbour_mix as given where its train.augment (resolved
  from 'auto' already) takes flips, 0 where it does not; says which on the
  console. Other configs are returned as they are."""
  t = config.train
  if not gated(t):
    return config
  flips = t.augment == 'flips' or t.augment in augments.SINGLE_FLIPS
  message = (f'{category}: train.neighbour_mix_when=flips: '
             + (f'it trains on flips, so each training feature is moved '
                f'toward a neighbour (train.neighbour_mix={t.neighbour_mix:g})'
                if flips else
                'it trains without flips, so its features are not moved '
                '(train.neighbour_mix off)'))
  logging.info('%s', message)
  console.note(message)
  if flips:
    return config
  out = config.copy_and_resolve_references()
  out.train.neighbour_mix = 0.0
  return out


@dataclasses.dataclass(frozen=True)
class Mix:
  """What the cached steps' mixing does (hashable: the steps are cached on
  it).

  amount: train.neighbour_mix, the largest fraction (0 = off).
  images: train.neighbour_images, 0 = partners from every other image
    (`partners`, passed to the step), k > 0 = from k random other images
    per batch image, drawn by the step (`sampled_partners`).
  views: the cache's views per image (feature_cache.views), to tell an
    image's rows apart.
  """
  amount: float = 0.0
  images: int = 0
  views: int = 1

  @classmethod
  def from_config(cls, train_cfg, views: int = 1) -> 'Mix':
    if not train_cfg.neighbour_mix:  # Off: one step for every such run.
      return cls()
    return cls(float(train_cfg.neighbour_mix),
               int(train_cfg.neighbour_images), int(views))

  @property
  def exact(self) -> bool:
    """Whether the step needs `partners` (searched once per run)."""
    return self.amount > 0 and not self.images


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


def sampled_partners(cache: jax.Array, idx: jax.Array, key: jax.Array,
                     images: int, views: int = 1) -> jax.Array:
  """Each feature of the batch's rows: its nearest feature among those of
  `images` other training images drawn at random (with replacement, each
  in a random view) for its row.

  Exact within the drawn images (knn.nearest_neighbours): B x P x images*P
  distances per step, whatever the size of the training set.

  Args:
    cache: (R, P, D) training features, R = views * N (row r is view
      r // N of image r % N), N >= 2.
    idx: (B,) int rows of the cache in the batch.
    key: the step's key (folded here).
    images: k >= 1 other images per row.
    views: the cache's views per image.

  Returns:
    (B, P) int32 indices into cache.reshape(R * P, D).
  """
  r, p, _ = cache.shape
  n = r // views
  k_img, k_view = jax.random.split(jax.random.fold_in(key, _FOLD_IMAGES))
  b = idx.shape[0]
  # Another image: its own index plus 1..N-1, modulo N.
  other = (idx[:, None] % n + jax.random.randint(k_img, (b, images), 1, n)) % n
  rows = other + n * jax.random.randint(k_view, (b, images), 0, views)

  def one(row, cand_rows):
    cand = cache[cand_rows].reshape(images * p, -1)
    # The row is gathered again here, not passed in from `mix`: passing it
    # measured slower (k = 1, 256 px, CPU: 38-40 against 27-29 ms a step).
    _, j = knn.nearest_neighbours(cache[row], cand)
    # Position j of the candidates is row cand_rows[j // P], feature j % P.
    return cand_rows[j // p] * p + j % p
  return jax.vmap(one)(idx, rows).astype(jnp.int32)


def mix(cache: jax.Array, partner_idx: Optional[jax.Array], idx: jax.Array,
        key: jax.Array, how: Mix) -> jax.Array:
  """The batch's features, each moved a random part of the way to its
  partner.

  Args:
    cache: (R, P, D) training features.
    partner_idx: (R, P) `partners` when how.exact, else None (the partners
      are drawn here, `sampled_partners`).
    idx: (B,) int rows of the cache in the batch.
    key: the step's key (folded here, so the noise's draws stay as they
      are without mixing).
    how: the mixing; how.amount in (0, 1].

  Returns:
    (B, P, D) float32.
  """
  d = cache.shape[-1]
  feats = cache[idx].astype(jnp.float32)
  chosen = (partner_idx[idx] if how.exact else
            sampled_partners(cache, idx, key, how.images, how.views))
  other = cache.reshape(-1, d)[chosen].astype(jnp.float32)
  u = jax.random.uniform(jax.random.fold_in(key, _FOLD),
                         feats.shape[:2] + (1,), maxval=how.amount)
  return feats + u * (other - feats)

"""Anomalous features for training the discriminator.

SimpleNet (released) adds Gaussian noise to every adapted feature. This
module adds the synthesis of two successors, written from their papers and
public code (no code copied):

  GAS   gradient-ascent synthesis (GLASS, Chen et al., ECCV 2024): start from
        the Gaussian fakes, take `gas_steps` normalised gradient steps that
        make them look more normal to the current discriminator, and every
        `gas_every` steps project them back onto a ring around an anchor:
        'manifold'    offset from the true feature in [r1, r2];
        'hypersphere' distance to the training features' centre (per
                      position) in [r, 2r], r a quantile of the normal
                      features' distances to it.
  Perlin-masked feature noise (SuperSimpleNet, Rolih et al., ICPR 2024):
        the batch is duplicated and each of the 2B copies gets noise only
        inside its own Perlin mask on the feature grid (half of the masks
        empty); the loss is per patch (masked patches are fakes, all others
        normal).
  LAS   local anomaly synthesis (GLASS): defect images made from training
        images by blending a texture inside a Perlin mask, their features
        labelled per patch by the max-pooled mask and trained with a focal
        loss (the hardest half of the patches) beside the truncated L1 loss.

Scales. GLASS's constants are in WideResNet50 feature units, where the
released noise std 0.015 in D = 1536 dimensions gives noise of norm
rho = 0.015 * sqrt(1536) = 0.59. Here every length is in units of
rho = noise_std * sqrt(D) of the run, so whatever calibration sets noise_std
(train.calibrate_noise) sets the GAS ring and step too, and the defaults
reproduce GLASS's numbers at WRN50's scale: ring [0.5, 1.0] = [0.85, 1.70]
rho, step 0.001 = 0.0017 rho.

Everything on the device is a pure function of explicit PRNG keys and
jittable. The settings are the config group `synthesis` (all off = the
released step, train.train_step, which the loop then uses unchanged);
`make_cached_step` is the loop's step when any is on. LAS images are made
once, `synthesis.las_variants` per training image, and their features cached
beside the training features (`LASImages`, `las_labels`): measured against
making them anew every step, the same quality at less time per pass.
"""

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import model as model_lib
from simplenet_jax import neighbour_mix
from simplenet_jax import parallel
from simplenet_jax import train

GAS_MODES = ('none', 'manifold', 'hypersphere')  # synthesis.gas
# synthesis.gas_bn: the discriminator's BatchNorm during the ascent.
GAS_BN = ('frozen', 'batch')
# synthesis.gas_centre: when the hypersphere's centre takes the adaptor's
# weights: at every step, or once per pass (GLASS: once per epoch).
GAS_CENTRE = ('step', 'pass')
# GLASS's FocalLoss (loss.py, smooth=1e-5): one-hot labels clamped to
# [1e-5, 1 - 1e-5] and 1e-5 added to p_t; used by its step (gas_bn='batch').
GLASS_FOCAL_SMOOTH = 1e-5
# torch's binary cross-entropy: logs clamped at -100, and the gradient
# (p - y) / max(p (1 - p), 1e-12).
BCE_LOG_MIN = -100.0
BCE_GRAD_EPS = 1e-12
# synthesis.loss: SimpleNet's truncated L1 or GLASS's binary cross-entropy.
LOSSES = ('truncated_l1', 'bce')
# log2 range [lo, hi) of the Perlin lattice resolutions (GLASS, SuperSimpleNet).
PERLIN_SCALES = (0, 6)
# LAS: Perlin threshold of the pixel masks and the blend factor
# beta ~ N(0.5, 0.1) clipped to [0.2, 0.8] (GLASS).
LAS_THRESHOLD = 0.5
LAS_BETA = (0.5, 0.1)
TEXTURES = 64  # Textures in the bank, each image takes one at random.


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  """Static synthesis settings (hashable: a jit static argument): the config
  group `synthesis` (defaults in configs/default.py, validated by
  config_checks), built with `from_config`.

  gas: 'none' | 'manifold' | 'hypersphere'.
  gas_steps, gas_every: ascent steps, projection period (GLASS: 20, 5).
  gas_step: ascent step length in units of rho (GLASS: 0.001 / 0.588).
  gas_r1, gas_r2: manifold ring in units of rho (GLASS: 0.5 and 1.0 / 0.588).
  gas_quantile: hypersphere r = this quantile of the batch's normal
    distances to the centre (GLASS: 0.75); the ring is [r, 2r].
  gas_bn: the discriminator's BatchNorm during the ascent. 'frozen': the
    batch statistics of [true; fake] at the start of the step, no gradient
    through them, each fake moves along the gradient of its own score.
    'batch' (GLASS's code, its discriminator in train mode): statistics of
    [true; current fakes] recomputed at every ascent step, the gradient of
    the fakes' binary cross-entropy flowing through them (fakes interact).
    With gas != 'none', 'batch' is GLASS's whole step as released
    (`glass_step`): the running statistics move at every ascent forward,
    [true; fakes] and the LAS features are scored in two forwards, the
    losses are torch's (BCE, GLASS's FocalLoss) with their clamps, and the
    hypersphere fakes pass the gradient through their projections.
  gas_centre: 'step' (the current adaptor applied to the raw centre at every
    step) or 'pass' (GLASS: the centre adapted once per pass, with the
    adaptor of the pass's start; the loop passes it adapted,
    `pass_centre`). Only gas='hypersphere' uses a centre.
  perlin: Perlin-masked noise on both copies of a duplicated batch (each
    copy its own mask) instead of noise on every row.
  perlin_threshold: Perlin value above which a grid cell is masked
    (SuperSimpleNet: 0.2 on MVTec AD, 0.6 on VisA).
  perlin_empty: share of the copies whose mask is emptied (all normal).
  las_weight: weight of the focal loss on LAS patches (0: no LAS).
  focal_gamma: focal loss exponent (GLASS: 2).
  focal_hard: drop LAS patches below this quantile of (p - label)^2, i.e.
    keep the hardest 1 - focal_hard (GLASS: 0.5).
  las_variants: LAS images made (and cached) per training image.
  texture_dir: folder of texture images for LAS (e.g. DTD's images/);
    '' = procedural textures (`procedural_textures`, no files).
  recolour: LAS textures take each image's colours (`match_texture`).
  las_shell: with gas='hypersphere' and LAS, move the LAS defect features
    onto the shell [2r, 4r] around the centre (GLASS; `las_onto_shell`).
  loss: 'truncated_l1' (SimpleNet's, margin model.margin) or 'bce' (GLASS's:
    binary cross-entropy of the sigmoid of the discriminator's output).
  """
  gas: str
  gas_steps: int
  gas_every: int
  gas_step: float
  gas_r1: float
  gas_r2: float
  gas_quantile: float
  gas_bn: str
  gas_centre: str
  perlin: bool
  perlin_threshold: float
  perlin_empty: float
  las_weight: float
  focal_gamma: float
  focal_hard: float
  las_variants: int
  texture_dir: str
  recolour: bool
  las_shell: bool
  loss: str

  @classmethod
  def from_config(cls, synthesis_cfg) -> 'SynthesisConfig':
    return cls(**{f.name: synthesis_cfg[f.name]
                  for f in dataclasses.fields(cls)})

  @property
  def las(self) -> bool:
    return self.las_weight > 0

  @property
  def glass_step(self) -> bool:
    """GAS with gas_bn='batch': the step of GLASS's released code."""
    return self.gas != 'none' and self.gas_bn == 'batch'

  @property
  def active(self) -> bool:
    """False: the released step (train.train_step) is used."""
    return (self.gas != 'none' or self.perlin or self.las or
            self.loss != 'truncated_l1')


# ---- Perlin noise and masks -----------------------------------------------


def _fade(t):
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


_LATTICE = 67  # Gradient table size: resolutions up to 64 plus rotation wrap.


def perlin_noise(key: jax.Array, shape: Sequence[int], res_y, res_x,
                 angle=0.0) -> jax.Array:
  """2-D gradient (Perlin) noise, values in about [-1, 1], jittable.

  The classic construction (random unit gradients on a res_y x res_x
  lattice spread over the image, quintic fade, bilinear blend of the four
  corner dot products, scaled by sqrt(2)), evaluated at pixel coordinates
  rotated by `angle` about the centre (GLASS rotates its masks by up to 90
  degrees). res_y, res_x and angle may be traced: the gradients come from a
  fixed periodic table, so shapes never depend on them.

  Args:
    key: PRNG key (gradients).
    shape: (H, W) static.
    res_y, res_x: lattice cells along each axis (1..64), int or traced int.
    angle: rotation in radians.

  Returns:
    (H, W) float32.
  """
  h, w = int(shape[0]), int(shape[1])
  theta = jax.random.uniform(key, (_LATTICE, _LATTICE), jnp.float32, 0.0,
                             2.0 * math.pi)
  gy, gx = jnp.sin(theta), jnp.cos(theta)
  res_y = jnp.asarray(res_y, jnp.float32)
  res_x = jnp.asarray(res_x, jnp.float32)
  # Lattice coordinates of the pixels (GLASS: u = y * res / H).
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing='ij')
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  c, s = jnp.cos(angle), jnp.sin(angle)
  ry = c * (yy - cy) - s * (xx - cx) + cy
  rx = s * (yy - cy) + c * (xx - cx) + cx
  u = ry * res_y / h
  v = rx * res_x / w
  i0 = jnp.floor(u)
  j0 = jnp.floor(v)
  fu, fv = u - i0, v - j0
  i0 = jnp.mod(i0.astype(jnp.int32), _LATTICE)
  j0 = jnp.mod(j0.astype(jnp.int32), _LATTICE)
  i1 = jnp.mod(i0 + 1, _LATTICE)
  j1 = jnp.mod(j0 + 1, _LATTICE)

  def corner(i, j, du, dv):
    return gy[i, j] * du + gx[i, j] * dv

  n00 = corner(i0, j0, fu, fv)
  n10 = corner(i1, j0, fu - 1.0, fv)
  n01 = corner(i0, j1, fu, fv - 1.0)
  n11 = corner(i1, j1, fu - 1.0, fv - 1.0)
  tu, tv = _fade(fu), _fade(fv)
  top = n00 + tu * (n10 - n00)
  bottom = n01 + tu * (n11 - n01)
  return math.sqrt(2.0) * (top + tv * (bottom - top))


_perlin_noise_jit = jax.jit(perlin_noise, static_argnums=(1,))


def perlin_mask(key: jax.Array, shape: Sequence[int], threshold: float = 0.5,
                scales: Sequence[int] = PERLIN_SCALES, rotate: bool = True,
                combine: bool = True) -> jax.Array:
  """A binary Perlin mask (H, W) float32 in {0, 1}, never empty.

  Lattice resolutions 2**k per axis, k ~ U{scales[0] .. scales[1] - 1},
  capped at half the smaller side (finer lattices alias to zero noise);
  rotation U(-pi/2, pi/2) when `rotate`. With `combine` (GLASS's LAS
  masks) the mask is, with probability 1/3 each, one thresholded noise, the
  union or the intersection of two. An empty result falls back to the first
  noise thresholded at min(threshold, its maximum), so at least one pixel
  is set.
  """
  ks = jax.random.split(key, 5)
  # A lattice as fine as the pixels puts every pixel on a lattice point,
  # where gradient noise is 0: no mask at all. Keep >= 2 pixels per cell.
  top = int(math.floor(math.log2(max(min(shape) / 2, 1))))
  lo, hi = min(scales[0], top), min(scales[1], top + 1)

  def one(k):
    k_res, k_ang, k_noise = jax.random.split(k, 3)
    e = jax.random.randint(k_res, (2,), lo, max(hi, lo + 1))
    res = jnp.left_shift(1, e)
    ang = (jax.random.uniform(k_ang, (), jnp.float32, -math.pi / 2,
                              math.pi / 2) if rotate else 0.0)
    return perlin_noise(k_noise, shape, res[0], res[1], ang)

  n1 = one(ks[0])
  m1 = n1 > threshold
  if combine:
    m2 = one(ks[1]) > threshold
    u = jax.random.uniform(ks[2], ())
    m = jnp.where(u > 2 / 3, m1 | m2, jnp.where(u > 1 / 3, m1 & m2, m1))
  else:
    m = m1
  fallback = n1 >= jnp.minimum(threshold, n1.max())
  return jnp.where(m.any(), m, fallback).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    'n', 'shape', 'threshold', 'scales', 'empty_fraction', 'rotate',
    'combine'))
def perlin_masks(key: jax.Array, n: int, shape: Sequence[int],
                 threshold: float = 0.2, scales: Sequence[int] = PERLIN_SCALES,
                 empty_fraction: float = 0.5,
                 rotate: bool = False, combine: bool = False) -> jax.Array:
  """(n, H, W) float32 0/1 masks; mask i is emptied with probability
  `empty_fraction` (SuperSimpleNet: half of the copies stay normal).

  Mask i depends on (key, i) only.
  """
  def one(i):
    k_mask, k_empty = jax.random.split(jax.random.fold_in(key, i))
    m = perlin_mask(k_mask, shape, threshold, scales, rotate, combine)
    keep = jax.random.uniform(k_empty, ()) >= empty_fraction
    return m * keep.astype(jnp.float32)
  return jax.vmap(one)(jnp.arange(n, dtype=jnp.uint32))


@functools.lru_cache(maxsize=None)
def _pool_matrix(size: int, cells: int) -> np.ndarray:
  """(cells, size) 0/1: which pixels fall in each cell (ceil at edges)."""
  a = np.zeros((cells, size), np.float32)
  for c in range(cells):
    lo = (c * size) // cells
    hi = -(-((c + 1) * size) // cells)
    a[c, lo:hi] = 1.0
  return a


def max_pool_to_grid(masks: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
  """(..., H, W) 0/1 masks -> (..., h, w) float32: 1 where any pixel of the
  cell is set (GLASS: max-pooling by the stride; any H/h works here)."""
  ah = jnp.asarray(_pool_matrix(masks.shape[-2], int(grid_hw[0])))
  aw = jnp.asarray(_pool_matrix(masks.shape[-1], int(grid_hw[1])))
  counts = jnp.einsum('hH,...HW,wW->...hw', ah, masks.astype(jnp.float32), aw)
  return (counts > 0).astype(jnp.float32)


# ---- Local anomaly synthesis (images) --------------------------------------


def _augment_texture(key, tex):
  """Random flips, 90-degree turn (square only), brightness / contrast."""
  k_fy, k_fx, k_rot, k_b, k_c = jax.random.split(key, 5)
  tex = jnp.where(jax.random.bernoulli(k_fy), tex[::-1], tex)
  tex = jnp.where(jax.random.bernoulli(k_fx), tex[:, ::-1], tex)
  if tex.shape[0] == tex.shape[1]:
    tex = jnp.where(jax.random.bernoulli(k_rot), jnp.swapaxes(tex, 0, 1), tex)
  b = jax.random.uniform(k_b, (), jnp.float32, 0.8, 1.2)
  c = jax.random.uniform(k_c, (), jnp.float32, 0.8, 1.2)
  mean = tex.mean()
  return jnp.clip((tex - mean) * c + mean * b, 0.0, 1.0)


def match_texture(tex: jax.Array, img: jax.Array) -> jax.Array:
  """The texture's structure in the image's colours: its luminance,
  standardised, recoloured with the image's per-channel mean and std.

  A coloured texture on a grey data set (or any colour foreign to it) makes
  LAS defects that a discriminator spots by colour alone, which real defects
  do not share; matched, the synthetic defect differs in structure and
  contrast only. (H, W, 3) floats in [0, 1] -> (H, W, 3).
  """
  luma = tex @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
  z = (luma - luma.mean()) / (luma.std() + 1e-6)
  mean = img.mean((0, 1))
  std = img.std((0, 1))
  return jnp.clip(mean + z[..., None] * std, 0.0, 1.0)


def las_mask(key: jax.Array, hw: Sequence[int]) -> jax.Array:
  """The (H, W) 0/1 defect mask of the LAS image made with `key`."""
  k_mask = jax.random.split(key, 4)[0]
  return perlin_mask(k_mask, hw, LAS_THRESHOLD)


def las_image(key: jax.Array, image: jax.Array, textures: jax.Array,
              recolour: bool = False):
  """One synthetic defect image (GLASS's LAS), jittable.

  Inside the Perlin mask m = `las_mask(key, (H, W))` the image becomes
  beta * image + (1 - beta) * texture, beta ~ N(0.5, 0.1) clipped to
  [0.2, 0.8]; outside it is the image.

  Args:
    key: PRNG key.
    image: (H, W, 3) uint8 (or float in [0, 1]) training image.
    textures: (T, H, W, 3) uint8 texture bank at the image size
      (`texture_bank`); the image takes one at random, randomly flipped,
      turned and jittered.
    recolour: give the texture the image's colours (`match_texture`).

  Returns:
    (defect image (H, W, 3) float32 in [0, 1], mask (H, W) float32 0/1).
  """
  img = _unit(image)
  _, k_tex, k_aug, k_beta = jax.random.split(key, 4)
  m = las_mask(key, img.shape[:2])
  textures = jnp.asarray(textures)
  tex = _augment_texture(k_aug, _unit(textures[
      jax.random.randint(k_tex, (), 0, textures.shape[0])]))
  if recolour:
    tex = match_texture(tex, img)
  beta = jnp.clip(LAS_BETA[0] + LAS_BETA[1] * jax.random.normal(k_beta, ()),
                  0.2, 0.8)
  blend = beta * img + (1.0 - beta) * tex
  return jnp.where(m[..., None] > 0, blend, img), m


def las_images(key: jax.Array, images: jax.Array, textures: jax.Array,
               recolour: bool = False):
  """`las_image` over a batch (B, H, W, 3), image i with fold_in(key, i):
  ((B, H, W, 3) float32 in [0, 1], (B, H, W) masks)."""
  one = lambda i, img: las_image(jax.random.fold_in(key, i), img, textures,
                                 recolour)
  return jax.vmap(one)(jnp.arange(images.shape[0], dtype=jnp.uint32), images)


_las_image_jit = jax.jit(las_image, static_argnums=(3,))


class LASImages:
  """A training set whose image i is its LAS image made with fold_in(key, i)
  (uint8, what the backbone's feature function takes), for
  `feature_cache.build`; 'mask' holds the defect mask. Same interface as the
  data sets (len, image_hw, load)."""

  def __init__(self, dataset, key: jax.Array, textures: np.ndarray,
               recolour: bool):
    self.dataset, self.key, self.recolour = dataset, key, bool(recolour)
    self.textures = jnp.asarray(textures)
    self.image_hw = dataset.image_hw

  def __len__(self) -> int:
    return len(self.dataset)

  def load(self, i: int) -> dict:
    example = dict(self.dataset.load(i))
    img, m = _las_image_jit(jax.random.fold_in(self.key, int(i)),
                            jnp.asarray(example['image']), self.textures,
                            self.recolour)
    example['image'] = np.asarray(jnp.round(img * 255.0).astype(jnp.uint8))
    example['mask'] = np.asarray(m, np.uint8)
    return example


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pooled_masks(key, indices, image_hw, grid_hw):
  masks = jax.vmap(lambda i: las_mask(jax.random.fold_in(key, i),
                                      image_hw))(indices)
  return max_pool_to_grid(masks, grid_hw).reshape(len(indices), -1)


def las_labels(key: jax.Array, indices, image_hw, grid_hw,
               chunk: int = 64) -> np.ndarray:
  """(N, h*w) float32 0/1 labels of `LASImages(., key, .)`'s images
  `indices`: 1 where the defect mask reaches the feature cell."""
  indices = np.asarray(indices, np.uint32)
  n = len(indices)
  image_hw, grid_hw = tuple(map(int, image_hw)), tuple(map(int, grid_hw))
  chunk = min(chunk, n)
  # One shape for every chunk (the last padded): one compilation.
  padded = np.pad(indices, (0, -n % chunk))
  return np.concatenate([
      np.asarray(_pooled_masks(key, jnp.asarray(padded[s:s + chunk]),
                               image_hw, grid_hw))
      for s in range(0, len(padded), chunk)])[:n]


def _unit(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


# ---- Texture sources (host side, numpy) ------------------------------------


def _resize_crop(img: np.ndarray, hw, rng) -> np.ndarray:
  """A random crop of img (H0, W0, 3) uint8 with the aspect of hw, resized."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  h0, w0 = img.shape[:2]
  scale = rng.uniform(0.35, 1.0)
  ch = max(8, int(min(h0, w0 * hw[0] / hw[1]) * scale))
  cw = max(8, int(ch * hw[1] / hw[0]))
  ch, cw = min(ch, h0), min(cw, w0)
  top = int(rng.integers(0, h0 - ch + 1))
  left = int(rng.integers(0, w0 - cw + 1))
  crop = PIL.Image.fromarray(img[top:top + ch, left:left + cw])
  return np.asarray(crop.resize((hw[1], hw[0]), PIL.Image.Resampling.BILINEAR))


def _rgb(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0,
                  255).astype(np.uint8)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return img[..., :3]


def procedural_textures(n: int, hw, seed: int = 0) -> np.ndarray:
  """(n, H, W, 3) uint8 synthetic textures, no files needed.

  Each is a random mix of: multi-octave Perlin noise through a random
  two-colour ramp, oriented stripes or a checkerboard with random period,
  and sparse blobs; per-channel random colours, so they differ from any one
  data set's look in colour, frequency and structure (DTD's role in GLASS).
  """
  rng = np.random.default_rng(seed)
  h, w = int(hw[0]), int(hw[1])
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  out = np.empty((n, h, w, 3), np.uint8)
  for t in range(n):
    key = jax.random.PRNGKey(int(rng.integers(2**31)))
    octaves = np.zeros((h, w), np.float32)
    amp = 1.0
    base = int(rng.integers(1, 4))
    for o in range(int(rng.integers(1, 5))):
      res = min(64, 2**(base + o))
      octaves += amp * np.asarray(_perlin_noise_jit(
          jax.random.fold_in(key, o), (h, w), res, res,
          rng.uniform(-1.5, 1.5)))
      amp *= 0.5
    octaves = (octaves - octaves.min()) / (np.ptp(octaves) + 1e-6)
    kind = rng.integers(3)
    if kind == 0:  # Noise only.
      pattern = octaves
    elif kind == 1:  # Stripes, warped by the noise.
      period = rng.uniform(3, max(4, min(h, w) / 3))
      ang = rng.uniform(0, np.pi)
      phase = (np.cos(ang) * xx + np.sin(ang) * yy) / period
      pattern = 0.5 + 0.5 * np.sin(2 * np.pi * phase + 4 * octaves)
    else:  # Checkerboard, blended with the noise.
      period = rng.uniform(3, max(4, min(h, w) / 4))
      pattern = ((np.floor(yy / period) + np.floor(xx / period)) % 2)
      pattern = 0.6 * pattern + 0.4 * octaves
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 + pattern[..., None] * (c1 - c0)
    if rng.random() < 0.5:  # Sparse blobs in a third colour.
      blobs = octaves > np.quantile(octaves, rng.uniform(0.85, 0.97))
      img = np.where(blobs[..., None], rng.uniform(0, 255, 3), img)
    img += rng.normal(0, rng.uniform(0, 12), img.shape)
    out[t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
  return out


def texture_files(texture_dir: str) -> list[str]:
  """The image files under `texture_dir` (recursively), sorted."""
  from simplenet_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  return sorted(
      os.path.join(d, f) for d, _, fs in os.walk(texture_dir) for f in fs
      if images_lib.is_image_file(f))


def texture_bank(n: int, hw, seed: int = 0,
                 texture_dir: str = '') -> np.ndarray:
  """(n, H, W, 3) uint8 textures for `las_image`, deterministic in seed:
  random crops of the images under `texture_dir` (searched recursively,
  e.g. DTD's images/), or `procedural_textures` when it is ''."""
  if not texture_dir:
    return procedural_textures(n, hw, seed)
  from simplenet_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  hw = (int(hw[0]), int(hw[1]))
  files = texture_files(texture_dir)
  if not files:  # config_checks refuses such a folder before any work.
    raise ValueError(f'no image files under {texture_dir!r}')
  return np.stack([
      _resize_crop(_rgb(np.asarray(images_lib.load_rgb(
          files[rng.integers(len(files))]))), hw, rng) for _ in range(n)])


# ---- Losses ----------------------------------------------------------------


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0,
               hard_quantile: float = 0.0,
               mask: Optional[jax.Array] = None,
               smooth: float = 0.0) -> jax.Array:
  """Binary focal loss (Lin et al. 2017), mean over the kept rows.

  FL = -(1 - p_t)^gamma log(p_t), p = sigmoid(logits) the probability of
  label 1, p_t = p for label 1 and 1 - p for label 0. With hard_quantile > 0
  only rows whose (p - label)^2 is at or above that quantile are kept
  (GLASS: 0.5, the hardest half).

  With smooth > 0 it is GLASS's FocalLoss on its sigmoid outputs
  (GLASS_FOCAL_SMOOTH): p_t = y1 p + y0 (1 - p) + smooth, the one-hot
  labels y1 = y, y0 = 1 - y clamped to [smooth, 1 - smooth]; a confidently
  wrong row then costs at most about -log(2 smooth).

  Args:
    logits: (N,) float.
    labels: (N,) 0/1.
    gamma: focusing exponent (0: binary cross-entropy).
    hard_quantile: in [0, 1).
    mask: optional (N,) 0/1; rows with 0 are ignored (also by the quantile).
    smooth: 0 (exact, from the logits) or GLASS's clamp.

  Returns:
    f32 scalar.
  """
  logits = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  if smooth > 0:
    p = jax.nn.sigmoid(logits)
    one_hot = lambda v: jnp.clip(v, smooth, 1.0 - smooth)
    pt = one_hot(1.0 - y) * (1.0 - p) + one_hot(y) * p + smooth
    loss = -jnp.power(1.0 - pt, gamma) * jnp.log(pt)
  else:
    log_p = jax.nn.log_sigmoid(logits)
    log_q = jax.nn.log_sigmoid(-logits)
    log_pt = y * log_p + (1.0 - y) * log_q
    pt = jnp.exp(log_pt)
    loss = -jnp.power(1.0 - pt, gamma) * log_pt
    p = jnp.exp(log_p)
  keep = jnp.ones_like(loss) if mask is None else (mask > 0).astype(
      jnp.float32)
  if hard_quantile > 0:
    err = jnp.square(p - y)
    err_for_q = jnp.where(keep > 0, err, jnp.nan)
    cut = jax.lax.stop_gradient(jnp.nanquantile(err_for_q, hard_quantile))
    keep = keep * (err >= cut).astype(jnp.float32)
  return jnp.sum(loss * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def _weighted_bce(scores, fake, weight):
  """GLASS's loss: binary cross-entropy of p = sigmoid(-score) (the
  probability of "anomalous") against the labels, mean over each group
  (normal, fake) and summed, as GLASS sums its two BCE terms. p_true /
  p_fake: shares on the right side of p = 0.5. Computed from the logits
  (softplus), which is GLASS's BCE on sigmoid outputs without its clamp."""
  fake = fake.astype(jnp.float32)
  normal = (1.0 - fake) * weight
  fake = fake * weight
  mean = lambda v, w: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)
  loss = (mean(jax.nn.softplus(-scores), normal) +
          mean(jax.nn.softplus(scores), fake))
  p_true = mean((scores >= 0).astype(jnp.float32), normal)
  p_fake = mean((scores < 0).astype(jnp.float32), fake)
  return loss, p_true, p_fake


@jax.custom_vjp
def torch_bce(p: jax.Array, y: jax.Array) -> jax.Array:
  """torch's binary cross-entropy of probabilities p against labels y,
  per element: -(y log p + (1 - y) log(1 - p)) with each log clamped at
  BCE_LOG_MIN; its gradient is torch's (p - y) / max(p (1 - p),
  BCE_GRAD_EPS), so a probability rounded to 0 or 1 passes (almost) none
  through the sigmoid before it."""
  return -(y * jnp.maximum(jnp.log(p), BCE_LOG_MIN) +
           (1.0 - y) * jnp.maximum(jnp.log1p(-p), BCE_LOG_MIN))


def _torch_bce_fwd(p, y):
  return torch_bce(p, y), (p, y)


def _torch_bce_bwd(res, g):
  p, y = res
  return (g * (p - y) / jnp.maximum((1.0 - p) * p, BCE_GRAD_EPS),
          jnp.zeros_like(y))


torch_bce.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def _glass_bce(scores, fake, weight):
  """`_weighted_bce` as GLASS's code computes it (gas_bn='batch'): torch's
  BCE (`torch_bce`) on p = sigmoid(-score), its clamps included."""
  fake = fake.astype(jnp.float32)
  normal = (1.0 - fake) * weight
  terms = torch_bce(jax.nn.sigmoid(-scores), fake)
  fake = fake * weight
  mean = lambda v, w: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)
  loss = mean(terms, normal) + mean(terms, fake)
  p_true = mean((scores >= 0).astype(jnp.float32), normal)
  p_fake = mean((scores < 0).astype(jnp.float32), fake)
  return loss, p_true, p_fake


def _weighted_truncated_l1(scores, fake, margin, weight):
  """Per-row truncated L1 with labels: fake rows want score <= -m, normal
  rows >= m; mean over each group (SuperSimpleNet's per-patch form; with
  one row per group it is model.truncated_l1_loss)."""
  fake = fake.astype(jnp.float32)
  normal = (1.0 - fake) * weight
  fake = fake * weight
  mean = lambda v, w: jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)
  loss = (mean(jax.nn.relu(margin - scores), normal) +
          mean(jax.nn.relu(scores + margin), fake))
  p_true = mean((scores >= margin).astype(jnp.float32), normal)
  p_fake = mean((scores < -margin).astype(jnp.float32), fake)
  return loss, p_true, p_fake


# ---- Gradient-ascent synthesis ----------------------------------------------


def _norm(x):
  """Euclidean norm of each row: (N, D) -> (N,)."""
  return jnp.sqrt(jnp.sum(jnp.square(x), -1))


def project_to_ring(x: jax.Array, anchor: jax.Array, lo, hi) -> jax.Array:
  """Moves each row of x along (x - anchor) so that ||x - anchor|| lies in
  [lo, hi] (rows already inside are unchanged). (N, D) -> (N, D)."""
  h = x - anchor
  norm = _norm(h)[:, None]
  lo = jnp.reshape(lo, (-1, 1)) if jnp.ndim(lo) else lo
  hi = jnp.reshape(hi, (-1, 1)) if jnp.ndim(hi) else hi
  target = jnp.clip(norm, lo, hi)
  return anchor + h * (target / jnp.maximum(norm, 1e-12))


def las_onto_shell(las_rows: jax.Array, labels: jax.Array, centre: jax.Array,
                   r) -> jax.Array:
  """GLASS with the hypersphere: each LAS defect feature (label 1) moves
  along its offset from the centre onto the shell [2r, 4r] (outside the
  [r, 2r] ring of the GAS fakes); normal rows are unchanged. Gradients
  flow through the rows, not the centre or r. (N, D), (N,), (N, D) -> (N, D).
  """
  shell = project_to_ring(las_rows, centre, 2.0 * r, 4.0 * r)
  return jnp.where(labels[:, None] > 0, shell, las_rows)


def gradient_ascent(score_fn, fakes: jax.Array, anchor: jax.Array, lo, hi,
                    steps: int = 20, step_size=0.001,
                    every: int = 5) -> jax.Array:
  """GLASS's gradient-ascent synthesis, jittable (lax.fori_loop).

  Each step moves every fake by step_size along its own normalised gradient
  of score_fn (score: high = normal), i.e. towards what the discriminator
  takes for normal, which raises the discriminator's loss on the fakes; every
  `every` steps (and after the last) the fakes are projected back onto the
  ring [lo, hi] around `anchor` (`project_to_ring`).

  Args:
    score_fn: (N, D) -> (N,) per-row values to raise, rising as a row
      looks more normal: discriminator scores (BatchNorm with fixed
      statistics, each row's score depending on that row only,
      `_frozen_score_fn`; gas_bn='batch' uses `glass_ascent`); each row
      follows its normalised gradient of their sum.
    fakes: (N, D) starting points (adapted features + Gaussian noise).
    anchor: (N, D) ring centres: the true features ('manifold') or the
      training centre at each row's position ('hypersphere').
    lo, hi: ring radii, scalars or (N,).
    steps, every: static ints.
    step_size: scalar.

  Returns:
    (N, D) synthesised fakes (no gradient flows through them).
  """
  fakes = jax.lax.stop_gradient(fakes)
  anchor = jax.lax.stop_gradient(anchor)
  grad_fn = jax.grad(lambda x: jnp.sum(score_fn(x)))

  def body(t, x):
    g = grad_fn(x)
    norm = jnp.sqrt(jnp.sum(jnp.square(g), -1, keepdims=True))
    x = x + step_size * g / (norm + 1e-10)
    return jax.lax.cond((t + 1) % every == 0,
                        lambda v: project_to_ring(v, anchor, lo, hi),
                        lambda v: v, x)

  x = jax.lax.fori_loop(0, steps, body, fakes)
  if steps % every:
    x = project_to_ring(x, anchor, lo, hi)
  return jax.lax.stop_gradient(x)


def _frozen_score_fn(disc, disc_params, hidden_true, hidden_fake, mask_rows):
  """score(x) of the discriminator with BatchNorm fixed to the batch
  statistics of [true; fake] (train-mode normalisation, no gradient through
  the statistics, so every row's score depends on that row only)."""
  x = jnp.concatenate([hidden_true, hidden_fake])
  w = jnp.concatenate([mask_rows, mask_rows])[:, None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  stats, last = {}, None
  for fc, bn in model_lib.block_names(model_lib.num_layers(disc_params)):
    if last is not None:
      # A deeper head's later block: its statistics are those of the
      # block before's output, normalised with that block's own.
      x = jax.nn.leaky_relu(
          (x - stats[last]['mean']) * jax.lax.rsqrt(
              stats[last]['var'] + model_lib.TorchBatchNorm.epsilon)
          * disc_params[last]['scale'] + disc_params[last]['bias'], 0.2)
      x = x @ disc_params[fc]['kernel'] + disc_params[fc]['bias']
    mean = jnp.sum(x * w, 0) / n
    stats[bn] = {'mean': mean, 'var': jnp.sum(jnp.square(x - mean) * w, 0) / n}
    last = bn
  stats = jax.lax.stop_gradient(stats)

  def score(x):
    return disc.apply({'params': disc_params, 'batch_stats': stats}, x,
                      train=False)
  return score


def glass_ascent(loss_fn, fakes: jax.Array, stats, anchor: jax.Array, lo,
                 hi, steps: int = 20, step_size=0.001, every: int = 5):
  """GLASS's gradient ascent as its code runs it (gas_bn='batch'), jittable.

  The steps and projections of `gradient_ascent`, but each ascent forward
  also moves the discriminator's BatchNorm running statistics (GLASS's
  discriminator is in train mode), and the points at which the projections
  were taken are returned for `through_projections`.

  Args:
    loss_fn: (x (N, D), batch_stats) -> (the fakes' loss, the batch_stats
      after that forward) (`_glass_ascent_loss`); each row moves along its
      normalised gradient of the loss.
    fakes: (N, D) starting points (adapted features + Gaussian noise).
    stats: the discriminator's batch_stats before the ascent.
    anchor, lo, hi, steps, step_size, every: as `gradient_ascent`.

  Returns:
    (fakes (N, D), points (K, N, D) the fakes just before each of the K
    projections, batch_stats after the `steps` forwards); no gradient flows
    through them.
  """
  sg = jax.lax.stop_gradient
  fakes, anchor, stats = sg(fakes), sg(anchor), sg(stats)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def ascend(_, carry):
    x, st = carry
    g, st = grad_fn(x, st)
    norm = jnp.sqrt(jnp.sum(jnp.square(g), -1, keepdims=True))
    return x + step_size * (g / (norm + 1e-10)), st

  def block(carry, _):
    x, st = jax.lax.fori_loop(0, every, ascend, carry)
    return (project_to_ring(x, anchor, lo, hi), st), x

  (x, stats), points = jax.lax.scan(block, (fakes, stats), None,
                                    length=steps // every)
  if steps % every:
    x, stats = jax.lax.fori_loop(0, steps % every, ascend, (x, stats))
    points = jnp.concatenate([points, x[None]])
    x = project_to_ring(x, anchor, lo, hi)
  return sg(x), sg(points), sg(stats)


def through_projections(rows: jax.Array, points: jax.Array,
                        anchor: jax.Array, lo, hi) -> jax.Array:
  """Zeros (N, D) whose derivative w.r.t. rows is what GLASS's autograd
  gives its hypersphere fakes w.r.t. the true features: the fakes start as
  true + noise, the ascent steps are taken without autograd, and each
  projection onto the ring [lo, hi] around the (constant) anchor is
  differentiated, so d fakes / d true = J_K ... J_1, J_k the projection's
  Jacobian at points[k] (`glass_ascent`). Add the result to the fakes."""
  sg = jax.lax.stop_gradient

  def one(z, x):
    y = project_to_ring(x + z, anchor, lo, hi)
    return y - sg(y), None

  z, _ = jax.lax.scan(one, rows - sg(rows), sg(points))
  return z


def _glass_ascent_loss(disc, disc_params, true_rows, mask_rows):
  """gas_bn='batch', GLASS's ascent loss: (x, batch_stats) -> (the fakes'
  binary cross-entropy, torch's (`torch_bce`), mean over the fakes;
  batch_stats after the forward). The discriminator runs in train mode on
  [true; x], so the BatchNorm statistics follow the fakes at every ascent
  step, the gradient flows through them (fakes interact) and the running
  statistics move as in GLASS. mask_rows: (N,) 0/1 or None."""
  true_rows = jax.lax.stop_gradient(true_rows)
  disc_params = jax.lax.stop_gradient(disc_params)
  n = true_rows.shape[0]
  bn_mask = (None if mask_rows is None else
             jnp.concatenate([mask_rows, mask_rows]))

  def loss(x, stats):
    s, updates = disc.apply({'params': disc_params, 'batch_stats': stats},
                            jnp.concatenate([true_rows, x]), train=True,
                            mask=bn_mask, mutable=['batch_stats'])
    terms = torch_bce(jax.nn.sigmoid(-s[n:]), jnp.ones((n,), jnp.float32))
    if mask_rows is None:
      value = jnp.mean(terms)
    else:
      value = jnp.sum(terms * mask_rows) / jnp.maximum(jnp.sum(mask_rows), 1.0)
    return value, updates['batch_stats']
  return loss


def pass_centre(params, centre: jax.Array) -> jax.Array:
  """synthesis.gas_centre='pass': the raw centre (h, w, D) through the
  adaptor of `params` (the state at a pass's start), float32 (h, w, D), as
  GLASS recomputes its centre once per epoch with the projection of that
  moment (the adaptor is affine: the adapted centre is the centre of the
  adapted features). With model.heads = K > 1: (K, h, w, D), one per
  head."""
  if model_lib.num_heads(params) > 1:
    return jax.vmap(_pass_centre, in_axes=(0, None))(params['adaptor'], centre)
  return _pass_centre(params['adaptor'], centre)


@jax.jit
def _pass_centre(adaptor_params, centre):
  adaptor = model_lib.Adaptor(adaptor_params['fc']['kernel'].shape[1])
  rows = centre.reshape(-1, centre.shape[-1]).astype(jnp.float32)
  return adaptor.apply({'params': adaptor_params}, rows).reshape(
      *centre.shape[:-1], -1)


# ---- The loss and the step ---------------------------------------------------


def head_loss(params, batch_stats, features: jax.Array, key: jax.Array,
              noise_std, margin: float, syn: SynthesisConfig,
              mix_noise: int = 1, noise_layers: int = 1,
              centre: Optional[jax.Array] = None,
              las_features: Optional[jax.Array] = None,
              las_labels: Optional[jax.Array] = None,
              mask: Optional[jax.Array] = None):
  """Loss of one batch with the configured synthesis.

  Args:
    params, batch_stats: as in train.TrainState.
    features: (B, h, w, D) float local features of B training images
      (before the adaptor).
    key: PRNG key of this step (noise, Perlin masks).
    noise_std: f32 scalar, the Gaussian noise std (TrainState.noise_std).
    margin: the truncated L1 margin (unused with syn.loss='bce').
    syn: SynthesisConfig (static).
    mix_noise: released mix_noise (static).
    noise_layers: > 1 shapes the noise over that many layers' blocks
      (TrainState.noise_layers, `train.noisy_offsets`; static).
    centre: (h, w, D) mean local feature of the training images per position
      (before the adaptor: the adaptor is affine, so the adapted centre is
      adaptor(centre)); with syn.gas_centre='pass' already adapted
      (`pass_centre`); needed by gas='hypersphere'.
    las_features, las_labels: (B, h, w, D) local features of LAS images
      made from the same B images and (B, h, w) 0/1 defect labels; needed
      when syn.las_weight > 0.
    mask: optional (B,) 0/1; images with 0 (padding) are ignored.

  Returns:
    (loss, (metrics, new_batch_stats)): metrics f32 scalars 'loss',
    'p_true', 'p_fake' (as train.loss_fn) plus 'focal', 'p_las' (share of
    LAS defect patches scored < -margin, < 0 with 'bce') and 'radius' (GAS ring inner
    radius, 0 without GAS) when they apply.
  """
  adaptor, disc = train.head_modules(params)
  b, gh, gw, d = features.shape
  p = gh * gw
  n = b * p
  rows = features.reshape(n, d).astype(jnp.float32)
  row_mask = (jnp.ones((n,), jnp.float32) if mask is None else
              jnp.repeat(mask.astype(jnp.float32), p))
  adapt = lambda x: adaptor.apply({'params': params['adaptor']}, x)
  adapted = adapt(rows)
  k_noise, k_perlin = jax.random.split(key)
  kernel = params['adaptor']['fc']['kernel']
  noise = train.noisy_offsets(k_noise, rows, kernel, noise_std, mix_noise,
                              noise_layers, row_mask)
  rho = noise_std * math.sqrt(d)
  fc = params['discriminator']['fc']
  hidden = lambda x: x @ fc['kernel'] + fc['bias']
  metrics = {}

  if syn.las:
    las_rows = adapt(las_features.reshape(n, d).astype(jnp.float32))
    las_lab = las_labels.reshape(n).astype(jnp.float32)

  true_rows, true_label = adapted, jnp.zeros((n,), jnp.float32)
  if syn.perlin:
    # As SuperSimpleNet, both copies of the duplicated batch get their own
    # mask (each emptied with probability perlin_empty); keeping the first
    # copy clean halved the fakes per step. One key per copy, so image i's
    # masks and noise depend on (key, i) only (padding changes nothing).
    masks = lambda k: perlin_masks(k, b, (gh, gw), syn.perlin_threshold,
                                   PERLIN_SCALES, syn.perlin_empty).reshape(n)
    fake_label = masks(k_perlin)
    fakes = adapted + noise * fake_label[:, None]
    true_label = masks(jax.random.fold_in(k_perlin, 1))
    noise_2 = train.noisy_offsets(jax.random.fold_in(k_noise, 1), rows,
                                  kernel, noise_std, mix_noise, noise_layers,
                                  row_mask)
    true_rows = adapted + noise_2 * true_label[:, None]
  else:
    fakes = adapted + noise
    fake_label = jnp.ones((n,), jnp.float32)
    if syn.gas != 'none':
      disc_stats = batch_stats['discriminator']
      if syn.glass_step:
        ascent_loss = _glass_ascent_loss(disc, params['discriminator'],
                                         adapted,
                                         None if mask is None else row_mask)
      else:
        score = _frozen_score_fn(disc, params['discriminator'],
                                 hidden(adapted), hidden(fakes), row_mask)
      if syn.gas == 'manifold':
        anchor, lo, hi = adapted, syn.gas_r1 * rho, syn.gas_r2 * rho
      else:
        c = centre.reshape(p, d).astype(jnp.float32)
        if syn.gas_centre == 'step':
          c = adapt(c)  # 'pass': adapted by the loop (`pass_centre`).
        c = jax.lax.stop_gradient(jnp.tile(c, (b, 1)))
        dist = jnp.where(row_mask > 0, _norm(adapted - c), jnp.nan)
        if syn.las:
          # GLASS's radius also counts the LAS images' normal patches.
          las_normal = (row_mask > 0) & (las_lab == 0)
          dist = jnp.concatenate(
              [dist, jnp.where(las_normal, _norm(las_rows - c), jnp.nan)])
        r = jax.lax.stop_gradient(jnp.nanquantile(dist, syn.gas_quantile))
        anchor, lo, hi = c, r, 2.0 * r
        if syn.las and syn.las_shell:
          las_rows = las_onto_shell(las_rows, las_lab, c, r)
      step = syn.gas_step * rho
      if syn.glass_step:
        gas, points, disc_stats = glass_ascent(
            ascent_loss, fakes, disc_stats, anchor, lo, hi, syn.gas_steps,
            step, syn.gas_every)
        # GLASS's autograd: the fakes' gradient reaches the true features
        # through the projections (the identity for 'manifold', whose ring
        # moves with the true feature).
        fakes = gas + (through_projections(adapted, points, anchor, lo, hi)
                       if syn.gas == 'hypersphere' else
                       adapted - jax.lax.stop_gradient(adapted))
      else:
        gas = gradient_ascent(score, fakes, anchor, lo, hi, syn.gas_steps,
                              step, syn.gas_every)
        # Gradients reach the adaptor through the true features, as for the
        # released noise: fake = adapted + (fixed offset).
        fakes = adapted + jax.lax.stop_gradient(gas - adapted)
      metrics['radius'] = jax.lax.stop_gradient(lo / rho)

  parts = [true_rows, fakes]
  labels = [true_label, fake_label]
  weights = [row_mask, row_mask]
  disc_vars = lambda stats: {'params': params['discriminator'],
                             'batch_stats': stats}
  if syn.glass_step:
    # GLASS's two train-mode forwards, each with its own batch statistics
    # and each moving the running statistics: [true; fakes] (the last
    # forward of its ascent), then the LAS features.
    bn_mask = jnp.concatenate([row_mask] * 2)
    scores, updates = disc.apply(
        disc_vars(disc_stats), jnp.concatenate(parts), train=True,
        mask=bn_mask if mask is not None else None, mutable=['batch_stats'])
    if syn.las:
      las_scores, updates = disc.apply(
          disc_vars(updates['batch_stats']), las_rows, train=True,
          mask=row_mask if mask is not None else None,
          mutable=['batch_stats'])
  else:
    if syn.las:
      parts.append(las_rows)
    x = jnp.concatenate(parts)
    bn_mask = jnp.concatenate([row_mask] * len(parts))
    scores, updates = disc.apply(
        disc_vars(batch_stats['discriminator']),
        x, train=True, mask=bn_mask if mask is not None else None,
        mutable=['batch_stats'])
    if syn.las:
      las_scores = scores[2 * n:]
  if syn.loss == 'bce':
    bce = _glass_bce if syn.glass_step else _weighted_bce
    loss, p_true, p_fake = bce(
        scores[:2 * n], jnp.concatenate(labels), jnp.concatenate(weights))
  else:
    loss, p_true, p_fake = _weighted_truncated_l1(
        scores[:2 * n], jnp.concatenate(labels), margin,
        jnp.concatenate(weights))
  if syn.las:
    focal = focal_loss(-las_scores, las_lab, syn.focal_gamma, syn.focal_hard,
                       row_mask,
                       smooth=GLASS_FOCAL_SMOOTH if syn.glass_step else 0.0)
    loss = loss + syn.las_weight * focal
    defect = las_lab * row_mask
    metrics['focal'] = focal
    # A LAS defect patch counts as caught past the loss's decision point.
    cut = 0.0 if syn.loss == 'bce' else -margin
    metrics['p_las'] = jnp.sum((las_scores < cut) * defect) / jnp.maximum(
        jnp.sum(defect), 1.0)
  metrics.update(loss=loss, p_true=p_true, p_fake=p_fake)
  return loss, (metrics, {'discriminator': updates['batch_stats']})


@functools.partial(jax.jit, static_argnames=('syn',))
def train_step(state: train.TrainState, features: jax.Array, key: jax.Array,
               syn: SynthesisConfig, centre: Optional[jax.Array] = None,
               las_features: Optional[jax.Array] = None,
               las_labels: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None):
  """One optimiser step of a train.TrainState with `head_loss`.

  Args: as head_loss.

  Returns:
    (new_state, metrics); with stacked heads (model.heads > 1) as
    `train.for_each_head`.
  """
  if model_lib.num_heads(state.params) > 1:
    # gas_centre='pass' adapted the centre by each head's adaptor.
    per_head = centre is not None and centre.ndim == 4

    def one(s, k, *head_centre):
      return train_step(s, features, k, syn,
                        head_centre[0] if per_head else centre, las_features,
                        las_labels, mask)
    return train.for_each_head(one, state, key,
                               *((centre,) if per_head else ()))
  grad_fn = jax.value_and_grad(head_loss, has_aux=True)
  (_, (metrics, batch_stats)), grads = grad_fn(
      state.params, state.batch_stats, features, key, state.noise_std,
      state.margin, syn, state.mix_noise, state.noise_layers, centre,
      las_features, las_labels, mask)
  return train.apply_gradients(state, grads, batch_stats), metrics


def make_cached_step(mesh, grid_hw: Sequence[int], syn: SynthesisConfig,
                     mix: neighbour_mix.Mix = neighbour_mix.Mix()):
  """`train_step` on images gathered from the device-resident caches.

  Returns step(state, cache, idx, key, centre, las_cache, las_labels,
  partners) -> (state, metrics):
    cache: (N, h*w, D) training features (feature_cache.build).
    idx: (B,) int row indices into it (row r of a cache with views is view
      r // N of image r % N, `feature_cache.views`).
    key: the step's key (noise, Perlin masks, LAS variant choice).
    centre: (h, w, D) mean training feature per position, or None (needed
      by gas='hypersphere'); adapted with gas_centre='pass' (`head_loss`).
    las_cache, las_labels: (K, N, h*w, D) features of the K LAS images of
      every training image and their (K, N, h*w) defect labels, or None
      (needed by LAS); each image of the batch takes one of its K at random.
    partners: (N, h*w) `neighbour_mix.partners`, needed when mix.exact
      (train.neighbour_mix): the batch's features are moved toward them
      first (the LAS images' features are not); with mix.images the step
      draws the partners itself.
  The batch is split over the mesh by images (padded and masked when B
  does not divide); `state` is donated.
  """
  return _cached_step(mesh, (int(grid_hw[0]), int(grid_hw[1])), syn, mix)


# One jitted step (and its compilations) for every category of a run with
# the same mesh, grid and synthesis.
@functools.lru_cache(maxsize=32)
def _cached_step(mesh, grid_hw, syn: SynthesisConfig,
                 mix: neighbour_mix.Mix):
  one = functools.partial(_batch_step, mesh=mesh, grid_hw=grid_hw, syn=syn,
                          mix=mix)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, cache, idx, key, centre, las_cache, las_labels, partners):
    return one(state, cache, idx, key, centre, las_cache, las_labels,
               partners)

  def run(state, cache, idx, key, centre=None, las_cache=None,
          las_labels=None, partners=None):
    idx, key = parallel.global_inputs(mesh, idx, key)
    return step(state, cache, idx, key, centre, las_cache, las_labels,
                partners)

  return run


def _batch_step(state, cache, idx, key, centre, las_cache, las_labels,
                partners, n=None, n_train=None, *, mesh, grid_hw,
                syn: SynthesisConfig, mix: neighbour_mix.Mix):
  """`make_cached_step`'s step, traced. n: None when every row of idx is in
  the batch, else a traced count of the real ones (the first n; the
  stacked step's short batches); n_train: None, or the training images
  per view when the LAS cache is zero-padded past them."""
  h, w = grid_hw
  sharded = parallel.batch_sharded(mesh)
  b = idx.shape[0]
  padded = parallel.padded_size(b, mesh)
  mask = None
  if padded != b:
    idx = jnp.pad(idx, (0, padded - b))
    mask = (jnp.arange(padded) < b).astype(jnp.float32)
  if n is not None:
    mask = (jnp.arange(padded) < n).astype(jnp.float32)

  def images(x):
    x = x.reshape(padded, h, w, -1)
    return (jax.lax.with_sharding_constraint(x, sharded) if mesh.size > 1
            else x)

  feats = images(neighbour_mix.mix(cache, partners, idx, key, mix)
                 if mix.amount > 0 else cache[idx])
  las_f = las_l = None
  if las_cache is not None:
    v = jax.random.randint(jax.random.fold_in(key, 1), (padded,), 0,
                           las_cache.shape[0])
    # A flipped view (train.augment) takes its image's LAS images.
    img = idx % (las_cache.shape[1] if n_train is None else n_train)
    las_f = images(las_cache[v, img])
    las_l = las_labels[v, img].reshape(padded, h, w)
  return train_step(state, feats, key, syn, centre, las_f, las_l, mask)


def make_stacked_cached_step(mesh, grid_hw: Sequence[int],
                             syn: SynthesisConfig):
  """`make_cached_step` for K categories' heads at once (a vmap over K),
  each getting exactly the training it gets alone (up to float rounding):
  its own rows, key, centre and LAS images; a short batch is masked at its
  end, where `sample_noise`, the Perlin masks and the LAS draws keep the
  values they have for the real images alone. The categories share one
  grid (h, w); no train.neighbour_mix.

  Returns step(states, caches, idx, n_images, active, keys, centres,
  las_caches, las_labels, n_train) -> (states, metrics):
    states: K TrainStates stacked leaf-wise (`train.stack_states`); donated.
    caches: (K, R_max, h*w, D) the categories' feature caches, zero-padded
      to the largest R (rows: views x images).
    idx: (K, B) int32 rows of each cache (any value past n_images).
    n_images: (K,) int32 real rows in each category's batch this step.
    active: (K,) bool; an inactive category's state is returned unchanged.
    keys: (K,) the categories' step keys.
    centres: (K, ...) `make_cached_step`'s centre per category, or None.
    las_caches, las_labels: (K, V, N_max, h*w, D) and (K, V, N_max, h*w),
      zero-padded to the largest training set N_max, or None.
    n_train: (K,) int32 training images per category (per view).
  Metrics are (K,) per category; those of inactive categories are garbage.
  """
  return _stacked_step(mesh, (int(grid_hw[0]), int(grid_hw[1])), syn)


@functools.lru_cache(maxsize=32)  # As _cached_step.
def _stacked_step(mesh, grid_hw, syn: SynthesisConfig):
  batch_step = functools.partial(_batch_step, mesh=mesh, grid_hw=grid_hw,
                                 syn=syn, mix=neighbour_mix.Mix())

  def one(state, cache, idx, n, active, key, centre, las_cache, las_labels,
          n_train):
    # Rows past n read row 0 (masked): never an index past the cache.
    idx = jnp.where(jnp.arange(idx.shape[0]) < n, idx, 0)
    new, metrics = batch_step(state, cache, idx, key, centre, las_cache,
                              las_labels, None, n,
                              None if las_cache is None else n_train)
    return train.where_active(active, new, state), metrics

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(states, caches, idx, n_images, active, keys, centres, las_caches,
           las_labels, n_train):
    return jax.vmap(one)(states, caches, idx, n_images, active, keys,
                         centres, las_caches, las_labels, n_train)

  def run(states, caches, idx, n_images, active, keys, centres=None,
          las_caches=None, las_labels=None, n_train=None):
    idx, n_images, active, keys, n_train = parallel.global_inputs(
        mesh, idx, n_images, active, keys,
        np.zeros(len(n_images), np.int32) if n_train is None else n_train)
    return step(states, caches, idx, n_images, active, keys, centres,
                las_caches, las_labels, n_train)

  return run

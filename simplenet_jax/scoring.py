"""From local features to patch scores, anomaly maps and image scores.

Anomaly map (released RescaleSegmentor): patch scores bilinearly upsampled
(align_corners=False) to the input size, then scipy.ndimage.gaussian_filter
(sigma 4, truncate 4, mode 'reflect'). Both steps are linear and separable,
so per axis they fold into one small matrix A = G @ U, built once in float64,
and a map is A_h @ P @ A_w^T on device.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from simplenet_jax import features as features_lib
from simplenet_jax import train as train_lib

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def map_matrix(in_size: int, out_size: int, sigma: float) -> np.ndarray:
  """(out_size, in_size) float64: bilinear upsampling, then Gaussian blur."""
  up = features_lib.bilinear_matrix(in_size, out_size)
  if sigma <= 0:
    return up
  # Column j of the blur matrix is the filtered unit vector e_j.
  blur = scipy.ndimage.gaussian_filter1d(
      np.eye(out_size), sigma, axis=0, mode='reflect', truncate=4.0)
  return blur @ up


def anomaly_maps(patch_scores: jax.Array, out_hw: Sequence[int],
                 sigma: float = 4.0) -> jax.Array:
  """(B, h, w) patch scores -> (B, H, W) float32 anomaly maps."""
  _, h, w = patch_scores.shape
  ah = jnp.asarray(map_matrix(h, int(out_hw[0]), float(sigma)), jnp.float32)
  aw = jnp.asarray(map_matrix(w, int(out_hw[1]), float(sigma)), jnp.float32)
  return jnp.einsum('Hh,bhw,Ww->bHW', ah, patch_scores.astype(jnp.float32),
                    aw, precision=_HIGHEST)


def image_scores(patch_scores: jax.Array) -> jax.Array:
  """(B, h, w) -> (B,): the maximum raw patch score of each image."""
  return patch_scores.reshape(patch_scores.shape[0], -1).max(-1)


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; float images are only cast."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _features(backbone_module, layers, model_cfg, backbone_vars, images):
  maps = backbone_module.apply(backbone_vars, to_unit_float(images))
  return features_lib.aggregate(
      [maps[name] for name in layers],
      pretrain_embed_dim=int(model_cfg.pretrain_embed_dim),
      target_embed_dim=int(model_cfg.target_embed_dim),
      patch_size=int(model_cfg.patch_size))


def make_feature_fn(backbone_module, layers: Sequence[str], model_cfg):
  """Jitted fn(backbone_vars, images (B, H, W, 3)) -> (B, h, w, D) features.

  Images are uint8 or float in [0, 1]; `layers` picks the backbone outputs in
  order, the first one sets the grid.
  """
  layers = tuple(layers)
  return jax.jit(functools.partial(_features, backbone_module, layers,
                                   model_cfg))


def make_predict_fn(backbone_module, layers: Sequence[str], model_cfg,
                    image_hw: Sequence[int], sigma: float):
  """Jitted fn(backbone_vars, head_vars, images) -> dict of
  image_scores (B,), anomaly_maps (B, H, W) at image_hw, patch_scores
  (B, h, w). head_vars = {'params': ..., 'batch_stats': ...} as in TrainState.
  """
  layers = tuple(layers)
  out_hw = (int(image_hw[0]), int(image_hw[1]))
  sigma = float(sigma)

  def predict(backbone_vars, head_vars, images):
    feats = _features(backbone_module, layers, model_cfg, backbone_vars,
                      images)
    scores = train_lib.patch_scores(head_vars, feats)
    return {'image_scores': image_scores(scores),
            'anomaly_maps': anomaly_maps(scores, out_hw, sigma),
            'patch_scores': scores}
  return jax.jit(predict)

"""From local features to patch scores, anomaly maps and image scores.

Anomaly map (released RescaleSegmentor): patch scores bilinearly upsampled
(align_corners=False) to the input size, then scipy.ndimage.gaussian_filter
(sigma 4, truncate 4, mode 'reflect'). Both steps are linear and separable,
so per axis they fold into one small matrix A = G @ U, built once in float64,
and a map is A_h @ P @ A_w^T on device. eval.cells='measured' replaces U by
an interpolation with each cell at its receptive field's measured centre,
per view of eval.tta (simplenet_jax/cells.py, `cell_outputs`).

Image score (eval.image_score): the released code's is the largest raw patch
score ('patch_max'); 'map_max' is the largest value of the anomaly map, i.e.
of the smoothed scores, so that a lone noisy patch weighs less than a
defect that raises its neighbours too, and the score is the peak of the map
the user sees.

Squashed maps (eval.squash='sigmoid', not in the released code): the
head's patch scores go through sigmoid(score / model.margin) before the
map. The truncated L1 loss trains normal features to score below -margin
and fakes above +margin and says nothing beyond, so a defect patch may
score many margins high; upsampled and smoothed, such a peak spills onto
the normal pixels around the defect, above normal pixels elsewhere. In
units of the margin the sigmoid keeps the order of patch scores but bounds
each peak (GLASS's maps are sigmoids of its head's logits). The image
score keeps the unsquashed scores (the largest patch score, or the peak of
their map): spill is a matter of pixels, and in float32 a sigmoid is 1.0
beyond about 17 margins, which would tie the clearest defects. kNN
distances have no margin and are never squashed.

Patch scores at inference: in eval mode the adaptor (Linear D->D), the
discriminator's first Linear (D->H) and its BatchNorm (running statistics)
are one affine map, so `fused_head` folds them into a single (D, H) matrix.
That removes the D x D product per patch, 40% of the head's work
(1536*1536 of 1536*(1536+1024) multiply-adds), which on a CPU is what keeps
end-to-end inference close to backbone-only throughput.
"""

import functools
from typing import Sequence

from absl import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage

from simplenet_jax import cells as cells_lib
from simplenet_jax import console
from simplenet_jax import features as features_lib
from simplenet_jax import knn
from simplenet_jax import model as model_lib
from simplenet_jax.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST
# model.method: the released head ('simplenet') or PatchCore-style
# nearest-neighbour scoring on the same local features ('knn').
METHODS = ('simplenet', 'knn')
# eval.image_score: the released maximum patch score, or the map's maximum.
IMAGE_SCORES = ('patch_max', 'map_max')
# eval.tta: one pass (released), or patch scores averaged over the image and
# its horizontal, vertical and double flips (each flipped back).
TTAS = ('none', 'flips')
# eval.squash: the head's patch scores as they are (released), or
# sigmoid(score / model.margin) before the maps (SimpleNet heads only).
SQUASHES = ('none', 'sigmoid')
FLIP_AXES = ((), (2,), (1,), (1, 2))  # Of (B, H, W, C) images / (B, h, w).


@functools.lru_cache(maxsize=None)
def blur_matrix(size: int, sigma: float) -> np.ndarray:
  """(size, size) float64: scipy's gaussian_filter1d (truncate 4, mode
  'reflect') as a matrix; column j is the filtered unit vector e_j."""
  return scipy.ndimage.gaussian_filter1d(
      np.eye(size), sigma, axis=0, mode='reflect', truncate=4.0)


@functools.lru_cache(maxsize=None)
def map_matrix(in_size: int, out_size: int, sigma: float) -> np.ndarray:
  """(out_size, in_size) float64: bilinear upsampling, then Gaussian blur."""
  up = features_lib.bilinear_matrix(in_size, out_size)
  if sigma <= 0:
    return up
  return blur_matrix(out_size, sigma) @ up


def anomaly_maps(patch_scores: jax.Array, out_hw: Sequence[int],
                 sigma: float) -> jax.Array:
  """(B, h, w) patch scores -> (B, H, W) float32 anomaly maps.

  sigma: the Gaussian's std in output pixels (config eval.sigma; released:
  4); 0 = no smoothing.
  """
  _, h, w = patch_scores.shape
  ah = jnp.asarray(map_matrix(h, int(out_hw[0]), float(sigma)), jnp.float32)
  aw = jnp.asarray(map_matrix(w, int(out_hw[1]), float(sigma)), jnp.float32)
  return jnp.einsum('Hh,bhw,Ww->bHW', ah, patch_scores.astype(jnp.float32),
                    aw, precision=_HIGHEST)


def image_scores(patch_scores: jax.Array) -> jax.Array:
  """(B, h, w) -> (B,): the maximum raw patch score of each image."""
  return patch_scores.reshape(patch_scores.shape[0], -1).max(-1)


def outputs(patch_scores: jax.Array, out_hw: Sequence[int], sigma: float,
            image_score: str, scale: float = 0.0) -> dict:
  """(B, h, w) patch scores -> {'image_scores' (B,), 'anomaly_maps'
  (B, H, W)}, the image score by the rule `image_score` (IMAGE_SCORES).
  scale: `squash_scale`; the maps are of the `squashed` scores, the image
  score of the scores as they are."""
  maps = anomaly_maps(squashed(patch_scores, scale), out_hw, sigma)
  if image_score == 'map_max':
    peaks = anomaly_maps(patch_scores, out_hw, sigma) if scale else maps
    scores = peaks.reshape(peaks.shape[0], -1).max(-1)
  else:
    scores = image_scores(patch_scores)
  return {'image_scores': scores, 'anomaly_maps': maps}


def tta_views(patch_fn, images: jax.Array, tta: str, loop: bool = True,
              then=None) -> list:
  """patch_fn(images (B, H, W, C)) -> (B, h, w) patch scores, per view of
  eval.tta: [(flip axes, (B, h, w) scores flipped back)], the image first.

  'flips': the image and its three flips. With the released maps the views'
  grids are averaged (`_mean_grid`): those maps are linear in the grid and
  commute with flips (bilinear resize with half-pixel centres, a symmetric
  Gaussian), so that is also the mean of the four anomaly maps. The
  backbone's grid is flip-equivariant only up to its padding offsets: with
  torchvision's padding the views' cells lie some pixels apart
  (eval.cells='measured' draws each where it looks, `cell_outputs`).

  loop: the views go through one copy of patch_fn in a `lax.map`, so the
  program holds the backbone once, not four times (about half the compile
  time); each view is still a batch of B, so its scores are those of a call
  of its own. False unrolls the views (the ONNX lowering has no loops).
  then: with it, patch_fn gives (B, h, w, D) features and then((V, B, h, w,
  D)) the (V, B, h, w) scores of all V views at once, after the loop: kNN's
  chunked search over every view's rows together (on a 2-core CPU a search
  per view inside the loop was slower). Only with the loop: unrolled, the
  views would have to be stacked, which the ONNX lowering refuses.
  patch_fn and then may give a tuple of such arrays instead (the head's
  scores and kNN's features, `make_paired_predict_fn`); each view then
  holds a tuple of (B, h, w) scores, each flipped back.
  """
  if then is not None and not loop:
    raise ValueError('tta_views: `then` needs loop=True')
  if tta == 'none':
    out = patch_fn(images)
    if then is not None:
      out = jax.tree.map(lambda a: a[0],
                         then(jax.tree.map(lambda a: a[None], out)))
    return [((), out)]
  views = [jnp.flip(images, axes) if axes else images for axes in FLIP_AXES]
  if loop:
    stacked = jax.lax.map(patch_fn, jnp.stack(views))
    if then is not None:
      stacked = then(stacked)
    views = [jax.tree.map(lambda a, i=i: a[i], stacked)
             for i in range(len(FLIP_AXES))]
  else:  # A list: the ONNX lowering has neither loops nor jnp.stack.
    views = [patch_fn(v) for v in views]
  return [(axes, jax.tree.map(lambda s, a=axes: jnp.flip(s, a), scores)
           if axes else scores) for axes, scores in zip(FLIP_AXES, views)]


def _mean_grid(views) -> jax.Array:
  """(B, h, w): the mean of `tta_views`' score grids."""
  if len(views) == 1:
    return views[0][1]
  total = 0.0
  for _, scores in views:
    total = total + scores
  return total / len(views)


def cell_field(views, out_hw: Sequence[int], cells: cells_lib.Cells
               ) -> jax.Array:
  """(B, H, W) float32: the mean over `tta_views`' views of each view's
  grid interpolated with its cells where they look (`cells_lib.view_axis`).
  """
  total = 0.0
  for axes, scores in views:
    _, h, w = scores.shape
    mats = [jnp.asarray(cells_lib.cell_matrix(
        n, int(size), cells_lib.view_axis(axis, n, int(size), dim in axes)),
        jnp.float32) for n, size, axis, dim in
        ((h, out_hw[0], cells[0], 1), (w, out_hw[1], cells[1], 2))]
    total = total + jnp.einsum('Hh,bhw,Ww->bHW', mats[0],
                               scores.astype(jnp.float32), mats[1],
                               precision=_HIGHEST)
  return total / len(views)


def _blurred(field: jax.Array, sigma: float) -> jax.Array:
  """(B, H, W) -> (B, H, W): the released Gaussian (`blur_matrix`)."""
  if sigma <= 0:
    return field
  _, h, w = field.shape
  bh = jnp.asarray(blur_matrix(h, float(sigma)), jnp.float32)
  bw = jnp.asarray(blur_matrix(w, float(sigma)), jnp.float32)
  return jnp.einsum('Hh,bhw,Ww->bHW', bh, field, bw, precision=_HIGHEST)


def cell_outputs(views, out_hw: Sequence[int], sigma: float,
                 image_score: str, scale: float, cells: cells_lib.Cells
                 ) -> dict:
  """`outputs` under eval.cells='measured', from `tta_views`' views.

  The score field (`cell_field`) takes the place of the upsampled grid:
  the map is the blurred field of each view's `squashed` scores. 'map_max'
  is the largest value of the blurred field of the unsquashed scores;
  'patch_max' stays the largest patch score of the views' mean grid: the
  cells move, their scores do not.
  """
  maps = _blurred(cell_field([(axes, squashed(scores, scale))
                              for axes, scores in views], out_hw, cells),
                  sigma)
  if image_score == 'map_max':
    peaks = (_blurred(cell_field(views, out_hw, cells), sigma) if scale
             else maps)
    scores = peaks.reshape(peaks.shape[0], -1).max(-1)
  else:
    scores = image_scores(_mean_grid(views))
  return {'image_scores': scores, 'anomaly_maps': maps}


def _scored(views, out_hw, sigma, image_score, scale, cells) -> dict:
  """`outputs` (released cells: the views' mean grid) or `cell_outputs`,
  with 'patch_scores' (B, h, w), the views' mean grid."""
  mean = _mean_grid(views)
  if cells is None:
    out = outputs(mean, out_hw, sigma, image_score, scale)
  else:
    out = cell_outputs(views, out_hw, sigma, image_score, scale, cells)
  return {**out, 'patch_scores': mean}


_MEASURED = {}  # (id(vars), ...) -> (vars, cells): a strong ref keeps ids.


def cells_for(eval_cfg, backbone_module, layers: Sequence[str], model_cfg,
              backbone_vars, image_hw: Sequence[int], stored=None,
              where: str = '') -> cells_lib.Cells | None:
  """The cells the maps are drawn at: None for eval.cells='released', else
  the cells a trained model's decision threshold was set on (`stored`, its
  metadata's 'cells', `cells_lib.to_stored`; `where` names the checkpoint
  for an error), or `cells_lib.measure` of this backbone, its weights,
  layers, aggregation and image size, once per process."""
  if eval_cfg.cells == 'released':
    return None
  hw = tuple(int(v) for v in image_hw)
  if stored is not None:
    try:
      cells = cells_lib.from_stored(stored)
    except ValueError as e:
      raise UserError(f'{where}: {e}; train again in another --workdir') from e
    _say_cells(cells, hw, 'as training measured them (stored with the '
               'decision threshold)')
    return cells
  layers = tuple(layers)
  key = (id(backbone_vars), backbone_module, layers, _frozen(model_cfg), hw)
  if key not in _MEASURED:
    fn = functools.partial(_features, backbone_module, layers, model_cfg)
    grid = jax.eval_shape(fn, backbone_vars,
                          jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
    # The grid's stride: exact where the size is a multiple of it, and
    # torch-style and TF-style grids of other sizes round to it too.
    strides = [float(round(size / n)) for size, n in zip(hw, grid.shape[1:3])]
    cells = cells_lib.measure(fn, backbone_vars, hw, strides)
    _MEASURED[key] = (backbone_vars, cells)
    released = [cells_lib.released_axis(n, s)[1]
                for n, s in zip(grid.shape[1:3], hw)]
    _say_cells(cells, hw, 'where its feature looks (released: '
               f'{released[0]:+.2f}, {released[1]:+.2f})')
  return _MEASURED[key][1]


def _say_cells(cells: cells_lib.Cells, hw, why: str) -> None:
  """Logs and prints where eval.cells='measured' draws the cells."""
  message = ('eval.cells=measured: the maps draw cell (i, j) at pixel '
             f'({cells[0][0]:g} i {cells[0][1]:+.2f}, {cells[1][0]:g} j '
             f'{cells[1][1]:+.2f}) of {hw[0]} x {hw[1]}, {why}')
  logging.info('%s', message)
  console.note(message)


def map_args(eval_cfg) -> tuple[float, str, str, str]:
  """(sigma, image_score, tta, squash) of the config's eval section,
  hashable."""
  return (float(eval_cfg.sigma), str(eval_cfg.image_score),
          str(eval_cfg.tta), str(eval_cfg.squash))


def squash_scale(model_cfg, squash: str) -> float:
  """The margin that eval.squash='sigmoid' divides a SimpleNet head's patch
  scores by; 0.0 = no squash (eval.squash='none', and every kNN run: its
  distances have no margin)."""
  if squash == 'none' or model_cfg.method != 'simplenet':
    return 0.0
  return float(model_cfg.margin)


def squashed(patch_scores: jax.Array, scale: float) -> jax.Array:
  """(B, h, w) patch scores, through sigmoid(score / scale) unless scale is
  0 (`squash_scale`)."""
  if not scale:
    return patch_scores
  return jax.nn.sigmoid(patch_scores / scale)


def score_rule(eval_cfg) -> dict:
  """How image scores, and so the decision threshold, are computed; stored
  with the threshold. The smoothing enters them only through the map."""
  sigma, image_score, tta, squash = map_args(eval_cfg)
  rule = {'image_score': image_score}
  if image_score == 'map_max':
    rule['sigma'] = sigma
  if tta != 'none':  # Absent for one pass: thresholds stored before eval.tta.
    rule['tta'] = tta
  # The squash leaves image scores alone but not the maps, whose colour
  # range over the normal images is stored with the threshold.
  if squash != 'none':  # Absent likewise: stored before eval.squash.
    rule['squash'] = squash
  if eval_cfg.cells != 'released':  # Likewise.
    rule['cells'] = str(eval_cfg.cells)
  return rule


def check_score_rule(eval_cfg, meta: dict, where: str) -> None:
  """A stored decision threshold holds only for the scores it was set on
  (checkpoints from before eval.image_score existed scored 'patch_max')."""
  if 'threshold' not in meta:
    return
  stored = meta.get('score_rule', {'image_score': 'patch_max'})
  if stored != score_rule(eval_cfg):
    flags = ' '.join(f'--config.eval.{k}={v}' for k, v in stored.items())
    raise UserError(
        f'{where}: its decision threshold was set on image scores with '
        f'{stored}, but the config asks for {score_rule(eval_cfg)}; run '
        f'with {flags} or train in another --workdir')


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; float images are only cast."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _features(backbone_module, layers, model_cfg, backbone_vars, images):
  return _aggregated(model_cfg, _backbone_maps(backbone_module, layers,
                                               model_cfg, backbone_vars,
                                               images))


def _aggregated(model_cfg, maps) -> jax.Array:
  """(B, h, w, D) local features of the backbone's maps (`_backbone_maps`)."""
  return features_lib.aggregate(
      maps, pretrain_embed_dim=int(model_cfg.pretrain_embed_dim),
      target_embed_dim=int(model_cfg.target_embed_dim),
      patch_size=int(model_cfg.patch_size))


# The factories below are memoised on their (hashable) arguments: every
# category of a run gets the same jitted function, so a shape compiled for
# one category is not compiled again for the next.


def _frozen(model_cfg) -> ml_collections.FrozenConfigDict:
  """model.* as a hashable, immutable key."""
  return ml_collections.FrozenConfigDict(model_cfg)


def make_feature_fn(backbone_module, layers: Sequence[str], model_cfg):
  """Jitted fn(backbone_vars, images (B, H, W, 3)) -> (B, h, w, D) features.

  Images are uint8 or float in [0, 1]; `layers` picks the backbone outputs in
  order, the first one sets the grid.
  """
  return _feature_fn(backbone_module, tuple(layers), _frozen(model_cfg))


@functools.lru_cache(maxsize=32)
def _feature_fn(backbone_module, layers, model_cfg):
  return jax.jit(functools.partial(_features, backbone_module, layers,
                                   model_cfg))


@jax.jit
def fused_head(head_vars) -> dict:
  """The eval-mode head as {'kernel' (D, H), 'bias' (H,), 'tail' (H,)}.

  score(x) = -(leaky_relu(x @ kernel + bias, 0.2) @ tail) equals
  -Discriminator(Adaptor(x)) in eval mode up to float rounding: adaptor fc,
  discriminator fc and BatchNorm with running statistics composed into one
  affine map (float32, highest precision).

  Stacked heads (model.heads = K > 1) are averaged: since the hidden units
  act independently, the mean of K heads' scores is one head of K x H units
  (their kernels side by side, the tails divided by K), so everything that
  applies the fused head serves an ensemble unchanged.

  A deeper head (model.disc_layers = L > 2) adds 'blocks': L - 2 pairs
  (kernel (K, H, H), bias (K, H)), each later Linear and its BatchNorm
  folded alike, applied per head after the first LeakyReLU (`hidden_out`).
  """
  heads = model_lib.num_heads(head_vars['params'])
  if heads > 1:
    f = jax.vmap(fused_head)(head_vars)  # (K, D, H), (K, H), (K, H).
    d = f['kernel'].shape[1]
    out = {'kernel': jnp.transpose(f['kernel'], (1, 0, 2)).reshape(d, -1),
           'bias': f['bias'].reshape(-1),
           'tail': f['tail'].reshape(-1) / heads}
    if 'blocks' in f:  # (K, 1, H, H), (K, 1, H) -> (K, H, H), (K, H).
      out['blocks'] = [(k[:, 0], b[:, 0]) for k, b in f['blocks']]
    return out
  p, stats = head_vars['params'], head_vars['batch_stats']['discriminator']
  disc = p['discriminator']
  mm = functools.partial(jnp.matmul, precision=_HIGHEST)

  def folded(fc, bn, x_kernel, x_bias):
    """(x @ x_kernel + x_bias) through Linear `fc` and BatchNorm `bn`."""
    gain = disc[bn]['scale'] * jax.lax.rsqrt(
        stats[bn]['var'] + model_lib.TorchBatchNorm.epsilon)
    kernel = mm(x_kernel, disc[fc]['kernel']) * gain
    bias = (mm(x_bias, disc[fc]['kernel']) + disc[fc]['bias'] -
            stats[bn]['mean']) * gain + disc[bn]['bias']
    return kernel, bias

  adaptor = p['adaptor']['fc']
  names = model_lib.block_names(model_lib.num_layers(disc))
  kernel, bias = folded(*names[0], adaptor['kernel'], adaptor['bias'])
  out = {'kernel': kernel, 'bias': bias, 'tail': disc['tail']['kernel'][:, 0]}
  if len(names) > 1:
    eye = jnp.eye(kernel.shape[1], dtype=kernel.dtype)
    zero = jnp.zeros((kernel.shape[1],), kernel.dtype)
    out['blocks'] = [tuple(a[None] for a in folded(fc, bn, eye, zero))
                     for fc, bn in names[1:]]
  return out


def hidden_out(hidden: jax.Array, fused: dict) -> jax.Array:
  """(..., K*H) first-block outputs (before the LeakyReLU) -> (..., K*H)
  inputs of the tail: the LeakyReLU, then a deeper head's later blocks
  (`fused_head`'s 'blocks'), each head's H units through its own. The
  heads are sliced apart, not batched, so the ONNX lowering's matmuls
  serve them."""
  x = jax.nn.leaky_relu(hidden, 0.2)
  for kernel, bias in fused.get('blocks', ()):
    k, h = kernel.shape[0], kernel.shape[-1]
    x = jnp.concatenate([
        jnp.matmul(x[..., i * h:(i + 1) * h], kernel[i], precision=_HIGHEST)
        + bias[i] for i in range(k)], axis=-1)
    x = jax.nn.leaky_relu(x, 0.2)
  return x


@functools.lru_cache(maxsize=None)
def layer_taps(channels: tuple[int, ...], patch_size: int,
               pretrain_embed_dim: int, target_embed_dim: int):
  """The aggregation's channel maps, composed per layer.

  The aggregated vector is pool_T(concat_l(pool_P(unfold(layer l)))): linear
  in each layer's unfolded map, so per layer it is one set of taps into the
  padded map (features.unfold_weighted) that lands on the final bins `cols`
  it feeds (the spatial resize commutes with these channel maps).

  Returns:
    Per layer (dy, dx, c, w, cols): taps (n_l, k) and cols (n_l,) int32, the
    final feature indices; bins fed by two layers appear in both.
  """
  pp = patch_size**2
  p_idx, p_w = features_lib.adaptive_pool_taps(len(channels) *
                                               pretrain_embed_dim,
                                               target_embed_dim)
  out = []
  for layer, ch in enumerate(channels):
    u_idx, u_w = features_lib.adaptive_pool_taps(ch * pp, pretrain_embed_dim)
    per_col = {}
    for t in range(target_embed_dim):
      acc = {}
      for j, wt in zip(p_idx[t], p_w[t]):
        if wt == 0 or j // pretrain_embed_dim != layer:
          continue
        for f, wu in zip(u_idx[j % pretrain_embed_dim],
                         u_w[j % pretrain_embed_dim]):
          if wu:
            acc[int(f)] = acc.get(int(f), 0.0) + float(wt) * float(wu)
      if acc:
        per_col[t] = sorted(acc.items())
    cols = np.asarray(sorted(per_col), np.int32)
    k = max(len(v) for v in per_col.values())
    flat = np.zeros((len(cols), k), np.int64)
    w = np.zeros((len(cols), k), np.float32)
    for r, t in enumerate(cols):
      for q, (f, wt) in enumerate(per_col[t]):
        flat[r, q], w[r, q] = f, wt
    c, kk = np.divmod(flat, pp)
    dy, dx = np.divmod(kk, patch_size)
    out.append((dy.astype(np.int32), dx.astype(np.int32), c.astype(np.int32),
                w, cols))
  return tuple(out)


def _backbone_maps(backbone_module, layers, model_cfg, backbone_vars,
                   images) -> list:
  """The backbone's feature maps [(B, h_l, w_l, C_l)] of `layers`, in the
  backbone's dtype; the layers after the first from the image upsampled by
  model.coarse_scale (a second pass) when it is above 1."""
  x = to_unit_float(images)
  maps = backbone_module.apply(backbone_vars, x)
  scale = int(model_cfg.coarse_scale)
  if scale == 1:
    return [maps[name] for name in layers]
  _, h, w, _ = x.shape
  deep = backbone_module.apply(
      backbone_vars, features_lib.resize_batch(x, (scale * h, scale * w)))
  return [maps[layers[0]]] + [deep[name] for name in layers[1:]]


def _folded_scores(backbone_module, layers, model_cfg, backbone_vars, fused,
                   images):
  """(B, h, w) patch scores, the head applied per layer before resizing.

  Equals the fused head applied to _features(...) in exact arithmetic: the
  head's first (linear) map moves in front of the final pooling and the
  resize, so layer l costs n_l x H per position of its own grid (layer3: a
  quarter of the positions) and the (B, h, w, L*P) concatenation is never
  built.
  """
  return _folded_from_maps(
      model_cfg, fused,
      _backbone_maps(backbone_module, layers, model_cfg, backbone_vars,
                     images))


def _folded_from_maps(model_cfg, fused, maps) -> jax.Array:
  """`_folded_scores` of the backbone's maps (`_backbone_maps`)."""
  maps = [m.astype(jnp.float32) for m in maps]
  grid = maps[0].shape[1:3]
  patch = int(model_cfg.patch_size)
  taps = layer_taps(tuple(m.shape[-1] for m in maps), patch,
                    int(model_cfg.pretrain_embed_dim),
                    int(model_cfg.target_embed_dim))
  hidden = fused['bias']
  for m, (dy, dx, c, w, cols) in zip(maps, taps):
    g = features_lib.unfold_weighted(m, dy, dx, c, w, patch)
    h = jnp.matmul(g, fused['kernel'][cols])
    hidden = hidden + features_lib.resize_batch(h, grid)
  return -(hidden_out(hidden, fused) @ fused['tail'])


def make_export_fn(backbone_module, layers: Sequence[str], model_cfg,
                   backbone_vars, head_vars, image_hw: Sequence[int],
                   eval_cfg, cells: cells_lib.Cells | None = None):
  """fn(images (N, H, W, 3) uint8) -> (image_scores (N,), anomaly_maps
  (N, H, W)), float32: `make_predict_fn`'s maths with the backbone's and the
  head's (or memory bank's) weights closed over as constants, so that
  tracing it (with a symbolic N) gives the whole model in one self-contained
  program, which is what `export` serializes. cells: `cells_for`."""
  layers = tuple(layers)
  out_hw = (int(image_hw[0]), int(image_hw[1]))
  sigma, image_score, tta, squash = map_args(eval_cfg)
  scale = squash_scale(model_cfg, squash)
  if model_cfg.method == 'knn':
    bank = np.asarray(head_vars['bank'], np.float32)

    def patch_fn(images):
      feats = _features(backbone_module, layers, model_cfg, backbone_vars,
                        images)
      return knn.dense_patch_scores(bank, feats)
  else:
    fused = jax.tree.map(np.asarray, fused_head(head_vars))

    def patch_fn(images):
      return _folded_scores(backbone_module, layers, model_cfg, backbone_vars,
                            fused, images)

  def fn(images):
    out = _scored(tta_views(patch_fn, images, tta, loop=False), out_hw,
                  sigma, image_score, scale, cells)
    return out['image_scores'], out['anomaly_maps']

  return fn


def make_cached_features_fn(model_cfg, image_hw: Sequence[int], eval_cfg,
                            cells: cells_lib.Cells | None = None):
  """Jitted fn(head_vars, features (B, h, w, D)) -> {'image_scores' (B,),
  'anomaly_maps' (B, H, W)}: `make_predict_fn`'s outputs from local features
  already computed (the training feature cache), with no backbone pass."""
  return _cached_features_fn(_frozen(model_cfg),
                             (int(image_hw[0]), int(image_hw[1])),
                             *map_args(eval_cfg), cells)


@functools.lru_cache(maxsize=32)
def _cached_features_fn(model_cfg, out_hw, sigma, image_score, tta, squash,
                        cells):
  if tta != 'none':  # Cached features are of the unflipped images only.
    raise ValueError(f'no cached-feature scoring under eval.tta={tta!r}')
  scale = squash_scale(model_cfg, squash)

  @jax.jit
  def fn(head_vars, features):
    features = features.astype(jnp.float32)
    if model_cfg.method == 'knn':
      scores = knn.patch_scores(head_vars['bank'], features)
    else:
      fused = fused_head(head_vars)
      hidden = jnp.matmul(features, fused['kernel'],
                          precision=_HIGHEST) + fused['bias']
      scores = -(hidden_out(hidden, fused) @ fused['tail'])
    out = _scored([((), scores)], out_hw, sigma, image_score, scale, cells)
    return {k: out[k] for k in ('image_scores', 'anomaly_maps')}
  return fn


def make_predict_fn(backbone_module, layers: Sequence[str], model_cfg,
                    image_hw: Sequence[int], eval_cfg,
                    cells: cells_lib.Cells | None = None):
  """fn(backbone_vars, head_vars, images) -> dict of
  image_scores (B,), anomaly_maps (B, H, W) at image_hw, patch_scores
  (B, h, w) (the head's, or kNN's, before eval.squash).
  head_vars is the trained state's `head_vars()`: for SimpleNet
  {'params': ..., 'batch_stats': ...}, for model.method='knn' {'bank': ...}.
  eval_cfg: the config's eval section (`map_args`; also for
  `make_cached_features_fn` and `make_export_fn`). cells: where the maps
  draw the grid's cells, `cells_for` (None: the released resize).

  The work runs in one jitted call per batch. SimpleNet's head is folded
  (`fused_head`) once per head_vars (the same leaf arrays) and reused; kNN
  scores are nearest-bank-row distances (`knn.patch_scores`).
  """
  return _predict_fn(backbone_module, tuple(layers), _frozen(model_cfg),
                     (int(image_hw[0]), int(image_hw[1])),
                     *map_args(eval_cfg), cells)


def run_predict_fn(config, backbone_module, backbone_vars,
                   image_hw: Sequence[int], stored=None, where: str = ''):
  """(cells, predict_fn) of a run's config: `make_predict_fn` with its
  backbone layers, model and eval sections, its maps drawn at `cells_for`'s
  cells (stored: a trained model's metadata 'cells'; where: its checkpoint,
  named in errors)."""
  cells = cells_for(config.eval, backbone_module, config.backbone.layers,
                    config.model, backbone_vars, image_hw, stored, where)
  return cells, make_predict_fn(backbone_module, config.backbone.layers,
                                config.model, image_hw, config.eval, cells)


@functools.lru_cache(maxsize=32)
def _predict_fn(backbone_module, layers, model_cfg, out_hw, sigma,
                image_score, tta, squash, cells):
  scale = squash_scale(model_cfg, squash)

  def with_patches(patch_fn, images, then=None):
    return _scored(tta_views(patch_fn, images, tta, then=then), out_hw,
                   sigma, image_score, scale, cells)

  if model_cfg.method == 'knn':
    @jax.jit
    def predict_knn(backbone_vars, head_vars, images):
      return with_patches(
          functools.partial(_features, backbone_module, layers, model_cfg,
                            backbone_vars), images,
          then=functools.partial(knn.patch_scores, head_vars['bank']))
    return predict_knn

  @jax.jit
  def predict(backbone_vars, fused, images):
    return with_patches(functools.partial(
        _folded_scores, backbone_module, layers, model_cfg, backbone_vars,
        fused), images)

  fuse = _FusedOnce()
  return lambda backbone_vars, head_vars, images: predict(
      backbone_vars, fuse(head_vars), images)


class _FusedOnce:
  """`fused_head` of the last head_vars it was called with, folded again
  only when their leaf arrays change (a predict function is called once
  per batch with the same trained state)."""

  def __init__(self):
    self.leaves, self.fused = (), None  # Strong refs: ids cannot be reused.

  def __call__(self, head_vars) -> dict:
    leaves = tuple(jax.tree.leaves(head_vars))
    if len(leaves) != len(self.leaves) or any(
        a is not b for a, b in zip(leaves, self.leaves)):
      self.leaves, self.fused = leaves, fused_head(head_vars)
    return self.fused


# make_paired_predict_fn's keys for kNN's outputs: 'knn_' + the head's.
PAIRED_PREFIX = 'knn_'


def make_paired_predict_fn(backbone_module, layers: Sequence[str], model_cfg,
                           image_hw: Sequence[int], eval_cfg,
                           cells: cells_lib.Cells | None = None):
  """fn(backbone_vars, head_vars, bank (M, D), images) -> `make_predict_fn`'s
  dict for a SimpleNet head, plus the same keys prefixed PAIRED_PREFIX for
  kNN with memory bank `bank` (eval.yardstick): both scorers on one backbone
  pass per view.

  Each scorer's outputs are those of its own `make_predict_fn`
  (model.method='simplenet' with head_vars, 'knn' with {'bank': bank}): the
  same folded head, the same nearest-row search over every view's features
  together, the same maps; kNN's scores are never squashed.
  """
  if model_cfg.method != 'simplenet':
    raise ValueError('make_paired_predict_fn: a SimpleNet head and kNN')
  return _paired_predict_fn(backbone_module, tuple(layers), _frozen(model_cfg),
                            (int(image_hw[0]), int(image_hw[1])),
                            *map_args(eval_cfg), cells)


@functools.lru_cache(maxsize=32)
def _paired_predict_fn(backbone_module, layers, model_cfg, out_hw, sigma,
                       image_score, tta, squash, cells):
  scale = squash_scale(model_cfg, squash)

  @jax.jit
  def predict(backbone_vars, fused, bank, images):
    def patch_fn(x):  # One backbone pass: the head's scores, kNN's features.
      maps = _backbone_maps(backbone_module, layers, model_cfg,
                            backbone_vars, x)
      return (_folded_from_maps(model_cfg, fused, maps),
              _aggregated(model_cfg, maps))

    def then(out):  # Every view's kNN features searched together.
      return out[0], knn.patch_scores(bank, out[1])

    views = tta_views(patch_fn, images, tta, then=then)
    head = _scored([(axes, s[0]) for axes, s in views], out_hw, sigma,
                   image_score, scale, cells)
    near = _scored([(axes, s[1]) for axes, s in views], out_hw, sigma,
                   image_score, 0.0, cells)
    return {**head, **{PAIRED_PREFIX + k: v for k, v in near.items()}}

  fuse = _FusedOnce()
  return lambda backbone_vars, head_vars, bank, images: predict(
      backbone_vars, fuse(head_vars), bank, images)

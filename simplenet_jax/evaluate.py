"""Evaluation of one category: scores, metrics, heat maps.

Streams the test set: per batch the device returns image scores and smoothed
maps; the host keeps one float32 copy of the maps for the pixel metrics and
nothing else, so memory grows only with the per-pixel arrays the metrics need.
"""

import os

from absl import logging
import numpy as np

from simplenet_jax import metrics
from simplenet_jax import parallel
from simplenet_jax import train
from simplenet_jax import visualize
from simplenet_jax.data import loader

# eval.visualize: heat maps of no, the top-N scoring, or all test images.
VISUALIZE = ('none', 'top', 'all')


def _predict_batches(ctx, state, dataset, indices=None):
  """Yields (batch, outputs) with outputs as numpy, padding removed."""
  c = ctx.config
  hv = train.head_vars(state)
  for batch in loader.batches(dataset, c.eval.batch_size, indices=indices,
                              num_workers=c.dataset.num_workers,
                              prefetch=c.dataset.prefetch):
    images, n = parallel.put_batch(batch['image'], ctx.mesh)
    out = ctx.predict_fn(ctx.backbone_vars, hv, images)
    yield batch, {k: parallel.to_host(v)[:n] for k, v in out.items()}


def normal_statistics(ctx, state, dataset, indices):
  """Image scores (N,) of dataset[indices] and [min, max] of their maps."""
  scores, lo, hi = [], np.inf, -np.inf
  for _, out in _predict_batches(ctx, state, dataset, indices):
    scores.append(out['image_scores'])
    lo = min(lo, float(out['anomaly_maps'].min()))
    hi = max(hi, float(out['anomaly_maps'].max()))
  return np.concatenate(scores), [lo, hi]


def decision_threshold(ctx, state) -> dict:
  """Quantile of image scores on normal images the model did not train on.

  Also stores the range of those images' anomaly maps: predict mode draws its
  heat maps on that scale, so red means "beyond anything normal looked like".
  """
  if len(ctx.holdout_idx):
    idx = ctx.holdout_idx
    source = f'{len(idx)} held-out normal training images'
  else:
    idx = ctx.train_idx
    source = f'{len(idx)} training images (in-sample: no hold-out)'
  scores, map_range = normal_statistics(ctx, state, ctx.train_set, idx)
  q = ctx.config.threshold.quantile
  return dict(threshold=float(np.quantile(scores, q)),
              threshold_quantile=float(q),
              threshold_source=f'quantile {q} of image scores over {source}',
              map_range=map_range)


def evaluate_category(ctx, state, meta, visualize_maps: bool = True) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of `state` on the category's test set.

  Returns:
    A table row: category, kind, image_auroc, pixel_auroc, aupro (fractions,
    nan where undefined), n_test, plus the test-set selected best pass when
    training recorded one.
  """
  c = ctx.config
  test = ctx.test_set
  pixel = (metrics.PixelMetrics(expected_images=len(test),
                                max_fpr=c.eval.aupro_max_fpr)
           if test.has_masks else None)
  scores, labels, names = [], [], []
  for batch, out in _predict_batches(ctx, state, test):
    scores.append(out['image_scores'])
    labels.append(batch['label'])
    names.extend(batch['path'])
    if pixel is not None:
      pixel.add(out['anomaly_maps'], batch['mask'])
  scores = np.concatenate(scores)
  labels = np.concatenate(labels)
  row = {'category': ctx.category, 'kind': ctx.kind, 'n_test': int(len(labels)),
         'image_auroc': metrics.image_auroc(scores, labels),
         'pixel_auroc': float('nan'), 'aupro': float('nan')}
  if pixel is not None:
    row.update(pixel.compute())  # Both pixel metrics from one sort.
    map_range = pixel.score_range()
  else:
    logging.warning('%s: the test set has no masks; pixel AUROC and AUPRO are '
                    'skipped (n/a).', ctx.category)
    map_range = None
  best = meta.get('best_on_test') if meta else None
  if best is not None:
    # The released protocol: the best evaluated pass, chosen on the test set.
    final = (row['image_auroc'], row['pixel_auroc'])
    final = tuple(-1.0 if np.isnan(x) else x for x in final)
    if final >= tuple(best['key']):
      best = {'pass': c.train.num_passes,
              **{k: row[k] for k in ('image_auroc', 'pixel_auroc', 'aupro')}}
    row['best_on_test'] = {k: v for k, v in best.items() if k != 'key'}
  if visualize_maps and c.eval.visualize != 'none':
    _save_heatmaps(ctx, state, scores, map_range)
  return row


def _save_heatmaps(ctx, state, scores, map_range):
  """Figure-1 style overlays of all or the top-N scoring test images."""
  c = ctx.config
  order = np.argsort(-scores, kind='stable')
  if c.eval.visualize == 'top':
    order = order[:c.eval.visualize_top_n]
  if not len(order):
    return
  out_dir = os.path.join(ctx.workdir, 'heatmaps')
  for batch, out in _predict_batches(ctx, state, ctx.test_set,
                                     np.sort(order)):
    maps = out['anomaly_maps']
    vmin, vmax = map_range if map_range else (float(maps.min()),
                                              float(maps.max()))
    masks = batch['mask'] if ctx.test_set.has_masks else [None] * len(maps)
    names = [f'{d}_{os.path.splitext(os.path.basename(p))[0]}'
             for d, p in zip(batch['defect'], batch['path'])]
    visualize.save_overlays(out_dir, batch['image'], maps, masks,
                            names, out['image_scores'],
                            vmin=vmin, vmax=vmax)

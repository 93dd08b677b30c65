"""Evaluation of one category: scores, metrics, heat maps.

Streams the test set: per batch the device returns image scores and smoothed
maps; the host keeps one float32 copy of the maps for the pixel metrics and
nothing else, so memory grows only with the per-pixel arrays the metrics need.
The final evaluation also keeps what the HTML report shows (`eval_record`),
and every evaluation can go to TensorBoard (`summaries`).
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import cells as cells_lib
from simplenet_jax import console
from simplenet_jax import eval_record
from simplenet_jax import metrics
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import summaries
from simplenet_jax import synthesis
from simplenet_jax import visualize
from simplenet_jax.data import loader

# eval.visualize: heat maps of no, the top-N scoring, or all test images.
VISUALIZE = ('none', 'top', 'all')


def _predict_batches(ctx, state, dataset, indices=None, batch_size=None,
                     desc=None):
  """Yields (batch, outputs) with outputs as numpy, padding removed; with
  `desc`, a progress bar of the images on a terminal."""
  c = ctx.config
  hv = state.head_vars()
  batch_size = batch_size or c.eval.batch_size
  total = len(dataset) if indices is None else len(indices)
  with console.progress(total, desc) as bar:
    for batch in loader.batches(dataset, batch_size, indices=indices,
                                num_workers=c.dataset.num_workers,
                                prefetch=c.dataset.prefetch):
      # One shape for every batch (the last one padded): one compilation.
      images, n = parallel.put_batch(batch['image'], ctx.mesh,
                                     min_rows=batch_size)
      out = ctx.predict_fn(ctx.backbone_vars, hv, images)
      yield batch, {k: parallel.to_host(v)[:n] for k, v in out.items()}
      bar.update(n)


def normal_statistics(ctx, state, dataset, indices):
  """Image scores (N,) of dataset[indices] and [min, max] of their maps."""
  scores, lo, hi = [], np.inf, -np.inf
  for _, out in _predict_batches(ctx, state, dataset, indices,
                                desc=f'{ctx.category} threshold images'):
    scores.append(out['image_scores'])
    lo = min(lo, float(out['anomaly_maps'].min()))
    hi = max(hi, float(out['anomaly_maps'].max()))
  return np.concatenate(scores), [lo, hi]


def decision_threshold(ctx, state, cache=None) -> dict:
  """Quantile of image scores on normal images the model did not train on.

  Also stores the range of those images' anomaly maps: predict mode draws its
  heat maps on that scale, so red means "beyond anything normal looked like".
  Those are the category's validation images where it has them, else the
  held-out training images. Without either the training images themselves
  are scored, from the feature cache when given (N, h*w, D) (no second
  backbone pass over them).
  """
  unseen = ctx.unseen_normal_images()
  if unseen is not None:
    dataset, idx, source = unseen
    scores, map_range = normal_statistics(ctx, state, dataset, idx)
  else:
    idx = ctx.train_idx
    source = f'{len(idx)} training images (in-sample: no hold-out)'
    if cache is not None and ctx.config.eval.tta == 'none':
      # The first len(idx) rows: the images as they are, without the other
      # views train.augment adds.
      scores, map_range = _cached_statistics(ctx, state, cache[:len(idx)])
    else:
      scores, map_range = normal_statistics(ctx, state, ctx.train_set, idx)
  q = ctx.config.threshold.quantile
  record = dict(threshold=float(np.quantile(scores, q)),
                threshold_quantile=float(q),
                score_rule=scoring.score_rule(ctx.config.eval),
                threshold_source=f'quantile {q} of image scores over {source}',
                map_range=map_range)
  if ctx.cells:  # eval.cells='measured': the cells both were set on.
    record['cells'] = cells_lib.to_stored(ctx.cells)
  return record


class _Repeated:
  """dataset[indices] `times` times over: item i is dataset[indices[i % n]]
  (the data sets' interface: len, image_hw, load)."""

  def __init__(self, dataset, indices, times: int):
    self.dataset, self.indices = dataset, np.asarray(indices)
    self.times = int(times)
    self.image_hw = dataset.image_hw

  def __len__(self) -> int:
    return self.times * len(self.indices)

  def load(self, i: int) -> dict:
    return self.dataset.load(int(self.indices[i % len(self.indices)]))


# The synthetic defects' key and texture seed: fixed, so that every run on
# the same unseen normal images scores the same defects, whatever its seed.
SYNTHETIC_KEY = 20231130


def synthetic_check(ctx, state) -> dict:
  """Pixel AUROC on synthetic defects (eval.synthetic_defects): LAS images
  (`synthesis.LASImages`: a texture blended into a Perlin mask, GLASS's
  recipe, the textures of synthesis.texture_dir or the procedural ones)
  made from the normal images the model did not train on
  (`ctx.unseen_normal_images`), eval.synthetic_defects per image, scored
  like the test set against their masks.

  A label-free figure for comparing runs of one method on the same data
  that differ in train.augment: the defects are not the real ones, so its
  level says little, and it ranked neither the noise size nor the head
  against kNN as the real defects did (docs/quality.md, twentieth round).

  Returns {'synthetic_pixel_auroc': fraction, 'synthetic_source': which
  images}, or {} (with a warning) when there are no unseen normal images.
  """
  c = ctx.config
  unseen = ctx.unseen_normal_images()
  if unseen is None:
    logging.warning('%s: eval.synthetic_defects needs normal images not '
                    'trained on (validation images or '
                    'threshold.holdout_fraction > 0); skipped.', ctx.category)
    return {}
  dataset, idx, source = unseen
  textures = synthesis.texture_bank(synthesis.TEXTURES, dataset.image_hw,
                                    seed=SYNTHETIC_KEY,
                                    texture_dir=c.synthesis.texture_dir)
  images = synthesis.LASImages(
      _Repeated(dataset, idx, c.eval.synthetic_defects),
      jax.random.PRNGKey(SYNTHETIC_KEY), textures, c.synthesis.recolour)
  pixel = metrics.PixelMetrics(expected_images=len(images),
                               max_fpr=c.eval.aupro_max_fpr)
  for batch, out in _predict_batches(
      ctx, state, images, desc=f'{ctx.category} synthetic defects'):
    pixel.add(out['anomaly_maps'], batch['mask'])
  return {'synthetic_pixel_auroc': pixel.compute()['pixel_auroc'],
          'synthetic_source': f'{len(images)} synthetic defect images made '
                              f'from {source}'}


def _cached_statistics(ctx, state, cache):
  """`normal_statistics` of the training images, from their cached
  features (row i of the cache is ctx.train_set[ctx.train_idx[i]])."""
  c = ctx.config
  fn = scoring.make_cached_features_fn(c.model, ctx.test_set.image_hw,
                                       c.eval, ctx.cells)
  head = state.head_vars()
  h, w = ctx.grid_hw
  scores, lo, hi = [], np.inf, -np.inf
  bs = c.eval.batch_size
  for start in range(0, cache.shape[0], bs):
    feats = cache[start:start + bs]
    n = feats.shape[0]
    if n < bs:  # The last batch padded: one shape, one compilation.
      feats = jnp.pad(feats, ((0, bs - n), (0, 0), (0, 0)))
    out = fn(head, feats.reshape(bs, h, w, feats.shape[-1]))
    scores.append(parallel.to_host(out['image_scores'])[:n])
    maps = parallel.to_host(out['anomaly_maps'])[:n]
    lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
  return np.concatenate(scores), [lo, hi]


def evaluate_category(ctx, state, meta, visualize_maps: bool = True,
                      tb=None, step: int | None = None,
                      yardstick: bool = False) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of `state` on the category's test set.

  Args:
    ctx, state: the category and its trained state.
    meta: the checkpoint's metadata (the decision threshold), or None during
      training.
    visualize_maps: the final evaluation: heat maps (eval.visualize) and the
      report's record (report.html).
    tb: a `summaries.Writer`, or None; `step` is the pass it logs at.
    yardstick: this is the kNN yardstick of a final evaluation
      (`yardstick.evaluate_knn`): with report.html, its maps of the images
      the report's galleries show join the category's record.

  Returns:
    A table row: category, kind, image_auroc, pixel_auroc, aupro (fractions,
    nan where undefined), n_test, plus the test-set selected best pass when
    training recorded one, and in a final evaluation (or the yardstick's)
    of a test set with two or more defect types, by_defect
    (`metrics.by_defect`).
  """
  c = ctx.config
  test = ctx.test_set
  pixel = (metrics.PixelMetrics(expected_images=len(test),
                                max_fpr=c.eval.aupro_max_fpr)
           if test.has_masks else None)
  scores, labels, names, defects = [], [], [], []
  for batch, out in _predict_batches(
      ctx, state, test, desc=f'{ctx.category} '
      + ('kNN test images' if yardstick else 'test images')):
    scores.append(out['image_scores'])
    labels.append(batch['label'])
    names.extend(f'{d}/{os.path.basename(p)}'
                 for d, p in zip(batch['defect'], batch['path']))
    defects.extend(batch['defect'])
    if pixel is not None:
      pixel.add(out['anomaly_maps'], batch['mask'])
  scores = np.concatenate(scores)
  labels = np.concatenate(labels)
  row = {'category': ctx.category, 'kind': ctx.kind, 'n_test': int(len(labels)),
         'image_auroc': metrics.image_auroc(scores, labels),
         'pixel_auroc': float('nan'), 'aupro': float('nan')}
  record = visualize_maps and c.report.html
  pro_curve = None
  if pixel is not None:
    # Both pixel metrics (and the report's PRO curve) from one sort.
    row.update(pixel.compute(eval_record.PRO_CURVE_POINTS if record else 0))
    pro_curve = row.pop('pro_curve', None)
    map_range = pixel.score_range()
  else:
    logging.warning('%s: the test set has no masks; pixel AUROC and AUPRO are '
                    'skipped (n/a).', ctx.category)
    map_range = None
  threshold = meta.get('threshold') if meta else None
  if threshold is not None:
    row['decisions'] = metrics.decision_counts(scores, labels, threshold)
  if visualize_maps or yardstick:  # A final evaluation: each defect type.
    by_defect = metrics.by_defect(scores, labels, defects, pixel, threshold)
    if by_defect:
      row['by_defect'] = by_defect
  if meta and meta.get('saturated_at'):  # model.shrink_on_saturation acted.
    row['saturated_at'] = int(meta['saturated_at'])
  if meta and meta.get('stopped_at'):  # model.stop_on_saturation acted.
    row['stopped_at'] = int(meta['stopped_at'])
  if meta and meta.get('augment'):  # train.augment='auto': what it chose.
    row['augment'], row['augment_why'] = meta['augment'], meta['augment_why']
  if meta and 'neighbour_mix' in meta:  # train.neighbour_mix_when='flips'.
    row['neighbour_mix'] = meta['neighbour_mix']
  if ctx.cells:  # eval.cells='measured': where the cells sit.
    row['cells'] = cells_lib.to_stored(ctx.cells)
  best = meta.get('best_on_test') if meta else None
  if best is not None:
    # The released protocol: the best evaluated pass, chosen on the test set.
    final = (row['image_auroc'], row['pixel_auroc'])
    final = tuple(-1.0 if np.isnan(x) else x for x in final)
    if final >= tuple(best['key']):
      best = {'pass': int(meta['passes_done']),  # A stopped run's too.
              **{k: row[k] for k in ('image_auroc', 'pixel_auroc', 'aupro')}}
    row['best_on_test'] = {k: v for k, v in best.items() if k != 'key'}
  if tb is not None and c.report.tensorboard:
    _to_tensorboard(ctx, state, tb, step, row, labels, names, map_range)
  if visualize_maps and c.eval.visualize != 'none':
    _save_heatmaps(ctx, state, scores, map_range)
  if record:
    _save_record(ctx, state, meta, row, scores, labels, names, pro_curve,
                 map_range)
  if yardstick and c.report.html:
    _add_yardstick_maps(ctx, state, scores, map_range)
  return row


def _test_images(ctx, state, indices):
  """Yields (index, image, anomaly map, mask or None) of test images.

  The batches have the size the test set's evaluation already compiled (the
  last index repeated to fill them): a few images cost no new compilation.
  """
  indices = np.asarray(indices, np.int64)
  if not indices.size:
    return
  size = min(ctx.config.eval.batch_size, len(ctx.test_set))
  padded = np.concatenate([indices, np.full(-indices.size % size,
                                            indices[-1])])
  k = 0
  for batch, out in _predict_batches(ctx, state, ctx.test_set, padded, size):
    masks = batch['mask'] if ctx.test_set.has_masks else [None] * size
    for j in range(min(size, indices.size - k)):
      yield int(indices[k]), batch['image'][j], out['anomaly_maps'][j], masks[j]
      k += 1


def _to_tensorboard(ctx, state, tb, step, row, labels, names, map_range):
  """The metrics and the heat maps of a fixed few test images (computed on
  every process of a multi-host run, written by the first's writer)."""
  summaries.write_evaluation(tb, step, row)
  idx = summaries.heatmap_indices(labels,
                                  ctx.config.report.tensorboard_heatmaps)
  scale = visualize.display_scale(ctx.test_set.image_hw)
  for i, image, amap, mask in _test_images(ctx, state, idx):
    lo, hi = map_range or (float(amap.min()), float(amap.max()))
    tb.image(f'heatmaps/{names[i]}', step, visualize.enlarge(
        visualize.overlay(image, amap, mask, lo, hi), scale))


def _save_record(ctx, state, meta, row, scores, labels, names, pro_curve,
                 map_range):
  """What the report shows of this evaluation (eval_record)."""
  c = ctx.config
  galleries = eval_record.select_galleries(scores, labels,
                                           c.report.gallery_size)
  shown = eval_record.shown(galleries)
  roc = metrics.image_roc(scores, labels)
  meta = meta or {}
  # The images the model trained on (the checkpoint's record: the data may
  # have changed since), or this run's during training.
  counts = meta.get('data') or ctx.data_record
  record = dict(
      category=ctx.category, kind=ctx.kind, passes=meta.get('passes_done'),
      image_hw=list(ctx.test_set.image_hw), n_train=counts['n_train'],
      n_holdout=counts['n_holdout'], n_validation=counts['n_validation'],
      data_change=ctx.data_change(meta),
      threshold=meta.get('threshold'),
      threshold_source=meta.get('threshold_source'),
      map_range=list(map_range) if map_range else None,
      max_fpr=c.eval.aupro_max_fpr,
      names=names, labels=[int(x) for x in labels],
      scores=[float(x) for x in scores],
      roc=None if roc is None else {'fpr': roc[0].tolist(),
                                    'tpr': roc[1].tolist()},
      pro_curve=None if pro_curve is None else {
          'fpr': pro_curve[0].tolist(), 'pro': pro_curve[1].tolist()},
      galleries=galleries)
  items = list(_test_images(ctx, state, shown))  # Every process computes.
  if jax.process_index() == 0:
    eval_record.write(ctx.workdir, record, items,
                      scale=visualize.display_scale(ctx.test_set.image_hw))


def _add_yardstick_maps(ctx, state, scores, map_range):
  """kNN's maps of the images the record's galleries show, beside the head's
  (eval_record.add_yardstick), on kNN's own colour range over the test set.

  The galleries come from the record the final evaluation has just written.
  Skipped in multi-process runs: the others cannot know that record's
  galleries, and the batches are computed by every process together.
  """
  rec = eval_record.load(ctx.workdir)
  if (jax.process_count() > 1 or rec is None or
      len(rec.get('scores', ())) != len(scores)):
    return
  shown = eval_record.shown(rec.get('galleries', {}))
  items = list(_test_images(ctx, state, shown))
  eval_record.add_yardstick(
      ctx.workdir, items, {i: scores[i] for i in shown}, map_range,
      scale=visualize.display_scale(ctx.test_set.image_hw))


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
                                     np.sort(order),
                                     desc=f'{ctx.category} heat maps'):
    maps = out['anomaly_maps']
    vmin, vmax = map_range if map_range else (float(maps.min()),
                                              float(maps.max()))
    masks = batch['mask'] if ctx.test_set.has_masks else [None] * len(maps)
    names = [f'{d}_{os.path.splitext(os.path.basename(p))[0]}'
             for d, p in zip(batch['defect'], batch['path'])]
    visualize.save_overlays(out_dir, batch['image'], maps, masks,
                            names, out['image_scores'],
                            vmin=vmin, vmax=vmax,
                            scale=visualize.display_scale(maps.shape[1:]))

"""Evaluation of one category: scores, metrics, heat maps.

Streams the test set: per batch the device returns image scores and smoothed
maps. With masks the host keeps one float32 copy of each scorer's maps,
which the pixel metrics need, and nothing else, so memory grows only with
the per-pixel arrays (twice with the kNN yardstick, whose maps are kept
too); without masks it keeps only the maps of the images that can be shown
(`_ShownMaps`). The final evaluation also keeps what the HTML report shows
(`eval_record`), and every evaluation can go to TensorBoard (`summaries`):
their images take the kept maps, so each test image goes through the
backbone once, for the kNN yardstick's scores too (eval.yardstick: one
program scores both).
"""

import functools
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
from simplenet_jax import report
from simplenet_jax import scoring
from simplenet_jax import summaries
from simplenet_jax import synthesis
from simplenet_jax import visualize
from simplenet_jax.data import loader

# eval.visualize: heat maps of no, the top-N scoring, or all test images.
VISUALIZE = ('none', 'top', 'all')


def predictor(ctx, state, bank=None):
  """fn(images) -> outputs: ctx's predict function with state's head, or
  with `bank` (M, D) (the yardstick's memory bank, `yardstick.memory_bank`)
  the paired program (`scoring.make_paired_predict_fn`), which also gives
  kNN's outputs under scoring.PAIRED_PREFIX from the same backbone pass."""
  head = state.head_vars()
  if bank is None:
    return functools.partial(ctx.predict_fn, ctx.backbone_vars, head)
  c = ctx.config
  paired = scoring.make_paired_predict_fn(
      ctx.module, c.backbone.layers, c.model, ctx.test_set.image_hw, c.eval,
      ctx.cells)
  return functools.partial(paired, ctx.backbone_vars, head, bank)


def _predict_batches(ctx, predict, dataset, indices=None, desc=None):
  """Yields (batch, outputs of `predict` (`predictor`)) with outputs as
  numpy, padding removed; with `desc`, a progress bar of the images on a
  terminal."""
  c = ctx.config
  batch_size = c.eval.batch_size
  total = len(dataset) if indices is None else len(indices)
  with console.progress(total, desc) as bar:
    for batch in loader.batches(dataset, batch_size, indices=indices,
                                num_workers=c.dataset.num_workers,
                                prefetch=c.dataset.prefetch):
      # One shape for every batch (the last one padded): one compilation.
      images, n = parallel.put_batch(batch['image'], ctx.mesh,
                                     min_rows=batch_size)
      out = predict(images)
      yield batch, {k: parallel.to_host(v)[:n] for k, v in out.items()}
      bar.update(n)


def normal_statistics(ctx, state, dataset, indices):
  """Image scores (N,) of dataset[indices] and [min, max] of their maps."""
  scores, lo, hi = [], np.inf, -np.inf
  for _, out in _predict_batches(ctx, predictor(ctx, state), dataset,
                                indices, f'{ctx.category} threshold images'):
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
      ctx, predictor(ctx, state), images,
      desc=f'{ctx.category} synthetic defects'):
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


class _ShownMaps:
  """Without masks: the maps of the test images that can still be shown, and
  no others.

  The galleries (`eval_record.select_galleries`) and eval.visualize='top'
  show the images that score highest or lowest within their class (normal
  or anomalous), ties going to the earlier image (their stable sorts).
  Keeping each class's `n` highest and `n` lowest finite scores by that
  order, and every image whose score is not finite, holds every image they
  can choose whatever the scores still to come, in at most 4 n maps plus
  those. `always`: indices kept whatever they score (TensorBoard's fixed
  few); `n=None` keeps every map (eval.visualize='all', or TensorBoard's
  images where the test set cannot name its labels before the pass).
  """

  def __init__(self, n: int | None = None, always=()):
    self.n = n
    self.always = frozenset(int(i) for i in always)
    self._held = {}  # index -> (map, score, label), the kept images only.
    self._count = 0

  def add(self, maps, scores, labels) -> None:
    """Appends a batch: (B, H, W) maps, (B,) image scores and labels."""
    maps = np.asarray(maps, np.float32)
    for j in range(len(maps)):
      # A copy, not a view: the batch's array can go.
      self._held[self._count + j] = (maps[j].copy(), float(scores[j]),
                                     bool(labels[j]))
    self._count += len(maps)
    if self.n is not None:
      keep = self._wanted()
      self._held = {i: v for i, v in self._held.items() if i in keep}

  def _wanted(self) -> set:
    keep = set(self.always)
    for label in (False, True):
      scored = [(score, i) for i, (_, score, lab) in self._held.items()
                if lab == label]
      keep.update(i for score, i in scored if not np.isfinite(score))
      finite = [(score, i) for score, i in scored if np.isfinite(score)]
      keep.update(i for _, i in
                  sorted(finite, key=lambda t: (-t[0], t[1]))[:self.n])
      keep.update(i for _, i in sorted(finite)[:self.n])
    return keep

  def __len__(self) -> int:
    """How many maps are held."""
    return len(self._held)

  def maps(self, images) -> np.ndarray:
    """(k, H, W) float32: the kept maps of test images `images` (indices in
    the order they were added)."""
    images = np.asarray(images, np.int64).reshape(-1)
    missing = [int(i) for i in images if int(i) not in self._held]
    if missing:
      raise IndexError(f'the maps of test images {missing} were not kept '
                       f'({self._count} added)')
    if not images.size:
      return np.empty((0, 0, 0), np.float32)
    return np.stack([self._held[int(i)][0] for i in images])


class _ScorerPass:
  """One scorer's image scores and maps over the test set, read from the
  predict outputs under `prefix` ('' the model's, scoring.PAIRED_PREFIX the
  yardstick's kNN).

  With masks every map is kept, one float32 copy (`metrics.PixelMetrics`):
  the pixel metrics' input. Without masks a `_ShownMaps(*shown)` (by
  default every map; `_shown_spec`) keeps those that can be shown. The images the report, the heat
  maps and TensorBoard show take theirs from these (`_kept_images`), so no
  test image goes through the backbone twice.
  """

  def __init__(self, test, max_fpr: float, prefix: str = '',
               shown: tuple = (None, ())):
    self.prefix = prefix
    self.has_masks = test.has_masks
    self.batches = []
    self.maps = (metrics.PixelMetrics(expected_images=len(test),
                                      max_fpr=max_fpr)
                 if test.has_masks else _ShownMaps(*shown))

  @property
  def pixel(self):
    """The pixel metrics' accumulator, or None without masks."""
    return self.maps if self.has_masks else None

  def add(self, out: dict, batch: dict) -> None:
    scores = out[self.prefix + 'image_scores']
    self.batches.append(scores)
    if self.has_masks:
      self.maps.add(out[self.prefix + 'anomaly_maps'], batch['mask'])
    else:  # The shown images are chosen by the model's scores, kNN's too.
      self.maps.add(out[self.prefix + 'anomaly_maps'], out['image_scores'],
                    batch['label'])

  def figures(self, labels, curve_points: int = 0):
    """(scores (N,), {'image_auroc', 'pixel_auroc', 'aupro'}, PRO curve or
    None, [lo, hi] of the maps or None (without masks))."""
    scores = np.concatenate(self.batches)
    out = {'image_auroc': metrics.image_auroc(scores, labels),
           'pixel_auroc': float('nan'), 'aupro': float('nan')}
    if not self.has_masks:
      return scores, out, None, None
    # Both pixel metrics (and the report's PRO curve) from one sort.
    out.update(self.maps.compute(curve_points))
    return (scores, out, out.pop('pro_curve', None),
            self.maps.score_range())


def evaluate_category(ctx, state, meta, visualize_maps: bool = True,
                      tb=None, step: int | None = None,
                      bank=None) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of `state` on the category's test set.

  Args:
    ctx, state: the category and its trained state.
    meta: the checkpoint's metadata (the decision threshold), or None during
      training.
    visualize_maps: the final evaluation: heat maps (eval.visualize) and the
      report's record (report.html).
    tb: a `summaries.Writer`, or None; `step` is the pass it logs at.
    bank: the kNN yardstick's memory bank (eval.yardstick,
      `yardstick.memory_bank`), or None. With it each test image goes
      through the backbone once for both scorers (`predictor`), the row
      also holds kNN's figures, and the report's record kNN's maps of the
      images its galleries show.

  Returns:
    A table row: category, kind, image_auroc, pixel_auroc, aupro (fractions,
    nan where undefined), n_test, plus the test-set selected best pass when
    training recorded one, and in a final evaluation of a test set with two
    or more defect types, by_defect (`metrics.by_defect`). With `bank`,
    report.YARDSTICK's figures too (and knn_by_defect).
  """
  c = ctx.config
  test = ctx.test_set
  predict = predictor(ctx, state, bank)
  shown = _shown_spec(ctx, visualize_maps, tb)
  scorers = [_ScorerPass(test, c.eval.aupro_max_fpr, shown=shown)]
  if bank is not None:
    scorers.append(_ScorerPass(test, c.eval.aupro_max_fpr,
                               scoring.PAIRED_PREFIX, shown))
  labels, names, defects = [], [], []
  for batch, out in _predict_batches(ctx, predict, test,
                                     desc=f'{ctx.category} test images'):
    for scorer in scorers:
      scorer.add(out, batch)
    labels.append(batch['label'])
    names.extend(f'{d}/{os.path.basename(p)}'
                 for d, p in zip(batch['defect'], batch['path']))
    defects.extend(batch['defect'])
  labels = np.concatenate(labels)
  record = visualize_maps and c.report.html
  scores, figures, pro_curve, map_range = scorers[0].figures(
      labels, eval_record.PRO_CURVE_POINTS if record else 0)
  row = {'category': ctx.category, 'kind': ctx.kind, 'n_test': int(len(labels)),
         **figures}
  if not test.has_masks:
    logging.warning('%s: the test set has no masks; pixel AUROC and AUPRO are '
                    'skipped (n/a).', ctx.category)
  threshold = meta.get('threshold') if meta else None
  if threshold is not None:
    row['decisions'] = metrics.decision_counts(scores, labels, threshold)
  if visualize_maps:  # A final evaluation: each defect type.
    by_defect = metrics.by_defect(scores, labels, defects, scorers[0].pixel,
                                  threshold)
    if by_defect:
      row['by_defect'] = by_defect
  knn = None
  if bank is not None:
    knn_scores, knn_figures, _, knn_range = scorers[1].figures(labels)
    row.update({k: knn_figures[m]
                for k, m in zip(report.YARDSTICK, report.METRICS)})
    if visualize_maps:
      by_defect = metrics.by_defect(knn_scores, labels, defects,
                                    scorers[1].pixel, None)
      if by_defect:  # Each defect type, beside the head's.
        row['knn_by_defect'] = by_defect
    knn = (knn_scores, knn_range)
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
    _to_tensorboard(ctx, scorers[0], tb, step, row, labels, names,
                    map_range)
  if visualize_maps and c.eval.visualize != 'none':
    _save_heatmaps(ctx, scorers[0], scores, names, map_range)
  if record:
    _save_record(ctx, scorers, meta, row, scores, labels, names, pro_curve,
                 map_range, knn)
  return row


def _shown_spec(ctx, visualize_maps: bool, tb) -> tuple:
  """(n, always) of the `_ShownMaps` an evaluation of a test set without
  masks keeps its maps in: those its galleries (report.html), heat maps
  (eval.visualize) and TensorBoard images can show (`evaluate_category`'s
  arguments). (None, ()) keeps every map; with masks, unused."""
  c = ctx.config
  if ctx.test_set.has_masks or (visualize_maps and
                                c.eval.visualize == 'all'):
    return None, ()
  n = 0
  if visualize_maps and c.report.html:
    n = c.report.gallery_size
  if visualize_maps and c.eval.visualize == 'top':
    n = max(n, c.eval.visualize_top_n)
  always = ()
  if (tb is not None and c.report.tensorboard
      and c.report.tensorboard_heatmaps):
    labels = getattr(ctx.test_set, 'labels', None)
    if labels is None:  # Its labels come with its images: keep every map.
      return None, ()
    always = summaries.heatmap_indices(labels(),
                                       c.report.tensorboard_heatmaps)
  return n, always


def _kept_images(ctx, kept: _ScorerPass, indices):
  """Yields (index, image, anomaly map, mask or None) of test images, each
  map the one the evaluation's pass kept (`_ScorerPass`); the images and
  masks are read again, nothing is predicted."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if not indices.size:
    return
  c = ctx.config
  maps = kept.maps.maps(indices)
  k = 0
  for batch in loader.batches(ctx.test_set, c.eval.batch_size,
                              indices=indices,
                              num_workers=c.dataset.num_workers,
                              prefetch=c.dataset.prefetch):
    for j in range(len(batch['image'])):
      yield (int(indices[k]), batch['image'][j], maps[k],
             batch['mask'][j] if kept.has_masks else None)
      k += 1


def _to_tensorboard(ctx, kept, tb, step, row, labels, names, map_range):
  """The metrics and the heat maps of a fixed few test images (written by
  the first process's writer)."""
  summaries.write_evaluation(tb, step, row)
  idx = summaries.heatmap_indices(labels,
                                  ctx.config.report.tensorboard_heatmaps)
  scale = visualize.display_scale(ctx.test_set.image_hw)
  for i, image, amap, mask in _kept_images(ctx, kept, idx):
    lo, hi = map_range or (float(amap.min()), float(amap.max()))
    tb.image(f'heatmaps/{names[i]}', step, visualize.enlarge(
        visualize.overlay(image, amap, mask, lo, hi), scale))


def _save_record(ctx, scorers, meta, row, scores, labels, names, pro_curve,
                 map_range, knn=None):
  """What the report shows of this evaluation (eval_record), written by the
  first process; with `knn` ((N,) scores, [lo, hi] of the maps) of the
  yardstick, kNN's maps of the images the galleries show too
  (`eval_record.add_yardstick`, on kNN's own colour range). The maps are
  the evaluation's own (`_ScorerPass`, scorers[0] the model's, scorers[1]
  kNN's)."""
  if jax.process_index() != 0:
    return
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
  items = list(_kept_images(ctx, scorers[0], shown))
  scale = visualize.display_scale(ctx.test_set.image_hw)
  eval_record.write(ctx.workdir, record, items, scale=scale)
  if knn is not None:
    knn_scores, knn_range = knn
    knn_maps = scorers[1].maps.maps([i for i, *_ in items])
    eval_record.add_yardstick(
        ctx.workdir, [(i, image, m, mask) for (i, image, _, mask), m
                      in zip(items, knn_maps)],
        {i: knn_scores[i] for i in shown}, knn_range, scale=scale)


def _save_heatmaps(ctx, kept, scores, names, map_range):
  """Figure-1 style overlays of all or the top-N scoring test images."""
  c = ctx.config
  order = np.argsort(-scores, kind='stable')
  if c.eval.visualize == 'top':
    order = order[:c.eval.visualize_top_n]
  if not len(order):
    return
  shown = list(_kept_images(ctx, kept, np.sort(order)))
  maps = np.stack([amap for _, _, amap, _ in shown])
  vmin, vmax = map_range if map_range else (float(maps.min()),
                                            float(maps.max()))
  visualize.save_overlays(
      os.path.join(ctx.workdir, 'heatmaps'),
      [image for _, image, _, _ in shown], maps,
      [mask for *_, mask in shown],
      # 'crack/000.png' -> crack_000.png (save_overlays makes '/' a '_').
      [os.path.splitext(names[i])[0] for i, *_ in shown],
      scores[[i for i, *_ in shown]], vmin=vmin, vmax=vmax,
      scale=visualize.display_scale(maps.shape[1:]))

"""evaluate.py: evaluate_category reports the metrics of the maps it
computes, with the config's AUPRO limit (checked against references computed
here: sklearn's AUROC, a threshold-loop AUPRO, on the same maps); and the
report hooks, with a stand-in model (no backbone)."""

import json
import os
import pathlib
import types

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from configs.default import get_config
import helpers
from simplenet_jax import eval_record
from simplenet_jax import evaluate
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import train

SIZE, D = 16, 16


class _DefectImages(helpers.RandomImages):
  """Random images; images 3.. have a bright rectangle, marked in the mask."""
  has_masks = True

  def __init__(self, n):
    super().__init__(n, size=SIZE, seed=2)
    rng = np.random.default_rng(3)
    self.masks = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(3, n):
      top, left = rng.integers(0, SIZE - 6, size=2)
      h, w = rng.integers(3, 7, size=2)
      self.masks[i, top:top + h, left:left + w] = 255
      self.x[i][self.masks[i] > 0] = 250

  def load(self, i):
    return dict(super().load(i), mask=self.masks[i],
                label=int(self.masks[i].any()))


@pytest.fixture(scope='module')
def evaluation():
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  cfg.dataset.num_workers = 2
  cfg.eval.batch_size = 4  # Two batches.
  module = helpers.TinyBackbone()
  bvars = helpers.tiny_backbone_vars()
  state = train.create_train_state(jax.random.PRNGKey(1), cfg.model, cfg.optim,
                                   D, 1, 1)
  test = _DefectImages(8)
  predict_fn = scoring.make_predict_fn(module, ('layer2', 'layer3'),
                                       cfg.model, (SIZE, SIZE), cfg.eval)

  def run(max_fpr):
    c = get_config()
    c.update(cfg)
    if max_fpr is not None:
      c.eval.aupro_max_fpr = max_fpr
    ctx = types.SimpleNamespace(
        config=c, test_set=test, predict_fn=predict_fn, backbone_vars=bvars,
        cells=None, mesh=parallel.make_mesh(jax.devices()[:1]), category='tiny',
        kind='object', workdir='/nonexistent')
    return evaluate.evaluate_category(ctx, state, None, visualize_maps=False)

  # The same maps, straight from the predict function.
  out = [predict_fn(bvars, state.head_vars(), test.x[i:i + 4])
         for i in (0, 4)]
  maps = np.concatenate([np.asarray(o['anomaly_maps']) for o in out])
  scores = np.concatenate([np.asarray(o['image_scores']) for o in out])
  return types.SimpleNamespace(run=run, cfg=cfg, maps=maps, scores=scores,
                               masks=test.masks > 0,
                               labels=test.masks.any(axis=(1, 2)))


def test_reported_metrics_are_those_of_the_maps(evaluation):
  e = evaluation
  row = e.run(None)  # The default config's limit.
  assert row['n_test'] == 8
  assert row['image_auroc'] == pytest.approx(
      roc_auc_score(e.labels, e.scores), abs=1e-9)
  assert row['pixel_auroc'] == pytest.approx(
      roc_auc_score(e.masks.ravel(), e.maps.ravel()), abs=1e-6)
  limit = e.cfg.eval.aupro_max_fpr
  assert row['aupro'] == pytest.approx(
      helpers.slow_aupro(e.maps, e.masks, limit), abs=1e-6)


@pytest.mark.parametrize('max_fpr', [0.05, 1.0])
def test_aupro_uses_the_configured_limit(evaluation, max_fpr):
  e = evaluation
  want = helpers.slow_aupro(e.maps, e.masks, max_fpr)
  default = helpers.slow_aupro(e.maps, e.masks, e.cfg.eval.aupro_max_fpr)
  assert abs(want - default) > 0.02  # The limit matters on these maps.
  row = e.run(max_fpr)
  assert row['aupro'] == pytest.approx(want, abs=1e-6)


_ADD_YARDSTICK = eval_record.add_yardstick  # Before any test patches it.
# pylint: disable=protected-access
kept_images = evaluate._kept_images
ScorerPass = evaluate._ScorerPass
predict_batches = evaluate._predict_batches
# pylint: enable=protected-access


class _Images:
  """Test images whose pixels all equal their index; masks on odd ones."""
  has_masks = True
  image_hw = (4, 5)

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def load(self, i):
    return {'image': np.full((4, 5, 3), i, np.uint8),
            'mask': np.full((4, 5), i % 2, np.uint8), 'label': i % 2,
            'path': f'/x/{i}.png', 'defect': 'good' if i % 2 == 0 else 'hole'}


def _ctx(n_images, batch_size, shapes):
  def predict_fn(backbone_vars, head, images):
    del backbone_vars, head
    shapes.append(images.shape[0])
    m = images[..., 0].astype(np.float32) * 10.0  # Map = 10 x the index.
    return {'anomaly_maps': m, 'image_scores': m.max(axis=(1, 2))}

  config = get_config()
  config.eval.batch_size = batch_size
  config.dataset.num_workers = 1
  return types.SimpleNamespace(config=config, test_set=_Images(n_images),
                               mesh=parallel.make_mesh(), backbone_vars=None,
                               predict_fn=predict_fn, cells=None)


@pytest.mark.parametrize('masks', [True, False])
def test_shown_images_take_the_maps_the_test_pass_kept(masks):
  """The report's, the heat maps' and TensorBoard's images draw the maps
  the evaluation's one pass over the test set kept, in the order asked,
  with their images and masks read again and nothing predicted."""
  shapes = []
  ctx = _ctx(11, 4, shapes)
  ctx.test_set.has_masks = masks
  predict = evaluate.predictor(ctx, types.SimpleNamespace(head_vars=lambda: {}))
  kept = ScorerPass(ctx.test_set, 0.3)
  for batch, out in predict_batches(ctx, predict, ctx.test_set):
    kept.add(out, batch)
  assert shapes == [4, 4, 4]  # The pass: 11 images, the last batch padded.
  got = list(kept_images(ctx, kept, [9, 2, 5, 6, 7]))
  assert shapes == [4, 4, 4]  # Nothing predicted again.
  assert [g[0] for g in got] == [9, 2, 5, 6, 7]
  for index, image, amap, mask in got:
    assert (image == index).all()
    assert amap.shape == (4, 5) and (amap == 10 * index).all()
    if masks:
      assert (mask == index % 2).all()
    else:
      assert mask is None
  assert not list(kept_images(ctx, kept, []))
  with pytest.raises(IndexError, match='11 added'):
    list(kept_images(ctx, kept, [11]))


def test_shown_maps_hold_every_image_the_report_can_choose():
  """Without masks the pass keeps each class's n highest and n lowest
  scores (and every non-finite one, and the `always` indices): every
  image the galleries and eval.visualize='top' then choose from the whole
  test set's scores is there, ties and nan included, and no more."""
  rng = np.random.default_rng(0)
  n_images, n = 60, 3
  scores = rng.integers(0, 3, n_images).astype(np.float64)  # Many ties.
  scores[[7, 30]] = np.nan
  scores[41] = np.inf
  labels = rng.integers(0, 2, n_images)
  maps = rng.normal(size=(n_images, 2, 3)).astype(np.float32)
  always = (11, 12)
  shown = evaluate._ShownMaps(n, always)  # pylint: disable=protected-access
  held, start = [], 0
  for size in (7, 1, 13, 20, 19):  # Uneven batches.
    stop = start + size
    shown.add(maps[start:stop], scores[start:stop], labels[start:stop])
    held.append(len(shown))
    start = stop
  assert start == n_images
  galleries = eval_record.select_galleries(scores, labels, n)
  top = np.argsort(-scores, kind='stable')[:n]  # evaluate._save_heatmaps.
  wanted = sorted(set(eval_record.shown(galleries)) | set(top.tolist())
                  | set(always))
  np.testing.assert_array_equal(shown.maps(wanted), maps[wanted])
  assert max(held) <= 4 * n + len(always) + 3  # Pruned after every batch.
  # Each kept map owns its memory: a view would keep its whole batch alive.
  assert all(m.base is None for m, *_ in shown._held.values())  # pylint: disable=protected-access
  # The image in the middle of the order is gone, and asking says so.
  middle = int(np.argsort(scores, kind='stable')[n_images // 2])
  with pytest.raises(IndexError, match=f'test images \\[{middle}\\] were '
                     'not kept'):
    shown.maps([middle])
  everything = evaluate._ShownMaps()  # pylint: disable=protected-access
  everything.add(maps, scores, labels)
  np.testing.assert_array_equal(everything.maps(range(n_images)), maps)


def _drawn_knn_maps(monkeypatch) -> dict:
  """{test image index: kNN map} that the report's record is given
  (`eval_record.add_yardstick`, patched to note them) from now on."""
  drawn = {}
  add_yardstick = _ADD_YARDSTICK

  def record_knn_maps(category_dir, items, *args, **kwargs):
    items = list(items)
    drawn.update((i, amap) for i, _, amap, _ in items)
    return add_yardstick(category_dir, items, *args, **kwargs)
  monkeypatch.setattr(eval_record, 'add_yardstick', record_knn_maps)
  return drawn


class _UnmaskedImages(_DefectImages):
  """_DefectImages without masks, whose labels are known before reading."""
  has_masks = False

  def labels(self):
    return self.masks.any(axis=(1, 2)).astype(np.int64)


class _Events:
  """A stand-in TensorBoard writer: the images it was given."""

  def __init__(self):
    self.images = {}

  def scalars(self, *args):
    del args

  def image(self, tag, step, image):
    del step
    self.images[tag] = np.asarray(image)


def test_without_masks_only_the_shown_maps_are_kept(tmp_path, monkeypatch):
  """Without masks an evaluation keeps only the maps it can show, and shows
  exactly what keeping every map shows: galleries (the head's and kNN's
  maps), heat maps and TensorBoard's images."""
  from simplenet_jax import yardstick  # pylint: disable=g-import-not-at-top
  cfg = _tiny_config()
  cfg.eval.batch_size = 5
  cfg.knn.coreset_fraction = 0.3
  cfg.eval.visualize = 'top'
  cfg.eval.visualize_top_n = 3
  cfg.report.gallery_size = 2
  n_test = 30
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = _tiny_category(cfg, tmp_path, mesh, n_train=9, n_test=n_test,
                       test_cls=_UnmaskedImages)
  bank = yardstick.memory_bank(ctx)
  held = []
  add = evaluate._ShownMaps.add  # pylint: disable=protected-access

  def counted(self, *args):
    add(self, *args)
    held.append(len(self))
  monkeypatch.setattr(evaluate._ShownMaps, 'add', counted)  # pylint: disable=protected-access

  def shows(keep_all):
    if keep_all:
      monkeypatch.setattr(evaluate, '_shown_spec', lambda *a: (None, ()))
    drawn = _drawn_knn_maps(monkeypatch)
    held.clear()
    tb = _Events()
    row = evaluate.evaluate_category(ctx, ctx.new_state(), None, tb=tb,
                                     step=1, bank=bank)
    rec = eval_record.load(ctx.workdir)
    tiles = {i: pathlib.Path(eval_record.tile_path(ctx.workdir, rec, i))
             .read_bytes() for i in eval_record.shown(rec['galleries'])}
    heat = {f.name: f.read_bytes() for f in
            sorted(pathlib.Path(ctx.workdir, 'heatmaps').iterdir())}
    return row, rec['galleries'], tiles, drawn, tb.images, heat, max(held)

  row, galleries, tiles, drawn, tb_images, heat, most = shows(False)
  assert np.isnan(row['pixel_auroc']) and 'knn_image_auroc' in row
  assert len(tiles) >= 4 and len(tb_images) == 4 and len(heat) == 3
  # Two scorers, each holding at most 4 x 3 + 4 maps after every batch.
  assert most <= 4 * 3 + 4 < n_test
  want = shows(True)
  assert want[-1] == n_test  # Keeping every map.
  assert galleries == want[1] and tiles == want[2] and heat == want[5]
  assert sorted(drawn) == sorted(want[3]) == eval_record.shown(galleries)
  for i in drawn:
    np.testing.assert_array_equal(drawn[i], want[3][i])
  assert sorted(tb_images) == sorted(want[4])
  for tag in tb_images:
    np.testing.assert_array_equal(tb_images[tag], want[4][tag])


def _tiny_config():
  """The default config with a head sized for the tiny backbone."""
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  cfg.dataset.num_workers = 2
  return cfg


def _tiny_category(cfg, tmp_path, mesh, name='tiny', n_train=7, n_test=4,
                   val=None, test_cls=None):
  """A CategoryContext on the tiny backbone, random training images,
  _DefectImages (or `test_cls`) for test and the validation images `val`
  (or none)."""
  from simplenet_jax import category as category_lib  # pylint: disable=g-import-not-at-top
  return category_lib.CategoryContext.from_datasets(
      cfg, str(tmp_path), name, 'object', helpers.TinyBackbone(),
      helpers.tiny_backbone_vars(), mesh, helpers.RandomImages(n_train, SIZE),
      (test_cls or _DefectImages)(n_test), val)


@pytest.mark.parametrize('method', ['simplenet', 'knn'])
def test_threshold_from_the_feature_cache_equals_a_backbone_pass(method,
                                                                 tmp_path):
  """Without a hold-out the threshold scores the training images: from
  their cached features (what training does) it must equal scoring them
  through the backbone again."""
  from simplenet_jax import feature_cache  # pylint: disable=g-import-not-at-top
  cfg = _tiny_config()
  cfg.model.method = method
  cfg.knn.coreset_fraction = 0.5
  cfg.eval.batch_size = 3  # Uneven batches over 7 images.
  cfg.threshold.holdout_fraction = 0.0
  cfg.threshold.quantile = 0.9
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = _tiny_category(cfg, tmp_path, mesh)
  cache = feature_cache.build(ctx.feature_fn, ctx.backbone_vars,
                              ctx.train_set, ctx.train_idx, 3, cfg.train,
                              cfg.dataset, mesh)
  state = ctx.new_state()
  if method == 'knn':
    from simplenet_jax import knn  # pylint: disable=g-import-not-at-top
    state = knn.MemoryBank(bank=knn.memory_bank(
        cache, jax.random.PRNGKey(0), cfg.knn.coreset_fraction))
  cached = evaluate.decision_threshold(ctx, state, cache)
  passed = evaluate.decision_threshold(ctx, state)
  assert cached['threshold_source'] == passed['threshold_source']
  assert cached['threshold'] == pytest.approx(passed['threshold'], rel=1e-5)
  np.testing.assert_allclose(cached['map_range'], passed['map_range'],
                             rtol=1e-5, atol=1e-6)

  # Under eval.tta='flips' the cache (unflipped features only) is passed
  # over: the threshold is that of the flip-averaged scores either way.
  cfg.eval.tta = 'flips'
  ctx = _tiny_category(cfg, tmp_path, mesh)
  flips = evaluate.decision_threshold(ctx, state, cache)
  assert flips['score_rule'] == {'image_score': 'patch_max', 'tta': 'flips'}
  assert flips['threshold'] == pytest.approx(
      evaluate.decision_threshold(ctx, state)['threshold'], rel=1e-6)
  assert abs(flips['threshold'] - passed['threshold']) > 1e-4


def test_threshold_from_validation_images(tmp_path):
  """A category with validation images trains on every training image (no
  hold-out, whatever threshold.holdout_fraction says) and takes the
  threshold's quantile over the validation images' scores, each read here
  straight from the predict function."""
  cfg = _tiny_config()
  cfg.eval.batch_size = 2  # Uneven batches over 5 validation images.
  cfg.threshold.holdout_fraction = 0.3
  cfg.threshold.quantile = 0.75
  mesh = parallel.make_mesh(jax.devices()[:1])
  val = helpers.RandomImages(5, SIZE, seed=7)
  ctx = _tiny_category(cfg, tmp_path, mesh, val=val)
  assert list(ctx.train_idx) == list(range(7)) and not len(ctx.holdout_idx)
  state = ctx.new_state()
  got = evaluate.decision_threshold(ctx, state)
  out = ctx.predict_fn(ctx.backbone_vars, state.head_vars(), val.x)
  scores = np.asarray(out['image_scores'])
  assert got['threshold'] == pytest.approx(float(np.quantile(scores, 0.75)),
                                           rel=1e-5)
  maps = np.asarray(out['anomaly_maps'])
  np.testing.assert_allclose(got['map_range'], [maps.min(), maps.max()],
                             rtol=1e-5, atol=1e-6)
  assert got['threshold_source'].endswith('5 validation images (normal, not '
                                          'trained on)')
  # Without them the same config holds out 30% of the training images.
  ctx = _tiny_category(cfg, tmp_path, mesh)
  assert (len(ctx.train_idx), len(ctx.holdout_idx)) == (5, 2)


def test_synthetic_check_scores_las_defects_of_the_unseen_images(tmp_path):
  """eval.synthetic_defects: K LAS images of each normal image not trained
  on (validation images, else the held-out ones), image j*n+i made from
  image i with fold_in(the fixed key, j*n+i), scored by the predict
  function; the figure equals sklearn's AUROC of their maps against their
  masks, made here image by image with synthesis.las_image."""
  from simplenet_jax import synthesis  # pylint: disable=g-import-not-at-top
  cfg = _tiny_config()
  cfg.eval.batch_size = 5  # Uneven batches over 12 images.
  cfg.eval.synthetic_defects = 4
  cfg.threshold.holdout_fraction = 0.3
  mesh = parallel.make_mesh(jax.devices()[:1])
  val = helpers.RandomImages(3, SIZE, seed=7)
  ctx = _tiny_category(cfg, tmp_path, mesh, val=val)
  state = ctx.new_state()
  got = evaluate.synthetic_check(ctx, state)
  assert got['synthetic_source'] == (
      '12 synthetic defect images made from 3 validation images (normal, '
      'not trained on)')
  textures = synthesis.texture_bank(synthesis.TEXTURES, (SIZE, SIZE),
                                    seed=evaluate.SYNTHETIC_KEY)
  key = jax.random.PRNGKey(evaluate.SYNTHETIC_KEY)
  images, masks = [], []
  for i in range(12):
    img, m = synthesis.las_image(jax.random.fold_in(key, i), val.x[i % 3],
                                 textures, True)
    images.append(np.round(np.asarray(img) * 255).astype(np.uint8))
    masks.append(np.asarray(m) > 0)
  maps = np.asarray(ctx.predict_fn(ctx.backbone_vars, state.head_vars(),
                                   np.stack(images))['anomaly_maps'])
  masks = np.stack(masks)
  assert 0 < masks.mean() < 1
  assert got['synthetic_pixel_auroc'] == pytest.approx(
      roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)

  # Without validation images: the held-out training images; without
  # those either, nothing (and no error).
  ctx = _tiny_category(cfg, tmp_path, mesh)
  got = evaluate.synthetic_check(ctx, state)
  assert got['synthetic_source'].endswith(
      'made from 2 held-out normal training images')
  assert 0 <= got['synthetic_pixel_auroc'] <= 1
  cfg.threshold.holdout_fraction = 0.0
  assert evaluate.synthetic_check(_tiny_category(cfg, tmp_path, mesh),
                                  state) == {}


def test_knn_bank_of_another_size_restores(tmp_path):
  """A kNN checkpoint whose bank is not today's coreset_size rows (fitted by
  an older rounding rule) still loads for --mode=eval with the bank it was
  saved with (restoring reads the saved shape, not the template's)."""
  from simplenet_jax import knn  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  cfg.model.method = 'knn'
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.train.num_passes = 1
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = _tiny_category(cfg, tmp_path, mesh)
  rows = ctx.bank_rows + 1
  bank = np.random.default_rng(0).normal(size=(rows, D)).astype(np.float32)
  meta = ctx.meta(1)
  meta['bank_rows'] = rows
  ckpt = ctx.checkpointer()
  try:
    ckpt.save(1, knn.MemoryBank(bank=bank), meta)
  finally:
    ckpt.close()
  state, got = ctx.restore_trained()
  assert got['bank_rows'] == rows
  np.testing.assert_array_equal(np.asarray(state.bank), bank)


def test_categories_share_compilations(tmp_path):
  """Two categories of one run (same config and shapes) share the jitted
  functions, and the short last batches are padded: evaluating the second
  category and every one of its batches compiles nothing new."""
  import logging  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  cfg.dataset.num_workers = 2
  cfg.eval.batch_size = 3  # 7 test images: batches of 3, 3 and 1.
  # New jitted functions, so that earlier tests' compilations do not count.
  scoring._predict_fn.cache_clear()  # pylint: disable=protected-access
  scoring._feature_fn.cache_clear()  # pylint: disable=protected-access
  cfg.eval.visualize = 'none'
  cfg.report.html = False
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctxs = [_tiny_category(cfg, tmp_path, mesh, name, n_test=7)
          for name in ('first', 'second')]
  assert ctxs[0].predict_fn is ctxs[1].predict_fn
  assert ctxs[0].feature_fn is ctxs[1].feature_fn
  assert train.make_cached_step(mesh, D) is train.make_cached_step(mesh, D)

  class Count(logging.Handler):
    compiled = []

    def emit(self, record):
      if 'Compiling' in record.getMessage():
        self.compiled.append(record.getMessage().split(' with ')[0])

  handler = Count()
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      evaluate.evaluate_category(ctxs[0], ctxs[0].new_state(), None,
                                 visualize_maps=False)
      first = len(handler.compiled)
      evaluate.evaluate_category(ctxs[1], ctxs[1].new_state(), None,
                                 visualize_maps=False)
  finally:
    logger.removeHandler(handler)
  predict = [c for c in handler.compiled if 'predict' in c]
  assert len(predict) == 1, handler.compiled  # One batch shape, once.
  assert not [c for c in handler.compiled[first:] if 'predict' in c or
              '_features' in c], handler.compiled[first:]


@pytest.mark.parametrize('augment', ['none', 'flips', 'shifts'])
def test_yardstick_equals_a_knn_run(tmp_path, monkeypatch, augment):
  """eval.yardstick's figures are those of a model.method=knn run of the same
  config: the same training images (hold-out split) in the same views
  (train.augment: each image and its three flips or shifts), coreset key,
  maps and metrics."""
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  from simplenet_jax import report  # pylint: disable=g-import-not-at-top
  from simplenet_jax import yardstick  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  cfg.dataset.num_workers = 2
  cfg.eval.batch_size = 3
  cfg.knn.coreset_fraction = 0.3
  cfg.train.num_passes = 1
  cfg.eval.visualize = 'none'
  cfg.report.gallery_size = 2
  cfg.train.augment = augment
  mesh = parallel.make_mesh(jax.devices()[:1])
  head = _tiny_category(cfg, tmp_path / 'simplenet', mesh, n_train=9,
                        n_test=8)
  # The head's final evaluation scores kNN from the same backbone passes:
  # the paired program (scoring.make_paired_predict_fn), not the head's own.
  bank = yardstick.memory_bank(head)
  drawn = _drawn_knn_maps(monkeypatch)  # What the report's record is given.
  head_only = head.predict_fn
  head.predict_fn = lambda *a: pytest.fail('a second program scored the test')
  row = evaluate.evaluate_category(head, head.new_state(), None, bank=bank)
  head.predict_fn = head_only
  got = {k: row[k] for k in report.YARDSTICK}
  knn_cfg = cfg.copy_and_resolve_references()
  knn_cfg.model.method = 'knn'
  ctx = _tiny_category(knn_cfg, tmp_path / 'knn', mesh, n_train=9, n_test=8)
  state, meta = loop.train_category(ctx, None)
  knn_row = evaluate.evaluate_category(ctx, state, meta)
  want = {k: knn_row[m] for k, m in zip(report.YARDSTICK, report.METRICS)}
  assert got == want
  # One defect type here: no table by type for either (test_main.py has
  # one of each beside the head's).
  assert 'by_defect' not in knn_row and 'knn_by_defect' not in row
  assert 0.5 < want['knn_pixel_auroc'] < 1.0  # Not a degenerate case.
  # The bank was chosen from every view of every training image.
  with open(os.path.join(ctx.workdir, 'log.jsonl'), encoding='utf-8') as f:
    (fit,) = [json.loads(line) for line in f]
  views = 1 if augment == 'none' else 4
  h, w = ctx.grid_hw
  assert fit['feature_rows'] == views * len(ctx.train_idx) * h * w

  # The report's record holds kNN's maps of the head's gallery images: the
  # image scores, maps and colour range of the kNN run's own.
  rec = eval_record.load(head.workdir)
  knn_rec = eval_record.load(ctx.workdir)
  shown = eval_record.shown(rec['galleries'])
  assert len(shown) >= 3
  assert sorted(map(int, rec['knn']['scores'])) == shown
  for i in shown:
    assert rec['knn']['scores'][str(i)] == pytest.approx(
        knn_rec['scores'][i], rel=1e-5)
    tile = eval_record.tile_path(head.workdir, rec, i, yardstick=True)
    assert os.path.getsize(tile) > 0
  np.testing.assert_allclose(rec['knn']['map_range'], knn_rec['map_range'],
                             rtol=1e-5)
  assert sorted(drawn) == shown
  images = np.stack([ctx.test_set.load(i)['image'] for i in shown])
  knn_maps = np.asarray(ctx.predict_fn(ctx.backbone_vars, state.head_vars(),
                                       images)['anomaly_maps'])
  for i, want in zip(shown, knn_maps):
    np.testing.assert_allclose(drawn[i], want, rtol=1e-5, atol=1e-6)


def test_yardstick_reuses_the_training_features(tmp_path, monkeypatch):
  """A run that trained from the feature cache hands it to the yardstick,
  which then runs no backbone pass over the training images and gives the
  figures of a yardstick that builds them (what --mode=eval does)."""
  from simplenet_jax import feature_cache  # pylint: disable=g-import-not-at-top
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  from simplenet_jax import report  # pylint: disable=g-import-not-at-top
  from simplenet_jax import yardstick  # pylint: disable=g-import-not-at-top
  cfg = _tiny_config()
  cfg.eval.yardstick = True
  cfg.eval.batch_size = 3  # Uneven batches over the 8 training images.
  cfg.eval.visualize = 'none'
  cfg.report.html = False
  cfg.knn.coreset_fraction = 0.3
  cfg.train.num_passes = 1
  cfg.train.augment = 'flips'
  mesh = parallel.make_mesh(jax.devices()[:1])
  head = _tiny_category(cfg, tmp_path / 'trained', mesh, n_train=9, n_test=8)
  loop.train_category(head, None)
  kept = head.train_features
  assert kept.shape[0] == 4 * len(head.train_idx)  # Each image's 4 views.
  fresh = _tiny_category(cfg, tmp_path / 'built', mesh, n_train=9, n_test=8)
  state = head.new_state()
  figures = lambda ctx: {k: v for k, v in evaluate.evaluate_category(
      ctx, state, None, bank=yardstick.memory_bank(ctx)).items()
                         if k in report.YARDSTICK}
  want = figures(fresh)
  monkeypatch.setattr(
      feature_cache, 'build',
      lambda *a, **k: pytest.fail('the training features were built again'))
  got = figures(head)
  assert got == want and len(got) == 3
  assert 0.5 < want['knn_pixel_auroc'] < 1.0  # Not a degenerate case.
  assert head.train_features is None  # Dropped: not kept past its use.


def test_yardstick_over_the_cache_cap_is_skipped(tmp_path):
  from simplenet_jax import yardstick  # pylint: disable=g-import-not-at-top
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.train.cache_max_gb = 1e-9
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert yardstick.memory_bank(_tiny_category(cfg, tmp_path, mesh)) is None

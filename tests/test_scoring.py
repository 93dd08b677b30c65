"""Anomaly maps, image scores and the jitted feature / predict functions."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs.default import get_config
import helpers
from simplenet_jax import features
from simplenet_jax import scoring
from simplenet_jax import train

SIGMA = get_config().eval.sigma


@pytest.mark.parametrize('name', ['score_small', 'score_224'])
def test_matches_released_maps_and_scores(name):
  d = helpers.load_fixture(name + '.npz')
  # The released smoothing is the default config's (test_constants.py).
  assert float(d['smoothing_sigma']) == SIGMA
  out_hw = d['anomaly_maps'].shape[1:]
  maps = scoring.anomaly_maps(jnp.asarray(d['patch_scores']), out_hw, SIGMA)
  assert maps.shape == d['anomaly_maps'].shape
  np.testing.assert_allclose(np.asarray(maps), d['anomaly_maps'], rtol=0,
                             atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(scoring.image_scores(d['patch_scores'])), d['image_scores'],
      rtol=0, atol=1e-4)


def test_blur_is_sigma_4_truncated_at_4_sigma():
  """The released RescaleSegmentor: scipy's gaussian_filter(sigma=4) with
  its default truncate (4.0): 33 taps exp(-k^2 / 32), k = -16..16, summing
  to 1. Written out here, not taken from scipy."""
  truncate = inspect.signature(scipy.ndimage.gaussian_filter).parameters[
      'truncate'].default
  assert (SIGMA, truncate) == (4.0, 4.0)
  n = 101
  blur = scoring.map_matrix(n, n, SIGMA)  # Same size: no upsampling.
  k = np.arange(-16, 17)
  taps = np.exp(-k**2 / (2 * 4.0**2))
  column = blur[:, n // 2]
  np.testing.assert_allclose(column[n // 2 - 16:n // 2 + 17],
                             taps / taps.sum(), rtol=0, atol=1e-12)
  assert not column[:n // 2 - 16].any() and not column[n // 2 + 17:].any()


@pytest.mark.parametrize('sigma', [SIGMA, 1.5])
def test_non_square_maps_match_torch_and_scipy(sigma):
  torch = helpers.require_torch()
  F = torch.nn.functional
  # 13 rows < the sigma-4 kernel radius 16: reflection wraps more than once.
  p = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
  up = F.interpolate(torch.from_numpy(p)[:, None], size=(13, 22),
                     mode='bilinear', align_corners=False)[:, 0].numpy()
  want = np.stack([scipy.ndimage.gaussian_filter(u, sigma=sigma, truncate=4.0,
                                                 mode='reflect') for u in up])
  got = scoring.anomaly_maps(jnp.asarray(p), (13, 22), sigma)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_image_scores_is_max_of_raw_patch_scores():
  p = np.zeros((3, 4, 5), np.float32)
  p[1] = -2.0
  p[0, 1, 2], p[1, 3, 4], p[2, 0, 0] = 5.0, -1.0, 2.0
  np.testing.assert_array_equal(np.asarray(scoring.image_scores(p)),
                                [5.0, -1.0, 2.0])


def test_map_max_image_score_is_the_peak_of_the_smoothed_map():
  """A lone patch at 3 vs a 3x3 block at 2 (8 px per patch, sigma 4): the
  released rule ranks the lone patch first, the map's peak the block. The
  peaks are taken from torch's bilinear upsampling and scipy's blur."""
  torch = helpers.require_torch()
  p = np.zeros((2, 8, 8), np.float32)
  p[0, 4, 4] = 3.0
  p[1, 3:6, 3:6] = 2.0
  up = torch.nn.functional.interpolate(
      torch.from_numpy(p)[:, None], size=(64, 64), mode='bilinear',
      align_corners=False)[:, 0].numpy()
  want = [scipy.ndimage.gaussian_filter(u, sigma=SIGMA, truncate=4.0,
                                        mode='reflect').max() for u in up]
  assert want[0] < want[1]  # The construction does what it says.
  released = scoring.outputs(jnp.asarray(p), (64, 64), SIGMA, 'patch_max')
  np.testing.assert_array_equal(np.asarray(released['image_scores']),
                                [3.0, 2.0])
  peak = scoring.outputs(jnp.asarray(p), (64, 64), SIGMA, 'map_max')
  np.testing.assert_allclose(np.asarray(peak['image_scores']), want,
                             rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(peak['anomaly_maps']),
                                np.asarray(released['anomaly_maps']))


def test_score_rule_guards_a_stored_threshold():
  cfg = get_config()
  meta = {'threshold': 0.5}  # Written before eval.image_score existed.
  scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  cfg.eval.image_score = 'map_max'
  with pytest.raises(scoring.UserError,
                     match=r"ckpt: .*--config.eval.image_score=patch_max"):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  meta['score_rule'] = {'image_score': 'map_max', 'sigma': 4.0}
  scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  cfg.eval.sigma = 2.0  # The map's peak depends on the smoothing.
  with pytest.raises(scoring.UserError, match=r'--config.eval.sigma=4.0'):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  scoring.check_score_rule(cfg.eval, {}, 'ckpt')  # No threshold yet.
  cfg.eval.sigma = 4.0
  cfg.eval.tta = 'flips'  # Averaged scores: another scale of image scores.
  with pytest.raises(scoring.UserError, match=r"'tta': 'flips'.*"
                     r"--config.eval.image_score=map_max --config.eval.sigma"):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  meta['score_rule'] = scoring.score_rule(cfg.eval)
  assert meta['score_rule'] == {'image_score': 'map_max', 'sigma': 4.0,
                                'tta': 'flips'}
  scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  cfg.eval.tta = 'none'
  with pytest.raises(scoring.UserError, match=r'--config.eval.tta=flips'):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  cfg.eval.tta = 'flips'
  cfg.eval.squash = 'sigmoid'  # Maps and peaks on another scale.
  with pytest.raises(scoring.UserError, match=r"config asks for .*"
                     r"'squash': 'sigmoid'"):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')
  meta['score_rule'] = scoring.score_rule(cfg.eval)
  cfg.eval.squash = 'none'
  with pytest.raises(scoring.UserError, match=r'--config.eval.squash=sigmoid'):
    scoring.check_score_rule(cfg.eval, meta, 'ckpt')


class _TinyBackbone(nn.Module):
  """Stand-in backbone: two NHWC maps at strides 2 and 4."""

  @nn.compact
  def __call__(self, images):
    a = nn.relu(nn.Conv(6, (3, 3), strides=2, name='c1')(images))
    b = nn.Conv(10, (3, 3), strides=2, name='c2')(a)
    return {'layer2': a, 'layer3': b, 'unused': b * 0}


def _setup():
  cfg = get_config()
  cfg.model.pretrain_embed_dim = 24
  cfg.model.target_embed_dim = 16
  cfg.model.hidden = 8
  module = _TinyBackbone()
  images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 40, 3),
                                             dtype=np.uint8)
  # Weights from numpy: flax's truncated-normal init compiles slowly on CPU.
  rng = np.random.default_rng(1)
  conv = lambda cin, cout: {
      'kernel': (0.3 * rng.normal(size=(3, 3, cin, cout))).astype(np.float32),
      'bias': np.zeros(cout, np.float32)}
  backbone_vars = {'params': {'c1': conv(3, 6), 'c2': conv(6, 10)}}
  return cfg, module, backbone_vars, images


def test_feature_fn_aggregates_backbone_layers():
  cfg, module, backbone_vars, images = _setup()
  fn = scoring.make_feature_fn(module, ('layer2', 'layer3'), cfg.model)
  got = fn(backbone_vars, images)
  assert got.shape == (2, 16, 20, 16)
  maps = module.apply(backbone_vars, images.astype(np.float32) / 255.0)
  want = features.aggregate([maps['layer2'], maps['layer3']], 24, 16, 3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  as_float = fn(backbone_vars, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(as_float), np.asarray(got), atol=1e-6)


def test_coarse_scale_reads_the_deeper_layers_from_the_image_upsampled():
  """model.coarse_scale=2: layer3 from the image at twice the size (here on
  layer2's grid), against jax.image.resize's bilinear upsampling (half-pixel
  centres, as torch's align_corners=False); the folded predict path (what
  training's threshold, predict and export score with) agrees."""
  cfg, module, backbone_vars, images = _setup()
  cfg.model.coarse_scale = 2
  layers = ('layer2', 'layer3')
  got = scoring.make_feature_fn(module, layers, cfg.model)(backbone_vars,
                                                           images)
  x = images.astype(np.float32) / 255.0
  up = jax.image.resize(x, (2, 64, 80, 3), 'bilinear')
  deep = module.apply(backbone_vars, up)['layer3']
  assert deep.shape[1:3] == (16, 20)  # layer2's grid.
  want = features.aggregate(
      [module.apply(backbone_vars, x)['layer2'], deep], 24, 16, 3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # Not the released features (so the switch did something).
  cfg.model.coarse_scale = 1
  released = scoring.make_feature_fn(module, layers, cfg.model)(
      backbone_vars, images)
  assert np.abs(np.asarray(released) - np.asarray(got)).max() > 1e-2
  cfg.model.coarse_scale = 2
  state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                   16, 1, 1)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  out = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                cfg.eval)(backbone_vars, head, images)
  np.testing.assert_allclose(
      np.asarray(out['patch_scores']),
      np.asarray(helpers.reference_patch_scores(head, want)), rtol=1e-5,
      atol=1e-5)


def test_predict_fn_is_consistent_with_the_parts():
  cfg, module, backbone_vars, images = _setup()
  state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                   16, 1, 1)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  predict = scoring.make_predict_fn(module, ('layer2', 'layer3'), cfg.model,
                                    (32, 40), cfg.eval)
  out = predict(backbone_vars, head, images)
  assert out['patch_scores'].shape == (2, 16, 20)
  assert out['anomaly_maps'].shape == (2, 32, 40)
  assert out['image_scores'].shape == (2,)
  feats = scoring.make_feature_fn(module, ('layer2', 'layer3'), cfg.model)(
      backbone_vars, images)
  want = helpers.reference_patch_scores(head, feats)
  np.testing.assert_allclose(np.asarray(out['patch_scores']),
                             np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(out['anomaly_maps']),
      np.asarray(scoring.anomaly_maps(want, (32, 40), cfg.eval.sigma)),
      atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['image_scores']),
                             np.asarray(want).reshape(2, -1).max(1), atol=1e-5)


def test_every_scorer_takes_the_map_peak_when_asked():
  """predict, the cached-feature path (decision threshold) and export all
  follow eval.image_score='map_max': each image's score is its map's peak."""
  cfg, module, backbone_vars, images = _setup()
  cfg.eval.image_score = 'map_max'
  state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                   16, 1, 1)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  layers = ('layer2', 'layer3')
  out = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                cfg.eval)(backbone_vars, head, images)
  peaks = np.asarray(out['anomaly_maps']).reshape(2, -1).max(1)
  patch_max = np.asarray(out['patch_scores']).reshape(2, -1).max(1)
  assert np.abs(peaks - patch_max).min() > 1e-4  # The rules differ here.
  np.testing.assert_allclose(np.asarray(out['image_scores']), peaks, atol=1e-6)
  feats = scoring.make_feature_fn(module, layers, cfg.model)(backbone_vars,
                                                              images)
  cached = scoring.make_cached_features_fn(cfg.model, (32, 40), cfg.eval)(
      head, feats)
  np.testing.assert_allclose(np.asarray(cached['image_scores']), peaks,
                             atol=1e-5)
  exported, maps = scoring.make_export_fn(module, layers, cfg.model,
                                          backbone_vars, head, (32, 40),
                                          cfg.eval)(images)
  np.testing.assert_allclose(np.asarray(exported), peaks, atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps).reshape(2, -1).max(1), peaks,
                             atol=1e-5)


@pytest.mark.parametrize('method', ['simplenet', 'knn'])
def test_flips_average_the_four_flipped_back_passes(method):
  """eval.tta='flips': predict's and export's patch scores are the mean of
  one-pass scores of the image and its three flips, each flipped back with
  numpy here; the maps and image scores follow from that mean."""
  cfg, module, backbone_vars, images = _setup()
  cfg.model.method = method
  layers = ('layer2', 'layer3')
  if method == 'knn':
    rng = np.random.default_rng(3)
    head = {'bank': jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)}
  else:
    state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                     16, 1, 1)
    head = {'params': state.params, 'batch_stats': state.batch_stats}
  one = scoring.make_predict_fn(module, layers, cfg.model, (32, 40), cfg.eval)
  passes = []
  for flip_back in (lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1],
                    lambda a: a[:, ::-1, ::-1]):
    flipped = np.ascontiguousarray(flip_back(images))  # A flip is its inverse.
    passes.append(flip_back(np.asarray(
        one(backbone_vars, head, flipped)['patch_scores'])))
  want = np.mean(passes, 0)
  assert np.abs(passes[1] - passes[0]).max() > 1e-3  # The flips differ.
  cfg.eval.tta = 'flips'
  flips = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                  cfg.eval)
  out = flips(backbone_vars, head, images)
  np.testing.assert_allclose(np.asarray(out['patch_scores']), want,
                             rtol=1e-5, atol=1e-5)
  # Predict's program holds the backbone's two convolutions once (the views
  # in a loop), not once per view; export's unrolls them (ONNX has no loops).
  convs = lambda fn, *args: str(jax.make_jaxpr(fn)(*args)).count(
      'conv_general_dilated[')
  assert convs(one, backbone_vars, head, images) == 2
  assert convs(flips, backbone_vars, head, images) == 2
  np.testing.assert_allclose(
      np.asarray(out['anomaly_maps']),
      np.asarray(scoring.anomaly_maps(jnp.asarray(want), (32, 40),
                                      cfg.eval.sigma)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['image_scores']),
                             want.reshape(2, -1).max(1), atol=1e-5)
  export = scoring.make_export_fn(module, layers, cfg.model, backbone_vars,
                                  head, (32, 40), cfg.eval)
  assert convs(export, images) == 8
  scores, maps = export(images)
  np.testing.assert_allclose(np.asarray(scores), want.reshape(2, -1).max(1),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps), np.asarray(out['anomaly_maps']),
                             atol=1e-5)
  with pytest.raises(ValueError, match='tta'):  # The cache has no flips.
    scoring.make_cached_features_fn(cfg.model, (32, 40), cfg.eval)
  # Unrolled views cannot go to a search over all of them at once: that
  # would stack them, which the ONNX lowering refuses.
  with pytest.raises(ValueError, match='loop=True'):
    scoring.tta_views(lambda x: x, jnp.asarray(images), 'flips', loop=False,
                      then=lambda v: v)


@pytest.mark.parametrize('tta,squash', [('none', 'none'),
                                         ('flips', 'sigmoid')])
def test_paired_predict_gives_each_scorers_own_outputs(tta, squash):
  """The yardstick's paired program (one backbone pass for the head and
  kNN) gives the head's outputs of its own predict function and kNN's of a
  model.method=knn predict function; kNN's maps are never squashed."""
  cfg, module, backbone_vars, images = _setup()
  cfg.eval.tta, cfg.eval.squash = tta, squash
  cfg.eval.image_score = 'map_max'
  layers = ('layer2', 'layer3')
  state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                   16, 1, 1)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  bank = jnp.asarray(np.random.default_rng(3).normal(size=(40, 16)),
                     jnp.float32)
  paired = scoring.make_paired_predict_fn(module, layers, cfg.model, (32, 40),
                                          cfg.eval)
  got = paired(backbone_vars, head, bank, images)
  want = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                 cfg.eval)(backbone_vars, head, images)
  knn_cfg = cfg.copy_and_resolve_references()
  knn_cfg.model.method = 'knn'
  want_knn = scoring.make_predict_fn(module, layers, knn_cfg.model, (32, 40),
                                     cfg.eval)(backbone_vars, {'bank': bank},
                                               images)
  assert sorted(got) == sorted(
      list(want) + [scoring.PAIRED_PREFIX + k for k in want_knn])
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[scoring.PAIRED_PREFIX + k]),
                               np.asarray(want_knn[k]), rtol=1e-6, atol=1e-6)
  # The two scorers differ (not one scorer's outputs twice), and kNN's map
  # is of its raw distances, as large as they are, not squashed into (0, 1).
  assert np.abs(np.asarray(got['anomaly_maps']) -
                np.asarray(got['knn_anomaly_maps'])).max() > 0.1
  assert np.asarray(got['knn_anomaly_maps']).max() > 1.0
  if squash == 'sigmoid':
    assert np.asarray(got['anomaly_maps']).max() < 1.0
  # One backbone pass per view for both: its two convolutions, once.
  program = str(jax.make_jaxpr(paired)(backbone_vars, head, bank, images))
  assert program.count('conv_general_dilated[') == 2


@pytest.mark.parametrize('tta', ['none', 'flips'])
def test_squash_takes_the_heads_scores_through_a_sigmoid_of_the_margin(tta):
  """eval.squash='sigmoid': predict's, the cached-feature path's and
  export's maps are those of 1 / (1 + exp(-s / margin)) of the unsquashed
  patch scores s (after the flips' mean), computed with numpy here; both
  image-score rules stay on s (its maximum, its map's peak), so strong
  defects keep their order. kNN's distances are left as they are."""
  cfg, module, backbone_vars, images = _setup()
  cfg.eval.tta = tta
  # Not 0.5: the scale is the config's margin (an untrained head's scores
  # are small, so a small one reaches both tails of the sigmoid).
  cfg.model.margin = 0.02
  layers = ('layer2', 'layer3')
  state = train.create_train_state(jax.random.key(1), cfg.model, cfg.optim,
                                   16, 1, 1)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  raw = np.asarray(scoring.make_predict_fn(
      module, layers, cfg.model, (32, 40), cfg.eval)(
          backbone_vars, head, images)['patch_scores'], np.float64)
  assert raw.min() < -0.04 and raw.max() > 0.04  # Both tails.
  want = 1.0 / (1.0 + np.exp(-raw / 0.02))
  cfg.eval.squash = 'sigmoid'
  for rule in ('patch_max', 'map_max'):
    cfg.eval.image_score = rule
    out = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                  cfg.eval)(backbone_vars, head, images)
    np.testing.assert_allclose(np.asarray(out['patch_scores']), raw,
                               rtol=1e-5, atol=1e-6)
    maps = np.asarray(scoring.anomaly_maps(jnp.asarray(want, jnp.float32),
                                           (32, 40), cfg.eval.sigma))
    np.testing.assert_allclose(np.asarray(out['anomaly_maps']), maps,
                               atol=1e-6)
    raw_maps = np.asarray(scoring.anomaly_maps(
        jnp.asarray(raw, jnp.float32), (32, 40), cfg.eval.sigma))
    peak = (raw_maps if rule == 'map_max' else raw).reshape(2, -1).max(1)
    squashed_peak = (maps if rule == 'map_max' else want).reshape(2, -1)
    # The two candidates differ, so the check below tells them apart.
    assert np.abs(peak - squashed_peak.max(1)).min() > 1e-2
    np.testing.assert_allclose(np.asarray(out['image_scores']), peak,
                               atol=1e-6)
    scores, exported = scoring.make_export_fn(
        module, layers, cfg.model, backbone_vars, head, (32, 40),
        cfg.eval)(images)
    np.testing.assert_allclose(np.asarray(exported), maps, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), peak, atol=1e-5)
    if tta == 'none':  # The cached path scores one view only.
      feats = scoring.make_feature_fn(module, layers, cfg.model)(
          backbone_vars, images)
      cached = scoring.make_cached_features_fn(cfg.model, (32, 40),
                                               cfg.eval)(head, feats)
      np.testing.assert_allclose(np.asarray(cached['anomaly_maps']), maps,
                                 atol=1e-5)
      np.testing.assert_allclose(np.asarray(cached['image_scores']), peak,
                                 atol=1e-5)
  cfg.model.method = 'knn'
  bank = {'bank': jnp.asarray(np.random.default_rng(3).normal(size=(40, 16)),
                              jnp.float32)}
  squashed = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                     cfg.eval)(backbone_vars, bank, images)
  cfg.eval.squash = 'none'
  plain = scoring.make_predict_fn(module, layers, cfg.model, (32, 40),
                                  cfg.eval)(backbone_vars, bank, images)
  assert float(np.asarray(plain['patch_scores']).max()) > 1.0  # Distances.
  np.testing.assert_array_equal(np.asarray(squashed['anomaly_maps']),
                                np.asarray(plain['anomaly_maps']))

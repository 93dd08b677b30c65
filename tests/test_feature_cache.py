"""The training-feature cache: size estimate, cap, build, and cached training
vs recomputing the features every step (the path taken over the cap)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
import helpers
from simplenet_jax import feature_cache
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import train

D = 16
# Measured: cached vs recomputed losses agree to ~1e-7 and parameters to
# ~1e-8 on this test (float32 cache).
TOL = 1e-5
Images = helpers.RandomImages  # 12x12.


@pytest.fixture(scope='module')
def setup():
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  cfg.dataset.num_workers = 2
  module = helpers.TinyBackbone()
  bvars = helpers.tiny_backbone_vars()
  fn = scoring.make_feature_fn(module, ('layer2', 'layer3'), cfg.model)
  return cfg, bvars, fn, parallel.make_mesh(jax.devices()[:1])


def _flat(tree):
  # Without the zero-gradient biases: Adam turns their rounding noise into
  # steps of size lr.
  return helpers.flat_params(tree)


def test_estimate_bytes():
  assert feature_cache.estimate_bytes(10, (28, 28), 1536, 'float32') == (
      10 * 28 * 28 * 1536 * 4)
  assert feature_cache.estimate_bytes(10, (28, 28), 1536, 'bfloat16') == (
      10 * 28 * 28 * 1536 * 2)


def test_fits_logs_the_estimate_and_applies_the_cap(caplog):
  t = get_config().train

  def logged():
    out = [(r.levelname, r.getMessage()) for r in caplog.records
           if 'Feature cache' in r.getMessage()]
    caplog.clear()
    assert len(out) == 1, out
    return out[0]

  caplog.set_level('INFO')
  # 200 MVTec-sized images: 200 * 784 * 1536 * 4 B = 0.897 GiB.
  t.cache_max_gb = 1.0
  assert feature_cache.fits(200, (28, 28), 1536, t)
  level, text = logged()
  assert level == 'INFO' and '0.897 GiB' in text and 'caching' in text
  t.cache_max_gb = 0.5
  assert not feature_cache.fits(200, (28, 28), 1536, t)
  level, text = logged()
  assert level == 'WARNING' and 'over the cap' in text  # Slow: it must show.
  t.cache_dtype = 'bfloat16'  # 0.449 GiB: fits again.
  assert feature_cache.fits(200, (28, 28), 1536, t)
  logged()
  t.cache_features = False
  assert not feature_cache.fits(1, (1, 1), 1, t)
  level, text = logged()
  assert level == 'INFO' and 'off' in text  # Chosen by the user.


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_build_matches_feature_fn_in_index_order(setup, dtype):
  cfg, bvars, fn, mesh = setup
  cfg.train.cache_dtype = dtype
  ds = Images(7)
  idx = np.array([5, 0, 6, 2, 3])  # Batches of 2: the last one is short.
  cache = feature_cache.build(fn, bvars, ds, idx, 2, cfg.train, cfg.dataset,
                              mesh)
  want = np.asarray(fn(bvars, ds.x[idx]))
  assert cache.shape == (5, want.shape[1] * want.shape[2], D)
  assert cache.dtype == jnp.dtype(dtype)
  got = np.asarray(cache, np.float32).reshape(want.shape)
  tol = 1e-6 if dtype == 'float32' else 1e-2 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def _flipped(x, size, grid):
  """The images as the flips' views: left-right, up-down, both."""
  del size, grid
  return [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]


def _shifted(x, size, grid):
  """The images as the shifts' views, by index arithmetic: output pixel j
  shows input pixel j - s, s half a grid cell; the first s reflect (s - j).
  Right, down, both."""
  s = size // grid // 2
  assert s >= 1
  moved = np.abs(np.arange(size) - s)
  return [x, x[:, :, moved], x[:, moved], x[:, moved][:, :, moved]]


def _one_flip(k):
  """The images and their k-th flip alone (1 left-right, 2 up-down, 3
  both), as _flipped makes them."""
  return lambda x, size, grid: [x, _flipped(x, size, grid)[k]]


@pytest.mark.parametrize('augment,want_views', [
    ('flips', _flipped), ('shifts', _shifted), ('flip_lr', _one_flip(1)),
    ('flip_ud', _one_flip(2)), ('rot180', _one_flip(3))])
def test_build_holds_each_view_in_its_block(setup, augment, want_views):
  """train.augment: rows v*N..(v+1)*N-1 of the cache are the features of
  the images as view v, against images made into the views on the host by
  plain indexing; the recomputed path's host views (view_images) match the
  same indexing."""
  cfg, bvars, fn, mesh = setup
  train_cfg = copy.deepcopy(cfg.train)
  train_cfg.cache_dtype = 'float32'
  train_cfg.augment = augment
  views = feature_cache.views(train_cfg)
  ds = Images(5)
  idx = np.array([3, 0, 4])  # Batches of 2: the last one is short.
  cache = feature_cache.build(fn, bvars, ds, idx, 2, train_cfg, cfg.dataset,
                              mesh, image_views=views)
  n, size = len(idx), ds.x.shape[1]
  grid = int(round(cache.shape[1] ** 0.5))
  x = ds.x[idx]
  want_x = want_views(x, size, grid)
  assert len(views) == len(want_x) and cache.shape[0] == len(views) * n
  for v, viewed in enumerate(want_x):
    want = np.asarray(fn(bvars, np.ascontiguousarray(viewed)))
    got = np.asarray(cache[v * n:(v + 1) * n]).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # The views differ from the images (else the test could not fail).
  assert np.abs(np.asarray(cache[n:2 * n] - cache[:n])).max() > 1e-3
  # Host views, every view id in one batch, one of them twice.
  ids = [v % len(views) for v in (1, 0, 3, 2, 1)]
  rows = feature_cache.view_images(x[[0, 1, 2, 0, 2]], ids, views,
                                   (grid, grid))
  for b, (i, v) in enumerate(zip([0, 1, 2, 0, 2], ids)):
    np.testing.assert_array_equal(rows[b], want_x[v][i])


@pytest.mark.parametrize('heads', [1, 2])
def test_cached_training_equals_recomputed(setup, heads):
  """The cap's fallback (features recomputed per step) trains the same, one
  head or two (model.heads) on each batch."""
  cfg, bvars, fn, mesh = setup
  cfg.train.cache_dtype = 'float32'
  cfg.model.heads = heads
  ds = Images(6)
  cache = feature_cache.build(fn, bvars, ds, np.arange(6), 4, cfg.train,
                              cfg.dataset, mesh)
  order = [np.array([4, 1, 3]), np.array([0, 5, 2])]

  def new_state():
    return train.create_train_state(jax.random.PRNGKey(0), cfg.model,
                                    cfg.optim, D, 2, 1)

  cached = train.make_cached_step(mesh, D)
  recomputed = train.make_features_step(mesh, D)
  s_c, s_r, l_c, l_r = new_state(), new_state(), [], []
  start = _flat(s_c.params)
  for i, idx in enumerate(order):
    key = jax.random.PRNGKey(i)
    s_c, m = cached(s_c, cache, jnp.asarray(idx), key)
    l_c.append(float(m['loss']))
    images, n = parallel.put_batch(ds.x[idx], mesh)
    s_r, m = recomputed(s_r, bvars, images, key, fn, n)
    l_r.append(float(m['loss']))
  assert np.abs(_flat(s_r.params) - start).max() > 1e-4  # It trained.
  np.testing.assert_allclose(l_c, l_r, rtol=0, atol=TOL)
  np.testing.assert_allclose(_flat(s_c.params), _flat(s_r.params), rtol=0,
                             atol=TOL)

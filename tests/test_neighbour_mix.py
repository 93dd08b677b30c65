"""train.neighbour_mix: partners in other images, the mixing, and the steps
that use it (released and synthesis), against numpy references."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CATEGORY
from conftest import main_env
from conftest import run_main
from conftest import tiny_args
from configs import demo as demo_config
from configs.default import get_config
import helpers
from simplenet_jax import knn
from simplenet_jax import neighbour_mix
from simplenet_jax import parallel
from simplenet_jax import synthesis
from simplenet_jax import train

D = 8


def _brute_other(rows, groups):
  """Index of each row's nearest row of another group (float64)."""
  r = np.asarray(rows, np.float64)
  d = ((r[:, None] - r[None]) ** 2).sum(-1)
  d[np.equal.outer(groups, groups)] = np.inf
  return d.argmin(1)


@pytest.mark.parametrize('chunks', [(1024, 8192), (5, 7)])
def test_grouped_nearest_leaves_the_own_group_out(chunks):
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(41, 6)).astype(np.float32) + 20.0
  groups = rng.integers(0, 4, size=41)
  dist, arg = knn.nearest_neighbours(bank, bank, *chunks,
                                     query_groups=groups, bank_groups=groups)
  arg = np.asarray(arg)
  np.testing.assert_array_equal(arg, _brute_other(bank, groups))
  assert (groups[arg] != groups).all()
  np.testing.assert_allclose(
      np.asarray(dist), np.linalg.norm(bank - bank[arg], axis=1), rtol=1e-5)
  # Ungrouped, every row is its own nearest.
  _, own = knn.nearest_neighbours(bank, bank, *chunks)
  np.testing.assert_array_equal(np.asarray(own), np.arange(41))


@pytest.mark.parametrize('block', [8192, 4])
def test_partners_skip_every_view_of_the_same_image(block):
  """Cache rows r = view r // N of image r % N (train.augment='flips'):
  a feature's partner lies in another image, in any of its views; searched
  in blocks (the last one padded), with progress reported."""
  rng = np.random.default_rng(1)
  n, views, p = 5, 2, 3
  cache = rng.normal(size=(views * n, p, D)).astype(np.float32)
  # View 1 of each image is view 0 plus a little: the nearest rows of all
  # would be the other view of their own image.
  cache[n:] = cache[:n] + 1e-3
  done = []
  got = np.asarray(neighbour_mix.partners(jnp.asarray(cache), n, block,
                                          progress=done.append))
  assert sum(done) == views * n * p and len(done) == -(-30 // min(block, 30))
  assert got.shape == (views * n, p) and got.dtype == np.int32
  image = (np.arange(views * n * p) // p) % n
  np.testing.assert_array_equal(
      got.reshape(-1), _brute_other(cache.reshape(-1, D), image))
  assert (image[got.reshape(-1)] != image).all()


def test_mix_moves_each_feature_along_its_segment():
  rng = np.random.default_rng(2)
  cache = jnp.asarray(rng.normal(size=(6, 4, D)).astype(np.float32))
  partners = neighbour_mix.partners(cache, 6)
  idx = jnp.asarray([4, 0, 4])
  out = np.asarray(neighbour_mix.mix(cache, partners, idx,
                                     jax.random.PRNGKey(3),
                                     neighbour_mix.Mix(0.5)))
  x = np.asarray(cache)[np.asarray(idx)]
  y = np.asarray(cache).reshape(-1, D)[np.asarray(partners)[np.asarray(idx)]]
  # out = x + u (y - x): on the segment, at a fraction u in [0, 0.5] ...
  u = ((out - x) * (y - x)).sum(-1) / ((y - x) ** 2).sum(-1)
  np.testing.assert_allclose(out, x + u[..., None] * (y - x), atol=1e-5)
  assert (u >= 0).all() and (u <= 0.5).all() and u.std() > 0.05
  # ... drawn per feature, so the same image twice moves differently.
  assert np.abs(out[0] - out[2]).max() > 1e-3
  # And none of the noise's draws: the same key's fractions at another
  # amount scale with it.
  out1 = np.asarray(neighbour_mix.mix(cache, partners, idx,
                                      jax.random.PRNGKey(3),
                                      neighbour_mix.Mix(1.0)))
  u1 = ((out1 - x) * (y - x)).sum(-1) / ((y - x) ** 2).sum(-1)
  np.testing.assert_allclose(u1, 2 * u, atol=1e-5)


def _mixed_reference(cache, idx, key, amount):
  """The mixed batch by numpy: brute-force partners, the step's fractions."""
  c = np.asarray(cache, np.float64)
  n, p, _ = c.shape
  rows = c.reshape(-1, D)
  part = _brute_other(rows, (np.arange(n * p) // p) % n).reshape(n, p)
  u = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2),
                                    (len(idx), p, 1), maxval=amount))
  x = c[idx]
  return (x + u * (rows[part[idx]] - x)).astype(np.float32)


def _mesh():
  return parallel.make_mesh(jax.devices()[:1])


def _released_state():
  """A fresh state of the released head on D-dim features (8 hidden)."""
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = D
  cfg.model.hidden = 8
  return train.create_train_state(jax.random.PRNGKey(0), cfg.model,
                                  cfg.optim, D, 2, 1)


def _demo_state():
  """A fresh state of the demo config's head (one, 16 hidden) on D-dim
  features, with the noise std that calibration would set."""
  c = demo_config.get_config()
  c.model.hidden, c.model.heads = 16, 1
  return train.create_train_state(jax.random.PRNGKey(0), c.model, c.optim,
                                  D, 2, 1).replace(noise_std=jnp.float32(0.5))


def test_released_cached_step_trains_on_the_mixed_rows():
  rng = np.random.default_rng(4)
  cache = jnp.asarray(rng.normal(size=(5, 4, D)).astype(np.float32))
  idx, key = np.array([3, 1]), jax.random.PRNGKey(5)

  step = train.make_cached_step(_mesh(), D, neighbour_mix.Mix(0.75))
  got, m = step(_released_state(), cache, jnp.asarray(idx), key,
                partners=neighbour_mix.partners(cache, 5))
  rows = _mixed_reference(cache, idx, key, 0.75).reshape(-1, D)
  want, m_ref = train.train_step(_released_state(), jnp.asarray(rows), key)
  assert np.isfinite(float(m['loss'])) and float(m['loss']) > 0.01
  np.testing.assert_allclose(float(m['loss']), float(m_ref['loss']),
                             rtol=1e-5)
  # Without the zero-gradient biases, whose rounding noise Adam turns into
  # steps of size lr.
  np.testing.assert_allclose(helpers.flat_params(got.params),
                             helpers.flat_params(want.params), atol=1e-5)
  # Without the mix the step is the released one and differs.
  plain, m0 = train.make_cached_step(_mesh(), D)(_released_state(), cache,
                                                  jnp.asarray(idx), key)
  assert abs(float(m0['loss']) - float(m['loss'])) > 1e-4


def test_synthesis_cached_step_trains_on_the_mixed_rows():
  c = demo_config.get_config()
  # The demo's GAS hypersphere, with fewer ascent steps.
  syn = dataclasses.replace(
      synthesis.SynthesisConfig.from_config(c.synthesis), gas_steps=4,
      gas_every=2)
  assert syn.gas == 'hypersphere'
  h = w = 2
  rng = np.random.default_rng(6)
  cache = jnp.asarray(rng.normal(size=(4, h * w, D)).astype(np.float32) + 1)
  centre = cache.mean(0).reshape(h, w, D)
  idx, key = np.array([2, 0]), jax.random.PRNGKey(7)

  step = synthesis.make_cached_step(_mesh(), (h, w), syn,
                                    neighbour_mix.Mix(1.0))
  got, m = step(_demo_state(), cache, jnp.asarray(idx), key, centre,
                partners=neighbour_mix.partners(cache, 4))
  feats = _mixed_reference(cache, idx, key, 1.0).reshape(2, h, w, D)
  want, m_ref = synthesis.train_step(_demo_state(), jnp.asarray(feats), key,
                                     syn, centre)
  assert np.isfinite(float(m['loss'])) and float(m['loss']) > 0.01
  np.testing.assert_allclose(float(m['loss']), float(m_ref['loss']),
                             rtol=1e-5)
  # Without the zero-gradient biases, whose rounding noise Adam turns into
  # steps of size lr.
  np.testing.assert_allclose(helpers.flat_params(got.params),
                             helpers.flat_params(want.params), atol=1e-5)


def test_sampled_partners_with_one_other_image_are_its_nearest():
  """Two training images: the one image drawn is the other one, so the
  partner is the nearest feature of the other image (numpy, float64)."""
  rng = np.random.default_rng(8)
  cache = jnp.asarray(rng.normal(size=(2, 6, D)).astype(np.float32))
  rows = np.asarray(cache).reshape(-1, D)
  want = _brute_other(rows, np.arange(12) // 6).reshape(2, 6)
  for seed in range(3):
    got = np.asarray(neighbour_mix.sampled_partners(
        cache, jnp.asarray([1, 0, 1]), jax.random.PRNGKey(seed), 1))
    np.testing.assert_array_equal(got, want[[1, 0, 1]])


def test_sampled_partners_within_the_drawn_images_and_views():
  """Each row's partners lie in other images; with many draws every other
  image and view is searched, so the partner is the exact one over all
  views (`partners`); with one draw, the image drawn varies with the key
  over all the other images, and each feature's partner is its nearest in
  that image's view."""
  rng = np.random.default_rng(9)
  n, views, p = 3, 2, 5
  cache = jnp.asarray(rng.normal(size=(views * n, p, D)).astype(np.float32))
  rows = np.asarray(cache, np.float64).reshape(-1, D)
  idx = jnp.asarray([0, 4, 2, 5])
  got = np.asarray(neighbour_mix.sampled_partners(
      cache, idx, jax.random.PRNGKey(1), 64, views))
  exact = np.asarray(neighbour_mix.partners(cache, n))
  np.testing.assert_array_equal(got, exact[np.asarray(idx)])
  seen = set()
  for seed in range(40):
    one = np.asarray(neighbour_mix.sampled_partners(
        cache, idx, jax.random.PRNGKey(seed), 1, views))
    src = one // p  # The cache row each partner comes from.
    assert (src == src[:, :1]).all()  # One drawn row per batch row.
    for b, r in enumerate(np.asarray(idx)):
      assert src[b, 0] % n != r % n
      d = ((rows[r * p:(r + 1) * p, None] -
            rows[None, src[b, 0] * p:(src[b, 0] + 1) * p]) ** 2).sum(-1)
      np.testing.assert_array_equal(one[b] % p, d.argmin(1))
      seen.add((int(r), int(src[b, 0])))
  # Every other image in both views, for each row of the batch.
  assert seen == {(r, s) for r in (0, 4, 2, 5) for s in range(views * n)
                  if s % n != r % n}


def test_sampled_mix_in_the_steps():
  """train.neighbour_images=1 in the released and synthesis steps: with two
  training images the drawn partner is the exact one, so the steps equal
  the numpy reference's; with more, the step trains (a finite loss) and
  differs from the exact partners' step."""
  rng = np.random.default_rng(10)
  cache = jnp.asarray(rng.normal(size=(2, 4, D)).astype(np.float32))
  idx, key = np.array([1, 0]), jax.random.PRNGKey(11)

  step = train.make_cached_step(_mesh(), D, neighbour_mix.Mix(0.75, 1))
  _, m = step(_released_state(), cache, jnp.asarray(idx), key)
  rows = _mixed_reference(cache, idx, key, 0.75).reshape(-1, D)
  _, m_ref = train.train_step(_released_state(), jnp.asarray(rows), key)
  np.testing.assert_allclose(float(m['loss']), float(m_ref['loss']),
                             rtol=1e-5)
  big = jnp.asarray(rng.normal(size=(7, 4, D)).astype(np.float32))
  _, m_s = step(_released_state(), big, jnp.asarray(idx), key)
  _, m_e = train.make_cached_step(_mesh(), D, neighbour_mix.Mix(0.75))(
      _released_state(), big, jnp.asarray(idx), key,
      partners=neighbour_mix.partners(big, 7))
  assert np.isfinite(float(m_s['loss']))
  assert abs(float(m_s['loss']) - float(m_e['loss'])) > 1e-6

  c = demo_config.get_config()
  syn = dataclasses.replace(
      synthesis.SynthesisConfig.from_config(c.synthesis), gas_steps=4,
      gas_every=2)
  h = w = 2
  cache = jnp.asarray(rng.normal(size=(2, h * w, D)).astype(np.float32) + 1)
  centre = cache.mean(0).reshape(h, w, D)

  _, m = synthesis.make_cached_step(_mesh(), (h, w), syn,
                                    neighbour_mix.Mix(1.0, 1))(
                                        _demo_state(), cache, jnp.asarray(idx),
                                        key, centre)
  feats = _mixed_reference(cache, idx, key, 1.0).reshape(2, h, w, D)
  _, m_ref = synthesis.train_step(_demo_state(), jnp.asarray(feats), key, syn,
                                  centre)
  np.testing.assert_allclose(float(m['loss']), float(m_ref['loss']),
                             rtol=1e-5)


def test_fingerprint_only_changes_when_on():
  """Off, the fingerprint is the one before the key existed (older runs
  resume); on, it is another run."""
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  c = get_config()
  assert c.train.neighbour_mix == 0
  assert category.fingerprint(c) == '0x8e95376f'
  c.train.neighbour_images = 1  # Without the mix, nothing to choose.
  assert category.fingerprint(c) == '0x8e95376f'
  # Nor in the step: off is one step (and one compilation) for every run.
  assert neighbour_mix.Mix.from_config(c.train, 4) == neighbour_mix.Mix()
  c.train.neighbour_mix = 1.0
  drawn = category.fingerprint(c)
  c.train.neighbour_images = 0
  exact = category.fingerprint(c)
  assert len({drawn, exact, '0x8e95376f'}) == 3


def test_main_trains_with_partners_from_random_images_by_default(
    tmp_path, awkward_root, lite0_weights_dir, jax_cache_dir):
  """main.py with train.neighbour_mix=1 (partners drawn from
  train.neighbour_images=4 random images, the default) under the demo
  config's GAS hypersphere: trains, evaluates and logs finite losses, with
  no whole-set partner search."""
  root, _ = awkward_root
  workdir = tmp_path / 'run'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, root, passes=2, extra=[
      '--config.synthesis.gas=hypersphere', '--config.model.heads=1',
      '--config.train.neighbour_mix=1',
      # The demo config mixes only with the flips, which tiny_args turns off.
      '--config.train.neighbour_mix_when=always']),
                  env=main_env(jax_cache_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'neighbour partners' not in proc.stderr + proc.stdout
  log = [json.loads(line) for line in
         (workdir / CATEGORY / 'log.jsonl').read_text().splitlines()]
  assert [r['pass'] for r in log] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in log)
  assert f'{CATEGORY}: I-AUROC' in proc.stdout


@pytest.mark.parametrize('augment, mixed', [
    ('flips', True), ('flip_lr', True), ('flip_ud', True), ('rot180', True),
    ('none', False), ('shifts', False)])
def test_mix_when_flips_follows_the_resolved_augment(augment, mixed, capsys):
  """train.neighbour_mix_when='flips' (the demo and folder configs): the mix
  as given where the category trains on flips (all three or the one 'auto'
  took), off where it trains without them; the console says which."""
  c = demo_config.get_config()
  assert (c.train.neighbour_mix, c.train.neighbour_mix_when) == (1.0, 'flips')
  c.train.augment = augment  # As view_check.resolve leaves it.
  out = neighbour_mix.resolve(c, 'parts')
  assert out.train.neighbour_mix == (1.0 if mixed else 0.0)
  assert c.train.neighbour_mix == 1.0  # The given config is left as it is.
  said = ''.join(capsys.readouterr())
  assert 'parts: train.neighbour_mix_when=flips: ' + (
      'it trains on flips, so each training feature is moved toward a '
      'neighbour (train.neighbour_mix=1)' if mixed else
      'it trains without flips, so its features are not moved '
      '(train.neighbour_mix off)') in said
  # Everything else as given.
  out.train.neighbour_mix = 1.0
  assert out.to_dict() == c.to_dict()


def test_mix_always_and_off_are_left_alone():
  c = demo_config.get_config()
  c.train.augment = 'none'
  c.train.neighbour_mix_when = 'always'
  assert neighbour_mix.resolve(c, 'parts') is c
  c.train.neighbour_mix_when, c.train.neighbour_mix = 'flips', 0.0
  assert neighbour_mix.resolve(c, 'parts') is c

"""Several categories' heads trained together (train.categories_per_step).

The stacked step (a vmap over categories, `train.make_stacked_cached_step`)
must give every category exactly the training it gets alone: its own rows in
its own order, its own noise, no step where it has none. Compared here
against `train.make_cached_step` step by step, on one device and on a mesh
of 4 host devices, and end to end through main.py (tables, parameters, and
categories resuming from different passes).
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import PIL.Image

import conftest
import helpers
from configs.default import get_config
from simplenet_jax import model
from simplenet_jax import parallel
from simplenet_jax import train

TOL = 1e-5


def _assert_same_training(a, b, steps, lr=2e-4):
  """a, b: TrainStates (or namespaces of params, batch_stats, step) after
  `steps` steps of the same training, computed in different ways; with
  stacked heads (model.heads > 1), head by head."""
  heads = model.num_heads(b.params)
  assert model.num_heads(a.params) == heads
  if heads > 1:
    for h in range(heads):
      pick = lambda tree, h=h: jax.tree.map(lambda x: np.asarray(x)[h], tree)
      _assert_same_training(*(types.SimpleNamespace(
          params=pick(s.params), batch_stats=pick(s.batch_stats),
          step=np.asarray(s.step)[h]) for s in (a, b)), steps, lr)
    return
  fa, fb = helpers.flat_params(a.params), helpers.flat_params(b.params)
  assert np.abs(fa - fb).max() <= TOL * max(1.0, np.abs(fb).max())
  # The two biases of zero exact gradient (helpers.ZERO_GRAD): Adam turns
  # their rounding noise into steps of up to lr, in either run.
  za = helpers.flat_params(a.params, skip=())
  zb = helpers.flat_params(b.params, skip=())
  assert np.abs(za - zb).max() <= 2 * lr * steps
  # The running mean averages the batch means of x (A W) + (a W + w): with
  # those biases a (adaptor) and w (first Linear) apart by up to 2 lr per
  # step it may differ by up to 2 lr steps (1 + sum_i |W_ij|) per hidden
  # unit j (a looser form of test_train's _running_mean_limit).
  w = np.asarray(b.params['discriminator']['fc']['kernel'])
  bound = 2 * lr * steps * (1.0 + np.abs(w).sum(axis=0))
  ma = np.asarray(a.batch_stats['discriminator']['bn']['mean'])
  mb = np.asarray(b.batch_stats['discriminator']['bn']['mean'])
  assert (np.abs(ma - mb) <= bound + TOL * max(1.0, np.abs(mb).max())).all()
  va = np.asarray(a.batch_stats['discriminator']['bn']['var'])
  vb = np.asarray(b.batch_stats['discriminator']['bn']['var'])
  assert np.abs(va - vb).max() <= TOL * max(1.0, np.abs(vb).max())
  assert int(a.step) == int(b.step) == steps


def _config():
  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = 16
  cfg.model.hidden = 8
  return cfg


# Three categories: training sets of 5, 7 and 3 images, grids of 6, 9 and 4
# positions; batch 2 -> 3, 4 and 2 steps per pass (short last batches).
SIZES = ((5, 6), (7, 9), (3, 4))
BATCH = 2
D = 16


def _caches():
  rng = np.random.default_rng(0)
  return [rng.normal(1.0, 2.0, size=(n, p, D)).astype(np.float32)
          for n, p in SIZES]


def _plans(passes):
  """Per category, per pass: (order, noise key) as the loop draws them."""
  out = []
  for k, (n, _) in enumerate(SIZES):
    per_pass = []
    for p in range(passes):
      key = jax.random.fold_in(jax.random.PRNGKey(100 + k), p)
      perm_key, noise_key = jax.random.split(key)
      per_pass.append((np.asarray(jax.random.permutation(perm_key, n)),
                       noise_key))
    out.append(per_pass)
  return out


# The steps, made once per mesh: jax compiles each once per shape, not once
# per call (they are pure functions of their arguments).
_cached_step = functools.cache(train.make_cached_step)
_stacked_step = functools.cache(train.make_stacked_cached_step)


def _alone(mesh, cfg, cache, plans, starts_state=None):
  step = _cached_step(mesh, D)
  n = cache.shape[0]
  steps = -(-n // BATCH)
  state = train.create_train_state(jax.random.PRNGKey(7), cfg.model,
                                   cfg.optim, D, steps, 2)
  state = parallel.put_replicated(state, mesh)
  cache = parallel.put_replicated(cache, mesh)
  for order, noise_key in plans:
    for s in range(steps):
      idx = order[s * BATCH:(s + 1) * BATCH]
      state, _ = step(state, cache, jnp.asarray(idx),
                      jax.random.fold_in(noise_key, s))
  return state


def _together(mesh, cfg, caches, plans):
  step = _stacked_step(mesh, BATCH)
  steps = [-(-c.shape[0] // BATCH) for c in caches]
  states = [train.create_train_state(jax.random.PRNGKey(7), cfg.model,
                                     cfg.optim, D, s, 2) for s in steps]
  states = parallel.put_replicated(train.stack_states(states), mesh)
  n_max = max(c.shape[0] for c in caches)
  p_max = max(c.shape[1] for c in caches)
  stacked = np.stack([np.pad(c, ((0, n_max - c.shape[0]),
                                 (0, p_max - c.shape[1]), (0, 0)))
                      for c in caches])
  stacked = parallel.put_replicated(stacked, mesh)
  grid = np.asarray([c.shape[1] for c in caches], np.int32)
  for p in range(len(plans[0])):
    for s in range(max(steps)):
      idx = np.full((len(caches), BATCH), 12345, np.int32)  # Junk beyond n.
      n_images = np.zeros(len(caches), np.int32)
      keys = []
      for k in range(len(caches)):
        order, noise_key = plans[k][p]
        batch = order[s * BATCH:(s + 1) * BATCH] if s < steps[k] else []
        idx[k, :len(batch)] = batch
        n_images[k] = len(batch)
        keys.append(jax.random.fold_in(noise_key, s))
      states, _ = step(states, stacked, idx, n_images, grid, n_images > 0,
                       jnp.stack(keys))
  return [train.unstack_state(states, k) for k in range(len(caches))]


@pytest.mark.parametrize('heads', [1, 2])
def test_stacked_step_equals_each_category_alone(heads):
  """Also with model.heads=2: each category's heads stacked inside."""
  cfg = _config()
  cfg.model.heads = heads
  mesh = parallel.make_mesh()
  caches, plans = _caches(), _plans(2)
  together = _together(mesh, cfg, caches, plans)
  for k, cache in enumerate(caches):
    alone = _alone(mesh, cfg, cache, plans[k])
    _assert_same_training(together[k], alone, steps=2 * (-(-SIZES[k][0] //
                                                          BATCH)))


def test_stacked_step_sees_only_its_own_rows():
  """A category's result must not depend on the others' data: changing
  category 1's cache changes category 1 only (bit for bit elsewhere)."""
  cfg = _config()
  mesh = parallel.make_mesh()
  caches, plans = _caches(), _plans(1)
  base = _together(mesh, cfg, caches, plans)
  caches[1] = caches[1] * 3.0 + 1.0
  changed = _together(mesh, cfg, caches, plans)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  assert same(base[0], changed[0]) and same(base[2], changed[2])
  assert not same(base[1], changed[1])


def test_inactive_category_is_left_unchanged():
  cfg = _config()
  mesh = parallel.make_mesh()
  step = train.make_stacked_cached_step(mesh, BATCH)
  states = [train.create_train_state(jax.random.PRNGKey(k), cfg.model,
                                     cfg.optim, D, 2, 2) for k in range(2)]
  before = jax.device_get(states[1])
  stacked = train.stack_states(states)
  caches = np.ones((2, 4, 3, D), np.float32)
  out, _ = step(stacked, caches, np.zeros((2, BATCH), np.int32),
                np.asarray([2, 0], np.int32), np.asarray([3, 3], np.int32),
                np.asarray([True, False]),
                jnp.stack([jax.random.PRNGKey(0)] * 2))
  after = jax.device_get(train.unstack_state(out, 1))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert int(jax.device_get(train.unstack_state(out, 0)).step) == 1


_CHILD = textwrap.dedent('''
  import sys
  sys.path[:0] = [{tests!r}, {repo!r}]
  import jax
  import test_together as t
  from simplenet_jax import parallel
  assert jax.device_count() == 4, jax.devices()
  caches, plans = t._caches(), t._plans(2)
  mesh4, mesh1 = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
  for heads in (1, 2):  # model.heads=2: each category's two heads inside.
    cfg = t._config()
    cfg.model.heads = heads
    together = t._together(mesh4, cfg, caches, plans)
    for k, cache in enumerate(caches):
      alone = jax.device_get(t._alone(mesh1, cfg, cache, plans[k]))
      t._assert_same_training(jax.device_get(together[k]), alone,
                              steps=2 * (-(-t.SIZES[k][0] // t.BATCH)))
  print('OK', len(together[0].params['adaptor']['fc']['kernel'].sharding
                  .device_set))
''')


def test_stacked_step_on_a_mesh_of_4_devices_equals_one_device():
  tests = os.path.dirname(os.path.abspath(__file__))
  code = _CHILD.format(tests=tests, repo=conftest.ROOT)
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=tests,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == 'OK 4', out.stdout


def _write_categories(root):
  """Three MVTec-layout categories of 5, 7 and 3 training tiles; beta is a
  texture (another image size, so another feature grid)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  photo = np.asarray(skimage.data.gravel(), np.uint8)
  rng = np.random.default_rng(3)

  def tile():
    y, x = rng.integers(0, photo.shape[0] - 72, size=2)
    g = photo[y:y + 72, x:x + 72]
    return np.stack([g, np.roll(g, 2, axis=0), 255 - g], axis=-1)

  for name, n_train in (('alpha', 5), ('beta', 7), ('gamma', 3)):
    cat = root / name
    for sub in ('train/good', 'test/good', 'test/spot', 'ground_truth/spot'):
      (cat / sub).mkdir(parents=True)
    for i in range(n_train):
      PIL.Image.fromarray(tile()).save(cat / 'train/good' / f'{i:03d}.png')
    for i in range(2):
      PIL.Image.fromarray(tile()).save(cat / 'test/good' / f'{i:03d}.png')
      image, mask = tile(), np.zeros((72, 72), np.uint8)
      y, x = rng.integers(8, 50, size=2)
      image[y:y + 14, x:x + 14] = (250, 20, 20)
      mask[y:y + 14, x:x + 14] = 255
      PIL.Image.fromarray(image).save(cat / 'test/spot' / f'{i:03d}.png')
      PIL.Image.fromarray(mask).save(cat / 'ground_truth/spot' /
                                     f'{i:03d}_mask.png')


def _args(workdir, weights_dir, root, k):
  args = conftest.tiny_args(workdir, weights_dir, root, passes=4, extra=(
      '--config.dataset.textures=beta', '--config.dataset.texture_resize=48',
      '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=4',
      f'--config.train.categories_per_step={k}',
      # One head: three (the demo config's) train together too, but their
      # nested vmap rounds differently, and Adam turns that into steps of up
      # to lr on near-zero gradients; the stacked step's two-head test
      # (test_stacked_step_equals_each_category_alone) checks heads.
      '--config.model.heads=1'))
  return [a if not a.startswith('--config.dataset.categories=') else
          '--config.dataset.categories=alpha,beta,gamma' for a in args]


def _final(category_dir):
  step, tree = conftest_final_tree(category_dir)
  return step, types.SimpleNamespace(params=tree['params'],
                                     batch_stats=tree['batch_stats'],
                                     step=tree['step'])


def conftest_final_tree(category_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(str(category_dir / 'checkpoints'),
                                  item_names=('state', 'meta'))
  try:
    step = manager.latest_step()
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return step, out['state']
  finally:
    manager.close()


def _rows(workdir):
  doc = json.loads((workdir / 'results.json').read_text())
  return {r['category']: [r['image_auroc'], r['pixel_auroc'], r['aupro']]
          for r in doc['rows']}


def test_main_trains_three_categories_together_as_if_alone(
    tmp_path, lite0_weights_dir, jax_cache_dir):
  root = tmp_path / 'data'
  _write_categories(root)
  env = conftest.main_env(jax_cache_dir)
  alone, together = tmp_path / 'alone', tmp_path / 'together'
  for workdir, k in ((alone, 1), (together, 3)):
    proc = conftest.run_main(
        _args(workdir, lite0_weights_dir, root, k),
        conftest.main_env(jax_cache_dir, JAX_LOG_COMPILES=1) if k > 1 else env)
    assert proc.returncode == 0, proc.stderr[-3000:]
  # The stacked step has one input shape, so it compiles once (its first
  # call's inputs are placed like its outputs, not compiled a second time).
  assert (proc.stdout + proc.stderr).count('Compiling jit(step)') == 1
  # Per pass, batch 2, after the demo config's 10% hold-out: 4, 6, 2 images.
  steps = {'alpha': 2, 'beta': 3, 'gamma': 1}
  for name, per_pass in steps.items():
    (s1, a), (s3, b) = _final(alone / name), _final(together / name)
    assert s1 == s3 == 4
    _assert_same_training(b, a, steps=4 * per_pass)
    log = [json.loads(l) for l in (together / name / 'log.jsonl')
           .read_text().splitlines()]
    assert [r['pass'] for r in log] == [1, 2, 3, 4]
  rows_alone, rows_together = _rows(alone), _rows(together)
  assert rows_alone.keys() == {'alpha', 'beta', 'gamma'}
  for name in rows_alone:
    np.testing.assert_allclose(rows_together[name], rows_alone[name],
                               atol=1e-3)

  # Interrupted at different points: beta's last checkpoint is pass 1,
  # gamma's pass 3, alpha finished. Running again resumes each from its own
  # checkpoint and ends where the uninterrupted run ended.
  import shutil  # pylint: disable=g-import-not-at-top
  for name, keep in (('beta', 1), ('gamma', 3)):
    for step_dir in (together / name / 'checkpoints').iterdir():
      if step_dir.name.isdigit() and int(step_dir.name) > keep:
        shutil.rmtree(step_dir)
  proc = conftest.run_main(_args(together, lite0_weights_dir, root, 3), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log_file = (together / 'logs' / 'simplenet.INFO').read_text()
  for name, start in (('alpha', 4), ('beta', 1), ('gamma', 3)):
    assert f'{name}: continuing from pass {start} ' in log_file
  for name, per_pass in steps.items():
    _, again = _final(together / name)
    _, a = _final(alone / name)
    _assert_same_training(again, a, steps=4 * per_pass)
    log = [json.loads(l) for l in (together / name / 'log.jsonl')
           .read_text().splitlines()]
    assert [r['pass'] for r in log] == [1, 2, 3, 4]

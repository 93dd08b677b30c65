"""Data parallelism on 4 host CPU devices (and 2 processes) vs one device.

XLA fixes the number of host devices when jax is first imported, so every
check runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=N; the child prints JSON
and the tests compare it. One child computes both sides: a mesh over all 4
devices and a mesh over the first one alone (plain single-device maths).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import helpers

REPO = helpers.ROOT
TOL = 1e-5

# Shared by the children: a tiny backbone (two strided convs standing in for
# layer2/layer3, so compiles take seconds), a tiny head and a fake dataset,
# from tests/helpers.py (on the children's PYTHONPATH; XLA_FLAGS is set in
# their environment before jax starts).
_COMMON = textwrap.dedent('''
  import functools, json, sys
  import jax, jax.numpy as jnp, numpy as np
  import helpers
  from configs.default import get_config
  from simplenet_jax import feature_cache, parallel, scoring, train

  Tiny = helpers.TinyBackbone
  Images = functools.partial(helpers.RandomImages, size=16)

  cfg = get_config()
  cfg.model.pretrain_embed_dim = cfg.model.target_embed_dim = 16
  cfg.model.hidden = 8
  cfg.train.cache_dtype = 'float32'
  cfg.dataset.num_workers = 2
  D = 16
  module = Tiny()
  bvars = helpers.tiny_backbone_vars()
  feature_fn = scoring.make_feature_fn(module, ('layer2', 'layer3'),
                                       cfg.model)

  def new_state(mesh):
    s = train.create_train_state(jax.random.PRNGKey(0), cfg.model, cfg.optim,
                                 D, 2, 1)
    return parallel.put_replicated(s, mesh)

  def cached_run(mesh, cache_np, batches):
    """Losses and final params of len(batches) cached steps."""
    step = train.make_cached_step(mesh, D)
    state, cache = new_state(mesh), parallel.put_replicated(cache_np, mesh)
    losses = []
    for i, idx in enumerate(batches):
      state, m = step(state, cache, jnp.asarray(idx), jax.random.PRNGKey(i))
      losses.append(float(m['loss']))
    return losses, state

  # Without the biases whose gradient is zero in exact arithmetic (BatchNorm
  # removes a constant shift): Adam turns their rounding-noise gradients into
  # steps of size lr whatever the noise.
  def flat(tree):
    return helpers.flat_params(tree, to_host=parallel.to_host)

  def devices_of(x):
    return len(x.sharding.device_set)
''')

_ONE_HOST = _COMMON + textwrap.dedent('''
  assert jax.device_count() == 4, jax.devices()
  mesh4, mesh1 = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
  out = {}

  # put_batch / to_host: 3 rows over 4 devices -> 4 rows, the last zero.
  x = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
  a, n = parallel.put_batch(x, mesh4)
  h = parallel.to_host(a)
  out['put_batch'] = dict(shape=list(a.shape), n=n, devices=devices_of(a),
                          head_ok=bool((h[:n] == x).all()),
                          pad_zero=bool((h[n:] == 0).all()))

  # Cached training: 3 images x 3 rows = 9 rows per step, not divisible by 4.
  cache = np.random.default_rng(0).normal(size=(6, 3, D)).astype(np.float32)
  batches = [np.array([4, 0, 2]), np.array([1, 5, 3]), np.array([2, 3, 0])]
  l4, s4 = cached_run(mesh4, cache, batches)
  l1, s1 = cached_run(mesh1, cache, batches)
  p4, p1 = flat(s4.params), flat(s1.params)
  out['cached'] = dict(loss4=l4, loss1=l1,
                       param_diff=float(np.abs(p4 - p1).max()),
                       param_moved=float(np.abs(p1 - flat(new_state(mesh1)
                                                          .params)).max()),
                       # The running mean follows the drifting fc bias.
                       var_rel_diff=float(
                           np.abs(flat(s4.batch_stats['discriminator']['bn']
                                       ['var']) -
                                  flat(s1.batch_stats['discriminator']['bn']
                                       ['var'])).max() /
                           np.abs(flat(s1.batch_stats)).max()),
                       devices=devices_of(s4.params['adaptor']['fc']['kernel']))

  # Recomputed features: a batch of 3 images is padded to 4 on 4 devices.
  imgs = Images(6).x
  res = {}
  for name, mesh in (('4', mesh4), ('1', mesh1)):
    step = train.make_features_step(mesh, D)
    state, bv, losses = new_state(mesh), parallel.put_replicated(bvars, mesh), []
    for i, sl in enumerate((slice(0, 3), slice(3, 6))):
      images, n = parallel.put_batch(imgs[sl], mesh)
      state, m = step(state, bv, images, jax.random.PRNGKey(i), feature_fn, n)
      losses.append(float(m['loss']))
    res[name] = (losses, flat(state.params))
  out['features'] = dict(loss4=res['4'][0], loss1=res['1'][0],
                         param_diff=float(np.abs(res['4'][1] -
                                                 res['1'][1]).max()))

  # Evaluation: predict_fn on 3 images (padded to 4) vs one device.
  predict = scoring.make_predict_fn(module, ('layer2', 'layer3'), cfg.model,
                                    (16, 16), cfg.eval)
  st = new_state(mesh1)
  head = {'params': st.params, 'batch_stats': st.batch_stats}
  ev = {}
  for name, mesh in (('4', mesh4), ('1', mesh1)):
    images, n = parallel.put_batch(imgs[:3], mesh)
    o = predict(parallel.put_replicated(bvars, mesh),
                parallel.put_replicated(head, mesh), images)
    ev[name] = {k: parallel.to_host(v)[:n] for k, v in o.items()}
    ev[name + '_devices'] = devices_of(o['anomaly_maps'])
  out['eval'] = dict(
      score_diff=float(np.abs(ev['4']['image_scores'] -
                              ev['1']['image_scores']).max()),
      map_diff=float(np.abs(ev['4']['anomaly_maps'] -
                            ev['1']['anomaly_maps']).max()),
      n=len(ev['4']['image_scores']), devices=ev['4_devices'],
      score_spread=float(np.ptp(ev['1']['image_scores'])))

  # Cache built on 4 devices (batches of 3 padded to 4) vs one device.
  ds = Images(5)
  c4 = feature_cache.build(feature_fn, parallel.put_replicated(bvars, mesh4),
                           ds, np.arange(5)[::-1], 3, cfg.train, cfg.dataset,
                           mesh4)
  want = np.asarray(feature_fn(bvars, ds.x[::-1])).reshape(5, -1, D)
  out['cache'] = dict(diff=float(np.abs(parallel.to_host(c4) - want).max()),
                      shape=list(c4.shape), devices=devices_of(c4))
  print('RESULT' + json.dumps(out))
''')

# Two processes with 2 host devices each: a 4-device global mesh.
_MULTI_HOST = textwrap.dedent('''
  import os, sys
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(sys.argv[1], num_processes=2,
                             process_id=int(sys.argv[2]))
''') + _COMMON + textwrap.dedent('''
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh4 = parallel.make_mesh()
  out = {'process': jax.process_index()}

  # Each process loads its own rows of a batch of 3 (process 1 gets 1).
  ds = Images(7)
  got = list(parallel.host_batches(ds, 3, mesh4, indices=np.arange(7)[::-1],
                                   num_workers=1))
  out['local_rows'] = [len(b['image']) for b in got]
  out['n_global'] = [b['n_global'] for b in got]
  rebuilt = []
  for b in got:
    a, n = parallel.put_batch(b['image'], mesh4, b['n_global'])
    rebuilt.append(parallel.to_host(a)[:n])
  out['batches_ok'] = bool((np.concatenate(rebuilt) == ds.x[::-1]).all())

  # The one-host child's first two steps (compared with its single-device
  # run by the test).
  cache = np.random.default_rng(0).normal(size=(6, 3, D)).astype(np.float32)
  batches = [np.array([4, 0, 2]), np.array([1, 5, 3])]
  out['loss4'], s4 = cached_run(mesh4, cache, batches)
  out['devices'] = devices_of(s4.params['adaptor']['fc']['kernel'])

  c4 = feature_cache.build(feature_fn, parallel.put_replicated(bvars, mesh4),
                           ds, np.arange(7), 3, cfg.train, cfg.dataset, mesh4)
  want = np.asarray(feature_fn(bvars, ds.x)).reshape(7, -1, D)
  out['cache_diff'] = float(np.abs(parallel.to_host(c4) - want).max())
  print('RESULT' + json.dumps(out))
''')


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = os.pathsep.join([REPO, helpers.TESTS,
                                       env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _result(proc_out: str, what: str) -> dict:
  lines = [l for l in proc_out.splitlines() if l.startswith('RESULT')]
  if not lines:
    pytest.fail(f'{what} printed no result:\n{proc_out[-3000:]}')
  return json.loads(lines[-1][len('RESULT'):])


@pytest.fixture(scope='module')
def one_host():
  p = subprocess.run([sys.executable, '-c', _ONE_HOST], cwd=REPO,
                     env=_env(4), capture_output=True, text=True, timeout=300)
  return _result(p.stdout + p.stderr, '4-device child')


def test_put_batch_pads_at_the_end_and_to_host_unpads(one_host):
  r = one_host['put_batch']
  assert r == dict(shape=[4, 2], n=3, devices=4, head_ok=True, pad_zero=True)


def test_sharded_cached_step_equals_single_device(one_host):
  r = one_host['cached']
  assert r['devices'] == 4
  assert r['param_moved'] > 1e-4  # The steps did change the parameters.
  np.testing.assert_allclose(r['loss4'], r['loss1'], rtol=0, atol=TOL)
  assert r['param_diff'] < TOL
  assert r['var_rel_diff'] < TOL  # BatchNorm running variance.


def test_sharded_features_step_with_padded_batch(one_host):
  r = one_host['features']
  np.testing.assert_allclose(r['loss4'], r['loss1'], rtol=0, atol=TOL)
  assert r['param_diff'] < TOL


def test_sharded_evaluation_equals_single_device(one_host):
  r = one_host['eval']
  assert r['n'] == 3 and r['devices'] == 4
  assert r['score_spread'] > 0  # Scores differ between images.
  assert r['score_diff'] < TOL
  assert r['map_diff'] < TOL


def test_sharded_cache_build(one_host):
  r = one_host['cache']
  assert r['shape'][0] == 5 and r['devices'] == 4
  assert r['diff'] < TOL


def test_multi_host_two_processes(one_host):
  """2 processes x 2 CPU devices (jax.distributed over gloo on localhost)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  addr = f'localhost:{port}'
  procs = [subprocess.Popen([sys.executable, '-c', _MULTI_HOST, addr, str(i)],
                            cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('multi-host children timed out')
  results = [_result(o, f'process {i}') for i, o in enumerate(outs)]
  # Batches 3, 3, 1: process 0 holds rows 0-1 (of 4 padded), process 1 row 2.
  assert results[0]['local_rows'] == [2, 2, 1]
  assert results[1]['local_rows'] == [1, 1, 0]
  for r in results:
    assert r['n_global'] == [3, 3, 1]
    assert r['batches_ok']
    assert r['devices'] == 4
    np.testing.assert_allclose(r['loss4'], one_host['cached']['loss1'][:2],
                               rtol=0, atol=TOL)
    assert r['cache_diff'] < TOL


def test_main_same_table_on_four_devices(tmp_path):
  """main.py on a tiny demo config: 4 host devices vs 1 (run side by side)."""
  flags = ['--config', 'configs/demo.py', '--config.dataset.categories=brick',
           '--config.dataset.texture_resize=32',
           '--config.model.pretrain_embed_dim=32',
           '--config.model.target_embed_dim=32', '--config.model.hidden=16',
           '--config.train.num_passes=2', '--config.train.batch_size=3',
           '--config.eval.visualize=none',
           '--config.eval.feature_histogram=False',
           # What a device count cannot change: the page and the events.
           '--config.report.html=False', '--config.report.tensorboard=False']
  procs = {}
  for d in (1, 4):
    procs[d] = subprocess.Popen(
        [sys.executable, 'main.py', *flags, f'--workdir={tmp_path}/d{d}'],
        cwd=REPO, env=_env(d), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
  outs = {d: p.communicate(timeout=400)[0] for d, p in procs.items()}
  results = {}
  for d, p in procs.items():
    if p.returncode:
      pytest.fail(f'main.py on {d} device(s) failed:\n{outs[d][-3000:]}')
    with open(tmp_path / f'd{d}' / 'results.json') as f:
      results[d] = json.load(f)
    with open(tmp_path / f'd{d}' / 'brick' / 'log.jsonl') as f:
      results[d]['log'] = [json.loads(l) for l in f]
  assert len(results[4]['extra']['devices']) == 4
  assert len(results[1]['extra']['devices']) == 1
  (row1,), (row4,) = results[1]['rows'], results[4]['rows']
  # The head's figures, and the kNN yardstick's (its training features
  # computed and its test images scored over the 4 devices).
  for k in ('image_auroc', 'pixel_auroc', 'aupro', 'knn_image_auroc',
            'knn_pixel_auroc', 'knn_aupro'):
    assert abs(row4[k] - row1[k]) < 1e-4, (k, row4[k], row1[k])
  # train.augment='auto' (the demo config's) chooses alike on both: at
  # 32 px the brick tiles' flips look normal, so 1 pass of 2 over 4x rows.
  said = {d: [l for l in outs[d].splitlines() if 'train.augment=auto' in l]
          for d in outs}
  assert len(said[1]) == 1 and said[4] == said[1], said
  assert 'its flips look normal' in said[1][0]
  assert [r['pass'] for r in results[4]['log']] == [1]
  assert [r['pass'] for r in results[1]['log']] == [1]
  for r1, r4 in zip(results[1]['log'], results[4]['log']):
    assert abs(r4['loss'] - r1['loss']) < TOL

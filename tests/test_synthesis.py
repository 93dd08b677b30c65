"""synthesis: Perlin masks, GAS, LAS, focal loss, the synthesis step."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs import demo as demo_config
from simplenet_jax import model as model_lib
from simplenet_jax import synthesis
from simplenet_jax import train


def _syn(**changes):
  """configs/default.py's synthesis settings (all off), with `changes`."""
  from configs import default  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(synthesis.SynthesisConfig.from_config(
      default.get_config().synthesis), **changes)


# ---- Perlin ----------------------------------------------------------------


def test_perlin_noise_range_shape_and_determinism():
  key = jax.random.PRNGKey(0)
  a = np.asarray(synthesis.perlin_noise(key, (40, 24), 4, 2, 0.3))
  b = np.asarray(synthesis.perlin_noise(key, (40, 24), 4, 2, 0.3))
  c = np.asarray(synthesis.perlin_noise(jax.random.PRNGKey(1), (40, 24), 4, 2,
                                        0.3))
  assert a.shape == (40, 24) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 0.1
  assert np.all(np.abs(a) <= 1.5) and a.std() > 0.05
  # Lattice points carry value 0 (unrotated): rows 0, 10, 20, 30 at res 4.
  flat = np.asarray(synthesis.perlin_noise(key, (40, 24), 4, 2))
  np.testing.assert_allclose(flat[::10, ::12], 0.0, atol=1e-6)


def test_perlin_mask_binary_deterministic_never_empty():
  key = jax.random.PRNGKey(3)
  m = np.asarray(synthesis.perlin_mask(key, (32, 32), 0.5))
  assert m.shape == (32, 32)
  assert set(np.unique(m).tolist()) <= {0.0, 1.0}
  np.testing.assert_array_equal(
      m, np.asarray(synthesis.perlin_mask(key, (32, 32), 0.5)))
  # A threshold above any noise value falls back to the maximum: not empty.
  high = np.asarray(synthesis.perlin_mask(key, (32, 32), 10.0))
  assert 1 <= high.sum() < 32 * 32
  # On a small grid (feature grids are 8-28 cells) the finest scales must
  # not alias to all-zero noise, which the fallback would turn into a full
  # mask: masks cover a part of the grid, never all of it.
  small = jax.jit(jax.vmap(lambda k: synthesis.perlin_mask(
      k, (8, 8), 0.2, scales=(0, 6), combine=False)))(
          jax.random.split(jax.random.PRNGKey(0), 40))
  cover = np.asarray(small).mean(axis=(1, 2))
  assert np.all((cover > 0) & (cover < 1)), cover


def test_perlin_masks_half_empty():
  masks = np.asarray(synthesis.perlin_masks(jax.random.PRNGKey(0), 200,
                                            (16, 16), threshold=0.2,
                                            empty_fraction=0.5))
  assert masks.shape == (200, 16, 16)
  assert set(np.unique(masks).tolist()) <= {0.0, 1.0}
  empty = int((masks.reshape(200, -1).sum(1) == 0).sum())
  assert 70 <= empty <= 130, empty  # Binomial(200, 0.5): +- 4 sigma.
  full = synthesis.perlin_masks(jax.random.PRNGKey(0), 50, (16, 16),
                                empty_fraction=0.0)
  assert int((np.asarray(full).reshape(50, -1).sum(1) == 0).sum()) == 0
  none = synthesis.perlin_masks(jax.random.PRNGKey(0), 10, (16, 16),
                                empty_fraction=1.0)
  assert float(np.asarray(none).sum()) == 0.0
  # Mask i depends on (key, i) only.
  few = synthesis.perlin_masks(jax.random.PRNGKey(0), 7, (16, 16),
                               threshold=0.2, empty_fraction=0.5)
  np.testing.assert_array_equal(np.asarray(few), masks[:7])


def test_max_pool_to_grid():
  m = np.zeros((2, 8, 8), np.float32)
  m[0, 0, 7] = 1  # Top-right pixel -> top-right cell.
  m[1, 5, 2] = 1  # Row 5, col 2 -> cell (1, 0) of a 2x2 grid.
  g = np.asarray(synthesis.max_pool_to_grid(jnp.asarray(m), (2, 2)))
  np.testing.assert_array_equal(g[0], [[0, 1], [0, 0]])
  np.testing.assert_array_equal(g[1], [[0, 0], [1, 0]])
  # Sizes that do not divide: every pixel still reaches a cell covering it.
  g3 = np.asarray(synthesis.max_pool_to_grid(jnp.asarray(m), (3, 3)))
  assert g3[0, 0, 2] == 1 and g3[1, 1:, 0].max() == 1


# ---- GAS -------------------------------------------------------------------


def _disc(key, dim=16, hidden=8):
  disc = model_lib.Discriminator(hidden)
  params = disc.init(key, jnp.zeros((2, dim)), train=False)['params']
  stats = {'bn': {'mean': jnp.zeros(hidden), 'var': jnp.ones(hidden)}}
  score = lambda x: disc.apply({'params': params, 'batch_stats': stats}, x,
                               train=False)
  return score


def test_project_to_ring():
  rng = np.random.default_rng(0)
  anchor = rng.normal(size=(50, 6)).astype(np.float32)
  offsets = rng.normal(size=(50, 6)).astype(np.float32)
  offsets *= rng.uniform(0.1, 4.0, size=(50, 1)) / np.linalg.norm(
      offsets, axis=1, keepdims=True)
  out = np.asarray(synthesis.project_to_ring(anchor + offsets, anchor, 1.0,
                                             2.0))
  h = out - anchor
  norms = np.linalg.norm(h, axis=1)
  assert norms.min() >= 1.0 - 1e-5 and norms.max() <= 2.0 + 1e-5
  cos = np.sum(h * offsets, 1) / (norms * np.linalg.norm(offsets, axis=1))
  np.testing.assert_allclose(cos, 1.0, atol=1e-5)  # Direction kept.
  inside = (np.linalg.norm(offsets, axis=1) >= 1) & (
      np.linalg.norm(offsets, axis=1) <= 2)
  np.testing.assert_allclose(out[inside], (anchor + offsets)[inside],
                             atol=1e-6)


@pytest.mark.parametrize('steps,every', [(20, 5), (7, 5)])
def test_gas_manifold_keeps_offsets_in_ring_and_raises_fake_loss(steps, every):
  score = _disc(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  true = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
  fakes = true + 0.3 * jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  start = synthesis.project_to_ring(fakes, true, 1.0, 2.0)
  out = synthesis.gradient_ascent(score, start, true, 1.0, 2.0, steps=steps,
                                  step_size=0.05, every=every)
  norms = np.linalg.norm(np.asarray(out - true), axis=1)
  assert norms.min() >= 1.0 - 1e-4 and norms.max() <= 2.0 + 1e-4
  fake_loss = lambda x: float(jnp.mean(jax.nn.relu(score(x) + 0.5)))
  assert fake_loss(out) > fake_loss(start) + 1e-3
  assert float(jnp.mean(score(out))) > float(jnp.mean(score(start)))
  assert np.abs(np.asarray(out - start)).max() > 1e-3  # It moved.


def test_gas_hypersphere_keeps_distances_in_r_2r():
  score = _disc(jax.random.PRNGKey(2))
  rng = np.random.default_rng(3)
  centre = jnp.asarray(np.tile(rng.normal(size=(1, 16)), (64, 1)),
                       jnp.float32)
  fakes = centre + jnp.asarray(rng.normal(size=(64, 16)) *
                               rng.uniform(0.1, 9, size=(64, 1)), jnp.float32)
  r = 2.5
  out = synthesis.gradient_ascent(score, fakes, centre, r, 2 * r, steps=20,
                                  step_size=0.1, every=5)
  d = np.linalg.norm(np.asarray(out - centre), axis=1)
  assert d.min() >= r - 1e-4 and d.max() <= 2 * r + 1e-4


# GLASS's released code (cqylunlun/GLASS, glass.py _train_discriminator) run
# by tests/fixtures/glass/make_fixture.py on fixed inputs, weights and noise.
_GLASS = os.path.join(os.path.dirname(__file__), 'fixtures', 'glass',
                      'gas.npz')


def _glass_head(f):
  """The fixture's projection and discriminator as our head's variables.
  GLASS's discriminator ends in a sigmoid of P(anomalous); our score is a
  logit with high = normal, so the tail changes sign."""
  params = {
      'adaptor': {'fc': {'kernel': f['proj_kernel'], 'bias': f['proj_bias']}},
      'discriminator': {
          'fc': {'kernel': f['fc_kernel'], 'bias': f['fc_bias']},
          'bn': {'scale': f['bn_scale'], 'bias': f['bn_bias']},
          'tail': {'kernel': -f['tail_kernel']}}}
  hidden = f['fc_bias'].shape[0]
  stats = {'discriminator': {'bn': {'mean': np.zeros(hidden, np.float32),
                                    'var': np.ones(hidden, np.float32)}}}
  return (jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats))


_GLASS_NOISE = 0.015  # GLASS's --noise


def _glass_syn(gas, gas_bn, d=32, **changes):
  """GLASS's constants (step 0.001, manifold ring [0.5, 1.0]) as our lengths
  in units of rho; returns (SynthesisConfig, rho)."""
  rho = float(jnp.float32(_GLASS_NOISE) * np.sqrt(np.float32(d)))
  return _syn(gas=gas, gas_bn=gas_bn, gas_steps=20, gas_every=5,
              gas_step=0.001 / rho, gas_r1=0.5 / rho, gas_r2=1.0 / rho,
              gas_quantile=0.75, las_weight=1.0, las_shell=True, loss='bce',
              **changes), rho


def _glass_loss(params, stats, f, syn, batch='', centre=None):
  """head_loss on the fixture's batch ('' or '_2'); centre: the raw one."""
  b, p, d = f['features'].shape
  grid = (b, 4, p // 4, d)
  if centre is None:
    centre = jnp.asarray(f['centre'].reshape(grid[1:]))
  return synthesis.head_loss(
      params, stats, jnp.asarray(f['features' + batch].reshape(grid)),
      jax.random.PRNGKey(0), jnp.float32(_GLASS_NOISE), 0.5, syn,
      centre=centre,
      las_features=jnp.asarray(f['las_features' + batch].reshape(grid)),
      las_labels=jnp.asarray(f['las_labels' + batch].reshape(grid[:3])))


def _as_glass(tree):
  """Our head's parameters (or their gradients) under the fixture's names,
  in its layout (GLASS's tail is minus ours)."""
  a, dsc = tree['adaptor']['fc'], tree['discriminator']
  return {'proj_kernel': a['kernel'], 'proj_bias': a['bias'],
          'fc_kernel': dsc['fc']['kernel'], 'fc_bias': dsc['fc']['bias'],
          'bn_scale': dsc['bn']['scale'], 'bn_bias': dsc['bn']['bias'],
          'tail_kernel': -dsc['tail']['kernel']}


def _recorder(monkeypatch):
  """got, record(name, args=False): synthesis.<name> keeps its last result
  (or its positional arguments) in got[name]."""
  got = {}

  def record(name, args=False):
    fn = getattr(synthesis, name)

    def wrapped(*a, **kw):
      out = fn(*a, **kw)
      got[name] = a if args else out
      return out
    monkeypatch.setattr(synthesis, name, wrapped)
  return got, record


def _fixed_noise(monkeypatch, *noises):
  """model_lib.sample_noise returns the fixture's noise tensors in turn."""
  it = iter([jnp.asarray(n) for n in noises])
  monkeypatch.setattr(model_lib, 'sample_noise',
                      lambda key, shape, std, mix=1: next(it))


@pytest.mark.parametrize('gas', ['manifold', 'hypersphere'])
@pytest.mark.parametrize('gas_bn', ['frozen', 'batch'])
def test_gas_matches_glass_code(gas, gas_bn, monkeypatch):
  """head_loss's GAS fakes equal GLASS's on the same inputs, weights and
  noise, with GLASS's absolute constants (step 0.001, manifold ring
  [0.5, 1.0]) as our lengths in units of rho.

  gas_bn='batch' is compared with GLASS as released (discriminator in train
  mode: BatchNorm statistics of [true; fakes] recomputed at every ascent
  step), and the whole step with it: the scores of its two final forwards,
  its loss, the running statistics after its 22 forwards and the gradients
  its optimisers get. 'frozen' (our default) is compared with GLASS held in
  eval mode with running statistics equal to the batch statistics of [true;
  true + noise] at step 0, where the two agree by construction (the fakes,
  radius and shell; its loss, statistics and gradients are ours, not
  GLASS's); the fixture's two runs differ by up to 0.03 (checked below), so
  the test tells them apart.
  """
  f = np.load(_GLASS)
  ref = f'{gas}/' if gas_bn == 'batch' else f'{gas}_eval/'
  params, stats = _glass_head(f)
  syn, rho = _glass_syn(gas, gas_bn)
  got, record = _recorder(monkeypatch)
  record('gradient_ascent')
  record('glass_ascent')
  record('las_onto_shell')
  record('_glass_bce', args=True)
  record('focal_loss', args=True)
  _fixed_noise(monkeypatch, f['noise'], f['noise'])
  _, (metrics, new_stats) = _glass_loss(params, stats, f, syn)

  # The fakes after the 20 steps and 4 projections.
  fakes = np.asarray(got['glass_ascent'][0] if gas_bn == 'batch' else
                     got['gradient_ascent'])
  np.testing.assert_allclose(fakes, f[ref + 'gaus'][-1], rtol=1e-5,
                             atol=1e-5)
  other = f'{gas}_eval/' if gas_bn == 'batch' else f'{gas}/'
  assert np.abs(f[other + 'gaus'][-1] - f[ref + 'gaus'][-1]).max() > 1e-2
  if gas == 'manifold':
    np.testing.assert_allclose(float(metrics['radius']) * rho, 0.5,
                               rtol=1e-6)
  else:  # GLASS's r_t (0.75 quantile, LAS normal patches included).
    np.testing.assert_allclose(float(metrics['radius']) * rho,
                               float(f[ref + 'r_t']), rtol=1e-5)
    # LAS defect features onto the shell [2r, 4r] (GLASS's fake_feats).
    np.testing.assert_allclose(np.asarray(got['las_onto_shell']),
                               f[ref + 'las_in'], rtol=1e-5, atol=1e-5)
  if gas_bn == 'frozen':
    assert 'glass_ascent' not in got and '_glass_bce' not in got
    return
  # GLASS's last forward of the ascent, P(anomalous) of [true; fakes], and
  # its LAS forward, each in train mode with its own batch statistics.
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(-got['_glass_bce'][0])),
                             f[ref + 'final_scores'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(got['focal_loss'][0])),
                             f[ref + 'las_scores'], rtol=1e-5, atol=1e-6)
  # Its logged loss: BCE of [true; fakes] + focal loss of the LAS features.
  np.testing.assert_allclose(float(metrics['loss']), float(f[ref + 'loss']),
                             rtol=2e-6)
  # The running statistics after its 22 train-mode forwards (momentum 0.1).
  bn = new_stats['discriminator']['bn']
  np.testing.assert_allclose(np.asarray(bn['mean']), f[ref + 'running_mean'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(bn['var']), f[ref + 'running_var'],
                             rtol=1e-5, atol=1e-6)
  # The gradients its optimisers get; with 'hypersphere' the fakes' part
  # reaches the projection through the ring projections (its autograd).
  grads = jax.grad(lambda pr: _glass_loss(pr, stats, f, syn)[0])(params)
  for k, v in _as_glass(grads).items():
    np.testing.assert_allclose(np.asarray(v), f[ref + 'grad/' + k],
                               rtol=1e-4, atol=1e-6, err_msg=k)


def test_glass_two_steps_keep_the_epoch_centre(monkeypatch):
  """Two GLASS steps in one epoch with SGD between them (fixture
  'hypersphere_2steps'): GLASS's centre stays the projection of the epoch's
  start, which gas_centre='pass' reproduces (`synthesis.pass_centre` of the
  pass's first state); the per-step centre of 'step' moves with the
  adaptor and misses GLASS's second radius. Checked after the two steps:
  both radii and losses, the second step's fakes, the running statistics
  (44 forwards) and the weights."""
  f = np.load(_GLASS)
  ref = 'hypersphere_2steps/'
  lr = 0.5  # make_fixture.SGD_LR
  for gas_centre in ('pass', 'step'):
    params, stats = _glass_head(f)
    syn, rho = _glass_syn('hypersphere', 'batch', gas_centre=gas_centre)
    raw = jnp.asarray(f['centre'].reshape(4, 4, -1))
    centre = synthesis.pass_centre(params, raw) if gas_centre == 'pass' else raw
    got, record = _recorder(monkeypatch)
    record('glass_ascent')
    _fixed_noise(monkeypatch, f['noise'], f['noise'], f['noise_2'],
                 f['noise_2'])
    radii, losses = [], []
    for batch in ('', '_2'):
      loss_fn = lambda pr, b=batch: _glass_loss(pr, stats, f, syn, b, centre)
      _, (metrics, new_stats) = loss_fn(params)
      grads, _ = jax.grad(loss_fn, has_aux=True)(params)
      params = jax.tree.map(lambda w, g: w - lr * g, params, grads)
      stats = new_stats
      radii.append(float(metrics['radius']) * rho)
      losses.append(float(metrics['loss']))
    if gas_centre == 'step':
      np.testing.assert_allclose(radii[0], f[ref + 'r_t'][0], rtol=1e-5)
      assert abs(radii[1] - f[ref + 'r_t'][1]) > 1e-2
      continue
    np.testing.assert_allclose(radii, f[ref + 'r_t'], rtol=1e-5)
    np.testing.assert_allclose(losses, f[ref + 'loss'], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got['glass_ascent'][0]),
                               f[ref + 'gaus'][-1], rtol=1e-5, atol=1e-5)
    bn = stats['discriminator']['bn']
    np.testing.assert_allclose(np.asarray(bn['mean']), f[ref + 'running_mean'],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn['var']), f[ref + 'running_var'],
                               rtol=1e-5, atol=1e-6)
    for k, v in _as_glass(params).items():
      np.testing.assert_allclose(np.asarray(v), f[ref + 'after/' + k],
                                 rtol=1e-5, atol=1e-6, err_msg=k)


def test_loop_gives_each_pass_the_centre_of_its_first_state():
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  st = _state()
  raw = jax.random.normal(jax.random.PRNGKey(5), (4, 4, 32))
  # Only the two attributes pass_centre reads (no data, no backbone).
  run = object.__new__(loop._CategoryRun)  # pylint: disable=protected-access
  run.centre, run.syn = raw, _syn(gas='hypersphere')
  assert run.pass_centre(st) is raw and not run.centre_moves  # 'step': raw.
  run.syn = _syn(gas='hypersphere', gas_centre='pass')
  assert run.centre_moves  # The stacked loop stacks it again every pass.
  adaptor, _ = train.head_modules(st.params)
  want = adaptor.apply({'params': st.params['adaptor']}, raw.reshape(16, 32))
  np.testing.assert_allclose(
      np.asarray(run.pass_centre(st)),
      np.asarray(want).reshape(4, 4, 32), rtol=1e-6, atol=1e-6)
  run.centre = None  # No GAS 'hypersphere': no centre.
  assert run.pass_centre(st) is None and not run.centre_moves


def test_glass_losses_keep_torch_clamps():
  """gas_bn='batch' losses against GLASS's FocalLoss and torch's BCELoss
  (fixture probes) on logits reaching their clamps: values and gradients.
  The exact losses (our default) are far from them there."""
  f = np.load(_GLASS)
  z, y = jnp.asarray(f['probe/logits']), jnp.asarray(f['probe/labels'])
  focal = lambda v, smooth: synthesis.focal_loss(v, y, 2.0, smooth=smooth)
  glass = synthesis.GLASS_FOCAL_SMOOTH
  np.testing.assert_allclose(float(focal(z, glass)), float(f['probe/focal']),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(focal)(z, glass)),
                             f['probe/focal_grad'], rtol=1e-5, atol=1e-9)
  assert abs(float(focal(z, 0.0)) - float(f['probe/focal'])) > 1.0
  s = jnp.asarray(f['probe/bce_logits'])
  fake = jnp.repeat(jnp.asarray([0.0, 1.0]), s.shape[0] // 2)
  bce = lambda v, fn: fn(v, fake, jnp.ones_like(v))[0]
  glass_bce = synthesis._glass_bce  # pylint: disable=protected-access
  exact_bce = synthesis._weighted_bce  # pylint: disable=protected-access
  np.testing.assert_allclose(float(bce(s, glass_bce)), float(f['probe/bce']),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(bce)(s, glass_bce)),
                             f['probe/bce_grad'], rtol=1e-5, atol=1e-12)
  assert abs(float(bce(s, exact_bce)) - float(f['probe/bce'])) > 1.0
  assert np.abs(np.asarray(jax.grad(bce)(s, exact_bce)) -
                f['probe/bce_grad']).max() > 0.1


def test_gas_bn_is_validated_and_leaves_default_fingerprints():
  from configs import default  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  from simplenet_jax import config_checks  # pylint: disable=g-import-not-at-top
  from simplenet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.synthesis.gas = 'manifold'
  before = category.fingerprint(c)
  assert before == '0xcef7037e'  # As before gas_bn existed.
  c.synthesis.gas_bn = 'batch'
  # 'batch' became GLASS's whole step (running statistics at each forward,
  # two final forwards, torch's clamps, the gradient through the
  # projections): its runs from before (this value was printed by the code
  # then) must not resume.
  assert category.fingerprint(c) not in (before, '0x30c72ce1')
  c.synthesis.gas_bn = 'live'
  with pytest.raises(UserError, match='gas_bn'):
    config_checks.validate(c)
  # synthesis.gas_centre came later: at 'step' (its default) the fingerprint
  # is the one the code before it printed; 'pass' changes it.
  c = default.get_config()
  c.synthesis.gas = 'hypersphere'
  assert category.fingerprint(c) == '0x3967c82e'
  c.synthesis.gas_centre = 'pass'
  assert category.fingerprint(c) != '0x3967c82e'
  config_checks.validate(c)
  c.synthesis.gas = 'manifold'
  with pytest.raises(UserError, match='gas_centre'):
    config_checks.validate(c)


# ---- LAS -------------------------------------------------------------------


def test_las_defects_move_onto_the_outer_shell():
  rng = np.random.default_rng(0)
  centre = rng.normal(size=(6, 5)).astype(np.float32)
  offsets = rng.normal(size=(6, 5)).astype(np.float32)
  offsets *= (np.array([0.5, 3.0, 9.0, 0.5, 3.0, 9.0]) /
              np.linalg.norm(offsets, axis=1))[:, None]
  rows = centre + offsets
  labels = np.array([1, 1, 1, 0, 0, 0], np.float32)
  got = np.asarray(synthesis.las_onto_shell(
      jnp.asarray(rows), jnp.asarray(labels), jnp.asarray(centre), 1.0))
  dist = np.linalg.norm(got - centre, axis=1)
  # Defects at 0.5, 3 and 9 from the centre end at 2, 3 and 4, on their own
  # direction; normal rows stay where they were.
  np.testing.assert_allclose(dist[:3], [2.0, 3.0, 4.0], rtol=1e-5)
  np.testing.assert_allclose(
      (got - centre)[:3] / dist[:3, None],
      offsets[:3] / np.linalg.norm(offsets[:3], axis=1, keepdims=True),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[3:], rows[3:])


def test_las_images_change_only_inside_the_mask():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  textures = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
  key = jax.random.PRNGKey(0)
  out, masks = synthesis.las_images(key, images, textures)
  out, masks = np.asarray(out), np.asarray(masks)
  assert out.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32)
  ref = images.astype(np.float32) / 255.0
  outside = masks == 0
  np.testing.assert_array_equal(np.round(out[outside] * 255), images[outside])
  np.testing.assert_allclose(out[outside], ref[outside], rtol=1e-6)
  for i in range(3):
    inside = masks[i] > 0
    assert inside.sum() > 0
    diff = np.abs(out[i][inside] - ref[i][inside]).mean()
    assert diff > 0.05, diff
  # Blend factor in [0.2, 0.8]: out = beta img + (1 - beta) tex, so inside
  # the mask out lies between image and (jittered) texture values.
  assert out.min() >= 0.0 and out.max() <= 1.0
  again, _ = synthesis.las_images(key, images, textures)
  np.testing.assert_array_equal(np.asarray(again), out)


def test_texture_bank_procedural_and_folder(tmp_path):
  a = synthesis.texture_bank(3, (24, 20), seed=1)
  b = synthesis.texture_bank(3, (24, 20), seed=1)
  assert a.shape == (3, 24, 20, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert a.std() > 10
  # A folder of images (nested, any size): crops at the image size.
  (tmp_path / 'sub').mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate([(40, 60), (50, 50)]):
    PIL.Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)
                        ).save(tmp_path / 'sub' / f't{i}.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  d = synthesis.texture_bank(4, (24, 20), seed=0, texture_dir=str(tmp_path))
  assert d.shape == (4, 24, 20, 3) and d.std() > 10
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert synthesis.texture_files(str(empty)) == []
  assert [os.path.basename(f) for f in synthesis.texture_files(
      str(tmp_path))] == ['t0.png', 't1.png']


class _Images:
  """A training set of random images (the data sets' interface)."""

  def __init__(self, n, hw):
    rng = np.random.default_rng(1)
    self.images = rng.integers(0, 256, (n,) + hw + (3,), dtype=np.uint8)
    self.image_hw = hw

  def __len__(self):
    return len(self.images)

  def load(self, i):
    return {'image': self.images[i], 'mask': np.zeros(self.image_hw, np.uint8),
            'label': 0, 'path': f'{i}.png', 'defect': 'good'}


def test_las_dataset_images_and_labels_agree():
  hw, grid = (32, 24), (4, 3)
  base = _Images(5, hw)
  key = jax.random.PRNGKey(7)
  textures = synthesis.texture_bank(4, hw, seed=0)
  ds = synthesis.LASImages(base, key, textures, recolour=True)
  assert len(ds) == 5 and ds.image_hw == hw
  idx = np.asarray([4, 0, 2])
  labels = synthesis.las_labels(key, idx, hw, grid, chunk=2)
  assert labels.shape == (3, 12)
  for row, i in enumerate(idx):
    ex = ds.load(int(i))
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == hw + (3,)
    m = ex['mask'].astype(bool)
    assert 0 < m.sum() < m.size
    # Unchanged outside the defect, changed inside it.
    np.testing.assert_array_equal(ex['image'][~m], base.images[i][~m])
    assert np.abs(ex['image'][m].astype(int) - base.images[i][m]).mean() > 3
    # A feature cell is a defect iff the mask reaches it (8 x 8 pixels).
    cells = m.reshape(4, 8, 3, 8).any(axis=(1, 3)).reshape(-1)
    np.testing.assert_array_equal(labels[row], cells.astype(np.float32))
    # Image i depends on (key, i) only.
    np.testing.assert_array_equal(ds.load(int(i))['image'], ex['image'])


# ---- Focal loss --------------------------------------------------------------


def test_focal_loss_against_hand_computation():
  logits = np.array([2.0, -1.0, 0.5, -3.0], np.float32)
  labels = np.array([1, 1, 0, 0], np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  pt = np.where(labels == 1, p, 1 - p)
  per_row = -(1 - pt)**2 * np.log(pt)
  got = float(synthesis.focal_loss(jnp.asarray(logits), jnp.asarray(labels),
                                   gamma=2.0))
  np.testing.assert_allclose(got, per_row.mean(), rtol=1e-5)
  # gamma 0 is binary cross-entropy.
  bce = float(synthesis.focal_loss(jnp.asarray(logits), jnp.asarray(labels),
                                   gamma=0.0))
  np.testing.assert_allclose(bce, -np.log(pt).mean(), rtol=1e-5)
  # The hardest half: rows with the largest (p - y)^2 (rows 1 and 2).
  err = (p - labels)**2
  assert set(np.argsort(err)[2:]) == {1, 2}
  hard = float(synthesis.focal_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    gamma=2.0, hard_quantile=0.5))
  np.testing.assert_allclose(hard, per_row[[1, 2]].mean(), rtol=1e-5)
  masked = float(synthesis.focal_loss(jnp.asarray(logits),
                                      jnp.asarray(labels), gamma=2.0,
                                      mask=jnp.asarray([1, 0, 1, 0])))
  np.testing.assert_allclose(masked, per_row[[0, 2]].mean(), rtol=1e-5)


def test_bce_loss_is_glass_bce_on_sigmoid_outputs():
  # GLASS's discriminator ends in a sigmoid giving p = P(anomalous); its
  # loss is BCELoss(p_true, 0) + BCELoss(p_fake, 1). Here the output s is a
  # logit with high = normal, so p = sigmoid(-s).
  s = np.array([2.0, -0.5, 0.3, -4.0, 1.5, 0.0], np.float32)
  fake = np.array([0, 0, 0, 1, 1, 1], np.float32)
  weight = np.array([1, 1, 0, 1, 1, 1], np.float32)  # Row 2 is padding.
  p = 1 / (1 + np.exp(s.astype(np.float64)))
  true_bce = -np.log(1 - p[[0, 1]]).mean()
  fake_bce = -np.log(p[[3, 4, 5]]).mean()
  loss, p_true, p_fake = synthesis._weighted_bce(  # pylint: disable=protected-access
      jnp.asarray(s), jnp.asarray(fake), jnp.asarray(weight))
  np.testing.assert_allclose(float(loss), true_bce + fake_bce, rtol=1e-5)
  # Right side of p = 0.5: normal row 0 (not 1); fake row 3 (5 is at 0.5).
  assert float(p_true) == 0.5 and float(p_fake) == pytest.approx(1 / 3)


# ---- The loss and the step ---------------------------------------------------


def _state(dim=32, hidden=16, std=0.3):
  c = demo_config.get_config()
  c.model.hidden, c.model.heads = hidden, 1
  st = train.create_train_state(jax.random.PRNGKey(0), c.model, c.optim, dim,
                                5, 10)
  return st.replace(noise_std=jnp.float32(std))


@pytest.mark.parametrize('layers', [1, 2])
def test_head_loss_default_equals_released_loss(layers):
  """Without synthesis the loss is the released one, with the released
  noise, or with the noise model.noise_shape='layers' shapes over two
  layers' blocks (the same in both paths: `train.noisy_offsets`)."""
  st = _state()
  # The second layer's block varies a third as much as the first's.
  f = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 32)) * jnp.repeat(
      jnp.array([3.0, 1.0]), 16) + 1.0
  key = jax.random.PRNGKey(2)
  k_noise, _ = jax.random.split(key)
  rows = f.reshape(-1, 32)
  noise = model_lib.sample_noise(k_noise, (32, 32), st.noise_std)
  if layers > 1:
    noise = model_lib.layer_noise(noise, rows,
                                  st.params['adaptor']['fc']['kernel'], layers)
  ref, (ref_m, ref_bs, _) = train.loss_fn(st.params, st.batch_stats,
                                          rows, noise, 0.5)
  got, (m, bs) = synthesis.head_loss(st.params, st.batch_stats, f, key,
                                     st.noise_std, 0.5,
                                     _syn(), noise_layers=layers)
  if layers > 1:  # The shaped noise makes another loss.
    iso, _ = synthesis.head_loss(st.params, st.batch_stats, f, key,
                                 st.noise_std, 0.5, _syn())
    assert abs(float(iso) - float(got)) > 1e-4
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  for k in ('p_true', 'p_fake'):
    np.testing.assert_allclose(float(m[k]), float(ref_m[k]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), bs, ref_bs)


@pytest.mark.parametrize('syn', [
    _syn(gas='manifold', gas_steps=4, gas_every=2),
    _syn(gas='hypersphere', gas_steps=4, gas_every=2,
                              las_weight=1.0),
    _syn(gas='hypersphere', gas_steps=4, gas_every=2, las_weight=1.0,
         las_shell=False),
    _syn(perlin=True),
    _syn(las_weight=0.5),
    _syn(gas='hypersphere', gas_steps=4, gas_every=2, las_weight=1.0,
         loss='bce'),
    # GLASS's step; 5 = 2 x 2 + 1: a last projection after the loop.
    _syn(gas='hypersphere', gas_steps=5, gas_every=2, las_weight=1.0,
         loss='bce', gas_bn='batch', gas_centre='pass'),
    _syn(gas='manifold', gas_steps=4, gas_every=2, gas_bn='batch'),
])
def test_train_step_variants(syn):
  st = _state()
  f = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 32)) + 1.0
  las = f + jax.random.normal(jax.random.PRNGKey(3), f.shape)
  lab = (jax.random.uniform(jax.random.PRNGKey(4), (2, 4, 4)) > 0.7)
  new, m = synthesis.train_step(st, f, jax.random.PRNGKey(2), syn,
                                centre=f.mean(0), las_features=las,
                                las_labels=lab.astype(jnp.float32))
  assert int(new.step) == 1
  assert all(np.isfinite(float(v)) for v in m.values()), m
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params,
                         st.params)
  assert max(jax.tree.leaves(changed)) > 0
  if syn.las:
    assert 'focal' in m and 'p_las' in m
  # A padded image (mask 0) changes nothing about the others' loss.
  f3 = jnp.concatenate([f, 100 + f[:1]])
  kw = dict(centre=f.mean(0))
  if syn.las:
    kw.update(las_features=jnp.concatenate([las, las[:1]]),
              las_labels=jnp.concatenate([lab, lab[:1]]).astype(jnp.float32))
  _, m3 = synthesis.train_step(st, f3, jax.random.PRNGKey(2), syn,
                               mask=jnp.asarray([1.0, 1.0, 0.0]), **kw)
  np.testing.assert_allclose(float(m3['loss']), float(m['loss']), rtol=1e-4)


def test_cached_step_gives_a_flipped_view_its_images_las_images():
  """train.augment='flips': cache row r is view r // N of image r % N, and
  LAS images are made per image (K, N, ...), so a row of another view takes
  the LAS images of its image. Rows N + 1 and 3N + 3 of a cache whose views
  are copies of the images step exactly as rows 1 and 3."""
  from simplenet_jax import parallel  # pylint: disable=g-import-not-at-top
  n, h, w, d = 5, 4, 4, 32
  syn = _syn(gas='hypersphere', gas_steps=4, gas_every=2, las_weight=1.0)
  images = jax.random.normal(jax.random.PRNGKey(1), (n, h * w, d)) + 1.0
  cache = jnp.concatenate([images] * 4)
  las = (images[None] + jax.random.normal(jax.random.PRNGKey(3),
                                          (2, n, h * w, d)))
  labels = (jax.random.uniform(jax.random.PRNGKey(4), (2, n, h * w))
            > 0.7).astype(jnp.float32)
  step = synthesis.make_cached_step(parallel.make_mesh(jax.devices()[:1]),
                                    (h, w), syn)
  centre = images.mean(0).reshape(h, w, d)
  out = []
  for idx in ([1, 3], [n + 1, 3 * n + 3]):
    new, m = step(_state(), cache, jnp.asarray(idx), jax.random.PRNGKey(2),
                  centre, las, labels)
    out.append((jax.tree.leaves(new.params), float(m['loss'])))
  assert out[0][1] == out[1][1]
  for a, b in zip(out[0][0], out[1][0]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('gas_centre', ['step', 'pass'])
def test_heads_take_gas_steps_as_if_alone(gas_centre):
  """model.heads=2 under GAS hypersphere + LAS: each head's step equals a
  one-head step with its own key (split(key, 2)[k]) and, with
  gas_centre='pass', the centre adapted by its own adaptor."""
  c = demo_config.get_config()
  c.model.hidden, c.model.heads = 16, 2
  st = train.create_train_state(jax.random.PRNGKey(0), c.model, c.optim, 32,
                                5, 10)
  st = st.replace(noise_std=jnp.asarray([0.3, 0.5], jnp.float32))
  syn = _syn(gas='hypersphere', gas_steps=4, gas_every=2, las_weight=1.0,
             gas_centre=gas_centre)
  f = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 32)) + 1.0
  las = f + jax.random.normal(jax.random.PRNGKey(3), f.shape)
  lab = (jax.random.uniform(jax.random.PRNGKey(4), (2, 4, 4)) > 0.7).astype(
      jnp.float32)
  raw = f.mean(0)
  centre = synthesis.pass_centre(st.params, raw) if gas_centre == 'pass' else raw
  assert centre.shape == ((2, 4, 4, 32) if gas_centre == 'pass' else (4, 4, 32))
  key = jax.random.PRNGKey(2)
  new, m = synthesis.train_step(st, f, key, syn, centre=centre,
                                las_features=las, las_labels=lab)
  losses = []
  for k, head_key in enumerate(jax.random.split(key, 2)):
    one = train.unstack_state(st, k)
    one_centre = (synthesis.pass_centre(one.params, raw)
                  if gas_centre == 'pass' else raw)
    want, mk = synthesis.train_step(one, f, head_key, syn, centre=one_centre,
                                    las_features=las, las_labels=lab)
    losses.append(float(mk['loss']))
    got = train.unstack_state(new, k)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-5)
  assert float(m['loss']) == pytest.approx(np.mean(losses), rel=1e-5)


# ---- Through main.py ---------------------------------------------------------


def _final_tree(category_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(str(category_dir / 'checkpoints'),
                                  item_names=('state', 'meta'))
  try:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()


@pytest.mark.parametrize('glass', [False, True], ids=['frozen', 'glass'])
def test_main_trains_with_gas_and_las_and_resumes_identically(
    tmp_path, lite0_weights_dir, awkward_root, jax_cache_dir, glass):
  """main.py with spread noise, GAS (hypersphere) and LAS: the passes log
  the synthesis metrics, the table is finite, and a run killed after pass 1
  rebuilds the same LAS cache and centre and ends bit-identical. With
  `glass`, GLASS's step and its centre adapted once per pass (from the
  pass's first state: a centre taken once at the start, or from the
  restored state, would end elsewhere after the resume)."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  root, _ = awkward_root
  env = conftest.main_env(jax_cache_dir)
  extra = ('--config.model.noise_mode=spread', '--config.model.noise_rel=0.4',
           '--config.synthesis.gas=hypersphere',
           '--config.synthesis.gas_steps=4', '--config.synthesis.gas_every=2',
           '--config.synthesis.las_weight=1.0',
           '--config.synthesis.las_variants=2',
           '--config.train.checkpoint_every=1',
           '--config.train.keep_checkpoints=4')
  if glass:
    extra += ('--config.synthesis.gas_bn=batch',
              '--config.synthesis.gas_centre=pass',
              '--config.synthesis.loss=bce')
  first = tmp_path / 'first'
  args = conftest.tiny_args(first, lite0_weights_dir, root, passes=3,
                            extra=extra)
  proc = conftest.run_main(args + ['--mode=train'], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cat = conftest.CATEGORY
  log = [json.loads(l) for l in (first / cat / 'log.jsonl').read_text()
         .splitlines()]
  assert [r['pass'] for r in log] == [1, 2, 3]
  for r in log:
    assert {'loss', 'p_true', 'p_fake', 'focal', 'p_las', 'radius'} <= set(r)
    assert r['radius'] > 0 and 0 <= r['p_las'] <= 1
  info = (first / 'logs' / 'simplenet.INFO').read_text()
  assert '2 LAS images per training image' in info
  rows = json.loads((first / 'results.json').read_text())['rows']
  assert all(np.isfinite(rows[0][k]) for k in ('image_auroc', 'pixel_auroc'))

  second = tmp_path / 'second'
  shutil.copytree(first, second, ignore=shutil.ignore_patterns('logs'))
  for step_dir in (second / cat / 'checkpoints').iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 1:
      shutil.rmtree(step_dir)
  args2 = conftest.tiny_args(second, lite0_weights_dir, root, passes=3,
                             extra=extra)
  proc = conftest.run_main(args2 + ['--mode=train'], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'{cat}: continuing from pass 1 ' in (
      second / 'logs' / 'simplenet.INFO').read_text()
  (s1, a), (s2, b) = _final_tree(first / cat), _final_tree(second / cat)
  assert s1 == s2 == 3
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['batch_stats'],
               b['batch_stats'])


def test_checkpoints_remember_the_switches():
  """The fingerprint a checkpoint must match (category.fingerprint) changes
  with any synthesis key when a switch is on, and not at all while every
  switch is off, so checkpoints of the released head stay compatible."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  released = default.get_config()
  base = category.fingerprint(released)
  released.synthesis.gas_steps = 7  # Off: no effect on training.
  assert category.fingerprint(released) == base
  on = default.get_config()
  on.synthesis.gas = 'manifold'
  other = default.get_config()
  other.synthesis.gas = 'hypersphere'
  prints = {category.fingerprint(c) for c in (on, other)}
  on.synthesis.gas_steps = 7
  prints.add(category.fingerprint(on))
  assert len(prints) == 3 and base not in prints
  # synthesis.loss came later: at its default the fingerprints are the ones
  # the code before it gave (values printed by that code), so demo runs
  # started then still resume; 'bce' changes them.
  # The demo config's head as it was then (one head of 256 hidden units;
  # now three of 1024).
  from configs import demo  # pylint: disable=g-import-not-at-top
  then = demo.get_config()
  then.model.hidden, then.model.heads = 256, 1
  then.model.shrink_on_saturation = 0.0
  then.model.stop_on_saturation = False  # True since the fifty-fourth.
  then.train.augment = 'none'  # 'auto' since the thirty-first round.
  then.train.neighbour_mix = 0.0  # On with the flips since the thirty-sixth.
  assert category.fingerprint(then) == '0xcafcc261'
  then.train.augment = 'flips'  # Another training set: not resumed.
  assert category.fingerprint(then) != '0xcafcc261'
  manifold = default.get_config()
  manifold.synthesis.gas = 'manifold'
  assert category.fingerprint(manifold) == '0xcef7037e'
  manifold.synthesis.loss = 'bce'
  assert category.fingerprint(manifold) not in prints | {'0xcef7037e'}
  # hypersphere + LAS trains differently now (GLASS's radius and shell):
  # its runs from before must not resume.
  glass_like = default.get_config()
  glass_like.synthesis.gas = 'hypersphere'
  glass_like.synthesis.las_weight = 1.0
  before = '0xa9411d9f'  # Printed by the code before las_shell existed.
  shell = category.fingerprint(glass_like)
  glass_like.synthesis.las_shell = False
  assert len({before, shell, category.fingerprint(glass_like)}) == 3
  # Perlin-masked noise masks both copies of the batch now: runs from before
  # (this value was printed by the code then) must not resume.
  perlin = default.get_config()
  perlin.synthesis.perlin = True
  assert category.fingerprint(perlin) not in ('0xda949b63', base)


@pytest.mark.parametrize('disc_layers', [2, 3])
def test_frozen_ascent_scores_are_the_batch_statistics_scores(disc_layers):
  """GAS's default ascent (gas_bn='frozen') scores a row with every
  BatchNorm of the discriminator fixed to the statistics of [true; fake]:
  on those rows themselves its scores are the train-mode forward's, for the
  released head and for a deeper one (model.disc_layers=3), where the
  second block's statistics are those of the first block's output."""
  n, d, hidden = 10, 6, 5
  params, stats = train._init_head(jax.random.key(1), d, hidden, 1,
                                   disc_layers)
  disc = model_lib.Discriminator(hidden, disc_layers)
  k1, k2 = jax.random.split(jax.random.key(2))
  true = jax.random.normal(k1, (n, d)) * 2 + 1
  fake = true + jax.random.normal(k2, (n, d))
  fc = params['discriminator']['fc']
  hidden_of = lambda x: x @ fc['kernel'] + fc['bias']
  mask = jnp.ones((n,), jnp.float32)
  score = synthesis._frozen_score_fn(disc, params['discriminator'],
                                     hidden_of(true), hidden_of(fake), mask)
  want, _ = disc.apply({'params': params['discriminator'],
                        'batch_stats': stats['discriminator']},
                       jnp.concatenate([true, fake]), train=True,
                       mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(score(fake)), np.asarray(want[n:]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(score(true)), np.asarray(want[:n]),
                             rtol=1e-5, atol=1e-5)


def test_shrink_on_saturation_off_leaves_fingerprints():
  """model.shrink_on_saturation came later: at 0 (off) the fingerprints are
  those the code before it printed, so older runs resume; on, it changes
  them (a run that may start over is another run)."""
  from configs import default, folder  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  assert c.model.shrink_on_saturation == 0
  assert category.fingerprint(c) == '0x8e95376f'
  f = folder.get_config()
  f.model.shrink_on_saturation = 0.0
  f.model.stop_on_saturation = False  # And before the stop (fifty-fourth).
  f.model.heads = 1  # As the folder config was before three heads.
  f.train.augment = 'none'  # And before 'auto' (thirty-first round).
  f.train.neighbour_mix = 0.0  # And before the mix (thirty-sixth round).
  assert category.fingerprint(f) == '0x54e60c84'
  # train.neighbour_mix_when: 'flips' trains other categories than
  # 'always' does, so it is another run; 'always' (the default) leaves the
  # fingerprints of runs from before it.
  f.train.neighbour_mix, f.train.neighbour_mix_when = 1.0, 'always'
  always = category.fingerprint(f)
  f.train.neighbour_mix_when = 'flips'
  assert category.fingerprint(f) not in (always, '0x54e60c84')
  c.model.shrink_on_saturation = 0.25
  assert category.fingerprint(c) != '0x8e95376f'


def test_stop_on_saturation_off_leaves_fingerprints():
  """model.stop_on_saturation came later still: off, the fingerprint is
  the one printed before it; on, another (its run ends elsewhere)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  assert c.model.stop_on_saturation is False
  assert category.fingerprint(c) == '0x8e95376f'
  c.model.stop_on_saturation = True
  assert category.fingerprint(c) != '0x8e95376f'

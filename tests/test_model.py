"""Head modules: torch-faithful BatchNorm, init, noise and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from simplenet_jax import model


def _bn_vars(x, key=0):
  return model.TorchBatchNorm().init(jax.random.key(key), x, train=False)


def test_batchnorm_constants_are_torchs():
  # The released discriminator's torch.nn.BatchNorm1d(hidden): torch's
  # defaults, momentum 0.1 and eps 1e-5.
  assert model.TorchBatchNorm.momentum == 0.1
  assert model.TorchBatchNorm.epsilon == 1e-5
  # The discriminator's own BatchNorm uses them: one train step from the
  # initial statistics (mean 0, var 1) moves them 0.1 of the way.
  x = np.random.default_rng(4).normal(1.0, 2.0, size=(7, 3)).astype(np.float32)
  disc = model.Discriminator(4)
  v = disc.init(jax.random.key(0), x, train=False)
  _, upd = disc.apply(v, x, train=True, mutable=['batch_stats'])
  fc = v['params']['fc']
  h = x.astype(np.float64) @ fc['kernel'] + fc['bias']
  np.testing.assert_allclose(upd['batch_stats']['bn']['mean'],
                             0.1 * h.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(upd['batch_stats']['bn']['var'],
                             0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)


def test_batchnorm_matches_torch_train_and_eval():
  torch = helpers.require_torch()
  rng = np.random.default_rng(0)
  batches = [rng.normal(2.0, 3.0, size=(n, 5)).astype(np.float32)
             for n in (6, 9)]
  ref = torch.nn.BatchNorm1d(5)  # The released discriminator's BatchNorm.
  assert (ref.momentum, ref.eps) == (model.TorchBatchNorm.momentum,
                                     model.TorchBatchNorm.epsilon)
  with torch.no_grad():
    ref.weight.copy_(torch.linspace(0.5, 1.5, 5))
    ref.bias.copy_(torch.linspace(-1, 1, 5))
  bn = model.TorchBatchNorm()
  variables = _bn_vars(batches[0])
  variables = {'params': {'scale': jnp.linspace(0.5, 1.5, 5),
                          'bias': jnp.linspace(-1, 1, 5)},
               'batch_stats': variables['batch_stats']}
  ref.train()
  for x in batches:
    want = ref(torch.from_numpy(x)).detach().numpy()
    got, upd = bn.apply(variables, x, train=True, mutable=['batch_stats'])
    variables = {'params': variables['params'], **upd}
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  stats = variables['batch_stats']
  np.testing.assert_allclose(stats['mean'], ref.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(stats['var'], ref.running_var.numpy(), rtol=1e-6)
  ref.eval()
  x = rng.normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(bn.apply(variables, x, train=False)),
      ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_batchnorm_mask_equals_dropping_rows():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 3)).astype(np.float32)
  padded = np.concatenate([x, np.full((3, 3), 1e3, np.float32)])
  mask = np.array([1] * 7 + [0] * 3, np.float32)
  bn = model.TorchBatchNorm()
  v = _bn_vars(x)
  want, want_upd = bn.apply(v, x, train=True, mutable=['batch_stats'])
  got, got_upd = bn.apply(v, padded, train=True, mask=mask,
                          mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(got[:7]), np.asarray(want), atol=1e-6)
  for k in ('mean', 'var'):
    np.testing.assert_allclose(got_upd['batch_stats'][k],
                               want_upd['batch_stats'][k], rtol=1e-6)


def test_init_matches_released_torch_init():
  d, hidden = 256, 128
  x = jnp.zeros((2, d))
  a = model.Adaptor(d).init(jax.random.key(0), x)['params']['fc']
  v = model.Discriminator(hidden).init(jax.random.key(1), x, train=False)
  p, stats = v['params'], v['batch_stats']
  for kernel, fan_in, fan_out in ((a['kernel'], d, d),
                                  (p['fc']['kernel'], d, hidden),
                                  (p['tail']['kernel'], hidden, 1)):
    std = np.sqrt(2.0 / (fan_in + fan_out))
    assert kernel.shape == (fan_in, fan_out)
    assert abs(float(kernel.std()) / std - 1) < 0.05 + 2 / np.sqrt(kernel.size)
  # Xavier-normal is untruncated: a 2-sigma-truncated init would fail this.
  assert float(jnp.abs(a['kernel']).max()) > 3.5 * np.sqrt(1.0 / d)
  for bias, fan_in in ((a['bias'], d), (p['fc']['bias'], d)):
    bound = 1 / np.sqrt(fan_in)
    assert float(jnp.abs(bias).max()) <= bound
    assert float(jnp.abs(bias).max()) > 0.9 * bound
  assert set(p['tail']) == {'kernel'}  # No bias.
  np.testing.assert_array_equal(p['bn']['scale'], np.ones(hidden))
  np.testing.assert_array_equal(p['bn']['bias'], np.zeros(hidden))
  np.testing.assert_array_equal(stats['bn']['mean'], np.zeros(hidden))
  np.testing.assert_array_equal(stats['bn']['var'], np.ones(hidden))


def test_discriminator_layout_and_eval_mode():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  disc = model.Discriminator(4)
  v = disc.init(jax.random.key(0), x, train=False)
  s = disc.apply(v, x, train=False)
  assert s.shape == (6,)
  # Eval mode: a row's score does not depend on the rest of the batch.
  np.testing.assert_allclose(np.asarray(disc.apply(v, x[:2], train=False)),
                             np.asarray(s[:2]), rtol=1e-6)
  # Reference forward with the documented layer order.
  p = v['params']
  h = x @ p['fc']['kernel'] + p['fc']['bias']
  h = h / np.sqrt(1 + 1e-5)  # Running stats 0 / 1, scale 1, bias 0.
  h = np.where(h >= 0, h, 0.2 * h)
  np.testing.assert_allclose(np.asarray(s), h @ p['tail']['kernel'][:, 0],
                             rtol=1e-5, atol=1e-6)


def test_truncated_l1_loss_values():
  true = jnp.array([1.0, 0.2, 0.5, -1.0])
  fake = jnp.array([-1.0, 0.1, -0.5, 2.0])
  loss, p_true, p_fake = model.truncated_l1_loss(true, fake, 0.5)
  # true: max(0, .5 - t) = [0, .3, 0, 1.5];
  # fake: max(0, f + .5) = [0, .6, 0, 2.5].
  np.testing.assert_allclose(float(loss), 1.8 / 4 + 3.1 / 4, rtol=1e-6)
  assert float(p_true) == 0.5  # 1.0 and 0.5 (>= m).
  assert float(p_fake) == 0.25  # Only -1.0 (-0.5 is not < -m).
  mask = jnp.array([1.0, 1.0, 0.0, 0.0])
  loss, p_true, p_fake = model.truncated_l1_loss(true, fake, 0.5, mask)
  np.testing.assert_allclose(float(loss), 0.3 / 2 + 0.6 / 2, rtol=1e-6)
  assert float(p_true) == 0.5 and float(p_fake) == 0.5


def test_noise_std_and_row_independence():
  key = jax.random.key(3)
  z = np.asarray(model.sample_noise(key, (64, 2048), 0.015))
  assert abs(z.std() / 0.015 - 1) < 0.01
  assert abs(z.mean()) < 1e-3 * 0.015 * 10
  short = np.asarray(model.sample_noise(key, (5, 2048), 0.015))
  np.testing.assert_array_equal(z[:5], short)
  other = np.asarray(model.sample_noise(jax.random.key(4), (5, 2048), 0.015))
  assert not np.allclose(short, other)


def test_mix_noise_levels():
  std, k = 0.02, 3
  z = np.asarray(model.sample_noise(jax.random.key(5), (200, 4096), std, k))
  ratios = z.std(axis=1) / std
  levels = 1.1 ** np.arange(k)
  nearest = np.abs(ratios[:, None] - levels[None]).argmin(1)
  means = np.array([ratios[nearest == i].mean() for i in range(k)])
  np.testing.assert_allclose(means, levels, atol=0.01)
  assert ratios.min() > 0.93 and ratios.max() < 1.29
  counts = np.bincount(nearest, minlength=k)
  assert counts.min() > 40, counts  # Each level drawn about 1/k of the time.


@pytest.mark.parametrize('mix', [1, 2])
def test_noise_is_deterministic(mix):
  a = model.sample_noise(jax.random.key(7), (4, 16), 0.1, mix)
  b = model.sample_noise(jax.random.key(7), (4, 16), 0.1, mix)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _two_layer_features(n=4000, d=8, seed=0):
  """(n, d) rows whose first block varies 4x as much as the second."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[:, :d // 2] = 4.0 * x[:, :d // 2] + 3.0  # Offsets must not count.
  x[:, d // 2:] = x[:, d // 2:] - 1.0
  return x


def test_layer_noise_follows_each_layers_spread_at_the_same_size():
  """model.noise_shape='layers': each layer's block of the noise in
  proportion to that block's centred spread over the batch, the expected
  squared norm kept at D std^2, carried through the adaptor's matrix."""
  n, d, std = 4000, 8, 0.5
  x = _two_layer_features(n, d)
  spreads = [np.sqrt(x[:, :d // 2].var(0).mean()),
             np.sqrt(x[:, d // 2:].var(0).mean())]
  assert 3.8 < spreads[0] / spreads[1] < 4.2  # The data as built.
  z = model.sample_noise(jax.random.key(0), (n, d), std)
  out = np.asarray(model.layer_noise(z, jnp.asarray(x), jnp.eye(d), 2))
  # Identity matrix: each block is the noise times one factor per block.
  ratio = out / np.asarray(z)
  np.testing.assert_allclose(ratio[:, :d // 2], ratio[0, 0], rtol=1e-5)
  np.testing.assert_allclose(ratio[:, d // 2:], ratio[0, -1], rtol=1e-5)
  np.testing.assert_allclose(ratio[0, 0] / ratio[0, -1],
                             spreads[0] / spreads[1], rtol=1e-4)
  # Same total size: mean squared norm D std^2 (a 4000-row sample).
  assert abs(np.mean(np.sum(out**2, 1)) / (d * std**2) - 1) < 0.03
  # One layer: isotropic again, the noise unchanged.
  one = np.asarray(model.layer_noise(z, jnp.asarray(x[:, d // 2:].repeat(
      2, axis=1)), jnp.eye(d), 1))
  np.testing.assert_allclose(one, np.asarray(z), rtol=1e-5)
  # Through a matrix: the shaped noise, then the matrix, rescaled so that
  # the expected squared norm stays D std^2.
  q = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))[0]
  k = (q * np.array([2.0, 1, 1, 1, 0.5, 1, 1, 1])).astype(np.float32)
  got = np.asarray(model.layer_noise(z, jnp.asarray(x), jnp.asarray(k), 2))
  back = got @ np.linalg.inv(k) / np.asarray(z)  # The factors before it.
  np.testing.assert_allclose(back[:, :d // 2], back[0, 0], rtol=2e-3)
  np.testing.assert_allclose(back[:, d // 2:], back[0, -1], rtol=2e-3)
  np.testing.assert_allclose(back[0, 0] / back[0, -1],
                             spreads[0] / spreads[1], rtol=2e-3)
  assert abs(np.mean(np.sum(got**2, 1)) / (d * std**2) - 1) < 0.05


def test_layer_noise_ignores_padding_rows():
  n, d = 64, 8
  x = _two_layer_features(n, d, seed=2)
  z = model.sample_noise(jax.random.key(1), (n + 5, d), 0.1)
  padded = np.concatenate([x, np.full((5, d), 1e3, np.float32)])
  mask = np.r_[np.ones(n), np.zeros(5)].astype(np.float32)
  got = model.layer_noise(z, jnp.asarray(padded), jnp.eye(d), 2,
                          jnp.asarray(mask))
  want = model.layer_noise(z[:n], jnp.asarray(x), jnp.eye(d), 2)
  np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(want),
                             rtol=1e-5)

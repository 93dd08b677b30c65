"""train.augment='auto' (simplenet_jax/view_check.py): the scores the
decision reads, the decision on data whose flips are normal and on data
whose flips are not, and what the resolved config trains with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from simplenet_jax import config_checks
from simplenet_jax import feature_cache
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import view_check


def _brute_scores(f):
  """(V, n, P, D) -> (V, n): numpy, every position."""
  v, n, p, _ = f.shape
  out = np.zeros((v, n))
  for i in range(n):
    bank = np.concatenate([f[0, j] for j in range(n) if j != i])
    for a in range(v):
      d = np.sqrt(((f[a, i][:, None] - bank[None]) ** 2).sum(-1))
      out[a, i] = d.min(1).mean()
  return out


def test_image_scores_leave_the_image_out():
  f = np.random.default_rng(0).normal(size=(4, 5, 12, 6)).astype(np.float32)
  got = view_check.image_scores(jnp.asarray(f), jax.random.PRNGKey(0))
  np.testing.assert_allclose(got, _brute_scores(f), rtol=1e-5)
  assert got[0].min() > 0.1  # Its own features would give 0.


def test_image_scores_sample_the_same_positions_in_every_view(monkeypatch):
  monkeypatch.setattr(view_check, 'POSITIONS', 3)
  f = np.random.default_rng(1).normal(size=(1, 4, 40, 5)).astype(np.float32)
  same = np.repeat(f, 3, 0)  # Three identical views.
  got = view_check.image_scores(jnp.asarray(same), jax.random.PRNGKey(2))
  np.testing.assert_allclose(got[1:], got[:1].repeat(2, 0), rtol=1e-6)
  # A mean over 3 of the 40 positions: not the mean over all of them.
  full = _brute_scores(f)[0]
  assert not np.allclose(got[0], full, rtol=1e-3)


class _Motifs:
  """n grey 32x32 images with 40 bright pixels each, every one with a dark
  pixel at its right (`sided`: lit from the left, as a side-lit surface's
  bumps are) or at both sides (looks the same mirrored)."""

  def __init__(self, n: int, sided: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(128, 4, (n, 32, 32)).clip(0, 255)
    for img in x:
      for y, c in zip(rng.integers(1, 31, 40), rng.integers(1, 30, 40)):
        img[y, c] = 255
        img[y, c + 1] = 0
        if not sided:
          img[y, c - 1] = 0
    self.x = np.repeat(x.astype(np.uint8)[..., None], 3, -1)
    self.image_hw = (32, 32)

  def __len__(self):
    return len(self.x)

  def load(self, i):
    return dict(image=self.x[i], mask=np.zeros(self.image_hw, np.uint8),
                label=0, path=str(i), defect='good')


def _patches(variables, images):
  """(B, 32, 32, 3) uint8 -> (B, 32, 32, 9): each pixel's 3x3 grey
  neighbourhood, a local feature that sees which side a shadow is on."""
  del variables
  g = jnp.pad(images[..., 0].astype(jnp.float32), ((0, 0), (1, 1), (1, 1)),
              mode='edge')
  return jnp.stack([g[:, i:i + 32, j:j + 32] for i in range(3)
                    for j in range(3)], -1)


@pytest.mark.parametrize('sided', [False, True])
def test_flips_are_trained_on_only_where_they_look_normal(sided):
  cfg = config_checks.validate(get_config())
  cfg.train.augment, cfg.train.num_passes = 'auto', 40
  data = _Motifs(10, sided)
  idx = np.arange(10)
  verdict = view_check.check_flips(
      jax.jit(_patches), {}, data, idx, cfg, parallel.make_mesh(
          jax.devices()[:1]), jax.random.PRNGKey(0), (32, 32), 9)
  assert verdict.own.shape == (10,) and verdict.flips.shape == (3, 10)
  medians = np.median(verdict.flips, 1)
  if sided:
    # The up-down flip keeps every shadow at its bump's right: normal; the
    # left-right and double flips move it to the left: not.
    assert medians[1] <= verdict.own.max() < min(medians[0], medians[2])
    assert not verdict.normal
  else:
    assert medians.max() <= verdict.own.max() and verdict.normal
  resolved = view_check.resolve(cfg, 'motifs', verdict)
  # Sided: the up-down flip alone, half the passes (2x the rows).
  want = ('flip_ud', 20) if sided else ('flips', 10)
  assert (resolved.train.augment, resolved.train.num_passes) == want
  assert len(feature_cache.views(resolved.train)) == (2 if sided else 4)
  assert cfg.train.augment == 'auto'  # The given config is left as it was.


def test_more_images_than_the_cap_are_drawn_by_the_key(monkeypatch):
  monkeypatch.setattr(view_check, 'MAX_IMAGES', 4)
  cfg = config_checks.validate(get_config())
  data = _Motifs(9, sided=False)
  mesh = parallel.make_mesh(jax.devices()[:1])
  fn = jax.jit(_patches)
  runs = [view_check.check_flips(fn, {}, data, np.arange(9), cfg, mesh,
                                 jax.random.PRNGKey(k), (32, 32), 9)
          for k in (0, 0, 1)]
  assert runs[0].own.shape == (4,)
  np.testing.assert_array_equal(runs[0].own, runs[1].own)
  assert not np.array_equal(runs[0].own, runs[2].own)


def test_the_check_built_a_view_at_a_time_scores_as_all_views_at_once():
  """check_flips holds one view at a time (memory at MVTec AD's sizes);
  its scores are those of the four views built together, at the same
  sampled positions (32x32 grid: 64 of 1024)."""
  cfg = config_checks.validate(get_config())
  data = _Motifs(6, sided=True)
  mesh = parallel.make_mesh(jax.devices()[:1])
  fn = jax.jit(_patches)
  key = jax.random.PRNGKey(3)
  verdict = view_check.check_flips(fn, {}, data, np.arange(6), cfg, mesh,
                                   key, (32, 32), 9)
  views = tuple(feature_cache.View(flip=a) for a in scoring.FLIP_AXES)
  every = feature_cache.build(fn, {}, data, np.arange(6), 4, cfg.train,
                              cfg.dataset, mesh, grid_hw=(32, 32), dim=9,
                              image_views=views).reshape(4, 6, 1024, 9)
  want = view_check.image_scores(every, jax.random.split(key)[1])
  np.testing.assert_allclose(verdict.own, want[0], rtol=1e-6)
  np.testing.assert_allclose(verdict.flips, want[1:], rtol=1e-6)


def test_one_training_image_trains_alone(capsys):
  cfg = config_checks.validate(get_config())
  cfg.train.augment = 'auto'
  resolved = view_check.resolve(cfg, 'solo', None)
  assert resolved.train.augment == 'none'
  assert resolved.train.num_passes == cfg.train.num_passes
  assert 'fewer than two training images' in capsys.readouterr().out


@pytest.mark.parametrize('augment', ['flips', 'flip_lr', 'none'])
def test_a_trained_category_takes_the_decision_its_checkpoints_record(
    augment, capsys):
  cfg = config_checks.validate(get_config())
  cfg.train.augment, cfg.train.num_passes = 'auto', 40
  why = 'median nearest-neighbour distance ... (20 images)'
  resolved = view_check.resolve_as_trained(
      cfg, 'tiles', {'augment': augment, 'augment_why': why})
  assert (resolved.train.augment, resolved.train.num_passes) == (
      augment, {'flips': 10, 'flip_lr': 20, 'none': 40}[augment])
  said = capsys.readouterr().out
  assert 'tiles: train.augment=auto, as its checkpoints were trained: ' in said
  assert why in said


def test_a_category_config_never_reaches_the_views_unresolved():
  cfg = get_config()
  cfg.train.augment = 'auto'
  with pytest.raises(ValueError, match='view_check.resolve'):
    feature_cache.views(cfg.train)


def test_a_flip_is_normal_within_the_images_own_range():
  """Within the range, not under a typical image: normal photos differ
  among themselves, and a flip as unusual as the most unusual of them is
  still one of them."""
  own = np.array([1.0, 2.0, 10.0])
  within = view_check.Verdict(own=own, flips=np.array([[4, 5, 6.0]] * 3))
  assert within.normal and 'within' in within.describe()
  assert within.augment == 'flips'
  one_beyond = within.flips.copy()
  one_beyond[2] = [9, 11, 12.0]  # The double flip's median: 11 > 10.
  one_beyond[1] = [3, 4, 5.0]  # Up-down: 4, the most normal of the others.
  beyond = view_check.Verdict(own=own, flips=one_beyond)
  assert not beyond.normal
  assert beyond.augment == 'flip_ud'
  assert 'left-right and up-down within, the other beyond' in (
      beyond.describe())
  half_turn = view_check.Verdict(own=own, flips=np.array(
      [[11, 12, 13.0], [11, 12, 13.0], [1, 2, 3.0]]))
  assert half_turn.augment == 'rot180'
  assert 'both within, the others beyond' in half_turn.describe()
  none = view_check.Verdict(own=own, flips=np.full((3, 3), 11.0))
  assert none.augment == 'none' and 'beyond the training' in none.describe()

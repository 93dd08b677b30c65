"""Nearest-neighbour (PatchCore-style) scoring on the aggregated local features.

Roth et al., *Towards Total Recall in Industrial Anomaly Detection*, CVPR
2022: the memory bank is the training set's local features (N, D), reduced
by an approximate greedy coreset (`greedy_coreset`: the selection rule of
PatchCore's released ApproximateGreedyCoresetSampler); a test patch's score
is the Euclidean distance to its nearest bank row, an image's score the
maximum over its patches (`scoring.image_scores`), the anomaly map the usual
upsampled and blurred patch scores (`scoring.anomaly_maps`). No training,
no noise: the baseline that a SimpleNet-family head has to match on the same
features.

Everything runs on the device, jitted, in fixed-size chunks, so a large bank
and many queries never build the full (M, N) distance matrix.
"""

import functools
import math
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class MemoryBank(flax.struct.PyTreeNode):
  """What `model.method='knn'` trains and checkpoints: the bank (M, D)
  float32 of coreset-selected training features."""
  bank: jax.Array

  def head_vars(self) -> dict:
    """What the scorer applies (`scoring.make_predict_fn`)."""
    return {'bank': self.bank}


def _pad_rows(x, multiple):
  """(n, ...) -> (ceil(n / multiple) * multiple, ...) zero-padded, and n."""
  n = x.shape[0]
  padded = -(-n // multiple) * multiple
  if padded != n:
    x = jnp.pad(x, ((0, padded - n),) + ((0, 0),) * (x.ndim - 1))
  return x, n


@functools.partial(jax.jit, static_argnames=('query_chunk', 'bank_chunk'))
def nearest_neighbours(queries: jax.Array, bank: jax.Array,
                       query_chunk: int = 1024, bank_chunk: int = 8192,
                       query_groups: Optional[jax.Array] = None,
                       bank_groups: Optional[jax.Array] = None):
  """Exact Euclidean nearest bank row of each query.

  The candidates are ranked with ||q||^2 - 2 q.b + ||b||^2 on data centred on
  the bank's mean (translation leaves distances unchanged and centring keeps
  the expanded form from cancelling catastrophically on features with large
  means, e.g. ReLU6 activations); the returned distance is then recomputed
  directly as ||q - b*|| for the chosen row, so it carries no cancellation
  error at all.

  Args:
    queries: (M, D) float.
    bank: (N, D) float, N >= 1.
    query_chunk, bank_chunk: rows per block; peak memory is about
      query_chunk x bank_chunk floats.
    query_groups, bank_groups: optional (M,) and (N,) int group ids, both
      or neither; a bank row of the query's own group is never chosen (e.g.
      the other images' nearest feature: groups = image ids). Every query
      needs a candidate outside its group.

  Returns:
    (distances (M,) float32, indices (M,) int32 into bank).
  """
  queries = jnp.asarray(queries, jnp.float32)
  bank = jnp.asarray(bank, jnp.float32)
  d = bank.shape[1]
  centre = bank.mean(0)
  q_all, m = _pad_rows(queries - centre, min(query_chunk, queries.shape[0]))
  b_all, n = _pad_rows(bank - centre, min(bank_chunk, bank.shape[0]))
  qc = min(query_chunk, queries.shape[0])
  bc = min(bank_chunk, bank.shape[0])
  b_blocks = b_all.reshape(-1, bc, d)
  b_sq = jnp.sum(jnp.square(b_blocks), -1)
  b_valid = (jnp.arange(b_all.shape[0]) < n).reshape(-1, bc)
  b_start = jnp.arange(b_blocks.shape[0], dtype=jnp.int32) * bc
  grouped = query_groups is not None
  q_groups = b_groups = None  # Ungrouped: nothing more rides the loops.
  if grouped:
    q_groups = _pad_rows(jnp.asarray(query_groups, jnp.int32),
                         qc)[0].reshape(-1, qc)
    b_groups = _pad_rows(jnp.asarray(bank_groups, jnp.int32),
                         bc)[0].reshape(-1, bc)

  def one_query_block(block):
    q, qg = block
    q_sq = jnp.sum(jnp.square(q), -1)

    def body(carry, block):
      best, arg = carry
      b, bsq, valid, start, bg = block
      d2 = q_sq[:, None] - 2.0 * jnp.matmul(q, b.T, precision=_HIGHEST) + bsq
      if grouped:
        valid = valid[None] & (qg[:, None] != bg[None])
      else:
        valid = valid[None]
      d2 = jnp.where(valid, d2, jnp.inf)
      j = jnp.argmin(d2, axis=1)
      v = jnp.take_along_axis(d2, j[:, None], 1)[:, 0]
      better = v < best
      return (jnp.where(better, v, best),
              jnp.where(better, start + j.astype(jnp.int32), arg)), None

    init = (jnp.full((q.shape[0],), jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0],), jnp.int32))
    (_, arg), _ = jax.lax.scan(
        body, init, (b_blocks, b_sq, b_valid, b_start, b_groups))
    # The exact distance to the chosen row, without the expanded form.
    nearest = b_all[arg]
    return jnp.sqrt(jnp.sum(jnp.square(q - nearest), -1)), arg

  dist, arg = jax.lax.map(one_query_block,
                          (q_all.reshape(-1, qc, d), q_groups))
  return dist.reshape(-1)[:m], arg.reshape(-1)[:m]


def nearest_distances(queries: jax.Array, bank: jax.Array,
                      query_chunk: int = 1024,
                      bank_chunk: int = 8192) -> jax.Array:
  """(M,) float32 Euclidean distance of each query to its nearest bank row."""
  return nearest_neighbours(queries, bank, query_chunk, bank_chunk)[0]


# PatchCore's ApproximateGreedyCoresetSampler: rows whose mean distance to a
# few random starting rows seeds the greedy selection.
NUM_STARTS = 10


def coreset_size(n: int, fraction: float) -> int:
  """Rows kept of a bank of n: int(n * fraction) (PatchCore's count, rounded
  down), at least 1; fraction 1.0 keeps all n."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'coreset fraction must be in (0, 1], got {fraction}')
  if fraction == 1.0:
    return int(n)
  return int(min(n, max(1, int(n * fraction))))


def coreset_projection(key: jax.Array, dim: int,
                       proj_dim: int) -> Optional[jax.Array]:
  """The coreset's random projection: (proj_dim, dim) float32, or None when
  dim == proj_dim (no projection, as in PatchCore; a smaller dim is
  projected *up*).

  Entries are uniform in [-1/sqrt(dim), 1/sqrt(dim)): the distribution of a
  fresh bias-free torch.nn.Linear(dim, proj_dim) weight, which is what
  PatchCore projects with. Rows map as x @ W.T.
  """
  if dim == proj_dim:
    return None
  bound = 1.0 / math.sqrt(dim)
  return jax.random.uniform(key, (proj_dim, dim), jnp.float32, -bound, bound)


def coreset_starts(key: jax.Array, n: int,
                   num_starts: int = NUM_STARTS) -> jax.Array:
  """min(num_starts, n) distinct row indices drawn uniformly, (k,) int32."""
  return jax.random.choice(key, n, (min(num_starts, n),),
                           replace=False).astype(jnp.int32)


# The greedy selection runs as up to this many jitted segments, so a caller
# can show its progress (and Ctrl-C gets through between them): on a CPU a
# bank of a few hundred thousand rows takes minutes.
SEGMENTS = 100
# ... each of at least this many row distances (about 0.5 s on the 2-core
# CPU), so that a small selection runs as one loop.
MIN_SEGMENT_DISTANCES = 2**24
# The rows' scores are kept in blocks of this many rows, each brought up to
# date lazily (`_coreset_steps`), against at most this many selected rows per
# distance product.
BLOCK_ROWS = 2048
PENDING_COLS = 64


@functools.partial(jax.jit, static_argnames=('chunk', 'num', 'block_rows',
                                             'pending'))
def _coreset_start(bank, projection, starts, chunk, num, block_rows, pending):
  """The greedy selection's state before its first step (every array the
  steps carry, made here on the bank's devices):

  z (nb, bs, P): the projected, centred rows in blocks of bs rows (the last
    block padded with rows of no meaning); z_sq (nb, bs) their squared
    norms; score (nb, bs)
    each row's mean distance to the `starts` rows (-inf on padding, so never
    selected); bmax (nb,) each block's largest score; fresh (nb,) int32 how
    many selected rows each block's scores already account for (0);
    selected (num + pending,) int32 (the tail is room for the last slice of
    selected rows a block reads); the step counter.
  """
  bank = bank.reshape(-1, bank.shape[-1])  # In the jit: no copy.
  n = bank.shape[0]
  bs = min(block_rows, n)
  nb = -(-n // bs)
  # One (nb * bs, P) float32 buffer, filled and centred in place: besides
  # the bank, the start holds about two projected copies of it, not four
  # (docs/scaling.md). The padding rows are never selected (score -inf).
  w = None if projection is None else jnp.asarray(projection, jnp.float32)
  z = _project(bank, w, min(chunk, n), nb * bs)
  z = _centre_in_place(z, z[:n].mean(0), bs)  # See nearest_neighbours.
  z_sq = jnp.sum(jnp.square(z), -1)
  score = jnp.mean(_distances(z, z_sq, z[jnp.asarray(starts, jnp.int32)]), -1)
  score = jnp.where(jnp.arange(nb * bs) < n, score, -jnp.inf).reshape(nb, bs)
  return (z.reshape(nb, bs, -1), z_sq.reshape(nb, bs), score,
          score.max(1), jnp.zeros((nb,), jnp.int32),
          jnp.zeros((num + pending,), jnp.int32), jnp.int32(0))


def _project(bank, w, chunk, rows_out):
  """(N, D) bank -> (rows_out, P) float32: its rows x w.T (w (P, D), or None:
  the rows as they are), `chunk` rows at a time, then zero rows. The bank is
  read in place: no padded or float32 copy of it (at a few hundred training
  images it is gigabytes)."""
  n = bank.shape[0]
  full = n // chunk * chunk

  def mapped(rows):
    rows = rows.astype(jnp.float32)
    return rows if w is None else jnp.matmul(rows, w.T, precision=_HIGHEST)

  def body(i, z):
    rows = jax.lax.dynamic_slice_in_dim(bank, i * chunk, chunk)
    return jax.lax.dynamic_update_slice_in_dim(z, mapped(rows), i * chunk, 0)

  p = bank.shape[1] if w is None else w.shape[0]
  z = jax.lax.fori_loop(0, full // chunk, body,
                        jnp.zeros((rows_out, p), jnp.float32))
  if full < n:
    z = z.at[full:n].set(mapped(bank[full:]))
  return z


def _centre_in_place(z, mean, block):
  """z - mean, `block` rows at a time in place (z has a multiple of `block`
  rows; a subtraction of the whole would hold a second copy of z)."""

  def body(i, z):
    rows = jax.lax.dynamic_slice_in_dim(z, i * block, block)
    return jax.lax.dynamic_update_slice_in_dim(z, rows - mean, i * block, 0)

  return jax.lax.fori_loop(0, z.shape[0] // block, body, z)


def _distances(z, z_sq, cols):
  """(N, k) Euclidean distances of every row of z to the rows `cols` (k, P)."""
  d2 = (z_sq[:, None] - 2.0 * jnp.matmul(z, cols.T, precision=_HIGHEST) +
        jnp.sum(jnp.square(cols), -1)[None])
  return jnp.sqrt(jnp.maximum(d2, 0.0))


@functools.partial(jax.jit, static_argnames=('length', 'pending'),
                   donate_argnums=(2, 3, 4, 5))
def _coreset_steps(z, z_sq, score, bmax, fresh, selected, t, length, pending):
  """`length` greedy steps from step t: selected[t + j] = the row of highest
  score, after which every score is min(score, distance to that row).

  Lazily, so that the distances come as products of a block of rows with
  many selected rows rather than one pass over the whole bank per step,
  which on a CPU is bound by memory: a block's largest score can only fall,
  so bmax is an upper bound of it; the block of the largest bound is
  brought up to date (its scores against the rows selected since it last
  was, `pending` at a time) until that block is up to date, and its best
  row is the next selection. The rule, ties included (the lowest index
  among equal scores), is the one-pass-per-step rule's.
  Returns the new state (as `_coreset_start`'s).
  """
  nb, bs, _ = z.shape
  flat = z.reshape(nb * bs, -1)

  def body(j, carry):
    score, bmax, fresh, selected = carry
    now = t + j  # Rows selected so far.

    def stale(carry):
      _, bmax, fresh = carry
      return fresh[jnp.argmax(bmax)] < now

    def refresh(carry):
      score, bmax, fresh = carry
      b = jnp.argmax(bmax)

      def product(c_s):
        c, s = c_s
        cols = jax.lax.dynamic_slice(selected, (c,), (pending,))
        d = _distances(z[b], z_sq[b], flat[cols])
        d = jnp.where((c + jnp.arange(pending) < now)[None], d, jnp.inf)
        return c + pending, jnp.minimum(s, d.min(1))

      _, s = jax.lax.while_loop(lambda c_s: c_s[0] < now, product,
                                (fresh[b], score[b]))
      return score.at[b].set(s), bmax.at[b].set(s.max()), fresh.at[b].set(now)

    score, bmax, fresh = jax.lax.while_loop(stale, refresh,
                                            (score, bmax, fresh))
    b = jnp.argmax(bmax).astype(jnp.int32)
    r = jnp.argmax(score[b]).astype(jnp.int32)
    # -1: a selected row is never picked again, even among duplicates.
    s = score[b].at[r].set(-1.0)
    return (score.at[b].set(s), bmax.at[b].set(s.max()), fresh,
            selected.at[now].set(b * bs + r))

  score, bmax, fresh, selected = jax.lax.fori_loop(
      0, length, body, (score, bmax, fresh, selected))
  return score, bmax, fresh, selected, t + length


def greedy_coreset(bank: jax.Array, projection: Optional[jax.Array],
                   starts: jax.Array, num: int, chunk: int = 16384,
                   progress: Optional[Callable[[int], None]] = None,
                   segments: int = SEGMENTS, block_rows: int = BLOCK_ROWS,
                   pending: int = PENDING_COLS) -> jax.Array:
  """Approximate greedy coreset with a given projection and starting rows.

  The selection rule of PatchCore's ApproximateGreedyCoresetSampler
  (patchcore-inspection, src/patchcore/sampler.py): rows are mapped by
  `projection`; each row's initial score is its mean Euclidean distance to
  the `starts` rows (which are not selected for that); then `num` times the
  row of highest score is selected (the lowest index among equal scores, as
  argmax) and every score becomes min(score, distance to that row). With the
  same projection matrix and starting rows it selects PatchCore's indices in
  PatchCore's order (tests/fixtures/patchcore).

  Numerics differ only where exact arithmetic would not: distances use the
  expanded form on rows centred on their mean (see nearest_neighbours), and
  a selected row is taken out of the running, so the indices are distinct
  even when the bank has fewer distinct rows than `num` (PatchCore may then
  repeat a row).

  Memory: besides the bank (read in place, never copied), the projected
  bank (N, P) float32 (about twice while it is built) and
  O(N * len(starts)); never (N, N).
  Time: about N x num row distances, as products of a block of rows with
  up to `pending` selected rows (`_coreset_steps`); it grows as N^2 at a
  fixed fraction (docs/scaling.md).

  Args:
    bank: (..., D) float: N rows, its leading axes flattened (a feature
      cache (images, h*w, D) as it is: flattened outside a jit it would
      be copied).
    projection: (P, D) float32 (rows map as x @ projection.T), or None to
      select in the bank's own space.
    starts: (S,) int row indices, S >= 1.
    num: rows to select, 1 <= num <= N.
    chunk: rows per block of the projection; bounds the temporary
      (chunk, D) float32 copy.
    progress: called with the number of rows just selected after each
      jitted segment (each then waited for), e.g. a progress bar's update;
      None runs them without waiting.
    segments: into how many segments (at most) the selection is cut, each
      of at least MIN_SEGMENT_DISTANCES row distances; the result does not
      depend on it.
    block_rows, pending: rows per block of scores and selected rows per
      distance product; the result does not depend on them.

  Returns:
    (num,) int32 indices into its N rows, in the order they were selected.
  """
  n = math.prod(bank.shape[:-1])
  if not 1 <= num <= n:
    raise ValueError(f'coreset of {num} rows from a bank of {n}')
  z, z_sq, score, bmax, fresh, selected, t = _coreset_start(
      bank, projection, starts, chunk, num, block_rows, pending)
  # Equal segments and a shorter last one: at most two compilations.
  step = min(num, max(-(-num // max(1, segments)),
                      -(-MIN_SEGMENT_DISTANCES // n)))
  for first in range(0, num, step):
    length = min(step, num - first)
    score, bmax, fresh, selected, t = _coreset_steps(
        z, z_sq, score, bmax, fresh, selected, t, length, pending)
    if progress is not None:
      jax.block_until_ready(selected)
      progress(length)
  return selected[:num]


def coreset_indices(bank: jax.Array, key: jax.Array, num: int,
                    proj_dim: int = 128, num_starts: int = NUM_STARTS,
                    chunk: int = 16384,
                    progress: Optional[Callable[[int], None]] = None
                    ) -> jax.Array:
  """PatchCore's approximate greedy coreset: `num` distinct row indices.

  Draws the projection (`coreset_projection`, skipped when D == proj_dim)
  and the starting rows (`coreset_starts`) from `key`, then runs
  `greedy_coreset`. The first k indices of a selection of num > k are the
  selection of k (same key), so the covering radius never grows with num.

  Args:
    bank: (..., D) float: N rows, its leading axes flattened (a feature
      cache (images, h*w, D) as it is: flattened outside a jit it would
      be copied).
    key: PRNG key (projection matrix and starting rows).
    num: rows to select, 1 <= num <= N.
    proj_dim: dimension of the random projection.
    num_starts: starting rows of the initial scores.
    chunk: rows per block of the projection.
    progress: see `greedy_coreset`.

  Returns:
    (num,) int32 indices into its N rows, in the order they were selected.
  """
  n, d = math.prod(bank.shape[:-1]), bank.shape[-1]
  k_proj, k_start = jax.random.split(key)
  return greedy_coreset(bank, coreset_projection(k_proj, d, proj_dim),
                        coreset_starts(k_start, n, num_starts), num, chunk,
                        progress=progress)


def memory_bank(features: jax.Array, key: jax.Array, fraction: float = 0.1,
                proj_dim: int = 128,
                progress: Optional[Callable[[int], None]] = None) -> jax.Array:
  """The training features' memory bank, coreset-reduced.

  Args:
    features: (..., D) training local features (e.g. the feature cache
      (N, h*w, D)).
    key: PRNG key for the coreset (unused when fraction == 1).
    fraction: share of rows kept, in (0, 1]; 1.0 keeps every row.
    proj_dim: random projection dimension of the coreset selection.
    progress: see `greedy_coreset` (not called when fraction == 1).

  Returns:
    (M, D) float32 bank rows, M = coreset_size(N, fraction).
  """
  n = math.prod(features.shape[:-1])
  num = coreset_size(n, fraction)
  if num == n:
    return _rows(features, None)
  return _rows(features, coreset_indices(features, key, num, proj_dim,
                                         progress=progress))


@jax.jit
def _rows(features, idx):
  """Rows `idx` (all: None) of features (..., D) as (M, D) float32,
  flattened inside the jit: no copy of all the features."""
  rows = jnp.asarray(features).reshape(-1, features.shape[-1])
  return (rows if idx is None else rows[idx]).astype(jnp.float32)


def patch_scores(bank: jax.Array, features: jax.Array,
                 query_chunk: int = 1024, bank_chunk: int = 8192) -> jax.Array:
  """(..., D) local features -> (...) float32 NN distances, high = anomalous.

  (B, h, w, D) test features give the (B, h, w) patch scores that
  scoring.image_scores and scoring.anomaly_maps take.
  """
  flat = jnp.asarray(features).reshape(-1, features.shape[-1])
  return nearest_distances(flat, bank, query_chunk,
                           bank_chunk).reshape(features.shape[:-1])


def dense_patch_scores(bank: jax.Array, features: jax.Array) -> jax.Array:
  """`patch_scores` as one program of plain ops (no loops, no argmin): what
  export traces, so ONNX can run it.

  The nearest row is found with the expanded form on centred data, then the
  distance is recomputed exactly from that row (a one-hot product picks it:
  ties, which the expanded form cannot order anyway, average their rows).
  Memory is (queries x bank) floats, so it is meant for one batch at a time.
  """
  bank = jnp.asarray(bank, jnp.float32)
  centre = bank.mean(0)
  b = bank - centre
  q = jnp.asarray(features, jnp.float32).reshape(-1, bank.shape[1]) - centre
  d2 = (jnp.sum(jnp.square(q), -1, keepdims=True) -
        2.0 * jnp.matmul(q, b.T, precision=_HIGHEST) +
        jnp.sum(jnp.square(b), -1)[None])
  hit = (d2 <= jnp.min(d2, axis=1, keepdims=True)).astype(jnp.float32)
  nearest = jnp.matmul(hit, b, precision=_HIGHEST) / jnp.sum(
      hit, axis=1, keepdims=True)
  dist = jnp.sqrt(jnp.sum(jnp.square(q - nearest), -1))
  return dist.reshape(features.shape[:-1])

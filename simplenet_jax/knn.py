"""Nearest-neighbour (PatchCore-style) scoring on the aggregated local features.

Roth et al., *Towards Total Recall in Industrial Anomaly Detection*, CVPR
2022: the memory bank is the training set's local features (N, D), reduced
by an approximate greedy coreset; a test patch's score is the Euclidean
distance to its nearest bank row, an image's score the maximum over its
patches (`scoring.image_scores`), the anomaly map the usual upsampled and
blurred patch scores (`scoring.anomaly_maps`). No training, no noise: the
baseline that a SimpleNet-family head has to match on the same features.

Everything runs on the device, jitted, in fixed-size chunks, so a large bank
and many queries never build the full (M, N) distance matrix.
"""

import functools
import math

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
                       query_chunk: int = 1024, bank_chunk: int = 8192):
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

  def one_query_block(q):
    q_sq = jnp.sum(jnp.square(q), -1)

    def body(carry, block):
      best, arg = carry
      b, bsq, valid, start = block
      d2 = q_sq[:, None] - 2.0 * jnp.matmul(q, b.T, precision=_HIGHEST) + bsq
      d2 = jnp.where(valid[None], d2, jnp.inf)
      j = jnp.argmin(d2, axis=1)
      v = jnp.take_along_axis(d2, j[:, None], 1)[:, 0]
      better = v < best
      return (jnp.where(better, v, best),
              jnp.where(better, start + j.astype(jnp.int32), arg)), None

    init = (jnp.full((q.shape[0],), jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0],), jnp.int32))
    (_, arg), _ = jax.lax.scan(body, init, (b_blocks, b_sq, b_valid, b_start))
    # The exact distance to the chosen row, without the expanded form.
    nearest = b_all[arg]
    return jnp.sqrt(jnp.sum(jnp.square(q - nearest), -1)), arg

  dist, arg = jax.lax.map(one_query_block, q_all.reshape(-1, qc, d))
  return dist.reshape(-1)[:m], arg.reshape(-1)[:m]


def nearest_distances(queries: jax.Array, bank: jax.Array,
                      query_chunk: int = 1024,
                      bank_chunk: int = 8192) -> jax.Array:
  """(M,) float32 Euclidean distance of each query to its nearest bank row."""
  return nearest_neighbours(queries, bank, query_chunk, bank_chunk)[0]


def coreset_size(n: int, fraction: float) -> int:
  """Rows kept of a bank of n: round(fraction * n), at least 1, at most n."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'coreset fraction must be in (0, 1], got {fraction}')
  return int(min(n, max(1, round(fraction * n))))


@functools.partial(jax.jit, static_argnames=('num', 'proj_dim', 'chunk'))
def coreset_indices(bank: jax.Array, key: jax.Array, num: int,
                    proj_dim: int = 128, chunk: int = 16384) -> jax.Array:
  """PatchCore's approximate greedy coreset: `num` distinct row indices.

  The bank is mapped to `proj_dim` dimensions by a Gaussian random matrix
  (Johnson-Lindenstrauss: distances kept up to a small factor; no projection
  when D <= proj_dim), then greedy farthest-point selection: start at a row
  drawn with `key`, repeatedly add the row farthest from everything selected
  so far and update every row's distance to the selection. The first k
  indices of a selection of num > k are the selection of k (same key), so
  the covering radius never grows with num.

  Args:
    bank: (N, D) float.
    key: PRNG key (projection matrix and starting row).
    num: rows to select, 1 <= num <= N (static).
    proj_dim: dimension of the random projection (static).
    chunk: rows per block of the projection (static); bounds the temporary
      (chunk, D) float32 copy.

  Returns:
    (num,) int32 indices into bank, in the order they were selected.
  """
  n, d = bank.shape
  if not 1 <= num <= n:
    raise ValueError(f'coreset of {num} rows from a bank of {n}')
  k_proj, k_start = jax.random.split(key)
  if d > proj_dim:
    w = jax.random.normal(k_proj, (d, proj_dim), jnp.float32) / math.sqrt(
        proj_dim)
    rows, _ = _pad_rows(bank, min(chunk, n))
    z = jax.lax.map(
        lambda b: jnp.matmul(b.astype(jnp.float32), w, precision=_HIGHEST),
        rows.reshape(-1, min(chunk, n), d)).reshape(-1, proj_dim)[:n]
  else:
    z = bank.astype(jnp.float32)
  z = z - z.mean(0)  # Centred: see nearest_neighbours.
  z_sq = jnp.sum(jnp.square(z), -1)

  def dist2_to(i):
    d2 = z_sq - 2.0 * jnp.matmul(z, z[i], precision=_HIGHEST) + z_sq[i]
    return jnp.maximum(d2, 0.0)

  start = jax.random.randint(k_start, (), 0, n, jnp.int32)
  selected = jnp.zeros((num,), jnp.int32).at[0].set(start)
  # -1 marks selected rows: never picked again, even among duplicates.
  min_d2 = dist2_to(start).at[start].set(-1.0)

  def body(t, carry):
    selected, min_d2 = carry
    i = jnp.argmax(min_d2).astype(jnp.int32)
    min_d2 = jnp.minimum(min_d2, dist2_to(i)).at[i].set(-1.0)
    return selected.at[t].set(i), min_d2

  selected, _ = jax.lax.fori_loop(1, num, body, (selected, min_d2))
  return selected


def memory_bank(features: jax.Array, key: jax.Array, fraction: float = 0.1,
                proj_dim: int = 128) -> jax.Array:
  """The training features' memory bank, coreset-reduced.

  Args:
    features: (..., D) training local features (e.g. the feature cache
      (N, h*w, D)).
    key: PRNG key for the coreset (unused when fraction == 1).
    fraction: share of rows kept, in (0, 1]; 1.0 keeps every row.
    proj_dim: random projection dimension of the coreset selection.

  Returns:
    (M, D) float32 bank rows, M = coreset_size(N, fraction).
  """
  rows = jnp.asarray(features).reshape(-1, features.shape[-1]).astype(
      jnp.float32)
  num = coreset_size(rows.shape[0], fraction)
  if num == rows.shape[0]:
    return rows
  return rows[coreset_indices(rows, key, num, proj_dim)]


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

r"""The kNN coreset's selection time on JAX's default device.

`knn.coreset_indices` (the lazy, block-by-block selection) against the same
rule run the simple way, one pass over the whole projected bank per selected
row (the library's selection before the thirty-third round, kept here only as
the baseline), on 384-d Gaussian rows, 10% kept, as in docs/scaling.md:

  python benchmarks/coreset_speed.py --rows 100000,285696 --json out.json

Prints and writes, per row count: seconds for each (the first call of each
shape compiles; the time of a second call is reported beside it), and
whether they selected the same set of rows (their order may depart where
two scores tie to float rounding).
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp

from simplenet_jax import knn


@functools.partial(jax.jit, static_argnames=('num',))
def _one_pass_per_row(bank, projection, starts, num):
  """The baseline: every score updated against each new row, one pass over
  the projected bank per selected row."""
  z = jnp.matmul(bank, projection.T, precision=jax.lax.Precision.HIGHEST)
  z = z - z.mean(0)
  z_sq = jnp.sum(jnp.square(z), -1)

  def dist(cols):
    d2 = (z_sq[:, None] - 2.0 * jnp.matmul(
        z, cols.T, precision=jax.lax.Precision.HIGHEST) +
          jnp.sum(jnp.square(cols), -1)[None])
    return jnp.sqrt(jnp.maximum(d2, 0.0))

  score = jnp.mean(dist(z[starts]), -1)

  def body(t, carry):
    selected, score = carry
    i = jnp.argmax(score).astype(jnp.int32)
    score = jnp.minimum(score, dist(z[i][None])[:, 0])
    return selected.at[t].set(i), score.at[i].set(-1.0)

  selected, _ = jax.lax.fori_loop(
      0, num, body, (jnp.zeros((num,), jnp.int32), score))
  return selected


def _timed(fn):
  t = time.perf_counter()
  out = np.asarray(jax.block_until_ready(fn()))
  return out, time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', default='100000,285696')
  p.add_argument('--dim', type=int, default=384)
  p.add_argument('--fraction', type=float, default=0.1)
  p.add_argument('--proj-dim', type=int, default=128)
  p.add_argument('--json', default=None)
  a = p.parse_args()
  out = {'device': str(jax.devices()[0]), 'dim': a.dim,
         'fraction': a.fraction, 'rows': []}
  key = jax.random.PRNGKey(0)
  k_proj, k_start = jax.random.split(key)
  for n in (int(r) for r in a.rows.split(',')):
    bank = jnp.asarray(np.random.default_rng(0).normal(
        size=(n, a.dim)).astype(np.float32))
    num = knn.coreset_size(n, a.fraction)
    w = knn.coreset_projection(k_proj, a.dim, a.proj_dim)
    starts = knn.coreset_starts(k_start, n)
    lazy = functools.partial(knn.greedy_coreset, bank, w, starts, num)
    plain = functools.partial(_one_pass_per_row, bank, w, starts, num)
    lazy_idx, lazy_s = _timed(lazy)
    _, lazy_again = _timed(lazy)
    plain_idx, plain_s = _timed(plain)
    _, plain_again = _timed(plain)
    row = {'rows': n, 'selected': num,
           'lazy_s': [round(lazy_s, 2), round(lazy_again, 2)],
           'one_pass_per_row_s': [round(plain_s, 2), round(plain_again, 2)],
           'same_set': bool(set(lazy_idx.tolist()) == set(plain_idx.tolist())),
           'same_order_for': int(np.argmax(lazy_idx != plain_idx))
                             if (lazy_idx != plain_idx).any() else num}
    print(json.dumps(row), flush=True)
    out['rows'].append(row)
  if a.json:
    with open(a.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()

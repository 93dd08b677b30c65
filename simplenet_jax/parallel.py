"""Data parallelism: one mesh axis over every device, from one CPU to a pod.

Parameters are replicated and batches are split along their first axis, so the
same jitted functions run unchanged on 1 GPU, 8 GPUs or a TPU host: jit sees
the input shardings and inserts the cross-device reductions (BatchNorm
statistics, the loss mean, gradients) itself, which keeps the sharded maths
identical to the single-device maths. A batch that does not divide by the
device count is padded at its end, and the padding is masked out.

Multi-host (`parallel.multihost`): every process runs the same program on the
same global batch indices; process p holds a contiguous block of the padded
global batch (its devices' rows) and loads only the valid rows of that block
(`process_rows`, `host_batches`). Padding is only ever at the END of the global
batch, so "the first n rows" means the same thing on one device and on a pod:
`put_batch` returns the global valid count n, and `to_host(x)[:n]` drops the
padding everywhere.
"""

from typing import Iterator, Optional

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from simplenet_jax.data import loader

DATA_AXIS = 'data'


def maybe_initialize_distributed(parallel_cfg) -> None:
  """Multi-host runs (TPU pods, multi-node GPU): connect the processes.

  jax.distributed.initialize() finds the coordinator itself on Cloud TPU,
  SLURM, Open MPI and Kubernetes; elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment.
  """
  if not parallel_cfg.multihost or jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local / %d devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def padded_size(n: int, mesh: Mesh) -> int:
  """Smallest multiple of the device count that holds n rows."""
  d = mesh.size
  return -(-n // d) * d


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """Pads axis 0 of x to n rows with zeros."""
  if x.shape[0] == n:
    return x
  pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad], axis=0)


def _block(n_padded: int, mesh: Mesh) -> slice:
  """Rows [start, stop) of a padded global batch held by this process."""
  index_map = batch_sharded(mesh).addressable_devices_indices_map(
      (n_padded,))
  spans = sorted((s[0].indices(n_padded)[:2] for s in index_map.values()))
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError('this process\'s devices hold a non-contiguous block of '
                     'the batch; build the mesh with make_mesh()')
  return slice(start, stop)


def process_rows(n: int, mesh: Mesh) -> slice:
  """The rows of a global batch of n rows that this process loads.

  A slice of [0, n), possibly empty; the whole of it in a one-process run.
  """
  block = _block(padded_size(n, mesh), mesh)
  return slice(min(block.start, n), min(block.stop, n))


def put_replicated(tree, mesh: Mesh):
  """Every leaf (numpy or jax) -> a copy on every device of the mesh.

  In a multi-host run each process must pass the same values.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  return jax.tree.map(put, tree)


def put_batch(x: np.ndarray, mesh: Mesh, n_global: Optional[int] = None,
              min_rows: int = 0):
  """A host batch -> one global array split over the mesh, padded to divide.

  Args:
    x: with n_global None, the whole global batch (every process passes the
      same rows; each keeps its own block). With n_global given, only this
      process's rows of a global batch of n_global rows, i.e.
      rows[process_rows(n_global, mesh)] (what `host_batches` yields).
    mesh: the mesh.
    n_global: the global batch's number of rows (see x).
    min_rows: pad a short batch to at least this many rows, so that every
      batch of a loop has one shape and jitted functions compile once (the
      last, short batch would otherwise compile its own). Not applied to
      a multi-host run's per-process rows (n_global given): their split
      follows the batch's own size.

  Returns:
    (array, n): the global array of padded_size(max(n, min_rows), mesh) rows
    (padded_size(n, mesh) in the multi-host case above), split over the
    mesh, zero rows at the end; n = how many leading rows are real.
  """
  x = np.asarray(x)
  local = n_global is not None
  n = int(n_global) if local else x.shape[0]
  multi_local = local and jax.process_count() > 1
  n_pad = padded_size(n if multi_local else max(n, min_rows), mesh)
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    if x.shape[0] != n:
      raise ValueError(f'put_batch: {x.shape[0]} rows given for a batch of '
                       f'{n}')
    return jax.device_put(pad_rows(x, n_pad), sharding), n
  if not local:
    # Every process holds the whole batch: padding it first keeps the
    # processes' blocks consistent (they split the padded batch).
    x = pad_rows(x, n_pad)[_block(n_pad, mesh)]
    return jax.make_array_from_process_local_data(
        sharding, x, (n_pad,) + x.shape[1:]), n
  rows = process_rows(n, mesh)
  if x.shape[0] != rows.stop - rows.start:
    raise ValueError(f'put_batch: process {jax.process_index()} passed '
                     f'{x.shape[0]} rows; its part of a batch of {n} has '
                     f'{rows.stop - rows.start}')
  block = _block(n_pad, mesh)
  x = pad_rows(x, block.stop - block.start)
  return jax.make_array_from_process_local_data(
      sharding, x, (n_pad,) + x.shape[1:]), n


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array -> the whole of it, numpy, on every
  process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def host_batches(dataset, batch_size: int, mesh: Mesh, *, indices=None,
                 num_workers: int = 8, prefetch: int = 2) -> Iterator[dict]:
  """`loader.batches`, but each process decodes only its rows of each batch.

  Yields the collated dicts of loader.batches holding this process's rows
  (process_rows) of consecutive global batches of `batch_size` (the last may
  be short), plus 'n_global': the global batch's size, for put_batch. With
  one process these are exactly loader.batches' batches. A process with no
  rows in a batch gets 'image' of 0 rows (from dataset.image_hw) and nothing
  else.
  """
  order = (np.arange(len(dataset), dtype=np.int64) if indices is None else
           np.asarray(indices, dtype=np.int64).reshape(-1))
  kw = dict(num_workers=num_workers, prefetch=prefetch)
  if jax.process_count() == 1:
    for batch in loader.batches(dataset, batch_size, indices=order, **kw):
      batch['n_global'] = len(batch['image'])
      yield batch
    return
  # Full batches all give this process the same number of rows; the short
  # last batch is loaded on its own.
  n_full = len(order) // batch_size * batch_size
  groups = []
  if n_full:
    rows = process_rows(batch_size, mesh)
    mine = order[:n_full].reshape(-1, batch_size)[:, rows].reshape(-1)
    groups.append((mine, rows.stop - rows.start, n_full // batch_size,
                   batch_size))
  if n_full < len(order):
    last = order[n_full:]
    rows = process_rows(len(last), mesh)
    groups.append((last[rows], rows.stop - rows.start, 1, len(last)))
  for mine, k, count, n in groups:
    if k == 0:
      empty = np.zeros((0, *dataset.image_hw, 3), np.uint8)
      for _ in range(count):
        yield {'image': empty, 'n_global': n}
      continue
    for batch in loader.batches(dataset, k, indices=mine, **kw):
      batch['n_global'] = n
      yield batch


def global_inputs(mesh: Mesh, *xs):
  """Small loop-side arrays (batch indices, PRNG keys) made fit for jit.

  One process: returned as they are (jit places them). Several: jit takes
  only global arrays, so each becomes a replicated one (every process must
  pass the same values, as it does for indices and keys derived from the
  seed).
  """
  if jax.process_count() == 1:
    return xs

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      data = put_replicated(np.asarray(jax.random.key_data(x)), mesh)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return put_replicated(np.asarray(x), mesh)
  return tuple(put(x) for x in xs)

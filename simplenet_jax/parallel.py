"""Data parallelism: one mesh axis over every device, from one CPU to a pod.

Parameters are replicated and batches are split along their first axis, so the
same jitted functions run unchanged on 1 GPU, 8 GPUs or a TPU host: jit sees
the input shardings and inserts the cross-device reductions (BatchNorm
statistics, the loss mean, gradients) itself, which keeps the sharded maths
identical to the single-device maths. A batch that does not divide by the
device count is padded, and the padding is masked out.
"""

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def maybe_initialize_distributed(parallel_cfg) -> None:
  """Multi-host runs (TPU pods, multi-node GPU): connect the processes."""
  if parallel_cfg.multihost:
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d, %d local / %d devices',
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
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


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def put_batch(x: np.ndarray, mesh: Mesh):
  """Host batch -> global array split over the mesh, padded to divide.

  In a multi-host run each process passes its own part of the global batch
  (every process the same number of rows).

  Returns:
    (array, n_valid): the padded global array and how many leading rows of
    this process's part are real.
  """
  n_valid = x.shape[0]
  local_devices = max(1, mesh.size // jax.process_count())
  n = -(-n_valid // local_devices) * local_devices
  x = pad_rows(np.asarray(x), n)
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding), n_valid
  return jax.make_array_from_process_local_data(sharding, x), n_valid


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))

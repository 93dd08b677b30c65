"""Batches of decoded examples, decoded in a thread pool ahead of use.

PIL releases the GIL while decoding and resizing, so threads are enough and
nothing needs pickling. The batch order is the order of the indices given
(callers shuffle them), never that of thread timing.
"""

import collections
import concurrent.futures
from typing import Iterator, Sequence

import numpy as np


def collate(examples: Sequence[dict]) -> dict:
  """Example dicts -> image (B,H,W,3) uint8, mask (B,H,W) uint8,
  label (B,) int32, path list[str], defect list[str]."""
  shapes = {e['image'].shape for e in examples}
  if len(shapes) > 1:
    raise ValueError(f'images of different shapes {sorted(shapes)} in one '
                     f'batch: {[e["path"] for e in examples]}')
  return dict(
      image=np.stack([e['image'] for e in examples]),
      mask=np.stack([e['mask'] for e in examples]),
      label=np.asarray([e['label'] for e in examples], np.int32),
      path=[e['path'] for e in examples],
      defect=[e['defect'] for e in examples])


def batches(dataset, batch_size: int, *, indices=None, num_workers: int = 8,
            prefetch: int = 2) -> Iterator[dict]:
  """Yields `collate`d batches of `dataset.load(i)`; the last may be short.

  Args:
    dataset: has __len__ and load(i) -> example dict.
    batch_size: examples per batch (> 0).
    indices: which examples (default: all), in this order.
    num_workers: decoding threads; 0 decodes in the caller's thread.
    prefetch: batches decoded ahead of the one being consumed.

  An exception raised by `load` in a worker is re-raised in the caller as is
  (a UserError stays a UserError).
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  order = (np.arange(len(dataset), dtype=np.int64) if indices is None else
           np.asarray(indices, dtype=np.int64).reshape(-1))
  chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if num_workers <= 0:
    for chunk in chunks:
      yield collate([dataset.load(int(i)) for i in chunk])
    return
  yield from _threaded(dataset, chunks, num_workers, max(prefetch, 0))


def _threaded(dataset, chunks, num_workers, prefetch):
  pool = concurrent.futures.ThreadPoolExecutor(
      num_workers, thread_name_prefix='simplenet-data')
  pending = collections.deque()
  todo = iter(chunks)

  def submit_next():
    chunk = next(todo, None)
    if chunk is not None:
      pending.append([pool.submit(dataset.load, int(i)) for i in chunk])

  try:
    for _ in range(prefetch + 1):  # The batch needed now + `prefetch` ahead.
      submit_next()
    while pending:
      futures = pending.popleft()
      examples = [f.result() for f in futures]
      submit_next()
      yield collate(examples)
  finally:
    # Also runs when the consumer stops early or a load failed.
    pool.shutdown(wait=True, cancel_futures=True)

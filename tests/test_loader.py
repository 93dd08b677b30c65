"""The threaded batch loader: order, determinism, prefetch bound, errors."""

import threading
import time

import numpy as np
import PIL.Image
import pytest

from simplenet_jax.data import images
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError


class FakeDataset:
  """Example i: an image filled with i; loads later indices faster, so
  threads finish out of order; optionally fails at one index."""

  def __init__(self, n=10, fail_at=None, delay=0.0):
    self.n, self.fail_at, self.delay = n, fail_at, delay
    self.calls = []
    self._lock = threading.Lock()

  def __len__(self):
    return self.n

  def load(self, i):
    with self._lock:
      self.calls.append(i)
    if self.delay:
      time.sleep(self.delay * (self.n - i) / self.n)
    if i == self.fail_at:
      raise UserError(f'/data/{i}.png: cannot read this image file')
    return dict(image=np.full((4, 5, 3), i, np.uint8),
                mask=np.full((4, 5), i % 2, np.uint8), label=i % 2,
                path=f'/data/{i}.png', defect='good' if i % 2 == 0 else 'x')


def _ids(batches):
  return [[int(v) for v in b['image'][:, 0, 0, 0]] for b in batches]


def test_batches_in_dataset_order_last_short():
  out = list(loader.batches(FakeDataset(10, delay=0.002), 4, num_workers=4))
  assert _ids(out) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  b = out[0]
  assert b['image'].shape == (4, 4, 5, 3) and b['image'].dtype == np.uint8
  assert b['mask'].shape == (4, 4, 5) and b['mask'].dtype == np.uint8
  assert b['label'].dtype == np.int32 and b['label'].tolist() == [0, 1, 0, 1]
  assert b['path'] == ['/data/0.png', '/data/1.png', '/data/2.png', '/data/3.png']
  assert b['defect'] == ['good', 'x', 'good', 'x']


def test_order_is_the_indices_order_whatever_the_threads():
  # Callers shuffle (train.py draws the permutation per pass): batches keep
  # the order of the indices given, however the threads finish.
  order = np.random.default_rng(3).permutation(10)
  flat = lambda bs: [i for b in _ids(bs) for i in b]
  a = flat(loader.batches(FakeDataset(), 3, indices=order, num_workers=3))
  b = flat(loader.batches(FakeDataset(delay=0.002), 3, indices=order,
                          num_workers=1))
  c = flat(loader.batches(FakeDataset(delay=0.002), 3, indices=order,
                          num_workers=4, prefetch=3))
  d = flat(loader.batches(FakeDataset(), 3, indices=order, num_workers=0))
  assert a == b == c == d == order.tolist()


def test_indices_subset():
  idx = [9, 2, 7, 4]
  out = _ids(loader.batches(FakeDataset(), 3, indices=idx))
  assert out == [[9, 2, 7], [4]]
  out = _ids(loader.batches(FakeDataset(), 4, indices=np.array([[3, 1]])))
  assert out == [[3, 1]]


def test_worker_error_surfaces_as_the_user_error():
  it = loader.batches(FakeDataset(12, fail_at=6), 4, num_workers=3)
  first = next(it)
  assert _ids([first]) == [[0, 1, 2, 3]]
  with pytest.raises(UserError, match=r'/data/6\.png: cannot read'):
    next(it)


def test_corrupt_file_error_through_loader(tmp_path):
  for i in range(3):
    PIL.Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f'{i}.png')
  (tmp_path / '1.png').write_bytes(b'not a png')
  samples = [images.Sample(tmp_path / f'{i}.png', None, 0, 'good') for i in range(3)]
  ds = images.FileDataset('t', samples, images.Geometry(shorter=8), False)
  with pytest.raises(UserError, match=r'1\.png: cannot read this image'):
    list(loader.batches(ds, 2, num_workers=2))


def test_prefetch_is_bounded_and_early_stop_stops_loading():
  ds = FakeDataset(200)
  it = loader.batches(ds, 4, num_workers=2, prefetch=2)
  next(it)
  # At the first yield: this batch, one after it, `prefetch` more at most.
  assert 4 <= len(ds.calls) <= (2 + 2) * 4
  it.close()
  n = len(ds.calls)
  time.sleep(0.05)
  assert len(ds.calls) == n <= 16


def test_mixed_shapes_rejected():
  class Mixed(FakeDataset):
    def load(self, i):
      ex = super().load(i)
      if i == 1:
        ex['image'] = np.zeros((3, 3, 3), np.uint8)
      return ex
  with pytest.raises(ValueError, match='different shapes'):
    list(loader.batches(Mixed(4), 4, num_workers=0))


def test_bad_batch_size():
  with pytest.raises(ValueError, match='batch_size'):
    list(loader.batches(FakeDataset(), 0))

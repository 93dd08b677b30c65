"""evaluate.py's report hooks, with a stand-in model (no backbone)."""

import types

import numpy as np

from configs import default
from simplenet_jax import evaluate
from simplenet_jax import parallel

images_of = evaluate._test_images  # pylint: disable=protected-access


class _Images:
  """Test images whose pixels all equal their index; masks on odd ones."""
  has_masks = True
  image_hw = (4, 5)

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def load(self, i):
    return {'image': np.full((4, 5, 3), i, np.uint8),
            'mask': np.full((4, 5), i % 2, np.uint8), 'label': i % 2,
            'path': f'/x/{i}.png', 'defect': 'good' if i % 2 == 0 else 'hole'}


def _ctx(n_images, batch_size, shapes):
  def predict_fn(backbone_vars, head, images):
    del backbone_vars, head
    shapes.append(images.shape[0])
    m = images[..., 0].astype(np.float32) * 10.0  # Map = 10 x the index.
    return {'anomaly_maps': m, 'image_scores': m.max(axis=(1, 2))}

  config = default.get_config()
  config.eval.batch_size = batch_size
  config.dataset.num_workers = 1
  return types.SimpleNamespace(config=config, test_set=_Images(n_images),
                               mesh=parallel.make_mesh(), backbone_vars=None,
                               predict_fn=predict_fn)


def test_test_images_in_order_in_full_batches_only():
  shapes = []
  ctx = _ctx(11, 4, shapes)
  state = types.SimpleNamespace(params={}, batch_stats={})
  got = list(images_of(ctx, state, [9, 2, 5, 6, 7]))
  assert [g[0] for g in got] == [9, 2, 5, 6, 7]
  for index, image, amap, mask in got:
    assert (image == index).all() and (amap == 10 * index).all()
    assert (mask == index % 2).all()
  assert shapes == [4, 4]  # 5 images as two batches of 4, none of 1.
  # A test set smaller than the batch: batches of its size.
  shapes.clear()
  ctx = _ctx(3, 8, shapes)
  got = list(images_of(ctx, state, [1]))
  assert [g[0] for g in got] == [1] and shapes == [3]
  assert not list(images_of(ctx, state, []))

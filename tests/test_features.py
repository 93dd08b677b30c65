"""Local feature aggregation vs the released PyTorch code and torch ops."""

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from simplenet_jax import features

torch = helpers.require_torch()
F = torch.nn.functional


@pytest.mark.parametrize(
    'name', ['embed_wrn50_dims', 'embed_uneven_dims', 'embed_three_layers'])
def test_matches_released_embedding(name):
  d = helpers.load_fixture(name + '.npz')
  layer_keys = sorted((k for k in d.files if k.startswith('layer')),
                      key=lambda k: int(k[len('layer'):].split('_')[0]))
  maps = [d[k].transpose(0, 2, 3, 1) for k in layer_keys]
  dim = int(d['embed_dim'])
  out = np.asarray(features.aggregate(maps, dim, dim, 3))
  b = maps[0].shape[0]
  assert out.shape == (b, *d['grid'], dim)
  np.testing.assert_allclose(out.reshape(-1, dim), d['embedding'], rtol=0,
                             atol=1e-5)


@pytest.mark.parametrize('length,size', [(12, 4), (360, 1536), (1008, 1536),
                                         (10, 3), (7, 7), (3, 10), (100, 33)])
def test_adaptive_pool_matches_torch(length, size):
  x = np.random.default_rng(length).normal(size=(5, length)).astype(np.float32)
  want = F.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], size)[:, 0]
  got = features.adaptive_avg_pool(x, size)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-6)
  idx, _ = features.adaptive_pool_taps(length, size)
  assert idx.shape[1] <= -(-length // size) + 1


@pytest.mark.parametrize('hw,out', [((3, 5), (7, 4)), ((6, 6), (12, 12)),
                                    ((9, 4), (3, 8)), ((4, 4), (4, 4))])
def test_resize_matches_torch_bilinear(hw, out):
  x = np.random.default_rng(0).normal(size=(*hw, 6)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=out,
                       mode='bilinear', align_corners=False)[0]
  got = features.resize_bilinear(x, out)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(1, 2, 0),
                             rtol=0, atol=1e-6)


def test_unfold_matches_torch_unfold():
  x = np.random.default_rng(1).normal(size=(4, 6, 3)).astype(np.float32)
  x_nchw = torch.from_numpy(x.transpose(2, 0, 1))[None]
  want = torch.nn.Unfold(3, padding=1)(x_nchw)
  want = want[0].numpy().T.reshape(4, 6, 27)  # (C*9, h*w) -> (h, w, C*9)
  np.testing.assert_array_equal(np.asarray(features.unfold(x, 3)), want)


def _torch_reference(maps_nchw, pre_dim, target_dim):
  """The released pipeline with torch ops: unfold, resize, pool, pool."""
  ref = maps_nchw[0].shape[-2:]
  per_layer = []
  for m in maps_nchw:
    b, c, h, w = m.shape
    u = torch.nn.Unfold(3, padding=1)(m).reshape(b, c * 9, h, w)
    u = F.interpolate(u, size=ref, mode='bilinear', align_corners=False)
    u = u.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
    per_layer.append(F.adaptive_avg_pool1d(u, pre_dim)[:, 0])
  stacked = torch.stack(per_layer, 1).reshape(len(per_layer[0]), 1, -1)
  return F.adaptive_avg_pool1d(stacked, target_dim)[:, 0]


def test_non_square_grids_match_torch_reference():
  rng = np.random.default_rng(2)
  shapes = [(2, 5, 8, 6), (2, 7, 4, 3), (2, 3, 2, 2)]
  maps = [rng.normal(size=s).astype(np.float32) for s in shapes]
  want = _torch_reference([torch.from_numpy(m) for m in maps], 50, 40)
  got = features.aggregate([m.transpose(0, 2, 3, 1) for m in maps], 50, 40)
  assert got.shape == (2, 8, 6, 40)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, 40), want.numpy(),
                             rtol=0, atol=1e-5)


def test_batch_items_are_independent():
  rng = np.random.default_rng(3)
  maps = [rng.normal(size=(3, 6, 6, 8)).astype(np.float32),
          rng.normal(size=(3, 3, 3, 16)).astype(np.float32)]
  full = np.asarray(features.aggregate(maps, 32, 24))
  one = np.asarray(features.aggregate([m[1:2] for m in maps], 32, 24))
  np.testing.assert_allclose(full[1:2], one, rtol=0, atol=1e-6)
  assert not np.allclose(full[0], full[1])


@pytest.mark.parametrize('channels,size,patch', [(8, 24, 3), (8, 30, 3),
                                                 (5, 64, 3), (4, 7, 5),
                                                 (6, 4, 1)])
def test_unfold_pool_equals_pooling_the_unfolded_map(channels, size, patch):
  x = np.random.default_rng(0).normal(size=(2, 5, 7, channels)).astype(
      np.float32)
  got = np.asarray(features.unfold_pool(jnp.asarray(x), size, patch))
  want = np.stack([np.asarray(features.adaptive_avg_pool(
      features.unfold(jnp.asarray(m), patch), size)) for m in x])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

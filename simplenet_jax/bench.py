r"""Throughput benchmark: python -m simplenet_jax.bench [flags].

Prints, side by side for one backbone, image size and batch:
  backbone only       images/s through the backbone up to its last layer
  inference           images in -> image scores and smoothed maps, on device
  cache build         the one-off cost of the training set's feature cache
  training (cached)   images/s per training pass on cached features
  peak RSS            the process's peak resident memory
Each figure is the median of --repeats timed runs after --warmup runs, with
block_until_ready. Random weights unless --weights (timing does not depend on
them).
"""

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simplenet_jax import backbones
from simplenet_jax import feature_cache
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import train
from configs import default


def _time(fn, warmup: int, repeats: int) -> float:
  """Median seconds of fn() (which must block)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(args) -> dict:
  config = default.get_config()
  config.backbone.name = args.backbone
  config.backbone.layers = tuple(args.layers.split(','))
  config.backbone.random_init = not args.weights
  config.backbone.dtype = args.backbone_dtype
  config.train.cache_dtype = args.cache_dtype
  if args.embed_dim:
    config.model.pretrain_embed_dim = config.model.target_embed_dim = args.embed_dim
  mesh = parallel.make_mesh()
  module, bvars = backbones.load_backbone(config.backbone)
  bvars = parallel.put_replicated(bvars, mesh)
  b, s = args.batch, args.image_size
  rng = np.random.default_rng(0)
  images_np = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  images, _ = parallel.put_batch(images_np, mesh)

  backbone_fn = jax.jit(lambda v, x: module.apply(v, scoring.to_unit_float(x)))
  t_backbone = _time(lambda: jax.block_until_ready(backbone_fn(bvars, images)),
                     args.warmup, args.repeats)

  feature_fn = scoring.make_feature_fn(module, config.backbone.layers,
                                       config.model)
  feats = feature_fn(bvars, images)
  _, gh, gw, dim = feats.shape
  steps_per_pass = -(-args.train_images // b)
  state = train.create_train_state(jax.random.PRNGKey(0), config.model,
                                   config.optim, dim, steps_per_pass, 1)
  state = parallel.put_replicated(state, mesh)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  predict_fn = scoring.make_predict_fn(module, config.backbone.layers,
                                       config.model, (s, s), 4.0)
  t_infer = _time(lambda: jax.block_until_ready(predict_fn(bvars, head, images)),
                  args.warmup, args.repeats)

  # Cache build: the feature function over the whole training set.
  n_batches = steps_per_pass
  def build():
    parts = [feature_fn(bvars, images) for _ in range(n_batches)]
    return jax.block_until_ready(jnp.concatenate(parts)[:args.train_images])
  t_cache = _time(build, 1, 1)
  cache = build().reshape(args.train_images, gh * gw, dim).astype(
      jnp.dtype(args.cache_dtype))
  step = train.make_cached_step(mesh, dim)
  order = np.arange(args.train_images)

  def one_pass():
    nonlocal state
    for i in range(steps_per_pass):
      idx = jnp.asarray(order[i * b:(i + 1) * b])
      state, m = step(state, cache, idx, jax.random.PRNGKey(i))
    jax.block_until_ready(m)
  t_pass = _time(one_pass, 1, args.repeats)

  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out = {
      'backbone': args.backbone, 'layers': args.layers, 'image_size': s,
      'batch': b, 'grid': f'{gh}x{gw}', 'embed_dim': dim,
      'devices': f'{mesh.size} x {jax.devices()[0].device_kind}',
      'backbone_only_img_s': b / t_backbone,
      'inference_img_s': b / t_infer,
      'inference_vs_backbone': t_backbone / t_infer,
      'cache_build_s': t_cache,
      'cache_build_img_s': args.train_images / t_cache,
      'train_pass_img_s': args.train_images / t_pass,
      'cache_gib': feature_cache.estimate_bytes(
          args.train_images, (gh, gw), dim, args.cache_dtype) / 2**30,
      'peak_rss_mb': peak_mb,
  }
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--backbone', default='wide_resnet50_2')
  p.add_argument('--layers', default='layer2,layer3')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--train-images', type=int, default=32)
  p.add_argument('--embed-dim', type=int, default=0,
                 help='pretrain/target embed dim (0 = config default 1536)')
  p.add_argument('--backbone-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--cache-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--weights', action='store_true',
                 help='use converted weights from pretrained/ (else random)')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args(argv)
  out = run(args)
  width = max(map(len, out))
  for k, v in out.items():
    print(f'{k:<{width}}  {v:.2f}' if isinstance(v, float) else
          f'{k:<{width}}  {v}')


if __name__ == '__main__':
  main()

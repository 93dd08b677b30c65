r"""Throughput benchmark: python -m simplenet_jax.bench [flags].

Prints, side by side for one backbone, image size and batch:
  backbone img/s     images through the backbone up to its last used layer
  inference img/s    images in -> image scores and smoothed maps, on device
                     (backbone, feature aggregation, head, map matrices)
  inference 1st s    the first inference call, compiling included (--tta
                     flips: the four views, as configs/demo.py scores)
  cache build        the one-off first-pass cost of the training set's
                     feature cache (feature_cache.build, loader included)
  train img/s/pass   one training pass over cached features (make_cached_step)
  CPU ms/img         process CPU time (all threads) per image of each stage:
                     steadier than wall time on a shared machine
  batch-1 p50/p99    (--latency N) milliseconds per single-image inference
                     call (images in -> score and map out), over N calls
  recompute img/s    (--recompute) one pass recomputing the features per batch,
                     as the released code does every pass and this project
                     does over train.cache_max_gb
  peak RSS           the process's peak resident memory (on CPU this includes
                     the "device" arrays); peak device memory where the
                     backend reports it
Each rate is the median of --repeats timed runs after --warmup runs (the
first one compiles), with block_until_ready. Random weights unless --weights
(speed does not depend on them). The machine's load average is printed with
the figures: on a shared machine they are only comparable at equal load.

  python -m simplenet_jax.bench --backbone wide_resnet50_2 --image-size 224 \
      --batch 8 --json a.json
  python -m simplenet_jax.bench --merge a.json b.json   # side by side

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N to split the
batch over N host "devices" (they share the same cores: overhead, not
speed-up).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

import jax
import numpy as np

from configs import default
from simplenet_jax import backbones
from simplenet_jax import feature_cache
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import train


_CPU = {}  # Stage -> median process CPU seconds of its timed runs.


def _time(fn, warmup: int, repeats: int, stage: str = '') -> float:
  """Median wall seconds of fn() (which must block).

  Also records the median CPU seconds of this process (all its threads) in
  _CPU[stage]: on a shared machine wall time follows the others' load, CPU
  time much less so.
  """
  for _ in range(warmup):
    fn()
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  if stage:
    _CPU[stage] = statistics.median(cpu)
  return statistics.median(times)


def latency_ms(call, n: int, warmup: int = 3) -> tuple[float, float]:
  """(p50, p99) wall milliseconds of `call()` (which must block) over n
  calls after `warmup` untimed ones."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    call()
    times.append(1000.0 * (time.perf_counter() - t0))
  return float(np.percentile(times, 50)), float(np.percentile(times, 99))


class RandomImages:
  """An in-memory data set of random uint8 images (what the loader needs)."""

  def __init__(self, n: int, size: int, seed: int = 0):
    self.image_hw = (size, size)
    self.images = np.random.default_rng(seed).integers(
        0, 256, (n, size, size, 3), dtype=np.uint8)

  def __len__(self):
    return len(self.images)

  def load(self, i):
    return dict(image=self.images[i], mask=np.zeros(self.image_hw, np.uint8),
                label=0, path=f'random/{i}.png', defect='good')


def make_config(args):
  config = default.get_config()
  config.backbone.name = args.backbone
  config.backbone.layers = tuple(args.layers.split(','))
  config.backbone.random_init = not args.weights
  config.backbone.dtype = args.backbone_dtype
  config.train.cache_dtype = args.cache_dtype
  config.train.batch_size = args.batch
  config.eval.batch_size = args.batch
  config.eval.tta = args.tta
  config.dataset.num_workers = 2
  if args.embed_dim:
    config.model.pretrain_embed_dim = args.embed_dim
    config.model.target_embed_dim = args.embed_dim
  if args.hidden:
    config.model.hidden = args.hidden
  return config


def _peak_device_mb():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def run(args) -> dict:
  """Measures everything for one setting; returns the figures."""
  config = make_config(args)
  _CPU.clear()
  load_start = os.getloadavg()[0]
  mesh = parallel.make_mesh()
  module, bvars = backbones.load_for_run(config.backbone)
  bvars = parallel.put_replicated(bvars, mesh)
  b, s, n_train = args.batch, args.image_size, args.train_images
  data = RandomImages(max(n_train, b), s)
  images, _ = parallel.put_batch(data.images[:b], mesh)
  layers = tuple(config.backbone.layers)

  backbone_fn = jax.jit(lambda v, x: module.apply(v, scoring.to_unit_float(x)))
  t_backbone = _time(lambda: jax.block_until_ready(backbone_fn(bvars, images)),
                     args.warmup, args.repeats, 'backbone')

  feature_fn = scoring.make_feature_fn(module, layers, config.model)
  _, gh, gw, dim = jax.eval_shape(feature_fn, bvars, images).shape
  steps = feature_cache.steps_per_pass(n_train, b)
  state = train.create_train_state(jax.random.PRNGKey(0), config.model,
                                   config.optim, dim, steps, 1,
                                   len(config.backbone.layers))
  state = parallel.put_replicated(state, mesh)
  head = state.head_vars()
  _, predict_fn = scoring.run_predict_fn(config, module, bvars, (s, s))
  t_infer_first = time.perf_counter()
  jax.block_until_ready(predict_fn(bvars, head, images))  # Compiles.
  t_infer_first = time.perf_counter() - t_infer_first
  t_infer = _time(lambda: jax.block_until_ready(predict_fn(bvars, head,
                                                           images)),
                  args.warmup, args.repeats, 'inference')

  if args.latency:
    one, _ = parallel.put_batch(data.images[:1], mesh)
    call = lambda: jax.block_until_ready(predict_fn(bvars, head, one))
    out_latency = latency_ms(call, args.latency)
  idx = np.arange(n_train)

  def build():
    return feature_cache.build(feature_fn, bvars, data, idx, b, config.train,
                               config.dataset, mesh, (gh, gw), dim)
  t_compile_build = time.perf_counter()
  cache = build()  # Compiles the cache writes; the features are compiled.
  t_compile_build = time.perf_counter() - t_compile_build
  t_cache = _time(lambda: jax.block_until_ready(build()), 0,
                  max(1, args.repeats // 2), 'cache')
  order = np.random.default_rng(0).permutation(n_train)
  step = train.make_cached_step(mesh, dim)

  def one_pass():
    nonlocal state
    for i in range(steps):
      state, m = step(state, cache, order[i * b:(i + 1) * b],
                      jax.random.PRNGKey(i))
    jax.block_until_ready(m)
  t_pass = _time(one_pass, 1, args.repeats, 'train')

  out = {
      'backbone': args.backbone, 'dtype': args.backbone_dtype,
      'layers': args.layers, 'image_size': s, 'batch': b,
      'grid': f'{gh}x{gw}', 'embed_dim': dim, 'hidden': config.model.hidden,
      'devices': f'{mesh.size} x {jax.devices()[0].device_kind}',
      'backbone_img_s': b / t_backbone,
      'inference_img_s': b / t_infer,
      'inference_vs_backbone': t_backbone / t_infer,
      'inference_first_s': t_infer_first, 'tta': args.tta,
      'cache_build_s': t_cache,
      'cache_build_first_s': t_compile_build,
      'cache_build_img_s': n_train / t_cache,
      'train_images': n_train,
      'train_pass_img_s': n_train / t_pass,
      'cache_dtype': args.cache_dtype,
      'cache_gib': feature_cache.estimate_bytes(n_train, (gh, gw), dim,
                                                args.cache_dtype) / 2**30,
  }
  if args.latency:
    out['latency_b1_p50_ms'], out['latency_b1_p99_ms'] = out_latency
  if args.recompute:
    del cache
    fstep = train.make_features_step(mesh, dim)

    def recompute_pass():
      nonlocal state
      for i in range(steps):
        x, n = parallel.put_batch(data.images[order[i * b:(i + 1) * b]], mesh)
        state, m = fstep(state, bvars, x, jax.random.PRNGKey(i), feature_fn,
                         n)
      jax.block_until_ready(m)
    out['recompute_pass_img_s'] = n_train / _time(
        recompute_pass, 1, max(1, args.repeats // 2), 'recompute')
  per_image = {'backbone': b, 'inference': b, 'cache': n_train,
               'train': n_train, 'recompute': n_train}
  for stage, cpu_s in _CPU.items():
    out[f'{stage}_cpu_ms_img'] = 1000 * cpu_s / per_image[stage]
  out['peak_rss_mb'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  out['peak_device_mb'] = _peak_device_mb()
  out['load_avg_1min'] = f'{load_start:.2f} -> {os.getloadavg()[0]:.2f}'
  out['cpus'] = os.cpu_count()
  out['machine'] = platform.processor() or platform.machine()
  return out


_COLUMNS = (
    ('backbone', 'backbone'), ('dtype', 'dtype'), ('image_size', 'size'),
    ('batch', 'batch'), ('tta', 'eval.tta'), ('devices', 'devices'),
    ('train_images', 'N train'),
    ('backbone_img_s', 'backbone img/s'),
    ('inference_img_s', 'inference img/s'),
    ('inference_vs_backbone', 'inf/backbone'),
    ('inference_first_s', 'inference 1st call s'),
    ('latency_b1_p50_ms', 'batch-1 p50 ms'),
    ('latency_b1_p99_ms', 'batch-1 p99 ms'),
    ('cache_build_img_s', 'cache build img/s'),
    ('train_pass_img_s', 'train img/s/pass (cached)'),
    ('recompute_pass_img_s', 'train img/s/pass (recompute)'),
    ('backbone_cpu_ms_img', 'backbone CPU ms/img'),
    ('inference_cpu_ms_img', 'inference CPU ms/img'),
    ('cache_cpu_ms_img', 'cache build CPU ms/img'),
    ('train_cpu_ms_img', 'train CPU ms/img/pass'),
    ('cache_gib', 'cache GiB'), ('peak_rss_mb', 'peak RSS MB'),
    ('peak_device_mb', 'peak device MB'), ('load_avg_1min', 'load'))


def format_table(rows) -> str:
  """Markdown table, one row per setting."""
  cols = [(k, h) for k, h in _COLUMNS
          if any(r.get(k) is not None for r in rows)]

  def cell(v):
    if v is None:
      return 'n/a'
    if isinstance(v, float):
      return f'{v:.3f}' if abs(v) < 0.1 else f'{v:.2f}'
    return str(v)
  lines = ['| ' + ' | '.join(h for _, h in cols) + ' |',
           '|' + '|'.join('---' for _ in cols) + '|']
  lines += ['| ' + ' | '.join(cell(r.get(k)) for k, _ in cols) + ' |'
            for r in rows]
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--backbone', default='wide_resnet50_2')
  p.add_argument('--layers', default='layer2,layer3')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--tta', default='none', choices=scoring.TTAS,
                 help='eval.tta of the inference call')
  p.add_argument('--train-images', type=int, default=32)
  p.add_argument('--embed-dim', type=int, default=0,
                 help='pretrain/target embed dim (0 = config default 1536)')
  p.add_argument('--hidden', type=int, default=0,
                 help='discriminator hidden width (0 = config default 1024)')
  p.add_argument('--backbone-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--cache-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--weights', action='store_true',
                 help='use converted weights from pretrained/ (else random)')
  p.add_argument('--latency', type=int, default=0, metavar='N',
                 help='also time N batch-1 inference calls (p50/p99 ms)')
  p.add_argument('--recompute', action='store_true',
                 help='also time a training pass that recomputes features')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--json', default='', help='also write the figures here')
  p.add_argument('--merge', nargs='+', default=(), metavar='JSON',
                 help='only print the table of earlier --json outputs')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.merge:
    rows = []
    for path in args.merge:
      with open(path, encoding='utf-8') as f:
        rows.append(json.load(f))
    print(format_table(rows))
    return
  out = run(args)
  width = max(map(len, out))
  for k, v in out.items():
    print(f'{k:<{width}}  {v:.2f}' if isinstance(v, float) else
          f'{k:<{width}}  {v}')
  print()
  print(format_table([out]))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()

r"""A whole MVTec-AD-shaped run, timed per stage, with no data set needed.

The 15 categories with MVTec AD's real numbers of training and test images
(normal and defective) and their original image sizes; pixels are generated
on the fly (a random base photo per category, shifted per image, defects
pasted with masks), then resized and cropped by the same rules as
configs/mvtec.py (objects 256 -> crop 224, textures 256x256). WRN50-2 with
random weights (speed does not depend on them), configs/mvtec.py settings
(160 passes, batch 4), training + threshold + evaluation (scores, smoothed
maps, image/pixel AUROC and AUPRO) for every category. The numbers it
reports are meaningless (random weights, random pixels); the times are not.

  python benchmarks/mvtec_workload.py --json out.json                 # all
  python benchmarks/mvtec_workload.py --categories bottle,grid \
      --passes 2 --categories-per-step 2 --json cpu.json              # reduced

Prints and writes: wall seconds per stage (feature cache, training passes,
decision threshold, evaluation) per category and in total, and images/s.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from configs import mvtec
from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import config_checks
from simplenet_jax import data
from simplenet_jax import evaluate
from simplenet_jax import feature_cache
from simplenet_jax import loop
from simplenet_jax import parallel
from simplenet_jax import report
from simplenet_jax import view_check
from simplenet_jax.data import images
from simplenet_jax.data import mvtec as mvtec_data

# category: (train images, normal test images, defective test images,
# original side in pixels, grayscale). MVTec AD's published split.
MVTEC_SHAPE = {
    'bottle': (209, 20, 63, 900, False),
    'cable': (224, 58, 92, 1024, False),
    'capsule': (219, 23, 109, 1000, False),
    'carpet': (280, 28, 89, 1024, False),
    'grid': (264, 21, 57, 1024, True),
    'hazelnut': (391, 40, 70, 1024, False),
    'leather': (245, 32, 92, 1024, False),
    'metal_nut': (220, 22, 93, 700, False),
    'pill': (267, 26, 141, 800, False),
    'screw': (320, 41, 119, 1024, True),
    'tile': (230, 33, 84, 840, False),
    'toothbrush': (60, 12, 30, 1024, False),
    'transistor': (213, 60, 40, 1024, False),
    'wood': (247, 19, 60, 1024, False),
    'zipper': (240, 32, 119, 1024, True),
}


class GeneratedSplit:
  """One split of a category, decoded on the fly like image files would be:
  an original-size image is built, then resized/cropped by `geometry`."""

  def __init__(self, name, split, shape, geometry, seed):
    n_train, n_good, n_bad, side, gray = shape
    self.name, self.geometry, self.side = name, geometry, side
    self.has_masks = split == 'test'
    self.labels = (np.zeros(n_train, np.int32) if split == 'train' else
                   np.r_[np.zeros(n_good, np.int32), np.ones(n_bad, np.int32)])
    self.image_hw = geometry.output_hw((side, side))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (side // 4, side // 4, 1 if gray else 3),
                        dtype=np.uint8)
    # A smooth-ish photo at full size (upsampled noise), made once.
    self.base = np.asarray(PIL.Image.fromarray(
        base.squeeze(-1) if gray else base).resize((side, side)))
    self.seed = seed

  def __len__(self):
    return len(self.labels)

  def load(self, i):
    shift = (37 * i) % self.side
    img = np.roll(self.base, shift, axis=1)
    mask = np.zeros((self.side, self.side), np.float32)
    if self.labels[i]:
      rng = np.random.default_rng((self.seed, i))
      y, x = rng.integers(0, self.side * 3 // 4, size=2)
      h, w = rng.integers(self.side // 20, self.side // 5, size=2)
      img = img.copy()
      img[y:y + h, x:x + w] = 255
      mask[y:y + h, x:x + w] = 1.0
    im = PIL.Image.fromarray(img).convert('RGB')
    return images.transform_example(
        im, PIL.Image.fromarray(mask, mode='F'), self.geometry,
        expected_hw=self.image_hw, label=int(self.labels[i]),
        path=f'{self.name}/{i:03d}.png', defect='spot' if self.labels[i]
        else 'good')


class _Timer:
  """Wall seconds per stage and category, by wrapping library functions. A
  wrapped call inside another (train.augment=auto's check builds its views
  with feature_cache.build) counts for the outer stage only."""

  def __init__(self):
    self.rows = {}
    self._depth = 0

  def wrap(self, module, name, stage, category_of):
    real = getattr(module, name)

    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      self._depth += 1
      try:
        out = jax.block_until_ready(real(*args, **kwargs))
      finally:
        self._depth -= 1
      if not self._depth:
        self.add(category_of(*args), stage, time.perf_counter() - t0)
      return out
    setattr(module, name, timed)

  def add(self, cat, stage, seconds):
    row = self.rows.setdefault(cat, {})
    row[stage] = row.get(stage, 0.0) + seconds
    # Progress as it happens: a run cut off by a time limit still leaves
    # the stages it finished in its log.
    print(f'[{time.strftime("%H:%M:%S")}] {cat}: {stage} {seconds:.2f} s',
          flush=True)


def _pass_seconds(cat_dir: str) -> list[float]:
  """The wall seconds of each training pass, from the category's log.jsonl
  (a stacked group's passes are the group's)."""
  path = os.path.join(cat_dir, 'log.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return [r['pass_s'] for r in recs if 'pass_s' in r]


def _peak_device_mb():
  """The first device's peak memory in MB, where the backend reports it
  (GPUs, TPUs; None on a CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def run(args) -> dict:
  config = mvtec.get_config()
  config.backbone.random_init = True
  config.backbone.dtype = args.backbone_dtype
  config.dataset.categories = tuple(args.categories.split(','))
  config.dataset.num_workers = args.workers
  config.train.num_passes = args.passes
  config.train.checkpoint_every = max(args.passes, 1)
  config.train.categories_per_step = args.categories_per_step
  config.train.cache_dtype = args.cache_dtype
  config.train.augment = args.augment
  config.eval.batch_size = args.eval_batch
  config.eval.visualize = 'none'
  config.eval.feature_histogram = False
  config = config_checks.validate(config)
  timer = _Timer()
  if args.train_only:
    # Cache and training passes only: no decision threshold, no evaluation
    # (their compilations dominate a short run on a GPU).
    evaluate.decision_threshold = lambda ctx, state, cache=None: dict(
        threshold=0.0, threshold_quantile=config.threshold.quantile,
        threshold_source='skipped (--train-only)', map_range=(0.0, 1.0))
  # The cache is built inside the training stage: timed on its own and
  # taken out of 'train' below.
  timer.wrap(feature_cache, 'build', 'cache',
             lambda feature_fn, bvars, dataset, *rest: dataset.name)
  # train.augment=auto's check (before training), its builds included.
  timer.wrap(view_check, 'check_flips', 'view_check',
             lambda feature_fn, bvars, dataset, *rest: dataset.name)
  timer.wrap(evaluate, 'decision_threshold', 'threshold',
             lambda ctx, *rest: ctx.category)
  workdir = args.workdir or tempfile.mkdtemp(prefix='mvtec-workload-')
  mesh = parallel.make_mesh()
  t0 = time.perf_counter()
  module, bvars = backbones.load_for_run(config.backbone)
  bvars = parallel.put_replicated(bvars, mesh)
  cats = [c for c, _ in data.categories(config.dataset)]
  rows, group = [], config.train.categories_per_step
  for start in range(0, len(cats), group):
    ctxs = []
    for i, name in enumerate(cats[start:start + group]):
      kind = 'texture' if name in mvtec_data.TEXTURES else 'object'
      geometry = images.geometry_for(config.dataset, kind)
      seed = list(MVTEC_SHAPE).index(name)
      ctxs.append(category_lib.CategoryContext.from_datasets(
          config, workdir, name, kind, module, bvars, mesh,
          GeneratedSplit(name, 'train', MVTEC_SHAPE[name], geometry, seed),
          GeneratedSplit(name, 'test', MVTEC_SHAPE[name], geometry, seed)))
    t_train = time.perf_counter()
    if len(ctxs) == 1:
      trained = [loop.train_category(ctxs[0])]
    else:
      trained = loop.train_categories(ctxs)
    t_train = time.perf_counter() - t_train
    for ctx in ctxs:  # The group's training time, shared out by images.
      share = len(ctx.train_idx) / sum(len(c.train_idx) for c in ctxs)
      timer.add(ctx.category, 'train_total', t_train * share)
    for ctx, (state, meta) in zip(ctxs, trained):
      if args.train_only:
        continue
      t_eval = time.perf_counter()
      row = evaluate.evaluate_category(ctx, state, meta)
      timer.add(ctx.category, 'eval', time.perf_counter() - t_eval)
      rows.append(row)
  total = time.perf_counter() - t0
  per_cat = {}
  for name in cats:
    t = timer.rows.get(name, {})
    passes = t.get('train_total', 0.0) - t.get('cache', 0.0) - t.get(
        'threshold', 0.0)
    pass_s = _pass_seconds(os.path.join(workdir, name))
    per_cat[name] = {'cache_s': t.get('cache', 0.0),
                     'view_check_s': t.get('view_check', 0.0),
                     'passes_s': passes,
                     # The first pass compiles; the rest repeat one another.
                     'first_pass_s': pass_s[0] if pass_s else None,
                     'later_pass_median_s': (float(np.median(pass_s[1:]))
                                             if len(pass_s) > 1 else None),
                     'threshold_s': t.get('threshold', 0.0),
                     'eval_s': t.get('eval', 0.0),
                     'train_images': MVTEC_SHAPE[name][0],
                     'test_images': sum(MVTEC_SHAPE[name][1:3])}
  sums = {k: sum(r[k] for r in per_cat.values())
          for k in ('cache_s', 'view_check_s', 'passes_s', 'threshold_s',
                    'eval_s', 'train_images', 'test_images')}
  return {
      'categories': cats, 'passes': args.passes,
      'categories_per_step': group, 'backbone_dtype': args.backbone_dtype,
      'cache_dtype': args.cache_dtype, 'eval_batch': args.eval_batch,
      'devices': f'{mesh.size} x {jax.devices()[0].device_kind}',
      'total_s': total, 'stages': sums, 'per_category': per_cat,
      'train_img_s_per_pass': (sums['train_images'] * args.passes /
                               max(sums['passes_s'], 1e-9)),
      'table': report.results_table(rows) if rows else '',
      'load_avg_1min': os.getloadavg()[0], 'cpus': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
      'jax': jax.__version__, 'augment': args.augment,
      'peak_device_mb': _peak_device_mb(),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--categories', default='all')
  p.add_argument('--passes', type=int, default=160)
  p.add_argument('--categories-per-step', type=int, default=1)
  p.add_argument('--eval-batch', type=int, default=32)
  p.add_argument('--workers', type=int, default=8)
  p.add_argument('--backbone-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--cache-dtype', default='float32',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--augment', default='none',
                 choices=['none', 'flips', 'auto'],
                 help="train.augment (configs/mvtec.py: 'none'); 'auto' "
                 "times its check as 'view_check'")
  p.add_argument('--train-only', action='store_true',
                 help='feature cache and training passes only')
  p.add_argument('--workdir', default='')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  out = run(args)
  print(json.dumps({k: v for k, v in out.items() if k != 'table'}, indent=1))
  print(out['table'])
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()

"""Scoring new images with a trained model and its stored threshold.

Prints one JSON line per image: path, image score, the threshold, and the
decision (anomalous when score > threshold), and writes a heat-map PNG per
image. The threshold was fixed at training time from normal training images,
so no labelled test set is needed here.
"""

import glob
import json
import os

import jax
import numpy as np
import PIL.Image

from simplenet_jax import backbones
from simplenet_jax import checkpoint
from simplenet_jax import data
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import train
from simplenet_jax import visualize
from simplenet_jax.data import images
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError


def expand_inputs(spec: str) -> list[str]:
  """A file, a directory (its images, sorted) or a glob -> image paths."""
  if not spec:
    raise UserError('config.predict.inputs is empty: give a file, a directory '
                    "or a glob, e.g. --config.predict.inputs='photos/*.png'")
  if os.path.isdir(spec):
    paths = [str(p) for p in images.list_images(spec)]
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    paths = sorted(p for p in glob.glob(spec, recursive=True)
                   if os.path.isfile(p) and images.is_image_file(p))
  if not paths:
    raise UserError(f'config.predict.inputs={spec!r}: no image files found')
  return paths


def trained_category(workdir: str, category: str) -> str:
  """The category whose checkpoint to use (the only one, if not given)."""
  if category:
    return category
  found = sorted(d for d in os.listdir(workdir) if os.path.isdir(
      os.path.join(workdir, d, 'checkpoints'))) if os.path.isdir(workdir) else []
  if len(found) == 1:
    return found[0]
  if not found:
    raise UserError(f'no trained model in {workdir}: run --mode=train with '
                    'this --workdir first')
  raise UserError(f'{workdir} holds several trained categories ({found}); '
                  'choose one with --config.predict.category')


class _Inputs:
  """Image files brought to the trained model's input size."""

  def __init__(self, paths, geometry, image_hw):
    self.paths, self.geometry, self.image_hw = paths, geometry, tuple(image_hw)
    self.has_masks = False

  def __len__(self):
    return len(self.paths)

  def load(self, i):
    im = self.geometry.apply(images.load_rgb(self.paths[i]))
    if (im.height, im.width) != self.image_hw:
      # Without a crop another aspect ratio gives another size: match training.
      im = im.resize(self.image_hw[::-1], PIL.Image.Resampling.BILINEAR)
    h, w = self.image_hw
    return dict(image=np.asarray(im, np.uint8), mask=np.zeros((h, w), np.uint8),
                label=0, path=self.paths[i], defect='')


def run(config, workdir: str) -> list[dict]:
  category = trained_category(workdir, config.predict.category)
  ckpt_dir = os.path.join(os.path.abspath(workdir), category, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise UserError(f'no checkpoint for category {category!r} in {ckpt_dir}: '
                    'train it first or fix --config.predict.category')
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f'no checkpoint in {ckpt_dir}: train first')
    meta = ckpt.restore_meta(steps[-1])
  finally:
    ckpt.close()
  if 'threshold' not in meta:
    raise UserError(f'{ckpt_dir}: training has not finished (no decision '
                    'threshold yet); run --mode=train again to finish it')
  paths = expand_inputs(config.predict.inputs)
  # Heat maps are named by the path below the inputs' common folder, so that
  # a/001.png and b/001.png do not overwrite each other.
  common = os.path.commonpath([os.path.dirname(os.path.abspath(p))
                               for p in paths])
  paths = [os.path.abspath(p) for p in paths]

  mesh = parallel.make_mesh()
  module, backbone_vars = backbones.load_for_run(config.backbone)
  backbone_vars = parallel.put_replicated(backbone_vars, mesh)
  template = train.create_train_state(
      jax.random.PRNGKey(0), config.model, config.optim, meta['embed_dim'],
      meta['steps_per_pass'], config.train.num_passes)
  _, state, meta = checkpoint.require_latest(ckpt_dir, template)
  hw = tuple(meta['image_hw'])
  predict_fn = scoring.make_predict_fn(module, tuple(config.backbone.layers),
                                       config.model, hw, config.eval.sigma)
  geometry = data.geometry(config.dataset, meta['kind'])
  inputs = _Inputs(paths, geometry, hw)
  out_dir = os.path.join(workdir, 'predict', category)
  os.makedirs(out_dir, exist_ok=True)
  head = {'params': state.params, 'batch_stats': state.batch_stats}
  head = parallel.put_replicated(head, mesh)
  threshold = float(meta['threshold'])
  vmin, vmax = meta.get('map_range', (None, None))
  results = []
  with open(os.path.join(out_dir, 'predictions.jsonl'), 'w',
            encoding='utf-8') as log:
    for batch in loader.batches(inputs, config.eval.batch_size,
                                num_workers=config.dataset.num_workers,
                                prefetch=config.dataset.prefetch):
      x, n = parallel.put_batch(batch['image'], mesh)
      out = predict_fn(backbone_vars, head, x)
      scores = parallel.to_host(out['image_scores'])[:n]
      maps = parallel.to_host(out['anomaly_maps'])[:n]
      for path, image, score, amap in zip(batch['path'], batch['image'],
                                          scores, maps):
        name = visualize.safe_filename(
            os.path.relpath(path, common).replace(os.sep, '_'))
        png = os.path.join(out_dir, os.path.splitext(name)[0] + '.png')
        lo = float(amap.min()) if vmin is None else vmin
        hi = float(amap.max()) if vmax is None else vmax
        visualize.heatmap_png(amap, image, png, lo, hi,
                              caption=f'score {score:.4f} thr {threshold:.4f}')
        record = {'path': path, 'category': category,
                  'score': float(score), 'threshold': threshold,
                  'anomalous': bool(score > threshold), 'heatmap': png}
        print(json.dumps(record, ensure_ascii=False), flush=True)
        log.write(json.dumps(record, ensure_ascii=False) + '\n')
        results.append(record)
  return results

"""Scoring new images with a trained model and its stored threshold.

Prints one JSON line per image: path, image score, the threshold, and the
decision (anomalous when score > threshold), and writes a heat-map PNG per
image and predictions.html (the images sorted by score, with their heat
maps). The threshold was fixed at training time from normal training images,
so no labelled test set is needed here.
"""

import json
import os

from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import checkpoint
from simplenet_jax import data
from simplenet_jax import parallel
from simplenet_jax import report_html
from simplenet_jax import scoring
from simplenet_jax import visualize
from simplenet_jax.data import inputs as data_inputs
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError


def trained_category(workdir: str, category: str) -> str:
  """The category whose checkpoint to use (the only one, if not given)."""
  if category:
    return category
  found = category_lib.trained_categories(workdir)
  if len(found) == 1:
    return found[0]
  if not found:
    raise UserError(f'no trained model in {workdir}: run --mode=train with '
                    'this --workdir first')
  raise UserError(f'{workdir} holds several trained categories ({found}); '
                  'choose one with --config.predict.category')


def _check_meta(config, ckpt_dir):
  """A check that the checkpoint was trained on the config's backbone."""
  used = {'name': config.backbone.name, 'layers': list(config.backbone.layers)}

  def check(meta):
    trained = {'name': meta.get('backbone'), 'layers': meta.get('layers')}
    for key, value in trained.items():
      if value is not None and value != used[key]:
        raise UserError(
            f'config.backbone.{key} is {used[key]!r} but {ckpt_dir} was '
            f'trained with {value!r}; predict with the training config')
    scoring.check_score_rule(config.eval, meta, ckpt_dir)
  return check


def run(config, workdir: str) -> list[dict]:
  """Scores `config.predict.inputs`; returns one record per image."""
  category = trained_category(workdir, config.predict.category)
  ckpt_dir = category_lib.checkpoint_dir(workdir, category)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f'no checkpoint for category {category!r} in {ckpt_dir}: '
                    'train it first or fix --config.predict.category')
  latest = checkpoint.latest_meta(ckpt_dir)
  if latest is None:
    raise UserError(f'no loadable checkpoint in {ckpt_dir}: run --mode=train '
                    'with this --workdir first')
  meta = latest[1]
  check = _check_meta(config, ckpt_dir)
  check(meta)
  if 'threshold' not in meta:
    raise UserError(f'{ckpt_dir}: training has not finished (no decision '
                    'threshold yet); run --mode=train again to finish it')
  paths = data_inputs.expand_inputs(config.predict.inputs)
  # Heat maps are named by the path below the inputs' common folder, so that
  # a/001.png and b/001.png do not overwrite each other.
  common = os.path.commonpath([os.path.dirname(os.path.abspath(p))
                               for p in paths])
  paths = [os.path.abspath(p) for p in paths]

  mesh = parallel.make_mesh()
  module, backbone_vars = backbones.load_for_run(config.backbone)
  backbone_vars = parallel.put_replicated(backbone_vars, mesh)
  template = category_lib.template_for(config, meta)
  _, state, meta = checkpoint.require_latest(ckpt_dir, template,
                                             check_meta=check)
  if 'threshold' not in meta:
    raise UserError(f'{ckpt_dir}: the final checkpoint could not be loaded '
                    '(see the warnings above); run --mode=train again')
  hw = tuple(meta['image_hw'])
  _, predict_fn = scoring.run_predict_fn(config, module, backbone_vars, hw,
                                         meta.get('cells'), ckpt_dir)
  geometry = data.geometry(config.dataset, meta['kind'])
  inputs = data_inputs.ImageFiles(paths, geometry, hw)
  out_dir = os.path.join(workdir, 'predict', category)
  os.makedirs(out_dir, exist_ok=True)
  head = parallel.put_replicated(state.head_vars(), mesh)
  threshold = float(meta['threshold'])
  vmin, vmax = meta.get('map_range', (None, None))
  scale = visualize.display_scale(hw)
  results = []
  # A short last batch is padded to the others' shape (one compilation);
  # a single short batch is run as it is (padding would only add work).
  bs = config.eval.batch_size
  min_rows = bs if len(inputs) > bs else 0
  log_path = os.path.join(out_dir, 'predictions.jsonl')
  tmp_path = f'{log_path}.tmp{os.getpid()}'
  try:
    with open(tmp_path, 'w', encoding='utf-8') as log:
      for batch in loader.batches(inputs, config.eval.batch_size,
                                  num_workers=config.dataset.num_workers,
                                  prefetch=config.dataset.prefetch):
        x, n = parallel.put_batch(batch['image'], mesh, min_rows=min_rows)
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
          visualize.heatmap_png(
              amap, image, png, lo, hi, scale=scale,
              caption=f'score {score:.4f} thr {threshold:.4f}')
          record = {'path': path, 'category': category,
                    'score': float(score), 'threshold': threshold,
                    'anomalous': bool(score > threshold), 'heatmap': png}
          print(json.dumps(record, ensure_ascii=False), flush=True)
          log.write(json.dumps(record, ensure_ascii=False) + '\n')
          results.append(record)
    os.replace(tmp_path, log_path)  # Complete or absent, never half-written.
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
  if config.report.html:
    page = report_html.write_predictions(out_dir, results, category, threshold)
    print(f'predictions: {page}', flush=True)
  return results

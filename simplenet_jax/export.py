"""--mode=export: each trained category as files that ship without this code.

<workdir>/<category>/export/
  model.onnx       (N, H, W, 3) uint8 RGB -> scores (N,), maps (N, H, W)
                   float32: the backbone's normalisation, the head and the
                   maps' upsampling and Gaussian smoothing are all inside.
                   ONNX opset 17, N dynamic (`onnx_lowering`).
  model.jaxexport  the same function serialized with jax.export (StableHLO,
                   for CPU and CUDA, N symbolic): jax alone loads and runs it,
                   `jax.export.deserialize(data).call(images)`.
  metadata.json    the rest of what a runtime needs: how to bring a photo to
                   (H, W) (that stays outside the graph), the decision
                   threshold, provenance, library versions, each file's sha256.

`simplenet_jax.serve` is a runtime for these folders that needs neither JAX
nor this package.

The one part that depends on `model.method` is the scorer: `_scorer`
restores a category's trained state (a TrainState or a kNN memory bank) and
`scoring.make_export_fn` closes over it, fn(images uint8 (N, H, W, 3)) ->
(scores (N,), maps (N, H, W)). Everything else (the files, the checks, the
metadata) is shared.

A folder is written under a temporary name and renamed when complete; an
earlier export is replaced, a folder holding anything else is refused.
"""

import datetime
import json
import os
import platform
import re
import shutil
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import checkpoint
from simplenet_jax import data
from simplenet_jax import onnx_lowering
from simplenet_jax import scoring
from simplenet_jax import serve
from simplenet_jax.errors import UserError

# The folder's format is the runtime's (serve.py needs no JAX, so it holds
# the definitions and export imports them).
FORMAT = serve.FORMAT
FORMAT_VERSION = serve.FORMAT_VERSION
ONNX_FILE = serve.ONNX_FILE
JAX_FILE = 'model.jaxexport'
META_FILE = serve.META_FILE
FILES = (ONNX_FILE, JAX_FILE, META_FILE)
INPUT_NAME = 'images'
OUTPUT_NAMES = ('scores', 'maps')
_IMAGE_SCORE_WHAT = {  # eval.image_score
    'patch_max': 'image anomaly score (max patch score)',
    'map_max': 'image anomaly score (max of the anomaly map)'}
BATCH_DIM = 'N'
PLATFORMS = ('cpu', 'cuda')
_TMP_PREFIX = '.export-tmp-'


def export_dir(workdir: str, category: str) -> str:
  """<workdir>/<category>/export, absolute."""
  return os.path.join(os.path.abspath(workdir), category, 'export')


# ---- scorers: model.method -> the function to export ------------------------


def _scorer(config, ckpt_dir: str, meta: dict) -> Callable:
  """Restores the trained state once; returns build(backbone module,
  backbone variables) -> fn(images) -> (scores, maps), jittable with a
  symbolic batch. `build` is called with the backbone as predict runs it
  (for jax.export) and with `backbones.onnx_variant` of it."""
  template = category_lib.template_for(config, meta)
  _, state, _ = checkpoint.require_latest(ckpt_dir, template,
                                          check_meta=_fingerprint_check(
                                              config, ckpt_dir))
  head = state.head_vars()
  cells = []  # Stored, or measured with the first backbone; the ONNX variant
  # reuses them.

  def build(module, backbone_vars):
    if not cells:
      cells.append(scoring.cells_for(config.eval, module,
                                     config.backbone.layers, config.model,
                                     backbone_vars, meta['image_hw'],
                                     meta.get('cells'), ckpt_dir))
    return scoring.make_export_fn(module, config.backbone.layers,
                                  config.model, backbone_vars, head,
                                  meta['image_hw'], config.eval, cells[0])
  return build


# ---- checks, before any work --------------------------------------------------


def _fingerprint_check(config, ckpt_dir: str):
  def check(meta):
    if meta.get('fingerprint') != category_lib.fingerprint(config):
      raise UserError(
          f'{ckpt_dir} was written with a different config (backbone, model, '
          'optim, seed, batch size or number of passes); export with the '
          'config it was trained with')
    scoring.check_score_rule(config.eval, meta, ckpt_dir)
  return check


def _requested(config, workdir: str) -> list[str]:
  """The configured categories to export: each one named in
  dataset.categories (which must be trained), or every trained one of the
  config's when it says 'all'."""
  trained = category_lib.trained_categories(workdir)
  if not trained:
    raise UserError(f'no trained model in {os.path.abspath(workdir)}: run '
                    '--mode=train with this --workdir (and config) first')
  explicit = list(config.dataset.categories) not in ([], ['all'])
  names = [name for name, _ in data.categories(config.dataset)]
  if not explicit:
    found = [n for n in names if n in trained]
    if not found:
      raise UserError(
          f'{os.path.abspath(workdir)} holds no trained category of this '
          f'config (trained: {", ".join(trained)}); set '
          '--config.dataset.categories or use the training config')
    return found
  for n in names:
    if n not in trained:
      raise UserError(
          f'category {n!r} was not trained in {os.path.abspath(workdir)} (no '
          f'{category_lib.checkpoint_dir(workdir, n)}; trained: '
          f'{", ".join(trained)}); train it first or fix '
          '--config.dataset.categories')
  return names


def is_own_export(path: str) -> bool:
  """Whether `path` holds nothing but an export (or is absent/empty)."""
  if not os.path.lexists(path):
    return True
  if not os.path.isdir(path) or os.path.islink(path):
    return False
  entries = os.listdir(path)
  if not entries:
    return True
  if any(e not in FILES for e in entries):
    return False
  try:
    with open(os.path.join(path, META_FILE), encoding='utf-8') as f:
      return json.load(f).get('format') == FORMAT
  except (OSError, ValueError, AttributeError):
    # Only our file names, but no readable metadata: an export cut short
    # by hand or a damaged one; ours to replace.
    return True


def _check_target(path: str) -> None:
  if not is_own_export(path):
    what = (', '.join(sorted(os.listdir(path))[:5]) if os.path.isdir(path)
            else 'a file')
    raise UserError(
        f'{path} holds something that is not an export ({what}); move it '
        'away or delete it, then export again')


def _checked_meta(config, workdir: str, category: str) -> tuple[str, dict]:
  ckpt_dir = category_lib.checkpoint_dir(workdir, category)
  latest = checkpoint.latest_meta(ckpt_dir)
  if latest is None:
    raise UserError(f'no loadable checkpoint in {ckpt_dir}: run --mode=train '
                    'with this --workdir first')
  meta = latest[1]
  _fingerprint_check(config, ckpt_dir)(meta)
  if 'threshold' not in meta:
    raise UserError(f'{ckpt_dir}: training has not finished (no decision '
                    'threshold yet); run --mode=train again to finish it')
  return ckpt_dir, meta


# ---- the files ----------------------------------------------------------------


def _versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'numpy': np.__version__, 'onnx': onnx.__version__}


def _quantile(meta: dict, config) -> float:
  if 'threshold_quantile' in meta:
    return float(meta['threshold_quantile'])
  # Checkpoints written before threshold_quantile was stored say it in words.
  m = re.match(r'quantile ([0-9.eE+-]+) ', meta.get('threshold_source', ''))
  return float(m.group(1)) if m else float(config.threshold.quantile)


def geometry_record(geometry) -> dict:
  """The resize/crop rule, as data and in words (runtimes apply it)."""
  if geometry.square:
    rule = (f'resize to {geometry.square}x{geometry.square} (PIL bilinear), '
            'no crop')
  else:
    rule = (f'resize the shorter side to {geometry.shorter} and the longer '
            f'to int({geometry.shorter} * long / short) (PIL bilinear, '
            "torchvision's Resize(int))")
    if geometry.crop:
      rule += (f', then center-crop {geometry.crop}x{geometry.crop} (top = '
               f'round((h - {geometry.crop}) / 2), left likewise)')
  rule += '; if the result is not the model\'s image_size, resize to it (PIL bilinear)'
  return {'shorter': geometry.shorter, 'square': geometry.square,
          'crop': geometry.crop, 'resample': 'bilinear', 'rule': rule}


def metadata(config, category: str, meta: dict, files: dict) -> dict:
  """metadata.json's content for one category."""
  spec = backbones.get_spec(config.backbone.name)
  geometry = data.geometry(config.dataset, meta['kind'])
  h, w = (int(v) for v in meta['image_hw'])
  return {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'category': category,
      'kind': meta['kind'],
      'method': config.model.method,
      'backbone': config.backbone.name,
      'layers': list(config.backbone.layers),
      # What predict and model.jaxexport compute the backbone in; model.onnx
      # computes it in float32 (`backbones.onnx_variant`).
      'backbone_dtype': config.backbone.dtype,
      'onnx_backbone_dtype': 'float32',
      'image_size': [h, w],
      'input': {'name': INPUT_NAME, 'dtype': 'uint8', 'layout': 'NHWC',
                'shape': [BATCH_DIM, h, w, 3], 'channels': 'RGB'},
      'outputs': {
          OUTPUT_NAMES[0]: {'dtype': 'float32', 'shape': [BATCH_DIM],
                            'what': _IMAGE_SCORE_WHAT[
                                config.eval.image_score]},
          OUTPUT_NAMES[1]: {'dtype': 'float32', 'shape': [BATCH_DIM, h, w],
                            'what': 'anomaly map, bilinearly upsampled and '
                                    f'Gaussian-smoothed (sigma '
                                    f'{float(config.eval.sigma)})'}},
      'preprocess': {
          'decode': ('EXIF orientation applied; converted to 8-bit RGB '
                     "(alpha dropped as PIL's convert('RGB'); 16-bit grey "
                     'scaled by round(v / 257))'),
          'geometry': geometry_record(geometry)},
      'normalisation': {'in_graph': True, 'scale': 'x / 255',
                        'mean': list(spec.mean), 'std': list(spec.std)},
      'threshold': float(meta['threshold']),
      'threshold_quantile': _quantile(meta, config),
      'threshold_source': meta.get('threshold_source', ''),
      'decision': 'anomalous when score > threshold',
      'map_range': meta.get('map_range'),
      'sigma': float(config.eval.sigma),
      'image_score': config.eval.image_score,
      # 'flips': the graph scores each image and its three flips and
      # averages the patch scores (eval.tta).
      'tta': config.eval.tta,
      # 'sigmoid': the head's patch scores go through sigmoid(score /
      # margin) before the map, not before the image score (eval.squash;
      # never for kNN).
      'squash': ('none' if scoring.squash_scale(config.model,
                                                config.eval.squash) == 0.0
                 else config.eval.squash),
      # 'measured': the map draws each grid cell at its receptive field's
      # centroid, as training measured it (stored with the threshold; for
      # a checkpoint from before that, measured at export) (eval.cells;
      # simplenet_jax/cells.py).
      'cells': config.eval.cells,
      'passes_done': meta.get('passes_done'),
      'config_fingerprint': meta.get('fingerprint'),
      'model_config': config.model.to_dict(),
      'onnx_opset': onnx_lowering.OPSET,
      'jax_export_platforms': list(PLATFORMS),
      'versions': _versions(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'files': files,
  }


def _write_files(tmp: str, fn_jax: Callable, fn_onnx: Callable, hw,
                 category: str) -> dict:
  """model.onnx and model.jaxexport into `tmp`; returns their records."""
  (n,) = jax.export.symbolic_shape(BATCH_DIM)
  spec = jax.ShapeDtypeStruct((n, int(hw[0]), int(hw[1]), 3), jnp.uint8)
  model = onnx_lowering.to_onnx(
      fn_onnx, [spec], [INPUT_NAME], list(OUTPUT_NAMES),
      doc=f'simplenet_jax export of {category}: see metadata.json')
  onnx_path = os.path.join(tmp, ONNX_FILE)
  with open(onnx_path, 'wb') as f:
    f.write(model.SerializeToString())
  exported = jax.export.export(jax.jit(fn_jax), platforms=PLATFORMS)(spec)
  jax_path = os.path.join(tmp, JAX_FILE)
  with open(jax_path, 'wb') as f:
    f.write(exported.serialize())
  return {name: {'sha256': serve.sha256(os.path.join(tmp, name)),
                 'bytes': os.path.getsize(os.path.join(tmp, name))}
          for name in (ONNX_FILE, JAX_FILE)}


def export_category(config, workdir: str, category: str, module,
                    backbone_vars, ckpt_dir: str, meta: dict) -> str:
  """Writes <workdir>/<category>/export; returns its path."""
  target = export_dir(workdir, category)
  parent = os.path.dirname(target)
  for e in os.listdir(parent):  # Left by an export that was killed.
    if e.startswith(_TMP_PREFIX):
      shutil.rmtree(os.path.join(parent, e), ignore_errors=True)
  build = _scorer(config, ckpt_dir, meta)
  fn_jax = build(module, backbone_vars)
  fn_onnx = build(backbones.onnx_variant(module), backbone_vars)
  tmp = os.path.join(parent, f'{_TMP_PREFIX}{os.getpid()}')
  old = os.path.join(parent, f'{_TMP_PREFIX}{os.getpid()}-old')
  os.makedirs(tmp)
  try:
    files = _write_files(tmp, fn_jax, fn_onnx, meta['image_hw'], category)
    record = metadata(config, category, meta, files)
    with open(os.path.join(tmp, META_FILE), 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
    _check_target(target)  # Still ours (nothing was put there meanwhile).
    if os.path.lexists(target):
      os.rename(target, old)
    os.rename(tmp, target)
  finally:
    for d in (tmp, old):
      if os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
  return target


def run(config, workdir: str) -> list[dict]:
  """Exports every requested trained category; returns one record each
  (category, path, files). Everything is checked before the backbone loads."""
  todo = []
  for category in _requested(config, workdir):
    ckpt_dir, meta = _checked_meta(config, workdir, category)
    _check_target(export_dir(workdir, category))
    todo.append((category, ckpt_dir, meta))
  module, backbone_vars = backbones.load_for_run(config.backbone)
  out = []
  for category, ckpt_dir, meta in todo:
    path = export_category(config, workdir, category, module, backbone_vars,
                           ckpt_dir, meta)
    with open(os.path.join(path, META_FILE), encoding='utf-8') as f:
      files = json.load(f)['files']
    sizes = ', '.join(f'{k} {v["bytes"] / 1e6:.1f} MB' for k, v in
                      files.items())
    print(f'{category}: exported to {path} ({sizes})', flush=True)
    logging.info('%s: threshold %.6g', category, meta['threshold'])
    out.append({'category': category, 'path': path, 'files': files})
  print(f'Run it: python -m simplenet_jax.serve --model {out[0]["path"]} '
        "predict 'photos/*.png'", flush=True)
  return out

"""What main.py runs: train / eval / predict / export over the configured
categories."""

import json
import logging as logging_std
import os

from absl import logging
import jax
import numpy as np

from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import config_checks
from simplenet_jax import data
from simplenet_jax import evaluate
from simplenet_jax import loop
from simplenet_jax import parallel
from simplenet_jax import predict
from simplenet_jax import report
from simplenet_jax.data import checks as data_checks
from simplenet_jax.errors import UserError


class _LogFilter(logging_std.Filter):
  """Orbax logs every save at INFO: keep its warnings, drop the chatter. A
  data-layer warning (a skipped file) is shown once per run, although the
  file lists are read twice (`check_data`, then for training)."""

  def __init__(self):
    super().__init__()
    self.seen = set()

  def filter(self, record):
    if '/orbax/' in record.pathname:
      return record.levelno >= logging_std.WARNING
    if (record.levelno == logging_std.WARNING and
        f'{os.sep}simplenet_jax{os.sep}data{os.sep}' in record.pathname):
      message = record.getMessage()
      if message in self.seen:
        return False
      self.seen.add(message)
    return True


_LOG_FILTER = _LogFilter()


def _check_checkpoints(workdir: str, categories) -> None:
  for category, _ in categories:
    d = category_lib.checkpoint_dir(workdir, category)
    if not os.path.isdir(d):
      raise UserError(f'no checkpoint in {d}: run with --mode=train and the '
                      'same --workdir (and config) first')


def _keep_tfds_in_workdir(config, workdir: str) -> None:
  """mvtec_tfds prepares records: in the workdir unless a dir is given."""
  d = config.dataset
  if d.kind == 'mvtec_tfds' and not d.tfds_data_dir:
    d.tfds_data_dir = os.path.join(os.path.abspath(workdir),
                                   'tensorflow_datasets')
    logging.info('mvtec_tfds: preparing records under %s '
                 '(config.dataset.tfds_data_dir)', d.tfds_data_dir)


def run(config, workdir: str, mode: str) -> list[dict]:
  """Runs `mode` and returns the table rows (one dict per category).

  Everything that can be checked cheaply is checked before any work starts:
  the config (`config_checks.validate`), every category's data files
  (`data.checks.check_data`), the checkpoints (eval), then the backbone's weights.
  Nothing is written to `workdir` before these checks pass (the demo kind
  generates its data there first).
  """
  if mode not in ('train', 'eval', 'predict', 'export'):
    raise ValueError(
        f'mode must be train, eval, predict or export, got {mode!r}')
  handler = logging.get_absl_handler()
  if _LOG_FILTER not in handler.filters:
    handler.addFilter(_LOG_FILTER)
  _LOG_FILTER.seen.clear()
  config = config_checks.validate(config)
  parallel.maybe_initialize_distributed(config.parallel)
  if mode == 'predict':
    predict.run(config, workdir)
    return []
  if mode == 'export':
    # Imported here: only export needs the onnx package.
    from simplenet_jax import export  # pylint: disable=g-import-not-at-top
    export.run(config, workdir)
    return []
  _keep_tfds_in_workdir(config, workdir)
  categories = data.categories(config.dataset)
  data_checks.check_data(config.dataset, workdir, categories)
  if mode == 'eval':
    _check_checkpoints(workdir, categories)
  module, backbone_vars = backbones.load_for_run(config.backbone)
  mesh = parallel.make_mesh()
  backbone_vars = parallel.put_replicated(backbone_vars, mesh)
  os.makedirs(workdir, exist_ok=True)
  logging.info('%s on %d categories, %d device(s): %s', mode, len(categories),
               mesh.size, jax.devices()[0].platform)
  rows = []
  group = config.train.categories_per_step if mode == 'train' else 1
  for start in range(0, len(categories), group):
    ctxs = [category_lib.CategoryContext.create(config, workdir, category,
                                                kind, module, backbone_vars,
                                                mesh)
            for category, kind in categories[start:start + group]]
    if mode != 'train':
      trained = [ctx.restore_trained() for ctx in ctxs]
    elif len(ctxs) == 1:
      trained = [loop.train_category(ctxs[0])]
    else:
      trained = loop.train_categories(ctxs)
    for ctx, (state, meta) in zip(ctxs, trained):
      row = evaluate.evaluate_category(ctx, state, meta)
      rows.append(row)
      _print_category(row)
  table = report.results_table(rows)
  print(table)
  extra = {'mode': mode, 'config': json.loads(config.to_json_best_effort()),
           'devices': [str(d) for d in jax.devices()]}
  selected = [dict(r, **r['best_on_test']) for r in rows if 'best_on_test' in r]
  if selected:
    print(report.results_table(selected, note=(
        'TEST-SET SELECTED: each row is the best evaluated pass chosen on the '
        'test set (the released code\'s protocol), not the final model.')))
    extra['test_set_selected'] = selected
  if jax.process_index() == 0:
    paths = report.write_results(workdir, rows, extra)
    logging.info('Wrote %s', ', '.join(paths))
  return rows


def _print_category(row: dict) -> None:
  def pct(x):
    return 'n/a' if x is None or np.isnan(x) else f'{100 * x:.2f}'
  print(f"{row['category']}: I-AUROC {pct(row['image_auroc'])}  "
        f"P-AUROC {pct(row['pixel_auroc'])}  AUPRO {pct(row['aupro'])}",
        flush=True)

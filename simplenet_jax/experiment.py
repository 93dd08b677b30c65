"""What main.py runs: train / eval / predict over the configured categories."""

import json
import logging as logging_std
import os
import zlib

from absl import logging
import jax
import numpy as np

from simplenet_jax import backbones
from simplenet_jax import config_checks
from simplenet_jax import data
from simplenet_jax import evaluate
from simplenet_jax import parallel
from simplenet_jax import predict
from simplenet_jax import report
from simplenet_jax import train


def category_key(seed: int, category: str) -> jax.Array:
  """A PRNG key per category, stable across runs and category subsets."""
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            zlib.crc32(category.encode()) & 0x7FFFFFFF)


def checkpoint_dir(workdir: str, category: str) -> str:
  return os.path.join(os.path.abspath(workdir), category, 'checkpoints')


class _QuietOrbax(logging_std.Filter):
  """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or (
        '/orbax/' not in record.pathname)


def run(config, workdir: str, mode: str) -> list[dict]:
  """Runs `mode` and returns the table rows (one dict per category)."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
  config = config_checks.validate(config)
  parallel.maybe_initialize_distributed(config.parallel)
  os.makedirs(workdir, exist_ok=True)
  if mode == 'predict':
    predict.run(config, workdir)
    return []
  mesh = parallel.make_mesh()
  module, backbone_vars = backbones.load_for_run(config.backbone)
  backbone_vars = parallel.put_replicated(backbone_vars, mesh)
  categories = data.categories(config.dataset)
  logging.info('%s on %d categories, %d device(s): %s', mode, len(categories),
               mesh.size, jax.devices()[0].platform)
  rows = []
  for category, kind in categories:
    ctx = train.CategoryContext.create(config, workdir, category, kind, module,
                                       backbone_vars, mesh)
    if mode == 'train':
      state, meta = train.train_category(ctx)
    else:
      state, meta = train.restore_trained(ctx)
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

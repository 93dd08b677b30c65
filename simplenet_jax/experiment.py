"""What main.py runs: train / eval / predict / export over the configured
categories."""

import contextlib
import json
import os
import time

from absl import logging
import jax
import numpy as np

from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import config_checks
from simplenet_jax import console
from simplenet_jax import data
from simplenet_jax import evaluate
from simplenet_jax import loop
from simplenet_jax import parallel
from simplenet_jax import predict
from simplenet_jax import report
from simplenet_jax import report_html
from simplenet_jax import summaries
from simplenet_jax import yardstick
from simplenet_jax.data import checks as data_checks
from simplenet_jax.errors import UserError


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
  started = time.perf_counter()
  console.attach_filter()
  config = config_checks.validate(config)
  parallel.maybe_initialize_distributed(config.parallel)
  if mode == 'predict':
    if os.path.isdir(workdir):  # Else predict stops before writing anything.
      console.start_log_file(workdir)
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
  t = time.perf_counter()
  module, backbone_vars = backbones.load_for_run(config.backbone)
  mesh = parallel.make_mesh()
  backbone_vars = parallel.put_replicated(backbone_vars, mesh)
  timings = {'backbone': time.perf_counter() - t, 'categories': {}}
  os.makedirs(workdir, exist_ok=True)
  console.start_log_file(workdir)
  logging.info('%s on %d categories, %d device(s): %s', mode, len(categories),
               mesh.size, jax.devices()[0].platform)
  rows = []
  group = config.train.categories_per_step if mode == 'train' else 1
  for start in range(0, len(categories), group):
    clock = _Stages()
    ctxs = [category_lib.CategoryContext.create(config, workdir, category,
                                                kind, module, backbone_vars,
                                                mesh)
            for category, kind in categories[start:start + group]]
    clock.lap('setup')
    with contextlib.ExitStack() as stack:
      tbs = [stack.enter_context(summaries.open_category(config, ctx.workdir))
             for ctx in ctxs]
      if mode != 'train':
        trained = [ctx.restore_trained() for ctx in ctxs]
      elif len(ctxs) == 1:
        trained = [loop.train_category(ctxs[0], tbs[0])]
      else:
        trained = loop.train_categories(ctxs, tbs)
      # Categories trained together share this lap (one wall time).
      clock.lap('train' if mode == 'train' else 'restore')
      for ctx, tb, (state, meta) in zip(ctxs, tbs, trained):
        laps = dict(clock.laps)
        bank = None
        if ctx.runs_yardstick:  # Fitted first: the test set is scored once.
          bank = yardstick.memory_bank(ctx)
          clock.lap('kNN yardstick')
          laps['kNN yardstick'] = clock.laps['kNN yardstick']
        row = evaluate.evaluate_category(ctx, state, meta, tb=tb,
                                         step=int(meta['passes_done']),
                                         bank=bank)
        del bank  # Not kept past the evaluation: it may be large.
        clock.lap('evaluate')
        laps['evaluate'] = clock.laps['evaluate']
        if ctx.runs_yardstick:
          log = report_html.read_log(ctx.workdir)
          hint = yardstick.advice(row, log[-1] if log else {}, config.model,
                                  meta.get('saturated_at'), config.train,
                                  meta.get('stopped_at'))
          if hint:
            row['advice'] = hint
        if config.eval.synthetic_defects:
          row.update(evaluate.synthetic_check(ctx, state))
          clock.lap('synthetic defects')
          laps['synthetic defects'] = clock.laps['synthetic defects']
        if len(ctxs) > 1:
          laps['trained_with'] = [c.category for c in ctxs]
        timings['categories'][ctx.category] = laps
        rows.append(row)
        _print_category(row, laps)
        if row.get('advice'):
          print(f"hint: {row['advice']}", flush=True)
  table = report.results_table(rows)
  print(table)
  timings['total'] = time.perf_counter() - started
  extra = {'mode': mode, 'config': json.loads(config.to_json_best_effort()),
           'devices': [str(d) for d in jax.devices()], 'timings': timings}
  selected = [dict(r, **r['best_on_test']) for r in rows if 'best_on_test' in r]
  if selected:
    print(report.results_table(selected, note=(
        'TEST-SET SELECTED: each row is the best evaluated pass chosen on the '
        'test set (the released code\'s protocol), not the final model.')))
    extra['test_set_selected'] = selected
  if jax.process_index() == 0:
    paths = report.write_results(workdir, rows, extra)
    logging.info('Wrote %s', ', '.join(paths))
    _write_report(config, workdir)
  return rows


class _Stages:
  """Wall time of a category's stages, in seconds."""

  def __init__(self):
    self.laps = {}
    self._t = time.perf_counter()

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    self.laps[stage] = now - self._t
    self._t = now


def _write_report(config, workdir: str) -> None:
  """report.html, then where to look: the end of what the console shows."""
  if config.report.html:
    try:
      path = report_html.write_report(workdir)
    except Exception as e:  # pylint: disable=broad-except
      # The results are saved; a figure that fails must not fail the run.
      logging.warning('report.html could not be written (%s: %s); render it '
                      'with python -m simplenet_jax.report_html %s',
                      type(e).__name__, e, workdir)
    else:
      print(f'report: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)')
  if config.report.tensorboard:
    print(f'curves: tensorboard --logdir {workdir}')
  if console.log_path():
    print(f'log: {console.log_path()}')


def _print_category(row: dict, laps: dict) -> None:
  def pct(x):
    return 'n/a' if x is None or np.isnan(x) else f'{100 * x:.2f}'

  def named(d):  # The three metrics of a row, or of a defect type.
    return (f"I-AUROC {pct(d['image_auroc'])}  P-AUROC "
            f"{pct(d['pixel_auroc'])}  AUPRO {pct(d['aupro'])}")

  def bare(d, keys):  # kNN's three, in the same order.
    return ' / '.join(pct(d[k]) for k in keys)

  times = ', '.join(f'{k} {v:.0f} s' for k, v in laps.items()
                    if k != 'setup' and isinstance(v, float))
  extra = ''
  if report.YARDSTICK[0] in row:
    extra = f'  [kNN on the same features: {bare(row, report.YARDSTICK)}]'
  if 'synthetic_pixel_auroc' in row:  # eval.synthetic_defects.
    extra += ('  [synthetic defects: P-AUROC '
              f"{pct(row['synthetic_pixel_auroc'])}]")
  flagged = ''
  if 'decisions' in row:  # What the stored decision threshold does.
    d = row['decisions']
    flagged = (f", flagged at the threshold: {d['caught']}/{d['anomalous']} "
               f"anomalous, {d['false_alarms']}/{d['normal']} normal")
  print(f"{row['category']}: {named(row)}{extra}  "
        f"({row['kind']}, {row['n_test']} test images{flagged}; {times}"
        f"{report.shared_lap(row['category'], laps)})",
        flush=True)
  # Each defect type against every normal test image (a final evaluation of
  # a test set with two or more types: metrics.by_defect).
  knn_types = row.get('knn_by_defect', {})
  for kind, figures in row.get('by_defect', {}).items():
    knn = ''
    if kind in knn_types:
      knn = f'  [kNN: {bare(knn_types[kind], report.METRICS)}]'
    caught = ''
    if 'caught' in figures:
      caught = f"  (caught at the threshold: {figures['caught']}/{figures['n']})"
    print(f"  {row['category']}/{kind}, {figures['n']} images: "
          f"{named(figures)}{knn}{caught}", flush=True)

"""The paper's results table (markdown) and results.json / results.csv.

A row is {'category', 'kind' ('texture' | 'object' | other), 'image_auroc',
'pixel_auroc', 'aupro'} with metrics as fractions in [0, 1] or nan (None is
read as nan). Means skip nan; a mean of nothing but nan is nan; nan prints
as "n/a".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile

import numpy as np

METRICS = ('image_auroc', 'pixel_auroc', 'aupro')
HEADERS = ('I-AUROC %', 'P-AUROC %', 'AUPRO %')
# eval.yardstick: the same metrics of kNN on the same features
# (`evaluate.evaluate_category` with `yardstick.memory_bank`), columns after
# the model's own.
YARDSTICK = tuple(f'knn_{m}' for m in METRICS)
YARDSTICK_HEADERS = ('kNN I-AUROC %', 'kNN P-AUROC %', 'kNN AUPRO %')
# Mean rows: (key in results.json, label in the table and results.csv, kinds).
MEAN_ROWS = (('texture', 'texture mean', ('texture',)),
             ('object', 'object mean', ('object',)),
             ('all', 'mean', None))


def shared_lap(category: str, laps: dict) -> str:
  """' (train time shared with a, b)' when the category trained in a
  train.categories_per_step group (one training lap for the group, stacked
  or not; `laps['trained_with']` lists its categories), else ''."""
  others = [c for c in laps.get('trained_with') or () if c != category]
  return f" (train time shared with {', '.join(others)})" if others else ''


def _value(row: dict, key: str) -> float:
  v = row.get(key)
  v = float('nan') if v is None else float(v)
  if not math.isnan(v) and not 0.0 <= v <= 1.0:
    raise ValueError(f"results row {row.get('category')!r}: {key}={v} is not "
                     'a fraction in [0, 1] (pass fractions, not percent).')
  return v


def _nanmean(values) -> float:
  vals = [v for v in values if not math.isnan(v)]
  return sum(vals) / len(vals) if vals else float('nan')


def columns(rows: list[dict]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(keys, headers) of the metric columns: METRICS, then YARDSTICK when a
  row has the kNN yardstick's figures."""
  if any(YARDSTICK[0] in r for r in rows):
    return METRICS + YARDSTICK, HEADERS + YARDSTICK_HEADERS
  return METRICS, HEADERS


def means(rows: list[dict]) -> dict[str, dict[str, float]]:
  """{'texture': {...}, 'object': {...}, 'all': {...}} metric means (nan
  skipped) of every column (`columns`); a group with no rows is left out."""
  keys, _ = columns(rows)
  out = {}
  for key, _, kinds in MEAN_ROWS:
    group = [r for r in rows if kinds is None or r.get('kind') in kinds]
    if group:
      out[key] = {m: _nanmean(_value(r, m) for r in group) for m in keys}
  return out


def _pct(v: float) -> str:
  return 'n/a' if math.isnan(v) else f'{100.0 * v:.1f}'


def _cell(text) -> str:
  return str(text).replace('|', r'\|').replace('\n', ' ')


def results_table(rows: list[dict], note: str | None = None) -> str:
  """Markdown table: one line per category, then the texture, object and
  overall means (percent, one decimal).

  Args:
    rows: result rows (see the module docstring), in display order.
    note: an optional line above the table, e.g. 'test-set selected'.
  """
  keys, headers = columns(rows)
  lines = []
  if note:
    lines += [f'_{_cell(note)}_', '']
  lines.append('| Category | Kind | ' + ' | '.join(headers) + ' |')
  lines.append('|---|---|' + '---:|' * len(headers))
  for r in rows:
    vals = [_pct(_value(r, m)) for m in keys]
    lines.append(f"| {_cell(r.get('category', ''))} | "
                 f"{_cell(r.get('kind', ''))} | " + ' | '.join(vals) + ' |')
  avg = means(rows)
  for key, label, _ in MEAN_ROWS:
    if key in avg:
      vals = [_pct(avg[key][m]) for m in keys]
      lines.append(f'| **{label}** | | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines) + '\n'


def _jsonable(x):
  """Plain JSON values: nan/inf -> None, numpy -> Python, other -> str."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if x is None or isinstance(x, str):
    return x
  if hasattr(x, 'to_dict'):  # ml_collections.ConfigDict.
    return _jsonable(x.to_dict())
  return str(x)


def _atomic_write(path: str, text: str):
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-',
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_results(workdir: str, rows: list[dict],
                  extra: dict | None = None) -> tuple[str, str]:
  """Writes workdir/results.json and workdir/results.csv atomically.

  results.json: {'rows': [...], 'means': means(rows), 'extra': extra}, nan
  as null. results.csv: columns category, kind and the three metrics (and
  the kNN yardstick's three, `columns`) as fractions (nan as 'nan'), then
  the mean rows with kind 'mean'.

  Returns:
    (json_path, csv_path).
  """
  keys, _ = columns(rows)
  clean = [dict(r, **{m: _value(r, m) for m in keys}) for r in rows]
  avg = means(clean)
  doc = {'rows': clean, 'means': avg, 'extra': extra or {}}
  json_path = os.path.join(workdir, 'results.json')
  csv_path = os.path.join(workdir, 'results.csv')
  _atomic_write(json_path, json.dumps(_jsonable(doc), indent=2,
                                      ensure_ascii=False) + '\n')
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(('category', 'kind') + keys)
  for r in clean:
    w.writerow([r.get('category', ''), r.get('kind', '')] +
               [repr(r[m]) for m in keys])
  for key, label, _ in MEAN_ROWS:
    if key in avg:
      w.writerow([label, 'mean'] + [repr(avg[key][m]) for m in keys])
  _atomic_write(csv_path, buf.getvalue())
  return json_path, csv_path

r"""The HTML report: <workdir>/report.html and predict's predictions.html.

One self-contained file each: inline CSS, every image embedded as a data:
URI, no script, nothing fetched, so it opens from disk anywhere (and can be
mailed). report.html is rendered from the workdir alone: results.json (the
table and the run), each category's evaluation record (`eval_record`),
log.jsonl (training curves) and feature_std.png, so

  python -m simplenet_jax.report_html runs/mvtec

renders it again without JAX or the data set.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import sys

import ml_collections
import numpy as np
from PIL import Image

from simplenet_jax import augments
from simplenet_jax import data
from simplenet_jax import eval_record
from simplenet_jax import metrics
from simplenet_jax import report
from simplenet_jax import visualize

REPORT = 'report.html'
PREDICTIONS = 'predictions.html'
# predictions.html embeds the heat maps of this many top-scoring images; the
# rest are listed (their PNGs are beside it).
MAX_PREDICTION_IMAGES = 100

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:#1d2430;margin:0;background:#f4f6f9}
main{max-width:1320px;margin:0 auto;padding:0 20px 40px}
header{background:#1d2430;color:#fff;padding:18px 20px}
header h1{margin:0 auto;max-width:1280px;font-size:22px}
header p{margin:4px auto 0;max-width:1280px;color:#b8c2d0;font-size:13px}
nav{margin:14px 0;font-size:13px}nav a{margin-right:12px}
a{color:#1f5fbf}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;
 padding:6px 18px 16px;margin:16px 0}
h2{font-size:19px;border-bottom:1px solid #e5e9ef;padding-bottom:6px}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:14px;margin:14px 0 4px}
.kind{font-size:12px;font-weight:normal;color:#5b6575;background:#eef1f5;
 border-radius:3px;padding:1px 6px;margin-left:6px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid #e5e9ef;text-align:left}
th{background:#f0f3f7}td.num,th.num{text-align:right;
 font-variant-numeric:tabular-nums}
tr.mean td{font-weight:600;background:#fafbfc}
table.kv th{background:none;font-weight:600;color:#5b6575;width:170px}
.note{color:#5b6575;font-size:12.5px;margin:2px 0 8px}
.facts{margin:4px 0 10px}
.plots{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.plots img{border:1px solid #e5e9ef;max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fafbfc;border:1px solid #e5e9ef;padding:6px;
 border-radius:4px}
figure img{display:block;max-width:100%}
.gallery figure{display:table}
.gallery figcaption{display:table-caption;caption-side:bottom;
 background:#fafbfc;border:1px solid #e5e9ef;border-top:0;padding:0 6px 6px;
 margin-top:0;border-radius:0 0 4px 4px}
figure img.knn{margin:4px 0 0 auto}
figcaption{font-size:12.5px;margin-top:4px;max-width:600px;
 overflow-wrap:anywhere}
.flag{color:#b3261e;font-weight:600}.pass{color:#1e7b34;font-weight:600}
details pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;
 max-height:480px}
.missing{color:#8a6d00;background:#fff8db;padding:6px 10px;border-radius:4px}
"""


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
  return f'data:{mime};base64,{base64.b64encode(data).decode("ascii")}'


def _img(data: bytes, alt: str, mime: str = 'image/png', cls: str = '',
         width: int | None = None) -> str:
  """An <img> of `data`; `width` (CSS pixels) shows a high-dpi plot at its
  intended size."""
  attrs = f' class="{cls}"' if cls else ''
  if width:
    attrs += f' width="{width}"'
  return f'<img src="{_data_uri(data, mime)}" alt="{_e(alt)}"{attrs}>'


def _png_width(data: bytes) -> int:
  with Image.open(io.BytesIO(data)) as im:
    return im.size[0]


def _plot(data: bytes | None, alt: str) -> str:
  if data is None:
    return ''
  # Plots are drawn at PLOT_DPI; shown at 96 dpi CSS pixels they stay sharp
  # on high-density screens and readable on others.
  width = round(_png_width(data) * 96 / visualize.PLOT_DPI)
  return _img(data, alt, width=width)


def _pct(v) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return 'n/a'
  return f'{100.0 * float(v):.1f}'


def _seconds(s) -> str:
  if s is None:
    return ''
  s = float(s)
  if s < 120:
    return f'{s:.1f} s'
  return f'{int(s // 60)} min {s % 60:02.0f} s'


def read_log(cat_dir: str) -> list[dict]:
  """The per-pass records of <cat_dir>/log.jsonl ([] without one)."""
  path = os.path.join(cat_dir, 'log.jsonl')
  if not os.path.isfile(path):
    return []
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut short by a kill.
        continue
      if isinstance(record, dict) and 'pass' in record:
        out.append(record)
  return out


# ---- report.html ------------------------------------------------------------


def results_table_html(rows: list[dict], table_id: str = 'results') -> str:
  """The results table (as report.results_table): a row per category, then
  the texture, object and overall means; percent with one decimal."""
  keys, headers = report.columns(rows)
  head = ''.join(f'<th class="num">{_e(h)}</th>' for h in headers)
  lines = [f'<table id="{_e(table_id)}"><thead><tr><th>Category</th>'
           f'<th>Kind</th>{head}</tr></thead><tbody>']
  for r in rows:
    cells = ''.join(f'<td class="num">{_pct(r.get(m))}</td>' for m in keys)
    lines.append(f'<tr data-category="{_e(r.get("category", ""))}"><td>'
                 f'<a href="#cat-{_e(r.get("category", ""))}">'
                 f'{_e(r.get("category", ""))}</a></td>'
                 f'<td>{_e(r.get("kind", ""))}</td>{cells}</tr>')
  avg = report.means(rows)
  for key, label, _ in report.MEAN_ROWS:
    if key in avg:
      cells = ''.join(f'<td class="num">{_pct(avg[key][m])}</td>'
                      for m in keys)
      lines.append(f'<tr class="mean" data-category="{_e(label)}"><td>'
                   f'{_e(label)}</td><td></td>{cells}</tr>')
  lines.append('</tbody></table>')
  return '\n'.join(lines)


def _geometry_text(dataset: dict, kinds) -> str:
  """'; textures resized whole to 128x128' for the kinds of categories the
  run has (the config's geometry for each, `data.geometry`)."""
  parts = []
  for kind in dict.fromkeys(kinds):  # In order, once each.
    try:
      g = data.geometry(ml_collections.ConfigDict(dataset), kind)
    except (KeyError, AttributeError, ValueError):  # An older results.json.
      continue
    # Object and texture are MVTec AD's classes; a folder or CIFAR-10 run
    # has one geometry for all.
    named = dataset.get('kind') in ('mvtec', 'mvtec_tfds', 'demo')
    parts.append(f'{kind}s {g.describe()}' if named else g.describe())
  return ''.join(f'; {p}' for p in parts)


def _data_text(dataset: dict, rows) -> str:
  """Where the images came from, the categories and how they were sized
  (results.json's config dataset section and table rows)."""
  kind = dataset.get('kind', '?')
  if kind == 'mvtec':
    where = f" at {dataset.get('root')}"
  elif kind == 'folder':  # Its own directories; dataset.root is unused.
    tests = [n for n, v in (dataset.get('test_dirs') or {}).items() if v]
    where = (f" (training images in {dataset.get('train_dir')}; test "
             f"folders {', '.join(tests)})")
  else:
    where = ''
  return (f"{kind}{where}; categories "
          f"{', '.join(r['category'] for r in rows)}"
          + _geometry_text(dataset, [r.get('kind') for r in rows]))


def _training_text(config: dict) -> str:
  """The method and its settings in words (results.json's config)."""
  m, t = config.get('model', {}), config.get('train', {})
  augment = t.get('augment', 'none')
  views = None if augment == 'none' else augments.WORDS.get(augment)
  # model.coarse_scale changes the features, whatever scores them.
  scale = m.get('coarse_scale', 1)
  features = (f'the backbone layers after the first read from the image at '
              f'{scale}x its size; ' if scale > 1 else '')
  if m.get('method') == 'knn':
    frac = config.get('knn', {}).get('coreset_fraction')
    return (features + f'kNN memory bank, coreset fraction {frac}'
            + (f'; of {views}' if views else ''))
  mode = m.get('noise_mode')
  noise = {'absolute': f"std {m.get('noise_std')}",
           'relative': f"{m.get('noise_rel')} x RMS of the adapted features",
           'spread': f"{m.get('noise_rel')} x spread of the adapted features"
           }.get(mode, str(mode))
  if m.get('noise_shape', 'isotropic') == 'layers':
    noise += ", each backbone layer's share at its own spread"
  if m.get('shrink_on_saturation'):
    noise += (f" (x{m['shrink_on_saturation']:g}, trained again, if the "
              'loss saturates' + ('; training stops if it saturates again)'
                                  if m.get('stop_on_saturation') else ')'))
  elif m.get('stop_on_saturation'):
    noise += ' (training stops if the loss saturates)'
  y = config.get('synthesis', {})
  extras = [f"GAS {y['gas']}" if y.get('gas', 'none') != 'none' else '',
            f"LAS (weight {y['las_weight']})" if y.get('las_weight') else '',
            'Perlin-masked noise' if y.get('perlin') else '']
  extras = ', '.join(e for e in extras if e)
  # Only what departs from the released code: loss and optimisers.
  other = ['loss: binary cross-entropy' if y.get('loss') == 'bce' else '',
           (f"optimisers: {config['optim']['variant']}"
            if config.get('optim', {}).get('variant', 'released') !=
            'released' else '')]
  other = ''.join(f'; {o}' for o in other if o)
  heads = (f"{m['heads']} heads averaged, " if m.get('heads', 1) > 1 else '')
  if m.get('pre_proj', 1) == 0:
    heads += 'no adaptor, '
  if views:
    heads += f'trained on {views}, '
  if t.get('neighbour_mix'):
    heads += ('each training feature moved a random part (up to '
              f"{t['neighbour_mix']:g}) of the way toward a neighbour in "
              'another image'
              + (' where a category trains on flips'
                 if t.get('neighbour_mix_when') == 'flips' else '') + ', ')
  return (features + heads +
          f"{t.get('num_passes')} passes, batch {t.get('batch_size')}, "
          f"noise {mode}: {noise}" + (f'; synthesis: {extras}' if extras
                                      else '') + other)


def _squashes(config: dict) -> bool:
  """Whether the run's maps are of squashed patch scores (eval.squash:
  a SimpleNet head's only; results.json's config)."""
  return (config.get('eval', {}).get('squash') == 'sigmoid' and
          config.get('model', {}).get('method') == 'simplenet')


def _scoring_text(config: dict) -> str:
  """How test images were scored (results.json's config eval section)."""
  e = config.get('eval', {})
  views = ('the image and its three flips, patch scores averaged'
           if e.get('tta') == 'flips' else 'one pass')
  score = ('the peak of the anomaly map' if e.get('image_score') == 'map_max'
           else 'the largest patch score')
  squash = ''
  if _squashes(config):
    score += ' before the squash'
    squash = '; patch scores squashed for the maps, sigmoid(score / margin)'
  return (f"{views}; image score: {score}{squash}; maps smoothed with sigma "
          f"{e.get('sigma')}")


def _run_section(workdir: str, doc: dict) -> str:
  extra = doc.get('extra', {})
  config = extra.get('config', {})
  b = config.get('backbone', {})
  d = config.get('dataset', {})
  devices = extra.get('devices', [])
  kv = [('Mode', extra.get('mode', '')),
        ('Workdir', os.path.abspath(workdir)),
        ('Backbone', f"{b.get('name', '?')}, layers "
                     f"{', '.join(b.get('layers', []))}, {b.get('dtype', '')}"
                     + (' (random weights)' if b.get('random_init') else '')),
        ('Data', _data_text(d, doc['rows'])),
        ('Training', _training_text(config)),
        ('Scoring', _scoring_text(config)),
        ('Devices', f"{len(devices)}: {', '.join(devices)}")]
  rows = ''.join(f'<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in kv)
  out = [f'<section id="run"><h2>Run</h2><table class="kv">{rows}</table>']
  timings = extra.get('timings')
  if timings:
    stages = [k for k in ('setup', 'train', 'restore', 'evaluate',
                          'kNN yardstick')
              if any(k in c for c in timings.get('categories', {}).values())]
    head = ''.join(f'<th class="num">{_e(s)}</th>' for s in stages)
    lines = [f'<h3>Wall time per stage</h3><table id="timings"><thead><tr>'
             f'<th>Stage</th>{head}<th class="num">total</th></tr></thead>'
             '<tbody>']
    if 'backbone' in timings:
      lines.append(f'<tr><td>load the backbone</td>'
                   f'{"<td></td>" * len(stages)}<td class="num">'
                   f'{_seconds(timings["backbone"])}</td></tr>')
    for cat, ct in timings.get('categories', {}).items():
      cells = ''.join(f'<td class="num">{_seconds(ct.get(s))}</td>'
                      for s in stages)
      name = cat + report.shared_lap(cat, ct)
      lines.append(f'<tr><td>{_e(name)}</td>{cells}<td class="num">'
                   f'{_seconds(sum(ct.get(s, 0) for s in stages))}</td></tr>')
    if 'total' in timings:
      lines.append(f'<tr class="mean"><td>whole run (before the report)</td>'
                   f'{"<td></td>" * len(stages)}<td class="num">'
                   f'{_seconds(timings["total"])}</td></tr>')
    lines.append('</tbody></table>')
    out.append(''.join(lines))
  out.append('<details><summary>Config</summary><pre>'
             f'{_e(json.dumps(config, indent=2, ensure_ascii=False))}'
             '</pre></details></section>')
  return '\n'.join(out)


def _decision(score, threshold, label: int | None = None) -> str:
  """The decision at the threshold, and whether it was right when the label
  is known."""
  if threshold is None or score is None:
    return ''
  flagged = score > threshold
  text = ('<span class="flag">anomalous</span>' if flagged else
          '<span class="pass">normal</span>')
  if label is not None:
    text += {(True, 1): ' (caught)', (True, 0): ' (false alarm)',
             (False, 1): ' (missed)', (False, 0): ' (correct)'}[
                 (bool(flagged), int(label))]
  return text


def _tile(path: str | None, alt: str, cls: str = '') -> str:
  if path and os.path.isfile(path):
    with open(path, 'rb') as f:
      return _img(f.read(), alt, 'image/jpeg', cls)
  return '<p class="missing">tile missing</p>'


def _galleries(cat_dir: str, rec: dict, squashed: bool) -> str:
  """squashed: the maps are of squashed patch scores (`_squashes`)."""
  threshold = rec.get('threshold')
  out = ['<h3>Heat maps</h3>']
  lo, hi = rec.get('map_range') or (None, None)
  h, w = rec.get('image_hw') or ('?', '?')
  note = (f'At the evaluated resolution ({h}x{w} pixels, each drawn as a '
          'block when enlarged); the white line outlines the ground truth.')
  if lo is not None:
    note += (f' Colours run from {lo:.4g} (blue) to {hi:.4g} (red), the '
             'same for every image of this category.')
    if squashed:
      note += (' The maps are of the squashed patch scores, sigmoid(score '
               '/ margin), so their values lie in 0-1, in other units than '
               'the image scores.')
  knn = rec.get(eval_record.KNN)
  if knn:
    klo, khi = knn.get('map_range') or (None, None)
    note += (' Under each, the map of kNN on the same features '
             '(eval.yardstick) for the same image, on its own scale (kNN '
             'scores are distances)')
    note += (f': from {klo:.4g} (blue) to {khi:.4g} (red).'
             if klo is not None else '.')
  out.append(f'<p class="note">{_e(note)}</p>')
  for key, heading, what in eval_record.GALLERIES:
    indices = rec.get('galleries', {}).get(key, [])
    out.append(f'<h4>{_e(heading)}</h4><p class="note">{_e(what)}, '
               f'{"highest" if key != "false_negatives" else "lowest"} '
               'first.</p>')
    if not indices:
      out.append('<p class="note">None in the test set.</p>')
      continue
    figs = []
    for i in indices:
      path = eval_record.tile_path(cat_dir, rec, i)
      name, score = rec['names'][i], rec['scores'][i]
      label = 'anomalous' if rec['labels'][i] else 'normal'
      cap = (f'{_e(name)} &middot; {label} &middot; score '
             f'{"n/a" if score is None else f"{score:.4g}"}')
      decision = _decision(score, threshold, rec['labels'][i])
      if decision:
        cap += f' &middot; decision: {decision}'
      img = _tile(path, f'{heading}: {name}')
      if knn:
        img += _tile(eval_record.tile_path(cat_dir, rec, i, yardstick=True),
                     f'{heading}: {name}, kNN map', 'knn')
        kscore = knn.get('scores', {}).get(str(i))
        cap += (' &middot; kNN score '
                f'{"n/a" if kscore is None else f"{kscore:.4g}"}')
      figs.append(f'<figure>{img}<figcaption>{cap}</figcaption></figure>')
    out.append(f'<div class="gallery" data-gallery="{key}">{"".join(figs)}'
               '</div>')
  return '\n'.join(out)


def _category_section(workdir: str, row: dict, config: dict) -> str:
  cat = row['category']
  cat_dir = os.path.join(workdir, cat)
  out = [f'<section class="category" id="cat-{_e(cat)}"><h2>{_e(cat)}'
         f'<span class="kind">{_e(row.get("kind", ""))}</span></h2>']
  rec = eval_record.load(cat_dir)
  facts = [f'I-AUROC {_pct(row.get("image_auroc"))} %',
           f'P-AUROC {_pct(row.get("pixel_auroc"))} %',
           f'AUPRO {_pct(row.get("aupro"))} %']
  if report.YARDSTICK[0] in row:
    facts.append('kNN on the same features (eval.yardstick): '
                 + ' / '.join(_pct(row.get(k)) for k in report.YARDSTICK)
                 + ' %')
  if 'synthetic_pixel_auroc' in row:  # eval.synthetic_defects.
    facts.append('synthetic defects (eval.synthetic_defects): P-AUROC '
                 f'{_pct(row["synthetic_pixel_auroc"])} % on '
                 f'{row.get("synthetic_source", "synthetic defect images")}; '
                 'for comparing runs that differ in train.augment, not a '
                 'measure of real defects')
  if rec is not None:
    labels = np.asarray(rec['labels'], bool)
    scores = np.asarray([np.nan if s is None else s for s in rec['scores']])
    facts.append(f'{labels.size} test images ({int((~labels).sum())} normal, '
                 f'{int(labels.sum())} anomalous)')
    facts.append(f'{rec.get("n_train")} training images'
                 + (f', {rec["n_holdout"]} held out for the threshold'
                    if rec.get('n_holdout') else '')
                 + (f', {rec["n_validation"]} validation images for the '
                    'threshold' if rec.get('n_validation') else ''))
    facts.append(f'model after pass {rec.get("passes")}')
  if row.get('saturated_at'):  # model.shrink_on_saturation restarted it.
    facts.append('a first attempt saturated the loss at pass '
                 f'{row["saturated_at"]}: trained again from the start with '
                 'a smaller noise '
                 '(model.shrink_on_saturation; the first attempt in '
                 'log.saturated.jsonl and checkpoints.saturated/)')
  if row.get('stopped_at'):  # model.stop_on_saturation ended training.
    again = (' of the second attempt saturated the loss again'
             if row.get('saturated_at') else ' saturated the loss')
    facts.append(f'pass {row["stopped_at"]}{again}: training stopped there '
                 '(model.stop_on_saturation)')
  if row.get('augment'):  # train.augment='auto' (simplenet_jax/view_check.py).
    facts.append('train.augment=auto: '
                 + f"trained on {augments.WORDS[row['augment']]}"
                 + f" ({row.get('augment_why')})")
  if 'neighbour_mix' in row:  # train.neighbour_mix_when='flips'.
    facts.append('train.neighbour_mix_when=flips: '
                 + (f"features moved toward neighbours (train.neighbour_mix="
                    f"{row['neighbour_mix']:g})" if row['neighbour_mix'] else
                    'no flips, features not moved'))
  out.append(f'<p class="facts">{" &middot; ".join(_e(x) for x in facts)}</p>')
  if row.get('advice'):  # yardstick.advice: the head trails kNN, saturated.
    out.append(f'<p class="note"><b>Hint:</b> {_e(row["advice"])}</p>')
  by_defect = _by_defect_table(cat, row) if row.get('by_defect') else ''
  if rec is None:
    out.append(by_defect)
    out.append('<p class="missing">No evaluation record in '
               f'{_e(eval_record.directory(cat_dir))} (report.html=False, or '
               'evaluated by an older version): run --mode=eval to make it.'
               '</p></section>')
    return '\n'.join(out)
  if rec.get('data_change'):
    knn = ('; the kNN columns are fitted on the images the data gives now'
           if report.YARDSTICK[0] in row else '')
    out.append(f'<p class="missing">{_e(rec["data_change"])}: the model is '
               f'evaluated as trained{knn}.</p>')
  threshold = rec.get('threshold')
  if threshold is not None:
    d = metrics.decision_counts(scores, labels, threshold)
    out.append(
        f'<p class="facts">Decision threshold {threshold:.4g} '
        f'({_e(rec.get("threshold_source", ""))}): images scoring above it '
        f'are called anomalous. On the test set: {d["caught"]} of '
        f'{d["anomalous"]} anomalous images caught, {d["false_alarms"]} of '
        f'{d["normal"]} normal images falsely flagged.</p>')
  out.append(by_defect)
  plots = []
  roc = rec.get('roc')
  if roc:
    plots.append(_plot(visualize.roc_plot(roc['fpr'], roc['tpr'],
                                          row.get('image_auroc')),
                       f'{cat}: image ROC curve'))
  pro = rec.get('pro_curve')
  if pro:
    plots.append(_plot(visualize.pro_plot(pro['fpr'], pro['pro'],
                                          rec['max_fpr'], row.get('aupro')),
                       f'{cat}: PRO curve'))
  plots.append(_plot(visualize.score_histogram(scores, labels, threshold),
                     f'{cat}: histogram of test image scores'))
  out.append('<div class="plots">' + ''.join(plots) + '</div>')
  if not roc or not pro:
    out.append('<p class="note">'
               + ('No image ROC: the test set needs normal and anomalous '
                  'images. ' if not roc else '')
               + ('No PRO curve: the test set has no usable masks.'
                  if not pro else '') + '</p>')
  log = read_log(cat_dir)
  final = {'pass': rec.get('passes'),
           **{k: row.get(k) for k in report.METRICS}}
  curves = visualize.training_curves(log, final)
  out.append('<h3>Training</h3>')
  out.append(_plot(curves, f'{cat}: training curves') if curves else
             '<p class="note">No training log (log.jsonl).</p>')
  out.append(_galleries(cat_dir, rec, _squashes(config)))
  out.append("<h3>Feature spread (the paper's Fig. 3)</h3>")
  fig3 = os.path.join(cat_dir, 'feature_std.png')
  if os.path.isfile(fig3):
    with open(fig3, 'rb') as f:
      out.append('<p class="note">Per-dimension standard deviation of the '
                 'training features before and after the adaptor (the '
                 'same with model.pre_proj=0, which has none).</p>'
                 + _plot(f.read(), f'{cat}: feature std histogram'))
  else:
    out.append('<p class="note">Not drawn (eval.feature_histogram off, or the '
               'feature cache was not used).</p>')
  out.append('</section>')
  return '\n'.join(out)


def _by_defect_table(cat: str, row: dict) -> str:
  """Each defect type's figures (results.json's by_defect, and the kNN
  yardstick's beside them), one row per type."""
  head = ['Defect type', 'Images', 'I-AUROC %', 'P-AUROC %', 'AUPRO %']
  types = row['by_defect']
  caught = all('caught' in v for v in types.values())
  knn = row.get('knn_by_defect') or {}
  if caught:
    head.append('Caught at the threshold')
  if knn:
    head += list(report.YARDSTICK_HEADERS)
  lines = [f'<h3>By defect type</h3><p class="note">Each type\'s test images '
           'against every normal test image.</p>'
           f'<table id="by-defect-{_e(cat)}"><thead><tr><th>{_e(head[0])}'
           '</th>' + ''.join(f'<th class="num">{_e(h)}</th>' for h in head[1:])
           + '</tr></thead><tbody>']
  for name, v in types.items():
    cells = [str(v['n'])] + [_pct(v.get(m)) for m in report.METRICS]
    if caught:
      cells.append(f'{v["caught"]} of {v["n"]}')
    if knn:
      cells += [_pct(knn.get(name, {}).get(m)) for m in report.METRICS]
    lines.append(f'<tr><td>{_e(name)}</td>'
                 + ''.join(f'<td class="num">{_e(c)}</td>' for c in cells)
                 + '</tr>')
  lines.append('</tbody></table>')
  return '\n'.join(lines)


def _page(title: str, subtitle: str, body: str) -> str:
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width,initial-scale=1">'
          f'<title>{_e(title)}</title><style>{_CSS}</style></head><body>'
          f'<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>'
          f'<main>{body}</main></body></html>\n')


def _atomic_write(path: str, text: str) -> str:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_report(workdir: str) -> str:
  """Renders <workdir>/report.html from results.json and the categories'
  records; returns its path."""
  with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
    doc = json.load(f)
  rows = doc['rows']
  stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
  nav = ' '.join([('<a href="#run">Run</a>'), '<a href="#results">Results</a>']
                 + [f'<a href="#cat-{_e(r["category"])}">{_e(r["category"])}'
                    '</a>' for r in rows])
  parts = [f'<nav>{nav}</nav>', _run_section(workdir, doc),
           '<section id="results-section"><h2 id="results">Results</h2>',
           '<p class="note">Percent; nan (undefined) shows as n/a. The same '
           'numbers as results.json and the table printed at the end of the '
           'run: the final model.</p>', results_table_html(rows)]
  if any(report.YARDSTICK[0] in r for r in rows):
    parts.append('<p class="note">kNN columns (eval.yardstick): PatchCore\'s '
                 'nearest-neighbour scoring on the same backbone features, '
                 'training images and test set, no training; what '
                 '--config.model.method=knn gives.</p>')
  selected = doc.get('extra', {}).get('test_set_selected')
  if selected:
    parts += ['<h3>Test-set selected</h3><p class="note">Each row is the best '
              "evaluated pass chosen on the test set (the released code's "
              'protocol), not the final model.</p>',
              results_table_html(selected, 'results-selected')]
  parts.append('</section>')
  config = doc.get('extra', {}).get('config', {})
  parts += [_category_section(workdir, r, config) for r in rows]
  title = f'SimpleNet report: {os.path.basename(os.path.abspath(workdir))}'
  subtitle = (f'{doc.get("extra", {}).get("mode", "")} run, rendered {stamp} '
              f'from {os.path.abspath(workdir)}')
  return _atomic_write(os.path.join(workdir, REPORT),
                       _page(title, subtitle, '\n'.join(parts)))


# ---- predictions.html -------------------------------------------------------


def _jpeg(path: str, max_width: int = 720) -> bytes:
  """A heat-map PNG re-encoded as JPEG (photographs: a fraction of the size)."""
  with Image.open(path) as im:
    im = im.convert('RGB')
    if im.size[0] > max_width:
      h = round(im.size[1] * max_width / im.size[0])
      im = im.resize((max_width, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format='JPEG', quality=88)
    return buf.getvalue()


def write_predictions(out_dir: str, records: list[dict], category: str,
                      threshold: float) -> str:
  """<out_dir>/predictions.html: predict's images sorted by score, highest
  first, with the decision and heat map; returns its path."""
  ranked = sorted(records, key=lambda r: -r['score'])
  n_flag = sum(r['anomalous'] for r in ranked)
  common = (os.path.commonpath([os.path.dirname(r['path']) for r in ranked])
            if ranked else '')
  rows, figs = [], []
  for i, r in enumerate(ranked):
    decision = _decision(r['score'], threshold)
    name = os.path.relpath(r['path'], common)
    rows.append(f'<tr><td class="num">{i + 1}</td><td>{_e(name)}</td>'
                f'<td class="num">{r["score"]:.4f}</td><td>{decision}</td>'
                '</tr>')
    if i < MAX_PREDICTION_IMAGES and os.path.isfile(r['heatmap']):
      figs.append(f'<figure>{_img(_jpeg(r["heatmap"]), name, "image/jpeg")}'
                  f'<figcaption>{i + 1}. {_e(name)} &middot; score '
                  f'{r["score"]:.4f} &middot; {decision}</figcaption></figure>')
  more = len(ranked) - len(figs)
  body = [f'<section><h2>{len(ranked)} images, {n_flag} called anomalous'
          '</h2>',
          f'<p class="facts">Category {_e(category)}; images under '
          f'{_e(common)}. An image is anomalous when its score is above the '
          f'threshold {threshold:.4f}, fixed at training time from normal '
          'images. Heat maps share the colour scale of normal images (red: '
          'beyond anything normal looked like).</p>',
          '<table id="predictions"><thead><tr><th class="num">#</th>'
          '<th>Image</th><th class="num">Score</th><th>Decision</th></tr>'
          f'</thead><tbody>{"".join(rows)}</tbody></table></section>',
          f'<section><h2>Heat maps, highest score first</h2>'
          f'<div class="gallery">{"".join(figs)}</div>'
          + (f'<p class="note">{more} more not shown here; their heat maps '
             f'are PNG files in {_e(out_dir)}.</p>' if more > 0 else '')
          + '</section>']
  stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
  return _atomic_write(
      os.path.join(out_dir, PREDICTIONS),
      _page(f'SimpleNet predictions: {category}',
            f'rendered {stamp}; heat maps in {out_dir}', '\n'.join(body)))


def main(argv):
  if len(argv) != 2:
    print('usage: python -m simplenet_jax.report_html WORKDIR', file=sys.stderr)
    return 2
  print(write_report(argv[1]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))

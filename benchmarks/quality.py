"""Anomaly-detection quality of SimpleNet-family heads vs kNN (issue 9).

  python benchmarks/quality.py --sets cookies,brick,grass,gravel \
      --rows released,rms,spread,gas_hypersphere,knn --seeds 0,1,2 \
      --out runs/quality.jsonl
  python benchmarks/quality.py --table --out runs/quality.jsonl

Each (set, row, seed) is one training run of the library's own pipeline
(experiment.run, what main.py calls) in its own workdir under --workdir:
configs/demo.py's settings (EfficientNet-Lite0, 40 passes, batch 4) with
its synthesis and restart on saturation off, one head of 256 hidden units
(the rows' head up to the thirteenth round; 'gas_auto_mix_squash' is
configs/demo.py as shipped), its training images alone for 40 passes and the row's keys, the final model evaluated (no test-set selection). Rows are
config overrides (ROWS); 'base+key=value+...' adds or changes keys, e.g.
'spread+model.noise_rel=0.8', or with a JSON list,
'spread+backbone.layers=["layer1","layer2"]'.

Sets: cookies (../shared/datasets/cookies, 576x768 photos resized whole
to 128x128, configs/demo.py's size until the sixty-first round, so that no
part of a cookie is cropped away; 'cookies256' the same at 256x256, the
size of configs/folder.py and now configs/demo.py; 'cookies_crop' is the
object transform instead: shorter side 256, centre crop 224) and the
offline demo's brick, grass, gravel (generated once under --workdir as
128 px tiles and read at 128x128; 'brick256', 'grass256', 'gravel256' the
same tiles read at 256x256, configs/demo.py's size; --train-tiles N
builds them with N training tiles instead of 20, the same band cut more
often, recorded as 'gravel@N': docs/quality.md's twelfth round). Each
set's size is its own, not configs/demo.py's, so earlier rows reproduce;
a row's '+dataset.texture_resize=...' still changes it. One JSON line
per run goes to --out: the three metrics, kNN's on the same features
(eval.yardstick, on in configs/demo.py; not for the knn rows), the median
seconds per pass (log.jsonl's pass_s, the first pass left out: it compiles),
the training stage's wall time and the load average. --table prints mean +-
spread (half the max - min range over seeds), with a 'kNN yardstick (same
runs)' row: each (set, seed)'s kNN figures once; where head rows' yardsticks
differ (a row that changes the features or the scoring), a 'kNN yardstick
(<row> runs)' row for each head row.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
from simplenet_jax import config_checks
from simplenet_jax import experiment
from simplenet_jax import report
from simplenet_jax.data import demo as demo_data

SETS = ('cookies', 'cookies256', 'cookies_crop', 'brick', 'grass', 'gravel',
        'brick256', 'grass256', 'gravel256')
DEMO_SETS = ('brick', 'grass', 'gravel')  # A demo mean: these, one size.
SHARED_DATASETS = os.path.join(os.path.dirname(ROOT), 'shared', 'datasets')
METRICS = report.METRICS

_SPREAD = {'model.noise_mode': 'spread', 'model.noise_rel': 0.4}
_GAS_FLIPS = {**_SPREAD, 'synthesis.gas': 'hypersphere', 'eval.tta': 'flips',
              'eval.image_score': 'map_max'}
_GAS_FLIPS_WIDE = {**_GAS_FLIPS, 'model.hidden': 1024}
ROWS = {
    # Released SimpleNet: the WRN50-2 noise std.
    'released': {'model.noise_mode': 'absolute', 'model.noise_std': 0.015},
    # The old relative calibration: 0.2 x uncentred RMS.
    'rms': {'model.noise_mode': 'relative', 'model.noise_rel': 0.2},
    # The new one: noise_rel x centred spread (0.2 for like-for-like).
    'spread': _SPREAD,
    'spread_0.2': {'model.noise_mode': 'spread', 'model.noise_rel': 0.2},
    'gas_manifold': {**_SPREAD, 'synthesis.gas': 'manifold'},
    'gas_hypersphere': {**_SPREAD, 'synthesis.gas': 'hypersphere'},
    # configs/demo.py up to the thirteenth round: the same head, scored
    # with flips and the map's peak.
    'gas_flips': _GAS_FLIPS,
    # configs/demo.py in the fourteenth round: the released head width.
    'gas_flips_wide': _GAS_FLIPS_WIDE,
    # configs/demo.py in the fifteenth and sixteenth rounds: three such
    # heads, averaged.
    'gas_flips_heads': {**_GAS_FLIPS_WIDE, 'model.heads': 3},
    # configs/demo.py in the seventeenth to thirtieth rounds: the same,
    # trained again with a quarter of the noise if the loss saturates.
    'gas_flips_shrink': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                         'model.shrink_on_saturation': 0.25},
    # configs/demo.py in the thirty-first to thirty-fifth rounds: the
    # same, trained on each image's flips too where they look normal
    # (train.augment='auto': a quarter of the passes then).
    'gas_auto': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                 'model.shrink_on_saturation': 0.25, 'train.augment': 'auto'},
    # configs/demo.py since the thirty-sixth round: the same, where the
    # flips are taken each training feature also moved toward a neighbour
    # (train.neighbour_mix_when='flips').
    'gas_auto_mix': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                     'model.shrink_on_saturation': 0.25,
                     'train.augment': 'auto', 'train.neighbour_mix': 1.0,
                     'train.neighbour_mix_when': 'flips'},
    # configs/demo.py since the thirty-ninth round: the same, the head's
    # patch scores squashed by sigmoid(score / margin) before the maps.
    'gas_auto_mix_squash': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                            'model.shrink_on_saturation': 0.25,
                            'train.augment': 'auto',
                            'train.neighbour_mix': 1.0,
                            'train.neighbour_mix_when': 'flips',
                            'eval.squash': 'sigmoid'},
    # The same with the noise sized to each backbone layer's own spread
    # (model.noise_shape='layers'; fiftieth round; not in a config).
    'gas_auto_mix_squash_layers': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                                   'model.shrink_on_saturation': 0.25,
                                   'train.augment': 'auto',
                                   'train.neighbour_mix': 1.0,
                                   'train.neighbour_mix_when': 'flips',
                                   'eval.squash': 'sigmoid',
                                   'model.noise_shape': 'layers'},
    # The same without the adaptor (model.pre_proj=0, the released code's
    # other setting; thirtieth round).
    'gas_noproj': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                   'model.shrink_on_saturation': 0.25, 'model.pre_proj': 0},
    # The same trained on each image and its three flips (train.augment),
    # 10 passes: the steps of 40 without them (nineteenth round).
    'gas_flips_augment': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                          'model.shrink_on_saturation': 0.25,
                          'train.augment': 'flips', 'train.num_passes': 10},
    # The same on each image and its three half-cell shifts (twenty-eighth
    # round).
    'gas_shifts_augment': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                           'model.shrink_on_saturation': 0.25,
                           'train.augment': 'shifts',
                           'train.num_passes': 10},
    # configs/demo.py's head with each training feature moved toward its
    # nearest feature in another image (train.neighbour_mix; twenty-first
    # round), without and with the flips.
    'gas_flips_mix': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                      'model.shrink_on_saturation': 0.25,
                      'train.neighbour_mix': 1.0},
    'gas_flips_augment_mix': {**_GAS_FLIPS_WIDE, 'model.heads': 3,
                              'model.shrink_on_saturation': 0.25,
                              'train.augment': 'flips',
                              'train.num_passes': 10,
                              'train.neighbour_mix': 1.0},
    'las': {**_SPREAD, 'synthesis.las_weight': 1.0},
    'gas_las': {**_SPREAD, 'synthesis.gas': 'hypersphere',
                'synthesis.las_weight': 1.0},
    'perlin': {**_SPREAD, 'synthesis.perlin': True},
    'knn': {'model.method': 'knn'},
    'knn_full': {'model.method': 'knn', 'knn.coreset_fraction': 1.0},
}


def row_overrides(name: str) -> dict:
  """The row's keys, over the released scoring (no synthesis, one pass, the
  largest patch score, unsquashed, no restart on saturation, the training
  images alone for 40 passes, unmoved: configs/demo.py has GAS, flips, the
  map's peak, the squash, model.shrink_on_saturation and
  train.neighbour_mix on, and a row turns on only what it names) and
  the discriminator width every row was measured with up to the thirteenth
  round (256 hidden units, one head; configs/demo.py now has three heads of
  the released 1024, row 'gas_flips_shrink')."""
  base, *extra = name.split('+')
  if base not in ROWS:
    raise SystemExit(f'unknown row {base!r}; rows: {", ".join(ROWS)}')
  out = {'synthesis.gas': 'none', 'eval.tta': 'none',
         'eval.image_score': 'patch_max', 'eval.squash': 'none',
         'model.hidden': 256,
         'model.heads': 1, 'model.shrink_on_saturation': 0.0,
         'model.pre_proj': 1, 'model.noise_shape': 'isotropic',
         'train.augment': 'none',
         'train.num_passes': 40, 'train.neighbour_mix': 0.0,
         'train.neighbour_mix_when': 'always', **ROWS[base]}
  for item in extra:
    key, value = item.split('=', 1)
    try:
      value = json.loads(value)
    except ValueError:
      pass
    out[key] = value
  return out


def split_rows(rows: str) -> list[str]:
  """--rows at its commas outside brackets, so that a row's list value
  ('x+backbone.layers=["layer1","layer2"]') stays one row."""
  out, depth, start = [], 0, 0
  for i, ch in enumerate(rows):
    depth += {'[': 1, ']': -1}.get(ch, 0)
    if ch == ',' and depth == 0:
      out.append(rows[start:i])
      start = i + 1
  return out + [rows[start:]]


def split_set(name: str) -> tuple[str, int]:
  """A set's category and the size its images are squared to:
  'gravel256' -> ('gravel', 256), 'cookies' -> ('cookies', 128)."""
  base = name.removesuffix('_crop').removesuffix('256')
  return base, 256 if name.endswith('256') else 128


def set_config(name: str, row: str, seed: int, args):
  """configs/demo.py pointed at one set, with the row's keys."""
  c = demo_config.get_config()
  c.seed = seed
  c.backbone.weights_dir = args.weights_dir
  c.dataset.num_workers = 2
  c.dataset.kind = 'mvtec'
  base, size = split_set(name)
  c.dataset.texture_resize = size
  if base == 'cookies':  # One category, three geometries.
    c.dataset.root = SHARED_DATASETS
    c.dataset.categories = ('cookies',)
    if name != 'cookies_crop':  # Whole photos, squared.
      c.dataset.textures = ('cookies',)
  else:  # The demo's categories, generated once, read as textures.
    tiles = args.train_tiles
    c.dataset.root = str(demo_data.build(
        os.path.join(args.workdir, f'demo_data_{tiles}' if tiles
                     else 'demo_data'),
        **({'num_train': tiles} if tiles else {})))
    c.dataset.categories = c.dataset.textures = (base,)
  c.eval.visualize = 'none'
  c.eval.feature_histogram = False
  c.report.html = False
  c.report.tensorboard = False
  for key, value in row_overrides(row).items():
    section, leaf = key.split('.')
    c[section][leaf] = value
  if args.passes:  # Over the row's.
    c.train.num_passes = args.passes
  return config_checks.validate(c)


def set_label(name: str, args) -> str:
  """The set's name in --out: 'gravel@80' with --train-tiles 80."""
  tiles = args.train_tiles
  return f'{name}@{tiles}' if tiles else name


def run_one(name: str, row: str, seed: int, args) -> dict:
  config = set_config(name, row, seed, args)
  workdir = os.path.join(args.workdir, 'runs',
                         f'{set_label(name, args)}-{row}-{seed}')
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.time()
  experiment.run(config, workdir, 'train')
  wall = time.time() - t0
  with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
    doc = json.load(f)
  category = config.dataset.categories[0]
  with open(os.path.join(workdir, category, 'log.jsonl'),
            encoding='utf-8') as f:
    log = [json.loads(l) for l in f]
  pass_s = [r['pass_s'] for r in log if 'pass_s' in r][1:]
  timings = doc['extra']['timings']['categories'][category]
  # METRICS, and kNN on the same features (eval.yardstick) where present;
  # each defect type's figures (by_defect) for both.
  out = {k: v for k, v in doc['rows'][0].items()
         if k in METRICS + report.YARDSTICK + ('decisions',
                                                'synthetic_pixel_auroc',
                                                'augment', 'by_defect',
                                                'knn_by_defect',
                                                'saturated_at', 'stopped_at')}
  out.update(set=set_label(name, args), row=row, seed=seed,
             # The passes run (train.augment='auto' may take fewer).
             passes=log[-1].get('pass', config.train.num_passes),
             sec_per_pass=float(np.median(pass_s)) if pass_s else None,
             train_s=timings['train'], wall_s=wall,
             load=os.getloadavg()[0], last=log[-1])
  if not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return out


def table(path: str) -> str:
  recs = [json.loads(l) for l in open(path, encoding='utf-8') if l.strip()]
  groups = {}
  for r in recs:
    groups.setdefault((r['row'], r['set']), []).append(r)

  def cell(rs, key):
    v = np.asarray([r[key] for r in rs], np.float64) * 100
    return f'{v.mean():.1f} ± {(v.max() - v.min()) / 2:.1f}'

  # The yardstick of a (set, seed) is the same whatever the head row (the
  # same training images and coreset key): one row of its own, each run once.
  # A row that changes the features or the scoring (model.patch_size,
  # backbone.name, eval.tta, ...) changes kNN's figures too; then each head
  # row gets a yardstick row of its own runs.
  runs = {}
  for r in recs:
    if all(k in r for k in report.YARDSTICK):
      runs.setdefault((r['set'], r['seed']), {}).setdefault(r['row'], {
          m: r[y] for m, y in zip(METRICS, report.YARDSTICK)})
  same = all(len({tuple(round(v[m], 9) for m in METRICS)
                  for v in by_row.values()}) == 1 for by_row in runs.values())
  for (s, _), by_row in runs.items():
    for row, r in by_row.items():
      if same:
        groups.setdefault(('kNN yardstick (same runs)', s), []).append(r)
        break
      groups.setdefault((f'kNN yardstick ({row} runs)', s), []).append(r)
  # SETS' order; a set built with --train-tiles right after its base set.
  order = {s: i for i, s in enumerate(SETS)}
  sets = sorted({k[1] for k in groups},
                key=lambda s: (order.get(s.split('@')[0], len(SETS)), s))
  rows = list(dict.fromkeys(k[0] for k in groups))

  # A demo mean column per size whose three demo sets are all tabled.
  means = [m for m in ('', '256')
           if all(d + m in sets for d in DEMO_SETS)] or ['']
  lines = ['| row | ' + ' | '.join(f'{s} I / P / PRO' for s in sets) +
           ''.join(f' | demo{m} mean I / P / PRO' for m in means) +
           ' | s/pass |',
           '|---|' + '---|' * (len(sets) + len(means) + 1)]
  for row in rows:
    cells, demo, tpp = [], {m: [] for m in means}, []
    for s in sets:
      rs = groups.get((row, s), [])
      if not rs:
        cells.append('')
        continue
      cells.append(' / '.join(cell(rs, k) for k in METRICS) +
                   f' (n={len(rs)})')
      for m in means:
        if s in (d + m for d in DEMO_SETS):  # The demo's own tiles.
          demo[m].append([np.mean([r[k] for r in rs]) for k in METRICS])
      tpp += [r['sec_per_pass'] for r in rs if r.get('sec_per_pass')]
    dm = ''.join(
        ' | ' + (' / '.join(f'{100 * v:.1f}' for v in np.mean(demo[m], 0))
                 if len(demo[m]) == 3 else '') for m in means)
    lines.append(f'| {row} | ' + ' | '.join(cells) + f'{dm} | ' +
                 (f'{np.median(tpp):.2f}' if tpp else '-') + ' |')
  # What the stored decision threshold does, summed over seeds (runs from
  # before results.json had 'decisions' are left out).
  for row in rows:
    parts = []
    for s in sets:
      ds = [r['decisions'] for r in groups.get((row, s), []) if 'decisions' in r]
      if ds:
        t = {k: sum(d[k] for d in ds) for k in ds[0]}
        parts.append(f"{s} {t['false_alarms']}/{t['normal']} normal flagged, "
                     f"{t['caught']}/{t['anomalous']} anomalous caught")
    if parts:
      lines.append(f'\n{row}, at the threshold (all seeds): ' + '; '.join(parts))
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sets', default='cookies,brick,grass,gravel')
  p.add_argument('--rows', default='released,spread,gas_hypersphere,knn')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--passes', type=int, default=0,
                 help="train.num_passes (0: the demo config's, 40)")
  p.add_argument('--train-tiles', type=int, default=0,
                 help="training tiles per demo set (0: the demo's 20); "
                 "recorded as e.g. 'gravel@80', its data under --workdir")
  p.add_argument('--workdir', default='runs/quality')
  p.add_argument('--weights-dir', default='pretrained')
  p.add_argument('--out', default='runs/quality.jsonl')
  p.add_argument('--keep', action='store_true',
                 help='keep each run\'s workdir (checkpoints, logs)')
  p.add_argument('--table', action='store_true',
                 help='only print the table of --out')
  a = p.parse_args(argv)
  if not a.table:
    unknown = sorted(set(a.sets.split(',')) - set(SETS))
    if unknown:
      raise SystemExit(f'--sets: unknown {", ".join(unknown)}; sets: '
                       f'{", ".join(SETS)}')
    if a.train_tiles and any(split_set(s)[0] == 'cookies'
                             for s in a.sets.split(',')):
      raise SystemExit('--train-tiles: only for the demo sets (brick, '
                       'grass, gravel); the cookies photos are fixed')
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for name in a.sets.split(','):
      for row in split_rows(a.rows):
        for seed in (int(s) for s in a.seeds.split(',')):
          res = run_one(name, row, seed, a)
          print(json.dumps({k: v for k, v in res.items() if k != 'last'}),
                flush=True)
          with open(a.out, 'a', encoding='utf-8') as f:
            f.write(json.dumps(res) + '\n')
  print(table(a.out))


if __name__ == '__main__':
  main()

"""benchmarks/quality.py's table: the kNN yardstick row counts each run once."""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import quality  # pylint: disable=g-import-not-at-top,wrong-import-position


def _rec(row, seed, head, knn):
  r = {'set': 'grass', 'row': row, 'seed': seed, 'sec_per_pass': 0.5}
  r.update(zip(('image_auroc', 'pixel_auroc', 'aupro'), head))
  if knn is not None:
    r.update(zip(('knn_image_auroc', 'knn_pixel_auroc', 'knn_aupro'), knn))
  return r


def test_yardstick_row_once_per_run(tmp_path):
  path = tmp_path / 'q.jsonl'
  recs = [
      _rec('spread', 0, (0.60, 0.80, 0.50), (0.70, 0.90, 0.60)),
      _rec('spread', 1, (0.62, 0.82, 0.52), (0.80, 0.94, 0.64)),
      # Another head row on the same runs: the same yardstick figures.
      _rec('gas_hypersphere', 0, (0.64, 0.84, 0.54), (0.70, 0.90, 0.60)),
      _rec('gas_hypersphere', 1, (0.66, 0.86, 0.56), (0.80, 0.94, 0.64)),
      _rec('knn', 0, (0.71, 0.91, 0.61), None),
  ]
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  lines = quality.table(str(path)).splitlines()
  by_row = {l.split(' | ')[0].lstrip('| '): l for l in lines[2:]
            if l.startswith('|')}
  assert list(by_row) == ['spread', 'gas_hypersphere', 'knn',
                          'kNN yardstick (same runs)']
  # By hand: (70 + 80) / 2 = 75, half range 5; (90 + 94) / 2 = 92, 2;
  # (60 + 64) / 2 = 62, 2; two runs, not four.
  assert ('75.0 ± 5.0 / 92.0 ± 2.0 / 62.0 ± 2.0 (n=2)'
          in by_row['kNN yardstick (same runs)'])
  assert '61.0 ± 1.0 / 81.0 ± 1.0 / 51.0 ± 1.0 (n=2)' in by_row['spread']



def test_yardstick_row_per_head_row_when_the_features_differ(tmp_path):
  # A row that changes the features (here a wider patch) changes kNN's
  # figures on the same (set, seed): one yardstick row each, not the first
  # row's figures passed off as the other's.
  path = tmp_path / 'q.jsonl'
  recs = [
      _rec('gas_flips', 0, (0.60, 0.80, 0.50), (0.70, 0.90, 0.60)),
      _rec('gas_flips', 1, (0.62, 0.82, 0.52), (0.80, 0.94, 0.64)),
      _rec('gas_flips+model.patch_size=5', 0, (0.64, 0.84, 0.54),
           (0.50, 0.70, 0.40)),
      _rec('gas_flips+model.patch_size=5', 1, (0.66, 0.86, 0.56),
           (0.60, 0.74, 0.44)),
  ]
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  lines = quality.table(str(path)).splitlines()
  by_row = {l.split(' | ')[0].lstrip('| '): l for l in lines[2:]
            if l.startswith('|')}
  assert list(by_row) == ['gas_flips', 'gas_flips+model.patch_size=5',
                          'kNN yardstick (gas_flips runs)',
                          'kNN yardstick (gas_flips+model.patch_size=5 runs)']
  assert ('75.0 ± 5.0 / 92.0 ± 2.0 / 62.0 ± 2.0 (n=2)'
          in by_row['kNN yardstick (gas_flips runs)'])
  assert ('55.0 ± 5.0 / 72.0 ± 2.0 / 42.0 ± 2.0 (n=2)'
          in by_row['kNN yardstick (gas_flips+model.patch_size=5 runs)'])

def test_decisions_summed_over_seeds(tmp_path):
  path = tmp_path / 'q.jsonl'
  recs = [_rec('spread', seed, (0.6, 0.8, 0.5), None) for seed in (0, 1, 2)]
  recs[0]['decisions'] = dict(normal=10, false_alarms=2, anomalous=15, caught=9)
  recs[1]['decisions'] = dict(normal=10, false_alarms=0, anomalous=15, caught=12)
  # recs[2]: an older run without decisions, left out.
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  text = quality.table(str(path))
  assert ('spread, at the threshold (all seeds): grass 2/20 normal flagged, '
          '21/30 anomalous caught') in text


def _apart(args, row: str, reference, changes: dict) -> None:
  """Asserts that `row`'s config is `reference` but for `changes`:
  {key: (the row's value, the reference's)}."""
  config = quality.set_config('grass', row, 0, args)
  for key, (mine, theirs) in changes.items():
    section, leaf = key.split('.')
    assert config[section][leaf] == mine, (row, key)
    config[section][leaf] = theirs
  assert config.to_dict() == reference.to_dict(), row


def test_rows_score_as_released_unless_named(tmp_path):
  """Rows start from the released scoring (one pass, the largest patch
  score, unsquashed) and never train again on saturation, though
  configs/demo.py flips, takes the map's peak, squashes and starts over
  with a quarter of the noise when the loss saturates; the
  'gas_auto_mix_squash' row is configs/demo.py as shipped, 'gas_auto_mix'
  the same unsquashed (the shipped row of the thirty-sixth to
  thirty-eighth rounds), 'gas_auto' without train.neighbour_mix either
  (the shipped row of the thirty-first to thirty-fifth rounds), 'gas_flips_shrink' without
  train.augment='auto' either (the shipped row of the seventeenth to
  thirtieth rounds), 'gas_flips_augment' the same
  trained on the images' flips too
  for 10 passes (train.augment, nineteenth round), 'gas_flips_heads' the
  shipped row without the restart (the fifteenth and sixteenth rounds'), 'gas_flips_wide' with one head, 'gas_flips' with
  one head of the 256 hidden units every row had up to the thirteenth
  round."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  args = types.SimpleNamespace(workdir=str(tmp_path), passes=0,
                               weights_dir='pretrained', train_tiles=0)
  plain = quality.set_config('grass', 'gas_hypersphere', 0, args)
  assert (plain.eval.tta, plain.eval.image_score) == ('none', 'patch_max')
  shipped = demo.get_config()
  assert (shipped.eval.tta, shipped.eval.image_score) == ('flips', 'map_max')
  assert plain.model.shrink_on_saturation == 0
  assert (plain.train.augment, plain.train.num_passes) == ('none', 40)
  assert (plain.train.neighbour_mix, shipped.train.neighbour_mix) == (0, 1)
  assert (plain.eval.squash, shipped.eval.squash) == ('none', 'sigmoid')
  shipped_squash = quality.set_config('grass', 'gas_auto_mix_squash', 0, args)
  for key in ('model.noise_mode', 'model.noise_rel', 'model.hidden',
              'model.heads', 'model.shrink_on_saturation', 'synthesis.gas',
              'eval.tta', 'eval.image_score', 'eval.squash', 'train.augment',
              'train.num_passes', 'train.neighbour_mix',
              'train.neighbour_mix_when', 'train.neighbour_images'):
    section, leaf = key.split('.')
    assert shipped_squash[section][leaf] == shipped[section][leaf], key
  # 'gas_auto_mix_squash_layers' is the shipped row with the noise sized to
  # each backbone layer's spread (fiftieth round).
  _apart(args, 'gas_auto_mix_squash_layers', shipped_squash,
         {'model.noise_shape': ('layers', 'isotropic')})
  # 'gas_auto_mix' is the shipped row of the thirty-sixth to thirty-eighth
  # rounds: the head's scores unsquashed.
  _apart(args, 'gas_auto_mix', shipped_squash,
         {'eval.squash': ('none', 'sigmoid')})
  shipped_mix = quality.set_config('grass', 'gas_auto_mix', 0, args)
  # 'gas_auto' is the shipped row of the thirty-first to thirty-fifth
  # rounds: without the mix.
  _apart(args, 'gas_auto', shipped_mix, {
      'train.neighbour_mix': (0.0, 1.0),
      'train.neighbour_mix_when': ('always', 'flips')})
  shipped_row = quality.set_config('grass', 'gas_auto', 0, args)
  # 'gas_noproj' is the shipped row without the adaptor (model.pre_proj=0,
  # thirtieth round); every other row keeps the released adaptor.
  assert (plain.model.pre_proj, shipped.model.pre_proj) == (1, 1)
  # 'gas_flips_shrink' is the shipped row of the seventeenth to thirtieth
  # rounds: without train.augment='auto'.
  _apart(args, 'gas_flips_shrink', shipped_row,
         {'train.augment': ('none', 'auto')})
  _apart(args, 'gas_noproj', shipped_row,
         {'model.pre_proj': (0, 1), 'train.augment': ('none', 'auto')})
  augment = quality.set_config('grass', 'gas_flips_augment', 0, args)
  assert (augment.train.augment, augment.train.num_passes) == ('flips', 10)
  for key in ('model', 'synthesis', 'eval'):
    assert augment[key].to_dict() == shipped_row[key].to_dict(), key
  args.passes = 3  # --passes holds over the row's.
  assert quality.set_config('grass', 'gas_flips_augment', 0,
                            args).train.num_passes == 3
  heads = quality.set_config('grass', 'gas_flips_heads', 0, args)
  assert heads.model.shrink_on_saturation == 0
  assert shipped.model.shrink_on_saturation == 0.25
  wide = quality.set_config('grass', 'gas_flips_wide', 0, args)
  assert (wide.model.hidden, wide.model.heads) == (1024, 1)
  narrow = quality.set_config('grass', 'gas_flips', 0, args)
  assert (narrow.model.hidden, narrow.model.heads) == (256, 1)
  assert (plain.model.hidden, plain.model.heads) == (256, 1)
  assert (shipped.model.hidden, shipped.model.heads) == (1024, 3)


def test_sets_are_the_geometries_they_name(tmp_path):
  """'cookies' is whole photos at 128x128 (the demo config's size until the
  sixty-first round), 'cookies256' at the folder and demo configs' 256x256,
  'cookies_crop' the object transform; the demo's tiles at 128 unless the
  name says 256, whatever configs/demo.py's size."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import demo, folder  # pylint: disable=g-import-not-at-top
  from simplenet_jax.data import images  # pylint: disable=g-import-not-at-top
  args = types.SimpleNamespace(workdir=str(tmp_path), passes=0,
                               weights_dir='pretrained', train_tiles=0)

  def geometry(name, category):
    c = quality.set_config(name, 'knn', 0, args)
    assert c.dataset.categories == (category,), name
    kind = 'texture' if category in c.dataset.textures else 'object'
    return images.geometry_for(c.dataset, kind)

  assert geometry('cookies', 'cookies') == images.Geometry(square=128)
  assert geometry('cookies256', 'cookies') == images.Geometry(square=256)
  assert folder.get_config().dataset.texture_resize == 256
  assert demo.get_config().dataset.texture_resize == 256
  assert (geometry('cookies_crop', 'cookies') ==
          images.Geometry(shorter=256, crop=224))
  assert geometry('gravel', 'gravel') == images.Geometry(square=128)
  assert geometry('gravel256', 'gravel') == images.Geometry(square=256)
  # A row's own size still wins.
  c = quality.set_config('brick', 'knn+dataset.texture_resize=64', 0, args)
  assert c.dataset.texture_resize == 64


def test_a_demo_mean_per_size(tmp_path):
  path = tmp_path / 'q.jsonl'
  recs = []
  for i, name in enumerate(('brick', 'grass', 'gravel')):
    for size, base in (('', 0.5), ('256', 0.8)):
      r = _rec('spread', 0, (base + 0.01 * i, base + 0.02 * i, base), None)
      r['set'] = name + size
      recs.append(r)
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  header, _, row = quality.table(str(path)).splitlines()[:3]
  assert header.endswith('| demo mean I / P / PRO | demo256 mean I / P / PRO '
                         '| s/pass |')
  # By hand: 128 px (50 + 51 + 52) / 3 = 51, (50 + 52 + 54) / 3 = 52, 50;
  # 256 px 81, 82, 80.
  assert row.endswith('| 51.0 / 52.0 / 50.0 | 81.0 / 82.0 / 80.0 | 0.50 |')


def test_train_tiles_build_their_own_data_and_label(tmp_path):
  """--train-tiles N: the demo data with N training tiles in a folder of its
  own (the 20-tile data stays), the runs recorded as 'gravel@N' and tabled
  apart from the 20-tile runs and out of the demo mean."""
  import types  # pylint: disable=g-import-not-at-top
  args = types.SimpleNamespace(workdir=str(tmp_path), passes=0,
                               weights_dir='pretrained', train_tiles=24)
  c = quality.set_config('gravel', 'spread', 0, args)
  train = os.path.join(c.dataset.root, 'gravel', 'train', 'good')
  assert c.dataset.root == os.path.join(str(tmp_path), 'demo_data_24')
  assert len(os.listdir(train)) == 24
  assert quality.set_label('gravel', args) == 'gravel@24'
  args.train_tiles = 0
  assert quality.set_label('gravel', args) == 'gravel'

  path = tmp_path / 'q.jsonl'
  recs = [_rec('spread', 0, (0.6, 0.8, 0.5), None),
          _rec('spread', 0, (0.9, 0.9, 0.9), None)]
  recs[1]['set'] = 'grass@24'
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  header, _, row = quality.table(str(path)).splitlines()[:3]
  assert header.startswith('| row | grass I / P / PRO | grass@24 I / P / PRO')
  assert ('60.0 ± 0.0 / 80.0 ± 0.0 / 50.0 ± 0.0 (n=1) | '
          '90.0 ± 0.0 / 90.0 ± 0.0 / 90.0 ± 0.0 (n=1)') in row


def test_train_tiles_refused_for_cookies():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit, match='only for the demo sets'):
    quality.main(['--sets', 'cookies,gravel', '--train-tiles', '80',
                  '--out', '/nonexistent/q.jsonl'])


def test_a_row_takes_a_list_value():
  # --rows keeps a row with a JSON list one row though the list holds a
  # comma, and the list reaches the config's tuple key.
  rows = quality.split_rows(
      'spread,gas_flips+backbone.layers=["layer1","layer2"]+model.heads=3')
  assert rows == ['spread',
                  'gas_flips+backbone.layers=["layer1","layer2"]+model.heads=3']
  assert quality.split_rows('spread') == ['spread']
  args = argparse.Namespace(weights_dir='pretrained', workdir='unused',
                            train_tiles=0, passes=0)
  c = quality.set_config('cookies', rows[1], 0, args)
  assert tuple(c.backbone.layers) == ('layer1', 'layer2')
  assert c.model.heads == 3

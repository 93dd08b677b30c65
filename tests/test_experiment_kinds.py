"""The tensorflow-datasets paths through the whole pipeline (in process).

CIFAR-10 one-class runs on tfds' mock data (nothing can be downloaded here);
MVTec AD through the tfds builder runs on a small MVTec-layout tree (the demo
textures). Both with tiny settings; what is checked is that each kind trains,
evaluates and reports what it can (no masks -> pixel metrics n/a).
"""

import json
import math

import pytest

from configs import demo as demo_config
import helpers
from simplenet_jax import experiment

helpers.require_lite0_wheel()


def _tiny(config, weights_dir):
  config.backbone.weights_dir = str(weights_dir)
  config.model.pretrain_embed_dim = config.model.target_embed_dim = 32
  config.model.hidden = 16
  config.train.num_passes = 2
  config.train.checkpoint_every = 2
  config.eval.visualize = 'none'
  config.dataset.num_workers = 2
  # The plain step and scoring: these tests are about the data kinds; the
  # demo config's heads, synthesis, flips and yardstick have tests of their
  # own and would only add compilations.
  config.model.heads = 1
  config.model.shrink_on_saturation = 0
  config.synthesis.gas = 'none'
  config.eval.tta = 'none'
  config.eval.image_score = 'patch_max'
  config.eval.squash = 'none'
  config.eval.yardstick = False
  config.train.augment = 'none'
  return config


@pytest.fixture(name='weights_dir')
def _weights_dir(lite0_weights_dir):
  return lite0_weights_dir


def test_cifar10_one_class_on_mock_data(tmp_path, weights_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _tiny(demo_config.get_config(), weights_dir)
  config.dataset.kind = 'cifar10'
  config.dataset.categories = ('all',)
  config.dataset.normal_class = 3
  config.dataset.resize = 32
  config.dataset.crop = 0
  config.eval.feature_histogram = False
  with tfds.testing.mock_data(num_examples=24):
    rows = experiment.run(config, str(tmp_path), 'train')
  assert [r['category'] for r in rows] == ['cat']
  # Mock labels are random: both classes are present in 24 test images with
  # overwhelming probability, so image AUROC is defined; there are no masks.
  assert 0.0 <= rows[0]['image_auroc'] <= 1.0
  assert math.isnan(rows[0]['pixel_auroc']) and math.isnan(rows[0]['aupro'])
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['rows'][0]['pixel_auroc'] is None


def test_mvtec_through_tfds_builder(tmp_path, weights_dir):
  from simplenet_jax.data import demo  # pylint: disable=g-import-not-at-top
  root = demo.build(tmp_path / 'mvtec_like', num_train=6, num_test_good=3,
                    num_defect_each=1)
  config = _tiny(demo_config.get_config(), weights_dir)
  config.dataset.kind = 'mvtec_tfds'
  config.dataset.root = str(root)
  config.dataset.categories = ('gravel',)
  config.dataset.textures = ('gravel',)
  config.dataset.texture_resize = 64
  config.dataset.tfds_data_dir = str(tmp_path / 'tfds')
  config.threshold.holdout_fraction = 0.0
  rows = experiment.run(config, str(tmp_path / 'run'), 'train')
  assert rows[0]['category'] == 'gravel' and rows[0]['n_test'] == 6
  for key in ('image_auroc', 'pixel_auroc', 'aupro'):
    assert 0.0 <= rows[0][key] <= 1.0
  assert (tmp_path / 'tfds').is_dir()
  # The tree's 6 validation tiles became the builder's validation split and
  # set the decision threshold, as the files path does.
  from simplenet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from simplenet_jax.data import mvtec_tfds  # pylint: disable=g-import-not-at-top
  b = mvtec_tfds.builder('gravel', str(tmp_path / 'tfds'))
  assert b.info.splits['validation'].num_examples == 6
  _, meta = checkpoint.latest_meta(str(tmp_path / 'run' / 'gravel' /
                                       'checkpoints'))
  assert meta['threshold_source'].endswith(
      'over 6 validation images (normal, not trained on)')
  assert meta['data']['n_validation'] == 6


def test_tfds_validation_split_absent_or_stale(tmp_path):
  """Without validation/good the tfds kind has no validation split (None);
  validation images added after the category was prepared are not silently
  ignored: one error naming the folder to delete."""
  import shutil  # pylint: disable=g-import-not-at-top
  from simplenet_jax import data  # pylint: disable=g-import-not-at-top
  from simplenet_jax.data import demo  # pylint: disable=g-import-not-at-top
  from simplenet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  root = demo.build(tmp_path / 'tree', num_train=3, num_val=0,
                    num_test_good=1, num_defect_each=1, tile=32)
  config = demo_config.get_config()
  config.dataset.kind = 'mvtec_tfds'
  config.dataset.root = str(root)
  config.dataset.textures = ('brick',)
  config.dataset.texture_resize = 32
  config.dataset.tfds_data_dir = str(tmp_path / 'tfds')
  assert len(data.build(config.dataset, 'brick', 'train')) == 3
  assert data.build(config.dataset, 'brick', 'validation') is None
  val = root / 'brick' / 'validation' / 'good'
  val.mkdir(parents=True)
  shutil.copy(root / 'brick' / 'train' / 'good' / '000.png', val / '000.png')
  with pytest.raises(UserError, match='prepared without them; delete that '
                     'folder'):
    data.build(config.dataset, 'brick', 'validation')
  # Once prepared, the source tree is not needed (nor looked for).
  shutil.rmtree(root)
  assert len(data.build(config.dataset, 'brick', 'test')) == 4
  assert data.build(config.dataset, 'brick', 'validation') is None

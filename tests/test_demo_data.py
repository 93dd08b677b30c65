"""The offline demo data set: layout, exact masks, determinism, loading."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data

from configs.default import get_config
from simplenet_jax import data
from simplenet_jax.data import demo
from simplenet_jax.errors import UserError


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return demo.build(tmp_path_factory.mktemp('demo') / 'demo_data')


def _read(path):
  return np.asarray(PIL.Image.open(path))


def test_layout_and_counts(root):
  for c in ('brick', 'grass', 'gravel'):
    assert len(list((root / c / 'train/good').glob('*.png'))) == 20
    assert len(list((root / c / 'validation/good').glob('*.png'))) == 6
    assert len(list((root / c / 'test/good').glob('*.png'))) == 10
    for d in ('hole', 'patch', 'scratch'):
      imgs = sorted((root / c / 'test' / d).glob('*.png'))
      masks = sorted((root / c / 'ground_truth' / d).glob('*_mask.png'))
      assert len(imgs) == len(masks) == 5
      assert [m.name for m in masks] == [f'{p.stem}_mask.png' for p in imgs]
  assert _read(root / 'brick/train/good/000.png').shape == (128, 128)


def test_tiles_are_the_photographs_and_masks_are_exact(root):
  manifest = json.loads((root / demo.MANIFEST).read_text())['files']
  photos = {c: getattr(skimage.data, c)() for c in ('brick', 'grass', 'gravel')}
  assert len(manifest) == 3 * (20 + 6 + 10 + 15)
  for rel, info in manifest.items():
    t, l, s = info['top'], info['left'], info['size']
    clean = photos[info['source']][t:t + s, l:l + s]
    image = _read(root / rel)
    if info['defect'] == 'good':
      np.testing.assert_array_equal(image, clean, err_msg=rel)
      continue
    mask = _read(root / info['mask'])
    assert set(np.unique(mask)) == {0, 255}, rel
    m = mask > 0
    assert (image[~m] == clean[~m]).all(), rel  # Outside: the clean tile.
    assert (image[m] != clean[m]).all(), rel  # Inside: every pixel changed.
    assert 10 <= m.sum() <= 0.25 * m.size, rel


def _tiles(manifest, category, split):
  return [v for k, v in manifest.items() if k.startswith(f'{category}/{split}/')]


def test_train_validation_and_test_regions_disjoint(root):
  """No validation or test tile shares a pixel with a training tile (one
  that does scores like training data and sets the threshold too low)."""
  manifest = json.loads((root / demo.MANIFEST).read_text())['files']
  for c in ('brick', 'grass', 'gravel'):
    train, val, test = (_tiles(manifest, c, s)
                        for s in ('train', 'validation', 'test'))
    assert max(v['top'] + v['size'] for v in train) <= min(v['top'] for v in test)
    assert max(v['left'] + v['size'] for v in train) <= min(v['left'] for v in val)
    assert max(v['top'] + v['size'] for v in val) <= min(v['top'] for v in test)
    assert len({(v['top'], v['left']) for v in val}) > 1


def test_test_tiles_are_those_of_version_1(root):
  """The validation tiles (version 2) left the test set as it was, so
  figures measured on version 1's test tiles still compare: positions of
  version 1's first and last tiles of each test folder, read off its
  manifest."""
  manifest = json.loads((root / demo.MANIFEST).read_text())['files']
  version_1 = {
      'brick/test/good/000.png': (327, 10),
      'brick/test/scratch/004.png': (313, 44),
      'grass/test/good/009.png': (364, 234),
      'grass/test/hole/000.png': (373, 246),
      'gravel/test/patch/002.png': (303, 34),
      'gravel/test/scratch/004.png': (327, 244),
  }
  got = {k: (manifest[k]['top'], manifest[k]['left']) for k in version_1}
  assert got == version_1


def test_idempotent_and_deterministic(root, tmp_path):
  files = sorted(p for p in root.rglob('*') if p.is_file())
  stamps = [p.stat().st_mtime_ns for p in files]
  assert demo.build(root) == root
  assert [p.stat().st_mtime_ns for p in files] == stamps
  again = demo.build(tmp_path / 'again')
  for p in files:
    assert (again / p.relative_to(root)).read_bytes() == p.read_bytes(), p
  other = demo.build(tmp_path / 'seed1', seed=1)
  differ = [p for p in files if p.suffix == '.png' and
            (other / p.relative_to(root)).read_bytes() != p.read_bytes()]
  assert len(differ) > 100


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine/thesis.txt').write_text('x')
  with pytest.raises(UserError, match=r'mine exists and is not a demo data folder'):
    demo.build(tmp_path / 'mine')
  assert (tmp_path / 'mine/thesis.txt').read_text() == 'x'


def test_runs_on_another_data_version_are_refused(root, tmp_path):
  """A workdir trained on an older version of the demo data is not given
  the new data under its checkpoints: one error, nothing changed."""
  import shutil  # pylint: disable=g-import-not-at-top
  cfg = get_config().dataset
  cfg.kind = 'demo'
  workdir = tmp_path / 'run'
  shutil.copytree(root, workdir / 'demo_data')
  manifest = workdir / 'demo_data' / demo.MANIFEST
  doc = json.loads(manifest.read_text())
  doc['params']['version'] = 1
  manifest.write_text(json.dumps(doc))
  # No runs there yet: the old data is simply rebuilt.
  assert len(data.build(cfg, 'brick', 'train', workdir=str(workdir))) == 20
  assert demo.built_version(workdir / 'demo_data') == 2
  manifest.write_text(json.dumps(doc))
  (workdir / 'brick/checkpoints/40').mkdir(parents=True)
  with pytest.raises(UserError, match=r'holds runs \(brick\) trained on '
                     r'version 1 of the demo data.*new --workdir'):
    data.build(cfg, 'grass', 'test', workdir=str(workdir))
  assert demo.built_version(workdir / 'demo_data') == 1
  assert (workdir / 'brick/checkpoints/40').is_dir()


def test_kind_demo_reads_through_mvtec_path(root):
  cfg = get_config().dataset
  cfg.kind = 'demo'
  cfg.texture_resize = 128
  workdir = root.parent  # data.build uses <workdir>/demo_data = root.
  cats = data.categories(cfg)
  assert cats == [('brick', 'texture'), ('grass', 'texture'), ('gravel', 'texture')]
  train = data.build(cfg, 'grass', 'train', workdir=str(workdir))
  test = data.build(cfg, 'grass', 'test', workdir=str(workdir))
  assert (len(train), len(test), test.has_masks) == (20, 25, True)
  assert train.image_hw == test.image_hw == (128, 128)
  for i in range(len(test)):
    ex = test.load(i)
    assert ex['image'].shape == (128, 128, 3)
    assert bool(ex['mask'].any()) == bool(ex['label'])
    if ex['label']:
      rel = Path(ex['path']).relative_to(root)
      ref = _read(root / rel.parts[0] / 'ground_truth' / rel.parts[2] /
                  f'{rel.stem}_mask.png') > 0
      np.testing.assert_array_equal(ex['mask'], ref.astype(np.uint8))
  with pytest.raises(UserError, match='workdir'):
    data.build(cfg, 'grass', 'train')

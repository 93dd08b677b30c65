"""Bad input: one clear line naming the flag, key or file; nothing half-written.

Through main.py (subprocesses) for what is about the command line: status 2,
a single `error: ...` line on stderr (the only line when the error is found
before any work starts), no traceback, and no workdir left behind. The other
bad inputs go through `experiment.run` in process, which is what main.py
calls: the same UserError, which main.py prints as that one line. The data
layer's own handling of each file is unit-tested in tests/test_data.py.
"""

import shutil

from flax import traverse_util
import numpy as np
import PIL.Image
import pytest

from conftest import CATEGORY
from conftest import main_env
from conftest import run_main
from conftest import tiny_args
from simplenet_jax import config_checks
from simplenet_jax import experiment
from simplenet_jax.errors import UserError


def _assert_one_line_error(proc, *expected, only_line=True):
  err = proc.stderr.strip()
  assert proc.returncode == 2, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  lines = err.splitlines()
  if only_line:
    assert len(lines) == 1, lines
  assert lines[-1].startswith('error: ')
  assert [l for l in lines if l.startswith('error:')] == [lines[-1]]
  for text in expected:
    assert text in lines[-1], (text, lines[-1])
  return lines[-1]


@pytest.mark.parametrize('override, expected', [
    ('--config.train.batchsize=3', ['--config.train.batchsize',
                                    'batch_size']),
    ('--config.train.batch_size=two', ['--config.train.batch_size=two']),
    ('--config.train.batch_size=-1', ['config.train.batch_size', '-1']),
])
def test_config_errors_before_any_work(tmp_path, awkward_root,
                                       lite0_weights_dir, jax_cache_dir,
                                       override, expected):
  root, _ = awkward_root
  workdir = tmp_path / 'run'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, root,
                            extra=[override]), env=main_env(jax_cache_dir))
  _assert_one_line_error(proc, *expected)
  assert not workdir.exists()


_BAD_CONFIG_FILES = {
    'syntax error.py': ('def get_config(:\n', ['line 1', 'SyntaxError']),
    'wrong type.py': ('from configs import default\n'
                      'def get_config():\n'
                      '  c = default.get_config()\n'
                      "  c.train.batch_size = 'four'\n"
                      '  return c\n', ['line 4', 'batch_size']),
    'no get_config.py': ('x = 1\n', ['must define get_config()']),
}


@pytest.mark.parametrize('name', sorted(_BAD_CONFIG_FILES) + ['missing.py'])
def test_bad_config_file(tmp_path, name):
  """Found while absl parses the flags: fast, before jax is even imported."""
  path = tmp_path / name
  expected = ['no such file']
  if name in _BAD_CONFIG_FILES:
    text, expected = _BAD_CONFIG_FILES[name]
    path.write_text(text)
  proc = run_main(['--config', str(path), '--workdir', str(tmp_path / 'run')])
  _assert_one_line_error(proc, f'--config={path}', *expected)
  assert not (tmp_path / 'run').exists()


def test_missing_workdir_flag():
  proc = run_main(['--config', 'configs/demo.py'])
  _assert_one_line_error(proc, '--workdir')


def test_dataset_root_missing(tmp_path, lite0_weights_dir, jax_cache_dir):
  workdir = tmp_path / 'run'
  missing = tmp_path / 'no such dataset'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, missing),
                  env=main_env(jax_cache_dir))
  _assert_one_line_error(proc, str(missing), '--config.dataset.root')
  assert not workdir.exists()


def test_missing_weights_give_the_conversion_command(tmp_path, awkward_root,
                                                     jax_cache_dir):
  root, _ = awkward_root
  workdir = tmp_path / 'run'
  empty = tmp_path / 'weights'
  empty.mkdir()
  proc = run_main(tiny_args(workdir, empty, root,
                            extra=['--config.backbone.name=resnet18']),
                  env=main_env(jax_cache_dir))
  # Before it, only the warnings about the dataset's two non-image files.
  line = _assert_one_line_error(
      proc, str(empty / 'resnet18.msgpack'),
      f'python pretrained/convert.py --backbone resnet18 --out-dir {empty}',
      only_line=False)
  assert len(proc.stderr.strip().splitlines()) == 3, proc.stderr
  assert '--download' in line
  assert not workdir.exists()


def test_workdir_that_cannot_be_created(tmp_path, awkward_root,
                                        lite0_weights_dir, jax_cache_dir):
  root, _ = awkward_root
  blocker = tmp_path / 'a file'
  blocker.write_text('')
  workdir = blocker / 'run'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, root),
                  env=main_env(jax_cache_dir))
  _assert_one_line_error(proc, str(workdir), 'Not a directory',
                         only_line=False)


def _copy(awkward_root, tmp_path):
  root, _ = awkward_root
  copy = tmp_path / root.name
  shutil.copytree(root, copy)
  return copy


def test_truncated_training_image_mid_run(tmp_path, awkward_root,
                                          lite0_weights_dir, jax_cache_dir):
  """Found when decoded by a loader thread while the feature cache is built:
  the same one line, and the workdir holds no file but the log."""
  root = _copy(awkward_root, tmp_path)
  bad = root / CATEGORY / 'train' / 'good' / '002.png'
  data = bad.read_bytes()
  bad.write_bytes(data[:len(data) * 6 // 10])
  workdir = tmp_path / 'run'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, root, extra=[
      '--config.threshold.holdout_fraction=0']), env=main_env(jax_cache_dir))
  _assert_one_line_error(proc, str(bad), 'cannot read', only_line=False)
  # Past the up-front checks: the log file was started, and is all there is.
  log = (workdir / 'logs' / 'simplenet.INFO').read_text(encoding='utf-8')
  assert 'train on 1 categories' in log
  assert not [p for p in workdir.rglob('*') if p.is_file() and
              p.relative_to(workdir).parts[0] != 'logs']


# ---- In process: experiment.run, what main.py runs -------------------------


def _config(weights_dir, root, **changes):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  c.backbone.weights_dir = str(weights_dir)
  c.dataset.kind = 'mvtec'
  c.dataset.root = str(root)
  c.dataset.categories = (CATEGORY,)
  c.dataset.resize = c.dataset.crop = 64
  c.model.pretrain_embed_dim = c.model.target_embed_dim = 64
  c.model.hidden = 32
  for key, value in changes.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


def _break_category(root, how):
  """Damages one thing in a copy of the awkward dataset; returns the names
  the error message must contain."""
  cat = root / CATEGORY
  if how == 'category missing':
    shutil.rmtree(cat)
    return [str(cat), '--config.dataset.categories']
  if how == 'split with no images':
    for p in (cat / 'train' / 'good').iterdir():
      if p.suffix.lower() != '.txt':
        p.unlink()
    return ['no images in', str(cat / 'train' / 'good')]
  if how == 'defect image without its mask':
    (cat / 'ground_truth' / 'hole' / '001_mask.png').unlink()
    return [str(cat / 'test' / 'hole' / '001.png'),
            str(cat / 'ground_truth' / 'hole' / '001_mask.png')]
  if how == 'mask of another size':
    mask = cat / 'ground_truth' / 'hole' / '001_mask.png'
    PIL.Image.new('L', (50, 40)).save(mask)
    return [str(mask), str(cat / 'test' / 'hole' / '001.png'), '40x50',
            '96x96']
  if how == 'corrupt image file':
    bad = cat / 'test' / 'good' / '002.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n this is not really a png')
    return [str(bad), 'cannot read']
  raise ValueError(how)


@pytest.mark.parametrize('how', [
    'category missing', 'split with no images',
    'defect image without its mask', 'mask of another size',
    'corrupt image file'])
def test_bad_dataset_found_before_any_work(tmp_path, awkward_root,
                                           lite0_weights_dir, how):
  root = _copy(awkward_root, tmp_path)
  expected = _break_category(root, how)
  workdir = tmp_path / 'run'
  with pytest.raises(UserError) as e:
    experiment.run(_config(lite0_weights_dir, root), str(workdir), 'train')
  for text in expected:
    assert text in str(e.value), (text, str(e.value))
  assert '\n' not in str(e.value)
  assert not workdir.exists()


def test_other_aspect_ratio_without_crop(tmp_path, awkward_root,
                                         lite0_weights_dir):
  root, _ = awkward_root
  workdir = tmp_path / 'run'
  config = _config(lite0_weights_dir, root, dataset__crop=0)
  with pytest.raises(UserError, match='config.dataset.crop > 0') as e:
    experiment.run(config, str(workdir), 'train')
  assert str(root / CATEGORY / 'train' / 'good' / '001.png') in str(e.value)
  assert not workdir.exists()


def test_weights_of_another_backbone(tmp_path, awkward_root, lite0_weights_dir):
  root, _ = awkward_root
  weights = tmp_path / 'weights'
  weights.mkdir()
  shutil.copy(lite0_weights_dir / 'efficientnet_lite0.msgpack',
              weights / 'efficientnet_lite1.msgpack')
  config = _config(weights, root, backbone__name='efficientnet_lite1')
  with pytest.raises(UserError, match="'efficientnet_lite0'") as e:
    experiment.run(config, str(tmp_path / 'run'), 'train')
  assert str(weights / 'efficientnet_lite1.msgpack') in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_weights_of_wrong_shapes(tmp_path, awkward_root, lite0_weights_dir):
  from simplenet_jax.backbones import weights as weights_lib  # pylint: disable=g-import-not-at-top
  root, _ = awkward_root
  good = weights_lib.read_converted(
      str(lite0_weights_dir / 'efficientnet_lite0.msgpack'),
      'efficientnet_lite0')
  flat = traverse_util.flatten_dict(good['params'])
  key = sorted(k for k in flat if k[-1] == 'kernel')[0]
  flat[key] = np.zeros(flat[key].shape[:-1] + (flat[key].shape[-1] + 1,),
                       np.float32)
  bad = dict(good, params=traverse_util.unflatten_dict(flat))
  out = tmp_path / 'weights'
  weights_lib.save_converted(bad, 'efficientnet_lite0',
                             str(out / 'efficientnet_lite0.msgpack'))
  with pytest.raises(UserError, match='shape mismatches') as e:
    experiment.run(_config(out, root), str(tmp_path / 'run'), 'train')
  assert '/'.join(key) in str(e.value)
  assert str(out / 'efficientnet_lite0.msgpack') in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_neighbour_mix_needs_the_cache_and_two_images(tmp_path, awkward_root,
                                                      lite0_weights_dir):
  """train.neighbour_mix takes its partners from the cached features of the
  other training images: without the cache, or with one training image, one
  line names the key."""
  root, _ = awkward_root
  # 'always': the demo config mixes only where it trains on flips, and the
  # tiny images' check may not take them (one image: nothing to check).
  config = _config(lite0_weights_dir, root, train__neighbour_mix=1.0,
                   train__neighbour_mix_when='always',
                   train__cache_features=False, synthesis__gas='none',
                   train__num_passes=1)
  with pytest.raises(UserError) as e:
    experiment.run(config, str(tmp_path / 'run'), 'train')
  assert (f'{CATEGORY}: train.neighbour_mix needs the training features '
          'cached on the device') in str(e.value)
  assert '\n' not in str(e.value)
  one = tmp_path / 'one'
  shutil.copytree(root, one)
  images = sorted(p for p in (one / CATEGORY / 'train' / 'good').iterdir()
                  if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.bmp',
                                          '.tif', '.tiff'))
  for p in images[1:]:
    p.unlink()
  config = _config(lite0_weights_dir, one, train__neighbour_mix=1.0,
                   train__neighbour_mix_when='always',
                   synthesis__gas='none', train__num_passes=1)
  config.threshold.holdout_fraction = 0.0
  with pytest.raises(UserError) as e:
    experiment.run(config, str(tmp_path / 'run1'), 'train')
  assert (f'{CATEGORY}: train.neighbour_mix moves each training feature '
          'toward another training image, but 1 image is trained on') in str(
              e.value)


@pytest.mark.parametrize('mode, expected', [
    ('eval', 'no checkpoint in'), ('predict', 'no trained model in')])
def test_eval_or_predict_before_training(tmp_path, awkward_root,
                                         lite0_weights_dir, mode, expected):
  root, _ = awkward_root
  workdir = tmp_path / 'run'
  config = _config(lite0_weights_dir, root)
  config.predict.inputs = str(root / CATEGORY / 'test' / 'good')
  with pytest.raises(UserError, match=expected):
    experiment.run(config, str(workdir), mode)
  assert not workdir.exists()


@pytest.mark.parametrize('key, value, expected', [
    ('train.batch_size', -2, 'config.train.batch_size: is -2; must be >= 1'),
    ('dataset.crop', 300, 'config.dataset.crop: is 300, larger than '
     'dataset.resize=256'),
    ('backbone.layers', ('layer2', 'layer5'), "config.backbone.layers: "
     "'layer5' is not a layer of wide_resnet50_2"),
    ('train.batch_size', None, 'config.train.batch_size: is None (NoneType); '
     'must be an integer'),
    ('eval.visualize', 'best', "config.eval.visualize: is 'best'; must be one "
     'of'),
    ('eval.image_score', 'mean', "config.eval.image_score: is 'mean'; must be "
     "one of ['patch_max', 'map_max']"),
    ('eval.tta', 'rotations', "config.eval.tta: is 'rotations'; must be one "
     "of ['none', 'flips']"),
    ('eval.squash', 'softmax', "config.eval.squash: is 'softmax'; must be "
     "one of ['none', 'sigmoid']"),
    ('eval.cells', 'centred', "config.eval.cells: is 'centred'; must be "
     "one of ['released', 'measured']"),
    ('threshold.holdout_fraction', 1.0, 'config.threshold.holdout_fraction'),
    ('eval.synthetic_defects', -1, 'config.eval.synthetic_defects: is -1; '
     'must be >= 0 (0 = off)'),
    ('dataset.crop', 8, 'config.dataset.crop: is 8, smaller than the stride '
     '16 of wide_resnet50_2/layer3'),
    ('dataset.categories', (), 'config.dataset.categories: is empty'),
    ('dataset.kind', 'imagenet', "config.dataset.kind: is 'imagenet'; must be "
     'one of'),
    ('dataset.normal_class', 10, 'config.dataset.normal_class: is 10'),
    ('backbone.dtype', 'float16', "config.backbone.dtype: is 'float16'"),
    ('model.noise_mode', 'loud', "config.model.noise_mode: is 'loud'"),
    ('model.noise_shape', 'diagonal', "config.model.noise_shape: is "
     "'diagonal'; must be one of ['isotropic', 'layers']"),
    ('model.shrink_on_saturation', 1.0,
     'config.model.shrink_on_saturation: is 1.0; must be in [0, 1) (0 = off)'),
    ('model.coarse_scale', 0, 'config.model.coarse_scale: is 0; must be an '
     'integer from 1 (the released features) to 4'),
    ('optim.variant', 'mine', "config.optim.variant: is 'mine'"),
    ('train.cache_dtype', 'int8', "config.train.cache_dtype: is 'int8'"),
    ('train.augment', 'mirror', "config.train.augment: is 'mirror'; must be "
     "one of ['none', 'flips', 'flip_lr', 'flip_ud', 'rot180', 'shifts', "
     "'auto']"),
    ('train.neighbour_mix', 1.5, 'config.train.neighbour_mix: is 1.5; must '
     'be in [0, 1] (0 = off)'),
    ('train.neighbour_mix_when', 'textures', 'config.train.neighbour_mix_when'
     ": is 'textures'; must be one of ['always', 'flips']"),
    ('train.neighbour_images', -1, 'config.train.neighbour_images: is -1; '
     'must be >= 0 (0 = every other training image)'),
    ('model.method', 'patchcore', "config.model.method: is 'patchcore'; must "
     "be one of ['simplenet', 'knn']"),
    ('knn.coreset_fraction', 0.0, 'config.knn.coreset_fraction: is 0.0'),
    ('knn.projection_dim', 0, 'config.knn.projection_dim: is 0'),
    ('train.categories_per_step', 0, 'config.train.categories_per_step: is 0'),
    ('synthesis.gas', 'sphere', "config.synthesis.gas: is 'sphere'; must be "
     "one of ['none', 'manifold', 'hypersphere']"),
    ('synthesis.gas_steps', 0, 'config.synthesis.gas_steps: is 0'),
    ('synthesis.loss', 'hinge', "config.synthesis.loss: is 'hinge'; must be "
     "one of"),
    ('synthesis.gas_r1', -1.0, 'config.synthesis.gas_r1: is -1.0'),
    ('synthesis.gas_r2', 0.5, 'config.synthesis.gas_r2: is 0.5; must be >= '
     'synthesis.gas_r1=0.85'),
    ('synthesis.gas_quantile', 1.0, 'config.synthesis.gas_quantile: is 1.0'),
    ('synthesis.gas_bn', 'live', "config.synthesis.gas_bn: is 'live'"),
    ('synthesis.gas_centre', 'epoch',
     "config.synthesis.gas_centre: is 'epoch'; must be one of"),
    ('synthesis.perlin_threshold', 1.5,
     'config.synthesis.perlin_threshold: is 1.5'),
    ('synthesis.las_weight', -1.0, 'config.synthesis.las_weight: is -1.0'),
    ('synthesis.las_variants', 0, 'config.synthesis.las_variants: is 0'),
    ('synthesis.focal_hard', 1.0, 'config.synthesis.focal_hard: is 1.0'),
    ('synthesis.texture_dir', '/no/such/textures',
     "config.synthesis.texture_dir: '/no/such/textures' is not a folder"),
])
def test_impossible_config_values(key, value, expected):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(UserError) as e:
    config_checks.validate(config)
  assert expected in str(e.value)


@pytest.mark.parametrize('changes, expected', [
    ({'synthesis.perlin': True, 'synthesis.gas': 'manifold'},
     "config.synthesis.perlin: cannot be combined with synthesis.gas="
     "'manifold'"),
    ({'model.method': 'knn', 'synthesis.las_weight': 1.0},
     "config.synthesis: switches apply to model.method=simplenet, not 'knn'"),
    ({'synthesis.gas': 'manifold', 'synthesis.gas_centre': 'pass'},
     "config.synthesis.gas_centre: is 'pass'; only synthesis.gas="
     "'hypersphere' has a centre"),
    ({'model.method': 'knn', 'train.neighbour_mix': 1.0},
     "config.train.neighbour_mix: applies to model.method=simplenet, not "
     "'knn'; set it to 0"),
    ({'model.noise_shape': 'layers', 'model.target_embed_dim': 1535},
     "config.model.noise_shape: is 'layers', but model.target_embed_dim "
     "(1535) is not a multiple of the 2 backbone.layers"),
    ({'model.coarse_scale': 2, 'backbone.layers': ('layer2',)},
     'config.model.coarse_scale: is 2, but backbone.layers has one layer'),
])
def test_synthesis_switches_that_do_not_combine(changes, expected):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for key, value in changes.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(UserError) as e:
    config_checks.validate(config)
  assert expected in str(e.value)


def test_texture_folder_without_images_is_refused_before_any_work(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  (tmp_path / 'readme.txt').write_text('no images here')
  config = default.get_config()
  config.synthesis.texture_dir = str(tmp_path)
  config_checks.validate(config)  # Nothing draws textures from it.
  # LAS does, and so does eval.synthetic_defects.
  for key, value in (('synthesis.las_weight', 1.0),
                     ('eval.synthetic_defects', 4)):
    config = default.get_config()
    config.synthesis.texture_dir = str(tmp_path)
    section, name = key.split('.')
    config[section][name] = value
    with pytest.raises(UserError) as e:
      config_checks.validate(config)
    assert str(e.value) == (
        f"config.synthesis.texture_dir: {str(tmp_path)!r} holds no image "
        "files; give a folder of texture images (e.g. DTD's images/) or '' "
        'for procedural textures')
  (tmp_path / 'a.png').write_bytes(b'')  # Named like an image: accepted.
  config_checks.validate(config)


def test_category_names_are_checked_and_split_once():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.kind = 'demo'
  config.dataset.categories = ('brick,grass',)  # The command line's form.
  assert config_checks.validate(config).dataset.categories == ('brick',
                                                              'grass')
  config.dataset.categories = ('brick', 'marble')
  with pytest.raises(UserError, match="config.dataset.categories: 'marble' "
                     'is not a demo category'):
    config_checks.validate(config)


def test_free_form_overrides_leave_the_command_line_and_join_the_config():
  """--config.dataset.test_dirs.<any name>: absl only sets keys a config file
  has, so main.py takes these off the command line and sets them itself."""
  from configs import folder  # pylint: disable=g-import-not-at-top
  from simplenet_jax import cli  # pylint: disable=g-import-not-at-top
  argv = ['main.py', '--config', 'configs/folder.py',
          '--config.dataset.test_dirs.crack=/d/crack',
          '--config.dataset.test_dirs.dent', '/d/dent',
          '--config.dataset.test_dirs.good=/d/ok',
          '--config.train.num_passes=2', '--config.dataset.mask_dir=/m']
  keep, taken = cli.split_free_form(argv)
  assert keep == ['main.py', '--config', 'configs/folder.py',
                  '--config.train.num_passes=2', '--config.dataset.mask_dir=/m']
  assert taken == [('dataset.test_dirs', 'crack', '/d/crack'),
                   ('dataset.test_dirs', 'dent', '/d/dent'),
                   ('dataset.test_dirs', 'good', '/d/ok')]
  config = folder.get_config()
  config.lock()  # As main.py's config flag loads it.
  cli._FREE_FORM_ARGS[:] = taken  # pylint: disable=protected-access
  try:
    cli.apply_free_form(config)
  finally:
    cli._FREE_FORM_ARGS[:] = []  # pylint: disable=protected-access
  assert dict(config.dataset.test_dirs) == {
      'good': '/d/ok', 'defect': '', 'crack': '/d/crack', 'dent': '/d/dent'}
  config_checks.validate(config)


def test_unknown_and_missing_keys_in_a_config_file():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.train.bach_size = 8  # A typo in a config file adds a key.
  with pytest.raises(UserError, match='config.train.bach_size: unknown key'):
    config_checks.validate(config)
  config = default.get_config()
  del config.eval['sigma']
  with pytest.raises(UserError, match='config.eval.sigma: missing'):
    config_checks.validate(config)
  config = default.get_config()
  config.dataset.test_dirs.scratch = '/x'  # Free-form: any name is fine.
  config_checks.validate(config)

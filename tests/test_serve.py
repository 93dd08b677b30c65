"""simplenet_jax.serve: the runtime without JAX, against --mode=predict.

The runtime runs in subprocesses where importing jax, flax (and the rest of
the training stack) fails. Its preprocessing and heat maps are compared
pixel for pixel with the training pipeline's.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import conftest
import helpers
from simplenet_jax import serve
from simplenet_jax import visualize
from simplenet_jax.data import images as data_images
from simplenet_jax.data import inputs as data_inputs

helpers.require_lite0_wheel()

# What the runtime must not need.
BLOCKED = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'scipy', 'sklearn',
           'torch', 'ml_collections', 'absl', 'tensorflow',
           'tensorflow_datasets', 'simplenet_jax')
ALLOWED = ('simplenet_jax', 'simplenet_jax.serve')


def run_serve(*args, cwd=conftest.ROOT):
  """python -m simplenet_jax.serve ARGS with the training stack blocked."""
  code = conftest.import_blocker(*BLOCKED, allow=ALLOWED) + '''
import runpy
sys.argv[0] = 'serve'
try:
  runpy.run_module('simplenet_jax.serve', run_name='__main__')
finally:
  leaked = sorted({m.split('.')[0] for m in sys.modules} & {
      'jax', 'jaxlib', 'flax', 'scipy', 'torch', 'optax', 'orbax'})
  if leaked:
    print('error: imported', leaked, file=sys.stderr)
    sys.exit(3)
'''
  return subprocess.run([sys.executable, '-c', code, *map(str, args)],
                        cwd=cwd, capture_output=True, text=True, timeout=300)


def _records(proc):
  return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]


def _errors(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith('error:')]


@pytest.mark.parametrize('which', ['exported_lite0', 'exported_wrn50'])
def test_serve_matches_predict(which, request, tmp_path):
  """The same images through serve (no JAX) and main.py --mode=predict."""
  exported = request.getfixturevalue(which)
  heat = tmp_path / 'heat maps'
  proc = run_serve('--model', exported.folder, 'predict', exported.inputs,
                   '--heatmaps', heat, '--batch-size', 4)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = _records(proc)
  assert sorted(r['path'] for r in records) == sorted(exported.predictions)
  for r in records:
    want = exported.predictions[r['path']]
    assert abs(r['score'] - want['score']) <= 1e-4 * abs(want['score']), (
        r, want)
    assert r['threshold'] == want['threshold']
    assert r['anomalous'] == want['anomalous']
    assert r['category'] == want['category']
    assert os.path.basename(r['heatmap']) == os.path.basename(
        want['heatmap'])
    with PIL.Image.open(r['heatmap']) as a, PIL.Image.open(
        want['heatmap']) as b:
      assert a.size == b.size
      # Colours may differ by one LUT step where a value sits on a rounding
      # edge; the picture is the same.
      diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
      assert (diff > 8).mean() < 0.01
  if which == 'exported_lite0':
    assert {r['anomalous'] for r in records} == {True, False}


def test_serve_openvino_backend(exported_lite0):
  helpers.require('openvino', 'OpenVINO (requirements-dev.txt) is absent')
  ort_proc = run_serve('--model', exported_lite0.folder, 'predict',
                       exported_lite0.inputs)
  ov_proc = run_serve('--model', exported_lite0.folder, '--backend',
                      'openvino', 'predict', exported_lite0.inputs)
  assert ov_proc.returncode == 0, ov_proc.stderr[-2000:]
  a, b = _records(ort_proc), _records(ov_proc)
  assert [r['path'] for r in a] == [r['path'] for r in b]
  for x, y in zip(a, b):
    assert abs(x['score'] - y['score']) <= 1e-4 * abs(x['score'])
    assert x['anomalous'] == y['anomalous']


def test_preprocessing_matches_training_pipeline(awkward_root):
  """Every awkward file (16-bit, palette, RGBA, CMYK, EXIF-rotated, odd
  sizes) under three geometries: the same pixels as data/inputs.py."""
  root, _ = awkward_root
  paths = [str(p) for p in data_images.list_images(
      root / conftest.CATEGORY / 'train' / 'good')]
  assert len(paths) >= 10
  # crop 57: odd margins, where rounding the crop's offset matters.
  for geometry, hw in ((data_images.Geometry(shorter=64, crop=57), (57, 57)),
                       (data_images.Geometry(square=48), (48, 48)),
                       (data_images.Geometry(shorter=40), (40, 53))):
    files = data_inputs.ImageFiles(paths, geometry, hw)
    meta = {'image_size': list(hw), 'preprocess': {'geometry': {
        'shorter': geometry.shorter, 'square': geometry.square,
        'crop': geometry.crop}}}
    for i, p in enumerate(paths):
      np.testing.assert_array_equal(serve.preprocess(p, meta),
                                    files.load(i)['image'], err_msg=p)


def test_heatmap_matches_visualize(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  amap = rng.standard_normal((40, 50)).astype(np.float32)
  for lo, hi in ((-1.0, 1.5), (0.3, 0.3)):
    # As predict draws it: enlarged to its display scale (5 for 40x50).
    visualize.heatmap_png(amap, image, str(tmp_path / 'a.png'), lo, hi,
                          caption='score 1.2345 thr 0.5000',
                          scale=visualize.display_scale(image.shape[:2]))
    ours = serve.heatmap_image(image, amap, lo, hi, 'score 1.2345 thr 0.5000')
    with PIL.Image.open(tmp_path / 'a.png') as want:
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))
  assert serve.safe_filename('a b/ç?.png') == visualize.safe_filename(
      'a b/ç?.png')


def test_serve_bad_images_are_reported_and_others_scored(exported_lite0,
                                                         tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  good = sorted(exported_lite0.predictions)[:2]
  for p in good:
    shutil.copy(p, photos / os.path.basename(os.path.dirname(p) + '_' +
                                             os.path.basename(p)))
  (photos / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  with open(good[0], 'rb') as f:
    (photos / 'truncated.png').write_bytes(f.read()[:300])
  (photos / 'notes.txt').write_text('not an image')
  proc = run_serve('--model', exported_lite0.folder, 'predict', photos)
  assert proc.returncode == 1, proc.stderr
  errors = _errors(proc)
  assert len(errors) == 2, proc.stderr
  assert 'broken.png' in errors[0] and 'truncated.png' in errors[1]
  assert len(_records(proc)) == 2
  assert 'notes.txt' in proc.stderr  # Skipped with a warning.


def _copy_export(exported, tmp_path, name='model'):
  folder = tmp_path / name
  shutil.copytree(exported.folder, folder)
  return folder


def _expect_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  (line,) = _errors(proc)
  assert 'Traceback' not in proc.stderr
  for n in needles:
    assert str(n) in line, line
  assert not _records(proc)
  return line


def test_serve_bad_model_folders(exported_lite0, exported_wrn50, tmp_path):
  inputs = exported_lite0.inputs
  # No such folder; a folder without a model.
  _expect_error(run_serve('--model', tmp_path / 'nope', 'predict', inputs),
                tmp_path / 'nope', 'no such folder')
  (tmp_path / 'empty').mkdir()
  _expect_error(run_serve('--model', tmp_path / 'empty', 'predict', inputs),
                tmp_path / 'empty', 'metadata.json')

  # A damaged model (bytes changed) and a truncated one.
  damaged = _copy_export(exported_lite0, tmp_path, 'damaged')
  data = bytearray((damaged / 'model.onnx').read_bytes())
  data[len(data) // 2] ^= 0xFF
  (damaged / 'model.onnx').write_bytes(bytes(data))
  _expect_error(run_serve('--model', damaged, 'predict', inputs),
                damaged / 'model.onnx', 'damaged')
  truncated = _copy_export(exported_lite0, tmp_path, 'truncated')
  (truncated / 'model.onnx').write_bytes(bytes(data[:1000]))
  _expect_error(run_serve('--model', truncated, 'predict', inputs),
                truncated / 'model.onnx')
  # ... and one whose metadata was edited to match a damaged file: the
  # runtime itself cannot load it.
  meta = json.loads((truncated / 'metadata.json').read_text())
  meta['files']['model.onnx']['sha256'] = serve.sha256(
      truncated / 'model.onnx')
  (truncated / 'metadata.json').write_text(json.dumps(meta))
  _expect_error(run_serve('--model', truncated, 'predict', inputs),
                truncated / 'model.onnx', 'cannot load')

  # Metadata of another export beside this model.
  mixed = _copy_export(exported_lite0, tmp_path, 'mixed')
  shutil.copy(exported_wrn50.folder / 'metadata.json', mixed)
  _expect_error(run_serve('--model', mixed, 'predict', inputs),
                mixed / 'model.onnx', 'metadata')
  # Metadata edited to another image size (its sha256 still matches).
  resized = _copy_export(exported_lite0, tmp_path, 'resized')
  meta = json.loads((resized / 'metadata.json').read_text())
  meta['image_size'] = [96, 96]
  (resized / 'metadata.json').write_text(json.dumps(meta))
  _expect_error(run_serve('--model', resized, 'predict', inputs),
                resized / 'metadata.json', '96x96')
  # Unreadable metadata.
  (resized / 'metadata.json').write_text('{"format": ')
  _expect_error(run_serve('--model', resized, 'predict', inputs),
                resized / 'metadata.json', 'cannot be read')

  # No images; a bad flag.
  _expect_error(run_serve('--model', exported_lite0.folder, 'predict',
                          tmp_path / 'none*.png'), 'no image files')
  _expect_error(run_serve('--model', exported_lite0.folder, 'predict',
                          inputs, '--batch-size', 0), '--batch-size')
  _expect_error(run_serve('predict', inputs), '--model')

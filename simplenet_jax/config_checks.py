"""Config validation: every impossible value is caught before any work starts.

Each failure is a UserError naming the key (`config.train.batch_size`, ...)
and what is allowed, so a typo costs seconds, not a training run.
"""

import re
import sys

from absl import app
import ml_collections

from simplenet_jax.errors import UserError

_MAIN_STARTED = False


def run_app(main):
  """absl's app.run, but a bad --config or --config.key is one clear line."""

  def wrapped(argv):
    global _MAIN_STARTED
    _MAIN_STARTED = True
    return main(argv)

  try:
    app.run(wrapped)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if _MAIN_STARTED:
      raise
    # ml_collections raises these while parsing --config.<key>=value.
    bad = [a for a in sys.argv[1:] if a.startswith('--config.')]
    print(f'error: could not apply the config overrides {bad}: '
          f'{type(e).__name__}: {e}. Check the key names against the config '
          'file (configs/default.py lists every key).', file=sys.stderr)
    sys.exit(2)


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


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Normalises list-valued keys and checks every value; returns the config."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError('--config: the config file could not be loaded; give a '
                    'path such as configs/mvtec.py that defines get_config()')
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
  _check(len(d.categories) >= 1, 'dataset.categories', 'is empty')
  _check(d.resize > 0, 'dataset.resize', f'is {d.resize}; must be > 0')
  _check(d.crop >= 0, 'dataset.crop', f'is {d.crop}; must be >= 0 (0 = none)')
  _check(d.crop <= d.resize, 'dataset.crop',
         f'is {d.crop}, larger than dataset.resize={d.resize}; a center crop '
         'cannot be larger than the resized image')
  _check(d.texture_resize >= 0, 'dataset.texture_resize',
         'must be >= 0 (0 = textures take the object transform)')
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

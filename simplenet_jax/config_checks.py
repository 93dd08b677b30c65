"""Config validation: every rule about a config value, checked once.

`validate` runs before any work starts; each failure is one line naming the
key (`config.train.batch_size`, ...) and what is allowed, so a typo costs
seconds, not a training run. The lists of allowed values live with the code
that implements them (data.KINDS, train.NOISE_MODES, ...) and are enforced
here only; the library's functions trust a validated config. Command-line
errors (flags, the config file itself) are `cli.py`'s.
"""

import os
import re

import ml_collections

from simplenet_jax import augments
from simplenet_jax import backbones
from simplenet_jax import cells
from simplenet_jax import data
from simplenet_jax import evaluate
from simplenet_jax import feature_cache
from simplenet_jax import neighbour_mix
from simplenet_jax import scoring
from simplenet_jax import synthesis
from simplenet_jax import train
from simplenet_jax.errors import UserError


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


def _default_module():
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    # Not skipped: without the schema a misspelt key would pass silently.
    raise UserError('configs/default.py cannot be imported (the schema of '
                    'every config key); run from the repository root or put '
                    f'it on PYTHONPATH ({e})') from None
  return default


def _schema():
  """configs/default.py's config: every key and its type."""
  return _default_module().get_config()


def _free_form() -> tuple[str, ...]:
  """Groups whose keys are the user's names (configs/default.py)."""
  return _default_module().FREE_FORM


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
      if name not in _free_form():
        check_keys(value, like, name + '.')
      continue
    _check(_type_ok(value, like), name,
           f'is {value!r} ({type(value).__name__}); must be {_type_name(like)}')


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Normalises list-valued keys and checks every value; returns the config."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError('--config: the config file could not be loaded; give a '
                    'path such as configs/mvtec.py that defines get_config()')
  check_keys(config, _schema())

  b = config.backbone
  spec = backbones.get_spec(b.name)
  b.layers = split_list(b.layers)
  _check(len(b.layers) >= 1, 'backbone.layers', 'needs at least one layer')
  for layer in b.layers:
    _check(layer in spec.channels, 'backbone.layers',
           f'{layer!r} is not a layer of {b.name}; use some of '
           f'{sorted(spec.channels)}')
  _one_of(config, 'backbone.dtype', tuple(backbones.DTYPES))

  d = config.dataset
  _one_of(config, 'dataset.kind', data.KINDS)
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
  _check(-1 <= d.normal_class <= 9, 'dataset.normal_class',
         f'is {d.normal_class}; must be -1 (each class in turn) or 0..9')
  data.categories(d)  # The category-name rules (UserError naming the key).

  m = config.model
  _check(m.patch_size >= 1 and m.patch_size % 2 == 1, 'model.patch_size',
         f'is {m.patch_size}; must be an odd number >= 1')
  for key in ('pretrain_embed_dim', 'target_embed_dim', 'hidden', 'heads'):
    _check(m[key] >= 1, f'model.{key}', f'is {m[key]}; must be >= 1')
  _check(m.disc_layers >= 2, 'model.disc_layers',
         f'is {m.disc_layers}; must be >= 2 (one hidden block and the tail)')
  _check(m.pre_proj in (0, 1), 'model.pre_proj',
         f'is {m.pre_proj}; must be 0 (no adaptor) or 1 (the released '
         'one-layer adaptor)')
  _check(m.margin > 0, 'model.margin', f'is {m.margin}; must be > 0')
  _one_of(config, 'model.noise_mode', train.NOISE_MODES)
  _check(m.noise_std > 0, 'model.noise_std', f'is {m.noise_std}; must be > 0')
  _check(m.noise_rel > 0, 'model.noise_rel', f'is {m.noise_rel}; must be > 0')
  _check(m.mix_noise >= 1, 'model.mix_noise', f'is {m.mix_noise}; must be >= 1')
  _one_of(config, 'model.noise_shape', train.NOISE_SHAPES)
  layers = len(config.backbone.layers)
  _check(isinstance(m.coarse_scale, int) and 1 <= m.coarse_scale <= 4,
         'model.coarse_scale', f'is {m.coarse_scale}; must be an integer '
         'from 1 (the released features) to 4')
  _check(m.coarse_scale == 1 or layers >= 2, 'model.coarse_scale',
         f'is {m.coarse_scale}, but backbone.layers has one layer, which '
         'it reads at the image size; give two layers or set it to 1')
  _check(m.noise_shape == 'isotropic' or m.target_embed_dim % layers == 0,
         'model.noise_shape', f"is 'layers', but model.target_embed_dim "
         f'({m.target_embed_dim}) is not a multiple of the {layers} '
         "backbone.layers, so a dimension would mix two layers; use "
         "'isotropic' or a target_embed_dim divisible by it")
  _check(0 <= m.shrink_on_saturation < 1, 'model.shrink_on_saturation',
         f'is {m.shrink_on_saturation}; must be in [0, 1) (0 = off)')

  _one_of(config, 'model.method', scoring.METHODS)
  k = config.knn
  _check(0 < k.coreset_fraction <= 1, 'knn.coreset_fraction',
         f'is {k.coreset_fraction}; must be in (0, 1] (1 = the whole bank)')
  _check(k.projection_dim >= 1, 'knn.projection_dim',
         f'is {k.projection_dim}; must be >= 1')

  y = config.synthesis
  _one_of(config, 'synthesis.gas', synthesis.GAS_MODES)
  _one_of(config, 'synthesis.gas_bn', synthesis.GAS_BN)
  _one_of(config, 'synthesis.gas_centre', synthesis.GAS_CENTRE)
  _check(y.gas_centre == 'step' or y.gas == 'hypersphere',
         'synthesis.gas_centre', f'is {y.gas_centre!r}; only '
         "synthesis.gas='hypersphere' has a centre (use 'step')")
  _one_of(config, 'synthesis.loss', synthesis.LOSSES)
  for key in ('gas_steps', 'gas_every', 'las_variants'):
    _check(y[key] >= 1, f'synthesis.{key}', f'is {y[key]}; must be >= 1')
  for key in ('gas_step', 'gas_r1'):
    _check(y[key] > 0, f'synthesis.{key}', f'is {y[key]}; must be > 0')
  _check(y.gas_r2 >= y.gas_r1, 'synthesis.gas_r2',
         f'is {y.gas_r2}; must be >= synthesis.gas_r1={y.gas_r1}')
  _check(0 < y.gas_quantile < 1, 'synthesis.gas_quantile',
         f'is {y.gas_quantile}; must be in (0, 1)')
  _check(not (y.perlin and y.gas != 'none'), 'synthesis.perlin',
         f'cannot be combined with synthesis.gas={y.gas!r}; use one of them')
  _check(-1 < y.perlin_threshold < 1, 'synthesis.perlin_threshold',
         f'is {y.perlin_threshold}; must be in (-1, 1) (Perlin values)')
  _check(0 <= y.perlin_empty < 1, 'synthesis.perlin_empty',
         f'is {y.perlin_empty}; must be in [0, 1)')
  for key in ('las_weight', 'focal_gamma'):
    _check(y[key] >= 0, f'synthesis.{key}', f'is {y[key]}; must be >= 0')
  _check(0 <= y.focal_hard < 1, 'synthesis.focal_hard',
         f'is {y.focal_hard}; must be in [0, 1)')
  _check(not y.texture_dir or os.path.isdir(y.texture_dir),
         'synthesis.texture_dir',
         f'{y.texture_dir!r} is not a folder; give a folder of texture '
         "images (e.g. DTD's images/) or '' for procedural textures")
  # LAS and eval.synthetic_defects (whose range is checked below) draw
  # their textures from it.
  _check(not (y.texture_dir and (y.las_weight > 0 or
                                 config.eval.synthetic_defects > 0)) or
         synthesis.texture_files(y.texture_dir), 'synthesis.texture_dir',
         f'{y.texture_dir!r} holds no image files; give a folder of texture '
         "images (e.g. DTD's images/) or '' for procedural textures")
  _check(m.method == 'simplenet' or
         not synthesis.SynthesisConfig.from_config(y).active,
         'synthesis', f'switches apply to model.method=simplenet, not '
         f'{m.method!r}; turn them off')

  o = config.optim
  _one_of(config, 'optim.variant', train.VARIANTS)
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
  _one_of(config, 'train.cache_dtype', tuple(feature_cache.DTYPES))
  _one_of(config, 'train.augment', augments.AUGMENTS)
  _check(0 <= t.neighbour_mix <= 1, 'train.neighbour_mix',
         f'is {t.neighbour_mix}; must be in [0, 1] (0 = off)')
  _one_of(config, 'train.neighbour_mix_when', neighbour_mix.WHEN)
  _check(t.neighbour_images >= 0, 'train.neighbour_images',
         f'is {t.neighbour_images}; must be >= 0 (0 = every other training '
         'image)')
  _check(m.method == 'simplenet' or not t.neighbour_mix,
         'train.neighbour_mix', f'applies to model.method=simplenet, not '
         f'{m.method!r}; set it to 0')
  _check(t.categories_per_step >= 1, 'train.categories_per_step',
         f'is {t.categories_per_step}; must be >= 1')

  e = config.eval
  _check(e.batch_size >= 1, 'eval.batch_size', f'is {e.batch_size}; must be >= 1')
  _check(e.sigma >= 0, 'eval.sigma', 'must be >= 0')
  _one_of(config, 'eval.image_score', scoring.IMAGE_SCORES)
  _one_of(config, 'eval.tta', scoring.TTAS)
  _one_of(config, 'eval.squash', scoring.SQUASHES)
  _one_of(config, 'eval.cells', cells.CELLS)
  _check(0 < e.aupro_max_fpr <= 1, 'eval.aupro_max_fpr', 'must be in (0, 1]')
  _one_of(config, 'eval.visualize', evaluate.VISUALIZE)
  _check(e.visualize_top_n >= 0, 'eval.visualize_top_n', 'must be >= 0')
  _check(e.synthetic_defects >= 0, 'eval.synthetic_defects',
         f'is {e.synthetic_defects}; must be >= 0 (0 = off)')

  r = config.report
  _check(r.gallery_size >= 0, 'report.gallery_size', 'must be >= 0')
  _check(r.tensorboard_heatmaps >= 0, 'report.tensorboard_heatmaps',
         'must be >= 0')

  h = config.threshold
  _check(0 <= h.holdout_fraction < 1, 'threshold.holdout_fraction',
         f'is {h.holdout_fraction}; must be in [0, 1)')
  _check(0 <= h.quantile <= 1, 'threshold.quantile', 'must be in [0, 1]')
  return config

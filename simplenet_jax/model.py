"""SimpleNet's head: feature adaptor, anomalous features, discriminator.

Initialisation and BatchNorm follow the released PyTorch code: Linear weights
are xavier-normal (untruncated), Linear biases keep torch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm1d starts at scale 1, bias 0,
running mean 0, running var 1.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.init.xavier_normal_: untruncated normal,
# std = sqrt(2 / (fan_in + fan_out)).
xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


def torch_linear_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class TorchDense(nn.Module):
  """Linear layer initialised as the released code's torch.nn.Linear."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param('kernel', xavier_normal, (fan_in, self.features))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', torch_linear_bias_init(fan_in),
                         (self.features,))
    return y


class Adaptor(nn.Module):
  """The feature adaptor: one Linear(D, D) with bias (released: pre_proj=1;
  model.pre_proj=0 holds it at the identity, `train._init_head`)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return TorchDense(self.features, name='fc')(x)


def num_heads(params) -> int:
  """How many heads `params` ({'adaptor', 'discriminator'}) hold: 1, or K
  with model.heads = K > 1, where every leaf has a leading K axis."""
  kernel = params['adaptor']['fc']['kernel']
  return 1 if kernel.ndim == 2 else int(kernel.shape[0])


def _masked_mean(x, mask):
  """Mean over axis 0 of the rows where mask > 0; also returns their count."""
  if mask is None:
    return x.mean(0), x.shape[0]
  keep = (mask > 0).reshape(mask.shape + (1,) * (x.ndim - 1))
  n = keep.sum(dtype=jnp.float32)
  # where, not a product: a non-finite padding row must not leak in.
  return jnp.where(keep, x, 0.0).sum(0) / jnp.maximum(n, 1.0), n


class TorchBatchNorm(nn.Module):
  """torch.nn.BatchNorm1d over (N, C) inputs.

  Train mode normalises with the batch mean and the biased batch variance but
  moves `running_var` towards the unbiased one (n / (n - 1)), as torch does.
  `mask` (N,) of 0/1 drops rows from the statistics (padding).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if train:
      mean, n = _masked_mean(x, mask)
      var, _ = _masked_mean(jnp.square(x - mean), mask)
      if not self.is_initializing():
        n = jnp.asarray(n, jnp.float32)
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class Discriminator(nn.Module):
  """layers - 1 blocks of Linear(., hidden) -> BatchNorm1d -> LeakyReLU(0.2),
  then Linear(hidden, 1) (the released code's dsc_layers = `layers`, 2 by
  default: one block).

  Returns (N,) scores: high = normal. With after_fc=True, x is already the
  first Linear's output (N, hidden) (training folds that Linear into the
  adaptor's, see train.loss_fn). The first block is named fc / bn, later
  ones fc2 / bn2, fc3 / bn3, ... (`block_names`).
  """
  hidden: int
  layers: int = 2

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None,
               after_fc: bool = False):
    for i, (fc, bn) in enumerate(block_names(self.layers)):
      if i or not after_fc:
        x = TorchDense(self.hidden, name=fc)(x)
      x = TorchBatchNorm(name=bn)(x, train=train, mask=mask)
      x = nn.leaky_relu(x, negative_slope=0.2)
    return TorchDense(1, use_bias=False, name='tail')(x)[..., 0]


def block_names(layers: int) -> list[tuple[str, str]]:
  """The (Linear, BatchNorm) names of a `layers`-layer discriminator's
  hidden blocks, in order."""
  return [('fc', 'bn')] + [(f'fc{i}', f'bn{i}') for i in range(2, layers)]


def num_layers(disc_params) -> int:
  """The `layers` of the discriminator whose params these are."""
  return 1 + sum(name.startswith('fc') for name in disc_params)


@functools.partial(jax.jit, static_argnames=('shape', 'mix_noise'))
def sample_noise(key: jax.Array, shape: tuple[int, int], std,
                 mix_noise: int = 1) -> jax.Array:
  """Gaussian noise (N, D) for anomalous features.

  Row i's std is std * 1.1**k with k ~ U{0..mix_noise-1} per row (released:
  one of `mix_noise` noise tensors chosen per row; same distribution). Row i's
  noise depends only on (key, i), not on N: rows appended as padding leave the
  other rows' noise unchanged.
  """
  n, d = shape

  def row(i):
    k_noise, k_mix = jax.random.split(jax.random.fold_in(key, i))
    z = jax.random.normal(k_noise, (d,), jnp.float32)
    if mix_noise > 1:
      level = jax.random.randint(k_mix, (), 0, mix_noise)
      z = z * jnp.power(1.1, level.astype(jnp.float32))
    return z

  z = jax.vmap(row)(jnp.arange(n, dtype=jnp.uint32))
  return z * jnp.asarray(std, jnp.float32)


def layer_noise(noise: jax.Array, features: jax.Array, kernel: jax.Array,
                layers: int, mask: Optional[jax.Array] = None) -> jax.Array:
  """Noise sized to each backbone layer's own spread (model.noise_shape=
  'layers'), from isotropic `noise`.

  The aggregated local feature holds the layers' blocks side by side
  (`features.aggregate`: layer-major, D / layers dims each). Their spreads
  differ: EfficientNet-Lite0's layer 3 varies less than half as much as its
  layer 2 over the demo's textures, so noise of one size is twice as easy
  to see in layer 3's dims, and the head learns to flag fakes mostly there;
  layer 3 is a grid of half the resolution, upsampled, so its scores spill
  onto the cells round a defect (docs/quality.md, fiftieth round). Here
  block l of every row's noise is scaled by s_l, the centred spread
  (sqrt of the mean per-dimension variance) of block l over the batch's
  rows, carried through the adaptor's matrix (a move of the local
  features, seen where the noise is added), and the whole scaled so that
  its expected squared norm stays D x std^2: noise_std and noise_rel keep
  their meaning. Like the released noise it is a fixed offset: no gradient
  flows through the spreads or the matrix.

  Args:
    noise: (N, D) isotropic noise (`sample_noise`).
    features: (N, D) the batch's local features, before the adaptor.
    kernel: (D, D) the adaptor's matrix (x @ kernel; the identity with
      model.pre_proj=0).
    layers: how many layers' blocks D holds (D divisible by it).
    mask: optional (N,) 0/1; rows with 0 (padding) do not count.

  Returns:
    (N, D) float32.
  """
  n, d = features.shape
  w = (jnp.ones((n,), jnp.float32) if mask is None else
       mask.astype(jnp.float32))[:, None]
  count = jnp.maximum(jnp.sum(w), 1.0)
  x = features.astype(jnp.float32)
  mean = jnp.sum(x * w, axis=0) / count
  var = jnp.sum(jnp.square(x - mean) * w, axis=0) / count  # (D,)
  spread = jnp.sqrt(jnp.mean(var.reshape(layers, d // layers), axis=1))
  scale = jax.lax.stop_gradient(jnp.repeat(spread, d // layers))  # (D,)
  kernel = jax.lax.stop_gradient(kernel.astype(jnp.float32))
  # E|(scale * z) @ kernel|^2 = sum_j scale_j^2 |kernel_j|^2 for z ~ N(0, I).
  energy = jnp.sum(jnp.square(scale) * jnp.sum(jnp.square(kernel), axis=1))
  norm = jnp.sqrt(d / jnp.maximum(energy, 1e-30))
  return jnp.matmul(noise * (scale * norm), kernel,
                    precision=jax.lax.Precision.HIGHEST)


def truncated_l1_loss(true_scores: jax.Array, fake_scores: jax.Array,
                      margin: float, mask: Optional[jax.Array] = None):
  """Truncated L1 loss of the released code.

  Args:
    true_scores, fake_scores: (N,) discriminator outputs.
    margin: the margin m (th in the released code).
    mask: optional (N,) 0/1; rows with 0 are ignored.

  Returns:
    (loss, p_true, p_fake): mean(max(0, m - true)) + mean(max(0, fake + m)),
    the fraction of true scores >= m and of fake scores < -m.
  """
  true_loss = jax.nn.relu(margin - true_scores)
  fake_loss = jax.nn.relu(fake_scores + margin)
  p_true = (true_scores >= margin).astype(jnp.float32)
  p_fake = (fake_scores < -margin).astype(jnp.float32)
  mean = lambda v: _masked_mean(v, mask)[0]
  return mean(true_loss) + mean(fake_loss), mean(p_true), mean(p_fake)

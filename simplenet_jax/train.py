"""Train state, optimisers and the jitted training steps of SimpleNet's head.

Pure maths, no I/O: the pass loop that feeds these steps is `loop.py`.

One step (released `_train_discriminator`): adapt a batch of local features,
add Gaussian noise to get anomalous features, score [adapted; fake] with the
discriminator in train mode (BatchNorm statistics over both halves) and take
one optimiser step on the truncated L1 loss, adaptor and discriminator
together.
"""

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simplenet_jax import model as model_lib
from simplenet_jax import neighbour_mix
from simplenet_jax import parallel

# Allowed values of model.noise_mode and optim.variant (config_checks
# enforces them; the functions here trust a validated config).
# 'relative': std = noise_rel x uncentred RMS of the adapted features;
# 'spread': std = noise_rel x their centred spread (see feature_spread).
NOISE_MODES = ('absolute', 'relative', 'spread')
# model.noise_shape: the same std in every dimension (released), or each
# backbone layer's block of the local features at its own spread
# (`model_lib.layer_noise`).
NOISE_SHAPES = ('isotropic', 'layers')
VARIANTS = ('released', 'paper', 'glass')
# Released: CosineAnnealingLR(dsc_opt, T_max, eta_min=dsc_lr * .4).
COS_LR_FLOOR = 0.4
# A pass's share of fakes past the loss's margin (p_fake) at or above which
# the head's loss is saturated: the truncated L1 loss (or GLASS's) then gives
# the fakes all but no gradient, so the head has stopped learning from them
# (model.shrink_on_saturation, yardstick.advice).
SATURATED_P_FAKE = 0.98


class TrainState(flax.struct.PyTreeNode):
  """Everything needed to continue training; array leaves only (orbax).

  params: {'adaptor': ..., 'discriminator': ...}.
  batch_stats: {'discriminator': {'bn': {'mean', 'var'}}} (BatchNorm running
    statistics).
  noise_std: f32 scalar, the std of the anomalous-feature noise (fixed for
    'absolute', measured once by `calibrate_noise` for 'relative' and
    'spread').
  tx, margin, mix_noise, noise_layers: static, rebuilt from the config by
    `create_train_state`; noise_layers > 1: the noise is shaped over that
    many layers' blocks (model.noise_shape='layers', `noisy_offsets`).
  With model.heads = K > 1 every array leaf has a leading K axis, one slice
  per head (`stack_states`; `model_lib.num_heads` reads K off the params).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  noise_std: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  margin: float = flax.struct.field(pytree_node=False)
  mix_noise: int = flax.struct.field(pytree_node=False)
  noise_layers: int = flax.struct.field(pytree_node=False, default=1)

  def head_vars(self) -> dict:
    """What the scorer applies (`scoring.make_predict_fn`): the head's
    variables {'params', 'batch_stats'}."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def _adam(lr, b1=0.9, b2=0.999, eps=1e-8, l2=0.0):
  """torch.optim.Adam: L2 `weight_decay` is added to the gradient first."""
  parts = [optax.add_decayed_weights(l2)] if l2 else []
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.scale_by_learning_rate(lr)]
  return optax.chain(*parts)


def disc_lr_schedule(optim_cfg, steps_per_pass: int, num_passes: int):
  """Discriminator learning rate per optimiser step.

  With `optim.cos_lr` the released code steps CosineAnnealingLR(T_max,
  eta_min=0.4 lr) once per pass over the training data, so the lr is constant
  within a pass: lr(p) = eta_min + (lr - eta_min) (1 + cos(pi p / T_max)) / 2
  for pass p. T_max is `optim.cos_period_passes`, or `num_passes` when that
  is 0 (released: (meta_epochs - 1) * gan_epochs = num_passes - 4, so
  its last 4 passes climb back slightly; the cosine is periodic past T_max).
  """
  base = float(optim_cfg['disc_lr'])
  if not optim_cfg['cos_lr']:
    return base
  period = optim_cfg['cos_period_passes'] or num_passes
  floor = COS_LR_FLOOR * base

  def schedule(count):
    p = (count // steps_per_pass).astype(jnp.float32)
    return floor + (base - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p / period))
  return schedule


def make_optimizer(optim_cfg, steps_per_pass: int, num_passes: int,
                   train_adaptor: bool = True) -> optax.GradientTransformation:
  """One optax transform over params {'adaptor', 'discriminator'}.

  'released': adaptor AdamW(adaptor_lr, adaptor_wd); discriminator Adam
    (disc_lr) with coupled L2 disc_wd.
  'paper': both Adam with coupled L2 disc_wd (the paper's "weight decay
    1e-5"), at adaptor_lr and disc_lr.
  'glass': GLASS's released code (glass.py), the other way round: adaptor
    Adam(adaptor_lr) with coupled L2 adaptor_wd; discriminator AdamW(disc_lr,
    decoupled disc_wd).
  `cos_lr` schedules the discriminator lr only, as released.
  train_adaptor=False (model.pre_proj=0): the adaptor's updates are zero.

  Equal settings give the same (cached) object, so train states built from
  the same config share compiled steps.
  """
  cos_lr = bool(optim_cfg.cos_lr)
  return _optimizer(
      optim_cfg.variant, float(optim_cfg.adaptor_lr), float(optim_cfg.adaptor_wd),
      float(optim_cfg.disc_lr), float(optim_cfg.disc_wd), cos_lr,
      int(steps_per_pass) if cos_lr else 0, int(num_passes) if cos_lr else 0,
      int(optim_cfg.cos_period_passes) if cos_lr else 0, bool(train_adaptor))


@functools.lru_cache(maxsize=64)
def _optimizer(variant, adaptor_lr, adaptor_wd, disc_lr, disc_wd, cos_lr,
               steps_per_pass, num_passes, cos_period_passes, train_adaptor):
  disc_cfg = {'disc_lr': disc_lr, 'cos_lr': cos_lr,
              'cos_period_passes': cos_period_passes}
  disc_lr = disc_lr_schedule(disc_cfg, steps_per_pass, num_passes)
  if variant == 'glass':
    adaptor = _adam(adaptor_lr, l2=adaptor_wd)
    disc = optax.adamw(disc_lr, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=disc_wd)
  elif variant == 'released':
    adaptor = optax.adamw(adaptor_lr, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=adaptor_wd)
    disc = _adam(disc_lr, l2=disc_wd)
  else:
    adaptor = _adam(adaptor_lr, l2=disc_wd)
    disc = _adam(disc_lr, l2=disc_wd)
  if not train_adaptor:
    adaptor = optax.set_to_zero()
  return optax.multi_transform(
      {'adaptor': adaptor, 'discriminator': disc}, _top_level_labels)


def _top_level_labels(params):
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def head_modules(params):
  """The head's modules, sized from the parameters they will be applied to."""
  dim = params['adaptor']['fc']['kernel'].shape[1]
  hidden = params['discriminator']['fc']['kernel'].shape[1]
  return model_lib.Adaptor(dim), model_lib.Discriminator(
      hidden, model_lib.num_layers(params['discriminator']))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_head(key, embed_dim, hidden, pre_proj=1, disc_layers=2):
  """Released init of adaptor and discriminator: (params, batch_stats).

  pre_proj=0 (the released code's no-adaptor switch): the adaptor is the
  identity (kernel I, bias 0), which `make_optimizer(train_adaptor=False)`
  never moves, so the discriminator reads the local features as they are
  while every path that applies an adaptor stays one path. The
  discriminator's init is the same for either value (same key split).
  """
  k_adaptor, k_disc = jax.random.split(key)
  x = jnp.zeros((2, embed_dim), jnp.float32)
  if pre_proj:
    adaptor_vars = model_lib.Adaptor(embed_dim).init(k_adaptor, x)
  else:
    adaptor_vars = {'params': {'fc': {
        'kernel': jnp.eye(embed_dim, dtype=jnp.float32),
        'bias': jnp.zeros((embed_dim,), jnp.float32)}}}
  disc_vars = model_lib.Discriminator(hidden, disc_layers).init(
      k_disc, x, train=False)
  params = {'adaptor': adaptor_vars['params'],
            'discriminator': disc_vars['params']}
  return params, {'discriminator': disc_vars['batch_stats']}


def create_train_state(key: jax.Array, model_cfg, optim_cfg, embed_dim: int,
                       steps_per_pass: int, num_passes: int,
                       layers: Optional[int] = None) -> TrainState:
  """Freshly initialised head (released init) and optimiser.

  layers: how many backbone layers the local features aggregate
  (len(backbone.layers)); model.noise_shape='layers' shapes the noise over
  their blocks and needs it (the isotropic noise does not).

  With model.noise_mode 'relative' or 'spread', noise_std is NaN until
  `calibrate_noise` sets it; training before that gives NaN losses. With
  model.heads = K > 1: K heads, head k initialised from split(key, K)[k],
  stacked (`stack_states`).
  """
  if model_cfg.noise_shape == 'layers' and layers is None:
    raise ValueError("model.noise_shape='layers' needs the number of "
                     'backbone layers (create_train_state(..., layers=))')
  heads = int(model_cfg.heads)
  if heads > 1:
    return stack_states([
        _one_head_state(k, model_cfg, optim_cfg, embed_dim, steps_per_pass,
                        num_passes, layers)
        for k in jax.random.split(key, heads)])
  return _one_head_state(key, model_cfg, optim_cfg, embed_dim, steps_per_pass,
                         num_passes, layers)


def _one_head_state(key, model_cfg, optim_cfg, embed_dim, steps_per_pass,
                    num_passes, layers) -> TrainState:
  pre_proj = int(model_cfg.pre_proj)
  params, batch_stats = _init_head(key, int(embed_dim), int(model_cfg.hidden),
                                   pre_proj, int(model_cfg.disc_layers))
  tx = make_optimizer(optim_cfg, steps_per_pass, num_passes,
                      train_adaptor=pre_proj == 1)
  std = (float(model_cfg.noise_std) if model_cfg.noise_mode == 'absolute'
         else float('nan'))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=jax.jit(tx.init)(params),
      noise_std=jnp.asarray(std, jnp.float32),
      tx=tx,
      margin=float(model_cfg.margin),
      mix_noise=int(model_cfg.mix_noise),
      noise_layers=(int(layers) if model_cfg.noise_shape == 'layers' else 1))


def loss_fn(params, batch_stats, features, noise, margin,
            mask: Optional[jax.Array] = None):
  """Truncated L1 loss of one batch, given the noise.

  Args:
    params, batch_stats: as in TrainState.
    features: (N, D) float32 local features (before the adaptor).
    noise: (N, D) noise added to the adapted features.
    margin: the loss margin.
    mask: optional (N,) 0/1; 0 = padding row.

  Returns:
    (loss, (metrics, new_batch_stats, scores)); scores (2N,) are the
    discriminator's train-mode outputs on [adapted; fake].
  """
  _, disc = head_modules(params)
  # The adaptor and the discriminator's first Linear are both affine:
  # fc(x A + a) = x (A W) + (a W + w) and fc(fake) = fc(adapted) + noise W.
  # Folding A W once per step skips the (N, D) x (D, D) products, forward
  # and backward: 1.6x faster steps at D=1536 (float rounding aside, the
  # same maths as fc applied to [adapted; fake]).
  ad, fc = params['adaptor']['fc'], params['discriminator']['fc']
  h_true = features @ (ad['kernel'] @ fc['kernel']) + (
      ad['bias'] @ fc['kernel'] + fc['bias'])
  h_fake = h_true + noise @ fc['kernel']
  both_mask = None if mask is None else jnp.concatenate([mask, mask])
  scores, updates = disc.apply(
      {'params': params['discriminator'],
       'batch_stats': batch_stats['discriminator']},
      jnp.concatenate([h_true, h_fake]), train=True, mask=both_mask,
      after_fc=True, mutable=['batch_stats'])
  n = features.shape[0]
  loss, p_true, p_fake = model_lib.truncated_l1_loss(
      scores[:n], scores[n:], margin, mask)
  metrics = {'loss': loss, 'p_true': p_true, 'p_fake': p_fake}
  return loss, (metrics, {'discriminator': updates['batch_stats']}, scores)


def _prepare(features, mask):
  features = jnp.asarray(features, jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
  return features, mask


@jax.jit
def train_step_with_noise(state: TrainState, features, noise,
                          mask: Optional[jax.Array] = None):
  """`train_step` with the noise given: (N, D) added to the adapted rows."""
  features, mask = _prepare(features, mask)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (metrics, batch_stats, _)), grads = grad_fn(
      state.params, state.batch_stats, features, noise, state.margin, mask)
  return apply_gradients(state, grads, batch_stats), metrics


def apply_gradients(state: TrainState, grads, batch_stats) -> TrainState:
  """One optimiser step: the state after `grads`, with the BatchNorm
  statistics of the step's train-mode forward pass."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state)


@jax.jit
def train_step(state: TrainState, features, key: jax.Array,
               mask: Optional[jax.Array] = None):
  """One optimiser step on a batch of local features.

  Args:
    state: the TrainState.
    features: (N, D) rows (float32 or bfloat16).
    key: PRNG key for the noise, a fresh one per step (e.g. fold_in(key,
      step)); row i's noise depends on (key, i) only, so padding rows
      appended at the end leave the other rows' noise unchanged.
    mask: optional (N,) float 0/1; rows with 0 (padding, e.g. for data
      parallelism) affect neither loss, gradients nor BatchNorm statistics.

  Returns:
    (new_state, metrics): metrics {'loss', 'p_true', 'p_fake'} f32 scalars
    (with stacked heads, `for_each_head`: their means over the heads).
  """
  if model_lib.num_heads(state.params) > 1:
    return for_each_head(lambda s, k: train_step(s, features, k, mask),
                         state, key)
  features, mask = _prepare(features, mask)
  noise = noisy_offsets(key, features, state.params['adaptor']['fc']['kernel'],
                        state.noise_std, state.mix_noise, state.noise_layers,
                        mask)
  return train_step_with_noise(state, features, noise, mask)


def noisy_offsets(key: jax.Array, features: jax.Array, kernel: jax.Array,
                  std, mix_noise: int = 1, layers: int = 1,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """(N, D) noise that the fakes add to the adapted rows of `features`
  (N, D), the local features before the adaptor whose matrix is `kernel`:
  `model_lib.sample_noise` of std and mix_noise, shaped over `layers`
  blocks when layers > 1 (model.noise_shape='layers',
  `model_lib.layer_noise`; mask: padding rows, left out of the spreads)."""
  noise = model_lib.sample_noise(key, (features.shape[0], kernel.shape[1]),
                                 std, mix_noise)
  if layers > 1:
    noise = model_lib.layer_noise(noise, features, kernel, layers, mask)
  return noise


def for_each_head(step_fn, state: TrainState, key: jax.Array, *per_head):
  """One training step of a state of K stacked heads (model.heads = K).

  step_fn(state, key, *per_head) -> (state, metrics) is the step of one
  head; it runs for every head at once (vmap), each with its own slice of
  the state, its own key (split(key, K)[k]: its own noise) and its slice of
  each `per_head` array (leading K axis); what step_fn closes over (the
  batch) is shared. Returns (the stacked new state, the metrics averaged
  over the heads).
  """
  keys = jax.random.split(key, model_lib.num_heads(state.params))
  new, metrics = jax.vmap(step_fn)(state, keys, *per_head)
  return new, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


@jax.jit
def _adapt(params, features):
  adaptor, _ = head_modules(params)
  return adaptor.apply({'params': params['adaptor']},
                       jnp.asarray(features, jnp.float32))


def _row_chunks(features, chunk_rows: int):
  """Yields (rows, D) pieces of `features` ((..., D) array, or a sequence of
  them), about `chunk_rows` rows each, in order: whole items of the leading
  axis sliced before they are flattened (flattening all of a large cache
  first costs a copy of it)."""
  arrays = [features] if hasattr(features, 'shape') else list(features)
  for f in arrays:
    step = max(1, chunk_rows // max(1, math.prod(f.shape[1:-1])))
    for start in range(0, f.shape[0], step):
      yield f[start:start + step].reshape(-1, f.shape[-1])


def feature_rms(state: TrainState,
                features: Union[jax.Array, Sequence[jax.Array]],
                chunk_rows: int = 16384) -> float:
  """RMS over all entries of the adapted features (current adaptor).

  `features` is one (..., D) array or a sequence of them (e.g. batches); rows
  go to the device `chunk_rows` at a time, so a large host-side feature cache
  need not fit on the device.
  """
  total, count = 0.0, 0
  for rows in _row_chunks(features, chunk_rows):
    a = _adapt(state.params, rows)
    total += float(jnp.sum(jnp.square(a), dtype=jnp.float32))
    count += a.size
  if count == 0:
    raise ValueError('feature_rms needs at least one feature vector.')
  return math.sqrt(total / count)


def feature_spread(state: TrainState,
                   features: Union[jax.Array, Sequence[jax.Array]],
                   chunk_rows: int = 16384) -> float:
  """Centred spread of the adapted features: sqrt(mean_d Var_d).

  The square root of the mean per-dimension variance (= sqrt(trace(Cov) /
  D)) of the adapted features (current adaptor). Unlike `feature_rms` it
  ignores the features' mean, which says nothing about how far apart normal
  features lie: ReLU6 features (EfficientNet-Lite) have large means, so
  their RMS overstates the spread. `features` as in `feature_rms`.
  """
  return math.sqrt(float(np.mean(
      dimension_variances(features, state.params, chunk_rows))))


def dimension_variances(features: Union[jax.Array, Sequence[jax.Array]],
                        params=None, chunk_rows: int = 16384) -> np.ndarray:
  """Per-dimension variance (population), float64 (D,), of all rows of
  `features` (as in `feature_rms`), adapted by the adaptor of `params`
  (one head's) when given, else as they are.

  Chunks of `chunk_rows` rows are merged with Chan et al.'s pairwise update
  in float64, so large means cost no precision and no copy of all the rows
  (gigabytes at a few hundred images) is made.
  """
  count, mean, m2 = 0, None, None
  for a in _row_chunks(features, chunk_rows):
    a = np.asarray(a if params is None else _adapt(params, a), np.float64)
    if a.shape[0] == 0:
      continue
    n_b, mean_b = a.shape[0], a.mean(0)
    m2_b = np.square(a - mean_b).sum(0)
    if count == 0:
      count, mean, m2 = n_b, mean_b, m2_b
      continue
    total = count + n_b
    delta = mean_b - mean
    mean = mean + delta * (n_b / total)
    m2 = m2 + m2_b + np.square(delta) * (count * n_b / total)
    count = total
  if count == 0:
    raise ValueError('feature variances need at least one feature vector.')
  return m2 / count


def calibrate_noise(state: TrainState, model_cfg, features) -> TrainState:
  """Sets noise_std per model.noise_mode.

  'absolute': noise_std (released). 'relative': noise_rel x the RMS of the
  adapted `features` (`feature_rms`). 'spread': noise_rel x their centred
  spread (`feature_spread`). Both with the current adaptor; call once
  before training, the value then travels with the state. Stacked heads
  (model.heads > 1) are calibrated one by one, each by its own adaptor;
  `features` is then read once per head (an array, or a list of them).
  """
  heads = model_lib.num_heads(state.params)
  if heads > 1:
    return stack_states([calibrate_noise(unstack_state(state, k), model_cfg,
                                         features) for k in range(heads)])
  if model_cfg.noise_mode == 'absolute':
    std = float(model_cfg.noise_std)
  elif model_cfg.noise_mode == 'spread':
    std = float(model_cfg.noise_rel) * feature_spread(state, features)
  else:
    std = float(model_cfg.noise_rel) * feature_rms(state, features)
  return state.replace(noise_std=jnp.asarray(std, jnp.float32))


@functools.lru_cache(maxsize=32)  # One jitted step (and its compilations)
def make_cached_step(mesh, embed_dim,  # for every category.
                     mix: neighbour_mix.Mix = neighbour_mix.Mix()):
  """train_step on rows gathered from the device-resident cache.

  Returns step(state, cache, idx, key, partners=None) -> (state, metrics):
  cache (N, h*w, D) replicated (see feature_cache.build), idx (B,) int image
  indices into it, key the step's noise key; with mix.amount > 0
  (train.neighbour_mix) the rows are first moved toward their partners
  ((N, h*w) `neighbour_mix.partners` when mix.exact, else drawn by the
  step). The B*h*w rows are split over the
  mesh (padded and masked when they do not divide); `state` is donated.
  """
  sharded = parallel.batch_sharded(mesh)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, cache, idx, key, partners):
    feats = (neighbour_mix.mix(cache, partners, idx, key, mix)
             if mix.amount > 0 else cache[idx])
    rows = feats.astype(jnp.float32).reshape(-1, embed_dim)
    rows, mask = _pad_rows_for(rows, mesh)
    if mesh.size > 1:
      rows = jax.lax.with_sharding_constraint(rows, sharded)
    return train_step(state, rows, key, mask)

  def run(state, cache, idx, key, partners=None):
    idx, key = parallel.global_inputs(mesh, idx, key)
    return step(state, cache, idx, key, partners)

  return run


@functools.lru_cache(maxsize=32)  # As make_cached_step.
def make_features_step(mesh, embed_dim):
  """train_step on features recomputed from a batch of images.

  Returns step(state, backbone_vars, images, key, feature_fn, n_valid) ->
  (state, metrics): images as put_batch returns them (split over the mesh,
  padding at the end), n_valid = put_batch's count of real images;
  feature_fn (jitted, hashable) is static. `state` is donated.
  """
  sharded = parallel.batch_sharded(mesh)

  @functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(4, 5))
  def step(state, backbone_vars, images, key, feature_fn, n_valid):
    feats = feature_fn(backbone_vars, images)[:n_valid]
    rows = feats.reshape(-1, embed_dim)
    rows, mask = _pad_rows_for(rows, mesh)
    if mesh.size > 1:
      rows = jax.lax.with_sharding_constraint(rows, sharded)
    return train_step(state, rows, key, mask)

  def run(state, backbone_vars, images, key, feature_fn, n_valid):
    (key,) = parallel.global_inputs(mesh, key)
    return step(state, backbone_vars, images, key, feature_fn, int(n_valid))

  return run


def _pad_rows_for(rows, mesh):
  """(n, D) rows -> (rows padded to divide over the mesh, (n',) 0/1 mask or
  None when no padding was needed)."""
  n = rows.shape[0]
  padded = parallel.padded_size(n, mesh)
  if padded == n:
    return rows, None
  rows = jnp.pad(rows, ((0, padded - n), (0, 0)))
  mask = (jnp.arange(padded) < n).astype(jnp.float32)
  return rows, mask


@functools.lru_cache(maxsize=32)  # As make_cached_step.
def make_stacked_cached_step(mesh, batch_size: int):
  """One optimiser step for K categories' heads at once (vmap over K).

  Each category keeps its own state, cache, batch and noise key, and gets
  exactly the rows its own `make_cached_step` would use, in the same order
  (so `sample_noise` draws the same noise): real rows first, padding at the
  end, masked out of loss, gradients and BatchNorm statistics.

  Returns step(states, caches, idx, n_images, grid, active, keys) ->
  (states, metrics):
    states: K TrainStates stacked leaf-wise (`stack_states`); donated.
    caches: (K, N_max, P_max, D) the categories' feature caches, zero-padded
      to the largest training set N_max and grid P_max = h*w.
    idx: (K, batch_size) int32 image indices into each cache (any value
      beyond n_images).
    n_images: (K,) int32 images in each category's batch this step (the last
      batch of a pass is short; 0 for a category with no step left).
    grid: (K,) int32 each category's h*w.
    active: (K,) bool; an inactive category's state is returned unchanged.
    keys: (K,) noise keys, one per category (its own step's key).
  Metrics are (K,) per category; those of inactive categories are garbage.
  Rows are split over the mesh as in `make_cached_step`.
  """
  sharded = parallel.batch_sharded(mesh)

  def one(state, cache, idx, n, p, active, key):
    p_max = cache.shape[1]
    n_rows = parallel.padded_size(batch_size * p_max, mesh)
    r = jnp.arange(n_rows)
    # Row r: position r % p of the batch's image r // p (p = this grid).
    img = idx[jnp.minimum(r // p, batch_size - 1)]
    flat = cache.reshape(-1, cache.shape[-1])
    rows = flat[img * p_max + r % p].astype(jnp.float32)
    if mesh.size > 1:
      rows = jax.lax.with_sharding_constraint(rows, sharded)
    mask = (r < n * p).astype(jnp.float32)
    new, metrics = train_step(state, rows, key, mask)
    return where_active(active, new, state), metrics

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(states, caches, idx, n_images, grid, active, keys):
    return jax.vmap(one)(states, caches, idx, n_images, grid, active, keys)

  return step


def where_active(active, new: TrainState, old: TrainState) -> TrainState:
  """A stacked step's result for one category: `new` if it took the step
  (active, a traced bool), else `old` unchanged."""
  return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """K TrainStates of one config -> one whose leaves have a leading K axis
  (K categories' heads, or one category's model.heads)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(stacked: TrainState, k: int) -> TrainState:
  """The k-th TrainState (category or head) out of a stacked one."""
  return jax.tree.map(lambda x: x[k], stacked)

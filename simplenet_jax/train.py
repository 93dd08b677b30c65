"""Train state, optimisers and the training step of SimpleNet's head.

One step (released `_train_discriminator`): adapt a batch of local features,
add Gaussian noise to get anomalous features, score [adapted; fake] with the
discriminator in train mode (BatchNorm statistics over both halves) and take
one optimiser step on the truncated L1 loss, adaptor and discriminator
together.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence, Union
import zlib

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from simplenet_jax import checkpoint
from simplenet_jax import data
from simplenet_jax import feature_cache
from simplenet_jax import model as model_lib
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import visualize
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError

NOISE_MODES = ('absolute', 'relative')
VARIANTS = ('released', 'paper')
# Released: CosineAnnealingLR(dsc_opt, T_max, eta_min=dsc_lr * .4).
COS_LR_FLOOR = 0.4


class TrainState(flax.struct.PyTreeNode):
  """Everything needed to continue training; array leaves only (orbax).

  params: {'adaptor': ..., 'discriminator': ...}.
  batch_stats: {'discriminator': {'bn': {'mean', 'var'}}} (BatchNorm running
    statistics).
  noise_std: f32 scalar, the std of the anomalous-feature noise (fixed for
    'absolute', measured once by `calibrate_noise` for 'relative').
  tx, margin, mix_noise: static, rebuilt from the config by
    `create_train_state`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  noise_std: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  margin: float = flax.struct.field(pytree_node=False, default=0.5)
  mix_noise: int = flax.struct.field(pytree_node=False, default=1)


def _cfg_get(cfg, key, default):
  return cfg[key] if key in cfg else default


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
  for pass p. T_max is `optim.cos_period_passes` if the config has it, else
  `num_passes` (released: (meta_epochs - 1) * gan_epochs = num_passes - 4, so
  its last 4 passes climb back slightly; the cosine is periodic past T_max).
  """
  base = float(optim_cfg['disc_lr'])
  if not optim_cfg['cos_lr']:
    return base
  if steps_per_pass < 1 or num_passes < 1:
    raise UserError('optim.cos_lr needs steps_per_pass >= 1 and '
                    f'train.num_passes >= 1 (got {steps_per_pass}, '
                    f'{num_passes}).')
  period = _cfg_get(optim_cfg, 'cos_period_passes', None) or num_passes
  floor = COS_LR_FLOOR * base

  def schedule(count):
    p = (count // steps_per_pass).astype(jnp.float32)
    return floor + (base - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p / period))
  return schedule


def make_optimizer(optim_cfg, steps_per_pass: int,
                   num_passes: int) -> optax.GradientTransformation:
  """One optax transform over params {'adaptor', 'discriminator'}.

  'released': adaptor AdamW(adaptor_lr, adaptor_wd); discriminator Adam
    (disc_lr) with coupled L2 disc_wd.
  'paper': both Adam with coupled L2 disc_wd (the paper's "weight decay
    1e-5"), at adaptor_lr and disc_lr.
  `cos_lr` schedules the discriminator lr only, as released.

  Equal settings give the same (cached) object, so train states built from
  the same config share compiled steps.
  """
  variant = optim_cfg.variant
  if variant not in VARIANTS:
    raise UserError(f'optim.variant must be one of {VARIANTS}, got '
                    f'{variant!r}.')
  cos_lr = bool(optim_cfg.cos_lr)
  return _optimizer(
      variant, float(optim_cfg.adaptor_lr), float(optim_cfg.adaptor_wd),
      float(optim_cfg.disc_lr), float(optim_cfg.disc_wd), cos_lr,
      int(steps_per_pass) if cos_lr else 0, int(num_passes) if cos_lr else 0,
      _cfg_get(optim_cfg, 'cos_period_passes', None) if cos_lr else None)


@functools.lru_cache(maxsize=64)
def _optimizer(variant, adaptor_lr, adaptor_wd, disc_lr, disc_wd, cos_lr,
               steps_per_pass, num_passes, cos_period_passes):
  disc_cfg = {'disc_lr': disc_lr, 'cos_lr': cos_lr,
              'cos_period_passes': cos_period_passes}
  disc = _adam(disc_lr_schedule(disc_cfg, steps_per_pass, num_passes),
               l2=disc_wd)
  if variant == 'released':
    adaptor = optax.adamw(adaptor_lr, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=adaptor_wd)
  else:
    adaptor = _adam(adaptor_lr, l2=disc_wd)
  return optax.multi_transform(
      {'adaptor': adaptor, 'discriminator': disc}, _top_level_labels)


def _top_level_labels(params):
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def _modules(params):
  """The head's modules, sized from the parameters they will be applied to."""
  dim = params['adaptor']['fc']['kernel'].shape[1]
  hidden = params['discriminator']['fc']['kernel'].shape[1]
  return model_lib.Adaptor(dim), model_lib.Discriminator(hidden)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_head(key, embed_dim, hidden):
  """Released init of adaptor and discriminator: (params, batch_stats)."""
  k_adaptor, k_disc = jax.random.split(key)
  x = jnp.zeros((2, embed_dim), jnp.float32)
  adaptor_vars = model_lib.Adaptor(embed_dim).init(k_adaptor, x)
  disc_vars = model_lib.Discriminator(hidden).init(k_disc, x, train=False)
  params = {'adaptor': adaptor_vars['params'],
            'discriminator': disc_vars['params']}
  return params, {'discriminator': disc_vars['batch_stats']}


def create_train_state(key: jax.Array, model_cfg, optim_cfg, embed_dim: int,
                       steps_per_pass: int, num_passes: int) -> TrainState:
  """Freshly initialised head (released init) and optimiser.

  With model.noise_mode 'relative', noise_std is NaN until `calibrate_noise`
  sets it; training before that gives NaN losses.
  """
  if model_cfg.noise_mode not in NOISE_MODES:
    raise UserError(f'model.noise_mode must be one of {NOISE_MODES}, got '
                    f'{model_cfg.noise_mode!r}.')
  if int(model_cfg.mix_noise) < 1:
    raise UserError(f'model.mix_noise must be >= 1, got {model_cfg.mix_noise}.')
  if int(model_cfg.hidden) < 1:
    raise UserError(f'model.hidden must be >= 1, got {model_cfg.hidden}.')
  params, batch_stats = _init_head(key, int(embed_dim), int(model_cfg.hidden))
  tx = make_optimizer(optim_cfg, steps_per_pass, num_passes)
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
      mix_noise=int(model_cfg.mix_noise))


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
  _, disc = _modules(params)
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
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state), metrics


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
    (new_state, metrics): metrics {'loss', 'p_true', 'p_fake'} f32 scalars.
  """
  features, mask = _prepare(features, mask)
  dim = state.params['adaptor']['fc']['kernel'].shape[1]
  noise = model_lib.sample_noise(key, (features.shape[0], dim),
                                 state.noise_std, state.mix_noise)
  return train_step_with_noise(state, features, noise, mask)


@jax.jit
def _adapt(params, features):
  adaptor, _ = _modules(params)
  return adaptor.apply({'params': params['adaptor']},
                       jnp.asarray(features, jnp.float32))


def feature_rms(state: TrainState,
                features: Union[jax.Array, Sequence[jax.Array]],
                chunk_rows: int = 16384) -> float:
  """RMS over all entries of the adapted features (current adaptor).

  `features` is one (..., D) array or a sequence of them (e.g. batches); rows
  go to the device `chunk_rows` at a time, so a large host-side feature cache
  need not fit on the device.
  """
  arrays = [features] if hasattr(features, 'shape') else list(features)
  total, count = 0.0, 0
  for f in arrays:
    rows = f.reshape(-1, f.shape[-1])
    for start in range(0, rows.shape[0], chunk_rows):
      a = _adapt(state.params, rows[start:start + chunk_rows])
      total += float(jnp.sum(jnp.square(a), dtype=jnp.float32))
      count += a.size
  if count == 0:
    raise ValueError('feature_rms needs at least one feature vector.')
  return math.sqrt(total / count)


def calibrate_noise(state: TrainState, model_cfg, features) -> TrainState:
  """Sets noise_std per model.noise_mode: noise_std, or noise_rel * RMS.

  For 'relative', the RMS of the adapted `features` (see `feature_rms`) with
  the current adaptor; call once before training, the value then travels with
  the state.
  """
  if model_cfg.noise_mode not in NOISE_MODES:
    raise UserError(f'model.noise_mode must be one of {NOISE_MODES}, got '
                    f'{model_cfg.noise_mode!r}.')
  if model_cfg.noise_mode == 'absolute':
    std = float(model_cfg.noise_std)
  else:
    std = float(model_cfg.noise_rel) * feature_rms(state, features)
  return state.replace(noise_std=jnp.asarray(std, jnp.float32))


# ---- The training loop (one category) --------------------------------------


@dataclasses.dataclass
class CategoryContext:
  """Everything one category's training and evaluation share."""
  config: Any
  workdir: str  # <workdir>/<category>
  category: str
  kind: str  # 'texture' | 'object' | ...
  module: Any  # The backbone (flax module).
  backbone_vars: Any
  mesh: Any
  train_set: Any
  test_set: Any
  train_idx: np.ndarray  # Training images (dataset indices).
  holdout_idx: np.ndarray  # Held out for the decision threshold.
  feature_fn: Any  # (backbone_vars, images) -> (B, h, w, D)
  predict_fn: Any  # (backbone_vars, head_vars, images) -> dict
  grid_hw: tuple[int, int]
  embed_dim: int
  key: jax.Array

  @classmethod
  def create(cls, config, workdir, category, kind, module, backbone_vars,
             mesh):
    layers = tuple(config.backbone.layers)
    train_set = data.build(config.dataset, category, 'train', workdir)
    test_set = data.build(config.dataset, category, 'test', workdir)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed),
                             zlib.crc32(category.encode()) & 0x7FFFFFFF)
    split_key, key = jax.random.split(key)
    n = len(train_set)
    n_hold = int(round(config.threshold.holdout_fraction * n))
    if config.threshold.holdout_fraction > 0:
      n_hold = min(max(n_hold, 1), n - 1)
    perm = np.asarray(jax.random.permutation(split_key, n))
    holdout_idx = np.sort(perm[:n_hold])
    train_idx = np.sort(perm[n_hold:])
    if len(train_idx) == 0:
      raise UserError(f'{category}: no training images left after holding out '
                      f'{n_hold} (threshold.holdout_fraction)')
    feature_fn = scoring.make_feature_fn(module, layers, config.model)
    h, w = train_set.image_hw
    shape = jax.eval_shape(feature_fn, backbone_vars,
                           jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8)).shape
    predict_fn = scoring.make_predict_fn(module, layers, config.model,
                                         test_set.image_hw, config.eval.sigma)
    return cls(config=config, workdir=os.path.join(workdir, category),
               category=category, kind=kind, module=module,
               backbone_vars=backbone_vars, mesh=mesh, train_set=train_set,
               test_set=test_set, train_idx=train_idx, holdout_idx=holdout_idx,
               feature_fn=feature_fn, predict_fn=predict_fn,
               grid_hw=(shape[1], shape[2]), embed_dim=shape[3], key=key)

  def new_state(self):
    c = self.config
    steps = feature_cache.steps_per_pass(len(self.train_idx),
                                         c.train.batch_size)
    init_key = jax.random.fold_in(self.key, 0)
    return create_train_state(init_key, c.model, c.optim, self.embed_dim,
                              steps, c.train.num_passes)

  def checkpointer(self):
    return checkpoint.Checkpointer(os.path.join(self.workdir, 'checkpoints'),
                                   self.config.train.keep_checkpoints)

  def meta(self, passes_done: int, **extra) -> dict:
    c = self.config
    return dict(passes_done=passes_done, category=self.category,
                kind=self.kind, image_hw=list(self.test_set.image_hw),
                grid_hw=list(self.grid_hw), embed_dim=self.embed_dim,
                steps_per_pass=feature_cache.steps_per_pass(
                    len(self.train_idx), c.train.batch_size),
                backbone=c.backbone.name, layers=list(c.backbone.layers),
                num_passes=c.train.num_passes, seed=c.seed,
                fingerprint=_fingerprint(c), **extra)


def _fingerprint(config) -> str:
  """What must not change between a run and its continuation."""
  keys = {k: config[k].to_dict() for k in ('backbone', 'model', 'optim')}
  keys['seed'] = config.seed
  keys['train'] = {k: config.train[k] for k in ('batch_size', 'num_passes')}
  keys['holdout'] = config.threshold.holdout_fraction
  return hex(zlib.crc32(json.dumps(keys, sort_keys=True, default=str).encode()))


def make_cached_step(mesh, embed_dim):
  """train_step on rows gathered from the device-resident cache.

  Returns step(state, cache, idx, key) -> (state, metrics): cache (N, h*w, D)
  replicated (see feature_cache.build), idx (B,) int image indices into it,
  key the step's noise key. The B*h*w rows are split over the mesh (padded
  and masked when they do not divide); `state` is donated.
  """
  sharded = parallel.batch_sharded(mesh)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, cache, idx, key):
    rows = cache[idx].astype(jnp.float32).reshape(-1, embed_dim)
    rows, mask = _pad_rows_for(rows, mesh)
    if mesh.size > 1:
      rows = jax.lax.with_sharding_constraint(rows, sharded)
    return train_step(state, rows, key, mask)

  def run(state, cache, idx, key):
    idx, key = parallel.global_inputs(mesh, idx, key)
    return step(state, cache, idx, key)

  return run


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


def train_category(ctx: CategoryContext):
  """Trains one category, continuing from its latest checkpoint.

  Returns:
    (state, meta): the final TrainState (replicated) and its metadata, which
    holds the decision threshold for predict mode.
  """
  c = ctx.config
  num_passes = c.train.num_passes
  template = ctx.new_state()
  ckpt = ctx.checkpointer()
  try:
    # A checkpoint of another config is an error; a damaged one is moved
    # aside (with a warning) and the previous one is used.
    restored = ckpt.restore_latest(
        template, check_meta=functools.partial(_check_compatible, ctx),
        discard_unloadable=True)
    start = 0
    state = template
    if restored is not None:
      _, state, meta = restored
      start = int(meta['passes_done'])
      logging.info('%s: continuing from pass %d (%s)', ctx.category, start,
                   ckpt.directory)
      if start >= num_passes and 'threshold' in meta:
        return parallel.put_replicated(state, ctx.mesh), meta
    # Passes logged after the checkpoint (by a run that was killed) are
    # trained again: drop their records (all of them when starting afresh).
    _truncate_log(os.path.join(ctx.workdir, 'log.jsonl'), start)
    state = parallel.put_replicated(state, ctx.mesh)

    n = len(ctx.train_idx)
    bs = c.train.batch_size
    steps = feature_cache.steps_per_pass(n, bs)
    use_cache = feature_cache.fits(n, ctx.grid_hw, ctx.embed_dim, c.train)
    cache = None
    if use_cache:
      cache = feature_cache.build(ctx.feature_fn, ctx.backbone_vars,
                                  ctx.train_set, ctx.train_idx,
                                  c.eval.batch_size, c.train, c.dataset,
                                  ctx.mesh)
      step_fn = make_cached_step(ctx.mesh, ctx.embed_dim)
    else:
      step_fn = make_features_step(ctx.mesh, ctx.embed_dim)

    if start == 0 and c.model.noise_mode == 'relative':
      state = _calibrate(ctx, state, cache)

    train_key = jax.random.fold_in(ctx.key, 1)
    log_path = os.path.join(ctx.workdir, 'log.jsonl')
    best = None
    for p in range(start, num_passes):
      pass_key = jax.random.fold_in(train_key, p)
      perm_key, noise_key = jax.random.split(pass_key)
      order = np.asarray(jax.random.permutation(perm_key, n))
      history = []
      bar = tqdm.tqdm(total=steps, desc=f'{ctx.category} {p + 1}/{num_passes}',
                      leave=False, dynamic_ncols=True)
      if use_cache:
        batches = (order[s * bs:(s + 1) * bs] for s in range(steps))
      else:
        batches = loader.batches(ctx.train_set, bs,
                                 indices=ctx.train_idx[order],
                                 num_workers=c.dataset.num_workers,
                                 prefetch=c.dataset.prefetch)
      for s, batch in enumerate(batches):
        key = jax.random.fold_in(noise_key, s)
        if use_cache:
          state, metrics = step_fn(state, cache, jnp.asarray(batch), key)
        else:
          images, n_valid = parallel.put_batch(batch['image'], ctx.mesh)
          state, metrics = step_fn(state, ctx.backbone_vars, images, key,
                                   ctx.feature_fn, n_valid)
        history.append(metrics)
        bar.update(1)
        if s % 10 == 0 or s == steps - 1:
          bar.set_postfix({k: f'{float(v):.4f}' for k, v in metrics.items()})
      bar.close()
      means = {k: float(np.mean([float(m[k]) for m in history]))
               for k in history[0]}
      if not all(np.isfinite(v) for v in means.values()):
        last = ckpt.steps()
        raise UserError(
            f'{ctx.category}: non-finite loss in pass {p + 1} ({means}); '
            f'training stopped, the last good checkpoint '
            f'({"pass " + str(last[-1]) if last else "none"}) is kept in '
            f'{ckpt.directory}. Lower optim.adaptor_lr/optim.disc_lr or check '
            'the training images.')
      record = {'pass': p + 1, **means}
      logging.info('%s pass %d/%d: loss %.4f p_true %.3f p_fake %.3f',
                   ctx.category, p + 1, num_passes, means['loss'],
                   means['p_true'], means['p_fake'])
      if c.train.eval_every and (p + 1) % c.train.eval_every == 0 and (
          p + 1) < num_passes:
        from simplenet_jax import evaluate  # pylint: disable=g-import-not-at-top
        row = evaluate.evaluate_category(ctx, state, None,
                                         visualize_maps=False)
        record.update({k: row[k] for k in ('image_auroc', 'pixel_auroc',
                                           'aupro')})
        if c.train.select_best_on_test:
          best = _update_best(best, row, p + 1)
      _append_jsonl(log_path, record)
      done = p + 1
      if done % c.train.checkpoint_every == 0 and done < num_passes:
        ckpt.save(done, state, ctx.meta(done))

    extra = _decision_threshold(ctx, state)
    if best is not None:
      extra['best_on_test'] = best
    meta = ctx.meta(num_passes, **extra)
    ckpt.save(num_passes, state, meta)
    if c.eval.feature_histogram and cache is not None:
      _feature_histogram(ctx, state, cache)
    return state, meta
  finally:
    ckpt.close()


def restore_trained(ctx: CategoryContext):
  """The final checkpoint of a finished run (eval mode)."""
  _, state, meta = checkpoint.require_latest(
      os.path.join(ctx.workdir, 'checkpoints'), ctx.new_state(),
      check_meta=functools.partial(_check_compatible, ctx))
  if int(meta['passes_done']) < ctx.config.train.num_passes:
    logging.warning('%s: the latest checkpoint is from pass %s of %d (training '
                    'did not finish); evaluating it anyway.', ctx.category,
                    meta['passes_done'], ctx.config.train.num_passes)
  return parallel.put_replicated(state, ctx.mesh), meta


def _check_compatible(ctx, meta):
  if meta.get('fingerprint') != _fingerprint(ctx.config):
    raise UserError(
        f'{ctx.workdir}/checkpoints was written with a different config '
        '(backbone, model, optim, seed, batch size or number of passes); use '
        'another --workdir or the same config')


def _calibrate(ctx, state, cache):
  """Sets noise_std (relative mode: from ALL training features, once)."""
  if cache is not None:
    feats = cache
  else:
    feats = (ctx.feature_fn(ctx.backbone_vars,
                            parallel.put_batch(b['image'], ctx.mesh)[0])
             [:len(b['image'])]
             for b in loader.batches(ctx.train_set, ctx.config.eval.batch_size,
                                     indices=ctx.train_idx))
  state = calibrate_noise(state, ctx.config.model, feats)
  logging.info('%s: noise std %.5f (%s mode)', ctx.category,
               float(state.noise_std), ctx.config.model.noise_mode)
  return state


def _decision_threshold(ctx, state) -> dict:
  """Quantile of image scores on normal images the model did not train on.

  Also stores the range of those images' anomaly maps: predict mode draws its
  heat maps on that scale, so red means "beyond anything normal looked like".
  """
  from simplenet_jax import evaluate  # pylint: disable=g-import-not-at-top
  if len(ctx.holdout_idx):
    idx = ctx.holdout_idx
    source = f'{len(idx)} held-out normal training images'
  else:
    idx = ctx.train_idx
    source = f'{len(idx)} training images (in-sample: no hold-out)'
  scores, map_range = evaluate.normal_statistics(ctx, state, ctx.train_set, idx)
  q = ctx.config.threshold.quantile
  return dict(threshold=float(np.quantile(scores, q)),
              threshold_source=f'quantile {q} of image scores over {source}',
              map_range=map_range)


def _feature_histogram(ctx, state, cache):
  """The paper's Fig. 3: per-dimension std of local vs adapted features."""
  local_std, adapted_std = _feature_stds(state.params['adaptor'], cache)
  path = os.path.join(ctx.workdir, 'feature_std.png')
  visualize.feature_std_histogram(np.asarray(local_std),
                                  np.asarray(adapted_std), path)


@jax.jit
def _feature_stds(adaptor_params, cache):
  rows = cache.astype(jnp.float32).reshape(-1, cache.shape[-1])
  adapted = model_lib.Adaptor(rows.shape[-1]).apply({'params': adaptor_params},
                                                 rows)
  return rows.std(axis=0), adapted.std(axis=0)


def _update_best(best, row, passes):
  score = (row['image_auroc'], row['pixel_auroc'])
  score = tuple(-1.0 if np.isnan(x) else x for x in score)
  if best is None or score > tuple(best['key']):
    return {'pass': passes, 'key': list(score),
            **{k: row[k] for k in ('image_auroc', 'pixel_auroc', 'aupro')}}
  return best


def _append_jsonl(path, record):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(record) + '\n')


def _truncate_log(path, passes_done):
  """Drops log records of passes after the checkpoint we continue from."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut short by a kill mid-write.
        continue
      if isinstance(record, dict) and record.get('pass', 0) <= passes_done:
        keep.append(line if line.endswith('\n') else line + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(keep)
  os.replace(tmp, path)

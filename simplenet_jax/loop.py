"""The pass loop of one category: feature cache, steps, checkpoints, logs.

`train_category` trains a category's head from its latest checkpoint to
`train.num_passes`, writing a checkpoint every `train.checkpoint_every`
passes and one record per pass to <workdir>/<category>/log.jsonl (and to
TensorBoard when given a writer), and ends with the decision threshold
(`evaluate.decision_threshold`) in the final checkpoint's metadata.
"""

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import category
from simplenet_jax import console
from simplenet_jax import evaluate
from simplenet_jax import feature_cache
from simplenet_jax import model as model_lib
from simplenet_jax import parallel
from simplenet_jax import summaries
from simplenet_jax import train
from simplenet_jax import visualize
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError


def train_category(ctx: category.CategoryContext, tb=None):
  """Trains one category, continuing from its latest checkpoint.

  Args:
    ctx: the category.
    tb: a `summaries.Writer` for the per-pass scalars and the intermediate
      evaluations, or None.

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
        template, check_meta=ctx.check_compatible,
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
    steps = ctx.steps_per_pass
    use_cache = feature_cache.fits(n, ctx.grid_hw, ctx.embed_dim, c.train)
    cache = None
    if use_cache:
      cache = feature_cache.build(ctx.feature_fn, ctx.backbone_vars,
                                  ctx.train_set, ctx.train_idx,
                                  c.eval.batch_size, c.train, c.dataset,
                                  ctx.mesh)
      step_fn = train.make_cached_step(ctx.mesh, ctx.embed_dim)
    else:
      step_fn = train.make_features_step(ctx.mesh, ctx.embed_dim)

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
      bar = console.progress(steps, f'{ctx.category} pass {p + 1}/{num_passes}')
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
      record = {'pass': p + 1, **means,
                **_learning_rates(c, steps, p)}
      logging.info('%s pass %d/%d: loss %.4f p_true %.3f p_fake %.3f',
                   ctx.category, p + 1, num_passes, means['loss'],
                   means['p_true'], means['p_fake'])
      if c.train.eval_every and (p + 1) % c.train.eval_every == 0 and (
          p + 1) < num_passes:
        row = evaluate.evaluate_category(ctx, state, None,
                                         visualize_maps=False, tb=tb,
                                         step=p + 1)
        record.update({k: row[k] for k in ('image_auroc', 'pixel_auroc',
                                           'aupro')})
        if c.train.select_best_on_test:
          best = _update_best(best, row, p + 1)
      _append_jsonl(log_path, record)
      summaries.write_pass(tb, record)
      done = p + 1
      if done % c.train.checkpoint_every == 0 and done < num_passes:
        ckpt.save(done, state, ctx.meta(done))

    extra = evaluate.decision_threshold(ctx, state)
    if best is not None:
      extra['best_on_test'] = best
    meta = ctx.meta(num_passes, **extra)
    ckpt.save(num_passes, state, meta)
    if c.eval.feature_histogram and cache is not None:
      _feature_histogram(ctx, state, cache)
    return state, meta
  finally:
    ckpt.close()


def _learning_rates(c, steps_per_pass: int, p: int) -> dict:
  """The optimisers' learning rates during pass p (0-based): the adaptor's is
  constant, the discriminator's follows train.disc_lr_schedule."""
  disc = train.disc_lr_schedule(c.optim, steps_per_pass, c.train.num_passes)
  if callable(disc):
    disc = disc(jnp.asarray(p * steps_per_pass))
  return {'lr_adaptor': float(c.optim.adaptor_lr),
          'lr_discriminator': float(disc)}


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
  state = train.calibrate_noise(state, ctx.config.model, feats)
  logging.info('%s: noise std %.5f (%s mode)', ctx.category,
               float(state.noise_std), ctx.config.model.noise_mode)
  return state


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

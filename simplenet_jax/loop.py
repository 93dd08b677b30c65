"""The pass loop: feature cache, steps, checkpoints, logs.

`train_category` trains one category's head from its latest checkpoint to
`train.num_passes`, writing a checkpoint every `train.checkpoint_every`
passes and one record per pass to <workdir>/<category>/log.jsonl (and to
TensorBoard when given a writer), and ends with the decision threshold
(`evaluate.decision_threshold`) in the final checkpoint's metadata. The step
is the released one (`train.make_cached_step`, or `make_features_step` when
the features are not cached), or `synthesis.make_cached_step` when a
`synthesis` switch is on. `train_categories` does the same for several
categories at once, stepping all their heads in one jitted call
(`train.make_stacked_cached_step` or `synthesis.make_stacked_cached_step`);
each category's numbers, checkpoints and logs are those of training it
alone.
"""

import functools
import json
import os
import shutil
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import category
from simplenet_jax import console
from simplenet_jax import evaluate
from simplenet_jax import feature_cache
from simplenet_jax import knn
from simplenet_jax import model as model_lib
from simplenet_jax import neighbour_mix
from simplenet_jax import parallel
from simplenet_jax import summaries
from simplenet_jax import synthesis
from simplenet_jax import train
from simplenet_jax import visualize
from simplenet_jax.data import loader
from simplenet_jax.errors import UserError


class _CategoryRun:
  """One category's training around its steps: resume, cache, per-pass
  bookkeeping (log, checks, evaluation, checkpoints) and the finish.

  Used by `train_category` (one category) and `train_categories` (several
  stepped together), so both write the same files in the same way.
  """

  def __init__(self, ctx: category.CategoryContext, tb=None):
    self.ctx = ctx
    self.tb = tb  # A summaries.Writer or None.
    self.config = ctx.config
    self.ckpt = ctx.checkpointer()
    self.log_path = os.path.join(ctx.workdir, 'log.jsonl')
    self.syn = synthesis.SynthesisConfig.from_config(self.config.synthesis)
    self.best = None
    self.cache = None
    # Synthesis inputs (`synthesis.make_cached_step`), set by `prepare`.
    self.centre = self.las_cache = self.las_labels = None
    # train.neighbour_mix's (R, h*w) partner rows, set by `prepare`.
    self.partners = None
    self.state = None
    self.start = 0
    self.pass_t0 = 0.0  # When the current pass began (its log's pass_s).
    # The pass at which model.shrink_on_saturation restarted training with
    # a smaller noise (kept in each checkpoint's meta, so that a resumed run
    # neither restarts again nor forgets it did).
    self.saturated_at = None
    # The pass after which model.stop_on_saturation ended training.
    self.stopped_at = None

  def resume(self):
    """Restores the latest checkpoint; returns (state, meta) if training had
    already finished, else None (self.state/self.start set)."""
    ctx = self.ctx
    # A checkpoint of another config is an error; a damaged one is moved
    # aside (with a warning) and the previous one is used.
    state = ctx.new_state()
    restored = self.ckpt.restore_latest(
        state, check_meta=ctx.check_compatible, discard_unloadable=True)
    if restored is not None:
      _, state, meta = restored
      self.start = int(meta['passes_done'])
      self.saturated_at = meta.get('saturated_at')
      logging.info('%s: continuing from pass %d (%s)', ctx.category,
                   self.start, self.ckpt.directory)
      if (category.finished(meta, self.config.train.num_passes) and
          'threshold' in meta):
        ctx.warn_if_data_changed(meta)
        return parallel.put_replicated(state, ctx.mesh), meta
      change = ctx.data_change(meta)
      if change:
        raise UserError(
            f'{change}; resuming would train one model on both: put the '
            'images back as they were, or train in another --workdir')
    # Passes logged after the checkpoint (by a run that was killed) are
    # trained again: drop their records (all of them when starting afresh).
    _truncate_log(self.log_path, self.start)
    self.state = parallel.put_replicated(state, ctx.mesh)
    return None

  def uses_cache(self) -> bool:
    """Whether the training features (and LAS images' features) are
    cached; synthesis needs them cached."""
    ctx, c = self.ctx, self.config
    images = ctx.train_rows + len(ctx.train_idx) * (
        self.syn.las_variants if self.syn.las else 0)
    use = feature_cache.fits(images, ctx.grid_hw, ctx.embed_dim, c.train)
    needs = ('the synthesis.* switches need' if self.syn.active else
             'train.neighbour_mix needs' if c.train.neighbour_mix else None)
    if needs and not use and c.model.method == 'simplenet':
      raise UserError(
          f'{ctx.category}: {needs} the training '
          'features cached on the device, but they exceed '
          'train.cache_max_gb (or train.cache_features is off); raise it, '
          'set train.cache_dtype=bfloat16'
          + (' or lower synthesis.las_variants' if self.syn.las else ''))
    return use

  def prepare(self, use_cache: bool) -> None:
    """Builds the feature cache (if used), calibrates the noise and makes
    what the synthesis switches need (all deterministic: a resumed run
    rebuilds the same)."""
    ctx, c = self.ctx, self.config
    if use_cache:
      self.cache = feature_cache.build(ctx.feature_fn, ctx.backbone_vars,
                                       ctx.train_set, ctx.train_idx,
                                       c.eval.batch_size, c.train, c.dataset,
                                       ctx.mesh,
                                       desc=f'{ctx.category} features',
                                       image_views=feature_cache.views(c.train))
    if c.model.method != 'simplenet':
      return
    if self.start == 0 and c.model.noise_mode in ('relative', 'spread'):
      self.state = _calibrate(ctx, self.state, self.cache)
    if self.syn.gas == 'hypersphere':
      self.centre = _centre(self.cache, ctx.grid_hw)
    if self.syn.las:
      self.las_cache, self.las_labels = _las_cache(self)
    if c.train.neighbour_mix:
      self.partners = _partners(ctx, self.cache, c.train.neighbour_images)

  @property
  def centre_moves(self) -> bool:
    """Whether `pass_centre` changes with the state: only a centre adapted
    once per pass (synthesis.gas_centre='pass')."""
    return self.centre is not None and self.syn.gas_centre != 'step'

  def pass_centre(self, state):
    """The centre the steps of a pass get: raw (the step adapts it), or
    with synthesis.gas_centre='pass' adapted once by the adaptor of `state`,
    the state at the pass's start (a resumed run gets the same)."""
    if not self.centre_moves:
      return self.centre
    return synthesis.pass_centre(state.params, self.centre)

  def pass_plan(self, p: int):
    """(order, noise_key) of pass p: the shuffled rows of the pass (cache
    rows: the training images, in each of their views) and the key whose
    fold_in(., step) is each step's noise key."""
    self.pass_t0 = time.perf_counter()
    pass_key = jax.random.fold_in(jax.random.fold_in(self.ctx.key, 1), p)
    perm_key, noise_key = jax.random.split(pass_key)
    order = np.asarray(jax.random.permutation(perm_key, self.ctx.train_rows))
    return order, noise_key

  def restart_if_saturated(self, p: int, p_fake: float):
    """model.shrink_on_saturation: if pass p (0-based), whose steps' mean
    share of fakes past the loss's margin was `p_fake` (its log record's),
    is the run's first with that share >= train.SATURATED_P_FAKE, this
    attempt is set aside (its log to log.saturated.jsonl, its checkpoints to
    checkpoints.saturated/) and the fresh initial state with the noise std
    scaled by the factor is returned, to train again from pass 0; else
    None. Once per run."""
    ctx, factor = self.ctx, self.config.model.shrink_on_saturation
    if not factor or self.saturated_at is not None:
      return None
    if p_fake < train.SATURATED_P_FAKE:
      return None
    message = (f'{ctx.category}: pass {p + 1} saturated the loss (p_fake '
               f'{p_fake:.3f}); training again from the start with the noise '
               f'x{factor:g} (model.shrink_on_saturation)'
               + ('; it stops if the loss saturates again '
                  '(model.stop_on_saturation)'
                  if self.config.model.stop_on_saturation else ''))
    logging.info('%s', message)
    console.note(message)
    self.saturated_at = p + 1
    self.best = None
    # Set aside, not deleted; a second restart (after a kill) replaces them.
    self.ckpt.close()
    aside = self.ckpt.directory + '.saturated'
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.isdir(self.ckpt.directory):
      os.replace(self.ckpt.directory, aside)
    self.ckpt = ctx.checkpointer()
    if os.path.exists(self.log_path):
      os.replace(self.log_path,
                 os.path.join(ctx.workdir, 'log.saturated.jsonl'))
    state = _calibrate(ctx, ctx.new_state(), self.cache)
    return state.replace(noise_std=state.noise_std * factor)

  def stops_after(self, p: int, p_fake: float) -> bool:
    """model.stop_on_saturation: whether training ends after pass p
    (0-based), whose steps' mean share of fakes past the loss's margin was
    `p_fake`: the first pass with that share >= train.SATURATED_P_FAKE.
    The truncated L1 then teaches the head nothing more about its fakes;
    the run keeps that pass's model (docs/quality.md, fifty-third round).
    With model.shrink_on_saturation too, the first saturated pass trains
    again with the smaller noise (`restart_if_saturated`) and the next one
    stops: trained on past a second saturation, 279 photos' head fell to
    a pixel AUROC of 0.70 (fifty-fourth round)."""
    if (not self.config.model.stop_on_saturation or
        p_fake < train.SATURATED_P_FAKE):
      return False
    if self.config.model.shrink_on_saturation and self.saturated_at is None:
      return False  # Trains again first.
    again = ' again' if self.saturated_at is not None else ''
    message = (f'{self.ctx.category}: pass {p + 1} saturated the loss{again} '
               f'(p_fake {p_fake:.3f}); training stops with its model '
               '(model.stop_on_saturation)')
    logging.info('%s', message)
    console.note(message)
    self.stopped_at = p + 1
    return True

  def meta_extra(self) -> dict:
    """What a checkpoint's meta adds to `ctx.meta` for this run."""
    extra = {}
    if self.saturated_at is not None:
      extra['saturated_at'] = self.saturated_at
    if self.stopped_at is not None:
      extra['stopped_at'] = self.stopped_at
    return extra

  def end_pass(self, p: int, history, state_fn) -> dict:
    """Logs pass p (0-based) from its steps' metrics; checks, evaluates and
    checkpoints as configured, and sets `stopped_at` if training ends here
    (`stops_after`). state_fn() gives the state after the pass. Returns the
    pass's log record."""
    ctx, c = self.ctx, self.config
    num_passes = c.train.num_passes
    means = {k: float(np.mean([float(m[k]) for m in history]))
             for k in history[0]}
    if not all(np.isfinite(v) for v in means.values()):
      last = self.ckpt.steps()
      raise UserError(
          f'{ctx.category}: non-finite loss in pass {p + 1} ({means}); '
          f'training stopped, the last good checkpoint '
          f'({"pass " + str(last[-1]) if last else "none"}) is kept in '
          f'{self.ckpt.directory}. Lower optim.adaptor_lr/optim.disc_lr or '
          'check the training images.')
    record = {'pass': p + 1, **means,
              **_learning_rates(c, ctx.steps_per_pass, p),
              'pass_s': round(time.perf_counter() - self.pass_t0, 4)}
    logging.info('%s pass %d/%d: loss %.4f p_true %.3f p_fake %.3f',
                 ctx.category, p + 1, num_passes, means['loss'],
                 means['p_true'], means['p_fake'])
    done = p + 1
    # Its model is the final one: saved and evaluated by `finish`.
    last = done == num_passes or self.stops_after(p, means['p_fake'])
    if c.train.eval_every and done % c.train.eval_every == 0 and not last:
      row = evaluate.evaluate_category(ctx, state_fn(), None,
                                       visualize_maps=False, tb=self.tb,
                                       step=done)
      record.update({k: row[k] for k in ('image_auroc', 'pixel_auroc',
                                         'aupro')})
      if c.train.select_best_on_test:
        self.best = _update_best(self.best, row, done)
    _append_jsonl(self.log_path, record)
    summaries.write_pass(self.tb, record)
    if done % c.train.checkpoint_every == 0 and not last:
      self.ckpt.save(done, state_fn(), ctx.meta(done, **self.meta_extra()))
    return record

  def finish(self, state):
    """The decision threshold, the final checkpoint (at the pass training
    stopped at, if it did) and the Fig. 3 histogram; returns (state,
    meta)."""
    ctx, c = self.ctx, self.config
    extra = evaluate.decision_threshold(ctx, state, self.cache)
    if self.best is not None:
      extra['best_on_test'] = self.best
    passes = self.stopped_at or c.train.num_passes
    meta = ctx.meta(passes, **extra, **self.meta_extra())
    self.ckpt.save(passes, state, meta)
    if (c.eval.feature_histogram and self.cache is not None and
        c.model.method == 'simplenet'):  # Adapted features: SimpleNet's.
      _feature_histogram(ctx, state, self.cache)
    if ctx.runs_yardstick and self.cache is not None:
      ctx.train_features = self.cache  # Its bank: the same rows, no new pass.
    return state, meta

  def close(self) -> None:
    self.ckpt.close()


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
  run = _CategoryRun(ctx, tb)
  try:
    finished = run.resume()
    if finished:
      return finished
    if ctx.config.model.method == 'knn':
      return _fit_memory_bank(run)
    return _train_alone(run, run.uses_cache())
  finally:
    run.close()


def memory_bank(ctx, features) -> jax.Array:
  """The kNN memory bank (M, D) of a category's training features (N, h*w,
  D), with the coreset's progress bar: what model.method=knn fits and what
  the yardstick (eval.yardstick) fits alike, from the same key."""
  c = ctx.config.knn
  rows = features.shape[0] * features.shape[1]
  with console.progress(knn.coreset_size(rows, c.coreset_fraction),
                        f'{ctx.category} kNN coreset',
                        enabled=c.coreset_fraction < 1.0) as bar:
    return knn.memory_bank(features, jax.random.fold_in(ctx.key, 2),
                           c.coreset_fraction, c.projection_dim,
                           progress=bar.update)


def _fit_memory_bank(run: _CategoryRun):
  """model.method='knn': the coreset of every training feature is the
  model; no passes (the log gets one record of the fit)."""
  ctx, c = run.ctx, run.config
  if not run.uses_cache():
    raise UserError(
        f'{ctx.category}: model.method=knn needs all training features on '
        'the device (the memory bank is chosen from them) but they exceed '
        'train.cache_max_gb; raise it or set train.cache_dtype=bfloat16')
  t0 = time.perf_counter()
  run.prepare(use_cache=True)
  bank = memory_bank(ctx, run.cache)
  state = parallel.put_replicated(knn.MemoryBank(bank=bank), ctx.mesh)
  jax.block_until_ready(state)
  _append_jsonl(run.log_path, {
      'pass': c.train.num_passes, 'bank_rows': int(bank.shape[0]),
      'feature_rows': int(run.cache.shape[0] * run.cache.shape[1]),
      'fit_s': time.perf_counter() - t0})
  return run.finish(state)


def _train_alone(run: _CategoryRun, use_cache: bool):
  """The passes of one resumed category, one jitted step per batch."""
  ctx, c = run.ctx, run.config
  num_passes, bs = c.train.num_passes, c.train.batch_size
  run.prepare(use_cache)
  # Every leaf committed to the mesh, as the step's outputs are: otherwise
  # the first step's inputs differ in placement and the step compiles twice.
  state = parallel.put_replicated(run.state, ctx.mesh)
  cache, steps = run.cache, ctx.steps_per_pass
  views = feature_cache.views(c.train)
  mix = neighbour_mix.Mix.from_config(c.train, len(views))
  if run.syn.active:
    syn_step = functools.partial(
        synthesis.make_cached_step(ctx.mesh, ctx.grid_hw, run.syn, mix),
        las_cache=run.las_cache, las_labels=run.las_labels,
        partners=run.partners)
  elif use_cache:
    step_fn = functools.partial(
        train.make_cached_step(ctx.mesh, ctx.embed_dim, mix),
        partners=run.partners)
  else:
    step_fn = train.make_features_step(ctx.mesh, ctx.embed_dim)
  p = run.start
  while p < num_passes:
    order, noise_key = run.pass_plan(p)
    if run.syn.active:
      step_fn = functools.partial(syn_step, centre=run.pass_centre(state))
    history = []
    bar = console.progress(steps, f'{ctx.category} pass {p + 1}/{num_passes}')
    if use_cache:
      batches = (order[s * bs:(s + 1) * bs] for s in range(steps))
    else:
      n = len(ctx.train_idx)  # Row r: view r // n of image r % n.
      batches = loader.batches(ctx.train_set, bs,
                               indices=ctx.train_idx[order % n],
                               num_workers=c.dataset.num_workers,
                               prefetch=c.dataset.prefetch)
    for s, batch in enumerate(batches):
      key = jax.random.fold_in(noise_key, s)
      if use_cache:
        state, metrics = step_fn(state, cache, jnp.asarray(batch), key)
      else:
        images = feature_cache.view_images(
            batch['image'], order[s * bs:(s + 1) * bs] // n, views,
            ctx.grid_hw)
        images, n_valid = parallel.put_batch(images, ctx.mesh)
        state, metrics = step_fn(state, ctx.backbone_vars, images, key,
                                 ctx.feature_fn, n_valid)
      history.append(metrics)
      bar.update(1)
      if s % 10 == 0 or s == steps - 1:
        bar.set_postfix({k: f'{float(v):.4f}' for k, v in metrics.items()})
    bar.close()
    record = run.end_pass(p, history, lambda: state)
    if run.stopped_at is not None:  # end_pass: model.stop_on_saturation.
      break
    restart = run.restart_if_saturated(p, record['p_fake'])
    if restart is not None:
      state, p = parallel.put_replicated(restart, ctx.mesh), 0
    else:
      p += 1
  return run.finish(state)


def train_categories(ctxs, tbs=None) -> list:
  """Trains several categories at once, continuing each from its latest
  checkpoint: one jitted step moves the heads of every category in a group
  (`train.make_stacked_cached_step`, or `synthesis.make_stacked_cached_step`
  with a synthesis switch on: a vmap over categories).

  A group is the categories whose TrainStates share one static structure
  (all of them, unless `optim.cos_lr` makes the optimiser depend on each
  category's steps per pass) and number of passes (train.augment='auto'
  may give each its own) and that cache their features; with synthesis
  also one feature grid. A category without the feature cache or with
  train.neighbour_mix is trained alone. Each keeps its own batches, keys,
  checkpoints, resume point, log and restart on saturation
  (model.shrink_on_saturation); a category with fewer steps in a pass, or
  at another pass, is masked out of the steps it would not take, so its
  result is that of `train_category` (up to float rounding).

  Args:
    ctxs: the categories.
    tbs: one `summaries.Writer` (or None) per category, or None.

  Returns:
    [(state, meta)] in the order of `ctxs`.
  """
  tbs = tbs or [None] * len(ctxs)
  runs = [_CategoryRun(ctx, tb) for ctx, tb in zip(ctxs, tbs)]
  results = [None] * len(ctxs)
  try:
    groups = {}
    for k, run in enumerate(runs):
      results[k] = run.resume()
      if results[k] is not None:
        continue
      if run.config.model.method == 'knn':
        results[k] = _fit_memory_bank(run)  # No steps to share.
        continue
      use_cache = run.uses_cache()
      if not use_cache or run.config.train.neighbour_mix:
        # Recomputed features, or partners searched in each category's own
        # cache: alone.
        results[k] = _train_alone(run, use_cache)
        continue
      # Synthesis shapes the batch as images of one grid.
      grid = run.ctx.grid_hw if run.syn.active else None
      # train.augment='auto' gives categories other numbers of passes.
      groups.setdefault((jax.tree.structure(run.state), grid,
                         run.config.train.num_passes), []).append(k)
    for members in groups.values():
      finished = _train_stacked([runs[k] for k in members])
      for k, result in zip(members, finished):
        results[k] = result
    return results
  finally:
    for run in runs:
      run.close()


def _train_stacked(live: list) -> list:
  """The passes of resumed categories of one static structure, stepped
  together; returns [(state, meta)] in the order of `live`.

  Each category is at its own pass (`at`): it starts at its checkpoint's,
  model.shrink_on_saturation may send it back to pass 0 and
  model.stop_on_saturation may end it while the others go on. Every round
  of steps takes each unfinished category through its next pass.
  """
  c = live[0].config
  num_passes, bs = c.train.num_passes, c.train.batch_size
  mesh = live[0].ctx.mesh
  for run in live:
    run.prepare(use_cache=True)
  # Committed to the mesh like the step's outputs (see _train_alone).
  states = parallel.put_replicated(
      train.stack_states([r.state for r in live]), mesh)
  step_fn = _stacked_step_fn(live, mesh)
  names = ','.join(r.ctx.category for r in live)
  logging.info('%s: trained together, one stacked step', names)
  at = [r.start for r in live]
  moves = live[0].centre_moves  # One synthesis config for the group.
  centres = None if moves else _stacked_centres(live, states, mesh)
  while min(at) < num_passes:
    on = [p < num_passes for p in at]
    plans = [r.pass_plan(p) if o else None for r, p, o in zip(live, at, on)]
    steps = [r.ctx.steps_per_pass if o else 0 for r, o in zip(live, on)]
    if moves:  # Adapted anew by each state at its pass's start.
      centres = _stacked_centres(live, states, mesh)
    histories = [[] for _ in live]
    bar = console.progress(
        max(steps), f'{names} pass {min(p for p, o in zip(at, on) if o) + 1}'
        f'/{num_passes}')
    for s in range(max(steps)):
      idx = np.zeros((len(live), bs), np.int32)
      n_images = np.zeros((len(live),), np.int32)
      keys = []
      for j, plan in enumerate(plans):
        if plan is None:  # Finished: any key of its type, masked out.
          keys.append(live[j].ctx.key)
          continue
        order, noise_key = plan
        batch = order[s * bs:(s + 1) * bs] if s < steps[j] else order[:0]
        idx[j, :len(batch)] = batch
        n_images[j] = len(batch)
        keys.append(jax.random.fold_in(noise_key, s))
      states, metrics = step_fn(states, idx, n_images, n_images > 0,
                                jnp.stack(keys), centres)
      for j in np.flatnonzero(n_images > 0):
        histories[j].append({k: v[j] for k, v in metrics.items()})
      bar.update(1)
    bar.close()
    for j, run in enumerate(live):
      if not on[j]:
        continue
      record = run.end_pass(at[j], histories[j],
                            functools.partial(_unstacked, states, j, mesh))
      if run.stopped_at is not None:  # end_pass: model.stop_on_saturation.
        at[j] = num_passes  # Masked out from here on: its state is kept.
        continue
      restart = run.restart_if_saturated(at[j], record['p_fake'])
      if restart is None:
        at[j] += 1
        continue
      states = parallel.put_replicated(jax.tree.map(
          lambda x, y, j=j: x.at[j].set(y), states, restart), mesh)
      at[j] = 0
  return [run.finish(_unstacked(states, j, mesh))
          for j, run in enumerate(live)]


def _stacked_step_fn(live: list, mesh):
  """step(states, idx, n_images, active, keys, centres) -> (states,
  metrics) of the group's stacked step, its caches (and the LAS caches)
  bound."""
  caches = _stack_padded([r.cache for r in live], mesh)
  syn = live[0].syn
  if not syn.active:
    grid = np.asarray([r.cache.shape[1] for r in live], np.int32)
    step = train.make_stacked_cached_step(mesh, live[0].config.train.batch_size)

    def released(states, idx, n_images, active, keys, centres):
      del centres  # None: no synthesis.
      return step(states, caches, *parallel.global_inputs(
          mesh, idx, n_images, grid, active, keys))
    return released
  step = synthesis.make_stacked_cached_step(mesh, live[0].ctx.grid_hw, syn)
  las = las_labels = n_train = None
  if syn.las:
    # (V, N, h*w, ...) per category, zero-padded along N.
    las = _stack_padded([r.las_cache for r in live], mesh, axis=1)
    las_labels = _stack_padded([r.las_labels for r in live], mesh, axis=1)
    n_train = np.asarray([len(r.ctx.train_idx) for r in live], np.int32)
  return lambda states, idx, n_images, active, keys, centres: step(
      states, caches, idx, n_images, active, keys, centres, las, las_labels,
      n_train)


def _stacked_centres(live: list, states, mesh):
  """The centres stacked (None without GAS 'hypersphere'): each
  category's `pass_centre`, of its state at the round's start where the
  centre moves (a finished category's too, unused: one shape)."""
  if live[0].centre is None:
    return None
  return parallel.put_replicated(jnp.stack([
      run.pass_centre(_unstacked(states, j, mesh)) if run.centre_moves
      else run.centre for j, run in enumerate(live)]), mesh)


def _unstacked(states, j, mesh):
  return parallel.put_replicated(train.unstack_state(states, j), mesh)


def _stack_padded(arrays, mesh, axis: int = 0):
  """K arrays of one rank -> one (K, ...), each zero-padded to the largest
  size along every axis from `axis` on (caches (N_k, P_k, D) -> (K, N_max,
  P_max, D); LAS caches (V, N_k, P, D) with axis=1)."""
  shape = np.max([x.shape for x in arrays], axis=0)
  padded = [jnp.pad(x, [(0, 0) if a < axis else (0, int(shape[a]) - x.shape[a])
                        for a in range(x.ndim)]) for x in arrays]
  return parallel.put_replicated(jnp.stack(padded), mesh)


def _learning_rates(c, steps_per_pass: int, p: int) -> dict:
  """The optimisers' learning rates during pass p (0-based): the adaptor's is
  constant (0 with model.pre_proj=0: it is never trained), the
  discriminator's follows train.disc_lr_schedule."""
  disc = train.disc_lr_schedule(c.optim, steps_per_pass, c.train.num_passes)
  if callable(disc):
    disc = disc(jnp.asarray(p * steps_per_pass))
  return {'lr_adaptor': float(c.optim.adaptor_lr) if c.model.pre_proj else 0.0,
          'lr_discriminator': float(disc)}


def _calibrate(ctx, state, cache):
  """Sets noise_std (relative mode: from ALL training features, once)."""
  if cache is not None:
    feats = cache
  else:
    # A list (the spread reads every batch anyway): model.heads > 1 reads
    # it once per head. Every view of every image, as the cache holds.
    def viewed(batch, view):
      images = parallel.put_batch(batch['image'], ctx.mesh)[0]
      return feature_cache.apply_view(images, view, ctx.grid_hw)

    feats = [ctx.feature_fn(ctx.backbone_vars, viewed(b, view))
             [:len(b['image'])]
             for view in feature_cache.views(ctx.config.train)
             for b in loader.batches(ctx.train_set, ctx.config.eval.batch_size,
                                     indices=ctx.train_idx)]
  state = train.calibrate_noise(state, ctx.config.model, feats)
  logging.info('%s: noise std %s (%s mode%s)', ctx.category,
               ', '.join(f'{x:.5f}' for x in np.ravel(state.noise_std)),
               ctx.config.model.noise_mode,
               f', shaped over {state.noise_layers} layers' if
               state.noise_layers > 1 else '')
  return state


def _partners(ctx, cache, images):
  """`neighbour_mix.partners` of the cached training features, timed; None
  when the steps draw them (train.neighbour_images > 0)."""
  n = len(ctx.train_idx)
  if n < 2:
    raise UserError(
        f'{ctx.category}: train.neighbour_mix moves each training feature '
        f'toward another training image, but {n} image is trained on; add '
        'training images or set train.neighbour_mix=0')
  if images:
    return None
  t0 = time.perf_counter()
  rows = cache.shape[0] * cache.shape[1]
  with console.progress(rows, f'{ctx.category} neighbour partners') as bar:
    partners = neighbour_mix.partners(cache, n, progress=bar.update)
  logging.info('%s: neighbour partners of %d features in %.1f s',
               ctx.category, rows, time.perf_counter() - t0)
  return partners


@functools.partial(jax.jit, static_argnums=(1,))
def _centre(cache, grid_hw):
  """(h, w, D) mean training feature per position (GAS 'hypersphere')."""
  return cache.astype(jnp.float32).mean(0).reshape(*grid_hw, -1)


def _las_cache(run: _CategoryRun):
  """LAS: `synthesis.las_variants` defect images per training image, made
  once and run through the backbone; returns their features (K, N, h*w, D)
  and defect labels (K, N, h*w), replicated."""
  ctx, c, syn = run.ctx, run.config, run.syn
  t0 = time.perf_counter()
  key = jax.random.fold_in(ctx.key, 3)
  textures = synthesis.texture_bank(
      synthesis.TEXTURES, ctx.train_set.image_hw,
      seed=int(jax.random.randint(jax.random.fold_in(key, 0), (), 0, 2**30)),
      texture_dir=syn.texture_dir)
  feats, labels = [], []
  for v in range(syn.las_variants):
    vkey = jax.random.fold_in(jax.random.fold_in(key, 1), v)
    images = synthesis.LASImages(ctx.train_set, vkey, textures, syn.recolour)
    feats.append(feature_cache.build(
        ctx.feature_fn, ctx.backbone_vars, images, ctx.train_idx,
        c.eval.batch_size, c.train, c.dataset, ctx.mesh,
        grid_hw=ctx.grid_hw, dim=ctx.embed_dim,
        desc=f'{ctx.category} LAS images {v + 1}/{syn.las_variants}'))
    labels.append(synthesis.las_labels(vkey, ctx.train_idx,
                                       ctx.train_set.image_hw, ctx.grid_hw))
  feats = parallel.put_replicated(jnp.stack(feats), ctx.mesh)
  labels = parallel.put_replicated(jnp.asarray(np.stack(labels)), ctx.mesh)
  logging.info('%s: %d LAS images per training image in %.1f s (%.1f%% of '
               'their feature cells defective)', ctx.category,
               syn.las_variants, time.perf_counter() - t0,
               100 * float(labels.mean()))
  return feats, labels


def _feature_histogram(ctx, state, cache):
  """The paper's Fig. 3: per-dimension std of local vs adapted features
  (with model.heads > 1, the first head's adaptor), a chunk of rows at a
  time."""
  if model_lib.num_heads(state.params) > 1:
    state = train.unstack_state(state, 0)
  path = os.path.join(ctx.workdir, 'feature_std.png')
  visualize.feature_std_histogram(
      np.sqrt(train.dimension_variances(cache)),
      np.sqrt(train.dimension_variances(cache, state.params)), path)


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

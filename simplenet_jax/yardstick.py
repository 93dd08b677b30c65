"""kNN on the same features, evaluated beside a SimpleNet run (eval.yardstick).

PatchCore's scoring (model.method='knn') needs no training, so every
SimpleNet evaluation can say what a nearest-neighbour scorer on the very
same backbone features, training images and test set reaches. The figures
are those a separate `model.method=knn` run of the same config gives: the
same training images (the hold-out split), the same coreset key, the same
maps and metrics. `memory_bank` fits the bank; the final evaluation
(`evaluate.evaluate_category` with it) scores each test image with the head
and with kNN from one backbone pass. `advice` reads the comparison back to
the user when the head's loss saturated and it trails kNN.
"""

import time

from absl import logging

from simplenet_jax import feature_cache
from simplenet_jax import loop
from simplenet_jax import parallel
from simplenet_jax import report
from simplenet_jax import train


def memory_bank(ctx):
  """The yardstick's memory bank (M, D) float32 (replicated on ctx.mesh)
  of ctx's training features, what `loop.memory_bank` fits for a
  model.method=knn run, or None (with a warning) when those features exceed
  train.cache_max_gb on the device.

  A run that trained from the feature cache left it in ctx.train_features:
  the very rows a backbone pass would give (same images, views, batches),
  taken here and dropped; else (--mode=eval, or a run that recomputed its
  features) the backbone runs over the training images.
  """
  c = ctx.config
  t0 = time.perf_counter()
  features, ctx.train_features = ctx.train_features, None
  if features is None:
    need = feature_cache.estimate_bytes(ctx.train_rows, ctx.grid_hw,
                                        ctx.embed_dim, c.train.cache_dtype)
    if need / 2**30 > c.train.cache_max_gb:
      logging.warning(
          '%s: eval.yardstick skipped: the training features (%.1f GB) '
          'exceed train.cache_max_gb; raise it or set '
          'train.cache_dtype=bfloat16 for the kNN yardstick', ctx.category,
          need / 2**30)
      return None
    features = feature_cache.build(ctx.feature_fn, ctx.backbone_vars,
                                   ctx.train_set, ctx.train_idx,
                                   c.eval.batch_size, c.train, c.dataset,
                                   ctx.mesh, grid_hw=ctx.grid_hw,
                                   dim=ctx.embed_dim,
                                   desc=f'{ctx.category} kNN features',
                                   image_views=feature_cache.views(c.train))
  bank = loop.memory_bank(ctx, features)
  del features
  logging.info('%s: kNN yardstick (%d bank rows) in %.1f s', ctx.category,
               bank.shape[0], time.perf_counter() - t0)
  return parallel.put_replicated(bank, ctx.mesh)


def advice(row: dict, last_pass: dict, model_cfg,
           saturated_at: int | None = None,
           train_cfg=None, stopped_at: int | None = None) -> str | None:
  """One line for the user when the head's loss saturated and it trails kNN
  on the same features (image or pixel AUROC), else None.

  Twelfth round of docs/quality.md: with many training images the loss
  saturates at noise_rel 0.4; where the head then also trailed its
  yardstick (generated gravel, 80 and 200 tiles), a quarter of the noise
  scored far better; where it led (the cookies photos at 279 images),
  smaller noise scored lower. Not for noise_mode='absolute': its std is the
  released WRN50-2 constant, not a size relative to the features.

  Args:
    row: the category's results row, with report.YARDSTICK's figures.
    last_pass: the last record of its log.jsonl (its 'p_fake'), or {}.
    model_cfg: config.model.
    saturated_at: the pass at which model.shrink_on_saturation started the
      run over with a smaller noise (the run's meta 'saturated_at'), or
      None. Then the run already took the smaller noise and saturated
      again: the hint names kNN instead.
    train_cfg: config.train, or None; its train.neighbour_mix, which kNN
      runs refuse, is switched off in the kNN hint.
    stopped_at: the pass at which model.stop_on_saturation ended training
      (the run's meta 'stopped_at'), or None. Then the hint names the
      restart, with the stop kept for a second saturation: where a stopped
      model trailed kNN (gravel@80, the cookie photos at 256 px; fifty-third
      round), the restart did better; trained on past a second saturation
      it can collapse (fifty-fourth round).
  """
  if (model_cfg.method != 'simplenet' or
      model_cfg.noise_mode == 'absolute' or
      report.YARDSTICK[0] not in row or
      last_pass.get('p_fake', 0.0) < train.SATURATED_P_FAKE):
    return None
  trails = [name for name, m, k in zip(('image', 'pixel'), report.METRICS,
                                       report.YARDSTICK)
            if row.get(m) is not None and row.get(k) is not None and
            row[m] < row[k]]  # NaN (no masks) compares False: not trailing.
  if not trails:
    return None
  head = (f"{row['category']}: the head's loss saturated (last pass: p_fake "
          f"{last_pass['p_fake']:.3f}) and it trails kNN on the same features "
          f"in {' and '.join(trails)} AUROC")
  if saturated_at is not None:
    return (f"{head}, though it was already trained again with a smaller "
            f"noise after pass {saturated_at} saturated "
            "(model.shrink_on_saturation); kNN may suit this data better: "
            "--config.model.method=knn --config.synthesis.gas=none"
            + (' --config.train.neighbour_mix=0'
               if train_cfg is not None and train_cfg.neighbour_mix else '')
            + " (README, 'More training images').")
  if stopped_at is not None:
    return (f"{head}; training stopped at pass {stopped_at} "
            "(model.stop_on_saturation); training again from the start with "
            "a quarter of the noise can do better, stopping if the loss "
            "saturates again: --config.model.shrink_on_saturation=0.25"
            " (README, 'More training images').")
  return (f"{head}; with many training images a smaller noise can do "
          f"better: try --config.model.noise_rel={model_cfg.noise_rel / 4:g} "
          "(README, 'More training images').")

"""One category's context: its data, keys, paths, train-state template,
checkpoint fingerprint and the checks that a checkpoint belongs to the run.

`CategoryContext.create` is the one place a category is set up; training
(`loop.train_category`), evaluation (`evaluate.evaluate_category`) and
predict mode all read what they need from it or from the helpers here.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simplenet_jax import checkpoint
from simplenet_jax import data
from simplenet_jax import feature_cache
from simplenet_jax import knn
from simplenet_jax import neighbour_mix
from simplenet_jax import parallel
from simplenet_jax import scoring
from simplenet_jax import synthesis
from simplenet_jax import train
from simplenet_jax import view_check
from simplenet_jax.errors import UserError


def checkpoint_dir(workdir: str, category: str) -> str:
  """<workdir>/<category>/checkpoints, absolute: where a category's
  checkpoints live (the one place this path is spelled)."""
  return os.path.join(os.path.abspath(workdir), category, 'checkpoints')


def trained_categories(workdir: str) -> list[str]:
  """The categories under `workdir` that have a checkpoint folder, sorted."""
  if not os.path.isdir(workdir):
    return []
  return sorted(d for d in os.listdir(workdir)
                if os.path.isdir(checkpoint_dir(workdir, d)))


def category_key(seed: int, category: str) -> jax.Array:
  """The category's root PRNG key: the same seed gives every category its own
  numbers, independent of which other categories run."""
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            zlib.crc32(category.encode()) & 0x7FFFFFFF)


def state_template(config, embed_dim: int, steps_per_pass: int, key=None,
                   bank_rows: int = 0):
  """A fresh state of the config's method, shapes and optimiser: the start
  of training, or the template a checkpoint is restored into.

  SimpleNet: an initialised TrainState. kNN: a MemoryBank of `bank_rows`
  zero rows (what `knn.memory_bank` keeps of the training features).
  """
  if config.model.method == 'knn':
    return knn.MemoryBank(bank=jnp.zeros((bank_rows, embed_dim), jnp.float32))
  key = jax.random.PRNGKey(0) if key is None else key
  return train.create_train_state(key, config.model, config.optim, embed_dim,
                                  steps_per_pass, config.train.num_passes,
                                  len(config.backbone.layers))


def template_for(config, meta: dict):
  """The state a checkpoint with metadata `meta` restores into, made
  without its data (predict and export read no dataset)."""
  return state_template(config, meta['embed_dim'], meta['steps_per_pass'],
                        bank_rows=meta.get('bank_rows', 0))


def _counts(record: dict) -> str:
  return (f"{record['n_train']} training, {record['n_holdout']} held-out "
          f"and {record['n_validation']} validation images")


def finished(meta: dict, num_passes: int) -> bool:
  """Whether a checkpoint's meta is that of a run whose training ended:
  every pass trained, or stopped at saturation (model.stop_on_saturation,
  the meta's 'stopped_at')."""
  return int(meta['passes_done']) >= num_passes or bool(
      meta.get('stopped_at'))


def fingerprint(config) -> str:
  """What must not change between a run and its continuation."""
  groups = ('backbone', 'model', 'optim') + (
      ('knn',) if config.model.method == 'knn' else ()) + (
          ('synthesis',) if synthesis.SynthesisConfig.from_config(
              config.synthesis).active else ())
  keys = {k: config[k].to_dict() for k in groups}
  # Keys added after checkpoints existed are left out where the run trains
  # as the code before them did, so such runs still resume and export.
  if keys['model'].get('heads') == 1:
    keys['model'].pop('heads')
  if keys['model'].get('pre_proj') == 1:
    keys['model'].pop('pre_proj')
  if keys['model'].get('disc_layers') == 2:
    keys['model'].pop('disc_layers')
  if not keys['model'].get('shrink_on_saturation'):
    keys['model'].pop('shrink_on_saturation', None)
  if not keys['model'].get('stop_on_saturation'):
    keys['model'].pop('stop_on_saturation', None)
  if keys['model'].get('noise_shape') == 'isotropic':
    keys['model'].pop('noise_shape')
  if keys['model'].get('coarse_scale') == 1:
    keys['model'].pop('coarse_scale')
  syn = keys.get('synthesis', {})
  if syn.get('loss') == 'truncated_l1':
    syn.pop('loss')
  if syn.get('gas_bn') == 'frozen':
    syn.pop('gas_bn')
  if syn.get('gas_centre') == 'step':
    syn.pop('gas_centre')
  if syn.get('gas_bn') == 'batch' and syn.get('gas') != 'none':
    # GAS with gas_bn='batch' became GLASS's whole step on 2026-11-30
    # (running statistics at every forward, two final forwards, torch's
    # clamps, the gradient through the projections): older runs of it are
    # not resumed.
    syn['glass_step'] = 2
  if not (syn.get('gas') == 'hypersphere' and syn.get('las_weight', 0) > 0):
    syn.pop('las_shell', None)  # Only hypersphere + LAS uses it.
  if syn.get('perlin'):
    # Perlin-masked noise masks both copies of the batch since 2026-11-30
    # (before: the second only), so older perlin runs are not resumed.
    syn['perlin_masked_copies'] = 2
  keys['seed'] = config.seed
  keys['train'] = {k: config.train[k] for k in ('batch_size', 'num_passes')}
  if config.train.augment != 'none':  # Added later: older runs had none.
    keys['train']['augment'] = config.train.augment
  if config.train.neighbour_mix:  # Likewise.
    keys['train']['neighbour_mix'] = config.train.neighbour_mix
    # Runs of the exact search (0, the only one before 2026-12-03) keep
    # their fingerprint.
    if config.train.neighbour_images:
      keys['train']['neighbour_images'] = config.train.neighbour_images
    if config.train.neighbour_mix_when != 'always':
      keys['train']['neighbour_mix_when'] = config.train.neighbour_mix_when
  keys['holdout'] = config.threshold.holdout_fraction
  return hex(zlib.crc32(json.dumps(keys, sort_keys=True, default=str).encode()))


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
  val_set: Any  # Normal images not trained on (threshold), or None.
  train_idx: np.ndarray  # Training images (dataset indices).
  holdout_idx: np.ndarray  # Held out for the decision threshold.
  feature_fn: Any  # (backbone_vars, images) -> (B, h, w, D)
  predict_fn: Any  # (backbone_vars, head_vars, images) -> dict
  cells: Any  # Where the maps draw the grid (scoring.cells_for), or None.
  grid_hw: tuple[int, int]
  embed_dim: int
  key: jax.Array
  # The config as given, when `config` differs from it for this category
  # (train.augment='auto', `view_check.resolve`): what checkpoints are
  # fingerprinted with, so that eval, predict and export take the same
  # --config the training did.
  requested: Any = None
  augment_why: str = ''  # With 'auto': the measurements it decided on.
  # The training run's feature cache (N, h*w, D), handed to the kNN
  # yardstick (eval.yardstick) so that it does not run the backbone over the
  # training images again; `yardstick.memory_bank` takes it (and drops it).
  train_features: Any = None

  @property
  def runs_yardstick(self) -> bool:
    """Whether kNN on the same features scores this category after the
    head (eval.yardstick; a kNN run is its own yardstick)."""
    return bool(self.config.eval.yardstick and
                self.config.model.method == 'simplenet')

  @classmethod
  def create(cls, config, workdir, category, kind, module, backbone_vars,
             mesh):
    """The context of a configured category (its data from config.dataset)."""
    train_set = data.build(config.dataset, category, 'train', workdir)
    test_set = data.build(config.dataset, category, 'test', workdir)
    val_set = data.build(config.dataset, category, 'validation', workdir)
    return cls.from_datasets(config, workdir, category, kind, module,
                             backbone_vars, mesh, train_set, test_set,
                             val_set)

  @classmethod
  def from_datasets(cls, config, workdir, category, kind, module,
                    backbone_vars, mesh, train_set, test_set, val_set=None):
    """The context of given datasets (e.g. generated ones in benchmarks).

    With validation images (val_set) every training image is trained on and
    threshold.holdout_fraction does not apply.
    """
    layers = tuple(config.backbone.layers)
    split_key, key = jax.random.split(category_key(config.seed, category))
    n = len(train_set)
    n_hold = int(round(config.threshold.holdout_fraction * n))
    if config.threshold.holdout_fraction > 0:
      n_hold = min(max(n_hold, 1), n - 1)
    if val_set is not None:
      if n_hold:
        logging.info('%s: %d validation images set the threshold; no training '
                     'image is held out (threshold.holdout_fraction=%s does '
                     'not apply).', category, len(val_set),
                     config.threshold.holdout_fraction)
      n_hold = 0
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
    stored = {}  # This config's latest checkpoint's metadata, where read.
    ckpt_dir = checkpoint_dir(workdir, category)
    if config.train.augment == 'auto' or config.eval.cells != 'released':
      latest = checkpoint.latest_meta(ckpt_dir)
      if latest and latest[1].get('fingerprint') == fingerprint(config):
        stored = latest[1]
    cells, predict_fn = scoring.run_predict_fn(
        config, module, backbone_vars, test_set.image_hw, stored.get('cells'),
        ckpt_dir)
    requested, why = None, ''
    if config.train.augment == 'auto':
      requested = config
      if 'augment_why' in stored:
        why = stored['augment_why']
        config = view_check.resolve_as_trained(config, category, stored)
      else:
        verdict = None
        if len(train_idx) >= 2:
          verdict = view_check.check_flips(
              feature_fn, backbone_vars, train_set, train_idx, config, mesh,
              jax.random.fold_in(key, 4), (shape[1], shape[2]), shape[3])
        why = view_check.describe(verdict)
        config = view_check.resolve(config, category, verdict)
    mixed = neighbour_mix.resolve(config, category)
    if mixed is not config:
      requested = requested or config
      config = mixed
    return cls(config=config, workdir=os.path.join(workdir, category),
               category=category, kind=kind, module=module,
               backbone_vars=backbone_vars, mesh=mesh, train_set=train_set,
               test_set=test_set, val_set=val_set, train_idx=train_idx,
               holdout_idx=holdout_idx,
               feature_fn=feature_fn, predict_fn=predict_fn, cells=cells,
               grid_hw=(shape[1], shape[2]), embed_dim=shape[3], key=key,
               requested=requested, augment_why=why)

  @property
  def train_rows(self) -> int:
    """Images a training pass covers: every training image in each of its
    views (feature_cache.views; 4x with train.augment='flips', 2x with one
    flip)."""
    return len(self.train_idx) * len(feature_cache.views(self.config.train))

  @property
  def steps_per_pass(self) -> int:
    return feature_cache.steps_per_pass(self.train_rows,
                                        self.config.train.batch_size)

  def unseen_normal_images(self):
    """(dataset, indices, description) of the normal images the model does
    not train on: the validation images where the category has them, else
    the held-out training images; None when there are neither. They set the
    decision threshold (`evaluate.decision_threshold`) and carry the
    synthetic defects of `evaluate.synthetic_check`."""
    if self.val_set is not None:
      return (self.val_set, np.arange(len(self.val_set)),
              f'{len(self.val_set)} validation images (normal, not trained '
              'on)')
    if len(self.holdout_idx):
      return (self.train_set, self.holdout_idx,
              f'{len(self.holdout_idx)} held-out normal training images')
    return None

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, 'checkpoints')

  @property
  def bank_rows(self) -> int:
    """kNN: the rows its memory bank keeps of the training features."""
    h, w = self.grid_hw
    return knn.coreset_size(self.train_rows * h * w,
                            self.config.knn.coreset_fraction)

  def new_state(self):
    return state_template(self.config, self.embed_dim, self.steps_per_pass,
                          key=jax.random.fold_in(self.key, 0),
                          bank_rows=self.bank_rows)

  def checkpointer(self) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(self.checkpoint_dir,
                                   self.config.train.keep_checkpoints)

  def meta(self, passes_done: int, **extra) -> dict:
    c = self.config
    return dict(passes_done=passes_done, category=self.category,
                kind=self.kind, image_hw=list(self.test_set.image_hw),
                grid_hw=list(self.grid_hw), embed_dim=self.embed_dim,
                steps_per_pass=self.steps_per_pass,
                bank_rows=self.bank_rows, method=c.model.method,
                backbone=c.backbone.name, layers=list(c.backbone.layers),
                num_passes=c.train.num_passes, seed=c.seed,
                fingerprint=fingerprint(self.requested or c),
                data=self.data_record, **self.augment_record(), **extra)

  def augment_record(self) -> dict:
    """What this category's training resolved: with train.augment='auto'
    {'augment': what it chose ('flips', one flip alone or 'none'),
    'augment_why': the measurements}; with train.neighbour_mix_when='flips'
    {'neighbour_mix': the mix it trained with (0: none, no flips)}."""
    given = self.requested
    if given is None:
      return {}
    out = {}
    if given.train.augment == 'auto':
      out.update(augment=self.config.train.augment,
                 augment_why=self.augment_why)
    if neighbour_mix.gated(given.train):
      out['neighbour_mix'] = float(self.config.train.neighbour_mix)
    return out

  def _data_digest(self, kind: str) -> str:
    """CRC of the `data.image_ids` (of `kind`) of the training, held-out and
    validation images."""
    val = ([] if self.val_set is None else
           data.image_ids(self.val_set, range(len(self.val_set)), kind))
    ids = [data.image_ids(self.train_set, self.train_idx, kind),
           data.image_ids(self.train_set, self.holdout_idx, kind), val]
    return hex(zlib.crc32(json.dumps(ids).encode()))

  @functools.cached_property
  def data_record(self) -> dict:
    """Which images this run trains on and sets its threshold on: their
    numbers and a digest of their names and contents, stored with every
    checkpoint (`data_change` compares them)."""
    return dict(n_train=len(self.train_idx), n_holdout=len(self.holdout_idx),
                n_validation=0 if self.val_set is None else len(self.val_set),
                ids='crc32', digest=self._data_digest('crc32'))

  def data_change(self, meta: dict) -> Optional[str]:
    """None if the checkpoint with metadata `meta` was trained on the images
    the data gives now (or predates the record); else what differs, one
    clause naming the checkpoint folder."""
    then, now = meta.get('data'), self.data_record
    if then is None:
      return None
    # Records written before the contents were digested name files by size.
    kind = then.get('ids', 'size')
    digest = now['digest'] if kind == now['ids'] else self._data_digest(kind)
    if then['digest'] == digest:
      return None
    if all(then[k] == now[k] for k in ('n_train', 'n_holdout',
                                       'n_validation')):
      what = (f'as many images as then ({_counts(now)}), but other files or '
              'edited ones')
    else:
      what = f'{_counts(then)} then, {_counts(now)} now'
    return (f'{self.checkpoint_dir} was trained on other images than '
            f'config.dataset gives now ({what})')

  def warn_if_data_changed(self, meta: dict) -> None:
    """A finished model is kept when its images changed since: say so."""
    change = self.data_change(meta)
    if change:
      logging.warning(
          '%s; the trained model is kept and evaluated as it is%s (to train '
          'on the current images, use another --workdir).', change,
          ', the kNN yardstick fitted on the current images'
          if self.runs_yardstick else '')

  def check_compatible(self, meta: dict) -> None:
    """A checkpoint of another config is the user's to resolve, not skipped."""
    if meta.get('fingerprint') != fingerprint(self.requested or self.config):
      raise UserError(
          f'{self.checkpoint_dir} was written with a different config '
          '(backbone, model, optim, seed, batch size or number of passes); use '
          'another --workdir or the same config')
    scoring.check_score_rule(self.config.eval, meta, self.checkpoint_dir)

  def restore_trained(self):
    """(state, meta) of the final checkpoint of a finished run (eval mode),
    replicated over the mesh."""
    _, state, meta = checkpoint.require_latest(
        self.checkpoint_dir, self.new_state(),
        check_meta=self.check_compatible)
    self.warn_if_data_changed(meta)
    if not finished(meta, self.config.train.num_passes):
      logging.warning('%s: the latest checkpoint is from pass %s of %d '
                      '(training did not finish); evaluating it anyway.',
                      self.category, meta['passes_done'],
                      self.config.train.num_passes)
    return parallel.put_replicated(state, self.mesh), meta

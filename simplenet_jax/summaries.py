"""TensorBoard event files of a category: <workdir>/<category>/tb/.

Per pass: train/loss, train/p_true, train/p_fake, train/lr_adaptor,
train/lr_discriminator; per evaluation: eval/image_auroc, eval/pixel_auroc,
eval/aupro (fractions) and a few heat maps (the same test images at every
evaluation, so the slider shows them change). `tensorboard --logdir <workdir>`
shows every category as a run.

Written with tensorboardX (pure Python over protobuf; no TensorFlow, no
TensorBoard needed to write). The writer is opened on first use, so a run
that logs nothing leaves no folder.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import numpy as np

# Per pass; the synthesis switches add 'focal', 'p_las' and 'radius'.
PASS_SCALARS = ('loss', 'p_true', 'p_fake', 'lr_adaptor', 'lr_discriminator',
                'focal', 'p_las', 'radius', 'pass_s')
EVAL_SCALARS = ('image_auroc', 'pixel_auroc', 'aupro')


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch: tensorboardX imports
  torch when it is installed (seconds, and nothing here needs it); torch is
  hidden for the import unless something imported it already."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter


class Writer:
  """Scalars and images of one category, written under `logdir` (None: a
  writer that writes nothing)."""

  def __init__(self, logdir: str | None):
    self.logdir = logdir
    self._writer = None

  @property
  def enabled(self) -> bool:
    return self.logdir is not None

  def _get(self):
    if self._writer is None:
      self._writer = _summary_writer_class()(self.logdir, flush_secs=30)
    return self._writer

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    """Each finite number in `values` as <prefix>/<key> at `step`."""
    if not self.enabled:
      return
    for key, value in values.items():
      if value is not None and math.isfinite(float(value)):
        self._get().add_scalar(f'{prefix}/{key}', float(value), int(step))

  def image(self, tag: str, step: int, pixels: np.ndarray) -> None:
    """An (H, W, 3) uint8 image."""
    if not self.enabled:
      return
    self._get().add_image(tag, np.asarray(pixels, np.uint8), int(step),
                          dataformats='HWC')

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_category(config, category_dir: str) -> Writer:
  """The category's writer (use it in a `with`); one that writes nothing when
  `report.tensorboard` is off, and on every process but the first of a
  multi-host run."""
  if not config.report.tensorboard or jax.process_index() != 0:
    return Writer(None)
  return Writer(os.path.join(category_dir, 'tb'))


def write_pass(writer: Writer | None, record: dict) -> None:
  """A log.jsonl pass record's training scalars."""
  if writer is not None:
    writer.scalars(record['pass'],
                   {k: record[k] for k in PASS_SCALARS if k in record},
                   'train')


def write_evaluation(writer: Writer | None, step: int, row: dict) -> None:
  if writer is not None:
    writer.scalars(step, {k: row.get(k) for k in EVAL_SCALARS}, 'eval')


def heatmap_indices(labels, n: int) -> np.ndarray:
  """n test images to follow over evaluations: spread over the anomalous
  ones, plus one normal image when n > 1 (what a false alarm looks like)."""
  labels = np.asarray(labels).astype(bool)
  anomalous = np.flatnonzero(labels)
  normal = np.flatnonzero(~labels)
  n_normal = min(1 if n > 1 else 0, normal.size)
  n_anom = min(n - n_normal, anomalous.size)
  n_normal = min(n - n_anom, normal.size)
  return np.sort(np.concatenate([_spread(anomalous, n_anom),
                                 _spread(normal, n_normal)]))


def _spread(indices: np.ndarray, k: int) -> np.ndarray:
  """k of `indices` (k <= their number), evenly spaced, first included."""
  if not k:
    return indices[:0]
  return indices[np.linspace(0, indices.size - 1, k).round().astype(np.int64)]

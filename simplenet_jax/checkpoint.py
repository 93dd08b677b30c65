"""Orbax checkpoints: save, restore the latest good one, resume.

A checkpoint holds a pytree of arrays (the train state as a nested dict) and a
small JSON metadata dict (pass counter, threshold, image geometry...). Orbax
writes each step into a temporary directory and renames it when complete, so
a checkpoint is never left half-written; if the latest one still fails to
load (a disk fault, a hand-edited file) we fall back to the previous one.
"""

import os
from typing import Any

from absl import logging
import flax.serialization
import jax
import orbax.checkpoint as ocp

from simplenet_jax.errors import UserError


def state_to_tree(state) -> dict:
  """TrainState -> nested dict of arrays (what is written to disk)."""
  return flax.serialization.to_state_dict(state)


def tree_to_state(template, tree):
  """Inverse of `state_to_tree`; `template` supplies the static fields (tx)."""
  return flax.serialization.from_state_dict(template, tree)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of one category under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'), options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves `state` (a TrainState) and `meta` (JSON-able) as `step`; blocks."""
    tree = jax.device_get(state_to_tree(state))
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict[str, Any]:
    out = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore_latest(self, template):
    """Returns (step, state, meta) of the newest loadable checkpoint, or None.

    Args:
      template: a TrainState of the right structure (e.g. a freshly created
        one); its arrays give shapes/dtypes and its static fields are kept.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            jax.device_get(state_to_tree(template)))
    for step in reversed(self.steps()):
      try:
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                meta=ocp.args.JsonRestore()))
        return step, tree_to_state(template, out['state']), dict(out['meta'])
      except Exception as e:  # pylint: disable=broad-except
        # Any failure here means this step is unusable; an older one may be fine.
        logging.warning('Checkpoint %s/%d could not be loaded (%s: %s); '
                        'falling back to the previous one.', self.directory,
                        step, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def close(self) -> None:
    self._manager.close()


def require_latest(directory: str, template):
  """Like `restore_latest`, but a missing checkpoint is a UserError."""
  if not os.path.isdir(directory):
    raise UserError(f'no checkpoint in {directory}: run with --mode=train and the '
                    'same --workdir first')
  ckpt = Checkpointer(directory)
  try:
    restored = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'no loadable checkpoint in {directory}: run with '
                    '--mode=train and the same --workdir first')
  return restored

"""Orbax checkpoints: save, restore the latest good one, resume.

A checkpoint holds a pytree of arrays (the train state as a nested dict) and a
small JSON metadata dict (pass counter, threshold, image geometry...). Orbax
writes each step into a temporary directory and renames it when complete, so
a checkpoint is never left half-written (a save killed midway leaves only a
`<step>.orbax-checkpoint-tmp-*` folder, which is ignored and cleaned up by the
next writer). The metadata also carries a CRC-32 of the state's bytes: a
checkpoint whose files were damaged afterwards (a disk fault, a hand-edited
file) fails that check or fails to load, and we fall back to the previous one.

Nothing here unpickles: orbax stores arrays with tensorstore (OCDBT) and
metadata as JSON.
"""

import asyncio
import contextlib
import os
import sys
import time
from typing import Any, Callable, Optional
import zlib

from absl import logging
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from simplenet_jax.errors import UserError

CRC_KEY = 'state_crc32'


def state_to_tree(state) -> dict:
  """TrainState -> nested dict of arrays (what is written to disk)."""
  return flax.serialization.to_state_dict(state)


def tree_to_state(template, tree):
  """Inverse of `state_to_tree`; `template` supplies the static fields (tx)."""
  return flax.serialization.from_state_dict(template, tree)


def tree_crc32(tree) -> int:
  """CRC-32 over every leaf's path, dtype, shape and bytes (host arrays)."""
  crc = 0
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    head = f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'
    crc = zlib.crc32(a.tobytes(), zlib.crc32(head.encode(), crc))
  return crc


def _drop_closed_loop_noise() -> None:
  """Silences one harmless artifact of a failed restore, for good.

  When reading a damaged checkpoint fails, tensorstore still completes the
  reads in flight and hands them to orbax's event loop, already closed:
  each prints an 'Event loop is closed' traceback (an unraisable exception)
  after our warning has said what happened. Only those are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_noise', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)
  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


# What asyncio reports about the reads a failed restore leaves behind.
_ORPHAN_MESSAGES = ('exception was never retrieved',
                    'was destroyed but it is pending')


def _orphan_read_handler(loop, context):
  """Exception handler of the event loops orbax runs our restores in.

  Orbax reads all arrays of a checkpoint with asyncio.gather in a fresh
  loop, which it closes as soon as the first read fails. The other reads of a
  damaged checkpoint fail too, but nothing awaits them any more: whenever the
  garbage collector frees one, asyncio reports 'Task (or Future) exception
  was never retrieved' with a full traceback through the 'asyncio' logger,
  at a moment that depends on thread timing and GC (about 2 in 100 restores
  of a damaged checkpoint). The first failure has already been raised to us
  and reported as one line (`_unloadable`), so these echoes go to the debug
  log; anything else the loop reports is handled as asyncio would.
  """
  message = str(context.get('message', ''))
  if any(m in message for m in _ORPHAN_MESSAGES):
    logging.debug('checkpoint restore: %s (%r)', message,
                  context.get('exception'))
    return
  loop.default_exception_handler(context)


class _RestoreLoopPolicy(asyncio.AbstractEventLoopPolicy):
  """The event loop policy in place, but new loops get our handler."""

  def __init__(self, inner):
    self._inner = inner

  def new_event_loop(self):
    loop = self._inner.new_event_loop()
    loop.set_exception_handler(_orphan_read_handler)
    return loop

  def get_event_loop(self):
    return self._inner.get_event_loop()

  def set_event_loop(self, loop):
    self._inner.set_event_loop(loop)

  def __getattr__(self, name):  # get/set_child_watcher and anything newer.
    return getattr(self._inner, name)


@contextlib.contextmanager
def _restoring():
  """Orbax restores inside: their event loops use `_orphan_read_handler`.

  A report comes from the Task or Future's own loop whenever it is freed, so
  the handler still applies after the restore has returned or raised. (The
  policy API is deprecated from Python 3.14 on; this project runs 3.11.)
  """
  inner = asyncio.get_event_loop_policy()
  if isinstance(inner, _RestoreLoopPolicy):  # Nested: already in place.
    yield
    return
  asyncio.set_event_loop_policy(_RestoreLoopPolicy(inner))
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(inner)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of one category under `directory`.

  Nothing is created on disk before the first `save`, so a run that fails
  before it has anything to save leaves no empty checkpoint folder behind.
  A writer (the training loop) also removes the temporary folders of saves
  that were killed midway; readers (eval, predict) change nothing on disk.
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               writer: bool = True):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._writer = writer
    self._manager = None
    if os.path.isdir(self.directory):
      self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, create=self._writer,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=self._writer)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'), options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps()) if self._manager else []

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves `state` (a TrainState) and `meta` (JSON-able) as `step`; blocks."""
    if not self._writer:
      raise ValueError('this Checkpointer was opened for reading')
    if self._manager is None:
      self._open()
    tree = jax.device_get(state_to_tree(state))
    meta = dict(meta, **{CRC_KEY: tree_crc32(tree)})
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict[str, Any]:
    with _restoring():
      out = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out['meta']
    if not isinstance(meta, dict):
      raise ValueError(f'metadata is a {type(meta).__name__}, not a dict')
    return dict(meta)

  def _restore_state(self, step: int, abstract, meta):
    with _restoring():
      out = self._manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    tree = jax.device_get(out['state'])
    if CRC_KEY in meta and tree_crc32(tree) != meta[CRC_KEY]:
      raise ValueError('the state does not match its CRC-32 (damaged files)')
    return tree

  def restore_latest(self, template,
                     check_meta: Optional[Callable[[dict], None]] = None,
                     discard_unloadable: bool = False):
    """Returns (step, state, meta) of the newest loadable checkpoint, or None.

    Args:
      template: a TrainState of the right structure (e.g. a freshly created
        one); its arrays give shapes/dtypes and its static fields are kept.
      check_meta: called with each checkpoint's metadata before its state is
        read; may raise UserError (e.g. a checkpoint of another config), which
        propagates: an incompatible checkpoint is the user's to resolve, not
        a damaged one to skip.
      discard_unloadable: move damaged checkpoints newer than the one
        returned out of the way (to `<directory>.unloadable/`), so that
        training can save those steps again. Only for writers.
    """
    _drop_closed_loop_noise()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            jax.device_get(state_to_tree(template)))
    for step in reversed(self.steps()):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._unloadable(step, e, discard_unloadable)
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        tree = self._restore_state(step, abstract, meta)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure here means this step is unusable; an older one may be fine.
        self._unloadable(step, e, discard_unloadable)
        continue
      meta.pop(CRC_KEY, None)
      return step, tree_to_state(template, tree), meta
    return None

  def _unloadable(self, step: int, error: Exception, discard: bool) -> None:
    reason = f'{type(error).__name__}: {str(error).splitlines()[0][:200]}' if (
        str(error)) else type(error).__name__
    where = os.path.join(self.directory, str(step))
    if not (discard and self._writer):
      logging.warning('Checkpoint %s could not be loaded (%s); falling back to '
                      'the previous one.', where, reason)
      return
    aside = os.path.join(self.directory + '.unloadable',
                         f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(where, aside)
    # Orbax caches the step list; reopen so that it forgets the moved step.
    self._manager.close()
    self._open()
    logging.warning('Checkpoint %s could not be loaded (%s); moved it to %s '
                    'and falling back to the previous one.', where, reason,
                    aside)

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()


def require_latest(directory: str, template,
                   check_meta: Optional[Callable[[dict], None]] = None):
  """Like `restore_latest`, but a missing checkpoint is a UserError."""
  if not os.path.isdir(directory):
    raise UserError(f'no checkpoint in {directory}: run with --mode=train and the '
                    'same --workdir first')
  ckpt = Checkpointer(directory, writer=False)
  try:
    restored = ckpt.restore_latest(template, check_meta=check_meta)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'no loadable checkpoint in {directory} (see the warnings '
                    'above: damaged files, or model.* keys that differ from '
                    'training\'s); use the training config, or train again')
  return restored


def latest_meta(directory: str) -> Optional[tuple[int, dict]]:
  """(step, meta) of the newest checkpoint whose metadata loads, or None."""
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, writer=False)
  try:
    for step in reversed(ckpt.steps()):
      try:
        return step, ckpt.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        ckpt._unloadable(step, e, discard=False)  # pylint: disable=protected-access
    return None
  finally:
    ckpt.close()

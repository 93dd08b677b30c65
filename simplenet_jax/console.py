"""What the terminal shows, and the log file that keeps the rest.

main.py calls `setup()`: from then on absl's INFO lines go to a log file
only (<workdir>/logs/simplenet.INFO, or --log_dir), opened by
`start_log_file` once the up-front checks have passed (nothing is written to
the workdir before); until then they wait in memory. Warnings and errors are
printed on stderr as one `warning: ...` line each (bold yellow on a
terminal), between the progress bars, and Python warnings (a metric that is
undefined) take the same path. absl's flags keep their meaning:
--alsologtostderr or --logtostderr print every line in absl's format as
before, --stderrthreshold lowers what absl itself prints, --verbosity sets
what is logged at all.

Without `setup()` (the library used in-process, tests) nothing changes:
absl prints to stderr as usual.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys
import warnings

from absl import flags
from absl import logging
import tqdm

PROGRAM = 'simplenet'
_MAX_PENDING = 20_000
_state = {'console': None, 'pending': None, 'log_path': None}


class LogFilter(logging_std.Filter):
  """Orbax logs every save at INFO: keep its warnings, drop the chatter. A
  data-layer warning (a skipped file) is shown once per run, although the
  file lists are read twice (`check_data`, then for training). The decision
  is kept on the record, so the console and the log file agree."""

  def __init__(self):
    super().__init__()
    self.seen = set()

  def filter(self, record):
    decided = getattr(record, '_simplenet_keep', None)
    if decided is None:
      decided = self._decide(record)
      record._simplenet_keep = decided  # pylint: disable=protected-access
    return decided

  def _decide(self, record):
    if '/orbax/' in record.pathname:
      return record.levelno >= logging_std.WARNING
    if (record.levelno == logging_std.WARNING and
        f'{os.sep}simplenet_jax{os.sep}data{os.sep}' in record.pathname):
      message = record.getMessage()
      if message in self.seen:
        return False
      self.seen.add(message)
    return True


LOG_FILTER = LogFilter()


def attach_filter() -> None:
  """Puts LOG_FILTER on absl's handler and the console's; a new run forgets
  the warnings an earlier one (in the same process) has shown."""
  for handler in (logging.get_absl_handler(), _state['console']):
    if handler is not None and LOG_FILTER not in handler.filters:
      handler.addFilter(LOG_FILTER)
  LOG_FILTER.seen.clear()


def _absl_stderr_level() -> int:
  """The lowest level absl itself prints on stderr (--stderrthreshold)."""
  if not flags.FLAGS.is_parsed():
    return logging_std.CRITICAL + 1
  return logging.converter.string_to_standard(flags.FLAGS.stderrthreshold)


def _color(stream) -> bool:
  return (hasattr(stream, 'isatty') and stream.isatty() and
          not os.environ.get('NO_COLOR'))


class ConsoleHandler(logging_std.Handler):
  """Warnings and errors as `warning: <message>`, printed through tqdm so a
  progress bar on the screen is redrawn below them."""

  _STYLE = {logging_std.WARNING: ('warning', '1;33'),
            logging_std.ERROR: ('error', '1;31')}

  def __init__(self):
    super().__init__(level=logging_std.WARNING)

  def emit(self, record):
    if record.levelno >= _absl_stderr_level():
      return  # absl prints it itself.
    try:
      word, code = self._STYLE[logging_std.ERROR if record.levelno >=
                               logging_std.ERROR else logging_std.WARNING]
      message = ' '.join(record.getMessage().split())
      stream = sys.stderr
      head = f'\033[{code}m{word}:\033[0m' if _color(stream) else f'{word}:'
      tqdm.tqdm.write(f'{head} {message}', file=stream)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _Pending(logging_std.Filter):
  """Holds what absl would write to the log file until the file is open."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if record.levelno >= _absl_stderr_level():
      return True
    if len(self.records) < _MAX_PENDING:
      self.records.append(record)
    return False


def _show_warning(message, category, filename, lineno, file=None, line=None):
  del filename, lineno, file, line  # The message names what is wrong.
  logging_std.getLogger('py.warnings').warning('%s: %s', category.__name__,
                                               message)


def setup() -> None:
  """main.py: INFO to the log file only, warnings as single lines."""
  if _state['console'] is not None:
    return
  f = flags.FLAGS
  if f.logtostderr or f.alsologtostderr:
    return  # The user asked for absl's own stderr output: keep it.
  absl_handler = logging.get_absl_handler()
  pending = _Pending()
  absl_handler.addFilter(pending)
  console = ConsoleHandler()
  logging_std.getLogger().addHandler(console)
  _state.update(console=console, pending=pending)
  warnings.showwarning = _show_warning


def start_log_file(workdir: str) -> str | None:
  """Opens the log file (after the checks passed) and writes what waited.

  Returns:
    The log file's stable name (a symlink to this run's file), or None when
    `setup` was not called or absl logs to stderr.
  """
  pending = _state['pending']
  if pending is None:
    return None
  log_dir = flags.FLAGS.log_dir or os.path.join(workdir, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  absl_handler = logging.get_absl_handler()
  absl_handler.start_logging_to_file(program_name=PROGRAM, log_dir=log_dir)
  absl_handler.removeFilter(pending)
  _state['pending'] = None
  for record in pending.records:
    absl_handler.handle(record)
  _state['log_path'] = os.path.join(log_dir, f'{PROGRAM}.INFO')
  return _state['log_path']


def log_path() -> str | None:
  return _state['log_path']


def note(message: str) -> None:
  """One line on stdout for something the user should know mid-run (not a
  warning), printed through tqdm so a progress bar is redrawn below it."""
  tqdm.tqdm.write(message, file=sys.stdout)


def progress(total: int, desc: str | None,
             enabled: bool = True) -> tqdm.tqdm:
  """A transient progress bar on a terminal (none when stderr is not one:
  redirected output keeps the summary lines, the log file the details; none
  either without a `desc` or when not `enabled`). Also a context manager
  that closes it."""
  return tqdm.tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                   disable=None if enabled and desc is not None else True)

"""The console's warning lines (main.py's console is tested through main.py
in test_report_html and test_main)."""

import io
import logging

from simplenet_jax import console


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _emit(handler, level, message):
  logger = logging.getLogger('test_console')
  logger.propagate = False
  logger.handlers = [handler]
  logger.setLevel(logging.DEBUG)
  logger.log(level, message)


def test_warnings_are_one_line_and_stand_out_on_a_terminal(monkeypatch):
  monkeypatch.delenv('NO_COLOR', raising=False)
  handler = console.ConsoleHandler()
  plain = io.StringIO()
  monkeypatch.setattr('sys.stderr', plain)
  _emit(handler, logging.WARNING, 'two\n  lines')
  _emit(handler, logging.INFO, 'not shown')
  _emit(handler, logging.ERROR, 'broken')
  assert plain.getvalue() == 'warning: two lines\nerror: broken\n'
  tty = _Terminal()
  monkeypatch.setattr('sys.stderr', tty)
  _emit(handler, logging.WARNING, 'look')
  assert tty.getvalue() == '\033[1;33mwarning:\033[0m look\n'
  monkeypatch.setenv('NO_COLOR', '1')
  tty.seek(0)
  tty.truncate()
  _emit(handler, logging.WARNING, 'look')
  assert tty.getvalue() == 'warning: look\n'


def test_log_filter_decides_once_per_record():
  f = console.LogFilter()
  path = '/x/simplenet_jax/data/images.py'
  first = logging.LogRecord('x', logging.WARNING, path, 1, 'skip a', None, None)
  again = logging.LogRecord('x', logging.WARNING, path, 1, 'skip a', None, None)
  # The same record through two handlers: shown by both; a repeat by none.
  assert f.filter(first) and f.filter(first)
  assert not f.filter(again) and not f.filter(again)
  chatter = logging.LogRecord('x', logging.INFO, '/y/orbax/z.py', 1, 'saved',
                              None, None)
  assert not f.filter(chatter)

"""The console's warning lines (main.py's console is tested through main.py
in test_report_html and test_main)."""

import io
import os
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


def test_main_shows_a_progress_bar_for_every_long_stage_on_a_terminal(
    tmp_path, lite0_weights_dir, awkward_root, jax_cache_dir):
  """main.py on a (pseudo-)terminal: besides the passes, the stages that take
  minutes on a CPU at a few hundred images (the feature cache, the test set,
  the kNN yardstick's coreset) each draw a bar counting to the right total;
  redirected output (every other main.py test) has none. The yardstick
  takes training's feature cache and scores the test images in the head's
  own pass over them: no second bar for either."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import pty  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import termios  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  root, _ = awkward_root
  args = conftest.tiny_args(tmp_path / 'run', lite0_weights_dir, root,
                            passes=2, extra=['--config.eval.yardstick=True'])
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 160, 0, 0))
  proc = subprocess.Popen(
      [sys.executable, os.path.join(conftest.ROOT, 'main.py'), *args],
      cwd=conftest.ROOT, env=conftest.main_env(jax_cache_dir),
      stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
  os.close(follower)
  out = b''
  while True:
    try:
      chunk = os.read(leader, 65536)
    except OSError:  # The terminal closed with the process.
      break
    if not chunk:
      break
    out += chunk
  os.close(leader)
  assert proc.wait(timeout=600) == 0, out.decode(errors='replace')[-2000:]
  text = out.decode(errors='replace')
  # Each bar's drawn states 'desc:  NN%|...| n/total' (the last one drawn
  # may be short of the total: a bar is redrawn at most every 0.1 s and
  # cleared when its stage ends).
  drawn = {}
  for m in re.finditer(
      r'(brick [A-Za-z ]+?|brick pass \d+/\d+): +\d+%\|[^|]*\| (\d+)/(\d+)',
      text):
    drawn.setdefault(m.group(1), set()).add(int(m.group(3)))
  for desc in ('brick features', 'brick pass 2/2', 'brick test images',
               'brick kNN coreset'):
    assert desc in drawn, (desc, sorted(drawn))
    assert len(drawn[desc]) == 1, (desc, drawn[desc])
  assert 'brick kNN features' not in drawn, sorted(drawn)
  assert 'brick kNN test images' not in drawn, sorted(drawn)
  # The totals: the training images, the test images, the bank's rows.
  assert min(drawn['brick features']) > 1
  assert drawn['brick test images'] == {
      len(os.listdir(os.path.join(root, 'brick', 'test', 'good')))
      + len(os.listdir(os.path.join(root, 'brick', 'test', 'hole')))}
  assert drawn['brick kNN coreset'] == {knn_rows(tmp_path / 'run')}


def knn_rows(workdir):
  """Rows the yardstick's coreset kept, from the run's log file."""
  import re  # pylint: disable=g-import-not-at-top
  log = open(os.path.join(workdir, 'logs', 'simplenet.INFO')).read()
  return int(re.search(r'kNN yardstick \((\d+) bank rows\)', log).group(1))

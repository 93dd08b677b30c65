"""The command line's errors: one line `error: ...` and exit status 2.

Only main.py uses this module: a bad flag, an unloadable --config file or an
unknown --config.<key> override is reported before any work (and before jax
starts), naming the flag or the config file's line.
"""

import os
import re
import sys
import traceback

from absl import app
from absl import flags


def fail(message: str, status: int = 2):
  """Prints `error: <message>` as one line on stderr and exits."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  sys.exit(status)


def run_app(main):
  """absl's app.run, but a bad flag or --config is one line and status 2."""
  app.run(main, flags_parser=_parse_flags)


# --config.<group>.<name>=VALUE for a free-form group (configs/default.py
# FREE_FORM, e.g. dataset.test_dirs): absl's config overrides only set keys
# the config file has, so these leave the command line before absl parses it
# and `apply_free_form` sets them on the loaded config.
_FREE_FORM_ARGS = []


def _free_form_groups() -> tuple[str, ...]:
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:  # config_checks names the problem once the run starts.
    return ()
  return default.FREE_FORM


def split_free_form(argv):
  """(argv without free-form overrides, [(group, name, value), ...]).

  Both --config.<group>.<name>=VALUE and --config.<group>.<name> VALUE.
  """
  groups = _free_form_groups()
  keep, taken = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    m = re.fullmatch(r'--config\.(.+)\.([^.=]+)(?:=(.*))?', arg, re.S)
    if m and m.group(1) in groups and (m.group(3) is not None or
                                       i + 1 < len(argv)):
      value = m.group(3)
      if value is None:
        i += 1
        value = argv[i]
      taken.append((m.group(1), m.group(2), value))
    else:
      keep.append(arg)
    i += 1
  return keep, taken


def apply_free_form(config) -> None:
  """Sets the free-form overrides taken off the command line on `config`
  (later ones win, as for any flag)."""
  for group, name, value in _FREE_FORM_ARGS:
    node = config
    try:
      for part in group.split('.'):
        node = node[part]
    except KeyError:
      fail(f'--config.{group}.{name}: the config has no group {group} '
           '(start it from configs/default.py)')
    with node.unlocked():
      node[name] = value


def _parse_flags(argv):
  argv, taken = split_free_form(argv)
  _FREE_FORM_ARGS[:] = taken
  # config_flags reads its overrides from sys.argv too.
  sys.argv[:] = argv
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # Flag values, a config file that fails to load, unknown --config.<key>:
    # all user input, so one line (the traceback would point at absl).
    fail(flag_error_message(e, argv))


def _config_file(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':', 1)[0]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':', 1)[0]
  return ''


def _innermost_text(e: BaseException) -> str:
  # ml_collections wraps a KeyError('...\nDid you mean ...') in an
  # AttributeError; str() of those is the repr of the inner message.
  x = e
  while x.args and isinstance(x.args[0], BaseException):
    x = x.args[0]
  text = x.args[0] if len(x.args) == 1 and isinstance(x.args[0], str) else str(x)
  return text


def _one_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if any(l.startswith('Traceback') for l in lines):
    lines = lines[-1:]  # The exception line of an embedded traceback.
  return ' '.join(lines)


def flag_error_message(e: BaseException, argv) -> str:
  """One line for an exception raised while parsing the command line."""
  path = _config_file(argv)
  overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
  if path:
    target = os.path.abspath(path)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == target]
    text = _one_line(_innermost_text(e))
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(
        e.filename) == target:
      return (f'--config={path}: the config file failed at line {e.lineno}: '
              f'SyntaxError: {e.msg}')
    if frames:
      return (f'--config={path}: the config file failed at line '
              f'{frames[-1].lineno}: {type(e).__name__}: {text}')
    if 'Error whilst parsing config file' in str(e):
      # ml_collections re-raises with the traceback as text: find the line.
      lines = re.findall(r'File "([^"]+)", line (\d+)', str(e))
      lines = [n for f, n in lines if os.path.abspath(f) == target]
      where = f' at line {lines[-1]}' if lines else ''
      return f'--config={path}: the config file failed{where}: {text}'
    if "attribute 'get_config'" in str(e):
      return (f'--config={path}: the config file must define get_config() '
              'returning a ConfigDict')
    if isinstance(e, OSError) and 'config' in str(e).lower():
      return (f'--config={path}: cannot load the config file (no such file, '
              'or it does not define get_config())')
  if isinstance(e, flags.Error):
    return _one_line(str(e))  # absl names the flag: "flag --x=y: ...".
  if isinstance(e, (AttributeError, KeyError)) and overrides:
    text = _one_line(_innermost_text(e))
    named = [o for o in overrides
             if any(f"'{part}'" in text for part in o.split('.')[1:])]
    return (f"{', '.join(named or overrides)}: no such config key ({text}); "
            'configs/default.py lists every key')
  return f'could not parse the command line: {type(e).__name__}: {_one_line(e)}'

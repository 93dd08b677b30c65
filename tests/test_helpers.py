"""The test helpers themselves: a missing test dependency skips locally and
fails in CI (CI=true)."""

import os
import subprocess
import sys
import textwrap

import pytest

import helpers

_ABSENT = 'simplenet_test_no_such_module_4711'

_PROBE = textwrap.dedent(f'''
  import helpers

  helpers.require({_ABSENT!r}, 'a module that never exists')

  def test_never_runs():
    assert False, 'ran without its dependency'
''')

_PROBE_IN_TEST = textwrap.dedent(f'''
  import helpers

  def test_needs_it():
    helpers.require({_ABSENT!r}, 'a module that never exists')
    assert False, 'ran without its dependency'

  def test_needs_a_file():
    helpers.missing('the reference file is absent')
    assert False, 'ran without its dependency'

  def test_has_it():
    assert helpers.require('json', 'the standard library').dumps(1) == '1'
''')


def _pytest(tmp_path, ci):
  """Runs pytest on both probes; returns (exit status, output)."""
  (tmp_path / 'test_probe_module.py').write_text(_PROBE)
  (tmp_path / 'test_probe_tests.py').write_text(_PROBE_IN_TEST)
  env = {k: v for k, v in os.environ.items() if k != 'CI'}
  if ci is not None:
    env['CI'] = ci
  env['PYTHONPATH'] = os.pathsep.join(
      [helpers.TESTS] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  proc = subprocess.run(
      [sys.executable, '-m', 'pytest', '-rs', '-p', 'no:cacheprovider',
       '--continue-on-collection-errors', str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize('ci', [None, 'false'])
def test_missing_dependency_skips_outside_ci(tmp_path, ci):
  status, out = _pytest(tmp_path, ci)
  assert status == 0, out
  assert '1 passed, 3 skipped' in out, out
  assert 'failed' not in out and 'error' not in out, out
  assert _ABSENT in out and 'the reference file is absent' in out, out


def test_missing_dependency_fails_in_ci(tmp_path):
  status, out = _pytest(tmp_path, 'true')
  assert status == 1, out
  # The module-level require is a collection error, the other two fail.
  assert '2 failed, 1 passed, 1 error' in out, out
  assert 'skipped' not in out, out
  assert 'ran without its dependency' not in out  # Stopped before the assert.
  assert out.count('test dependency missing in CI (CI=true)') >= 3, out
  assert _ABSENT in out, out


def test_require_returns_the_module():
  assert helpers.require('json', 'the standard library') is sys.modules['json']

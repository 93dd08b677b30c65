"""torchvision's Python modules as the tests' reference, without its __init__.

torchvision is installed with --no-deps beside the CPU torch wheel: its
compiled ops do not load against that torch, so `import torchvision` fails,
but the pure-Python model and transform definitions import fine once the
package's __init__ is bypassed.
"""

import importlib
import importlib.util
import sys
import types

import helpers


def torchvision_module(name: str):
  """torchvision.<name> (e.g. 'models.resnet', 'transforms'), or skip (fail
  in CI)."""
  helpers.require_torch()
  if sys.modules.get('torchvision') is None:
    spec = importlib.util.find_spec('torchvision')
    if spec is None:
      helpers.missing('torchvision is not installed (pip install --no-deps '
                      'torchvision, see README)')
    pkg = types.ModuleType('torchvision')
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec  # find_spec('torchvision') must keep working.
    sys.modules['torchvision'] = pkg
  return importlib.import_module(f'torchvision.{name}')

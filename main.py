r"""SimpleNet in JAX: train, evaluate, predict or export.

  python main.py --config configs/mvtec.py --workdir runs/mvtec \
      --config.dataset.root=/data/mvtec --config.dataset.categories=bottle,screw
  python main.py --config configs/mvtec.py --workdir runs/mvtec --mode eval
  python main.py --config configs/mvtec.py --workdir runs/mvtec --mode predict \
      --config.predict.inputs='photos/*.png' --config.predict.category=bottle
  python main.py --config configs/mvtec.py --workdir runs/mvtec --mode export \
      --config.dataset.categories=bottle

Bad input (a flag, a config key, a data or weights file) ends the run with one
line `error: ...` on stderr and exit status 2; see docs/bad_inputs.md.
The console shows progress bars (per pass and per long stage), a line per
category, warnings and the results table; absl's INFO lines go to
<workdir>/logs/simplenet.INFO (--alsologtostderr shows them too, --log_dir
puts them elsewhere). A run that is interrupted (Ctrl-C, a kill, a crash)
continues from its last checkpoint when the same command is run again.
"""

import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from simplenet_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'eval', 'predict', 'export'],
                          'train (then evaluate the final model), eval (a '
                          'saved checkpoint), predict (score new images), or '
                          'export (ONNX and jax.export files per trained '
                          'category, for simplenet_jax.serve).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; every option is a '
                       'flag (--name=value); see --helpshort')
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):  # Failed to load.
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    what = ('no such file' if not os.path.isfile(path.split(':')[0]) else
            'it must define get_config() returning a ConfigDict')
    cli.fail(f'--config={path}: cannot load the config file ({what})')
  cli.apply_free_form(config)  # E.g. --config.dataset.test_dirs.crack=DIR.
  # Imported here so that --help and flag errors do not pay for jax start-up.
  from simplenet_jax import console  # pylint: disable=g-import-not-at-top
  from simplenet_jax import experiment  # pylint: disable=g-import-not-at-top
  from simplenet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  # INFO lines to the log file, warnings as one line each (see console.py).
  console.setup()
  try:
    experiment.run(config, _WORKDIR.value, _MODE.value)
  except UserError as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    cli.fail('interrupted; run the same command again to continue '
                       'from the last checkpoint', status=130)
  except OSError as e:
    if not e.filename:
      raise
    # The file system refused (permissions, a full disk, a missing folder).
    cli.fail(f'{e.filename}: {e.strerror or e}')


if __name__ == '__main__':
  cli.run_app(main)

r"""SimpleNet in JAX: train, evaluate or predict.

  python main.py --config configs/mvtec.py --workdir runs/mvtec \
      --config.dataset.root=/data/mvtec --config.dataset.categories=bottle,screw
  python main.py --config configs/mvtec.py --workdir runs/mvtec --mode eval
  python main.py --config configs/mvtec.py --workdir runs/mvtec --mode predict \
      --config.predict.inputs='photos/*.png' --config.predict.category=bottle
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'],
                          'train (then evaluate the final model), eval (a '
                          'saved checkpoint), or predict (score new images).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not pay for jax start-up.
  from simplenet_jax import experiment  # pylint: disable=g-import-not-at-top
  from simplenet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from simplenet_jax.config_checks import run_app  # pylint: disable=g-import-not-at-top
  run_app(main)

"""Converts ImageNet weights from torch files into this project's msgpack files.

  python pretrained/convert.py --backbone wide_resnet50_2 --download
  python pretrained/convert.py --backbone wide_resnet50_2 --file /path/wide_resnet50_2-95faca4d.pth
  python pretrained/convert.py --backbone efficientnet_lite0

The .pth is read without torch and without running any code from it. Output:
<out-dir>/<backbone>.msgpack (default: this folder). See README.md here.
"""

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

# pylint: disable=g-import-not-at-top,wrong-import-position
from simplenet_jax import backbones
from simplenet_jax.backbones import weights
from simplenet_jax.errors import UserError

# torchvision's IMAGENET1K_V2 files: their features differ from the V1 ones
# SimpleNet was tuned on.
_V2_FILES = {
    'resnet50-11ad3fa6.pth': 'resnet50',
    'wide_resnet50_2-9ba9bcbe.pth': 'wide_resnet50_2',
}


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', required=True, choices=backbones.NAMES)
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--file', help='a torch state_dict (.pth) to convert')
  source.add_argument('--download', action='store_true',
                      help="fetch torchvision's IMAGENET1K_V1 file first")
  parser.add_argument('--out-dir', default=_HERE,
                      help='where <backbone>.msgpack goes (default: %(default)s)')
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse(argv)
  name = args.backbone
  spec = backbones.get_spec(name)
  if args.file:
    pth = args.file
    if os.path.basename(pth) in _V2_FILES:
      print(f'warning: {pth} is an IMAGENET1K_V2 file; SimpleNet expects the '
            f'V1 weights ({spec.weights_url})', file=sys.stderr)
  elif args.download:
    print(f'downloading {spec.weights_url} ...')
    pth = weights.download(name, args.out_dir)
  elif spec.pip_package:
    pth = weights.find_wheel_weights(name)
  else:
    raise UserError(f'--file: {name} needs a torch file: give --file '
                    f'/path/to/{spec.weights_url.rsplit("/", 1)[-1]} or '
                    f'--download (from {spec.weights_url})')
  out = weights.convert(name, pth, args.out_dir)
  print(f'{pth} -> {out}')
  return 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

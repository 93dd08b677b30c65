"""Throughput of the WRN50-2 feature extractor (up to layer3): JAX vs torch, CPU.

  python benchmarks/backbone_vs_torch.py [--batch 8] [--size 224] [--warmup 2] [--runs 5]

Prints images/s (median over the timed runs, after warm-up) of
  * torchvision's wide_resnet50_2 (eval, no_grad) through layer3,
  * this project's jitted Flax module through layer3, with XLA's default flags,
  * the same with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (YNNPACK
    fusions off); XLA reads its flags once, so each JAX variant runs in its
    own child process.
Random weights: speed does not depend on them. Not a test: nothing asserted.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type='


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  return parser.parse_args()


def _time(step, warmup, runs):
  """Median seconds of `step()` (which must block until done)."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _jax(args):
  """Runs in a child process: XLA_FLAGS is fixed before jax is imported."""
  sys.path.insert(0, _REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from simplenet_jax import backbones  # pylint: disable=g-import-not-at-top
  module = backbones.build('wide_resnet50_2', ('layer3',))
  variables = backbones.init_variables(module)
  images = jax.numpy.asarray(np.random.RandomState(0).rand(
      args.batch, args.size, args.size, 3).astype(np.float32))
  forward = jax.jit(module.apply)
  start = time.perf_counter()
  jax.block_until_ready(forward(variables, images))
  compile_s = time.perf_counter() - start
  seconds = _time(lambda: jax.block_until_ready(forward(variables, images)),
                  args.warmup, args.runs)
  return {'seconds': seconds, 'compile_s': compile_s,
          'backend': jax.default_backend(), 'jax': jax.__version__}


def _torch(args):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # torchvision is installed without its dependencies: skip its __init__.
  spec = importlib.util.find_spec('torchvision')
  pkg = types.ModuleType('torchvision')
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules.setdefault('torchvision', pkg)
  from torchvision.models import resnet  # pylint: disable=g-import-not-at-top
  model = resnet.wide_resnet50_2().eval()
  trunk = torch.nn.Sequential(model.conv1, model.bn1, model.relu,
                              model.maxpool, model.layer1, model.layer2,
                              model.layer3)
  x = torch.rand(args.batch, 3, args.size, args.size)
  def step():
    with torch.no_grad():
      trunk(x)
  seconds = _time(step, args.warmup, args.runs)
  return {'seconds': seconds, 'threads': torch.get_num_threads(),
          'torch': torch.__version__}


def _child(flags):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS', ''), flags) if f)
  argv = [sys.executable, os.path.abspath(__file__), '--child'] + [
      a for a in sys.argv[1:] if a != '--child']
  done = subprocess.run(argv, env=env, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    return {'error': done.stderr.strip().splitlines()[-1:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  args = _parse()
  if args.child:
    print(json.dumps(_jax(args)))
    return
  # One heavy process at a time: torch here, then each JAX variant.
  rows = [('torch (eval, no_grad)', _torch(args)),
          ('jax, default XLA_FLAGS', _child('')),
          (f'jax, XLA_FLAGS={_YNN_OFF}', _child(_YNN_OFF))]
  print(f'wide_resnet50_2 through layer3, batch {args.batch}, '
        f'{args.size}x{args.size}, CPU ({os.cpu_count()} cores), median of '
        f'{args.runs} runs after {args.warmup} warm-up')
  for label, result in rows:
    if 'error' in result:
      print(f'  {label:<56} failed: {result["error"]}')
      continue
    extra = ', '.join(f'{k} {v:.1f}' if isinstance(v, float) else f'{k} {v}'
                      for k, v in result.items() if k != 'seconds')
    print(f'  {label:<56} {args.batch / result["seconds"]:7.2f} images/s '
          f'({result["seconds"] * 1e3:.0f} ms/batch; {extra})')


if __name__ == '__main__':
  main()

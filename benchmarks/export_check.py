r"""An export's model.jaxexport on this machine's accelerator vs its model.onnx.

  python benchmarks/export_check.py --model runs/demo/brick/export \
      'runs/demo/demo_data/brick/test/*/*.png' [--json out.json]

`main.py --mode=export` lowers model.jaxexport for the CPU and CUDA; the
tests run it on a CPU only. This runs it where JAX's default device is (a
GPU on a lent machine) and model.onnx on ONNX Runtime's CPU provider, on
the same images preprocessed as `simplenet_jax.serve` does, and prints the
largest differences of the image scores and maps and each one's images/s
(median of 5 timed calls after a warm-up, the whole batch at once).
"""

import argparse
import glob
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from export_speed import throughput
from simplenet_jax import export
from simplenet_jax import serve


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help='an export folder')
  p.add_argument('images', nargs='+', help='image files or glob patterns')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  paths = sorted({f for g in args.images for f in glob.glob(g)})
  onnx_model = serve.Model(args.model)
  images = np.stack([serve.preprocess(f, onnx_model.meta) for f in paths])
  with open(os.path.join(args.model, export.JAX_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))

  def run_jax(x):
    return jax.block_until_ready(exported.call(x))

  scores_j, maps_j = (np.asarray(a) for a in run_jax(images))
  scores_o, maps_o = onnx_model(images)
  out = {
      'device': str(jax.devices()[0]), 'platforms': exported.platforms,
      'images': len(paths),
      'max_abs_score_diff': float(np.abs(scores_j - scores_o).max()),
      'score_range': float(np.ptp(scores_o)),
      'max_abs_map_diff': float(np.abs(maps_j - maps_o).max()),
      'map_range': float(np.ptp(maps_o)),
      'same_ranking': bool((np.argsort(scores_j) == np.argsort(scores_o)
                            ).all()),
      'jaxexport_img_s': throughput(run_jax, images, runs=5),
      'onnxruntime_cpu_img_s': throughput(onnx_model, images, runs=5),
  }
  print(json.dumps(out, indent=1))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()

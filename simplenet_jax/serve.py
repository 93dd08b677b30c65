r"""Scores images with an exported model; needs numpy, pillow, onnxruntime.

  python -m simplenet_jax.serve --model runs/mvtec/bottle/export \
      predict 'photos/*.png' more/ one.jpg [--heatmaps out/] [--batch-size 8]
      [--backend onnxruntime|openvino] [--threads N]

Prints one JSON line per image, as `main.py --mode=predict` does: path,
category, score, threshold, anomalous (score > threshold), and heatmap (the
PNG written, with --heatmaps). The folder is what `main.py --mode=export`
wrote: model.onnx, metadata.json (and model.jaxexport, not used here).

This module imports nothing from JAX, Flax or the rest of this package (a
test runs it where importing those fails): it can be copied on its own next
to an export folder, `pip install -r requirements-serve.txt`, then
`python serve.py --model DIR predict ...`. OpenVINO (`pip install openvino`)
is an optional second backend for the same model.onnx.

The preprocessing repeats the training pipeline's (simplenet_jax/data/
images.py: EXIF orientation, 8-bit RGB, the resize/crop rule from
metadata.json) and the heat maps repeat visualize.heatmap_png; tests check
both give identical pixels.

Bad input: a model folder that is missing, damaged or inconsistent ends the
run with one line `error: ...` naming the file, status 2, before any image is
read. An image that cannot be read gets its own `error: <path>: ...` line on
stderr; the other images are still scored and the status is 1.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import unicodedata

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

FORMAT = 'simplenet-jax-export'
FORMAT_VERSION = 1
ONNX_FILE = 'model.onnx'
META_FILE = 'metadata.json'
BACKENDS = ('onnxruntime', 'openvino')
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.tif', '.tiff')
_16BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


class ServeError(Exception):
  """Bad input: its message names the file and says what to do."""


# ---- images: the training pipeline's decoding and geometry --------------------


def load_rgb(path: str) -> Image.Image:
  """An image file as 8-bit RGB: EXIF orientation applied, alpha dropped
  (PIL's convert('RGB')), 16-bit grey scaled by round(v / 257)."""
  if not os.path.isfile(path):
    raise ServeError(f'{path}: image file not found')
  try:
    with Image.open(path) as im:
      im.load()  # Decode now: a truncated file fails here.
      im = ImageOps.exif_transpose(im)
  except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, ...
    raise ServeError(f'{path}: cannot read this image file '
                     f'({type(e).__name__}: {e}); replace it or delete it') from e
  if im.mode == 'RGB':
    return im
  if im.mode in _16BIT_MODES:
    a = np.asarray(im).astype(np.float64)
    gray = np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(gray).convert('RGB')
  if im.mode == 'F':
    raise ServeError(f'{path}: 32-bit float images are not supported; save it '
                     'as an 8- or 16-bit PNG')
  try:
    return im.convert('RGB')
  except Exception as e:
    raise ServeError(f'{path}: cannot convert image mode {im.mode} to RGB '
                     f'({e}); save it as an RGB PNG') from e


def apply_geometry(im: Image.Image, geometry: dict) -> Image.Image:
  """metadata.json's preprocess.geometry: square resize, or shorter side to
  `shorter` (torchvision's Resize(int)) then an optional center crop."""
  square, shorter, crop = (int(geometry.get(k) or 0) for k in
                           ('square', 'shorter', 'crop'))
  h, w = im.height, im.width
  if square:
    nh, nw = square, square
  elif w <= h:
    nh, nw = int(shorter * h / w), shorter
  else:
    nh, nw = shorter, int(shorter * w / h)
  if (nh, nw) != (h, w):
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
  if crop:
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    im = im.crop((left, top, left + crop, top + crop))
  return im


def preprocess(path: str, meta: dict) -> np.ndarray:
  """(H, W, 3) uint8 at the model's image_size."""
  im = apply_geometry(load_rgb(path), meta['preprocess']['geometry'])
  h, w = meta['image_size']
  if (im.height, im.width) != (h, w):
    # Without a crop another aspect ratio gives another size: match training.
    im = im.resize((w, h), Image.Resampling.BILINEAR)
  return np.asarray(im, np.uint8)


def expand_inputs(specs) -> tuple[list[str], list[str]]:
  """Files, folders (their images) and globs -> (image paths, warnings)."""
  paths, warnings = [], []

  def is_image(p):
    return os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS

  for spec in specs:
    if os.path.isdir(spec):
      for name in sorted(os.listdir(spec)):
        p = os.path.join(spec, name)
        if os.path.isfile(p) and is_image(p) and not name.startswith('.'):
          paths.append(p)
        else:
          warnings.append(f'skipping {p}: not an image file')
    elif os.path.isfile(spec):
      paths.append(spec)  # Named explicitly: tried whatever its extension.
    else:
      matched = [p for p in sorted(glob.glob(spec, recursive=True))
                 if os.path.isfile(p)]
      if not matched:
        warnings.append(f'{spec}: no such file, folder or matching file')
      for p in matched:
        if is_image(p):
          paths.append(p)
        else:
          warnings.append(f'skipping {p}: not an image file')
  return paths, warnings


# ---- heat maps: visualize.heatmap_png with numpy and PIL ----------------------


def _jet_lut() -> np.ndarray:
  v = np.linspace(0.0, 1.0, 256)[:, None]
  rgb = np.clip(1.5 - np.abs(4.0 * (v - np.array([[0.75, 0.5, 0.25]]))),
                0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)


_LUT = _jet_lut()


def heatmap_panels(image: np.ndarray, amap: np.ndarray, vmin: float,
                   vmax: float, alpha: float = 0.5) -> np.ndarray:
  """(H, 2W, 3) uint8: the image | the heat map blended over it."""
  a = np.asarray(amap, np.float64)
  if not vmax > vmin:
    idx = np.zeros(a.shape, np.intp)
  else:
    t = np.nan_to_num((a - vmin) / (vmax - vmin), nan=0.0)
    idx = np.round(np.clip(t, 0.0, 1.0) * 255).astype(np.intp)
  blend = np.round((1.0 - alpha) * image + alpha * _LUT[idx]).astype(np.uint8)
  return np.concatenate([image, blend], axis=1)


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font.
    return ImageFont.load_default()


def heatmap_image(image, amap, vmin, vmax, caption: str) -> Image.Image:
  """visualize.heatmap_png's picture: the panels enlarged by a whole factor
  (longer side near 256 px, pixel for pixel) under a caption strip."""
  scale = max(1, round(256 / max(image.shape[:2])))
  panels = heatmap_panels(image, amap, vmin, vmax)
  if scale > 1:
    panels = np.repeat(np.repeat(panels, scale, axis=0), scale, axis=1)
  size = 11 if scale == 1 else 14
  h, w = panels.shape[:2]
  img = Image.new('RGB', (w, h + size + 5), (0, 0, 0))
  img.paste(Image.fromarray(panels), (0, size + 5))
  safe = caption.encode('ascii', errors='replace').decode('ascii')
  ImageDraw.Draw(img).text((3, 2), safe, fill=(255, 255, 255),
                           font=_font(size))
  return img


def safe_filename(name: str, max_bytes: int = 150) -> str:
  s = unicodedata.normalize('NFC', str(name))
  s = re.sub(r'[^\w.\-]+', '_', s).strip('._') or 'image'
  return s.encode('utf-8')[:max_bytes].decode('utf-8', errors='ignore')


def _save_png(img: Image.Image, path: str) -> None:
  """Complete or absent: a temporary file, then a rename."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix='.png')
  try:
    with os.fdopen(fd, 'wb') as f:
      img.save(f, format='PNG')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---- the model -----------------------------------------------------------------


def sha256(path: str) -> str:
  """The file's SHA-256, hex (metadata.json's 'files'; export writes them)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def read_metadata(folder: str) -> dict:
  """metadata.json of an export folder, checked; ServeError otherwise."""
  if not os.path.isdir(folder):
    raise ServeError(f'{folder}: no such folder; --model takes the folder '
                     'that main.py --mode=export wrote '
                     '(<workdir>/<category>/export)')
  path = os.path.join(folder, META_FILE)
  if not os.path.isfile(path):
    raise ServeError(f'{folder}: no {META_FILE}, so not an export folder; '
                     'give <workdir>/<category>/export, or run main.py '
                     '--mode=export first')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ServeError(f'{path}: cannot be read ({type(e).__name__}: {e}); '
                     'export again') from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise ServeError(f'{path}: not the metadata of a simplenet-jax export; '
                     'export again')
  if meta.get('format_version') != FORMAT_VERSION:
    raise ServeError(f'{path}: export format version '
                     f'{meta.get("format_version")!r}, this runtime reads '
                     f'{FORMAT_VERSION}; use the matching serve.py or export '
                     'again')
  try:
    h, w = (int(v) for v in meta['image_size'])
    float(meta['threshold'])
    meta['preprocess']['geometry'].items()
    meta['files'][ONNX_FILE]['sha256'].lower()
    meta['input']['name'].lower()
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ServeError(f'{path}: incomplete or malformed ({type(e).__name__}: '
                     f'{e}); export again') from e
  meta['image_size'] = [h, w]
  return meta


class Model:
  """model.onnx of an export folder on ONNX Runtime or OpenVINO."""

  def __init__(self, folder: str, backend: str = 'onnxruntime',
               threads: int = 0):
    self.meta = read_metadata(folder)
    path = os.path.join(folder, ONNX_FILE)
    if not os.path.isfile(path):
      raise ServeError(f'{path}: missing; export again (main.py --mode=export)')
    if sha256(path) != self.meta['files'][ONNX_FILE]['sha256']:
      raise ServeError(
          f'{path} does not match {os.path.join(folder, META_FILE)} (its '
          'sha256 differs: the file is damaged or truncated, or the metadata '
          'belongs to another export); export again')
    self.path = path
    self.backend = backend
    if backend == 'onnxruntime':
      self._load_onnxruntime(threads)
    elif backend == 'openvino':
      self._load_openvino(threads)
    else:
      raise ServeError(f'--backend={backend}: choose one of '
                       f'{", ".join(BACKENDS)}')
    self._check_signature(folder)

  def _load_onnxruntime(self, threads):
    try:
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ServeError('onnxruntime is not installed: pip install -r '
                       'requirements-serve.txt') from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # Errors only.
    if threads:
      options.intra_op_num_threads = threads
    try:
      self._session = ort.InferenceSession(
          self.path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # pylint: disable=broad-except
      raise ServeError(f'{self.path}: ONNX Runtime cannot load it '
                       f'({_first_line(e)}); export again') from e
    self._inputs = [(i.name, i.type, i.shape)
                    for i in self._session.get_inputs()]
    self._outputs = [o.name for o in self._session.get_outputs()]

  def _load_openvino(self, threads):
    try:
      import openvino as ov  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ServeError('--backend=openvino: openvino is not installed '
                       '(pip install openvino)') from e
    core = ov.Core()
    # f32 everywhere: on CPUs with bf16 units OpenVINO would otherwise
    # compute in bf16 and scores would drift from the exported model's.
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    if threads:
      config['INFERENCE_NUM_THREADS'] = str(threads)
    try:
      model = core.read_model(self.path)
      self._compiled = core.compile_model(model, 'CPU', config)
    except Exception as e:  # pylint: disable=broad-except
      raise ServeError(f'{self.path}: OpenVINO cannot load it '
                       f'({_first_line(e)}); export again') from e
    self._inputs = []
    for port in self._compiled.inputs:
      shape = [d.get_length() if d.is_static else None
               for d in port.get_partial_shape()]
      names = port.get_names()
      name = self.meta['input']['name']
      self._inputs.append((name if name in names else port.get_any_name(),
                           f'tensor({port.get_element_type().get_type_name()})',
                           shape))
    # A tensor may carry several names; the metadata's are among them.
    self._outputs, self._ports = [], []
    for port in self._compiled.outputs:
      names = port.get_names()
      wanted = [n for n in self.meta.get('outputs', {}) if n in names]
      self._outputs.append(wanted[0] if wanted else port.get_any_name())
      self._ports.append(port)

  def _check_signature(self, folder):
    m = self.meta
    h, w = m['image_size']
    want_out = list(m.get('outputs', {'scores': 0, 'maps': 0}))
    problem = None
    if len(self._inputs) != 1:
      problem = f'{len(self._inputs)} inputs'
    else:
      name, dtype, shape = self._inputs[0]
      dims = [d if isinstance(d, int) else None for d in shape]
      if name != m['input']['name']:
        problem = f'input {name!r}, metadata says {m["input"]["name"]!r}'
      elif 'uint8' not in str(dtype) and 'u8' not in str(dtype):
        problem = f'input type {dtype}, not uint8'
      elif dims[1:] != [h, w, 3]:
        problem = (f'input shape {shape}, metadata says image_size '
                   f'{h}x{w} (N, {h}, {w}, 3)')
    if problem is None and self._outputs[:2] != want_out[:2]:
      problem = f'outputs {self._outputs}, metadata says {want_out}'
    if problem:
      raise ServeError(f'{os.path.join(folder, META_FILE)} does not match '
                       f'{self.path} ({problem}); export again')

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> scores (N,), maps (N, H, W) float32."""
    name = self._inputs[0][0]
    if self.backend == 'onnxruntime':
      scores, maps = self._session.run(self._outputs[:2], {name: images})
    else:
      out = self._compiled({name: images})
      scores, maps = (out[p] for p in self._ports[:2])
    return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:300]}' if text else type(e).__name__


# ---- the command line ------------------------------------------------------------


def _error(message: str) -> None:
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr,
        flush=True)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    _error(f'{message} (see python -m simplenet_jax.serve --help)')
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m simplenet_jax.serve',
              description='Score images with a model exported by main.py '
                          '--mode=export (numpy, pillow, onnxruntime only).')
  p.add_argument('--model', required=True,
                 help='the export folder (<workdir>/<category>/export)')
  p.add_argument('--backend', choices=BACKENDS, default='onnxruntime')
  p.add_argument('--threads', type=int, default=0,
                 help='CPU threads for the backend (0: its default)')
  sub = p.add_subparsers(dest='command', required=True)
  pr = sub.add_parser('predict', help='score images, one JSON line each')
  pr.add_argument('inputs', nargs='+',
                  help='image files, folders or quoted globs')
  pr.add_argument('--heatmaps', default='',
                  help='write a heat-map PNG per image into this folder')
  pr.add_argument('--batch-size', type=int, default=8)
  return p


def predict(model: Model, specs, heatmaps: str = '', batch_size: int = 8,
            out=sys.stdout) -> tuple[list[dict], list[str]]:
  """Scores the images of `specs`; prints and returns one record per image
  scored, and the error lines of those that could not be read."""
  meta = model.meta
  paths, warnings = expand_inputs(specs)
  for w in warnings:
    print(f'warning: {w}', file=sys.stderr)
  if not paths:
    raise ServeError(f'no image files in {" ".join(specs)}')
  paths = [os.path.abspath(p) for p in paths]
  common = os.path.commonpath([os.path.dirname(p) for p in paths])
  threshold = float(meta['threshold'])
  vmin, vmax = meta.get('map_range') or (None, None)
  records, errors = [], []

  def flush(batch):
    scores, maps = model(np.stack([im for _, im in batch]))
    for (path, image), score, amap in zip(batch, scores, maps):
      record = {'path': path, 'category': meta.get('category', ''),
                'score': float(score), 'threshold': threshold,
                'anomalous': bool(score > threshold)}
      if heatmaps:
        name = safe_filename(os.path.relpath(path, common).replace(os.sep,
                                                                   '_'))
        png = os.path.join(heatmaps, os.path.splitext(name)[0] + '.png')
        lo = float(amap.min()) if vmin is None else float(vmin)
        hi = float(amap.max()) if vmax is None else float(vmax)
        _save_png(heatmap_image(image, amap, lo, hi,
                                f'score {score:.4f} thr {threshold:.4f}'), png)
        record['heatmap'] = png
      print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
      records.append(record)

  batch = []
  for path in paths:
    try:
      batch.append((path, preprocess(path, meta)))
    except ServeError as e:
      errors.append(str(e))
      _error(str(e))
      continue
    if len(batch) == max(1, batch_size):
      flush(batch)
      batch = []
  if batch:
    flush(batch)
  return records, errors


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.threads < 0 or getattr(args, 'batch_size', 1) < 1:
      raise ServeError('--threads must be >= 0 and --batch-size >= 1')
    model = Model(args.model, args.backend, args.threads)
    _, errors = predict(model, args.inputs, args.heatmaps, args.batch_size)
  except ServeError as e:
    _error(str(e))
    return 2
  except KeyboardInterrupt:
    _error('interrupted')
    return 130
  except OSError as e:
    if not e.filename:
      raise
    _error(f'{e.filename}: {e.strerror or e}')
    return 2
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())

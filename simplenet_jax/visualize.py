"""The paper's figures, drawn with PIL: heat-map overlays and the std histogram.

Figure 1 style: the image beside the anomaly map as a jet-like heat map
blended over it, with the ground-truth outline in white (a colour the blend
never produces). Figure 3 style: histograms of the per-dimension standard
deviation of local and adapted features, a training diagnostic.
All PNGs are written atomically (temporary file, then os.replace).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

OUTLINE_COLOR = (255, 255, 255)


def jet_lut() -> np.ndarray:
  """(256, 3) uint8 jet-like colormap: blue -> cyan -> yellow -> red."""
  v = np.linspace(0.0, 1.0, 256)[:, None]
  centres = np.array([[0.75, 0.5, 0.25]])  # Where r, g, b peak.
  rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)


_LUT = jet_lut()


def colorize(anomaly_map, vmin: float, vmax: float) -> np.ndarray:
  """(H, W) float -> (H, W, 3) uint8 heat map; values clipped to [vmin, vmax]."""
  a = np.asarray(anomaly_map, np.float64)
  if not vmax > vmin:  # A constant map (or range): the coldest colour.
    idx = np.zeros(a.shape, np.intp)
  else:
    t = np.nan_to_num((a - vmin) / (vmax - vmin), nan=0.0)
    idx = np.round(np.clip(t, 0.0, 1.0) * 255).astype(np.intp)
  return _LUT[idx]


def outline(mask, width: int = 1) -> np.ndarray:
  """(H, W) bool: mask pixels within `width` pixels of the mask boundary."""
  m = np.asarray(mask) != 0
  if not m.any():
    return m
  # border_value=0: a region touching the image edge is outlined there too.
  return m & ~ndimage.binary_erosion(m, iterations=width, border_value=0)


def _as_rgb(image) -> np.ndarray:
  img = np.asarray(image)
  if img.ndim == 2:
    img = np.stack([img] * 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f'overlay: image must be (H, W, 3) uint8, got shape '
                     f'{img.shape}.')
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  if img.dtype != np.uint8:
    raise ValueError(f'overlay: image must be uint8, got {img.dtype}.')
  return img


def overlay(image, anomaly_map, mask=None, vmin: float = 0.0,
            vmax: float = 1.0, alpha: float = 0.5,
            outline_width: int = 1) -> np.ndarray:
  """Side-by-side panels: the image | the heat map blended over it.

  Args:
    image: (H, W, 3) uint8 (or (H, W) grey).
    anomaly_map: (H, W) float scores.
    mask: (H, W) ground truth (nonzero = anomalous) or None; its outline is
      drawn on the heat-map panel in OUTLINE_COLOR.
    vmin, vmax: the scores mapped to the coldest / hottest colour; keep them
      fixed across a category so panels are comparable.
    alpha: weight of the heat map in the blend.

  Returns:
    (H, 2 * W, 3) uint8.
  """
  img = _as_rgb(image)
  amap = np.asarray(anomaly_map)
  if amap.shape != img.shape[:2]:
    raise ValueError(f'overlay: anomaly map {amap.shape} does not match image '
                     f'{img.shape[:2]}.')
  heat = colorize(amap, vmin, vmax)
  blend = np.round((1.0 - alpha) * img + alpha * heat).astype(np.uint8)
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != amap.shape:
      raise ValueError(f'overlay: mask {mask.shape} does not match image '
                       f'{amap.shape}.')
    blend[outline(mask, outline_width)] = OUTLINE_COLOR
  return np.concatenate([img, blend], axis=1)


def _atomic_save(img: Image.Image, path: str) -> str:
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
  return path


def safe_filename(name: str, max_bytes: int = 150) -> str:
  """A file-name stem from an image name: keeps letters (any script), digits,
  '-', '_' and '.'; path separators, spaces and the rest become '_'."""
  s = unicodedata.normalize('NFC', str(name))
  s = re.sub(r'[^\w.\-]+', '_', s).strip('._') or 'image'
  b = s.encode('utf-8')[:max_bytes]
  return b.decode('utf-8', errors='ignore')  # Never cut a character in half.


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font.
    return ImageFont.load_default()


def _caption(panels: np.ndarray, text: str) -> Image.Image:
  """Panels with a black strip above holding `text`."""
  h, w = panels.shape[:2]
  strip = 16
  img = Image.new('RGB', (w, h + strip), (0, 0, 0))
  img.paste(Image.fromarray(panels), (0, strip))
  # The default font may lack glyphs outside ASCII; the file name keeps them.
  safe = text.encode('ascii', errors='replace').decode('ascii')
  ImageDraw.Draw(img).text((3, 2), safe, fill=(255, 255, 255), font=_font())
  return img


def save_overlays(out_dir: str, images, maps, masks, names, scores=None,
                  vmin: float | None = None, vmax: float | None = None,
                  alpha: float = 0.5, caption: bool = True) -> list[str]:
  """Writes one overlay PNG per image into `out_dir`.

  Args:
    out_dir: the directory for this category's figures (the caller gives a
      per-category directory so categories never overwrite each other).
    images: (N, H, W, 3) uint8 or a sequence of such images.
    maps: (N, H, W) anomaly maps.
    masks: (N, H, W), a sequence with None for images without a mask, or None.
    names: N image names (e.g. 'crack/000'); file names derive from them,
      made safe (separators, spaces -> '_'); clashes get a numeric suffix.
    scores: N image scores for the caption, or None.
    vmin, vmax: heat-map limits; None = min / max over the given maps.

  Returns:
    The N paths written, in input order.
  """
  n = len(names)
  if len(images) != n or len(maps) != n:
    raise ValueError(f'save_overlays: {n} names, {len(images)} images, '
                     f'{len(maps)} maps.')
  if masks is not None and len(masks) != n:
    raise ValueError(f'save_overlays: {n} names but {len(masks)} masks.')
  if scores is not None and len(scores) != n:
    raise ValueError(f'save_overlays: {n} names but {len(scores)} scores.')
  if vmin is None or vmax is None:
    finite = [m[np.isfinite(m)] for m in map(np.asarray, maps)]
    finite = [f for f in finite if f.size]
    lo = min((float(f.min()) for f in finite), default=0.0)
    hi = max((float(f.max()) for f in finite), default=1.0)
    vmin = lo if vmin is None else vmin
    vmax = hi if vmax is None else vmax
  paths, used = [], set()
  for i in range(n):
    stem = safe_filename(names[i])
    fname, k = stem, 1
    while fname.lower() in used:  # Case-insensitive file systems too.
      fname, k = f'{stem}_{k}', k + 1
    used.add(fname.lower())
    mask = None if masks is None else masks[i]
    panels = overlay(images[i], maps[i], mask, vmin, vmax, alpha)
    if caption:
      text = str(names[i])
      if scores is not None:
        text += f'  score {float(scores[i]):.4g}'
      text += f'  [{vmin:.3g}, {vmax:.3g}]'
      img = _caption(panels, text)
    else:
      img = Image.fromarray(panels)
    paths.append(_atomic_save(img, os.path.join(out_dir, fname + '.png')))
  return paths


def heatmap_png(anomaly_map, image, path: str, vmin: float, vmax: float,
                mask=None, caption: str | None = None) -> str:
  """Predict mode: one image's overlay (image | heat map) written to `path`."""
  panels = overlay(image, anomaly_map, mask, vmin, vmax)
  img = _caption(panels, caption) if caption else Image.fromarray(panels)
  return _atomic_save(img, path)


# ---- Figure 3: histograms of per-dimension standard deviations --------------


def nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
  """Round tick values (1, 2 or 5 x 10^k steps) covering [lo, hi]."""
  if not hi > lo:
    return np.array([lo])
  raw = (hi - lo) / target
  mag = 10.0 ** math.floor(math.log10(raw))
  # The finest round step that keeps the tick count near the target.
  step = next(m * mag for m in (1, 2, 5, 10)
              if (hi - lo) / (m * mag) <= target + 2)
  first = math.ceil(lo / step - 1e-9) * step
  ticks = np.arange(first, hi + step * 1e-9, step)
  return np.round(ticks / step) * step  # Clean -0.0 and float dust.


def _text(draw, xy, text, font, align='la'):
  """Draws text; align = horizontal (l|m|r) + vertical (a=top|m): PIL's
  `anchor` needs a FreeType font, so the offset is measured instead."""
  l, t, r, b = draw.textbbox((0, 0), text, font=font)
  x, y = xy
  x -= {'l': 0, 'm': (r - l) / 2, 'r': r - l}[align[0]] + l
  y -= {'a': 0, 'm': (b - t) / 2}[align[1]] + t
  draw.text((x, y), text, fill='black', font=font)


def _histogram_panel(draw, box, values, bins, title, color, font):
  """One histogram with axes, ticks and labels inside box=(x0, y0, x1, y1)."""
  x0, y0, x1, y1 = box
  left, right, top, bottom = x0 + 52, x1 - 12, y0 + 28, y1 - 40
  v = values[np.isfinite(values)]
  dropped = values.size - v.size
  lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
  if hi <= lo:  # All equal: a unit-wide range around the value.
    lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
  counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
  cmax = max(int(counts.max()) if counts.size else 0, 1)

  def px(x):
    return left + (x - lo) / (hi - lo) * (right - left)

  def py(c):
    return bottom - c / cmax * (bottom - top)

  for c, a, b in zip(counts, edges[:-1], edges[1:]):
    if c:
      draw.rectangle([px(a), py(c), max(px(b) - 1, px(a)), bottom], fill=color)
  draw.line([left, bottom, right, bottom], fill='black')
  draw.line([left, top, left, bottom], fill='black')
  for t in nice_ticks(lo, hi):
    x = px(t)
    draw.line([x, bottom, x, bottom + 4], fill='black')
    _text(draw, (x, bottom + 6), f'{t:g}', font, 'ma')
  for t in nice_ticks(0, cmax):
    if t != int(t):
      continue
    y = py(t)
    draw.line([left - 4, y, left, y], fill='black')
    _text(draw, (left - 6, y), f'{int(t)}', font, 'rm')
  stats = (f'n={v.size}, median={np.median(v):.3g}' if v.size else 'no values')
  if dropped:
    stats += f', {dropped} non-finite dropped'
  _text(draw, ((x0 + x1) / 2, y0 + 6), f'{title} ({stats})', font, 'ma')
  _text(draw, ((left + right) / 2, y1 - 16), 'per-dimension std', font, 'ma')
  _text(draw, (x0 + 4, top - 16), 'count', font)


def feature_std_histogram(local_std, adapted_std, path: str, bins: int = 50,
                          size: tuple[int, int] = (900, 340)) -> str:
  """The paper's Figure 3: two histograms side by side, written as a PNG.

  Args:
    local_std: (D,) std of each local-feature dimension over the training set.
    adapted_std: (D',) the same for the adapted features.
    path: the PNG to write.

  Returns:
    path.
  """
  local_std = np.asarray(local_std, np.float64).reshape(-1)
  adapted_std = np.asarray(adapted_std, np.float64).reshape(-1)
  if local_std.size == 0 or adapted_std.size == 0:
    raise ValueError('feature_std_histogram: empty std vector.')
  w, h = size
  img = Image.new('RGB', (w, h), 'white')
  draw = ImageDraw.Draw(img)
  font = _font()
  _histogram_panel(draw, (0, 0, w // 2, h), local_std, bins,
                   'local features', (70, 110, 200), font)
  _histogram_panel(draw, (w // 2, 0, w, h), adapted_std, bins,
                   'adapted features', (220, 110, 50), font)
  return _atomic_save(img, path)

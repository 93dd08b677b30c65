"""Figures: heat-map overlays (numpy + PIL) and plots (matplotlib, Agg).

Figure 1 style overlays: the image beside the anomaly map as a jet-like heat
map blended over it, with the ground-truth outline in white (a colour the
blend never produces); small images are enlarged by a whole factor
(`display_scale`) so that a person can read them. Plots for the report and
the paper's Figure 3 (histograms of the per-dimension standard deviation of
local and adapted features) are drawn with matplotlib's Agg canvas through
`matplotlib.figure.Figure`, never pyplot, so no global state or display is
involved. Files are written atomically (temporary file, then os.replace).
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
import unicodedata

from matplotlib import cm
from matplotlib import colors as mpl_colors
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

OUTLINE_COLOR = (255, 255, 255)
# Overlays are enlarged to about this many pixels on their longer side.
DISPLAY_SIZE = 256


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


def display_scale(image_hw, target: int = DISPLAY_SIZE) -> int:
  """The whole factor that brings an image's longer side near `target`
  pixels (1 for images already that large): 128 -> 2, 64 -> 4, 224 -> 1."""
  return max(1, round(target / max(image_hw)))


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
  """Each pixel as a scale x scale block: the evaluated resolution, shown
  larger, with no interpolation inventing detail."""
  if scale == 1:
    return pixels
  return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


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
  """`img` as a PNG at `path`, written whole or not at all."""
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  return _atomic_write_bytes(buf.getvalue(), path)


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


def _caption(panels: np.ndarray, text: str, size: int = 11) -> Image.Image:
  """Panels with a black strip above holding `text` in a `size` px font."""
  h, w = panels.shape[:2]
  strip = size + 5
  img = Image.new('RGB', (w, h + strip), (0, 0, 0))
  img.paste(Image.fromarray(panels), (0, strip))
  # The default font may lack glyphs outside ASCII; the file name keeps them.
  safe = text.encode('ascii', errors='replace').decode('ascii')
  ImageDraw.Draw(img).text((3, 2), safe, fill=(255, 255, 255),
                           font=_font(size))
  return img


def _caption_size(scale: int) -> int:
  return 11 if scale == 1 else 14


def save_overlays(out_dir: str, images, maps, masks, names, scores=None,
                  vmin: float | None = None, vmax: float | None = None,
                  alpha: float = 0.5, caption: bool = True,
                  scale: int = 1) -> list[str]:
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
    scale: each pixel drawn as scale x scale (`display_scale`).

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
    panels = enlarge(overlay(images[i], maps[i], mask, vmin, vmax, alpha),
                     scale)
    if caption:
      text = str(names[i])
      if scores is not None:
        text += f'  score {float(scores[i]):.4g}'
      text += f'  [{vmin:.3g}, {vmax:.3g}]'
      img = _caption(panels, text, _caption_size(scale))
    else:
      img = Image.fromarray(panels)
    paths.append(_atomic_save(img, os.path.join(out_dir, fname + '.png')))
  return paths


def heatmap_png(anomaly_map, image, path: str, vmin: float, vmax: float,
                mask=None, caption: str | None = None, scale: int = 1) -> str:
  """Predict mode: one image's overlay (image | heat map) written to `path`."""
  panels = enlarge(overlay(image, anomaly_map, mask, vmin, vmax), scale)
  img = (_caption(panels, caption, _caption_size(scale)) if caption else
         Image.fromarray(panels))
  return _atomic_save(img, path)


# ---- Plots (matplotlib) -----------------------------------------------------

NORMAL_COLOR = '#2f6fce'
ANOMALOUS_COLOR = '#e0541f'
PLOT_DPI = 110
JET = mpl_colors.ListedColormap(jet_lut() / 255.0, name='simplenet_jet')


def _figure(width_in: float, height_in: float) -> Figure:
  fig = Figure(figsize=(width_in, height_in), dpi=PLOT_DPI,
               layout='constrained')
  fig.set_facecolor('white')
  return fig


def figure_bytes(fig: Figure, fmt: str = 'png', **pil_kwargs) -> bytes:
  """The figure encoded as `fmt` ('png' or 'jpeg')."""
  buf = io.BytesIO()
  fig.savefig(buf, format=fmt, pil_kwargs=pil_kwargs or None)
  return buf.getvalue()


def _style(ax, title: str, xlabel: str, ylabel: str):
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel, fontsize=9)
  ax.set_ylabel(ylabel, fontsize=9)
  ax.tick_params(labelsize=8)
  ax.grid(True, alpha=0.3, linewidth=0.6)


def _pct(v) -> str:
  return 'n/a' if v is None or not math.isfinite(v) else f'{100 * v:.1f}%'


def roc_plot(fpr, tpr, auroc: float | None) -> bytes:
  """The image ROC curve as a PNG."""
  fig = _figure(3.3, 3.1)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color='0.6', linestyle=':', linewidth=1)
  ax.plot(fpr, tpr, color=ANOMALOUS_COLOR, linewidth=1.8, drawstyle='default')
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect('equal')
  _style(ax, f'Image ROC (AUROC {_pct(auroc)})', 'false positive rate',
         'true positive rate')
  return figure_bytes(fig)


def pro_plot(fpr, pro, max_fpr: float, aupro: float | None) -> bytes:
  """The PRO curve from FPR 0 to the AUPRO limit, its area shaded."""
  fig = _figure(3.3, 3.1)
  ax = fig.add_subplot()
  ax.fill_between(fpr, pro, color=ANOMALOUS_COLOR, alpha=0.15, linewidth=0)
  ax.plot(fpr, pro, color=ANOMALOUS_COLOR, linewidth=1.8)
  ax.set_xlim(0, max_fpr)
  ax.set_ylim(-0.01, 1.01)
  _style(ax, f'PRO to FPR {max_fpr:g} (AUPRO {_pct(aupro)})',
         'pixel false positive rate', 'per-region overlap')
  return figure_bytes(fig)


def score_histogram(scores, labels, threshold: float | None) -> bytes:
  """Test image scores, normal vs anomalous, with the decision threshold."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  finite = np.isfinite(scores)
  fig = _figure(4.4, 3.1)
  ax = fig.add_subplot()
  vals = scores[finite]
  lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
  if threshold is not None and math.isfinite(threshold):
    lo, hi = min(lo, threshold), max(hi, threshold)
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  bins = np.linspace(lo, hi, max(10, min(40, vals.size // 2 + 1)) + 1)
  for sel, color, name in ((~labels, NORMAL_COLOR, 'normal'),
                           (labels, ANOMALOUS_COLOR, 'anomalous')):
    v = scores[sel & finite]
    ax.hist(v, bins=bins, color=color, alpha=0.55, label=f'{name} ({v.size})',
            edgecolor=color, linewidth=0.8)
  if threshold is not None and math.isfinite(threshold):
    ax.axvline(threshold, color='black', linestyle='--', linewidth=1.3,
               label=f'threshold {threshold:.4g}')
  ax.yaxis.get_major_locator().set_params(integer=True)
  ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # Room for the legend.
  ax.legend(fontsize=8, frameon=False, loc='upper center', ncol=3,
            handlelength=1.2, columnspacing=1.0)
  _style(ax, 'Test image scores', 'image score', 'images')
  return figure_bytes(fig)


def training_curves(records: list[dict],
                    final: dict | None = None) -> bytes | None:
  """Per-pass loss, p_true and p_fake (and the learning rates when they
  change), and the evaluation metrics where there were any during training
  (log.jsonl records), joined by the `final` evaluation's point. None
  without records."""
  passes = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'image_auroc' in r]
  if evals and final is not None:
    evals = evals + [final]
  if not passes and not evals:
    return None
  lr_keys = [k for k in ('lr_adaptor', 'lr_discriminator')
             if len({r.get(k) for r in passes if k in r}) > 1]
  panels = (['loss', 'p'] if passes else []) + (['lr'] if lr_keys else [])
  panels += ['eval'] if evals else []
  fig = _figure(3.0 * len(panels) + 0.4, 2.9)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  x = [r['pass'] for r in passes]
  # A line through one point draws nothing (a run of one pass, e.g. many
  # images with train.augment's flips): few passes get dots as well.
  dots = {'marker': 'o', 'markersize': 3} if len(x) <= 20 else {}
  for ax, panel in zip(axes, panels):
    if panel == 'loss':
      ax.plot(x, [r['loss'] for r in passes], color='0.2', linewidth=1.4,
              **dots)
      _style(ax, 'loss (pass mean)', 'pass', 'loss')
    elif panel == 'p':
      ax.plot(x, [r['p_true'] for r in passes], color=NORMAL_COLOR,
              linewidth=1.4, label='p_true', **dots)
      ax.plot(x, [r['p_fake'] for r in passes], color=ANOMALOUS_COLOR,
              linewidth=1.4, label='p_fake', **dots)
      ax.set_ylim(-0.02, 1.02)
      ax.legend(fontsize=8, frameon=False)
      _style(ax, 'discriminator hits (pass mean)', 'pass', 'fraction')
    elif panel == 'lr':
      for k in lr_keys:
        ax.plot(x, [r.get(k, np.nan) for r in passes], linewidth=1.4,
                label=k.replace('lr_', ''))
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
      ax.legend(fontsize=8, frameon=False)
      _style(ax, 'learning rate', 'pass', 'lr')
    else:
      ex = [r['pass'] for r in evals]
      for key, label, color in (('image_auroc', 'I-AUROC', 'tab:green'),
                                ('pixel_auroc', 'P-AUROC', 'tab:purple'),
                                ('aupro', 'AUPRO', 'tab:brown')):
        y = [100 * r[key] if r.get(key) is not None and
             math.isfinite(r[key]) else np.nan for r in evals]
        if not np.all(np.isnan(y)):
          ax.plot(ex, y, marker='o', markersize=4, linewidth=1.2,
                  color=color, label=label)
      ax.legend(fontsize=8, frameon=False, loc='best')
      _style(ax, 'evaluations', 'pass', '%')
    ax.xaxis.get_major_locator().set_params(integer=True)
    if panel != 'eval' and len(set(x)) == 1:
      ax.set_xticks(x)  # One pass: not fractions of it either side.
  return figure_bytes(fig)


def feature_std_histogram(local_std, adapted_std, path: str,
                          bins: int = 50) -> str:
  """The paper's Figure 3: histograms of the per-dimension std of the local
  and the adapted features, side by side, written as a PNG.

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
  fig = _figure(8.2, 3.0)
  axes = fig.subplots(1, 2)
  for ax, values, name, color in (
      (axes[0], local_std, 'local features', '#466ec8'),
      (axes[1], adapted_std, 'adapted features', '#dc6e32')):
    v = values[np.isfinite(values)]
    if v.size:
      lo, hi = float(v.min()), float(v.max())
      if hi <= lo:  # All equal: a unit-wide range around the value.
        lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
      ax.hist(v, bins=bins, range=(lo, hi), color=color)
      ax.axvline(float(np.median(v)), color='black', linestyle='--',
                 linewidth=1)
      stats = f'n={v.size}, median={np.median(v):.3g}'
    else:
      stats = 'no values'
    dropped = values.size - v.size
    if dropped:
      stats += f', {dropped} non-finite dropped'
    _style(ax, f'{name} ({stats})', 'per-dimension std', 'dimensions')
    ax.grid(False)
  _atomic_write_bytes(figure_bytes(fig), path)
  return path


def gallery_tile(image, anomaly_map, mask, vmin: float, vmax: float,
                 scale: int = 1, alpha: float = 0.5,
                 map_heading: str = 'anomaly map, GT outline',
                 map_only: bool = False) -> bytes:
  """One test image for the report's galleries, as a JPEG: the image | the
  heat map over it with the ground-truth outline, pixel for pixel at the
  evaluated resolution (each pixel scale x scale), and a colour bar of the
  anomaly score from vmin to vmax. map_only: the heat map panel alone (a
  second scorer's map of an image the report already shows)."""
  panels = overlay(image, anomaly_map, mask, vmin, vmax, alpha)
  if map_only:
    panels = panels[:, panels.shape[1] // 2:]
  panels = enlarge(panels, scale)
  h, w = panels.shape[:2]
  dpi = 100
  top, right, pad = 18, 60, 4  # Pixels: headings, colour bar with ticks.
  fig_w, fig_h = w + right + 2 * pad, h + top + pad
  fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
  fig.set_facecolor('white')
  # Axes placed in whole pixels, so the panels are drawn 1:1.
  ax = fig.add_axes((pad / fig_w, pad / fig_h, w / fig_w, h / fig_h))
  ax.imshow(panels, interpolation='nearest', aspect='auto')
  ax.set_axis_off()
  headings = (((0.5, map_heading),) if map_only else
              ((0.25, 'image'), (0.75, map_heading)))
  for x, text in headings:
    fig.text((pad + x * w) / fig_w, 1 - 3 / fig_h, text, ha='center',
             va='top', fontsize=8)
  cax = fig.add_axes(((pad + w + 6) / fig_w, pad / fig_h, 12 / fig_w,
                      h / fig_h))
  norm = mpl_colors.Normalize(vmin=vmin, vmax=vmax if vmax > vmin else
                              vmin + 1e-6)
  bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=JET), cax=cax)
  bar.ax.tick_params(labelsize=7, length=2)
  bar.set_label('score', fontsize=7, labelpad=1)
  return figure_bytes(fig, 'jpeg', quality=90, subsampling=0)


def _atomic_write_bytes(data: bytes, path: str) -> str:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-',
                             suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path

"""Image and mask files -> arrays of one size: decoding, geometry, datasets.

Every dataset kind ends in `transform_example`, so the geometry (the released
code's torchvision Resize + CenterCrop on PIL images) lives in one place.

Decisions on unusual files (also in docs/bad_inputs.md):
  * EXIF orientation is applied (ImageOps.exif_transpose) to images and masks.
  * Alpha is dropped, not composited: PIL's convert('RGB'), which is what the
    released code's `.convert("RGB")` does, so results stay comparable.
  * 16-bit images ('I;16*', 'I') are scaled to 8 bits: round(v / 257).
    16-bit RGB PNGs are already reduced to 8 bits by PIL (high byte).
  * Masks: any mode; a pixel is a defect when its value (max over colour
    channels) is >= half the range (128 / 32768), or, in masks whose values
    all lie below that, when it is non-zero (0/1 masks, label maps).
"""

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from simplenet_jax.errors import UserError

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.tif', '.tiff')
_16BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def is_image_file(path) -> bool:
  """By extension (any case): bmp, jpeg, jpg, png, tif, tiff."""
  return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: Path) -> list[Path]:
  """Image files directly in `directory`, sorted by name.

  Anything else (.DS_Store, Thumbs.db, notes.txt, hidden files such as
  macOS's '._x.png', sub-folders) is skipped with a warning naming it.
  """
  out = []
  for p in sorted(Path(directory).iterdir()):
    if p.is_file() and is_image_file(p) and not p.name.startswith('.'):
      out.append(p)
    else:
      logging.warning('Skipping %s: not an image file (accepted: %s).', p,
                      ', '.join(IMAGE_EXTENSIONS))
  return out


def find_mask(mask_dir: Path, stem: str) -> Optional[Path]:
  """`<stem>_mask.<ext>`, else `<stem>.<ext>`, in mask_dir (png first)."""
  for name in (f'{stem}_mask', stem):
    for ext in ('.png',) + IMAGE_EXTENSIONS:
      for e in (ext, ext.upper()):
        p = Path(mask_dir) / f'{name}{e}'
        if p.is_file():
          return p
  return None


def _open(path, what: str) -> PIL.Image.Image:
  """Fully decoded image with EXIF orientation applied, or a UserError."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f'{path}: {what} file not found.')
  try:
    with PIL.Image.open(path) as im:
      im.load()  # Decode now: a truncated file fails here, not later.
      return PIL.ImageOps.exif_transpose(im)
  except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, ...
    raise UserError(
        f'{path}: cannot read this {what} file ({type(e).__name__}: {e}); '
        'replace it or delete it.') from e


def _to_8bit_gray(im: PIL.Image.Image) -> np.ndarray:
  a = np.asarray(im).astype(np.float64)
  return np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)


def load_rgb(path) -> PIL.Image.Image:
  """An image file as an 8-bit 'RGB' PIL image (see the module docstring)."""
  im = _open(path, 'image')
  if im.mode == 'RGB':
    return im
  if im.mode in _16BIT_MODES:
    return PIL.Image.fromarray(_to_8bit_gray(im)).convert('RGB')
  if im.mode == 'F':
    raise UserError(f'{path}: 32-bit float images are not supported; save it '
                    'as an 8- or 16-bit PNG.')
  try:
    return im.convert('RGB')  # L, P, 1, RGBA, LA, PA, CMYK, YCbCr, ...
  except Exception as e:
    raise UserError(f'{path}: cannot convert image mode {im.mode} to RGB '
                    f'({e}); save it as an RGB PNG.') from e


def load_mask(path) -> PIL.Image.Image:
  """A mask file as a PIL 'F' image with values in {0.0, 1.0}."""
  im = _open(path, 'mask')
  if im.mode in _16BIT_MODES or im.mode == 'F':
    a, half = np.asarray(im).astype(np.float64), 32768.0
  elif im.mode in ('L', '1'):
    a, half = np.asarray(im.convert('L')).astype(np.float64), 128.0
  else:  # Colour masks: a defect in any channel counts.
    a, half = np.asarray(im.convert('RGB')).max(axis=-1).astype(np.float64), 128.0
  binary = a > 0 if a.max(initial=0) < half else a >= half
  return PIL.Image.fromarray(binary.astype(np.float32), mode='F')


def image_hw(path) -> tuple[int, int]:
  """(H, W) of an image file after EXIF orientation, from its header only."""
  try:
    with PIL.Image.open(path) as im:
      w, h = im.size
      if im.format == 'PNG':
        # PIL's getexif() decodes a whole PNG to look for an eXIf chunk after
        # the pixels; one before them (as PIL writes it) is already read.
        exif = PIL.Image.Exif()
        if 'exif' in im.info:
          exif.load(im.info['exif'])
      else:
        exif = im.getexif()
      orientation = exif.get(0x0112, 1)
  except Exception as e:
    raise UserError(f'{path}: cannot read this image file '
                    f'({type(e).__name__}: {e}); replace it or delete it.') from e
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How one dataset brings every image to one size (PIL bilinear).

  shorter > 0: resize the shorter side to `shorter`, the longer one to
  int(shorter * long / short) (torchvision's Resize(int)). square > 0: resize
  to (square, square). crop > 0: then center-crop (crop, crop) with
  torchvision's rounding; crop == 0: no crop.
  """
  shorter: int = 0
  square: int = 0
  crop: int = 0

  def resized_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw
    if self.square:
      return self.square, self.square
    if w <= h:
      return int(self.shorter * h / w), self.shorter
    return self.shorter, int(self.shorter * w / h)

  def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
    return (self.crop, self.crop) if self.crop else self.resized_hw(hw)

  def describe(self) -> str:
    """In words, e.g. 'shorter side 256, centre crop 224'."""
    if self.square:
      return f'resized whole to {self.square}x{self.square}'
    return (f'shorter side {self.shorter}, ' +
            (f'centre crop {self.crop}' if self.crop else 'no crop'))

  def apply(self, im: PIL.Image.Image) -> PIL.Image.Image:
    h, w = self.resized_hw((im.height, im.width))
    if (h, w) != (im.height, im.width):
      im = im.resize((w, h), PIL.Image.Resampling.BILINEAR)
    if self.crop:  # crop <= shorter side: config_checks.validate.
      top = int(round((h - self.crop) / 2.0))
      left = int(round((w - self.crop) / 2.0))
      im = im.crop((left, top, left + self.crop, top + self.crop))
    return im


def geometry_for(dataset_cfg, kind: str) -> Geometry:
  """Geometry of a category of kind 'object' or 'texture' (see configs)."""
  if kind == 'texture' and dataset_cfg.texture_resize > 0:
    return Geometry(square=int(dataset_cfg.texture_resize))
  if kind not in ('object', 'texture'):
    raise ValueError(f'kind must be object or texture, got {kind!r}')
  # resize > 0 and 0 <= crop <= resize: config_checks.validate.
  return Geometry(shorter=int(dataset_cfg.resize), crop=int(dataset_cfg.crop))


def transform_example(image: PIL.Image.Image, mask: Optional[PIL.Image.Image],
                      geometry: Geometry, *, expected_hw, label: int,
                      path: str, defect: str) -> dict:
  """RGB image and 'F' mask (or None = all normal) -> the example dict.

  Returns image (H, W, 3) uint8, mask (H, W) uint8 in {0, 1} (the mask
  resized bilinearly as float, then > 0.5), label int, path str, defect str.
  """
  out = np.asarray(geometry.apply(image), dtype=np.uint8)
  if tuple(out.shape[:2]) != tuple(expected_hw):
    raise UserError(
        f'{path}: becomes {out.shape[0]}x{out.shape[1]} after resizing but the '
        f'dataset\'s images are {expected_hw[0]}x{expected_hw[1]} (their '
        'aspect ratios differ); set config.dataset.crop > 0 to crop all to one size.')
  if mask is None:
    m = np.zeros(out.shape[:2], np.uint8)
  else:
    m = (np.asarray(geometry.apply(mask)) > 0.5).astype(np.uint8)
  return dict(image=out, mask=m, label=int(label), path=path, defect=defect)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image file; mask None = no defect pixels (or no mask available)."""
  image: Path
  mask: Optional[Path]
  label: int
  defect: str


class FileDataset:
  """Image files on disk brought to one size by `geometry`.

  `load(i)` decodes on demand (thread-safe), so a loader can run it in a
  thread pool. image_hw is known without decoding (from the first file's
  header when there is no crop).
  """

  def __init__(self, name: str, samples: Sequence[Sample], geometry: Geometry,
               has_masks: bool):
    if not samples:
      raise ValueError('a dataset needs at least one sample')
    self.name = name
    self.samples = tuple(samples)
    self.geometry = geometry
    self.has_masks = has_masks
    self.image_hw = geometry.output_hw(
        (1, 1) if geometry.square or geometry.crop else
        image_hw(self.samples[0].image))

  def __len__(self) -> int:
    return len(self.samples)

  def labels(self) -> np.ndarray:
    """(N,) int: each image's label (0 normal, 1 anomalous), as `load` gives
    it, without reading the files."""
    return np.asarray([s.label for s in self.samples], np.int64)

  def load(self, i: int) -> dict:
    s = self.samples[i]
    image = load_rgb(s.image)
    mask = None
    if s.mask is not None:
      mask = load_mask(s.mask)
      if mask.size != image.size:
        raise UserError(
            f'mask {s.mask} is {mask.height}x{mask.width} but its image '
            f'{s.image} is {image.height}x{image.width}; they must match.')
    return transform_example(image, mask, self.geometry,
                             expected_hw=self.image_hw, label=s.label,
                             path=str(s.image), defect=s.defect)

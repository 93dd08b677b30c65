"""Datasets: layouts, pairing, transforms and every bad input in docs/bad_inputs.md."""

import logging
from pathlib import Path
import struct
import sys
import tempfile
import zlib

import ml_collections
import numpy as np
import PIL.Image
import pytest


from configs.default import get_config
import torch_reference
from simplenet_jax import data
from simplenet_jax.data import images
from simplenet_jax.data import mvtec
from simplenet_jax.errors import UserError

COOKIES = Path(__file__).resolve().parents[1].parent / 'shared/datasets/cookies'


def _torchvision_transforms():
  return torch_reference.torchvision_module('transforms')


def _save(path: Path, array, mode=None, **kw) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(np.asarray(array), mode=mode).save(path, **kw)
  return path


def _rgb(h, w, value):
  return np.full((h, w, 3), value, np.uint8)


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = get_config().dataset
  c.update(kw)
  return c


def _mvtec_tree(root: Path, category='widget', size=(40, 48)):
  """train/good: 3 images; test/good: 2; test/crack: 1.png, 10.png, 2.png.

  Sorted, the masks (10_mask, 1_mask, 2_mask) and the images (1, 10, 2)
  disagree, so pairing by position mis-pairs. Each crack image has a distinct
  grey level and its mask a square at a position unique to it.
  """
  h, w = size
  c = root / category
  for i in range(3):
    _save(c / 'train/good' / f'{i:03d}.png', _rgb(h, w, 100 + i))
  for i in range(2):
    _save(c / 'test/good' / f'{i:03d}.png', _rgb(h, w, 50 + i))
  squares = {}
  for k, name in enumerate(['1', '10', '2']):
    _save(c / 'test/crack' / f'{name}.png', _rgb(h, w, 200 + k))
    m = np.zeros((h, w), np.uint8)
    m[4:12, 4 + 10 * k:12 + 10 * k] = 255
    _save(c / 'ground_truth/crack' / f'{name}_mask.png', m)
    squares[name] = m > 0
  _save(c / 'ground_truth/crack/99_mask.png', np.zeros((h, w), np.uint8))
  return squares


def _no_geometry_cfg():
  # Object geometry that keeps a 40x48 image as is: shorter side 40, crop 40.
  return _cfg(resize=40, crop=40)


# ---------------------------------------------------------------- MVTec layout


def test_masks_paired_by_name_not_sorted_position(tmp_path):
  squares = _mvtec_tree(tmp_path)
  ds = mvtec.build(tmp_path, 'widget', 'test', images.Geometry(shorter=40))
  assert ds.has_masks and len(ds) == 5
  seen = 0
  for i in range(len(ds)):
    ex = ds.load(i)
    name = Path(ex['path']).stem
    if ex['defect'] == 'crack':
      assert ex['label'] == 1
      np.testing.assert_array_equal(ex['mask'], squares[name].astype(np.uint8),
                                    err_msg=ex['path'])
      assert ex['image'][0, 0, 0] == 200 + ['1', '10', '2'].index(name)
      seen += 1
    else:
      assert ex['label'] == 0 and ex['defect'] == 'good'
      assert ex['mask'].dtype == np.uint8 and not ex['mask'].any()
  assert seen == 3


def test_split_order_is_sorted_defect_then_name(tmp_path):
  _mvtec_tree(tmp_path)
  ds = mvtec.build(tmp_path, 'widget', 'test', images.Geometry(shorter=40))
  names = [f'{s.defect}/{s.image.name}' for s in ds.samples]
  assert names == ['crack/1.png', 'crack/10.png', 'crack/2.png',
                   'good/000.png', 'good/001.png']
  train = mvtec.build(tmp_path, 'widget', 'train', images.Geometry(shorter=40))
  assert [s.image.name for s in train.samples] == ['000.png', '001.png', '002.png']
  assert not train.has_masks and {s.label for s in train.samples} == {0}


def test_validation_split_is_optional_normal_images(tmp_path):
  """<category>/validation/good (MVTec LOCO AD's layout) is read as normal
  images without masks; a category without it has no validation split."""
  _mvtec_tree(tmp_path, 'widget')
  cfg = _cfg(root=str(tmp_path), resize=40, crop=40)
  assert data.build(cfg, 'widget', 'validation') is None
  for i in (1, 0):
    _save(tmp_path / 'widget/validation/good' / f'{i:03d}.png',
          _rgb(40, 48, 30 + i))
  val = data.build(cfg, 'widget', 'validation')
  assert len(val) == 2 and not val.has_masks
  got = [val.load(i) for i in range(2)]
  assert [Path(g['path']).name for g in got] == ['000.png', '001.png']
  assert [(g['label'], g['defect']) for g in got] == [(0, 'good')] * 2
  assert [int(g['image'][0, 0, 0]) for g in got] == [30, 31]
  assert not any(g['mask'].any() for g in got)
  # Training and test images are as before.
  assert len(data.build(cfg, 'widget', 'train')) == 3
  with pytest.raises(ValueError, match='split must be'):
    data.build(cfg, 'widget', 'val')


def test_build_dispatch_and_image_hw(tmp_path):
  _mvtec_tree(tmp_path, 'carpet')  # An MVTec texture: square, no crop.
  _mvtec_tree(tmp_path, 'widget')  # Unknown name: an object.
  cfg = _cfg(root=str(tmp_path), resize=32, crop=24, texture_resize=20)
  tex = data.build(cfg, 'carpet', 'train')
  obj = data.build(cfg, 'widget', 'test')
  assert tex.image_hw == (20, 20) and tex.load(0)['image'].shape == (20, 20, 3)
  assert obj.image_hw == (24, 24) and obj.load(0)['image'].shape == (24, 24, 3)
  assert tex.name == 'carpet' and obj.name == 'widget'


def test_categories():
  cfg = _cfg()
  cats = data.categories(cfg)
  assert len(cats) == 15
  assert {c for c, k in cats if k == 'texture'} == {
      'carpet', 'grid', 'leather', 'tile', 'wood'}
  assert dict(cats)['screw'] == 'object'
  assert data.categories(_cfg(categories=('cookies', 'bottle'))) == [
      ('cookies', 'object'), ('bottle', 'object')]
  # The textures key for unknown names.
  cfg = _cfg(categories=('fabric', 'bottle'))
  cfg.textures = ('fabric',)
  assert data.categories(cfg) == [('fabric', 'texture'), ('bottle', 'object')]
  assert data.categories(_cfg(kind='demo')) == [
      ('brick', 'texture'), ('grass', 'texture'), ('gravel', 'texture')]
  assert data.categories(_cfg(kind='folder', categories=('parts',))) == [
      ('parts', 'object')]
  assert data.categories(_cfg(kind='cifar10', normal_class=3)) == [('cat', 'object')]
  assert len(data.categories(_cfg(kind='cifar10'))) == 10
  with pytest.raises(UserError, match='not a CIFAR-10 class'):
    data.categories(_cfg(kind='cifar10', categories=('cats',)))


def test_textures_key_changes_geometry(tmp_path):
  _mvtec_tree(tmp_path, 'fabric')
  cfg = _cfg(root=str(tmp_path), resize=32, crop=24, texture_resize=20)
  assert data.build(cfg, 'fabric', 'train').image_hw == (24, 24)
  cfg.textures = ('fabric',)
  assert data.build(cfg, 'fabric', 'train').image_hw == (20, 20)


# ------------------------------------------------------------------ transforms


def test_object_geometry_matches_torchvision():
  t = _torchvision_transforms()
  rng = np.random.default_rng(0)
  for h, w in [(300, 451), (451, 300), (454, 300), (256, 256), (257, 1000),
               (300, 454)]:
    im = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref = np.asarray(t.CenterCrop(224)(t.Resize(256)(im)))
    ours = np.asarray(images.Geometry(shorter=256, crop=224).apply(im))
    np.testing.assert_array_equal(ours, ref, err_msg=f'{h}x{w}')
    ref = np.asarray(t.Resize(256)(im))  # crop = 0
    np.testing.assert_array_equal(np.asarray(images.Geometry(shorter=256).apply(im)), ref)


def test_object_geometry_known_pattern():
  # 400x600: shorter side -> 256, width -> 384; crop 224 at top 16, left 80.
  # Left half red, right half blue: the edge lands at column 192 - 80 = 112.
  a = np.zeros((400, 600, 3), np.uint8)
  a[:, :300, 0] = 255
  a[:, 300:, 2] = 255
  a[:40] = 255  # A white band of 40/400 rows = 25.6 resized rows, 9.6 after the crop.
  out = np.asarray(images.Geometry(shorter=256, crop=224).apply(PIL.Image.fromarray(a)))
  assert out.shape == (224, 224, 3)
  assert (out[20:, :110, 0] == 255).all() and (out[20:, :110, 2] == 0).all()
  assert (out[20:, 114:, 2] == 255).all() and (out[20:, 114:, 0] == 0).all()
  assert (out[:8] == 255).all() and (out[12:, :110, 1] == 0).all()


def test_texture_geometry_resizes_whole_image_without_crop():
  a = np.full((200, 300, 3), 128, np.uint8)
  a[:20] = 255  # A top band that a center crop would remove.
  a[-20:] = 0
  g = images.geometry_for(_cfg(texture_resize=100, resize=256, crop=224), 'texture')
  out = np.asarray(g.apply(PIL.Image.fromarray(a)))
  assert out.shape == (100, 100, 3)
  assert (out[:8] == 255).all() and (out[-8:] == 0).all()
  assert (out[20:80] == 128).all()


def test_mask_binarisation_follows_bilinear_float_resize(tmp_path):
  m = np.zeros((60, 90), np.uint8)
  m[10:13, 20:70] = 255  # A 3-px line: bilinear halves its edges.
  m[30:50, 5:30] = 255
  path = _save(tmp_path / 'm.png', m)
  g = images.Geometry(shorter=40, crop=36)
  out = images.transform_example(PIL.Image.new('RGB', (90, 60)),
                                 images.load_mask(path), g, expected_hw=(36, 36),
                                 label=1, path='x', defect='d')['mask']
  ref = PIL.Image.fromarray(m.astype(np.float32) / 255.0, mode='F').resize(
      (60, 40), PIL.Image.Resampling.BILINEAR)
  ref = np.asarray(ref)[2:38, 12:48] > 0.5
  assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
  np.testing.assert_array_equal(out, ref.astype(np.uint8))
  assert 0 < out.sum() < out.size


@pytest.mark.parametrize('encode', ['0/255', '0/1', '16bit', 'rgb_blue', 'palette'])
def test_mask_encodings_read_the_same(tmp_path, encode):
  m = np.zeros((20, 30), bool)
  m[5:15, 3:9] = True
  path = tmp_path / 'm.png'
  if encode == '0/255':
    _save(path, m.astype(np.uint8) * 255)
  elif encode == '0/1':
    _save(path, m.astype(np.uint8))
  elif encode == '16bit':
    _save(path, m.astype(np.uint16) * 65535)
  elif encode == 'rgb_blue':
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[m, 2] = 255
    _save(path, rgb)
  else:
    p = PIL.Image.fromarray(m.astype(np.uint8), mode='P')
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.save(path)
  np.testing.assert_array_equal(np.asarray(images.load_mask(path)),
                                m.astype(np.float32))


# ----------------------------------------------------------------- bad inputs


def test_root_missing(tmp_path):
  with pytest.raises(UserError, match=r'nope.*dataset\.root'):
    data.build(_cfg(root=str(tmp_path / 'nope')), 'bottle', 'train')


def test_category_missing(tmp_path):
  _mvtec_tree(tmp_path, 'widget')
  with pytest.raises(UserError, match=r'bottle does not exist \(found: widget\)'):
    data.build(_cfg(root=str(tmp_path)), 'bottle', 'train')


def test_split_missing_or_empty(tmp_path):
  (tmp_path / 'widget/train/good').mkdir(parents=True)
  (tmp_path / 'widget/train/good/notes.txt').write_text('x')
  with pytest.raises(UserError, match=r'no images in .*train/good'):
    data.build(_cfg(root=str(tmp_path)), 'widget', 'train')
  with pytest.raises(UserError, match=r'widget/test does not exist'):
    data.build(_cfg(root=str(tmp_path)), 'widget', 'test')


def test_non_image_files_skipped_with_warning(tmp_path, caplog):
  _mvtec_tree(tmp_path)
  good = tmp_path / 'widget/train/good'
  for name in ('.DS_Store', 'Thumbs.db', 'notes.txt', '._000.png'):
    (good / name).write_bytes(b'junk')
  (good / 'sub').mkdir()
  with caplog.at_level(logging.WARNING):
    ds = data.build(_cfg(root=str(tmp_path)), 'widget', 'train')
  assert len(ds) == 3
  for name in ('.DS_Store', 'Thumbs.db', 'notes.txt', '._000.png', 'sub'):
    assert any(name in r.getMessage() for r in caplog.records), name


def test_extensions_case_insensitive(tmp_path):
  good = tmp_path / 'w/train/good'
  for i, ext in enumerate(['PNG', 'jpg', 'JPEG', 'bmp', 'tif', 'TIFF']):
    _save(good / f'{i}.{ext}', _rgb(8, 8, 10 * i),
          format={'PNG': 'PNG', 'jpg': 'JPEG', 'JPEG': 'JPEG', 'bmp': 'BMP',
                  'tif': 'TIFF', 'TIFF': 'TIFF'}[ext])
  ds = data.build(_cfg(root=str(tmp_path), resize=8, crop=8), 'w', 'train')
  assert [Path(s.image).name for s in ds.samples] == [
      '0.PNG', '1.jpg', '2.JPEG', '3.bmp', '4.tif', '5.TIFF']
  assert [int(ds.load(i)['image'][4, 4, 0]) for i in (0, 3, 4, 5)] == [0, 30, 40, 50]
  assert images.is_image_file('a/b.JPG') and images.is_image_file(Path('c.tif'))
  assert not images.is_image_file('notes.txt') and not images.is_image_file('x.gif')


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_image_named(tmp_path, damage):
  _mvtec_tree(tmp_path)
  bad = tmp_path / 'widget/train/good/001.png'
  raw = bad.read_bytes()
  bad.write_bytes({'truncated': raw[:len(raw) // 2], 'garbage': b'\x89PNG' + b'x' * 99,
                   'empty': b''}[damage])
  ds = data.build(_cfg(root=str(tmp_path)), 'widget', 'train')
  ds.load(0)
  with pytest.raises(UserError, match=r'001\.png: cannot read this image'):
    ds.load(1)


def test_truncated_jpeg_named(tmp_path):
  path = _save(tmp_path / 'a b.jpg', np.random.default_rng(0).integers(
      0, 256, (64, 64, 3), dtype=np.uint8), quality=90)
  path.write_bytes(path.read_bytes()[:400])
  with pytest.raises(UserError, match=r'a b\.jpg: cannot read'):
    images.load_rgb(path)


def test_mask_missing(tmp_path):
  _mvtec_tree(tmp_path)
  (tmp_path / 'widget/ground_truth/crack/10_mask.png').unlink()
  with pytest.raises(UserError, match=r'test/crack/10\.png has no mask; expected '
                     r'.*ground_truth/crack/10_mask\.png'):
    data.build(_cfg(root=str(tmp_path)), 'widget', 'test')


def test_mask_size_mismatch_names_both(tmp_path):
  _mvtec_tree(tmp_path)
  _save(tmp_path / 'widget/ground_truth/crack/2_mask.png', np.zeros((20, 20), np.uint8))
  ds = data.build(_cfg(root=str(tmp_path), resize=40, crop=40), 'widget', 'test')
  with pytest.raises(UserError, match=r'2_mask\.png is 20x20 but its image .*2\.png is 40x48'):
    ds.load(2)


def test_16bit_gray_png_scaled_not_clipped(tmp_path):
  v = np.array([[0, 257 * 10, 257 * 128, 257 * 200, 65535, 1000]], np.uint16)
  path = _save(tmp_path / 'g16.png', v)
  assert PIL.Image.open(path).mode.startswith('I')
  out = np.asarray(images.load_rgb(path))
  np.testing.assert_array_equal(out[0, :, 0], [0, 10, 128, 200, 255, 4])
  assert (out[..., 0] == out[..., 2]).all()


def _png16_rgb(path: Path, rgb16: np.ndarray) -> Path:
  """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
  h, w, _ = rgb16.shape
  def chunk(tag, body):
    return (struct.pack('>I', len(body)) + tag + body +
            struct.pack('>I', zlib.crc32(tag + body) & 0xffffffff))
  rows = b''.join(b'\x00' + rgb16[y].astype('>u2').tobytes() for y in range(h))
  path.write_bytes(b'\x89PNG\r\n\x1a\n' +
                   chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)) +
                   chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
  return path


def test_16bit_rgb_png_scaled_not_clipped(tmp_path):
  v = np.zeros((2, 3, 3), np.uint16)
  v[0, 0] = (65535, 257 * 128, 0)
  v[1, 2] = (257 * 7, 257 * 250, 257 * 99)
  out = np.asarray(images.load_rgb(_png16_rgb(tmp_path / 'rgb16.png', v)))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], [255, 128, 0])
  np.testing.assert_array_equal(out[1, 2], [7, 250, 99])


def test_palette_grayscale_and_rgba(tmp_path):
  p = PIL.Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode='P')
  p.putpalette([10, 20, 30, 200, 100, 50])
  p.save(tmp_path / 'p.png')
  np.testing.assert_array_equal(np.asarray(images.load_rgb(tmp_path / 'p.png'))[0, 1],
                                [200, 100, 50])
  _save(tmp_path / 'g.png', np.array([[7, 250]], np.uint8))
  np.testing.assert_array_equal(np.asarray(images.load_rgb(tmp_path / 'g.png')),
                                [[[7, 7, 7], [250, 250, 250]]])
  # RGBA: the alpha channel is dropped, colours kept (as PIL's convert('RGB')).
  rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)
  _save(tmp_path / 'a.png', rgba)
  np.testing.assert_array_equal(np.asarray(images.load_rgb(tmp_path / 'a.png')),
                                rgba[..., :3])


def test_cmyk_jpeg(tmp_path):
  cmyk = np.zeros((16, 16, 4), np.uint8)
  cmyk[:, :8, 0] = 255  # Cyan.
  cmyk[:, 8:, 1] = 255  # Magenta.
  _save(tmp_path / 'c.jpg', cmyk, mode='CMYK', quality=100)
  assert PIL.Image.open(tmp_path / 'c.jpg').mode == 'CMYK'
  out = np.asarray(images.load_rgb(tmp_path / 'c.jpg')).astype(int)
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out[4, 2], [0, 255, 255], atol=6)
  np.testing.assert_allclose(out[4, 13], [255, 0, 255], atol=6)


def test_exif_orientation_applied(tmp_path):
  a = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40, a red mark top-left.
  a[:5, :5, 0] = 255
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # Stored rotated: displayed after a 90 degree CW turn.
  _save(tmp_path / 'r.png', a, exif=exif)
  out = np.asarray(images.load_rgb(tmp_path / 'r.png'))
  assert out.shape == (40, 20, 3)
  assert out[:5, -5:, 0].min() == 255 and out[-5:, :5, 0].max() == 0
  assert images.image_hw(tmp_path / 'r.png') == (40, 20)


def test_float_image_rejected(tmp_path):
  PIL.Image.fromarray(np.zeros((4, 4), np.float32), mode='F').save(tmp_path / 'f.tif')
  with pytest.raises(UserError, match=r'f\.tif: 32-bit float'):
    images.load_rgb(tmp_path / 'f.tif')


def test_sizes_differ_spaces_and_non_ascii(tmp_path):
  root = tmp_path / 'my data' / 'Ünïcödé 猫'
  good = root / 'wídget x/train/good'
  _save(good / 'petit chat.png', _rgb(300, 300, 10))
  _save(good / 'große Katze.jpg', _rgb(480, 640, 20))
  _save(good / '猫.bmp', _rgb(500, 400, 30), format='BMP')
  ds = data.build(_cfg(root=str(root)), 'wídget x', 'train')
  assert len(ds) == 3
  for i in range(3):
    ex = ds.load(i)
    assert ex['image'].shape == (224, 224, 3), ex['path']
    assert Path(ex['path']).is_file()


def test_no_crop_requires_one_aspect_ratio(tmp_path):
  good = tmp_path / 'w/train/good'
  _save(good / 'a.png', _rgb(40, 60, 1))
  _save(good / 'b.png', _rgb(80, 120, 2))
  _save(good / 'c.png', _rgb(40, 40, 3))
  ds = data.build(_cfg(root=str(tmp_path), resize=20, crop=0), 'w', 'train')
  assert ds.image_hw == (20, 30)
  assert ds.load(0)['image'].shape == ds.load(1)['image'].shape == (20, 30, 3)
  with pytest.raises(UserError, match=r'c\.png: becomes 20x20 .*dataset\.crop'):
    ds.load(2)


# ------------------------------------------------------------- folder dataset


def _folder(tmp_path, with_masks):
  _save(tmp_path / 'train/n1.png', _rgb(30, 30, 1))
  _save(tmp_path / 'train/n2.png', _rgb(30, 30, 2))
  _save(tmp_path / 'ok/g.png', _rgb(30, 30, 3))
  _save(tmp_path / 'dent/d1.png', _rgb(30, 30, 4))
  _save(tmp_path / 'dent/d2.jpg', _rgb(30, 30, 5))
  cfg = _cfg(kind='folder', categories=('parts',), resize=30, crop=30,
             train_dir=str(tmp_path / 'train'))
  cfg.test_dirs = ml_collections.ConfigDict(
      {'normal': str(tmp_path / 'ok'), 'dent': str(tmp_path / 'dent')})
  if with_masks:
    m = np.zeros((30, 30), np.uint8)
    m[:10] = 255
    _save(tmp_path / 'masks/dent/d1_mask.png', m)
    m2 = np.zeros((30, 30), np.uint8)
    m2[-5:] = 1
    _save(tmp_path / 'masks/d2.png', m2)
    cfg.mask_dir = str(tmp_path / 'masks')
  return cfg


def test_folder_without_masks(tmp_path):
  cfg = _folder(tmp_path, with_masks=False)
  (cat, kind), = data.categories(cfg)
  train = data.build(cfg, cat, 'train')
  test = data.build(cfg, cat, 'test')
  assert (cat, kind, len(train), len(test)) == ('parts', 'object', 2, 3)
  assert not train.has_masks and not test.has_masks
  got = [(test.load(i)['defect'], test.load(i)['label']) for i in range(3)]
  assert got == [('dent', 1), ('dent', 1), ('normal', 0)]
  assert not any(test.load(i)['mask'].any() for i in range(3))
  # Named without reading the files (evaluate keeps only what it can show).
  assert test.labels().tolist() == [1, 1, 0]


def test_folder_with_masks(tmp_path):
  cfg = _folder(tmp_path, with_masks=True)
  test = data.build(cfg, 'parts', 'test')
  assert test.has_masks
  m1, m2 = test.load(0)['mask'], test.load(1)['mask']
  assert m1[:10].all() and not m1[10:].any()
  assert m2[-5:].all() and not m2[:-5].any()
  (tmp_path / 'masks/d2.png').unlink()
  with pytest.raises(UserError, match=r'dent/d2\.jpg has no mask.*mask_dir'):
    data.build(cfg, 'parts', 'test')


def test_folder_config_keeps_whole_photos(tmp_path):
  """configs/folder.py resizes each photo whole to 256x256: a mark in the
  corner of a 3:4 portrait photo (cut away by a centre crop) and its mask
  survive, at the corner."""
  from configs import folder as folder_config  # pylint: disable=g-import-not-at-top
  photo = _rgb(400, 300, 100)
  photo[:40, :30] = 250  # Top-left corner: 10% x 10%.
  _save(tmp_path / 'train/n.png', _rgb(400, 300, 90))
  _save(tmp_path / 'good/g.png', _rgb(400, 300, 90))
  _save(tmp_path / 'bad/d.png', photo)
  mask = np.zeros((400, 300), np.uint8)
  mask[:40, :30] = 255
  _save(tmp_path / 'masks/d_mask.png', mask)
  cfg = folder_config.get_config().dataset
  cfg.train_dir = str(tmp_path / 'train')
  cfg.test_dirs = ml_collections.ConfigDict(
      {'good': str(tmp_path / 'good'), 'bad': str(tmp_path / 'bad')})
  cfg.mask_dir = str(tmp_path / 'masks')
  (cat, kind), = data.categories(cfg)
  assert (cat, kind) == ('folder', 'texture')
  cfg.categories = ('parts',)  # Renamed: still whole photos.
  (cat, kind), = data.categories(cfg)
  assert (cat, kind) == ('parts', 'texture')
  test = data.build(cfg, cat, 'test')
  assert test.image_hw == (256, 256)
  d = [test.load(i) for i in range(len(test)) if test.load(i)['label']][0]
  assert d['image'].shape == (256, 256, 3)
  # 10% of 256 = 25.6 rows and columns: bright there, plain beyond.
  assert (d['image'][:22, :22] > 240).all() and (d['image'][30:, 30:] < 110).all()
  assert d['mask'][:22, :22].all() and not d['mask'][30:, :].any()


def test_folder_validation_dir(tmp_path):
  cfg = _folder(tmp_path, with_masks=False)
  assert data.build(cfg, 'parts', 'validation') is None  # val_dir unset.
  _save(tmp_path / 'val/v.png', _rgb(20, 20, 77))
  cfg.val_dir = str(tmp_path / 'val')
  val = data.build(cfg, 'parts', 'validation')
  assert len(val) == 1 and val.load(0)['label'] == 0
  assert int(val.load(0)['image'][0, 0, 0]) == 77
  cfg.val_dir = str(tmp_path / 'missing')
  with pytest.raises(UserError, match=r'dataset\.val_dir=.*missing: no such folder'):
    data.build(cfg, 'parts', 'validation')


def test_folder_bad_config(tmp_path):
  cfg = _folder(tmp_path, with_masks=False)
  cfg.train_dir = ''
  with pytest.raises(UserError, match=r'dataset\.train_dir is not set'):
    data.build(cfg, 'parts', 'train')
  cfg.test_dirs.dent = str(tmp_path / 'missing')
  with pytest.raises(UserError, match=r'dataset\.test_dirs\.dent=.*missing: no such folder'):
    data.build(cfg, 'parts', 'test')


def test_folder_test_dirs_need_normal_and_anomalous_and_skip_unset(tmp_path):
  """Unset names ('', as configs/folder.py offers 'good' and 'defect') are
  left out; without a normal or an anomalous folder there is nothing to
  score, one error naming the flag to give."""
  cfg = _folder(tmp_path, with_masks=False)
  cfg.test_dirs.defect = ''  # Offered by the config file, not set.
  test = data.build(cfg, 'parts', 'test')
  assert sorted({test.load(i)['defect'] for i in range(len(test))}) == [
      'dent', 'normal']
  cfg.test_dirs.normal = ''
  with pytest.raises(UserError, match=r'test_dirs has no folder of normal '
                     r'.*--config\.dataset\.test_dirs\.good=DIR'):
    data.build(cfg, 'parts', 'test')
  cfg.test_dirs.normal, cfg.test_dirs.dent = str(tmp_path / 'ok'), ''
  with pytest.raises(UserError, match=r'no folder of anomalous test images.*'
                     r'test_dirs\.crack=DIR'):
    data.build(cfg, 'parts', 'test')


# --------------------------------------------------- tfds builder and cifar10


def test_tfds_builder_matches_files_path(tmp_path, monkeypatch):
  temp = tmp_path / 'temp'  # Where tempfile puts folders during the test.
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  squares = _mvtec_tree(tmp_path / 'src', 'widget')
  # A grayscale 16-bit image: converted the same way on both paths.
  _save(tmp_path / 'src/widget/train/good/003.png',
        np.full((40, 48), 257 * 77, np.uint16))
  cfg = _cfg(kind='mvtec_tfds', root=str(tmp_path / 'src'), resize=32, crop=28)
  cfg.tfds_data_dir = str(tmp_path / 'tfds')
  files_cfg = _cfg(kind='mvtec', root=str(tmp_path / 'src'), resize=32, crop=28)
  for split, n in (('train', 4), ('test', 5)):
    ds = data.build(cfg, 'widget', split)
    ref = data.build(files_cfg, 'widget', split)
    assert len(ds) == len(ref) == n and ds.has_masks == (split == 'test')
    assert ds.image_hw == (28, 28)
    for i in range(n):
      a, b = ds.load(i), ref.load(i)
      assert a['path'] == b['path'] and a['defect'] == b['defect']
      assert a['label'] == b['label']
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['mask'], b['mask'])
  assert (tmp_path / 'tfds/mvtec_ad/widget/1.0.0').is_dir()
  assert list((tmp_path / 'tfds/mvtec_ad/widget/1.0.0').glob('*.array_record*'))
  assert data.build(cfg, 'widget', 'train').load(3)['image'][0, 0, 0] == 77
  assert sum(ds.load(i)['mask'].any() for i in range(5)) == len(squares)
  assert 'tensorflow' not in sys.modules
  # tfds's lookup of a GCS copy (MVTec AD has none) left a folder per builder.
  assert not list(temp.iterdir())


def test_tfds_builder_reports_missing_root(tmp_path):
  cfg = _cfg(kind='mvtec_tfds', root=str(tmp_path / 'none'))
  cfg.tfds_data_dir = str(tmp_path / 'tfds')
  with pytest.raises(UserError, match=r'none does not exist'):
    data.build(cfg, 'bottle', 'train')


def test_cifar10_one_class_with_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from simplenet_jax.data import cifar10  # pylint: disable=g-import-not-at-top
  assert cifar10.CLASSES[3] == 'cat' and len(cifar10.CLASSES) == 10
  cfg = _cfg(kind='cifar10', normal_class=3, resize=48)
  with tfds.testing.mock_data(num_examples=40):
    raw_train = tfds.data_source('cifar10', split='train')
    raw_test = tfds.data_source('cifar10', split='test')
    train_labels = [int(raw_train[i]['label']) for i in range(len(raw_train))]
    test_labels = [int(raw_test[i]['label']) for i in range(len(raw_test))]
    (cat, _), = data.categories(cfg)
    assert cat == 'cat'  # CIFAR-10 label 3.
    train = data.build(cfg, cat, 'train')
    test = data.build(cfg, cat, 'test')
    assert len(train) == train_labels.count(3) > 0
    assert len(test) == len(test_labels) == 40
    assert not train.has_masks and not test.has_masks
    assert train.image_hw == (48, 48)
    for i in range(len(train)):
      ex = train.load(i)
      assert ex['label'] == 0 and ex['defect'] == 'cat'
      assert ex['image'].shape == (48, 48, 3) and ex['image'].dtype == np.uint8
    got = [test.load(i)['label'] for i in range(len(test))]
    assert got == [int(c != 3) for c in test_labels]
    assert test.labels().tolist() == got and 0 < sum(got) < len(got)
    # Upscaled bilinearly from the stored 32x32 image.
    j = int(train.indices[0])
    ref = PIL.Image.fromarray(raw_train[j]['image']).resize((48, 48), PIL.Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(train.load(0)['image'], np.asarray(ref))


def test_cifar10_missing_data_is_user_error(tmp_path):
  cfg = _cfg(kind='cifar10', normal_class=0)
  cfg.tfds_data_dir = str(tmp_path)
  with pytest.raises(UserError, match=r'tfds build cifar10'):
    data.build(cfg, 'airplane', 'train')


# ---------------------------------------------------------------- real data


def test_cookies_loads():
  assert COOKIES.is_dir(), f'{COOKIES} is missing (shared/ beside the repo)'
  cfg = _cfg(root=str(COOKIES.parent), categories=('cookies',))
  (cat, kind), = data.categories(cfg)
  assert (cat, kind) == ('cookies', 'object')
  train = data.build(cfg, cat, 'train')
  test = data.build(cfg, cat, 'test')
  assert (len(train), len(test)) == (31, 46)
  labels = [s.label for s in test.samples]
  assert labels.count(1) == 32
  nonempty = 0
  for i in range(len(test)):
    ex = test.load(i)
    assert ex['image'].shape == (224, 224, 3)
    nonempty += int(ex['mask'].any())
    assert bool(ex['mask'].any()) == bool(ex['label'])
  assert nonempty == 32
  assert train.load(0)['image'].std() > 5  # A real photograph, not a blank.


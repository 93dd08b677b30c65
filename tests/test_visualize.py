"""Overlays, file naming, the report's plots and the std histogram."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from simplenet_jax import visualize


def _square_case(h=12, w=14):
  image = np.full((h, w, 3), 100, np.uint8)
  amap = np.zeros((h, w), np.float32)
  mask = np.zeros((h, w), np.uint8)
  mask[3:8, 4:10] = 1  # Rows 3..7, columns 4..9.
  return image, amap, mask


def test_jet_lut_ends_and_middle():
  lut = visualize.jet_lut()
  assert lut.shape == (256, 3) and lut.dtype == np.uint8
  # Jet: dark blue at the bottom, dark red at the top, green peak mid-way.
  np.testing.assert_array_equal(lut[0], [0, 0, 128])
  np.testing.assert_array_equal(lut[255], [128, 0, 0])
  assert lut[128, 1] == 255 and lut[128, 0] < 200 and lut[128, 2] < 200


def test_colorize_clips_to_fixed_limits():
  heat = visualize.colorize(np.array([[-5.0, 0.0, 2.0, 9.0]]), 0.0, 2.0)
  lut = visualize.jet_lut()
  np.testing.assert_array_equal(heat[0], [lut[0], lut[0], lut[255], lut[255]])
  # Constant range: no division by zero, all the coldest colour.
  flat = visualize.colorize(np.ones((2, 2)), 1.0, 1.0)
  np.testing.assert_array_equal(flat.reshape(-1, 3), np.tile(lut[0], (4, 1)))


def test_overlay_shape_and_first_panel_is_the_image():
  image, amap, mask = _square_case()
  out = visualize.overlay(image, amap, mask, vmin=0.0, vmax=1.0)
  assert out.shape == (12, 28, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :14], image)


def test_outline_is_on_the_mask_boundary():
  image, amap, mask = _square_case()
  out = visualize.overlay(image, amap, mask, vmin=0.0, vmax=1.0)
  heat_panel = out[:, 14:]
  white = np.all(heat_panel == visualize.OUTLINE_COLOR, axis=-1)
  # By hand: the ring of the 5x6 rectangle (rows 3..7, cols 4..9).
  ring = np.zeros((12, 14), bool)
  ring[3, 4:10] = ring[7, 4:10] = True
  ring[3:8, 4] = ring[3:8, 9] = True
  np.testing.assert_array_equal(white, ring)
  # Inside and outside: the grey image blended with jet's coldest colour.
  want = np.round(0.5 * 100 + 0.5 * np.array([0, 0, 128])).astype(np.uint8)
  np.testing.assert_array_equal(heat_panel[5, 6], want)
  np.testing.assert_array_equal(heat_panel[0, 0], want)


def test_outline_drawn_at_the_image_edge_and_without_mask_none():
  image, amap, _ = _square_case()
  mask = np.zeros((12, 14), bool)
  mask[:4, :4] = True  # Touches the top and left edges.
  white = np.all(visualize.overlay(image, amap, mask)[:, 14:] == 255, axis=-1)
  ring = np.zeros((12, 14), bool)
  ring[0, :4] = ring[3, :4] = ring[:4, 0] = ring[:4, 3] = True
  np.testing.assert_array_equal(white, ring)
  no_mask = visualize.overlay(image, amap, None)
  assert not np.all(no_mask == 255, axis=-1).any()


def test_hot_pixels_get_hot_colours():
  image, amap, _ = _square_case()
  amap[0, 0] = 2.0  # Above vmax: the hottest colour.
  out = visualize.overlay(image, amap, None, vmin=0.0, vmax=1.0)
  want = np.round(0.5 * 100 + 0.5 * np.array([128, 0, 0])).astype(np.uint8)
  np.testing.assert_array_equal(out[0, 14], want)


def test_overlay_rejects_mismatched_shapes():
  image, amap, mask = _square_case()
  with pytest.raises(ValueError, match='anomaly map'):
    visualize.overlay(image, amap[:, :5], None)
  with pytest.raises(ValueError, match='mask'):
    visualize.overlay(image, amap, mask[:5])
  with pytest.raises(ValueError, match='uint8'):
    visualize.overlay(image.astype(np.float32), amap, None)


def test_save_overlays_names_and_subdirs(tmp_path):
  image, amap, mask = _square_case()
  names = ['crack/000', 'good 001', 'crème_brûlée', 'crack_000', '../x']
  n = len(names)
  images = np.stack([image] * n)
  maps = np.stack([amap] * n)
  paths = visualize.save_overlays(str(tmp_path / 'cookies'), images, maps,
                                  [mask, None, mask, None, None], names,
                                  scores=np.arange(n, dtype=float))
  got = [os.path.basename(p) for p in paths]
  assert got == ['crack_000.png', 'good_001.png', 'crème_brûlée.png',
                 'crack_000_1.png', 'x.png']
  assert all(os.path.dirname(p) == str(tmp_path / 'cookies') for p in paths)
  assert sorted(os.listdir(tmp_path / 'cookies')) == sorted(got)  # No temps.
  with Image.open(paths[0]) as im:
    assert im.mode == 'RGB' and im.size[0] == 28 and im.size[1] > 12
  # Another category's directory leaves these files alone.
  before = os.path.getmtime(paths[0]), os.path.getsize(paths[0])
  visualize.save_overlays(str(tmp_path / 'other'), images[:1], maps[:1], None,
                          names[:1], caption=False)
  assert (os.path.getmtime(paths[0]), os.path.getsize(paths[0])) == before
  with Image.open(tmp_path / 'other' / 'crack_000.png') as im:
    np.testing.assert_array_equal(np.asarray(im)[:, :14], image)


def test_save_overlays_rejects_length_mismatch(tmp_path):
  image, amap, _ = _square_case()
  with pytest.raises(ValueError, match='2 names'):
    visualize.save_overlays(str(tmp_path), [image], [amap], None, ['a', 'b'])


def test_heatmap_png_writes_the_overlay(tmp_path):
  image, amap, _ = _square_case()
  path = visualize.heatmap_png(amap, image, str(tmp_path / 'p' / 'a.png'),
                               vmin=0.0, vmax=1.0)
  with Image.open(path) as im:
    np.testing.assert_array_equal(np.asarray(im),
                                  visualize.overlay(image, amap, None))


def test_feature_std_histogram_draws_each_panel_in_its_colour(tmp_path):
  rng = np.random.default_rng(0)
  local = rng.gamma(2.0, 0.1, 256)
  adapted = np.append(rng.gamma(5.0, 0.02, 255), np.nan)
  path = str(tmp_path / 'figs' / 'std_hist.png')
  assert visualize.feature_std_histogram(local, adapted, path) == path
  assert os.path.getsize(path) > 1000
  with Image.open(path) as im:
    arr = np.asarray(im.convert('RGB')).astype(int)
  w = arr.shape[1]
  # Each panel holds its bars' colour (and the left panel's is not the right's).
  blue = np.all(arr == (70, 110, 200), axis=-1)
  orange = np.all(arr == (220, 110, 50), axis=-1)
  assert blue[:, :w // 2].sum() > 500 and not blue[:, w // 2:].any()
  assert orange[:, w // 2:].sum() > 500 and not orange[:, :w // 2].any()
  dark = arr.sum(-1) < 150  # Axes and text.
  assert dark.sum() > 300


def test_feature_std_histogram_constant_and_empty(tmp_path):
  path = visualize.feature_std_histogram(np.ones(8), np.zeros(8),
                                         str(tmp_path / 'h.png'))
  assert os.path.getsize(path) > 0
  with pytest.raises(ValueError, match='empty'):
    visualize.feature_std_histogram([], [1.0], str(tmp_path / 'e.png'))


# ---- enlarged overlays -------------------------------------------------------


def test_display_scale_and_enlarge():
  assert [visualize.display_scale(s) for s in
          ((128, 128), (64, 64), (224, 224), (100, 300), (32, 40))] == [
              2, 4, 1, 1, 6]
  px = np.arange(4, dtype=np.uint8).reshape(2, 2)
  np.testing.assert_array_equal(visualize.enlarge(px, 2),
                                [[0, 0, 1, 1], [0, 0, 1, 1],
                                 [2, 2, 3, 3], [2, 2, 3, 3]])
  assert visualize.enlarge(px, 1) is px


def test_save_overlays_and_heatmap_png_enlarged(tmp_path):
  image, amap, mask = _square_case()
  (path,) = visualize.save_overlays(str(tmp_path), [image], [amap], [mask],
                                    ['a'], scale=3)
  want = visualize.enlarge(visualize.overlay(image, amap, mask), 3)
  with Image.open(path) as im:
    got = np.asarray(im)
  assert got.shape[1] == 3 * 28
  np.testing.assert_array_equal(got[-36:], want)  # Below the caption strip.
  png = visualize.heatmap_png(amap, image, str(tmp_path / 'p.png'), 0.0, 1.0,
                              scale=2)
  with Image.open(png) as im:
    np.testing.assert_array_equal(
        np.asarray(im), visualize.enlarge(visualize.overlay(image, amap), 2))


# ---- plots -------------------------------------------------------------------


def _png(data):
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert('RGB')).astype(int)


def _has_colour(arr, hex_colour, tol=12):
  rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
  return int((np.abs(arr - rgb).max(-1) <= tol).sum())


def test_gallery_tile_shows_the_panels_pixel_for_pixel_and_a_colour_bar():
  image, amap, mask = _square_case(16, 20)
  amap[8:, :] = 1.0  # Bottom half hot.
  data = visualize.gallery_tile(image, amap, mask, 0.0, 1.0, scale=3)
  with Image.open(io.BytesIO(data)) as im:
    assert im.format == 'JPEG'
    arr = np.asarray(im.convert('RGB')).astype(int)
  # Panels 3 x (16 x 40), 4 px margins, 18 px headings, 60 px colour bar.
  assert arr.shape == (18 + 48 + 4, 4 + 120 + 60 + 4, 3)
  panels = arr[18:18 + 48, 4:4 + 120]
  want = visualize.enlarge(visualize.overlay(image, amap, mask, 0.0, 1.0), 3)
  assert np.abs(panels - want).mean() < 4  # JPEG, no resampling.
  # The colour bar beside them: jet from vmax (top) to vmin (bottom).
  column = arr[18:18 + 48, 4 + 120 + 6 + 6]
  lut = visualize.jet_lut().astype(int)
  for row in range(4, 44, 4):
    level = 1 - (row + 0.5) / 48
    assert np.abs(column[row] - lut[round(level * 255)]).max() < 40, row
  # map_only (kNN's map under the head's, eval.yardstick): the heat-map
  # panel alone, then the same colour bar.
  data = visualize.gallery_tile(image, amap, mask, 0.0, 1.0, scale=3,
                                map_only=True)
  with Image.open(io.BytesIO(data)) as im:
    arr = np.asarray(im.convert('RGB')).astype(int)
  assert arr.shape == (18 + 48 + 4, 4 + 60 + 60 + 4, 3)
  assert np.abs(arr[18:18 + 48, 4:4 + 60] - want[:, 60:]).mean() < 4


def test_score_histogram_roc_and_pro_plots_draw():
  scores = [0.1, 0.2, 0.3, 0.9, 1.1, 1.3]
  labels = [0, 0, 0, 1, 1, 1]
  hist = _png(visualize.score_histogram(scores, labels, 0.5))
  assert _has_colour(hist, '#000000', tol=40) > 50  # Threshold line, text.
  # Both classes' bars (alpha-blended on white).
  assert _has_colour(hist, '#9cbbe9', tol=25) > 200
  assert _has_colour(hist, '#f0a88c', tol=25) > 200
  roc = _png(visualize.roc_plot([0, 0, 1], [0, 1, 1], 1.0))
  assert _has_colour(roc, visualize.ANOMALOUS_COLOR, tol=30) > 100
  pro = _png(visualize.pro_plot([0, 0.1, 0.3], [0, 0.5, 0.9], 0.3, 0.6))
  assert _has_colour(pro, visualize.ANOMALOUS_COLOR, tol=30) > 100


def test_training_curves_show_a_single_pass(monkeypatch):
  # A one-pass run (a few hundred photos with their flips) has one point per
  # curve, which a plain line does not draw: it gets a dot; a long run does
  # not.
  figures = []
  monkeypatch.setattr(visualize, 'figure_bytes', figures.append)
  one = [{'pass': 1, 'loss': 0.37, 'p_true': 0.57, 'p_fake': 0.62}]
  visualize.training_curves(one)
  many = [dict(one[0], **{'pass': p}) for p in range(1, 41)]
  visualize.training_curves(many)
  for fig, drawn in zip(figures, (True, False)):
    lines = [l for ax in fig.axes for l in ax.get_lines()]
    assert len(lines) == 3  # Loss, p_true, p_fake.
    assert all((l.get_marker() not in ('None', None, '')) == drawn
               for l in lines), [l.get_marker() for l in lines]
  # The one pass is the one tick, not fractions of a pass around it.
  assert [list(ax.get_xticks()) for ax in figures[0].axes] == [[1], [1]]


def test_training_curves_panels_follow_the_log():
  log = [{'pass': p, 'loss': 1 / p, 'p_true': 0.5, 'p_fake': 0.4,
          'lr_adaptor': 1e-4, 'lr_discriminator': 2e-4} for p in (1, 2, 3)]
  assert visualize.training_curves([]) is None
  width = lambda data: _png(data).shape[1]
  # Loss and p_true / p_fake; constant learning rates are not plotted, nor a
  # final evaluation without evaluations during training.
  two = width(visualize.training_curves(log, final={'pass': 3,
                                                    'image_auroc': 0.95}))
  log[2]['lr_discriminator'] = 1e-4
  log[1].update(image_auroc=0.9, pixel_auroc=0.8, aupro=0.5)
  four = width(visualize.training_curves(log, final={'pass': 3,
                                                     'image_auroc': 0.95}))
  per_panel = 3.0 * visualize.PLOT_DPI
  assert two == pytest.approx(2 * per_panel + 0.4 * visualize.PLOT_DPI, abs=2)
  assert four == pytest.approx(4 * per_panel + 0.4 * visualize.PLOT_DPI, abs=2)

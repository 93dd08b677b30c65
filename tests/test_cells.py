"""eval.cells: where the maps draw the grid's cells, and how they are found."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import default
from simplenet_jax import cells
from simplenet_jax import errors
from simplenet_jax import features
from simplenet_jax import scoring
from simplenet_jax import train


@pytest.mark.parametrize('n,size', [(16, 128), (36, 288), (5, 17), (38, 300)])
def test_released_axis_is_torchs_resize(n, size):
  np.testing.assert_allclose(
      cells.cell_matrix(n, size, cells.released_axis(n, size)),
      features.bilinear_matrix(n, size), rtol=0, atol=1e-12)


def test_a_cell_is_drawn_at_its_offset():
  a = cells.cell_matrix(16, 128, (8.0, -4.0))
  # Cell 5 sits at pixel 8 * 5 - 4 = 36, half-way to its neighbours 4 px off.
  np.testing.assert_allclose(a[[28, 32, 36, 40, 44], 5], [0, .5, 1, .5, 0])
  # Pixel 0 lies between cell 0 (at -4) and cell 1 (at 4); past the last
  # cell (at 116) the map keeps its value.
  np.testing.assert_allclose(a[0, :2], [.5, .5])
  np.testing.assert_allclose(a[116:, 15], 1.0)
  np.testing.assert_allclose(a.sum(1), 1.0)


def test_a_flipped_view_mirrors_its_cells():
  # Flipped, cell j of 16 sits at 8j - 4 of the flipped image: flipped back
  # (i = 15 - j) at 127 - (8 (15 - i) - 4) = 8i + 11.
  assert cells.view_axis((8.0, -4.0), 16, 128, True) == (8.0, 11.0)
  assert cells.view_axis((8.0, -4.0), 16, 128, False) == (8.0, -4.0)
  # The released half-pixel centres are their own mirror image.
  assert cells.view_axis((8.0, 3.5), 16, 128, True) == (8.0, 3.5)


def _strided_taps(variables, images):
  """A linear stand-in for a backbone: stride 4, a 6 x 6 kernel of two taps
  per channel pair, rows padded (2, 3) and columns (1, 4)."""
  return jax.lax.conv_general_dilated(
      images, variables['kernel'], (4, 4), ((2, 3), (1, 4)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _taps_kernel():
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(3, 5))  # The same spatial weights in every pair.
  k = np.zeros((6, 6, 3, 5), np.float32)
  k[0, 0] = mix
  k[1, 5] = 2 * mix
  return {'kernel': jnp.asarray(k)}


def test_measure_finds_the_centroid_of_a_known_receptive_field():
  # Squared weights 1 at (0, 0) and 4 at (1, 5): the centroid is row
  # (0 + 4) / 5 = 0.8 and column (0 + 20) / 5 = 4.0 of the kernel, which
  # starts 2 rows and 1 column before 4 * i (the padding).
  (sh, dh), (sw, dw) = cells.measure(_strided_taps, _taps_kernel(), (40, 44),
                                     (4.0, 4.0))
  assert (sh, sw) == (4.0, 4.0)
  np.testing.assert_allclose([dh, dw], [0.8 - 2, 4.0 - 1], atol=1e-4)


def test_a_measured_flipped_view_is_where_view_axis_puts_it():
  kernel, hw = _taps_kernel(), (40, 44)
  axes = cells.measure(_strided_taps, kernel, hw, (4.0, 4.0))

  def flipped_back(variables, images):
    return jnp.flip(_strided_taps(variables, jnp.flip(images, (1, 2))),
                    (1, 2))

  measured = cells.measure(flipped_back, kernel, hw, (4.0, 4.0))
  grid = jax.eval_shape(_strided_taps, kernel,
                        jnp.zeros((1, *hw, 3))).shape[1:3]
  for axis, got, n, size in zip(axes, measured, grid, hw):
    want = cells.view_axis(axis, n, size, True)
    assert abs(want[1] - axis[1]) > 1  # Not the axis itself.
    np.testing.assert_allclose(got, want, atol=1e-4)


def _tiny_predict(eval_cfg, cells_arg):
  c = default.get_config()
  c.model.pretrain_embed_dim = c.model.target_embed_dim = 16
  c.model.hidden = 8
  state = train.create_train_state(jax.random.PRNGKey(1), c.model, c.optim,
                                   16, 1, 1)
  fn = scoring.make_predict_fn(helpers.TinyBackbone(), ('layer2', 'layer3'),
                               c.model, (24, 24), eval_cfg, cells_arg)
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (2, 24, 24, 3)), jnp.uint8)
  return fn(helpers.tiny_backbone_vars(), state.head_vars(), images)


# One view squashed: each view's scores are squashed before they are drawn,
# as the released maps squash the grid. (Under the flips the released maps
# squash the views' mean, so the two differ there.)
@pytest.mark.parametrize('tta,squash', [('none', 'sigmoid'), ('flips', 'none')])
def test_cells_at_the_released_centres_give_the_released_maps(tta, squash):
  e = default.get_config().eval
  e.tta, e.squash = tta, squash
  e.image_score = 'map_max'  # The map's peak: from the maps.
  released = _tiny_predict(e, None)
  axis = cells.released_axis(12, 24)  # TinyBackbone's layer2: stride 2.
  drawn = _tiny_predict(e, (axis, axis))
  np.testing.assert_allclose(drawn['anomaly_maps'], released['anomaly_maps'],
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(drawn['image_scores'], released['image_scores'],
                             rtol=1e-6)


def test_cells_one_stride_later_move_the_map_by_a_stride():
  e = default.get_config().eval
  e.sigma = 0.0
  released = np.asarray(_tiny_predict(e, None)['anomaly_maps'])
  stride, offset = cells.released_axis(12, 24)
  later = (stride, offset + stride)
  moved = np.asarray(_tiny_predict(e, (later, later))['anomaly_maps'])
  np.testing.assert_allclose(moved[:, 2:, 2:], released[:, :-2, :-2],
                             atol=1e-6)
  assert np.abs(moved - released).max() > 1e-3


def test_cells_for_measures_once_and_only_when_asked(capsys):
  c = default.get_config()
  c.model.pretrain_embed_dim = c.model.target_embed_dim = 16
  module, bvars = helpers.TinyBackbone(), helpers.tiny_backbone_vars()
  args = (module, ('layer2', 'layer3'), c.model, bvars, (24, 24))
  assert scoring.cells_for(c.eval, *args) is None
  c.eval.cells = 'measured'
  first = scoring.cells_for(c.eval, *args)
  assert scoring.cells_for(c.eval, *args) is first
  # The console says where the cells went, once.
  said = [l for l in capsys.readouterr().out.splitlines() if 'eval.cells' in l]
  assert said == [
      'eval.cells=measured: the maps draw cell (i, j) at pixel (2 i '
      f'{first[0][1]:+.2f}, 2 j {first[1][1]:+.2f}) of 24 x 24, where its '
      'feature looks (released: +0.50, +0.50)'], said
  # Flax's 'SAME' pads stride 2 at the end: layer2's cell i covers pixels
  # 2i..2i+2 (centre 2i + 1), layer3's, resized onto it, 2i + 2.5; the
  # measured centre lies between, past the released 2i + 0.5.
  for stride, offset in first:
    assert stride == 2.0 and 1.0 <= offset <= 2.5, first


def test_stored_cells_are_drawn_without_measuring(monkeypatch, capsys):
  c = default.get_config()
  c.eval.cells = 'measured'
  monkeypatch.setattr(cells, 'measure', None)  # Calling it would fail.
  args = (helpers.TinyBackbone(), ('layer2', 'layer3'), c.model,
          helpers.tiny_backbone_vars(), (24, 24))
  stored = [[2.0, 1.25], [2.0, -0.5]]  # As JSON metadata holds them.
  assert scoring.cells_for(c.eval, *args, stored, 'ckpt') == (
      (2.0, 1.25), (2.0, -0.5))
  said = [l for l in capsys.readouterr().out.splitlines() if 'eval.cells' in l]
  assert said == [
      'eval.cells=measured: the maps draw cell (i, j) at pixel (2 i +1.25, 2 j '
      '-0.50) of 24 x 24, as training measured them (stored with the decision '
      'threshold)'], said
  # The released maps ignore what is stored.
  c.eval.cells = 'released'
  assert scoring.cells_for(c.eval, *args, stored, 'ckpt') is None
  c.eval.cells = 'measured'
  for bad in ([[2.0, 1.0]], [[2.0, 1.0], [0.0, 1.0]], [[2.0], [2.0, 1.0]],
              [[2.0, 'x'], [2.0, 1.0]], [[2.0, float('nan')], [2.0, 1.0]],
              'measured'):
    with pytest.raises(errors.UserError, match='^ckpt: stored cells'):
      scoring.cells_for(c.eval, *args, bad, 'ckpt')
  assert cells.from_stored(cells.to_stored(((8.0, 3.37), (8.0, -4.0)))) == (
      (8.0, 3.37), (8.0, -4.0))


def test_each_flipped_view_is_drawn_at_its_own_cells():
  # 4 cells over 8 px at (2, 0): the image's cell i at pixel 2i; a view
  # flipped left-right, flipped back, at 7 - (2 (3 - i) + 0) = 2i + 1.
  axis = (2.0, 0.0)
  hot = jnp.zeros((1, 4, 4)).at[0, 0, 1].set(1.0)
  field = np.asarray(scoring.cell_field(
      [((), jnp.zeros((1, 4, 4))), ((2,), hot)], (8, 8), (axis, axis)))
  # The flipped view's hot cell (row 0, column 1) at pixel (0, 3), half of
  # the two views' mean; half-way to its neighbours 2 px off.
  np.testing.assert_allclose(field[0, 0, :6], [0, 0, .25, .5, .25, 0])
  np.testing.assert_allclose(field[0, 1, 3], .25)  # Rows at 2i, unflipped.
  assert field.max() == pytest.approx(.5)

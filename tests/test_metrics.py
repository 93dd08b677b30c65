"""Metrics against hand-worked cases and slow, obviously-correct references."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from configs.default import get_config
import helpers
from simplenet_jax import metrics

MAX_FPR = get_config().eval.aupro_max_fpr


def _pixel(maps, masks, max_fpr=MAX_FPR, **kw):
  m = metrics.PixelMetrics(max_fpr=max_fpr, **kw)
  m.add(np.asarray(maps, np.float32), np.asarray(masks, np.uint8))
  return m


# ---- image AUROC ------------------------------------------------------------


def test_image_auroc_hand_computed_with_ties():
  # Positives 3, 2, 2; negatives 2, 1, 0; 9 (pos, neg) pairs. Pos 3 beats all
  # three (3); each pos 2 ties neg 2 (0.5) and beats 1 and 0 (2): 2.5 + 2.5.
  # Total 8 / 9.
  scores = [3, 2, 2, 2, 1, 0]
  labels = [1, 1, 1, 0, 0, 0]
  assert metrics.image_auroc(scores, labels) == pytest.approx(8 / 9)


def test_image_auroc_classic_example():
  # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) lose, (0.8, *) win: 3/4.
  assert metrics.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


@pytest.mark.parametrize('labels', [[0, 0, 0], [1, 1, 1]])
def test_image_auroc_one_class_is_nan_with_warning(labels):
  with pytest.warns(metrics.MetricWarning, match='Image AUROC.*all 3 test'):
    value = metrics.image_auroc([0.1, 0.2, 0.3], labels)
  assert math.isnan(value)


def test_image_auroc_non_finite_scores_are_nan_with_warning():
  with pytest.warns(metrics.MetricWarning, match='not finite'):
    assert math.isnan(metrics.image_auroc([0.1, np.nan, 0.3], [0, 1, 1]))


def test_image_auroc_rejects_bad_input():
  with pytest.raises(ValueError, match='labels'):
    metrics.image_auroc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match='3 scores but 2 labels'):
    metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])


# ---- pixel AUROC ------------------------------------------------------------


def test_pixel_auroc_hand_computed_with_ties():
  # The image AUROC example above laid out as a 2x3 map: 8/9.
  maps = [[[3, 2, 2], [2, 1, 0]]]
  masks = [[[1, 1, 1], [0, 0, 0]]]
  assert _pixel(maps, masks).compute()['pixel_auroc'] == pytest.approx(8 / 9)


def test_pixel_auroc_matches_sklearn_on_random_tied_data():
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 20, size=(5, 9, 11)).astype(np.float32)
  masks = rng.random((5, 9, 11)) < 0.2
  maps += 3 * masks  # Informative but overlapping.
  want = roc_auc_score(masks.ravel(), maps.ravel())
  assert _pixel(maps, masks).compute()['pixel_auroc'] == pytest.approx(want, abs=1e-12)


# ---- AUPRO: hand-worked cases -----------------------------------------------


def test_aupro_one_region_ranked_first_is_one():
  # 4x4 image, region = top-left 2x2 at score 1, the 12 normal pixels at 0.
  # t=1: PRO 1 at FPR 0; t=0: FPR 1. Curve (0,0) (0,1) (1,1): area over
  # [0, 0.3] is 0.3, normalised 1.
  maps = np.zeros((1, 4, 4))
  masks = np.zeros((1, 4, 4))
  maps[0, :2, :2] = masks[0, :2, :2] = 1
  assert _pixel(maps, masks).compute()['aupro'] == pytest.approx(1.0)


def test_aupro_two_regions_only_one_found_before_any_false_positive():
  # 3x7 image. Region A = (1,1), 1 pixel, score 0.9; region B = (1,4),(1,5),
  # score 0.1 (B touches no A pixel, so two regions). 18 normal pixels: 9 at
  # 0.5, 9 at 0.3. Thresholds: 0.9 -> FPR 0, PRO (1 + 0)/2 = 0.5; 0.5 -> FPR
  # 0.5, PRO 0.5; 0.3 -> FPR 1, PRO 0.5; 0.1 -> FPR 1, PRO 1. Over [0, 0.3]
  # the curve is flat at 0.5: area 0.15, normalised 0.5.
  maps = np.zeros((1, 3, 7))
  masks = np.zeros((1, 3, 7))
  normal = np.ones((3, 7), bool)
  normal[1, 1] = normal[1, 4] = normal[1, 5] = False
  idx = np.flatnonzero(normal)
  maps.reshape(-1)[idx[:9]] = 0.5
  maps.reshape(-1)[idx[9:]] = 0.3
  maps[0, 1, 1] = 0.9
  maps[0, 1, 4] = maps[0, 1, 5] = 0.1
  masks[0, 1, 1] = masks[0, 1, 4] = masks[0, 1, 5] = 1
  assert _pixel(maps, masks).compute()['aupro'] == pytest.approx(0.5)


def _tie_case():
  # 3x4 image, one region of 2 pixels: (0,0) at 1.0 and (0,1) at 0.8. Of the
  # 10 normal pixels 5 are at 0.8 (tied with the second region pixel) and 5 at
  # 0.0. Thresholds: 1.0 -> (FPR 0, PRO 0.5); 0.8 -> the tied pixels enter
  # together -> (0.5, 1.0); 0.0 -> (1, 1).
  maps = np.zeros((1, 3, 4))
  masks = np.zeros((1, 3, 4))
  masks[0, 0, :2] = 1
  maps[0, 0, 0] = 1.0
  maps[0, 0, 1] = 0.8
  maps[0, 1, :] = 0.8
  maps[0, 2, 0] = 0.8
  return maps, masks


def test_aupro_interpolates_at_max_fpr_and_merges_ties():
  # PRO at FPR 0.3 on the segment (0, 0.5)-(0.5, 1): 0.5 + 0.5 * 0.3/0.5 =
  # 0.8. Area 0.5 * (0.5 + 0.8) * 0.3 = 0.195; / 0.3 = 0.65. (Entering the
  # tied pixels one by one would give 1.0 or 0.5 depending on their order.)
  maps, masks = _tie_case()
  assert _pixel(maps, masks, max_fpr=0.3).compute()['aupro'] == pytest.approx(0.65)


def test_aupro_limit_on_a_curve_point():
  # Same curve, limit 0.5 = a curve point: 0.5 * (0.5 + 1) * 0.5 = 0.375;
  # / 0.5 = 0.75.
  maps, masks = _tie_case()
  assert _pixel(maps, masks, max_fpr=0.5).compute()['aupro'] == pytest.approx(0.75)


def test_aupro_full_range():
  # Limit 1: 0.375 (up to FPR 0.5) + 0.5 * 1 = 0.875.
  maps, masks = _tie_case()
  assert _pixel(maps, masks, max_fpr=1.0).compute()['aupro'] == pytest.approx(0.875)


def test_aupro_averages_regions_not_pixels_and_pools_fpr_over_images():
  # Image 1 (2x4): a 4-pixel region at 0.9, 4 normal pixels at 0.5. Image 2
  # (2x4): a 1-pixel region at 0.1, 7 normal pixels at 0.5. At t=0.9 PRO is
  # (1 + 0) / 2 = 0.5 (pixel-wise overlap would be 4/5) at FPR 0; at 0.5 all
  # 11 normal pixels enter (FPR 1). AUPRO 0.5.
  maps = np.full((2, 2, 4), 0.5)
  masks = np.zeros((2, 2, 4))
  maps[0, 0, :] = 0.9
  masks[0, 0, :] = 1
  maps[1, 1, 3] = 0.1
  masks[1, 1, 3] = 1
  assert _pixel(maps, masks).compute()['aupro'] == pytest.approx(0.5)


def test_aupro_regions_are_8_connected():
  # Mask pixels (0,0), (0,1), (1,2): with 8-connectivity (MVTec AD's
  # reference) one region of 3; with 4-connectivity two regions (2 and 1).
  # Only (1,2) scores above the 6 normal pixels: PRO 1/3 at FPR 0 (4-conn.
  # would give (0 + 1)/2). Then all normals at once -> FPR 1. AUPRO 1/3.
  maps = np.full((1, 3, 3), 0.5)
  masks = np.zeros((1, 3, 3))
  masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = 1
  maps[0, 0, 0] = maps[0, 0, 1] = 0.0
  maps[0, 1, 2] = 1.0
  assert _pixel(maps, masks).compute()['aupro'] == pytest.approx(1 / 3)


def test_regions_do_not_connect_across_images():
  # Image 1 (2x2): region (0,0) at 1.0. Image 2: region (0,0),(0,1) at 0.0,
  # lying under image 1's region. The 5 normal pixels are at 0.5. Separate
  # regions: PRO (1 + 0)/2 = 0.5 at FPR 0, then FPR 1: AUPRO 0.5. Regions
  # joined through the image axis would be one region of 3: AUPRO 1/3.
  maps = np.full((2, 2, 2), 0.5)
  masks = np.zeros((2, 2, 2))
  masks[0, 0, 0] = 1
  maps[0, 0, 0] = 1.0
  masks[1, 0, 0] = masks[1, 0, 1] = 1
  maps[1, 0, 0] = maps[1, 0, 1] = 0.0
  assert _pixel(maps, masks).compute()['aupro'] == pytest.approx(0.5)


# ---- AUPRO: against a slow threshold loop -----------------------------------


@pytest.mark.parametrize('seed,max_fpr', [(0, 0.3), (1, 0.3), (2, 0.05),
                                          (3, 1.0)])
def test_aupro_matches_slow_reference_on_random_data(seed, max_fpr):
  rng = np.random.default_rng(seed)
  n, h, w = 4, 12, 13
  masks = ndimage.binary_opening(rng.random((n, h, w)) < 0.35,
                                 np.ones((1, 2, 2))).astype(np.uint8)
  masks[0] = 0  # A normal image: it adds only normal pixels.
  # Quantised scores: many ties, within and across classes.
  maps = np.round(rng.random((n, h, w)) * 10 + 4 * masks) / 2
  assert masks.sum() > 0
  m = metrics.PixelMetrics(max_fpr=max_fpr)
  m.add(maps[:1], masks[:1])  # Several batches.
  m.add(maps[1:], masks[1:])
  assert m.compute()['aupro'] == pytest.approx(helpers.slow_aupro(maps, masks, max_fpr),
                                    abs=1e-9)


# ---- curves for the report ---------------------------------------------------


def test_pro_curve_hand_case_ends_at_the_limit():
  # _tie_case: (0, 0), (0, 0.5) at t=1.0, then (0.5, 1.0) at t=0.8; cut at
  # FPR 0.3 on that segment: PRO 0.5 + 0.5 * 0.3 / 0.5 = 0.8.
  maps, masks = _tie_case()
  out = _pixel(maps, masks, max_fpr=0.3).compute(curve_points=100)
  fpr, pro = out['pro_curve']
  np.testing.assert_allclose(fpr, [0.0, 0.0, 0.3])
  np.testing.assert_allclose(pro, [0.0, 0.5, 0.8])
  assert out['aupro'] == pytest.approx(0.65)
  # Limit 1: the whole curve, no interpolated point.
  fpr, pro = _pixel(maps, masks, max_fpr=1.0).compute(
      curve_points=100)['pro_curve']
  np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(pro, [0.0, 0.5, 1.0, 1.0, 1.0])


@pytest.mark.parametrize('seed,max_fpr', [(0, 0.3), (3, 1.0)])
def test_pro_curve_matches_slow_reference(seed, max_fpr):
  rng = np.random.default_rng(seed)
  masks = ndimage.binary_opening(rng.random((4, 12, 13)) < 0.35,
                                 np.ones((1, 2, 2))).astype(np.uint8)
  assert masks.sum() > 0
  maps = np.round(rng.random((4, 12, 13)) * 10 + 4 * masks) / 2
  xs, ys = helpers.slow_pro_curve(maps, masks)
  want_x, want_y = [0.0], [0.0]
  for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
    if x1 <= max_fpr:
      want_x.append(x1)
      want_y.append(y1)
    elif x0 < max_fpr:
      want_x.append(max_fpr)
      want_y.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
  fpr, pro = _pixel(maps, masks, max_fpr=max_fpr).compute(
      curve_points=10_000)['pro_curve']
  np.testing.assert_allclose(fpr, want_x, atol=1e-12)
  np.testing.assert_allclose(pro, want_y, atol=1e-9)


def test_pro_curve_absent_unless_asked_and_none_when_undefined():
  maps, masks = _tie_case()
  assert 'pro_curve' not in _pixel(maps, masks).compute()
  with pytest.warns(metrics.MetricWarning):
    out = _pixel(maps, np.zeros_like(masks)).compute(curve_points=10)
  assert out['pro_curve'] is None


def test_thin_curve_keeps_ends_and_order():
  x = np.sort(np.random.default_rng(0).random(10_000))
  y = np.cumsum(np.ones_like(x))
  tx, ty = metrics.thin_curve(x, y, 200)
  assert tx.size <= 202
  assert tx[0] == x[0] and tx[-1] == x[-1] and ty[-1] == y[-1]
  assert np.all(np.diff(tx) >= 0)
  # Every kept point is a point of the curve.
  np.testing.assert_array_equal(ty - 1, np.searchsorted(x, tx))
  # Gaps along x stay small: no more than 2 / 100 of the range.
  assert np.diff(tx).max() <= 0.02 * (x[-1] - x[0])
  short = metrics.thin_curve([0.0, 1.0], [0.0, 1.0], 200)
  np.testing.assert_array_equal(short[0], [0.0, 1.0])


def test_image_roc_hand_computed():
  # Descending: 0.8 (pos) -> (0, 0.5); 0.4 (neg) -> (0.5, 0.5); 0.35 (pos)
  # -> (0.5, 1); 0.1 (neg) -> (1, 1); from (0, 0).
  fpr, tpr = metrics.image_roc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  assert metrics.image_roc([0.1, 0.2], [1, 1]) is None
  assert metrics.image_roc([0.1, np.nan], [0, 1]) is None


# ---- undefined cases and streaming -------------------------------------------


@pytest.mark.parametrize('fill', [0, 1])
def test_one_class_masks_give_nan_and_a_warning(fill):
  m = _pixel(np.random.default_rng(0).random((2, 4, 4)),
             np.full((2, 4, 4), fill))
  with pytest.warns(metrics.MetricWarning, match='Pixel AUROC and AUPRO'):
    out = m.compute()
  assert math.isnan(out['pixel_auroc']) and math.isnan(out['aupro'])


def test_no_images_and_non_finite_maps_give_nan():
  with pytest.warns(metrics.MetricWarning, match='no images'):
    assert math.isnan(metrics.PixelMetrics(max_fpr=MAX_FPR).compute()['aupro'])
  maps, masks = _tie_case()
  maps[0, 2, 3] = np.inf
  with pytest.warns(metrics.MetricWarning, match='1 pixel scores'):
    assert math.isnan(_pixel(maps, masks).compute()['pixel_auroc'])


def test_masks_none_means_all_normal():
  maps, masks = _tie_case()
  m = metrics.PixelMetrics(max_fpr=MAX_FPR)
  m.add(maps, masks)
  m.add(np.full((1, 3, 4), 0.9), None)  # 12 more normals, above 0.8.
  # AUROC by hand: 2 positives, 22 negatives. Pixel at 1.0 beats all 22. Pixel
  # at 0.8 loses to the 12 at 0.9, ties the 5 at 0.8, beats the 5 at 0:
  # 5 + 2.5 = 7.5. (22 + 7.5) / 44.
  assert m.compute()['pixel_auroc'] == pytest.approx(29.5 / 44)


def test_compute_gives_both_metrics_from_one_call():
  rng = np.random.default_rng(5)
  maps = rng.random((3, 6, 6)).astype(np.float32)
  masks = rng.random((3, 6, 6)) < 0.3
  out = _pixel(maps, masks).compute()
  assert set(out) == {'pixel_auroc', 'aupro'}
  assert all(type(v) is float for v in out.values())  # JSON-ready.
  assert out['pixel_auroc'] == pytest.approx(
      roc_auc_score(masks.ravel(), maps.ravel()))
  assert out['aupro'] == pytest.approx(helpers.slow_aupro(maps, masks,
                                                          MAX_FPR))


@pytest.mark.parametrize('expected', [None, 2, 7])
def test_streaming_buffers(expected):
  rng = np.random.default_rng(1)
  maps = rng.random((7, 5, 6))
  masks = (rng.random((7, 5, 6)) < 0.3).astype(np.uint8) * 255
  m = metrics.PixelMetrics(expected_images=expected, max_fpr=MAX_FPR)
  for i in range(0, 7, 2):
    m.add(maps[i:i + 2], masks[i:i + 2])
  # pylint: disable=protected-access
  stored_maps, stored_masks = m._scores[:7], m._masks[:7]
  assert stored_maps.dtype == np.float32 and stored_masks.dtype == bool
  np.testing.assert_array_equal(stored_maps, maps.astype(np.float32))
  np.testing.assert_array_equal(stored_masks, masks > 0)
  assert m.score_range() == (np.float32(maps.min()), np.float32(maps.max()))
  assert m.compute()['pixel_auroc'] == pytest.approx(
      roc_auc_score(masks.ravel() > 0, maps.astype(np.float32).ravel()))
  held = m._scores.nbytes + m._masks.nbytes
  if expected == 7:
    # Exactly one float32 and one bool copy: 5 bytes per pixel.
    assert held == 7 * 5 * 6 * 5
  else:
    assert held <= 2 * 7 * 5 * 6 * 5  # Doubling at most.


def test_add_rejects_bad_shapes():
  m = metrics.PixelMetrics(max_fpr=MAX_FPR)
  with pytest.raises(ValueError, match='masks'):
    m.add(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
  with pytest.raises(ValueError, match=r'\(B, H, W\)'):
    m.add(np.zeros((4, 4)))
  m.add(np.zeros((1, 4, 4)))
  with pytest.raises(ValueError, match='all must match'):
    m.add(np.zeros((1, 5, 4)))
  with pytest.raises(ValueError, match='max_fpr'):
    metrics.PixelMetrics(max_fpr=0.0)


def test_decision_counts():
  scores = [0.1, 0.9, 0.5, 0.7, float('nan'), 0.5]
  labels = [0, 0, 1, 1, 1, 0]
  # Above 0.5 (not at it): normal 0.9; anomalous 0.7. NaN is never flagged.
  assert metrics.decision_counts(scores, labels, 0.5) == dict(
      normal=3, false_alarms=1, anomalous=3, caught=1)
  assert metrics.decision_counts(scores, labels, 1.0) == dict(
      normal=3, false_alarms=0, anomalous=3, caught=0)


def test_by_defect_scores_each_type_against_every_normal_image():
  # Images: two normal, two of type 'crack', two of type 'hole'.
  defects = np.array(['good', 'hole', 'good', 'crack', 'hole', 'crack'])
  labels = (defects != 'good').astype(int)
  scores = np.array([0.0, 0.5, 1.0, 2.0, -1.0, 3.0])
  rng = np.random.default_rng(0)
  maps = rng.uniform(0, 1, (6, 4, 4)).astype(np.float32)
  masks = np.zeros((6, 4, 4), np.uint8)
  masks[1, 0, 0] = masks[4, 3, 3] = masks[3, 1:3, 1] = masks[5, 2, 2] = 1
  maps[3, 1:3, 1] = maps[5, 2, 2] = 2.0  # The cracks stand out; holes not.
  pixel = metrics.PixelMetrics(max_fpr=0.3)
  pixel.add(maps[:4], masks[:4])
  pixel.add(maps[4:], masks[4:])
  out = metrics.by_defect(scores, labels, defects, pixel, threshold=1.5)
  assert list(out) == ['crack', 'hole']
  # crack (2, 3) above both normal images (0, 1); hole (0.5, -1) above one
  # of the four pairs.
  assert out['crack']['image_auroc'] == 1.0
  assert out['hole']['image_auroc'] == 0.25
  assert (out['crack']['n'], out['hole']['n']) == (2, 2)
  assert (out['crack']['caught'], out['hole']['caught']) == (2, 0)
  for kind, images in (('crack', [0, 2, 3, 5]), ('hole', [0, 1, 2, 4])):
    assert out[kind]['pixel_auroc'] == pytest.approx(roc_auc_score(
        masks[images].ravel(), maps[images].ravel()), abs=1e-12)
    alone = metrics.PixelMetrics(max_fpr=0.3)
    alone.add(maps[images], masks[images])
    assert out[kind]['aupro'] == pytest.approx(alone.compute()['aupro'],
                                               abs=1e-12)
  assert out['crack']['pixel_auroc'] == 1.0 and out['crack']['aupro'] == 1.0
  # No threshold: nothing caught is reported; no maps: no pixel figures.
  plain = metrics.by_defect(scores, labels, defects)
  assert 'caught' not in plain['hole'] and math.isnan(plain['hole']['aupro'])
  # One defect type: the whole test set's figures already are its.
  assert metrics.by_defect(scores[:4], labels[:4],
                           ['good', 'hole', 'good', 'hole']) == {}
  with pytest.raises(ValueError, match='6 scores, 6 labels and 5 defect'):
    metrics.by_defect(scores, labels, defects[:5])


def test_pixel_metrics_subset_sees_only_its_images():
  maps = np.zeros((3, 2, 2), np.float32)
  masks = np.zeros((3, 2, 2), np.uint8)
  masks[0, 0, 0] = masks[1, 0, 0] = 1
  maps[0, 0, 0] = 1.0
  maps[2] = np.nan  # Not finite, but not in the subset.
  pixel = metrics.PixelMetrics(max_fpr=0.3)
  pixel.add(maps, masks)
  assert pixel.subset([0]).compute()['pixel_auroc'] == 1.0
  # Image 1's defect scores 0 like every normal pixel: a tie, half credit.
  assert pixel.subset([0, 1]).compute()['pixel_auroc'] == pytest.approx(
      roc_auc_score(masks[:2].ravel(), maps[:2].ravel()))
  with pytest.warns(metrics.MetricWarning, match='not finite'):
    assert math.isnan(pixel.subset([0, 2]).compute()['pixel_auroc'])

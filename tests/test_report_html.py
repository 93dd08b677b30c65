"""report.html and predictions.html: their contents, that they hold
everything they show, and a real browser (headless Chromium) loading them.

In process: a demo-sized workdir written through eval_record / report (three
categories of 128 px images, 40 passes of log, full galleries), rendered and
read back. Through main.py: a tiny training run on the awkward data set
(console, log file, TensorBoard events, report.html) and predict mode
(predictions.html). Chromium is Debian's `chromium` package; without it the
browser tests skip, except in CI (CI=true), where they fail.
"""

import html
import html.parser
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
from PIL import Image
import pytest

import conftest
from simplenet_jax import eval_record
from simplenet_jax import report
from simplenet_jax import report_html
from simplenet_jax import visualize
from test_summaries import read_events

# ---- reading pages -----------------------------------------------------------


class _Page(html.parser.HTMLParser):
  """The <img> attributes, the tables' cell texts (by table id) and the tags
  of a page."""

  def __init__(self, text):
    super().__init__(convert_charrefs=True)
    self.imgs, self.tables, self.tags = [], {}, set()
    self._table = self._row = self._cell = None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.add(tag)
    if tag == 'img':
      self.imgs.append(attrs)
    elif tag == 'table':
      self._table = self.tables.setdefault(attrs.get('id', ''), [])
    elif tag == 'tr' and self._table is not None:
      self._row = []
      self._table.append(self._row)
    elif tag in ('td', 'th') and self._row is not None:
      self._cell = []

  def handle_endtag(self, tag):
    if tag in ('td', 'th') and self._cell is not None:
      self._row.append(' '.join(''.join(self._cell).split()))
      self._cell = None
    elif tag == 'table':
      self._table = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell.append(data)


def _pct(v):
  """A fraction from results.json as the page prints it."""
  return 'n/a' if v is None or math.isnan(v) else f'{100 * v:.1f}'


def _expected_table(rows):
  """The results table as the test expects it, from results.json's rows."""
  keys = report.METRICS + (('knn_image_auroc', 'knn_pixel_auroc', 'knn_aupro')
                            if any('knn_aupro' in r for r in rows) else ())
  out = [[r['category'], r['kind']] + [_pct(r[m]) for m in keys] for r in rows]
  for key, label, _ in report.MEAN_ROWS:
    group = [r for r in rows if key == 'all' or r['kind'] == key]
    if group:
      means = []
      for m in keys:
        vals = [r[m] for r in group if r[m] is not None and not math.isnan(
            r[m])]
        means.append(_pct(sum(vals) / len(vals) if vals else None))
      out.append([label, ''] + means)
  return out


def _decoded(src):
  """A data: URI's image, decoded (an error if it is not one)."""
  assert src.startswith('data:image/'), src[:40]
  import base64  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  data = base64.b64decode(src.split(',', 1)[1], validate=True)
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    return im.size


# ---- the browser -------------------------------------------------------------

CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu',
                  '--disable-quic', '--no-first-run',
                  '--disable-background-networking',
                  '--disable-component-update', '--disable-sync',
                  '--hide-scrollbars', '--mute-audio')
# Added to a copy of the page only: records, once everything has loaded, how
# each image decoded, where --dump-dom can read it.
PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.push({alt: im.alt, complete: im.complete, width: im.naturalWidth,
              height: im.naturalHeight, data: im.src.indexOf('data:') === 0});
  }
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium():
  for name in ('chromium', 'chromium-browser'):
    path = shutil.which(name)
    if path:
      return path
  why = ('headless Chromium is not installed: apt-get install -y chromium '
         '(.ci/run installs it)')
  if os.environ.get('CI') == 'true':
    pytest.fail(why)
  pytest.skip(why)


def browse(page, tmp_path, height=2400):
  """Loads `page` in headless Chromium: (the DOM after load as text, the
  probe's image records, the screenshot as an (H, W, 3) array). One browser
  run: the DOM is dumped and the screenshot taken once loading is done."""
  exe = _chromium()
  text = page.read_text(encoding='utf-8')
  assert text.count('</body>') == 1
  probe = tmp_path / f'probe-{page.name}'
  probe.write_text(text.replace('</body>', PROBE + '</body>'),
                   encoding='utf-8')
  shot = tmp_path / f'{page.stem}.png'
  proc = subprocess.run(
      [exe, *CHROMIUM_FLAGS, f'--user-data-dir={tmp_path / "profile"}',
       '--virtual-time-budget=10000', f'--window-size=1300,{height}',
       f'--screenshot={shot}', '--dump-dom', probe.as_uri()],
      capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
  assert found, 'the page did not finish loading: ' + proc.stdout[-500:]
  images = json.loads(html.unescape(found.group(1)))
  assert shot.is_file(), proc.stderr[-2000:]
  with Image.open(shot) as im:
    pixels = np.asarray(im.convert('RGB')).astype(int)
  return proc.stdout, images, pixels


def _assert_rendered(images, pixels, n_images):
  """Every image decoded in the browser, and the screenshot shows a styled
  page with pictures, not a blank or unstyled one."""
  assert len(images) == n_images
  bad = [im for im in images if not (im['data'] and im['complete'] and
                                     im['width'] > 0 and im['height'] > 0)]
  assert not bad, bad
  header = np.array([0x1d, 0x24, 0x30])  # The CSS's header colour.
  assert np.abs(pixels[10, 10] - header).max() <= 2
  background = (np.abs(pixels - [0xf4, 0xf6, 0xf9]).max(-1) <= 2) | (
      pixels.min(-1) >= 253)
  assert background.mean() < 0.9
  colours = np.unique(pixels.reshape(-1, 3) // 8, axis=0)
  assert len(colours) > 300  # Plots and photographs, not flat boxes.


# ---- a demo-sized workdir, in process ----------------------------------------

DEMO = (('brick', 'texture'), ('grass', 'texture'), ('gravel', 'texture'))


def _write_category(workdir, category, kind, rng, hw=128, n_good=10,
                    n_bad=15, masks=True, gallery=4, yardstick=False):
  cat_dir = workdir / category
  labels = np.array([0] * n_good + [1] * n_bad)
  scores = rng.normal(labels * 1.5, 1.0)
  names = [f'{"good" if l == 0 else "hole"}/{i:03d}.png'
           for i, l in enumerate(labels)]
  galleries = eval_record.select_galleries(scores, labels, gallery)
  shown = sorted({i for v in galleries.values() for i in v})
  yy, xx = np.mgrid[:hw, :hw]
  items = []
  for i in shown:
    image = np.stack([(xx * 2 + i) % 256, (yy * 2) % 256,
                      np.full((hw, hw), 90)], -1).astype(np.uint8)
    mask = ((yy - 60) ** 2 + (xx - 50) ** 2 < 15 ** 2) * labels[i]
    amap = np.exp(-((yy - 60) ** 2 + (xx - 50) ** 2) / 600.0) * scores[i]
    items.append((i, image, amap, mask if masks else None))
  fpr = np.linspace(0, 0.3, 50)
  record = dict(
      category=category, kind=kind, passes=40, image_hw=[hw, hw], n_train=18,
      n_holdout=2, threshold=1.0, threshold_source='quantile 0.99 of image '
      'scores over 2 held-out normal training images', map_range=None,
      max_fpr=0.3, names=names, labels=labels.tolist(),
      scores=scores.tolist(),
      roc={'fpr': [0, 0.2, 1], 'tpr': [0, 0.8, 1]},
      pro_curve={'fpr': fpr.tolist(), 'pro': np.sqrt(fpr / 0.3).tolist()}
      if masks else None, galleries=galleries)
  eval_record.write(str(cat_dir), record, items, scale=2)
  if yardstick:  # kNN's maps of the same images, on a scale of their own.
    eval_record.add_yardstick(
        str(cat_dir), [(i, im, 50 + 20 * m, k) for i, im, m, k in items],
        {i: 50 + 20 * float(scores[i]) for i in shown}, None, scale=2)
  with open(cat_dir / 'log.jsonl', 'w', encoding='utf-8') as f:
    for p in range(1, 41):
      f.write(json.dumps({'pass': p, 'loss': 1.2 / p, 'p_true': 1 - 1 / p,
                          'p_fake': 1 - 1.5 / (p + 1), 'lr_adaptor': 1e-4,
                          'lr_discriminator': 2e-4}) + '\n')
  visualize.feature_std_histogram(rng.gamma(2, 1, 384), rng.gamma(5, 1, 384),
                                  str(cat_dir / 'feature_std.png'))
  return len(shown) * (2 if yardstick else 1)  # The tiles the report shows.


def _demo_workdir(workdir, rows_extra=()):
  rng = np.random.default_rng(0)
  rows, tiles = [], {}
  for category, kind in DEMO:
    # grass as with eval.yardstick: kNN's maps under the head's.
    tiles[category] = _write_category(workdir, category, kind, rng,
                                      yardstick=category == 'grass')
    rows.append({'category': category, 'kind': kind, 'n_test': 25,
                 'image_auroc': float(rng.uniform(0.7, 1)),
                 'pixel_auroc': float(rng.uniform(0.7, 1)),
                 'aupro': float(rng.uniform(0.4, 1))})
  rows += list(rows_extra)
  from configs import demo  # pylint: disable=g-import-not-at-top
  extra = {'mode': 'train', 'config': json.loads(
      demo.get_config().to_json_best_effort()), 'devices': ['cpu:0'],
           'timings': {'backbone': 2.5, 'categories': {
               c: {'setup': 1.0, 'train': 30.0, 'evaluate': 3.0}
               for c, _ in DEMO}, 'total': 205.0}}
  report.write_results(str(workdir), rows, extra)
  return rows, tiles


def test_yardstick_columns_and_facts(tmp_path):
  """Rows with the kNN yardstick's figures: three more columns in the
  results table, means included, a note under it and a fact per category."""
  rows = [{'category': 'a', 'kind': 'texture', 'image_auroc': 0.9,
           'pixel_auroc': 0.8, 'aupro': 0.7, 'knn_image_auroc': 1.0,
           'knn_pixel_auroc': 0.99, 'knn_aupro': 0.95},
          {'category': 'b', 'kind': 'texture', 'image_auroc': 0.7,
           'pixel_auroc': 0.6, 'aupro': 0.5, 'knn_image_auroc': 0.8,
           'knn_pixel_auroc': 0.97, 'knn_aupro': 0.85}]
  laps = {'setup': 1.0, 'train': 2.0, 'evaluate': 3.0, 'kNN yardstick': 4.0,
          'trained_with': ['a', 'b']}
  report.write_results(str(tmp_path), rows, {
      'mode': 'train', 'timings': {'categories': {'a': laps}}})
  text = open(report_html.write_report(str(tmp_path)), encoding='utf-8').read()
  assert _Page(text).tables['timings'][0][-2:] == ['kNN yardstick', 'total']
  assert _Page(text).tables['timings'][1] == [
      'a (train time shared with b)', '1.0 s', '2.0 s', '3.0 s', '4.0 s',
      '10.0 s']
  table = _Page(text).tables['results']
  assert table[0][-3:] == ['kNN I-AUROC %', 'kNN P-AUROC %', 'kNN AUPRO %']
  assert table[1] == ['a', 'texture', '90.0', '80.0', '70.0', '100.0', '99.0',
                      '95.0']
  assert table[3] == ['texture mean', '', '80.0', '70.0', '60.0', '90.0',
                      '98.0', '90.0']
  assert 'kNN columns (eval.yardstick)' in text
  assert 'kNN on the same features (eval.yardstick): 80.0 / 97.0 / 85.0 %' in (
      text)


@pytest.mark.parametrize('key, fact', [
    ('saturated_at', 'a first attempt saturated the loss at pass 14: trained '
     'again from the start with a smaller noise (model.shrink_on_saturation'),
    ('stopped_at', 'pass 14 saturated the loss: training stopped there '
     '(model.stop_on_saturation)'),
])
def test_saturation_is_a_fact_of_its_category(tmp_path, key, fact):
  """A row whose training model.shrink_on_saturation restarted or
  model.stop_on_saturation ended (results.json's 'saturated_at' or
  'stopped_at') says so in its own section, and no other section does."""
  rows = [{'category': 'gravel', 'kind': 'texture', 'image_auroc': 0.97,
           'pixel_auroc': 0.96, 'aupro': 0.84, key: 14},
          {'category': 'brick', 'kind': 'texture', 'image_auroc': 1.0,
           'pixel_auroc': 0.99, 'aupro': 0.96}]
  report.write_results(str(tmp_path), rows, {'mode': 'train'})
  text = open(report_html.write_report(str(tmp_path)), encoding='utf-8').read()
  gravel = text[text.index('id="cat-gravel"'):text.index('id="cat-brick"')]
  assert fact in gravel
  assert text.count('saturated the loss') == 1


def test_restart_then_stop_are_both_facts(tmp_path):
  """Both switches acted (the demo and folder configs): the restart's fact,
  then the stop in the second attempt."""
  rows = [{'category': 'folder', 'kind': 'texture', 'image_auroc': 0.96,
           'pixel_auroc': 0.97, 'aupro': 0.90, 'saturated_at': 15,
           'stopped_at': 57}]
  report.write_results(str(tmp_path), rows, {'mode': 'train'})
  text = open(report_html.write_report(str(tmp_path)), encoding='utf-8').read()
  restart = text.index('a first attempt saturated the loss at pass 15')
  stop = text.index('pass 57 of the second attempt saturated the loss '
                    'again: training stopped there (model.stop_on_saturation)')
  assert restart < stop


def test_synthetic_check_is_a_fact_of_its_category(tmp_path):
  """eval.synthetic_defects' figure shows in its category's section, named
  as a comparison between runs, not a measure of real defects."""
  rows = [{'category': 'gravel', 'kind': 'texture', 'image_auroc': 0.97,
           'pixel_auroc': 0.96, 'aupro': 0.84,
           'synthetic_pixel_auroc': 0.5863,
           'synthetic_source': '96 synthetic defect images made from 6 '
                               'validation images (normal, not trained on)'},
          {'category': 'brick', 'kind': 'texture', 'image_auroc': 1.0,
           'pixel_auroc': 0.99, 'aupro': 0.96}]
  report.write_results(str(tmp_path), rows, {'mode': 'eval'})
  text = open(report_html.write_report(str(tmp_path)), encoding='utf-8').read()
  gravel = text[text.index('id="cat-gravel"'):text.index('id="cat-brick"')]
  assert ('synthetic defects (eval.synthetic_defects): P-AUROC 58.6 % on 96 '
          'synthetic defect images made from 6 validation images (normal, '
          'not trained on); for comparing runs that differ in '
          'train.augment, not a measure of real defects') in gravel
  assert text.count('synthetic defect images') == 1


def test_each_defect_type_is_a_row_of_its_category(tmp_path):
  """results.json's by_defect (and the yardstick's knn_by_defect) are a
  table in their category's section; no other section has one."""
  types = {'hole': {'n': 5, 'image_auroc': 1.0, 'pixel_auroc': 0.998,
                    'aupro': 0.971, 'caught': 5},
           'scratch': {'n': 4, 'image_auroc': 0.86, 'pixel_auroc': 0.828,
                       'aupro': float('nan'), 'caught': 3}}
  knn = {'hole': {'n': 5, 'image_auroc': 1.0, 'pixel_auroc': 0.9984,
                  'aupro': 0.98},
         'scratch': {'n': 4, 'image_auroc': 0.9, 'pixel_auroc': 0.8906,
                     'aupro': 0.75}}
  rows = [{'category': 'gravel', 'kind': 'texture', 'image_auroc': 0.95,
           'pixel_auroc': 0.975, 'aupro': 0.79, 'knn_image_auroc': 0.92,
           'knn_pixel_auroc': 0.976, 'knn_aupro': 0.83, 'by_defect': types,
           'knn_by_defect': knn},
          {'category': 'brick', 'kind': 'texture', 'image_auroc': 1.0,
           'pixel_auroc': 0.99, 'aupro': 0.96,
           'by_defect': {k: {m: x for m, x in v.items() if m != 'caught'}
                         for k, v in types.items()}}]
  report.write_results(str(tmp_path), rows, {'mode': 'eval'})
  text = open(report_html.write_report(str(tmp_path)), encoding='utf-8').read()
  tables = _Page(text).tables
  assert tables['by-defect-gravel'] == [
      ['Defect type', 'Images', 'I-AUROC %', 'P-AUROC %', 'AUPRO %',
       'Caught at the threshold', 'kNN I-AUROC %', 'kNN P-AUROC %',
       'kNN AUPRO %'],
      ['hole', '5', '100.0', '99.8', '97.1', '5 of 5', '100.0', '99.8',
       '98.0'],
      ['scratch', '4', '86.0', '82.8', 'n/a', '3 of 4', '90.0', '89.1',
       '75.0']]
  # Without a threshold or a yardstick, only the head's columns.
  assert tables['by-defect-brick'][0] == [
      'Defect type', 'Images', 'I-AUROC %', 'P-AUROC %', 'AUPRO %']
  gravel = text[text.index('id="cat-gravel"'):text.index('id="cat-brick"')]
  assert gravel.count('By defect type') == 1
  assert sorted(t for t in tables if t.startswith('by-defect')) == [
      'by-defect-brick', 'by-defect-gravel']


def test_select_galleries_by_hand():
  scores = [0.5, 3.0, 2.0, float('nan'), 1.0, 0.1]
  labels = [0, 1, 1, 0, 1, 0]
  got = eval_record.select_galleries(scores, labels, 2)
  assert got == {'top_defects': [1, 2],  # Anomalous 3.0, 2.0.
                 'false_positives': [3, 0],  # Normal: nan first, then 0.5.
                 'false_negatives': [4, 2]}  # Anomalous 1.0, 2.0.
  assert eval_record.select_galleries(scores, labels, 0) == {
      'top_defects': [], 'false_positives': [], 'false_negatives': []}


def test_run_section_names_the_method_and_its_noise():
  from configs import default, demo as demo_config  # pylint: disable=g-import-not-at-top
  text = report_html._training_text(default.get_config().to_dict())  # pylint: disable=protected-access
  assert text == '160 passes, batch 4, noise absolute: std 0.015'
  shrink = default.get_config()
  shrink.model.shrink_on_saturation = 0.25
  assert report_html._training_text(shrink.to_dict()) == (  # pylint: disable=protected-access
      '160 passes, batch 4, noise absolute: std 0.015 (x0.25, trained '
      'again, if the loss saturates)')
  stop = default.get_config()
  stop.model.stop_on_saturation = True
  assert report_html._training_text(stop.to_dict()) == (  # pylint: disable=protected-access
      '160 passes, batch 4, noise absolute: std 0.015 (training stops if the '
      'loss saturates)')
  stop.model.shrink_on_saturation = 0.25
  assert report_html._training_text(stop.to_dict()) == (  # pylint: disable=protected-access
      '160 passes, batch 4, noise absolute: std 0.015 (x0.25, trained '
      'again, if the loss saturates; training stops if it saturates again)')
  coarse = default.get_config()
  coarse.model.coarse_scale = 2
  assert report_html._training_text(coarse.to_dict()) == (  # pylint: disable=protected-access
      'the backbone layers after the first read from the image at 2x its '
      'size; 160 passes, batch 4, noise absolute: std 0.015')
  coarse.model.method = 'knn'
  assert report_html._training_text(coarse.to_dict()).startswith(  # pylint: disable=protected-access
      'the backbone layers after the first read from the image at 2x its '
      'size; kNN memory bank')
  layered = default.get_config()
  layered.model.noise_shape = 'layers'
  assert report_html._training_text(layered.to_dict()) == (  # pylint: disable=protected-access
      "160 passes, batch 4, noise absolute: std 0.015, each backbone "
      "layer's share at its own spread")
  text = report_html._training_text(demo_config.get_config().to_dict())  # pylint: disable=protected-access
  assert text == ('3 heads averaged, trained on each image and its '
                  'flips where they look normal (with a quarter or half of '
                  'the passes), each training feature moved a random part '
                  '(up to 1) of the way toward a neighbour in another image '
                  'where a category trains on flips, 40 passes, batch 4, '
                  'noise spread: 0.4 x spread of the adapted features '
                  '(x0.25, trained again, if the loss saturates; training '
                  'stops if it saturates again); synthesis: GAS hypersphere')
  mixed = default.get_config()
  mixed.train.neighbour_mix = 0.5  # In every category ('always').
  assert report_html._training_text(mixed.to_dict()) == (  # pylint: disable=protected-access
      'each training feature moved a random part (up to 0.5) of the way '
      'toward a neighbour in another image, 160 passes, batch 4, noise '
      'absolute: std 0.015')
  noproj = demo_config.get_config()
  noproj.model.pre_proj = 0
  assert report_html._training_text(noproj.to_dict()).startswith(  # pylint: disable=protected-access
      '3 heads averaged, no adaptor, trained on each image and its flips '
      'where they look normal (with a quarter or half of the passes), each '
      'training feature moved')
  text = report_html._scoring_text(demo_config.get_config().to_dict())  # pylint: disable=protected-access
  assert text == ('the image and its three flips, patch scores averaged; '
                  'image score: the peak of the anomaly map before the '
                  'squash; patch scores squashed for the maps, sigmoid(score '
                  '/ margin); maps smoothed with sigma 4.0')
  knn = demo_config.get_config()
  knn.model.method = 'knn'  # Distances are never squashed.
  assert 'squashed' not in report_html._scoring_text(knn.to_dict())  # pylint: disable=protected-access
  text = report_html._scoring_text(default.get_config().to_dict())  # pylint: disable=protected-access
  assert text == ('one pass; image score: the largest patch score; maps '
                  'smoothed with sigma 4.0')
  from configs import glass  # pylint: disable=g-import-not-at-top
  text = report_html._training_text(glass.get_config().to_dict())  # pylint: disable=protected-access
  assert text == ('640 passes, batch 8, noise absolute: std 0.015; '
                  'synthesis: GAS hypersphere, LAS (weight 1.0); '
                  'loss: binary cross-entropy; optimisers: glass')
  knn = default.get_config()
  knn.model.method = 'knn'
  assert report_html._training_text(knn.to_dict()) == (  # pylint: disable=protected-access
      'kNN memory bank, coreset fraction 0.1')
  knn.train.augment = 'flips'
  assert report_html._training_text(knn.to_dict()) == (  # pylint: disable=protected-access
      'kNN memory bank, coreset fraction 0.1; of each image and its three '
      'flips')
  flips = demo_config.get_config()
  flips.train.augment, flips.train.num_passes = 'flips', 10
  flips.train.neighbour_mix = 0.0  # Its own case above.
  assert report_html._training_text(flips.to_dict()).startswith(  # pylint: disable=protected-access
      '3 heads averaged, trained on each image and its three flips, 10 '
      'passes, batch 4, noise spread')
  flips.train.augment = 'flip_ud'
  assert report_html._training_text(flips.to_dict()).startswith(  # pylint: disable=protected-access
      '3 heads averaged, trained on each image and its up-down flip, 10 '
      'passes')
  flips.train.augment = 'shifts'
  assert report_html._training_text(flips.to_dict()).startswith(  # pylint: disable=protected-access
      '3 heads averaged, trained on each image and its three half-cell '
      'shifts, 10 passes')


def test_run_section_says_how_each_kind_of_image_was_sized():
  from configs import default, demo as demo_config, folder  # pylint: disable=g-import-not-at-top
  geometry = report_html._geometry_text  # pylint: disable=protected-access
  mvtec = default.get_config().dataset.to_dict()
  assert geometry(mvtec, ['object', 'texture', 'object']) == (
      '; objects shorter side 256, centre crop 224; textures resized whole '
      'to 256x256')
  mvtec['texture_resize'] = 0  # Textures take the object transform.
  mvtec['crop'] = 0
  assert geometry(mvtec, ['texture', 'object']) == (
      '; textures shorter side 256, no crop; objects shorter side 256, no crop')
  demo = demo_config.get_config().dataset.to_dict()
  assert geometry(demo, ['texture'] * 3) == '; textures resized whole to 256x256'
  # The user's photos are no MVTec class: one geometry, no kind named.
  assert geometry(folder.get_config().dataset.to_dict(), ['texture']) == (
      '; resized whole to 256x256')
  assert geometry({}, ['texture']) == ''  # A results.json without a config.


def test_run_section_says_where_the_images_came_from():
  from configs import default, demo as demo_config, folder  # pylint: disable=g-import-not-at-top
  data = report_html._data_text  # pylint: disable=protected-access
  rows = [{'category': 'bottle', 'kind': 'object'}]
  mvtec = default.get_config().dataset.to_dict()
  mvtec['root'] = '/data/mvtec'
  assert data(mvtec, rows) == ('mvtec at /data/mvtec; categories bottle; '
                               'objects shorter side 256, centre crop 224')
  # A folder run names its own directories, not the unused dataset.root.
  mine = folder.get_config().dataset.to_dict()
  mine['train_dir'] = '/parts/train'
  mine['test_dirs'] = {'good': '/parts/ok', 'defect': '', 'crack': '/parts/c'}
  assert data(mine, [{'category': 'folder', 'kind': 'texture'}]) == (
      'folder (training images in /parts/train; test folders good, crack); '
      'categories folder; resized whole to 256x256')
  demo = demo_config.get_config().dataset.to_dict()
  assert data(demo, [{'category': 'brick', 'kind': 'texture'}]) == (
      'demo; categories brick; textures resized whole to 256x256')


def test_record_round_trip_replaces_old_tiles(tmp_path):
  image = np.zeros((8, 8, 3), np.uint8)
  amap = np.arange(64, dtype=np.float32).reshape(8, 8)
  record = {'scores': [1.0, float('nan')], 'labels': [0, 1],
            'map_range': None}
  eval_record.write(str(tmp_path), record, [(1, image, amap, None)])
  gallery = tmp_path / 'evaluation' / 'gallery'
  assert sorted(os.listdir(gallery)) == ['00001.jpg']
  eval_record.write(str(tmp_path), record, [(0, image, amap, None)])
  assert sorted(os.listdir(gallery)) == ['00000.jpg']
  back = eval_record.load(str(tmp_path))
  assert back['scores'] == [1.0, None]  # nan as null: strict JSON.
  assert back['map_range'] == [0.0, 63.0]  # From the shown maps.
  assert back['tiles'] == {'0': 'gallery/00000.jpg'}
  assert eval_record.load(str(tmp_path / 'nothing')) is None
  # The yardstick's maps join the record, on their own range ...
  eval_record.add_yardstick(str(tmp_path), [(0, image, amap + 100, None)],
                            {0: 7.5}, None)
  back = eval_record.load(str(tmp_path))
  assert back['knn'] == {'map_range': [100.0, 163.0],
                         'tiles': {'0': 'gallery_knn/00000.jpg'},
                         'scores': {'0': 7.5}}
  assert back['map_range'] == [0.0, 63.0]  # The head's is untouched.
  knn_tile = eval_record.tile_path(str(tmp_path), back, 0, yardstick=True)
  with Image.open(knn_tile) as im, Image.open(eval_record.tile_path(
      str(tmp_path), back, 0)) as head:
    assert im.size[0] < head.size[0]  # The map panel alone.
  # ... and go with the evaluation they belong to.
  eval_record.write(str(tmp_path), record, [(0, image, amap, None)])
  assert 'knn' not in eval_record.load(str(tmp_path))
  assert not os.path.exists(knn_tile)


@pytest.fixture(name='demo', scope='module')
def _demo(tmp_path_factory):
  """A rendered demo-sized report, plus a category (screw) without record."""
  workdir = tmp_path_factory.mktemp('demo') / 'run'
  nan = float('nan')
  missing = {'category': 'screw', 'kind': 'object', 'n_test': 4,
             'image_auroc': 0.5, 'pixel_auroc': nan, 'aupro': nan}
  _, tiles = _demo_workdir(workdir, [missing])
  return workdir, report_html.write_report(str(workdir)), tiles


def test_report_table_images_and_notes(demo):
  workdir, path, tiles = demo
  text = open(path, encoding='utf-8').read()
  page = _Page(text)
  with open(workdir / 'results.json', encoding='utf-8') as f:
    saved = json.load(f)['rows']
  assert page.tables['results'][1:] == _expected_table(saved)
  assert 'n/a' in page.tables['results'][4]  # screw's nan pixel metrics.
  # Self-contained: no script, stylesheet link or address to fetch.
  assert not page.tags & {'script', 'link', 'iframe', 'object'}
  assert not re.search(r'(src|href)="(?!data:|#)', text)
  # Per demo category: ROC, PRO, histogram, training curves, Fig. 3 and the
  # gallery tiles; nothing for screw, which has no record.
  assert len(page.imgs) == sum(5 + n for n in tiles.values())
  sizes = [_decoded(im['src']) for im in page.imgs]
  assert all(w > 100 and h > 100 for w, h in sizes)
  assert 'No evaluation record' in text and 'screw' in text
  assert page.tables['timings'][-1][-1] == '3 min 25 s'
  assert os.path.getsize(path) < 4 * 2**20


def test_rendered_again_from_the_command_line(demo, tmp_path, capsys):
  workdir, path, _ = demo
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  os.remove(copy / 'report.html')
  assert report_html.main(['report_html', str(copy)]) == 0
  assert capsys.readouterr().out.strip() == str(copy / 'report.html')
  again = _Page((copy / 'report.html').read_text(encoding='utf-8')).tables
  first = _Page(open(path, encoding='utf-8').read()).tables
  for table in ('results', 'timings'):
    assert again[table] == first[table]
  # Header, 4 rows, texture, object and overall means.
  assert len(again['results']) == 1 + 4 + 3
  assert report_html.main(['report_html']) == 2


def test_gallery_captions_say_what_the_threshold_decided(demo):
  workdir, path, _ = demo
  text = open(path, encoding='utf-8').read()
  rec = eval_record.load(str(workdir / 'brick'))
  galleries = re.findall(r'data-gallery="(\w+)">(.*?)</div>', text, re.S)
  assert [g for g, _ in galleries[:3]] == [g for g, _, _ in
                                           eval_record.GALLERIES]
  for key, body in galleries[:3]:
    captions = re.findall(r'<figcaption>(.*?)</figcaption>', body)
    assert len(captions) == len(rec['galleries'][key])
    for i, cap in zip(rec['galleries'][key], captions):
      assert cap.startswith(html.escape(rec['names'][i]))
      flagged = rec['scores'][i] > rec['threshold']
      verdict = {(True, 1): 'caught', (True, 0): 'false alarm',
                 (False, 1): 'missed', (False, 0): 'correct'}[
                     (flagged, rec['labels'][i])]
      assert cap.endswith(f'({verdict})'), cap


def test_yardstick_maps_sit_under_the_heads(demo):
  """grass has kNN's maps (eval.yardstick): each gallery figure shows the
  head's tile, then kNN's map of the same image, and both scores."""
  workdir, path, _ = demo
  text = open(path, encoding='utf-8').read()
  sections = dict(re.findall(
      r'<section class="category" id="cat-(\w+)">(.*?)</section>', text,
      re.S))
  assert 'class="knn"' not in sections['brick']
  rec = eval_record.load(str(workdir / 'grass'))
  lo, hi = rec['knn']['map_range']
  assert f'from {lo:.4g} (blue) to {hi:.4g} (red).' in sections['grass']
  # The demo config squashes the head's maps, not its image scores.
  assert ('The maps are of the squashed patch scores, sigmoid(score / '
          'margin), so their values lie in 0-1, in other units than the '
          'image scores.') in sections['grass']
  galleries = re.findall(r'data-gallery="(\w+)">(.*?)</div>',
                         sections['grass'], re.S)
  assert len(galleries) == 3
  for key, body in galleries:
    figures = re.findall(r'<figure>(.*?)</figure>', body, re.S)
    assert len(figures) == len(rec['galleries'][key])
    for i, fig in zip(rec['galleries'][key], figures):
      imgs = _Page(fig).imgs
      assert [im.get('class') for im in imgs] == [None, 'knn']
      assert imgs[1]['alt'].endswith(f'{rec["names"][i]}, kNN map')
      knn_score = rec['knn']['scores'][str(i)]
      assert f'kNN score {knn_score:.4g}</figcaption>' in fig


def test_demo_sized_report_in_a_browser(demo, tmp_path):
  workdir, path, _ = demo
  page = workdir / os.path.basename(path)
  dom, images, pixels = browse(page, tmp_path)
  _assert_rendered(images, pixels, len(_Page(page.read_text()).imgs))
  with open(page.parent / 'results.json', encoding='utf-8') as f:
    rows = json.load(f)['rows']
  assert _Page(dom).tables['results'][1:] == _expected_table(rows)


# ---- through main.py ---------------------------------------------------------

REPORT_FLAGS = ['--config.train.eval_every=2', '--config.report.html=True',
                '--config.report.tensorboard=True',
                '--config.report.gallery_size=2',
                '--config.report.tensorboard_heatmaps=2',
                # The page shows kNN's columns and maps beside the head's.
                '--config.eval.yardstick=True']


def _with_scratches(awkward_root, tmp_path_factory):
  """A copy of the awkward dataset with a second defect type, 'scratch' (two
  test images, each a bright line with its mask): the report shows each
  type's figures."""
  root, junk = awkward_root
  copy = tmp_path_factory.mktemp('two_defects') / root.name
  shutil.copytree(root, copy)
  cat = copy / conftest.CATEGORY
  (cat / 'test' / 'scratch').mkdir()
  (cat / 'ground_truth' / 'scratch').mkdir()
  for i in range(2):
    image = np.array(Image.open(cat / 'test' / 'good' / f'{i:03d}.png'))
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[30 + 20 * i:33 + 20 * i, 10:80] = 255
    image[mask > 0] = 250
    Image.fromarray(image).save(cat / 'test' / 'scratch' / f'{i:03d}.png')
    Image.fromarray(mask).save(cat / 'ground_truth' / 'scratch' /
                               f'{i:03d}_mask.png')
  return copy, junk


@pytest.fixture(scope='module')
def trained(tmp_path_factory, lite0_weights_dir, awkward_root, jax_cache_dir):
  root, junk = _with_scratches(awkward_root, tmp_path_factory)
  workdir = tmp_path_factory.mktemp('report') / 'run'
  args = conftest.tiny_args(workdir, lite0_weights_dir, root, passes=4,
                            extra=REPORT_FLAGS)
  env = conftest.main_env(jax_cache_dir)
  proc = conftest.run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc, args, env, root, junk


def test_console_is_quiet_and_the_log_file_keeps_the_rest(trained):
  workdir, proc, _, _, root, junk = trained
  out = proc.stdout.splitlines()
  assert len([l for l in out if l.startswith('brick: I-AUROC')]) == 1
  assert '| brick | object |' in proc.stdout  # The markdown table.
  assert out[-3:] == [
      f'report: {workdir / "report.html"} '
      f'({os.path.getsize(workdir / "report.html") / 2**20:.1f} MiB)',
      f'curves: tensorboard --logdir {workdir}',
      f'log: {workdir / "logs" / "simplenet.INFO"}']
  # stderr: one line per warning (the two non-image files), nothing else:
  # no INFO lines, no progress bars (stderr is not a terminal here).
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  good = root / conftest.CATEGORY / 'train' / 'good'
  assert len(err) == len(junk), err
  for name in junk:
    assert len([l for l in err if l.startswith(
        f'warning: Skipping {good / name}: not an image file')]) == 1, err
  log = (workdir / 'logs' / 'simplenet.INFO').read_text(encoding='utf-8')
  assert re.search(r'^I\d{4} .*train on 1 categories', log, re.M)
  assert re.search(r'^I\d{4} .*brick pass 4/4: loss', log, re.M)
  assert len(re.findall(r'^W\d{4} .*Skipping ', log, re.M)) == len(junk)
  # Under the category's line, one line per defect type, with the figures
  # results.json holds (by_defect, and the yardstick's knn_by_defect).
  with open(workdir / 'results.json', encoding='utf-8') as f:
    (row,) = json.load(f)['rows']
  said = [l for l in out if l.startswith(f'  {conftest.CATEGORY}/')]
  assert said == [
      f"  {conftest.CATEGORY}/{k}, {v['n']} images: I-AUROC "
      f"{100 * v['image_auroc']:.2f}  P-AUROC {100 * v['pixel_auroc']:.2f}  "
      f"AUPRO {100 * v['aupro']:.2f}  [kNN: " + ' / '.join(
          f"{100 * row['knn_by_defect'][k][m]:.2f}" for m in report.METRICS)
      + f"]  (caught at the threshold: {v['caught']}/{v['n']})"
      for k, v in row['by_defect'].items()]
  assert len(said) == 2


def test_tensorboard_events_match_the_log(trained):
  workdir = trained[0]
  events = read_events(workdir / 'brick' / 'tb')
  scalars = {}
  for step, tag, value in events:
    if not isinstance(value, np.ndarray):
      scalars.setdefault(tag, {})[step] = value
  log = [json.loads(l) for l in
         (workdir / 'brick' / 'log.jsonl').read_text().splitlines()]
  for key in ('loss', 'p_true', 'p_fake', 'lr_adaptor', 'lr_discriminator'):
    assert scalars[f'train/{key}'] == {
        r['pass']: pytest.approx(r[key], rel=1e-6) for r in log}
  with open(workdir / 'results.json', encoding='utf-8') as f:
    (row,) = json.load(f)['rows']
  for key in ('image_auroc', 'pixel_auroc', 'aupro'):
    assert sorted(scalars[f'eval/{key}']) == [2, 4]
    assert scalars[f'eval/{key}'][4] == pytest.approx(row[key], rel=1e-6)
    assert scalars[f'eval/{key}'][2] == pytest.approx(log[1][key], rel=1e-6)
  heat = [(s, t, v.shape) for s, t, v in events if isinstance(v, np.ndarray)]
  # 2 test images at each evaluation, 64 px shown at 4x, image | map.
  assert sorted(s for s, _, _ in heat) == [2, 2, 4, 4]
  assert {shape for _, _, shape in heat} == {(256, 512, 3)}
  assert len({t for _, t, _ in heat}) == 2


def test_report_of_the_run_in_a_browser(trained, tmp_path):
  workdir = trained[0]
  page = workdir / 'report.html'
  rec = eval_record.load(str(workdir / 'brick'))
  shown = {i for v in rec['galleries'].values() for i in v}
  # Plots, then each gallery image's tile and, under it, kNN's map of it
  # (the demo config's eval.yardstick).
  n_images = 5 + 2 * sum(len(v) for v in rec['galleries'].values())
  text = page.read_text(encoding='utf-8')
  assert len(_Page(text).imgs) == n_images
  # Unsquashed maps (eval.squash=none) are in the image scores' units.
  assert 'Colours run from' in text and 'squashed patch scores' not in text
  assert len(shown) == len(rec['tiles']) >= 2
  assert set(map(int, rec['knn']['tiles'])) == shown
  dom, images, pixels = browse(page, tmp_path)
  _assert_rendered(images, pixels, n_images)
  with open(workdir / 'results.json', encoding='utf-8') as f:
    rows = json.load(f)['rows']
  assert _Page(dom).tables['results'][1:] == _expected_table(rows)
  assert rec['labels'] == [0, 0, 0, 1, 1, 1, 1, 1] and rec['passes'] == 4
  # Each defect type's figures, the head's and the yardstick's, as
  # results.json holds them (every normal image against each type's).
  (row,) = rows
  assert sorted(row['by_defect']) == sorted(row['knn_by_defect']) == [
      'hole', 'scratch']
  assert [row['by_defect'][k]['n'] for k in ('hole', 'scratch')] == [3, 2]
  assert _Page(dom).tables[f'by-defect-{conftest.CATEGORY}'][1:] == [
      [k, str(v['n'])] + [_pct(v[m]) for m in report.METRICS]
      + [f"{v['caught']} of {v['n']}"]
      + [_pct(row['knn_by_defect'][k][m]) for m in report.METRICS]
      for k, v in row['by_defect'].items()]


def test_predict_writes_predictions_html(trained, tmp_path):
  workdir, _, args, env, root, _ = trained
  # The normal and the hole images (not the scratches): two of each.
  inputs = str(root / conftest.CATEGORY / 'test' / '[gh]*' / '00[01].png')
  proc = conftest.run_main(args + ['--mode=predict',
                                   f'--config.predict.inputs={inputs}'],
                           env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in proc.stdout.splitlines()
             if l.startswith('{')]
  assert len(records) == 4
  page = workdir / 'predict' / conftest.CATEGORY / 'predictions.html'
  assert f'predictions: {page}' in proc.stdout
  dom, images, pixels = browse(page, tmp_path, height=1600)
  _assert_rendered(images, pixels, 4)
  table = _Page(dom).tables['predictions'][1:]
  ranked = sorted(records, key=lambda r: -r['score'])
  common = os.path.dirname(os.path.dirname(ranked[0]['path']))
  assert table == [[str(i + 1), os.path.relpath(r['path'], common),
                    f'{r["score"]:.4f}',
                    'anomalous' if r['score'] > r['threshold'] else 'normal']
                   for i, r in enumerate(ranked)]

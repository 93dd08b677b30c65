"""The results table, its means and the JSON / CSV files."""

import csv
import json
import math
import os

import numpy as np
import pytest

from simplenet_jax import report

NAN = float('nan')
ROWS = [
    {'category': 'carpet', 'kind': 'texture', 'image_auroc': 0.997,
     'pixel_auroc': 0.982, 'aupro': 0.90},
    {'category': 'grid', 'kind': 'texture', 'image_auroc': 0.991,
     'pixel_auroc': NAN, 'aupro': 0.80},
    {'category': 'bottle', 'kind': 'object', 'image_auroc': 1.0,
     'pixel_auroc': 0.980, 'aupro': NAN},
    {'category': 'screw', 'kind': 'object', 'image_auroc': 0.90,
     'pixel_auroc': 0.990, 'aupro': NAN},
    {'category': 'cookies', 'kind': 'other', 'image_auroc': NAN,
     'pixel_auroc': 0.95, 'aupro': 0.70},
]


def _reject(name):
  raise ValueError(f'{name} is not JSON')


def _lines(table):
  return [l for l in table.splitlines() if l.startswith('|')]


def test_table_rows_and_means_by_hand():
  table = report.results_table(ROWS)
  lines = _lines(table)
  assert lines[0] == '| Category | Kind | I-AUROC % | P-AUROC % | AUPRO % |'
  assert lines[2] == '| carpet | texture | 99.7 | 98.2 | 90.0 |'
  assert lines[3] == '| grid | texture | 99.1 | n/a | 80.0 |'
  assert lines[6] == '| cookies | other | n/a | 95.0 | 70.0 |'
  # Texture: I (99.7 + 99.1)/2 = 99.4; P 98.2 (grid's nan skipped);
  # AUPRO (90 + 80)/2 = 85.0.
  assert lines[7] == '| **texture mean** | | 99.4 | 98.2 | 85.0 |'
  # Object: I (100 + 90)/2 = 95.0; P (98 + 99)/2 = 98.5; AUPRO all nan: n/a.
  assert lines[8] == '| **object mean** | | 95.0 | 98.5 | n/a |'
  # All five: I (99.7 + 99.1 + 100 + 90)/4 = 97.2; P (98.2 + 98 + 99 + 95)/4
  # = 97.55 -> 97.5 or 97.6 by float rounding, so check the mean itself;
  # AUPRO (90 + 80 + 70)/3 = 80.0.
  assert lines[9].startswith('| **mean** | | 97.2 | ')
  assert lines[9].endswith(' | 80.0 |')
  assert report.means(ROWS)['all']['pixel_auroc'] == pytest.approx(0.9755)
  assert len(lines) == 10


def test_yardstick_columns_by_hand(tmp_path):
  """Rows with the kNN yardstick's figures get three more columns, in the
  table, its means and results.csv; rows without them keep three."""
  rows = [{'category': 'a', 'kind': 'texture', 'image_auroc': 0.9,
           'pixel_auroc': 0.8, 'aupro': 0.7, 'knn_image_auroc': 1.0,
           'knn_pixel_auroc': 0.99, 'knn_aupro': 0.95},
          {'category': 'b', 'kind': 'texture', 'image_auroc': 0.7,
           'pixel_auroc': 0.6, 'aupro': 0.5, 'knn_image_auroc': 0.8,
           'knn_pixel_auroc': NAN, 'knn_aupro': 0.85}]
  lines = _lines(report.results_table(rows))
  assert lines[0] == ('| Category | Kind | I-AUROC % | P-AUROC % | AUPRO % | '
                      'kNN I-AUROC % | kNN P-AUROC % | kNN AUPRO % |')
  assert lines[1] == '|---|---|---:|---:|---:|---:|---:|---:|'
  assert lines[2] == '| a | texture | 90.0 | 80.0 | 70.0 | 100.0 | 99.0 | 95.0 |'
  assert lines[3] == '| b | texture | 70.0 | 60.0 | 50.0 | 80.0 | n/a | 85.0 |'
  # kNN means: I (100 + 80)/2 = 90.0; P 99.0 (b's nan skipped); AUPRO 90.0.
  assert lines[4] == ('| **texture mean** | | 80.0 | 70.0 | 60.0 | 90.0 | '
                      '99.0 | 90.0 |')
  _, csv_path = report.write_results(str(tmp_path), rows)
  with open(csv_path, encoding='utf-8') as f:
    table = list(csv.reader(f))
  assert table[0] == ['category', 'kind', 'image_auroc', 'pixel_auroc',
                      'aupro', 'knn_image_auroc', 'knn_pixel_auroc',
                      'knn_aupro']
  assert float(table[3][5]) == pytest.approx(0.9)
  assert _lines(report.results_table(ROWS[:1]))[0] == (
      '| Category | Kind | I-AUROC % | P-AUROC % | AUPRO % |')


def test_shared_lap_names_the_rest_of_the_group():
  """The console line and the report's timing row say with whom a
  train.categories_per_step group shared its training lap."""
  laps = {'train': 12.0, 'trained_with': ['a', 'b', 'c']}
  assert report.shared_lap('b', laps) == ' (train time shared with a, c)'
  assert report.shared_lap('a', {'train': 3.0}) == ''
  assert report.shared_lap('a', {'trained_with': ['a']}) == ''


def test_table_note_escaping_and_missing_groups():
  rows = [{'category': 'a|b', 'kind': 'object', 'image_auroc': 0.5,
           'pixel_auroc': None, 'aupro': np.float32(0.25)}]
  table = report.results_table(rows, note='test-set selected')
  assert table.splitlines()[0] == '_test-set selected_'
  lines = _lines(table)
  assert lines[2] == r'| a\|b | object | 50.0 | n/a | 25.0 |'
  # No texture rows: no texture mean line.
  assert [l.split('|')[1].strip() for l in lines[3:]] == ['**object mean**',
                                                          '**mean**']


def test_percent_input_is_rejected():
  with pytest.raises(ValueError, match="'x'.*image_auroc=99.1"):
    report.results_table([{'category': 'x', 'kind': 'object',
                           'image_auroc': 99.1, 'pixel_auroc': 0.9,
                           'aupro': 0.9}])


def test_write_results_json_and_csv_round_trip(tmp_path):
  extra = {'label': 'test-set selected', 'seed': np.int64(3),
           'layers': ('layer2', 'layer3'), 'threshold': np.float32(0.5),
           'bad': NAN}
  json_path, csv_path = report.write_results(str(tmp_path / 'run'), ROWS,
                                             extra)
  assert sorted(os.listdir(tmp_path / 'run')) == ['results.csv',
                                                  'results.json']
  with open(json_path, encoding='utf-8') as f:
    doc = json.load(f, parse_constant=_reject)  # nan must be null.
  assert [r['category'] for r in doc['rows']] == [r['category'] for r in ROWS]
  assert doc['rows'][1]['pixel_auroc'] is None
  assert doc['rows'][0]['aupro'] == 0.90
  assert doc['means']['texture']['aupro'] == pytest.approx(0.85)
  assert doc['means']['object']['aupro'] is None
  # (0.997 + 0.991 + 1.0 + 0.90) / 4 = 3.888 / 4.
  assert doc['means']['all']['image_auroc'] == pytest.approx(0.972)
  assert doc['extra'] == {'label': 'test-set selected', 'seed': 3,
                          'layers': ['layer2', 'layer3'], 'threshold': 0.5,
                          'bad': None}
  with open(csv_path, newline='', encoding='utf-8') as f:
    got = list(csv.DictReader(f))
  assert [g['category'] for g in got] == ['carpet', 'grid', 'bottle', 'screw',
                                          'cookies', 'texture mean',
                                          'object mean', 'mean']
  for g, r in zip(got, ROWS):
    assert g['kind'] == r['kind']
    for m in report.METRICS:
      v = float(g[m])
      assert (math.isnan(v) and math.isnan(r[m])) or v == r[m]
  assert got[-1]['kind'] == 'mean'
  assert float(got[-1]['aupro']) == pytest.approx(0.8)
  assert math.isnan(float(got[-2]['aupro']))


def test_write_results_replaces_and_leaves_no_temp_files(tmp_path):
  report.write_results(str(tmp_path), ROWS, {})
  json_path, _ = report.write_results(str(tmp_path), ROWS[:1], None)
  with open(json_path, encoding='utf-8') as f:
    assert len(json.load(f)['rows']) == 1
  assert sorted(os.listdir(tmp_path)) == ['results.csv', 'results.json']


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  json_path, _ = report.write_results(str(tmp_path), ROWS, {})
  with open(json_path, encoding='utf-8') as f:
    before = f.read()

  def fail(fd):
    raise OSError('disk full')

  monkeypatch.setattr(report.os, 'fsync', fail)  # After the temp is written.
  with pytest.raises(OSError, match='disk full'):
    report.write_results(str(tmp_path), ROWS[:1], {})
  with open(json_path, encoding='utf-8') as f:
    assert f.read() == before
  assert sorted(os.listdir(tmp_path)) == ['results.csv', 'results.json']

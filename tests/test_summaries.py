"""TensorBoard event files: what is written, read back from the files."""

import glob
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from simplenet_jax import summaries
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir) -> list[tuple[int, str, object]]:
  """(step, tag, value) of every summary value in the event files of
  `logdir`: a float for scalars, an (H, W, 3) array for images. Reads the
  TFRecord framing (length, crc, Event proto, crc) directly."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None
  try:
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules['torch']
  out = []
  for path in sorted(glob.glob(os.path.join(str(logdir), 'events.out.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    off = 0
    while off < len(data):
      (n,) = struct.unpack('<Q', data[off:off + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[off + 12:off + 12 + n])
      off += 12 + n + 4
      for v in event.summary.value:
        if v.HasField('image'):
          import io  # pylint: disable=g-import-not-at-top
          with Image.open(io.BytesIO(v.image.encoded_image_string)) as im:
            out.append((event.step, v.tag, np.asarray(im.convert('RGB'))))
        else:
          out.append((event.step, v.tag, v.simple_value))
  return out


def test_scalars_and_images_round_trip(tmp_path):
  logdir = tmp_path / 'tb'
  image = np.zeros((6, 8, 3), np.uint8)
  image[:, :4] = (255, 0, 0)
  with summaries.Writer(str(logdir)) as w:
    summaries.write_pass(w, {'pass': 1, 'loss': 1.5, 'p_true': 0.25,
                             'p_fake': 0.75, 'lr_adaptor': 1e-4,
                             'lr_discriminator': 2e-4, 'other': 3.0})
    summaries.write_pass(w, {'pass': 2, 'loss': float('nan'), 'p_true': 0.5,
                             'p_fake': 0.5, 'focal': 0.125, 'radius': 2.5})
    summaries.write_evaluation(w, 2, {'image_auroc': 0.875,
                                      'pixel_auroc': float('nan'),
                                      'aupro': None})
    w.image('heatmaps/a', 2, image)
  events = read_events(logdir)
  scalars = {(s, t): v for s, t, v in events if not isinstance(v, np.ndarray)}
  assert scalars == {
      (1, 'train/loss'): 1.5, (1, 'train/p_true'): 0.25,
      (1, 'train/p_fake'): 0.75,
      (1, 'train/lr_adaptor'): pytest.approx(1e-4),
      (1, 'train/lr_discriminator'): pytest.approx(2e-4),
      (2, 'train/p_true'): 0.5, (2, 'train/p_fake'): 0.5,
      (2, 'train/focal'): 0.125, (2, 'train/radius'): 2.5,
      (2, 'eval/image_auroc'): 0.875}  # nan, None and 'other' left out.
  (img,) = [v for _, t, v in events if t == 'heatmaps/a']
  np.testing.assert_array_equal(img, image)


def test_disabled_writer_writes_nothing(tmp_path):
  config = default.get_config()
  config.report.tensorboard = False
  with summaries.open_category(config, str(tmp_path / 'cat')) as w:
    assert not w.enabled
    summaries.write_pass(w, {'pass': 1, 'loss': 1.0})
    w.image('x', 1, np.zeros((2, 2, 3), np.uint8))
  assert not (tmp_path / 'cat').exists()
  config.report.tensorboard = True
  with summaries.open_category(config, str(tmp_path / 'cat')) as w:
    assert w.logdir == str(tmp_path / 'cat' / 'tb')
  assert not (tmp_path / 'cat').exists()  # Opened on first use only.


def test_heatmap_indices_spread_over_defects_plus_one_normal():
  labels = np.array([0, 0, 1, 1, 1, 1, 1, 0, 1])  # Anomalous: 2..6, 8.
  # 3 of the 6 defects at positions 0, 2.5 -> 2 (half to even), 5 of their
  # list (2, 4, 8), and the first normal image.
  np.testing.assert_array_equal(summaries.heatmap_indices(labels, 4),
                                [0, 2, 4, 8])
  np.testing.assert_array_equal(summaries.heatmap_indices(labels, 1), [2])
  assert summaries.heatmap_indices(labels, 0).size == 0
  # Fewer defects than asked: normal images fill up, first and last.
  np.testing.assert_array_equal(summaries.heatmap_indices([1, 0, 0, 0], 3),
                                [0, 1, 3])
  np.testing.assert_array_equal(summaries.heatmap_indices([0, 0], 5), [0, 1])


def test_writing_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it can; the writer hides it (torch is
  installed here, for the parity tests)."""
  code = ('import sys, numpy as np\n'
          'from simplenet_jax import summaries\n'
          f'w = summaries.Writer({str(tmp_path)!r})\n'
          "w.scalars(1, {'x': 1.0}, 't')\n"
          "w.image('i', 1, np.zeros((2, 2, 3), np.uint8))\n"
          'w.close()\n'
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  assert out.strip() == '[]'
  assert len(read_events(tmp_path)) == 2

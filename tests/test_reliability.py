"""Reliability and safety: interruptions, faults, determinism, no stray writes.

Through main.py (subprocesses) on the awkward dataset of conftest.py with a
tiny configuration (EfficientNet-Lite0 with its real weights, 64x64 inputs,
8 passes of 5 steps):
  * one uninterrupted reference run;
  * the same command killed with SIGKILL at three points, its newest
    checkpoint then damaged, and run once more: it ends with exactly the
    reference's parameters, log and numbers;
  * the same command from another cwd with HOME and TMPDIR pointing at empty
    folders and the network blocked: the same numbers and parameters, and no
    file written outside the workdir;
  * predict on an image of a size never seen in training.
In process: damaged checkpoints, crafted pickles, a non-finite loss and an
out-of-memory error while building the feature cache.
"""

import asyncio
import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import zlib

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import PIL.Image
import pytest

from conftest import CATEGORY
from conftest import main_env
from conftest import ROOT
from conftest import run_main
from conftest import tiny_args
import helpers
from simplenet_jax import checkpoint
from simplenet_jax import eval_record
from simplenet_jax.errors import UserError

PASSES = 8


def _passes_logged(log_path) -> int:
  try:
    with open(log_path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  count = 0
  for line in lines:
    try:
      json.loads(line)
      count += 1
    except ValueError:
      pass
  return count


def _log(workdir):
  """log.jsonl's records less 'pass_s', the one field that is wall time."""
  path = workdir / CATEGORY / 'log.jsonl'
  records = [json.loads(l) for l in path.read_text(encoding='utf-8')
             .splitlines()]
  for r in records:
    assert r.pop('pass_s') >= 0
  return records


def _rows(workdir):
  doc = json.loads((workdir / 'results.json').read_text(encoding='utf-8'))
  return doc['rows'], doc['means']


def _final_tree(workdir):
  return helpers.final_checkpoint(workdir / CATEGORY)


def _assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  assert len(leaves_a) > 5
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, lite0_weights_dir, awkward_root, jax_cache_dir):
  """One uninterrupted run of the tiny config; its workdir and process."""
  root, junk = awkward_root
  workdir = tmp_path_factory.mktemp('reference') / 'réf run'
  proc = run_main(tiny_args(workdir, lite0_weights_dir, root, PASSES),
                  env=main_env(jax_cache_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return types.SimpleNamespace(workdir=workdir, proc=proc, root=root, junk=junk,
                               weights=lite0_weights_dir)


def test_awkward_files_are_handled(reference):
  """16-bit, palette, RGBA, CMYK, EXIF-rotated, mixed sizes, spaces and
  non-ASCII paths train; non-image files are skipped with one warning each."""
  err = reference.proc.stderr
  assert 'Traceback' not in err
  for name in reference.junk:
    path = str(reference.root / CATEGORY / 'train' / 'good' / name)
    warnings = [l for l in err.splitlines() if 'Skipping ' + path in l]
    assert len(warnings) == 1, (name, warnings)
  step, meta, _ = _final_tree(reference.workdir)
  assert step == PASSES
  # 10 images found (not the 2 other files), 1 held out: 9 -> 5 batches of 2.
  assert meta['steps_per_pass'] == 5
  assert meta['image_hw'] == [64, 64]
  assert [r['pass'] for r in _log(reference.workdir)] == list(
      range(1, PASSES + 1))
  rows, _ = _rows(reference.workdir)
  assert rows[0]['n_test'] == 6
  assert all(np.isfinite(rows[0][k])
             for k in ('image_auroc', 'pixel_auroc', 'aupro'))


def _run_until_killed(args, env, workdir, at_pass, out_dir,
                      ready=lambda: True):
  """Starts main.py and SIGKILLs it once log.jsonl holds `at_pass` passes
  (and `ready()` is true)."""
  log_path = workdir / CATEGORY / 'log.jsonl'
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / 'stdout', 'w') as so, open(out_dir / 'stderr', 'w') as se:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'),
                             *args], cwd=ROOT, env=env, stdout=so, stderr=se)
    deadline = time.monotonic() + 300
    try:
      while proc.poll() is None and not (
          ready() and _passes_logged(log_path) >= at_pass):
        if time.monotonic() > deadline:
          pytest.fail(f'pass {at_pass} not reached in 300 s')
        time.sleep(0.002)
      assert proc.poll() is None, (
          f'the run ended (status {proc.returncode}) before pass {at_pass} '
          f'could be interrupted: {(out_dir / "stderr").read_text()[-2000:]}')
      os.kill(proc.pid, signal.SIGKILL)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return _passes_logged(log_path)


def _step_dirs(ckpt_dir):
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _damage(step_dir):
  """Flips one byte in the middle of each array data file of a checkpoint."""
  files = [p for p in (step_dir / 'state').rglob('*')
           if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def test_sigkill_anywhere_then_rerun_ends_bit_identical(reference, tmp_path,
                                                        jax_cache_dir):
  workdir = tmp_path / 'killed run'
  args = tiny_args(workdir, reference.weights, reference.root, PASSES)
  env = main_env(jax_cache_dir)
  ckpt_dir = workdir / CATEGORY / 'checkpoints'
  reached = []
  for i, k in enumerate((1, 4, PASSES)):
    reached.append(_run_until_killed(args, env, workdir, k, tmp_path / str(i)))
    assert not (workdir / 'results.json').exists()
    # Only complete checkpoints carry a step number; a save cut short is a
    # temporary folder, ignored and cleaned up by the next run.
    for step in _step_dirs(ckpt_dir) if ckpt_dir.exists() else []:
      assert (ckpt_dir / str(step) / 'state' / '_METADATA').is_file()
      assert (ckpt_dir / str(step) / 'meta' / 'metadata').is_file()
  assert reached[0] < PASSES and reached[1] >= 4, reached

  # A disk fault in the newest checkpoint: the run warns, moves it aside and
  # continues from the one before.
  steps = _step_dirs(ckpt_dir)
  assert len(steps) == 2, steps
  _damage(ckpt_dir / str(steps[-1]))
  proc = run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'{ckpt_dir}/{steps[-1]} could not be loaded' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert len(list((workdir / CATEGORY / 'checkpoints.unloadable').iterdir())) == 1
  assert not [p for p in ckpt_dir.iterdir() if 'tmp' in p.name]

  step, _, tree = _final_tree(workdir)
  ref_step, _, ref_tree = _final_tree(reference.workdir)
  assert step == ref_step == PASSES
  _assert_trees_equal(tree, ref_tree)
  assert _log(workdir) == _log(reference.workdir)  # Each pass once, same loss.
  assert _rows(workdir) == _rows(reference.workdir)


_NO_NETWORK = '''
import os, socket
_LOG = os.environ['SIMPLENET_TEST_NET_LOG']
def _refuse(what):
  with open(_LOG, 'a') as f:
    f.write(repr(what) + '\\n')
  raise OSError('network access refused by the test')
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
  if self.family in (socket.AF_INET, socket.AF_INET6):
    _refuse(address)
  return _connect(self, address)
def connect_ex(self, address):
  if self.family in (socket.AF_INET, socket.AF_INET6):
    _refuse(address)
  return _connect_ex(self, address)
def getaddrinfo(host, *args, **kwargs):
  _refuse(host)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = getaddrinfo
'''


def _tree_listing(root):
  return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob('*'))


def test_same_numbers_and_no_writes_outside_workdir(reference, tmp_path,
                                                    jax_cache_dir):
  """Another run of the same command: identical results. It runs from
  another cwd with HOME and TMPDIR at empty folders and the network blocked;
  afterwards only the workdir has new files."""
  home, tmp, cwd, site, net = (tmp_path / n for n in
                               ('home', 'tmp', 'cwd', 'site', 'net'))
  for d in (home, tmp, cwd, site, net):
    d.mkdir()
  (site / 'sitecustomize.py').write_text(_NO_NETWORK)
  net_log = net / 'attempts.txt'
  data_before = _tree_listing(reference.root)
  weights_before = _tree_listing(reference.weights)
  workdir = tmp_path / 'second run'
  python_path = os.pathsep.join(
      [str(site)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  env = main_env(jax_cache_dir, HOME=home, TMPDIR=tmp, PYTHONPATH=python_path,
                 SIMPLENET_TEST_NET_LOG=net_log, XDG_CACHE_HOME=home / '.cache')
  env.pop('XDG_CONFIG_HOME', None)
  proc = run_main(tiny_args(workdir, reference.weights, reference.root, PASSES),
                  env=env, cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]

  assert _rows(workdir) == _rows(reference.workdir)
  _assert_trees_equal(_final_tree(workdir)[2], _final_tree(reference.workdir)[2])
  assert not net_log.exists(), net_log.read_text()
  # On NVIDIA GPUs the CUDA driver caches JIT-compiled kernels in
  # ~/.nv/ComputeCache (CUDA_CACHE_PATH moves it), as for any CUDA program.
  cuda_cache = home / '.nv' / 'ComputeCache'
  # matplotlib (the report's plots, Fig. 3) keeps its font list in
  # $XDG_CACHE_HOME/matplotlib (MPLCONFIGDIR moves it), as for any matplotlib
  # program.
  mpl_cache = home / '.cache' / 'matplotlib'
  written = [p for d in (home, tmp, cwd) for p in d.rglob('*') if p.is_file()
             and cuda_cache not in p.parents and mpl_cache not in p.parents]
  assert not written, written
  assert _tree_listing(reference.root) == data_before
  assert _tree_listing(reference.weights) == weights_before
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ['home', 'tmp', 'cwd', 'site', 'net', 'second run'])


@pytest.mark.parametrize('augment,views', [('flips', 4), ('shifts', 4)])
def test_augment_trains_on_every_view_cached_or_recomputed(
    reference, tmp_path, jax_cache_dir, augment, views):
  """train.augment=flips / shifts: a pass covers each training image and
  its three flips (half-cell shifts), 4x the steps, and the features
  recomputed each step (train.cache_features=False, the path of training
  sets too large to cache; the views made on the host) train as the cache
  (views made on the device) does with the demo config's three heads, up
  to float rounding, with the same results. (One flip, e.g. flip_ud's two
  views: tests/test_feature_cache.py, cached against recomputed.)"""
  runs = {}
  for name, more in (('cached', []),
                     ('recomputed', ['--config.train.cache_features=False'])):
    runs[name] = tmp_path / name
    proc = run_main(tiny_args(runs[name], reference.weights, reference.root, 2,
                              [f'--config.train.augment={augment}'] + more),
                    env=main_env(jax_cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
  _, meta, _ = _final_tree(runs['cached'])
  _, ref_meta, _ = _final_tree(reference.workdir)
  n_train = ref_meta['data']['n_train']
  assert meta['data']['n_train'] == n_train
  # Batches of 2 (tiny_args).
  assert ref_meta['steps_per_pass'] == -(-n_train // 2)
  assert meta['steps_per_pass'] == -(-views * n_train // 2)
  got, want = _log(runs['recomputed']), _log(runs['cached'])
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    for key in ('loss', 'p_true', 'p_fake'):
      assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-4), (g, w)
  # Not the reference's passes: other rows were trained on.
  assert abs(want[0]['loss'] - _log(reference.workdir)[0]['loss']) > 1e-3
  (row,), _ = _rows(runs['recomputed'])
  (ref,), _ = _rows(runs['cached'])
  for key in ('image_auroc', 'pixel_auroc'):
    assert row[key] == pytest.approx(ref[key], abs=1e-3), key


# Noise 10x the features' spread at a raised discriminator rate: the tiny
# run's loss saturates within a few passes.
_SATURATING = ['--config.model.noise_rel=10', '--config.optim.disc_lr=0.05']


@pytest.fixture(scope='module')
def saturating(reference, tmp_path_factory, jax_cache_dir):
  """The workdir of a tiny run with _SATURATING, no switch on saturation."""
  workdir = tmp_path_factory.mktemp('saturating') / 'plain'
  proc = run_main(tiny_args(workdir, reference.weights, reference.root,
                            PASSES, _SATURATING), env=main_env(jax_cache_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _first_saturated(workdir) -> int:
  """The 0-based index of the run's first pass with p_fake >= 0.98."""
  log = _log(workdir)
  first = next(i for i, r in enumerate(log) if r['p_fake'] >= 0.98)
  assert 2 <= first and first + 1 < PASSES, [r['p_fake'] for r in log]
  return first


def test_saturation_restarts_with_less_noise_once_and_resumes(
    reference, saturating, tmp_path, jax_cache_dir):
  """model.shrink_on_saturation=0.9 with noise 10x the features' spread at a
  raised discriminator rate, whose loss saturates within a few passes, and
  at 9x too: the first pass with p_fake >= 0.98 sets that attempt aside
  (its log and checkpoints kept beside) and the head trains again from its
  initial state with the noise std x 0.9, as a run at 9x from the start
  does; it saturates again and does not restart twice. Killed in the second
  attempt and run again, it ends bit-identical to the uninterrupted run.
  With model.stop_on_saturation too, the same second attempt stops at its
  own first saturated pass."""
  extra = _SATURATING
  switch = ['--config.model.shrink_on_saturation=0.9']
  env = main_env(jax_cache_dir)
  runs, procs = {'plain': saturating}, {}
  for name, more in (('restarted', switch),
                     ('at 9x', ['--config.model.noise_rel=9']),
                     ('then stopped', switch + [
                         '--config.model.stop_on_saturation=True'])):
    runs[name] = tmp_path / name
    procs[name] = run_main(tiny_args(runs[name], reference.weights,
                                     reference.root, PASSES, extra + more),
                           env=env)
    assert procs[name].returncode == 0, procs[name].stderr[-3000:]
  plain = _log(runs['plain'])
  first = _first_saturated(runs['plain'])
  assert (f'{CATEGORY}: pass {first + 1} saturated the loss' in
          procs['restarted'].stdout)
  set_aside = runs['restarted'] / CATEGORY / 'log.saturated.jsonl'
  records = [json.loads(l) for l in set_aside.read_text().splitlines()]
  for r in records:
    r.pop('pass_s')
  assert records == plain[:first + 1]
  aside = _step_dirs(runs['restarted'] / CATEGORY / 'checkpoints.saturated')
  assert aside and aside[-1] <= first + 1, aside

  # The second attempt: the run at 9x from the start, up to float rounding
  # (10 x 0.9 of the spread against 9 x it); once, though it saturates too.
  got, want = _log(runs['restarted']), _log(runs['at 9x'])
  assert len(got) == len(want) == PASSES
  assert any(r['p_fake'] >= 0.98 for r in got), got
  for g, w in zip(got, want):
    for key in ('loss', 'p_true', 'p_fake'):
      assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-4), (g, w)
  _, meta, tree = _final_tree(runs['restarted'])
  _, plain_meta, plain_tree = _final_tree(runs['plain'])
  assert meta['saturated_at'] == first + 1
  assert 'saturated_at' not in plain_meta
  # The results row says so too (the report shows it with the category).
  assert _rows(runs['restarted'])[0][0]['saturated_at'] == first + 1
  assert 'saturated_at' not in _rows(runs['plain'])[0][0]
  assert np.shape(tree['noise_std']) == (3,)  # The demo config's heads.
  np.testing.assert_allclose(tree['noise_std'],
                             0.9 * plain_tree['noise_std'], rtol=1e-6)

  # Restarted, then stopped: the restarted run's second attempt up to its
  # first saturated pass, which ends training there.
  second = next(i for i, r in enumerate(got) if r['p_fake'] >= 0.98)
  assert second + 1 < PASSES, [r['p_fake'] for r in got]
  both = runs['then stopped']
  first_attempt = [json.loads(l) for l in (
      both / CATEGORY / 'log.saturated.jsonl').read_text().splitlines()]
  for r in first_attempt:
    r.pop('pass_s')
  assert first_attempt == plain[:first + 1]
  assert _log(both) == got[:second + 1]
  step, both_meta, _ = _final_tree(both)
  assert step == both_meta['passes_done'] == both_meta['stopped_at'] == (
      second + 1)
  assert both_meta['saturated_at'] == first + 1
  out = procs['then stopped'].stdout
  assert (f'{CATEGORY}: pass {first + 1} saturated the loss' in out and
          'it stops if the loss saturates again' in out), out
  assert (f'{CATEGORY}: pass {second + 1} saturated the loss again' in
          out), out

  killed = tmp_path / 'killed'
  args = tiny_args(killed, reference.weights, reference.root, PASSES,
                   extra + switch)
  log_path = killed / CATEGORY / 'log.jsonl'
  _run_until_killed(args, env, killed, 3, tmp_path / 'kill',
                    ready=(killed / CATEGORY / 'log.saturated.jsonl').exists)
  assert _step_dirs(killed / CATEGORY / 'checkpoints'), 'no second-attempt save'
  assert _passes_logged(log_path) < PASSES
  proc = run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'saturated the loss' not in proc.stdout  # Not restarted again.
  _, killed_meta, killed_tree = _final_tree(killed)
  _assert_trees_equal(killed_tree, tree)
  assert killed_meta['saturated_at'] == first + 1
  assert _log(killed) == got


def test_saturation_stops_with_that_pass_and_counts_as_finished(
    reference, saturating, tmp_path, jax_cache_dir):
  """model.stop_on_saturation: the run ends after its first pass with
  p_fake >= 0.98, logged and trained as the run without the switch up to
  there; its final checkpoint is that pass's, saved once with the
  threshold, and counts as finished (a rerun trains nothing, eval mode does
  not call it unfinished). (A kill before that pass resumes as any run does:
  test_sigkill_anywhere_then_rerun_ends_bit_identical.)"""
  first = _first_saturated(saturating)
  env = main_env(jax_cache_dir)
  workdir = tmp_path / 'stopped'
  args = tiny_args(workdir, reference.weights, reference.root, PASSES,
                   _SATURATING + ['--config.model.stop_on_saturation=True'])
  proc = run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f'{CATEGORY}: pass {first + 1} saturated the loss (p_fake ' in
          proc.stdout), proc.stdout
  assert 'training stops with its model (model.stop_on_saturation)' in (
      proc.stdout)
  log = _log(workdir)
  assert log == _log(saturating)[:first + 1]
  step, meta, _ = _final_tree(workdir)
  assert step == meta['passes_done'] == meta['stopped_at'] == first + 1
  assert 'threshold' in meta
  (row,), _ = _rows(workdir)
  assert row['stopped_at'] == first + 1
  assert 'stopped_at' not in _rows(saturating)[0][0]

  again = run_main(args, env=env)  # Finished: nothing is trained again.
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'saturated the loss' not in again.stdout
  assert _log(workdir) == log
  assert _final_tree(workdir)[0] == first + 1
  evaluated = run_main(args + ['--mode=eval'], env=env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'training did not finish' not in evaluated.stderr
  assert _rows(workdir)[0][0]['stopped_at'] == first + 1


def test_predict_on_a_size_never_seen_in_training(reference, tmp_path,
                                                  jax_cache_dir):
  """A 150x97 RGBA photo is resized as configured (shorter side to
  dataset.resize, center crop dataset.crop): it scores exactly like the same
  photo resized and cropped beforehand with torchvision's rules."""
  src = reference.root / CATEGORY / 'test' / 'hole' / '001.png'
  rgb = PIL.Image.open(src).convert('RGB').resize((150, 97),
                                                  PIL.Image.Resampling.BILINEAR)
  inputs = tmp_path / 'new photos ü'
  inputs.mkdir()
  rgba = rgb.copy()
  rgba.putalpha(200)
  rgba.save(inputs / 'odd size.png')
  # torchvision Resize(64): shorter side 64, longer int(64 * 150 / 97) = 98;
  # CenterCrop(64): left = round((98 - 64) / 2) = 17.
  rgb.resize((98, 64), PIL.Image.Resampling.BILINEAR).crop(
      (17, 0, 81, 64)).save(inputs / 'pre-resized.png')
  proc = run_main(tiny_args(reference.workdir, reference.weights,
                            reference.root, PASSES,
                            extra=['--mode=predict',
                                   f'--config.predict.inputs={inputs}']),
                  env=main_env(jax_cache_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = {os.path.basename(r['path']): r for r in map(
      json.loads, (l for l in proc.stdout.splitlines() if l.startswith('{')))}
  assert sorted(records) == ['odd size.png', 'pre-resized.png']
  odd, pre = records['odd size.png'], records['pre-resized.png']
  assert np.isfinite(odd['score'])
  np.testing.assert_allclose(odd['score'], pre['score'], rtol=1e-6)
  with PIL.Image.open(odd['heatmap']) as im:
    assert im.size[0] > 0
  out_dir = reference.workdir / 'predict' / CATEGORY
  saved = (out_dir / 'predictions.jsonl').read_text(encoding='utf-8')
  assert len(saved.splitlines()) == 2
  assert not [p for p in out_dir.iterdir() if '.tmp' in p.name]


def _with_one_more_training_image(src_root, dst_root):
  """A copy of the dataset at src_root whose train/good has one image more."""
  shutil.copytree(src_root, dst_root)
  good = dst_root / CATEGORY / 'train' / 'good'
  with PIL.Image.open(good / '009.png') as im:
    im.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(good / '010.png')


def test_changed_training_images_keep_the_model_or_stop_a_resume(
    reference, tmp_path, jax_cache_dir):
  """Images added to train/good after training: the finished model is kept
  and evaluated as trained, with a warning, and the report counts the images
  it trained on; an unfinished run is not resumed on them (one error line,
  its checkpoints kept)."""
  root = tmp_path / 'data'
  _with_one_more_training_image(reference.root, root)
  env = main_env(jax_cache_dir)

  finished = tmp_path / 'finished'
  shutil.copytree(reference.workdir, finished)
  args = tiny_args(finished, reference.weights, root, PASSES,
                   extra=['--config.report.html=True',
                          '--config.eval.yardstick=True'])
  proc = run_main(args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ckpt_dir = finished / CATEGORY / 'checkpoints'
  assert (f'{ckpt_dir} was trained on other images than config.dataset '
          'gives now (9 training, 1 held-out and 0 validation images then, '
          '10 training, 1 held-out and 0 validation images now)'
          in proc.stderr), proc.stderr[-3000:]
  assert 'could not be loaded' not in proc.stderr
  # The same model, the same figures (the kNN yardstick is fitted on the
  # images the data gives now, so its figures may differ).
  head = ('image_auroc', 'pixel_auroc', 'aupro', 'decisions')
  (row,), _ = _rows(finished)
  (ref_row,), _ = _rows(reference.workdir)
  assert {k: row[k] for k in head} == {k: ref_row[k] for k in head}
  record = eval_record.load(str(finished / CATEGORY))
  assert (record['n_train'], record['n_holdout']) == (9, 1)
  assert record['data_change'].startswith(f'{ckpt_dir} was trained on other')
  page = (finished / 'report.html').read_text(encoding='utf-8')
  assert 'the model is evaluated as trained; the kNN columns are fitted' in page

  unfinished = tmp_path / 'unfinished'
  shutil.copytree(reference.workdir, unfinished)
  ckpt_dir = unfinished / CATEGORY / 'checkpoints'
  shutil.rmtree(ckpt_dir / str(PASSES))  # Killed before its last save.
  kept = _step_dirs(ckpt_dir)
  assert kept and max(kept) < PASSES
  proc = run_main(tiny_args(unfinished, reference.weights, root, PASSES),
                  env=env)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {ckpt_dir} was trained on other images'), last
  assert 'train in another --workdir' in last
  assert _step_dirs(ckpt_dir) == kept
  # With the images as they were, the same workdir resumes and finishes.
  proc = run_main(tiny_args(unfinished, reference.weights, reference.root,
                            PASSES), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _rows(unfinished) == _rows(reference.workdir)


# ---- In process ------------------------------------------------------------


def _data_context(root, names):
  """The parts of a CategoryContext its data record reads: the files
  `names` under `root`, all trained on, none held out, no validation."""
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  from simplenet_jax.data import images  # pylint: disable=g-import-not-at-top
  samples = [images.Sample(root / n, None, 0, 'good') for n in names]
  ctx = types.SimpleNamespace(
      train_set=images.FileDataset('train', samples, images.Geometry(square=8),
                                   has_masks=False),
      train_idx=np.arange(len(names)), holdout_idx=np.arange(0), val_set=None,
      checkpoint_dir='ckpt')
  ctx._data_digest = lambda kind: category.CategoryContext._data_digest(
      ctx, kind)
  ctx.data_record = category.CategoryContext.data_record.func(ctx)
  return ctx, lambda meta: category.CategoryContext.data_change(ctx, meta)


def test_data_record_notices_edits_in_place_and_keeps_older_records(tmp_path):
  """An image edited in place (same name, same byte size) counts as changed
  data; a copied folder does not; a record from before the contents were
  digested (names and sizes) still reads as the same images."""
  root = tmp_path / 'good'
  root.mkdir()
  names = ['a.png', 'b.png', 'c.png']
  for i, n in enumerate(names):
    PIL.Image.new('RGB', (8, 8), (40 * i, 9, 9)).save(root / n)
  ctx, change = _data_context(root, names)
  meta = {'data': ctx.data_record}
  assert meta['data']['n_train'] == 3 and meta['data']['ids'] == 'crc32'
  assert change(meta) is None
  # How checkpoints recorded their images before: name:size, no 'ids' key.
  sizes = [f'{n}:{(root / n).stat().st_size}' for n in names]
  older = {'data': dict(n_train=3, n_holdout=0, n_validation=0, digest=hex(
      zlib.crc32(json.dumps([sizes, [], []]).encode())))}
  assert change(older) is None

  copy = tmp_path / 'copy'
  shutil.copytree(root, copy)
  assert _data_context(copy, names)[1](meta) is None

  raw = bytearray((root / 'b.png').read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # Other content, the same number of bytes.
  (root / 'b.png').write_bytes(bytes(raw))
  _, change = _data_context(root, names)
  assert change(meta) == (
      'ckpt was trained on other images than config.dataset gives now (as '
      'many images as then (3 training, 0 held-out and 0 validation images),'
      ' but other files or edited ones)')
  assert change(older) is None  # What an older record cannot tell.


def _small_state(hidden=8, dim=16):
  from configs import default  # pylint: disable=g-import-not-at-top
  from simplenet_jax import train  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model.hidden = hidden
  return train.create_train_state(jax.random.PRNGKey(0), c.model, c.optim,
                                  dim, 2, 3)


def _shifted(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32),
                       params=jax.tree.map(lambda p: p + step, state.params))


def test_damaged_checkpoints_fall_back_with_a_warning(tmp_path, caplog):
  template = _small_state()
  d = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(str(d), max_to_keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, _shifted(template, step), {'passes_done': step})
  ckpt.close()
  _damage(d / '3')  # A disk fault the storage layer notices.
  # Damage only the CRC-32 check catches: array bytes that still decode.
  meta_file = d / '2' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  meta[checkpoint.CRC_KEY] ^= 1
  meta_file.write_text(json.dumps(meta))
  (d / '4.orbax-checkpoint-tmp-1234').mkdir()  # A save killed midway.

  reader = checkpoint.Checkpointer(str(d), writer=False)
  assert reader.steps() == [1, 2, 3]
  with caplog.at_level('WARNING'):
    step, state, meta = reader.restore_latest(template)
  reader.close()
  assert step == 1 and meta == {'passes_done': 1}
  _assert_trees_equal(state.params, _shifted(template, 1).params)
  warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any(f'{d}/3 could not be loaded' in w for w in warned), warned
  assert any(f'{d}/2 could not be loaded' in w and 'CRC' in w for w in warned)
  assert sorted(os.listdir(d)) == ['1', '2', '3', '4.orbax-checkpoint-tmp-1234']

  # A writer moves the damaged ones aside (and drops the killed save), so
  # training can save those steps again.
  writer = checkpoint.Checkpointer(str(d), max_to_keep=5)
  assert writer.restore_latest(template, discard_unloadable=True)[0] == 1
  assert sorted(os.listdir(d)) == ['1']
  writer.save(2, _shifted(template, 2), {'passes_done': 2})
  assert writer.steps() == [1, 2]
  writer.close()
  assert len(os.listdir(str(d) + '.unloadable')) == 2
  assert checkpoint.require_latest(str(d), template)[0] == 2


# Restores a damaged checkpoint (the only one) many times; each failed read
# leaves orphaned reads behind (see checkpoint._orphan_read_handler). Prints
# how many restores found nothing loadable.
_RESTORE_DAMAGED = textwrap.dedent('''
  import pathlib, sys
  sys.path.insert(0, sys.argv[1])
  import numpy as np
  from simplenet_jax import checkpoint
  root, n = pathlib.Path(sys.argv[2]), int(sys.argv[3])
  # About as many arrays as a train state (parameters, statistics, Adam's
  # moments), without compiling one.
  rng = np.random.default_rng(0)
  template = {f'leaf{i}': rng.normal(size=(64, 4 * i + 1)).astype(np.float32)
              for i in range(24)}
  ckpt = checkpoint.Checkpointer(str(root))
  ckpt.save(1, template, {'passes_done': 1})
  ckpt.close()
  for p in (root / '1' / 'state').rglob('*'):  # As _damage below.
    if p.is_file() and p.parent.name == 'd':
      b = bytearray(p.read_bytes())
      b[len(b) // 2] ^= 0xFF
      p.write_bytes(bytes(b))
  reader = checkpoint.Checkpointer(str(root), writer=False)
  print('NOTHING_LOADED', sum(reader.restore_latest(template) is None
                              for _ in range(n)))
  reader.close()
''')


def test_damaged_checkpoint_restores_print_no_traceback(tmp_path):
  """Each restore of a damaged checkpoint says so in one warning line and
  nothing else: no asyncio traceback from the reads it leaves behind (1 to
  25 in 100 restores printed one before the fix, depending on thread timing
  and load; hence many restores)."""
  n = 200
  proc = subprocess.run(
      [sys.executable, '-c', _RESTORE_DAMAGED, ROOT, str(tmp_path / 'ck'),
       str(n)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'NOTHING_LOADED {n}' in proc.stdout
  assert proc.stderr.count('could not be loaded') == n
  for noise in ('Traceback', 'never retrieved', 'Event loop is closed',
                'destroyed but it is pending'):
    assert noise not in proc.stderr, proc.stderr[-3000:]


def _orphan_failed_task():
  """What a failed orbax restore leaves: a task that failed while nothing
  awaited it, freed after its event loop was closed."""
  loop = asyncio.new_event_loop()

  async def read():
    raise ValueError('DATA_LOSS: damaged block')

  async def restore():
    loop.create_task(read())  # Not awaited: gather raised already.
    await asyncio.sleep(0)
    await asyncio.sleep(0)

  loop.run_until_complete(restore())
  loop.close()
  gc.collect()
  return loop


def _asyncio_errors(caplog):
  return [r for r in caplog.records
          if r.name == 'asyncio' and r.levelname == 'ERROR']


def test_orphaned_reads_of_a_restore_are_not_reported(caplog):
  policy = asyncio.get_event_loop_policy()
  with caplog.at_level('ERROR', logger='asyncio'):
    _orphan_failed_task()  # Outside a restore: asyncio reports it ...
    assert [r.getMessage().splitlines()[0] for r in _asyncio_errors(caplog)
           ] == ['Task exception was never retrieved']
    caplog.clear()
    with checkpoint._restoring():  # pylint: disable=protected-access
      loop = _orphan_failed_task()  # ... inside one, it does not.
    assert not _asyncio_errors(caplog)
    # Anything else the restore's loop reports still surfaces.
    loop.call_exception_handler({'message': 'unexpected trouble',
                                 'exception': RuntimeError('boom')})
    assert [r.getMessage() for r in _asyncio_errors(caplog)] == [
        'unexpected trouble']
  assert asyncio.get_event_loop_policy() is policy  # Put back.


def test_checkpoint_of_another_config_is_an_error_not_skipped(tmp_path):
  template = _small_state()
  d = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(str(d))
  ckpt.save(1, template, {'passes_done': 1, 'fingerprint': 'a'})

  def check(meta):
    if meta['fingerprint'] != 'b':
      raise UserError('written with a different config')
  with pytest.raises(UserError, match='different config'):
    ckpt.restore_latest(template, check_meta=check, discard_unloadable=True)
  assert ckpt.steps() == [1]  # Not moved aside: it is not damaged.
  ckpt.close()


def test_nothing_is_created_before_the_first_save(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.steps() == []
  assert ckpt.restore_latest(_small_state()) is None
  ckpt.close()
  assert not (tmp_path / 'checkpoints').exists()


class _Boom:
  """Unpickling this creates a marker file (stands for arbitrary code)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_checkpoints_never_unpickle(tmp_path, monkeypatch):
  template = _small_state()
  d = tmp_path / 'checkpoints'

  def refuse(*unused_args, **unused_kwargs):
    raise AssertionError('something unpickled')
  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  ckpt = checkpoint.Checkpointer(str(d))
  ckpt.save(1, _shifted(template, 1), {'passes_done': 1})
  ckpt.save(2, _shifted(template, 2), {'passes_done': 2})
  step, state, _ = ckpt.restore_latest(template)
  ckpt.close()
  assert step == 2
  _assert_trees_equal(state.params, _shifted(template, 2).params)
  monkeypatch.undo()

  # A crafted pickle in place of a checkpoint's files is data, never code.
  marker = tmp_path / 'pwned'
  payload = pickle.dumps(_Boom(str(marker)))
  (d / '2' / 'meta' / 'metadata').write_bytes(payload)
  (d / '2' / 'state' / '_METADATA').write_bytes(payload)
  assert checkpoint.require_latest(str(d), template)[0] == 1
  assert not marker.exists()


def test_converted_weights_with_object_arrays_are_refused(tmp_path):
  """flax msgpack: an ndarray of dtype object (a pickle in disguise) fails."""
  from simplenet_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'pwned'
  evil = msgpack.packb((list((1,)), b'O', pickle.dumps(_Boom(str(marker)))))
  payload = {'params': {'w': msgpack.ExtType(1, evil)},
             'meta': {'backbone': 'efficientnet_lite0'}}
  path = tmp_path / 'efficientnet_lite0.msgpack'
  path.write_bytes(msgpack.packb(payload))
  with pytest.raises(UserError, match='efficientnet_lite0.msgpack'):
    weights.read_converted(str(path), 'efficientnet_lite0')
  assert not marker.exists()


def test_truncate_log_drops_later_passes_and_a_cut_line(tmp_path):
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'log.jsonl'
  path.write_text('{"pass": 1, "loss": 1.5}\n{"pass": 2, "loss": 1.25}\n'
                  '{"pass": 3, "loss": 1.0}\n{"pass": 4, "lo')
  loop._truncate_log(str(path), 2)  # pylint: disable=protected-access
  assert path.read_text() == '{"pass": 1, "loss": 1.5}\n{"pass": 2, "loss": 1.25}\n'
  loop._truncate_log(str(path), 0)  # pylint: disable=protected-access
  assert path.read_text() == ''


@pytest.fixture(scope='module')
def category_context(lite0_weights_dir, awkward_root):
  """A factory of CategoryContexts of the tiny config (4 passes, a
  checkpoint after every pass; layer2 only, to compile less) in a given
  workdir."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from simplenet_jax import backbones  # pylint: disable=g-import-not-at-top
  from simplenet_jax import config_checks  # pylint: disable=g-import-not-at-top
  from simplenet_jax import category  # pylint: disable=g-import-not-at-top
  from simplenet_jax import parallel  # pylint: disable=g-import-not-at-top
  root, _ = awkward_root
  c = demo.get_config()
  c.backbone.weights_dir = str(lite0_weights_dir)
  c.backbone.layers = ('layer2',)
  c.dataset.kind = 'mvtec'
  c.dataset.root = str(root)
  c.dataset.categories = (CATEGORY,)
  c.dataset.resize = c.dataset.crop = 64
  c.dataset.num_workers = 2
  c.model.pretrain_embed_dim = c.model.target_embed_dim = 64
  c.model.hidden = 32
  c.train.batch_size = 2
  c.train.num_passes = 4
  c.train.checkpoint_every = 1
  c.eval.batch_size = 8
  c.eval.visualize = 'none'
  c.synthesis.gas = 'none'  # The plain step (the tests patch it).
  c.train.augment = 'none'  # The passes above, whatever the tiles' flips.
  config = config_checks.validate(c)
  mesh = parallel.make_mesh()
  module, variables = backbones.load_for_run(config.backbone)
  variables = parallel.put_replicated(variables, mesh)

  def make(workdir):
    return category.CategoryContext.create(config, str(workdir), CATEGORY,
                                           'object', module, variables, mesh)
  return make


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    category_context, tmp_path, monkeypatch):
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  from simplenet_jax import train  # pylint: disable=g-import-not-at-top
  ctx = category_context(tmp_path)
  make_step = train.make_cached_step
  calls = []

  def poisoning(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def run(state, *rest, **kw):
      state, metrics = step(state, *rest, **kw)
      calls.append(1)
      if len(calls) == 12:  # Pass 3 (5 steps a pass): parameters turn NaN.
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan,
                                                  state.params))
      return state, metrics
    return run
  monkeypatch.setattr(train, 'make_cached_step', poisoning)
  with pytest.raises(UserError, match=r'non-finite loss in pass 3') as e:
    loop.train_category(ctx)
  assert 'pass 2' in str(e.value) and '\n' not in str(e.value)
  ckpt = checkpoint.Checkpointer(os.path.join(ctx.workdir, 'checkpoints'))
  try:
    assert ckpt.steps() == [1, 2]
    step, state, meta = ckpt.restore_latest(ctx.new_state())
  finally:
    ckpt.close()
  assert step == 2 and meta['passes_done'] == 2 and 'threshold' not in meta
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert [r['pass'] for r in _log(tmp_path)] == [1, 2]


@pytest.mark.parametrize('error', [
    jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while '
                               'trying to allocate 34359738368 bytes.'),
    MemoryError()])
def test_out_of_memory_building_the_cache_says_what_to_change(
    category_context, tmp_path, error):
  from simplenet_jax import loop  # pylint: disable=g-import-not-at-top
  ctx = category_context(tmp_path)
  real = ctx.feature_fn

  def out_of_memory(variables, images):
    if isinstance(images, jax.core.Tracer):  # Shape inference: fine.
      return real(variables, images)
    raise error
  ctx.feature_fn = out_of_memory
  with pytest.raises(UserError) as e:
    loop.train_category(ctx)
  message = str(e.value)
  for what in ('train.cache_max_gb', 'train.cache_dtype=bfloat16',
               'batch_size'):
    assert what in message
  assert not (tmp_path / CATEGORY / 'checkpoints').exists()

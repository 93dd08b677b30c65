"""The head learns: normal vectors on a low-dimensional subspace vs the same
vectors pushed off it. Fails if the loss sign, the margin or the noise is
wrong (scores inverted, or nothing to tell apart)."""

import jax
import numpy as np
from sklearn.metrics import roc_auc_score

from configs.default import get_config
import helpers
from simplenet_jax import train

DIM, SUBSPACE, ROWS, STEPS = 32, 4, 256, 300


def _data(seed=0):
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
  on, off = basis[:, :SUBSPACE], basis[:, SUBSPACE:]

  def normal(n):
    return (rng.normal(size=(n, SUBSPACE)) @ on.T).astype(np.float32)

  def anomalous(n):
    push = 0.2 * rng.normal(size=(n, DIM - SUBSPACE)) @ off.T
    return normal(n) + push.astype(np.float32)
  return normal(ROWS * STEPS), normal(500), anomalous(500)


def test_separates_held_out_anomalies():
  train_x, test_normal, test_anomalous = _data()
  cfg = get_config()
  cfg.model.hidden = 64
  cfg.model.noise_mode = 'relative'
  cfg.model.noise_rel = 0.3
  state = train.create_train_state(jax.random.key(0), cfg.model, cfg.optim,
                                   DIM, STEPS, 1)
  state = train.calibrate_noise(state, cfg.model, train_x[:2048])
  assert 0 < float(state.noise_std) < 1
  key = jax.random.key(1)
  first = None
  for i in range(STEPS):
    state, metrics = train.train_step(state, train_x[i * ROWS:(i + 1) * ROWS],
                                      jax.random.fold_in(key, i))
    first = first if first is not None else float(metrics['loss'])
  assert float(metrics['loss']) < 0.5 * first
  scores = np.asarray(helpers.reference_patch_scores(
      state, np.concatenate([test_normal, test_anomalous])))
  labels = np.r_[np.zeros(len(test_normal)), np.ones(len(test_anomalous))]
  assert roc_auc_score(labels, scores) > 0.95

"""The released constants, pinned.

The parity tests take these from configs/default.py and check them against
what the fixtures of the released code store; here they are written out
once, with where they come from, so that a changed default fails even where
no fixture records the value.

Sources: the paper (Liu et al., CVPR 2023, Sec. 4.1 "Implementation
details"), the released code (simplenet.py, common.py RescaleSegmentor,
run_mvtec.sh) and torch's defaults that code relies on.
"""

import inspect

import pytest
import scipy.ndimage

from configs import default
from configs import mvtec
from configs import glass
from configs import mvtec_official
from simplenet_jax import model
from simplenet_jax import scoring
from simplenet_jax import synthesis

# key -> released value.
RELEASED = {
    # RescaleSegmentor: ndimage.gaussian_filter(scores, sigma=4); paper: "a
    # Gaussian filter with sigma = 4".
    'eval.sigma': 4.0,
    # simplenet.py _predict: image score = max over the patch scores (before
    # the maps are upsampled and smoothed).
    'eval.image_score': 'patch_max',
    # simplenet.py _predict: one forward pass per image (no test-time views).
    'eval.tta': 'none',
    # The MVTec AD AUPRO (Bergmann et al., IJCV 2021): the PRO curve
    # integrated up to FPR 0.3 and normalised (README, "Known limits").
    'eval.aupro_max_fpr': 0.3,
    # run_mvtec.sh --dsc_margin .5; paper: th+ = th- = 0.5.
    'model.margin': 0.5,
    # run_mvtec.sh --noise_std 0.015; paper: "sigma = 0.015".
    'model.noise_std': 0.015,
    'model.noise_mode': 'absolute',
    'model.mix_noise': 1,
    # run_mvtec.sh: --pretrain_embed_dimension 1536 --target_embed_dimension
    # 1536 --patchsize 3 --dsc_hidden 1024, -le layer2 -le layer3.
    'model.pretrain_embed_dim': 1536,
    'model.target_embed_dim': 1536,
    'model.patch_size': 3,
    'model.hidden': 1024,
    # run_mvtec.sh --pre_proj 1: one trained Linear adaptor.
    'model.pre_proj': 1,
    'backbone.name': 'wide_resnet50_2',
    'backbone.layers': ('layer2', 'layer3'),
    # simplenet.py: proj_opt = AdamW(lr * .1), i.e. AdamW(1e-4) with AdamW's
    # default weight_decay 0.01; dsc_opt = Adam(lr=dsc_lr 2e-4,
    # weight_decay=1e-5) (fixtures README). Paper: lr 1e-4 / 2e-4.
    'optim.variant': 'released',
    'optim.adaptor_lr': 1e-4,
    'optim.adaptor_wd': 0.01,
    'optim.disc_lr': 2e-4,
    'optim.disc_wd': 1e-5,
    'optim.cos_lr': False,
}


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return tuple(config) if isinstance(config, (list, tuple)) else config


@pytest.mark.parametrize('module', [default, mvtec, mvtec_official],
                         ids=lambda m: m.__name__)
def test_configs_keep_the_released_constants(module):
  config = module.get_config()
  got = {key: _get(config, key) for key in RELEASED}
  assert got == RELEASED


@pytest.mark.parametrize('module', [default, mvtec, mvtec_official],
                         ids=lambda m: m.__name__)
def test_released_configs_train_without_synthesis(module):
  syn = synthesis.SynthesisConfig.from_config(module.get_config().synthesis)
  assert not syn.active  # train.train_step, the released step, is used.


def test_glass_config_keeps_glass_published_settings():
  # GLASS's shell/run-mvtec.sh: --meta_epochs 640 --noise 0.015 --radius 0.75
  # --p 0.5 --step 20 (--lr default 1e-4), --batch_size 8 --resize 288 --imagesize 288, WRN50-2
  # layers 2+3 at 1536 dims, dsc_hidden 1024; FocalLoss gamma 2 (loss.py).
  c = glass.get_config()
  got = {k: _get(c, k) for k in (
      'train.num_passes', 'model.noise_std', 'synthesis.gas_quantile',
      'synthesis.focal_hard', 'synthesis.gas_steps', 'synthesis.gas_every',
      'train.batch_size', 'dataset.resize', 'dataset.crop',
      'dataset.texture_resize', 'backbone.name', 'backbone.layers',
      'model.target_embed_dim', 'model.hidden', 'model.noise_mode',
      'synthesis.focal_gamma', 'synthesis.loss', 'optim.variant',
      'optim.adaptor_lr', 'optim.adaptor_wd', 'optim.disc_lr',
      'optim.disc_wd', 'optim.cos_lr', 'synthesis.gas_bn',
      'synthesis.gas_centre')}
  assert got == {
      'train.num_passes': 640, 'model.noise_std': 0.015,
      'synthesis.gas_quantile': 0.75, 'synthesis.focal_hard': 0.5,
      'synthesis.gas_steps': 20, 'synthesis.gas_every': 5,
      'train.batch_size': 8, 'dataset.resize': 288, 'dataset.crop': 0,
      'dataset.texture_resize': 288, 'backbone.name': 'wide_resnet50_2',
      'backbone.layers': ('layer2', 'layer3'), 'model.target_embed_dim': 1536,
      'model.hidden': 1024, 'model.noise_mode': 'absolute',
      'synthesis.focal_gamma': 2.0, 'synthesis.loss': 'bce',
      # glass.py: Adam(lr=1e-4, weight_decay=1e-5) for the projection,
      # AdamW(lr * 2) (decay 0.01, torch's default) for the discriminator,
      # no scheduler.
      'optim.variant': 'glass', 'optim.adaptor_lr': 1e-4,
      'optim.adaptor_wd': 1e-5, 'optim.disc_lr': 2e-4, 'optim.disc_wd': 0.01,
      'optim.cos_lr': False,
      # glass.py: discriminator.train() during the ascent.
      'synthesis.gas_bn': 'batch',
      # glass.py L253-271: the centre recomputed at each epoch's start.
      'synthesis.gas_centre': 'pass'}
  syn = synthesis.SynthesisConfig.from_config(c.synthesis)
  assert syn.gas != 'none' and syn.las and syn.texture_dir
  # In WRN50-2 units (rho = 0.015 sqrt(1536)): GLASS's step 0.001 and
  # manifold ring [0.5, 1.0].
  rho = 0.015 * 1536**0.5
  assert abs(c.synthesis.gas_step * rho - 0.001) < 2e-5
  assert abs(c.synthesis.gas_r1 * rho - 0.5) < 0.01
  assert abs(c.synthesis.gas_r2 * rho - 1.0) < 0.01


def test_smoothing_truncates_at_4_sigma_as_scipy_does():
  # The released code calls gaussian_filter without `truncate`: scipy's 4.0.
  truncate = inspect.signature(scipy.ndimage.gaussian_filter).parameters[
      'truncate'].default
  assert truncate == 4.0
  # Our blur matrix: sigma 4 -> radius int(4 * 4 + 0.5) = 16, no further.
  column = scoring.map_matrix(64, 64, RELEASED['eval.sigma'])[:, 32]
  assert column[32 - 16] > 0 and column[32 + 16] > 0
  assert not column[:32 - 16].any() and not column[32 + 17:].any()


def test_batchnorm_is_torchs_default():
  # The released discriminator's torch.nn.BatchNorm1d(dsc_hidden).
  assert model.TorchBatchNorm.momentum == 0.1
  assert model.TorchBatchNorm.epsilon == 1e-5


def test_library_signatures_take_sigma_and_max_fpr_from_the_config():
  """No silent defaults: the config's value must be passed."""
  from simplenet_jax import metrics  # pylint: disable=g-import-not-at-top
  sigma = inspect.signature(scoring.anomaly_maps).parameters['sigma']
  assert sigma.default is inspect.Parameter.empty
  max_fpr = inspect.signature(metrics.PixelMetrics).parameters['max_fpr']
  assert max_fpr.default is inspect.Parameter.empty
  with pytest.raises(TypeError):
    metrics.PixelMetrics()  # pylint: disable=no-value-for-parameter

"""yardstick.advice: the hint when the head's loss saturated and it trails
kNN on the same features."""

import re

import ml_collections

from configs import demo
from configs import folder
from simplenet_jax import config_checks
from simplenet_jax import yardstick


def _model(**kw):
  m = ml_collections.ConfigDict({'method': 'simplenet', 'noise_mode': 'spread',
                                 'noise_rel': 0.4})
  m.update(kw)
  return m


def _row(head, knn):
  r = {'category': 'gravel'}
  r.update(zip(('image_auroc', 'pixel_auroc', 'aupro'), head))
  r.update(zip(('knn_image_auroc', 'knn_pixel_auroc', 'knn_aupro'), knn))
  return r


SATURATED = {'pass': 40, 'p_fake': 0.99, 'loss': 0.002}


def test_saturated_and_trailing_gets_a_quarter_of_the_noise():
  # The twelfth round's gravel, 80 tiles, seed 0: 83.3 / 84.7 against kNN's
  # 95.3 / 92.7, last p_fake 0.982.
  hint = yardstick.advice(_row((0.833, 0.847, 0.626), (0.953, 0.927, 0.830)),
                          {'p_fake': 0.982}, _model())
  assert hint.startswith("gravel: the head's loss saturated (last pass: "
                         'p_fake 0.982)')
  assert 'in image and pixel AUROC' in hint
  assert '--config.model.noise_rel=0.1 ' in hint
  # Trailing in one of the two is enough; it names which.
  hint = yardstick.advice(_row((0.97, 0.90, 0.7), (0.95, 0.93, 0.8)),
                          SATURATED, _model(noise_rel=0.2))
  assert 'in pixel AUROC;' in hint and 'noise_rel=0.05 ' in hint


def test_no_hint_when_leading_unsaturated_or_not_applicable():
  leads = _row((0.982, 0.964, 0.874), (0.953, 0.961, 0.896))  # 279 photos.
  trails = _row((0.8, 0.8, 0.6), (0.9, 0.9, 0.8))
  assert yardstick.advice(leads, SATURATED, _model()) is None
  assert yardstick.advice(trails, {'p_fake': 0.97}, _model()) is None
  assert yardstick.advice(trails, {}, _model()) is None  # No log.
  # The released absolute std (WRN50-2's constant) and kNN runs: no hint.
  assert yardstick.advice(trails, SATURATED,
                          _model(noise_mode='absolute')) is None
  assert yardstick.advice(trails, SATURATED, _model(method='knn')) is None
  # No yardstick figures in the row.
  assert yardstick.advice({'category': 'g', 'image_auroc': 0.5}, SATURATED,
                          _model()) is None
  # Without masks the pixel figures are NaN: only the image AUROC counts.
  nan = float('nan')
  assert yardstick.advice(_row((0.95, nan, nan), (0.9, nan, nan)), SATURATED,
                          _model()) is None


def test_after_an_automatic_shrink_the_hint_names_knn():
  # model.shrink_on_saturation already trained again with a quarter of the
  # noise after pass 12 saturated, and the loss saturated again: a quarter
  # of noise_rel is not new advice.
  hint = yardstick.advice(_row((0.8, 0.8, 0.6), (0.9, 0.9, 0.8)), SATURATED,
                          _model(shrink_on_saturation=0.25), saturated_at=12)
  assert ('already trained again with a smaller noise after pass 12 '
          'saturated (model.shrink_on_saturation)') in hint
  assert '--config.model.method=knn' in hint and 'noise_rel=' not in hint
  leads = _row((0.982, 0.964, 0.874), (0.953, 0.961, 0.896))
  assert yardstick.advice(leads, SATURATED, _model(), saturated_at=12) is None


def test_after_a_stop_the_hint_names_the_restart():
  # model.stop_on_saturation ended training at pass 116 and the model trails
  # kNN (the fifty-third round's cookie photos at 256 px, seed 0: 96.43 /
  # 95.37 against 99.55 / 96.41): the hint's flag turns the restart on and
  # keeps the stop (for a second saturation), a valid config from the demo
  # config with the stop.
  config = demo.get_config()
  config.model.shrink_on_saturation = 0.0
  config.model.stop_on_saturation = True
  config_checks.validate(config)
  hint = yardstick.advice(_row((0.9643, 0.9537, 0.8277),
                               (0.9955, 0.9641, 0.9072)), SATURATED,
                          config.model, train_cfg=config.train,
                          stopped_at=116)
  assert 'in image and pixel AUROC; training stopped at pass 116 ' in hint
  assert 'noise_rel=' not in hint and 'method=knn' not in hint
  flags = re.findall(r'--config\.(\S+)=(\S+)', hint)
  assert flags == [('model.shrink_on_saturation', '0.25')]
  config.model.shrink_on_saturation = float(flags[0][1])
  config_checks.validate(config)


def test_the_knn_hint_is_a_valid_switch_of_the_folder_config():
  # configs/folder.py ships head-only switches (GAS, train.neighbour_mix)
  # that kNN runs refuse: the hint's flags must switch those off too.
  config = folder.get_config()
  assert config.train.neighbour_mix  # Else this test checks nothing new.
  hint = yardstick.advice(_row((0.8, 0.8, 0.6), (0.9, 0.9, 0.8)), SATURATED,
                          config.model, saturated_at=12,
                          train_cfg=config.train)
  flags = re.findall(r'--config\.(\S+)=(\S+)', hint)
  assert ('train.neighbour_mix', '0') in flags
  for key, value in flags:
    section, name = key.split('.')
    old = config[section][name]
    config[section][name] = type(old)(value)
  config_checks.validate(config)
  # Without a mix in the config the hint does not name it.
  config = folder.get_config()
  config.train.neighbour_mix = 0.0
  hint = yardstick.advice(_row((0.8, 0.8, 0.6), (0.9, 0.9, 0.8)), SATURATED,
                          config.model, saturated_at=12,
                          train_cfg=config.train)
  assert 'neighbour_mix' not in hint

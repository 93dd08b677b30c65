"""MVTec AD as in the released run script (run_mvtec.sh).

Resize 329, center-crop 288 for every category (textures included), batch 8,
40 x 4 = 160 passes. The released script picks the best pass on the test set;
here the final model is reported unless --config.train.select_best_on_test=True
(and then the numbers are labelled test-set selected).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset.kind = 'mvtec'
  c.dataset.root = 'data/mvtec'
  c.dataset.resize = 329
  c.dataset.crop = 288
  c.dataset.texture_resize = 0  # 0: textures take the object transform.
  c.train.batch_size = 8
  c.train.num_passes = 160
  c.train.eval_every = 4  # The released code evaluates after each 4 passes.
  return c

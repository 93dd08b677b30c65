"""MVTec AD as in the seed reproduction report (the project's default).

Objects: resize 256, center-crop 224. Textures (carpet, grid, leather, tile,
wood): resized straight to 256x256, no crop (the report's change, credited
for its better pixel AUROC). Batch 4, 160 passes, WRN50-2 layers 2+3.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset.kind = 'mvtec'
  c.dataset.root = 'data/mvtec'
  c.dataset.categories = ('all',)
  c.dataset.resize = 256
  c.dataset.crop = 224
  c.dataset.texture_resize = 256
  c.train.batch_size = 4
  c.train.num_passes = 160
  return c

"""The paper's one-class novelty detection on CIFAR-10 (via tensorflow-datasets).

Each class in turn is the normal class: train on its 5,000 training images,
test on all 10,000 test images (anomalous = any other class), image AUROC per
class. Images are upsampled to 128x128 before the backbone (the CIFAR-10
photos are 32x32); features are cached in bfloat16 to keep 5,000 images within
the default cache cap.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset.kind = 'cifar10'
  c.dataset.categories = ('all',)
  c.dataset.normal_class = -1
  c.dataset.resize = 128
  c.dataset.crop = 0
  c.train.batch_size = 32
  c.train.num_passes = 20
  c.train.cache_dtype = 'bfloat16'
  c.eval.batch_size = 64
  c.eval.visualize = 'none'
  c.eval.feature_histogram = False
  return c

"""Your own data: a folder of normal training images and test folders.

  python main.py --config configs/folder.py --workdir runs/mine \
    --config.dataset.train_dir=/data/parts/train \
    --config.dataset.test_dirs.good=/data/parts/test/good \
    --config.dataset.test_dirs.crack=/data/parts/test/crack \
    --config.dataset.test_dirs.scratch=/data/parts/test/scratch \
    --config.dataset.mask_dir=/data/parts/masks    # optional
    --config.dataset.val_dir=/data/parts/val       # optional, normal images

Test folders named 'good' or 'normal' hold normal images; any other name holds
anomalous ones, one --config.dataset.test_dirs.<name>=DIR per folder under a
name of your choice (the defect type, which the report's captions show;
`defect` is offered for a single folder). Masks of an anomalous image are
looked up in mask_dir/<name>/ (MVTec's ground_truth layout), then mask_dir/.
Without masks the pixel metrics are skipped (and said so).
Every image is resized whole to 256x256 (the transform MVTec AD's textures
get), so no part of it is cropped away: the object transform (shorter side
256, centre crop 224) drops a third of a 3:4 photo, with any defect there.
The decision threshold used by --mode=predict comes from dataset.val_dir's
normal images, not trained on, when it is set (best: images taken apart
from the training ones, not near-copies of them), else from a held-out 10%
of the normal training images.

The head trains as the demo's does (configs/demo.py lists each choice;
docs/switches.md describes each in full with its measurements): noise
scaled to the centred spread of the adapted features, GLASS's hypersphere
ascent, three heads averaged, the photos' flips as training images where
they look normal and there the neighbour mix, and the restart and stop at a
saturated loss. It differs where a user's parts may differ from the demo's
textures:
- WRN50-2 (configs/default.py's backbone: convert its weights as the
  README says) with the released feature and head sizes (1536 dims, 1024
  hidden units) and 160 passes, sized for an accelerator. Without WRN50-2's
  weights, --config.backbone.name=efficientnet_lite0 is the demo's offline
  backbone (and, on a CPU, the flags below).
- No test-time flips (eval.tta='none'), because a mirrored part can be a
  defect; if your images look normal mirrored (textures, most surfaces),
  --config.eval.tta=flips helped the head on every set measured.
- Unsquashed scores and the largest patch score as the image score
  (eval.squash='none', eval.image_score='patch_max'): the squash closes
  brick's gap to kNN but costs the cookie photos a little at 256 px.
- If a mirrored part can be a defect, --config.train.augment=none trains on
  the photos alone (the released training set), or
  --config.train.augment=shifts on each photo moved by half a feature cell.
  Without defect images to tell which suits your parts, train both ways
  (two --workdir) with --config.eval.synthetic_defects=16 and keep the run
  whose synthetic-defect pixel AUROC is higher.
Every evaluation also reports kNN on the same features (eval.yardstick; on
the cookie photos at this config's 256 px, with the CPU flags below, the
head passes it in every column; at 128 px kNN localises better);
--config.model.method=knn --config.synthesis.gas=none
--config.train.neighbour_mix=0 trains and ships that scorer instead. If
the loss saturated at the end of training and the head trails kNN, the
run's 'hint:' line says what to try.

On a CPU add --config.model.pretrain_embed_dim=384
--config.model.target_embed_dim=384 --config.train.num_passes=40 (the
demo's head: features narrowed, 1024 hidden units kept). On the cookie
photos (28 trained on, 256x256, EfficientNet-Lite0, the 2-core development
machine) three heads then took 82-83 s per pass over the photos and their
flips (10 passes, about 14 minutes of training; 18-21 s per pass over the
photos alone) and scored 99.9 / 97.5 / 92.2 (I / P / PRO %, 3 seeds; kNN
on the same features and views 97.9 / 96.5 / 90.7). One head
(--config.model.heads=1) took 6-8 s per pass over the photos alone; adding
--config.model.hidden=256, 2.0 s. The released sizes cost about 25 s per
pass with one head there. The kNN yardstick adds its coreset selection,
which grows as the square of the number of training images (279 photos at
256x256: about 4 minutes on that CPU); --config.eval.yardstick=False skips
it. A run trained with this config
before the twenty-fourth round (one head) needs --config.model.heads=1 to
be resumed or evaluated.
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.dataset.kind = 'folder'
  c.dataset.categories = ('folder',)
  c.dataset.train_dir = ''
  c.dataset.test_dirs = ml_collections.ConfigDict({'good': '', 'defect': ''})
  c.dataset.mask_dir = ''
  c.dataset.val_dir = ''
  # Whole images, resized to texture_resize squared (data.images.geometry_for):
  # the category is a 'texture' under whatever name it is given.
  c.dataset.textures = c.dataset.get_ref('categories')
  c.dataset.texture_resize = 256
  c.model.noise_mode = 'spread'
  c.model.noise_rel = 0.4
  # Many training images saturate the loss at that noise: train again with
  # a quarter of it (docs/quality.md, seventeenth round), and stop if that
  # saturates too (fifty-fourth round).
  c.model.shrink_on_saturation = 0.25
  c.model.stop_on_saturation = True
  c.synthesis.gas = 'hypersphere'
  c.model.heads = 3  # Three heads side by side, their scores averaged.
  # The photos' flips too where they look normal (a quarter of the passes).
  c.train.augment = 'auto'
  # Where it takes them, each training feature is also moved toward a
  # neighbour in another training image (docs/quality.md, thirty-sixth
  # round).
  c.train.neighbour_mix = 1.0
  c.train.neighbour_mix_when = 'flips'
  c.threshold.holdout_fraction = 0.1  # Without dataset.val_dir.
  # kNN on the same features, reported beside the head's figures.
  c.eval.yardstick = True
  return c

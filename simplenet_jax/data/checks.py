"""Every category's files checked before the backbone loads or training starts.

Lists the train and test splits (missing folders, empty splits, defect
images without masks raise here) and reads every image and mask header:
unreadable files, masks whose size differs from their image and, without a
crop, images of another aspect ratio are reported now, not in category 12
of 15 or after training. Truncated image data is only found when decoded
(training images when the feature cache is built, test images at
evaluation, after the final checkpoint is saved).
"""

from simplenet_jax import data
from simplenet_jax.data import images
from simplenet_jax.errors import UserError

# Kinds whose files are listed and checked here (the tfds kinds read prepared
# records: their sources are checked when prepared).
FILE_KINDS = ('mvtec', 'folder', 'demo')


def check_data(dataset_cfg, workdir: str, categories) -> None:
  """Raises a UserError naming the first bad file of any category's splits."""
  if dataset_cfg.kind not in FILE_KINDS:
    return
  for category, _ in categories:
    for split in ('train', 'test'):
      check_files(data.build(dataset_cfg, category, split, workdir))


def check_files(dataset) -> None:
  """Image and mask headers of one split (`dataset.samples`)."""
  for s in getattr(dataset, 'samples', ()):
    hw = images.image_hw(s.image)
    out = dataset.geometry.output_hw(hw)
    if tuple(out) != tuple(dataset.image_hw):
      raise UserError(
          f'{s.image}: becomes {out[0]}x{out[1]} after resizing but the '
          f'dataset\'s images are {dataset.image_hw[0]}x'
          f'{dataset.image_hw[1]} (their aspect ratios differ); set '
          'config.dataset.crop > 0 to crop all to one size.')
    if s.mask is not None:
      mask_hw = images.image_hw(s.mask)
      if mask_hw != hw:
        raise UserError(
            f'mask {s.mask} is {mask_hw[0]}x{mask_hw[1]} but its image '
            f'{s.image} is {hw[0]}x{hw[1]}; they must match.')

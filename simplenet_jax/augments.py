"""train.augment's values and what each trains on, in words.

Without JAX (the HTML report renders from a workdir alone); the views
themselves are `feature_cache.views`, the choice under 'auto'
`view_check`.
"""

# One flip of each training image alone, in view_check.FLIP_NAMES' order
# (left-right, up-down, both): what 'auto' takes where only some flips
# look normal. The double flip is a half turn.
SINGLE_FLIPS = ('flip_lr', 'flip_ud', 'rot180')

# The training images a pass covers under each value, in words.
WORDS = {
    'none': 'the images alone',
    'flips': 'each image and its three flips',
    'flip_lr': 'each image and its left-right flip',
    'flip_ud': 'each image and its up-down flip',
    'rot180': 'each image and its double flip (a half turn)',
    'shifts': 'each image and its three half-cell shifts',
    'auto': ('each image and its flips where they look normal (with a '
             'quarter or half of the passes)'),
}
AUGMENTS = tuple(WORDS)

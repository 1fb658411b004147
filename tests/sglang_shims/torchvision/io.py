"""Names transformers' image_utils imports when it sees torchvision."""

import enum

from torchvision._unusable import module_getattr, unusable


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_image = unusable("torchvision.io.decode_image")
__getattr__ = module_getattr("torchvision.io")

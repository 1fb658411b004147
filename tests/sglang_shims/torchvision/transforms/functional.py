from torchvision._unusable import module_getattr
from torchvision.transforms import InterpolationMode  # noqa: F401  (imported from here too)

__getattr__ = module_getattr("torchvision.transforms.functional")

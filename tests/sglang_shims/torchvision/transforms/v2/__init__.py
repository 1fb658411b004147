from torchvision._unusable import module_getattr

__getattr__ = module_getattr("torchvision.transforms.v2")

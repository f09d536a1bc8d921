"""Image constants shared by every network: the ImageNet normalisation the backbones expect."""

#: per-channel mean and standard deviation of RGB in [0, 1] (torchvision's and timm's convention)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

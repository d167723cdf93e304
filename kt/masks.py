"""Segmentation labels: mask files, the transform that moves an image and its mask together, the ignore index.

A mask is a PNG of class indices (one channel), IGNORE = not labeled (mmsegmentation's convention), or
`NAME:SPLIT:INDEX` of a generated dataset that draws its own (the demo's scenes). kt.data imports this
module only for a segmentation split.
"""
import os

import numpy as np
import torch

IGNORE = 255  # mask pixels that are not labeled (mmsegmentation's ignore index); never a class of a mask


def open_mask(ref, root="data", reduce_zero_label=False, num_classes=None, size=None):
    """A mask reference (a PNG path, or NAME:SPLIT:INDEX of a dense dataset) -> (H, W) int64 class indices,
    IGNORE = not labeled. With num_classes and size (W, H), a value out of range or a size other than the
    image's is a ValueError naming the mask."""
    from PIL import Image
    by_index = None
    if ":" in ref and not os.path.exists(ref):  # NAME:SPLIT:INDEX of a dataset that draws its masks
        from kt import catalog
        by_index = catalog.indexed_ref(ref)
    if by_index:
        name, split, i = by_index
        mask = np.asarray(catalog.indexed(name, split, root).mask(i), dtype=np.int64)
    else:
        with Image.open(ref) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                kind = "a 1-bit image" if im.mode == "1" else f"a {im.mode} image"
                raise ValueError(f"mask {ref} is {kind}: save class indices as a 1-channel (L or P) PNG")
            mask = np.asarray(im, dtype=np.int64)
    if reduce_zero_label:  # ADE20K: 0 is "other", not scored; class k is stored as k + 1
        mask = np.where(mask == 0, IGNORE + 1, mask) - 1
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ValueError(f"mask {ref} is {mask.shape[1]}x{mask.shape[0]}, its image {size[0]}x{size[1]}")
    if num_classes is not None and ((mask >= num_classes) & (mask != IGNORE)).any():
        raise ValueError(f"mask {ref} holds class {int(mask[mask != IGNORE].max())}: classes are "
                         f"0-{num_classes - 1}, {IGNORE} not labeled")
    from torchvision import tv_tensors
    return tv_tensors.Mask(torch.from_numpy(mask))


def pair_transform(cfg, train, scale=(0.25, 1.0)):
    """The segmentation transform: (PIL image, mask) -> (normalised image (3, H, W), mask (H, W) int64).

    Training: torchvision.transforms.v2 moves both through the same random crop and flip (the mask resized
    with nearest, so labels stay labels); colour jitter and normalisation touch the image alone.
    Evaluation: the image resized to the model's input, the mask left at its own resolution, where
    evaluate.py scores the upsampled prediction (as mmsegmentation does).
    """
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    size = tuple(cfg["input_size"][1:])
    to_input = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                v2.Normalize(cfg["mean"], cfg["std"])]
    if train:
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=scale), v2.RandomHorizontalFlip(),
                           v2.ColorJitter(0.4, 0.4, 0.4), *to_input])
    return ImageOnly(v2.Compose([v2.ToImage(), v2.Resize(size), *to_input]))


class ImageOnly:
    """(image, mask) -> (transform(image), mask): evaluation keeps each mask at its own resolution."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, mask):
        return self.transform(image), mask

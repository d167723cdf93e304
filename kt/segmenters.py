"""Segmenters: a classification backbone read as feature maps, plus a light decoder -> per-pixel logits.

Segmenter(backbone, num_classes, decoder) takes a timm model or an OpenCLIP image tower as it is (its
weights loaded), prunes its classifier and reads its maps through forward_intermediates: an OpenCLIP ViT's
own, or for a tower built on a timm trunk (SigLIP 2, PE-Core, MobileCLIP2, ConvNeXt) the trunk's. The teacher's
decoder is `linear` (DINOv2's linear head on the patch tokens), the student's `lraspp` (MobileNetV3's
Lite R-ASPP). models.create_model builds one when asked for a decoder; torch alone is needed here.
"""
import torch.nn as nn
import torch.nn.functional as F

from kt.groups import backbone_groups


class Segmenter(nn.Module):
    """Semantic segmentation: a backbone's feature maps -> a light decoder -> logits (B, C, H/s, W/s).

    The same classification backbones (timm, OpenCLIP towers), read through their forward_intermediates:
    decoder="linear" (the teacher): BatchNorm + 1x1 conv on the last map, DINOv2's linear segmentation head
    on the patch tokens; decoder="lraspp" (the student): MobileNetV3's LR-ASPP, the last map gated by its
    global context plus the last map at 1/8 or finer, for detail. The logits stay at the decoder's resolution; losses and
    scores resize them to the mask's (mmsegmentation's convention).
    """

    def __init__(self, backbone, num_classes, decoder="linear"):
        super().__init__()
        self.backbone = backbone
        self.clip_vit = type(backbone).__module__.startswith("open_clip") and not hasattr(backbone, "trunk")
        if self.clip_vit:  # an OpenCLIP ViT tower: the patch tokens of each block
            maps = [(backbone.transformer.width, backbone.patch_size[0])] * len(backbone.transformer.resblocks)
        else:  # a timm network (also the trunk of an OpenCLIP tower): (channels, stride) of each map
            maps = [(f["num_chs"], f["reduction"]) for f in self.network().feature_info]
            if hasattr(backbone, "trunk"):  # the tower's pooling and projection sit above the maps: unused
                backbone.head = nn.Identity()
        last = len(maps) - 1
        fine = max([i for i, (_, stride) in enumerate(maps) if stride <= 8] or [0])  # a ViT has no 1/8 map: its first
        self.indices = [last] if decoder == "linear" else [fine, last]
        self.network().prune_intermediate_layers(self.indices, prune_head=True)  # no unused classifier (DDP)
        channels = [maps[i][0] for i in self.indices]
        self.head = LinearHead(channels[-1], num_classes) if decoder == "linear" else LRASPP(*channels, num_classes)
        self.num_features = channels[-1]

    def network(self):
        """The network whose maps are read: the backbone, or the timm trunk inside an OpenCLIP tower."""
        return getattr(self.backbone, "trunk", self.backbone)

    def features(self, x):
        """The decoder's inputs: a list of (B, C_i, H/s_i, W/s_i) maps."""
        if self.clip_vit:
            return self.backbone.forward_intermediates(x, self.indices, normalize_intermediates=True,
                                                     intermediates_only=True)["image_intermediates"]
        return self.network().forward_intermediates(x, self.indices, norm=True, intermediates_only=True)

    def forward(self, x):
        return self.head(self.features(x))

    def embedding(self, x):
        """The last feature map (B, D, h, w): a patch feature at each location (models.image_embedding)."""
        return self.features(x)[-1]

    def get_classifier(self):
        return self.head

    def group_matcher(self, coarse=False):
        return backbone_groups(self.backbone, coarse)


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv on the last feature map: a linear classifier of each patch."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.norm, self.classify = nn.BatchNorm2d(channels), nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps):
        return self.classify(self.norm(maps[-1]))


class LRASPP(nn.Module):
    """Lite R-ASPP (Howard et al. 2019, MobileNetV3): the last map, gated per channel by its global average,
    classified and upsampled to the 1/8 map, plus a linear classifier of that 1/8 map."""

    def __init__(self, low_channels, high_channels, num_classes, inter=128):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(high_channels, inter, 1, bias=False), nn.BatchNorm2d(inter), nn.ReLU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter, 1), nn.Sigmoid())
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, maps):
        low, high = maps
        x = self.reduce(high) * self.gate(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.high_classifier(x) + self.low_classifier(low)

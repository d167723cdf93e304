"""Layer-wise lr decay groups of a model that wraps a backbone (an OpenCLIP tower, a segmenter).

timm's param_groups_layer_decay asks a model for group_matcher(): which parameters form the stem and each
block, bottom to top. A wrapper answers with its backbone's own groups, renamed under `backbone.`; the
wrapper's new head matches no group, so timm puts it last, above every block.
"""


def backbone_groups(backbone, coarse=False):
    """timm's group matcher of a model's `backbone` attribute: a timm network's own groups, an OpenCLIP
    tower's timm trunk (ConvNeXt, ...) or its ViT blocks, each renamed under backbone."""
    def inside(prefix, pattern):
        return prefix + pattern.lstrip("^")
    net, prefix = (backbone.trunk, r"^backbone\.trunk\.") if hasattr(backbone, "trunk") else (backbone, r"^backbone\.")
    if hasattr(net, "group_matcher"):
        return {k: inside(prefix, v) if isinstance(v, str) else [(inside(prefix, p), order) for p, order in v]
                for k, v in net.group_matcher(coarse).items()}
    return dict(stem=r"^backbone\.(?:class_embedding|positional_embedding|conv1|ln_pre)",  # OpenCLIP's ViT
                blocks=[(r"^backbone\.transformer\.resblocks\.(\d+)", None),
                        (r"^backbone\.(?:ln_post|proj)", (99999,))])

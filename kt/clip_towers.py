"""OpenCLIP image towers: as classifiers (a teacher `open_clip:MODEL/TAG` plus a linear head) and as the
retrieval encoder (transfer_set.py --embed open_clip:...), each with the tag's own preprocessing, also when
the weights come from a local file (SigLIP 2 and PE-Core normalise with 0.5/0.5, MobileCLIP2 not at all,
OpenAI's CLIP with its own mean and std: the model's config alone does not say).

MODEL may be a .json config file (tests, new towers): it is registered under its file name, and a
checkpoint's recipe carries the config, so a checkpoint rebuilds anywhere. kt.models imports this module
only for an open_clip: model.
"""
import json
import os

import torch.nn as nn

from kt.checks import fail, first_line, unknown_model
from kt.groups import backbone_groups


class CLIPClassifier(nn.Module):
    """An OpenCLIP image tower plus a linear head: x (B,3,H,W) -> embedding (B,D) -> logits (B,C)."""

    def __init__(self, visual, embed_dim, num_classes):
        super().__init__()
        self.backbone = visual
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        return self.backbone(x)

    def embedding(self, x):
        """The tower's projected CLIP embedding (B, D): what the head sees (models.image_embedding)."""
        return self.backbone(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.backbone(x))

    def group_matcher(self, coarse=False):
        """The tower's layers bottom to top, for timm's layer-wise lr decay (the new head comes last)."""
        return backbone_groups(self.backbone, coarse)


def config(spec, clip_cfg=None):
    """`MODEL/TAG` or `PATH.json[/TAG]` -> (model name, tag, its config), the config registered with
    open_clip under the name (a checkpoint passes the config it recorded as clip_cfg)."""
    import open_clip
    if ".json" in spec:  # a custom config file, registered under its file name
        path, _, tag = spec.partition(".json")
        name, tag = os.path.basename(path), tag.lstrip("/")
        if clip_cfg is None:
            if not os.path.exists(path + ".json"):
                fail(f"open_clip:{spec}: {path}.json not found")
            with open(path + ".json") as f:
                clip_cfg = json.load(f)
    else:
        name, _, tag = spec.partition("/")
    clip_cfg = clip_cfg or open_clip.get_model_config(name)
    if clip_cfg is None:
        unknown_model(name, "open_clip_torch", "see open_clip.list_models()")
    open_clip.factory._MODEL_CONFIGS[name] = clip_cfg  # what create_model(name) builds
    return name, tag, clip_cfg


PREPROCESSING = ("mean", "std", "interpolation", "resize_mode")
CROP_MODES = dict(shortest="center", squash="squash", longest="border")  # open_clip's resize mode -> timm's crop


def preprocessing(name, tag, spec):
    """The mean, std, interpolation and resize mode the weights of `name` were trained with: the tag's; without
    a tag (a local file), what all the model's tags agree on, else one line asking for the tag. {} for a model
    without tags (a config file of one's own)."""
    import open_clip
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(name)
    found = {json.dumps({k: open_clip.get_pretrained_cfg(name, t).get(k) for k in PREPROCESSING}) for t in tags}
    if len(found) > 1:
        fail(f"open_clip:{spec}: {name}'s tags ({', '.join(tags)}) preprocess differently: name the tag your weights "
             f"are, open_clip:{name}/TAG")
    return {k: v for k, v in json.loads(found.pop()).items() if v is not None} if found else {}


def classifier(spec, num_classes, pretrained, weights, img_size, kwargs):
    """`open_clip:MODEL/TAG` (without the prefix) -> (CLIPClassifier, recipe kwargs, data config)."""
    import open_clip
    name, tag, clip_cfg = config(spec, kwargs.get("clip_cfg"))
    source = weights or (tag if pretrained else None)
    if pretrained and not source:
        fail(f"open_clip:{spec}: name a pretrained tag (open_clip:MODEL/TAG) or pass --weights PATH")
    if weights and not os.path.isfile(weights):
        fail(f"weights file {weights} not found")
    try:  # open_clip reads the file with torch.load, which refuses pickled code (torch >= 2.6)
        clip = open_clip.create_model(name, pretrained=source, force_image_size=img_size,
                                      force_preprocess_cfg=preprocessing(name, tag, spec))
    except Exception as e:
        if weights:  # not a weights file, or one of another architecture: open_clip's message names the keys
            fail(f"{weights} does not fit {name}: {' '.join(str(e).split())[:400]}")
        fail(f"could not get the '{tag}' weights of {name} ({first_line(e)}); offline? "
             "pass --weights PATH (docs/teachers.md: weights from a file)")
    pp = clip.visual.preprocess_cfg
    cfg = dict(input_size=(3, *pp["size"]), interpolation=pp["interpolation"], mean=pp["mean"],
               std=pp["std"], crop_pct=1.0, crop_mode=CROP_MODES.get(pp.get("resize_mode"), "center"))
    return CLIPClassifier(clip.visual, clip_cfg["embed_dim"], num_classes), dict(clip_cfg=clip_cfg), cfg


def encoder(spec, weights, pretrained):
    """The retrieval encoder `MODEL/TAG` -> (model, x -> embedding (B, D), PIL -> tensor transform, cache key)."""
    import open_clip
    name, tag, clip_cfg = config(spec)
    source = weights or (tag if pretrained == "hub" else None)
    if pretrained == "hub" and not source:
        fail(f"--embed open_clip:{spec}: name a tag (MODEL/TAG), pass --embed-weights, or --embed-pretrained none")
    pp = preprocessing(name, tag, spec)  # the tag's own mean/std/resize
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=source, image_mean=pp.get("mean"), image_std=pp.get("std"),
            image_interpolation=pp.get("interpolation"), image_resize_mode=pp.get("resize_mode"))
    except Exception as e:
        fail(f"could not load open_clip:{spec} ({type(e).__name__}: {str(e)[:150]}); offline? --embed-weights PATH")
    return model.eval(), model.encode_image, transform, [name, tag, clip_cfg, pp]

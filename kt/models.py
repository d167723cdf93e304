"""Models by name, each with its own data config: timm models, OpenCLIP image towers, local weight files.

create_model(arch, num_classes) -> (model, recipe, data_config). The recipe is what a checkpoint stores to
rebuild the model (load_model); the data config (mean, std, input size, interpolation) is the model's own
and drives its transforms (transform) and its on-device input (to_model_input). OpenCLIP towers
(kt.clip_towers) and segmenters (kt.segmenters) are imported only for a model that is one.
"""
import functools
import os
import sys

import torch
import torch.nn.functional as F

from kt.checks import fail, first_line, unknown_model


def _timm(arch, num_classes, pretrained, img_size, kwargs):
    """A timm model with a `num_classes` head; hub weights when `pretrained`."""
    import timm
    if arch not in timm.list_models() and arch.split(".")[0] not in timm.list_models():
        unknown_model(arch, "timm", "try a timm name (timm.list_models()) or open_clip:MODEL/TAG")

    def build(**kw):
        try:
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs, **kw)
        except (OSError, RuntimeError, ValueError) as e:  # offline, or no such pretrained tag
            if not pretrained:
                raise
            fail(f"could not get the pretrained weights of {arch} ({first_line(e)}); offline? "
                 "pass --weights PATH (docs/teachers.md: weights from a file)")
    try:
        return build(**(dict(img_size=img_size) if img_size else {}))
    except TypeError:  # CNNs take any input size and have no img_size argument
        return build()


def create_model(arch, num_classes, pretrained=False, weights=None, img_size=None, decoder=None, **kwargs):
    """Build `arch` with a `num_classes` head. Returns (model, recipe, data_config).

    arch: a timm name (`vit_large_patch14_dinov2.lvd142m`, `resnet18`, `test_vit`) or
    `open_clip:MODEL/TAG` (`open_clip:ViT-L-14/datacomp_xl_s13b_b90k`; MODEL may also be a .json config).
    pretrained: load the hub weights; weights: a local weights file instead (offline users).
    decoder: None (classification), or linear / lraspp: a Segmenter on the same backbone (per-pixel logits).
    kwargs: timm overrides such as depth=2 (tests). The recipe rebuilds the model with random weights.
    """
    recipe = dict(arch=arch, num_classes=num_classes, img_size=img_size, kwargs=kwargs, decoder=decoder)
    if arch.startswith("open_clip:"):
        from kt import clip_towers
        model, recipe["kwargs"], cfg = clip_towers.classifier(arch[len("open_clip:"):], num_classes, pretrained,
                                                              weights, img_size, kwargs)
    else:
        import timm.data
        model = _timm(arch, num_classes, pretrained, img_size, kwargs)
        if weights:
            load_weights(model, weights)
        cfg = timm.data.resolve_data_config({}, model=model)
    if decoder:  # the backbone as it is (its weights loaded), read by a segmentation decoder
        model = _segmenter(model, num_classes, decoder)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}  # plain types only
    return model, recipe, cfg


def load_weights(model, path):
    """Load a local timm weights file (.pth/.bin/.safetensors), checked: every key must fit.

    The architecture's own checkpoint filter adapts what it can (e.g. ViT position embeddings resampled
    to --img-size); a classifier of another class count is dropped (the task gets a new head); any other
    missing, unexpected or mis-shaped key is an error that names the keys.
    """
    import timm.models
    if not os.path.isfile(path):
        fail(f"weights file {path} not found")
    try:
        sd = timm.models.load_state_dict(path, weights_only=True)  # a pickle in the file cannot run code
    except Exception as e:
        fail(f"{path} is not a readable weights file ({type(e).__name__})")
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    head = {f"{n}.{k}" for n, m in model.named_modules() if m is model.get_classifier()
            for k in m.state_dict()} if hasattr(model, "get_classifier") else set()
    sd = {k: v for k, v in sd.items() if not (k in head and k in own and v.shape != own[k].shape)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd and k not in head]
    unexpected = [k for k in sd if k not in own]
    if wrong or missing or unexpected:
        n = len(wrong) + len(missing) + len(unexpected)
        fail(f"{path} does not fit {type(model).__name__} ({n} keys): shape mismatch {wrong[:3]}, "
             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(sd, strict=False)


def _segmenter(model, num_classes, decoder):
    """A classification model's backbone (an OpenCLIP classifier's tower) read by a segmentation decoder."""
    from kt.segmenters import Segmenter
    return Segmenter(getattr(model, "backbone", model), num_classes, decoder)


def load_model(ckpt):
    """Rebuild the model a checkpoint describes (its recipe) and load its weights."""
    arch, n, size, kwargs = (ckpt["recipe"][k] for k in ("arch", "num_classes", "img_size", "kwargs"))
    if arch.startswith("open_clip:"):
        from kt import clip_towers
        model = clip_towers.classifier(arch[len("open_clip:"):], n, False, None, size, kwargs)[0]
    else:
        model = _timm(arch, n, False, size, kwargs)
    if ckpt["recipe"].get("decoder"):
        model = _segmenter(model, n, ckpt["recipe"]["decoder"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing, unexpected or mis-shaped keys
        fail(f"a checkpoint's weights do not fit its recipe's {arch} ({first_line(e)})")
    return model


def image_embedding(model, x):
    """A model's image embedding, what its head sees: a timm model's pooled pre-logits features (B, D), an
    OpenCLIP tower's projected embedding (B, D), or a segmenter's last feature map (B, D, h, w)."""
    if hasattr(model, "embedding"):  # the wrappers: clip_towers.CLIPClassifier, segmenters.Segmenter
        return model.embedding(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def deployed(model):
    """The model as it is deployed: timm's structural reparameterisation folds the training-time branches of
    FastViT, MobileOne, RepVGG, ... into single convolutions (same outputs, less work). Returns (a copy, or
    the model itself when there is nothing to fold; whether anything was folded)."""
    from timm.utils import reparameterize_model
    foldable = any(hasattr(m, a) for m in model.modules() for a in ("reparameterize", "fuse", "switch_to_deploy"))
    return (reparameterize_model(model).eval() if foldable else model), foldable


def transform(cfg, train, normalize=True, scale=(0.08, 1.0)):
    """timm's train/eval transform for a model's data config; normalize=False keeps pixels in [0, 1]."""
    from timm.data import create_transform
    mean, std = (cfg["mean"], cfg["std"]) if normalize else ((0.0,) * 3, (1.0,) * 3)
    kw = dict(scale=scale, hflip=0.5, color_jitter=0.4) if train else \
        dict(crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"))  # squash: SigLIP 2, PE-Core
    return create_transform(tuple(cfg["input_size"]), is_training=train, interpolation=cfg["interpolation"],
                            mean=tuple(mean), std=tuple(std), **kw)


@functools.lru_cache(maxsize=None)
def _mean_std(mean, std, device):
    """(1,3,1,1) device tensors made once: a fresh host->device copy each step would make the CPU wait."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def to_model_input(x, cfg):
    """[0,1] images (B,3,H,W) -> the model's input: resized to its resolution, normalised by its mean/std,
    on the device."""
    size = tuple(cfg["input_size"][1:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean, std = _mean_std(tuple(cfg["mean"]), tuple(cfg["std"]), x.device)
    return (x - mean) / std

"""The task every step shares: its data, its label budget, its models and their checkpoints.

Each step script (teacher.py, student.py, transfer_set.py, distill.py, finetune.py, evaluate.py) is one
stage of Vemulapalli et al., "Knowledge Transfer from Vision Foundation Models for Efficient Training of
Small Task-specific Models" (ICML 2024, arXiv 2311.18237). The steps talk only through files on disk;
this module holds the few things they must agree on:

  * datasets by name (`demo`, torchvision's eurosat/flowers102/dtd/pets/food101/cifar10/cifar100/stl10,
    `folder:PATH`) and image references (`cifar10:train:17`, or a file path) that transfer lists store;
  * the label budget: N labeled images per class, drawn once from a seed and recorded in split.json;
  * models by name (`timm` names or `open_clip:MODEL/TAG`) and each model's own data config (mean, std,
    resolution), which drives its transforms;
  * checkpoints: a plain dict (weights + the recipe that rebuilds the model), loadable with
    `torch.load(weights_only=True)` and written atomically;
  * the training plumbing every loop needs: device, torchrun/DDP, AMP, a cosine schedule, RNG state.
"""
import functools
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(msg):
    """Bad input: one clear line on stderr and a non-zero exit (nothing on disk is touched)."""
    raise SystemExit(f"error: {msg}")


def _first_line(e):
    """An exception as one short line, for fail()."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"


# ------------------------------------------------------------------------------------------------ data
TORCHVISION = ("eurosat", "flowers102", "dtd", "pets", "food101", "cifar10", "cifar100", "stl10")
DATASETS = ("demo",) + TORCHVISION  # plus folder:PATH


def _torchvision(name, split, root, download=True):
    import torchvision.datasets as D
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        return cls(root, train=(split == "train"), download=download)
    if name == "stl10":  # split: train / test / unlabeled (100K generic images, a ready transfer pool)
        return D.STL10(root, split=split, download=download)
    if name == "flowers102":
        return D.Flowers102(root, split=split, download=download)
    if name == "dtd":
        return D.DTD(root, split=split, partition=1, download=download)
    if name == "pets":
        return D.OxfordIIITPet(root, split={"train": "trainval"}.get(split, split), download=download)
    if name == "food101":
        return D.Food101(root, split=split, download=download)
    if name == "eurosat":  # no official split: a fixed 80/20 cut, the same for every run and seed
        full = D.EuroSAT(root, download=download)
        order = np.random.default_rng(0).permutation(len(full))
        cut = int(0.8 * len(full))
        sub = torch.utils.data.Subset(full, order[:cut] if split == "train" else order[cut:])
        sub.classes, sub.targets = full.classes, [full.targets[i] for i in sub.indices]
        return sub
    raise KeyError(name)


def _labels(ds):
    """Integer labels of a dataset without decoding any image."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return [int(y) for y in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


def _folder(root, split):
    """`folder:PATH` datasets: PATH/train/<class>/*.jpg, PATH/test/<class>/*, optional PATH/val/."""
    from torchvision.datasets import ImageFolder
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"folder dataset {root} has no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    try:
        return ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"folder dataset {path}: {e}")


@functools.lru_cache(maxsize=None)
def load_dataset(name, split, root="data", download=True):
    """(dataset, labels, classes) for one split; dataset[i] -> (PIL RGB image, int label). Cached."""
    if name == "demo":
        import demo
        ds = demo.Shapes(split)
    elif name.startswith("folder:"):
        ds = _folder(name[len("folder:"):], split)
        if split != "train":
            train_classes = _folder(name[len("folder:"):], "train").classes
            if ds.classes != train_classes:
                fail(f"{name}: {split}/ classes {ds.classes} differ from train/ classes {train_classes}")
    elif name in TORCHVISION:
        try:
            ds = _torchvision(name, split, root, download)
        except (RuntimeError, OSError) as e:  # offline, or "Dataset not found or corrupted"
            fail(f"could not load {name}/{split} under {root} ({_first_line(e)}); offline? copy torchvision's "
                 f"files for {name} into {root}, or use folder:PATH")
    else:
        fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} or folder:PATH")
    classes = list(getattr(ds, "classes", None) or sorted(set(_labels(ds))))
    return ds, _labels(ds), [str(c) for c in classes]


def open_image(ref, root="data"):
    """An image reference from a transfer list -> PIL RGB. `NAME:SPLIT:INDEX` or a file path."""
    parts = ref.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit() and parts[1] in ("train", "val", "test", "unlabeled"):
        ds = load_dataset(parts[0], parts[1], root)[0]
        return ds[int(parts[2])][0].convert("RGB")
    from PIL import Image
    if "::" in ref:  # a member of a webdataset / img2dataset tar shard: `PATH/00001.tar::000123.jpg`
        import io
        import tarfile
        shard, member = ref.split("::", 1)
        tars = open_image.__dict__.setdefault("tars", {})  # open handles; per pid, as forked workers
        key = (os.getpid(), shard)                          # must not share one file offset
        if key not in tars:  # name -> member index once: tarfile's own lookup scans every member
            if len(tars) >= 32:  # bound the open files: a pool may have thousands of shards
                [t.close() for t, _ in tars.values()], tars.clear()
            tf = tarfile.open(shard)
            tars[key] = tf, {m.name: m for m in tf.getmembers()}
        f = tars[key][0].extractfile(tars[key][1][member]) if member in tars[key][1] else None
        if f is None:
            raise FileNotFoundError(f"{ref}: no such file in {shard}")
        ref = io.BytesIO(f.read())
    with Image.open(ref) as im:
        return im.convert("RGB")


# -------------------------------------------------------------------------------------- label budget
def label_budget(labels, shots, seed):
    """Pick `shots` images per class, balanced and deterministic in `seed`.

    labels: list of N ints. Returns (labeled, unlabeled) sorted index lists; a class with fewer than
    `shots` images gives all it has (with a warning). The rest of the split is the task's unlabeled pool.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    labeled = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < shots:
            warnings.warn(f"class {c} has {len(idx)} images, fewer than --shots {shots}: using all of them")
        labeled += idx[:shots].tolist()
    chosen = set(labeled)
    return sorted(labeled), [i for i in range(len(labels)) if i not in chosen]


def load_split(path, dataset, shots, seed, root="data"):
    """The label budget recorded in split.json: made on first use, then read by every later step."""
    if os.path.exists(path):
        try:
            with open(path) as f:
                split = json.load(f)
            split["labeled"], split["classes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path} is not a split file ({_first_line(e)}); delete it or use another --split path")
        want = {"dataset": dataset, "shots": shots, "seed": seed}
        have = {k: split.get(k) for k in want}
        if have != want:
            fail(f"{path} records {have} but this step was asked for {want}; use another --split path")
        return split
    _, labels, classes = load_dataset(dataset, "train", root)
    labeled, unlabeled = label_budget(labels, shots, seed)
    split = dict(dataset=dataset, shots=shots, seed=seed, classes=classes, labeled=labeled,
                 unlabeled=unlabeled)
    atomic_write(path, lambda f: f.write(json.dumps(split).encode()))
    return split


def positive(s):
    """argparse type for a count >= 1 (--shots, --epochs, ...): a bad one is a usage error, not a traceback."""
    if int(s) < 1:
        raise ValueError(s)
    return int(s)


def nonnegative(s):
    """argparse type for a count >= 0 (--workers)."""
    if int(s) < 0:
        raise ValueError(s)
    return int(s)


def add_task_args(parser):
    """The flags that name the task and its label budget, the same in every step that reads split.json."""
    parser.add_argument("--dataset", default="demo", help="demo, eurosat, flowers102, dtd, pets, food101, "
                        "cifar10, cifar100, stl10, or folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)")
    parser.add_argument("--data-root", default="data", help="where torchvision datasets live / download to")
    parser.add_argument("--shots", type=positive, default=10, help="labeled images per class: the label budget")
    parser.add_argument("--seed", type=int, default=0, help="picks the labeled images; seeds training")
    parser.add_argument("--train-seed", type=int, default=None, help="seeds initialisation and training "
                        "instead of --seed: repeats a run on the same labels (run.sh --seeds)")
    parser.add_argument("--split", default="runs/demo/split.json",
                        help="records the labeled images once; every later step reads it")
    return parser


class Images(torch.utils.data.Dataset):
    """Image references (or indices of a split) with optional labels -> (transformed image, label).

    Items are (index, seed) pairs from `EpochSampler`: the augmentation of each image is seeded by the
    sampler, so a run is reproducible across worker counts and can resume mid-epoch exactly.
    """

    def __init__(self, refs, labels=None, transform=None, root="data"):
        self.refs, self.labels, self.transform, self.root = refs, labels, transform, root

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.refs)):  # a bad file never kills a long run: skip it, say so
            j = (i + attempt) % len(self.refs)
            try:
                img = open_image(self.refs[j], self.root)
                break
            except (OSError, ValueError, SyntaxError) as e:  # missing, truncated, zero-byte, not an image
                print(f"warning: skipped unreadable image {self.refs[j]} ({type(e).__name__})",
                      file=sys.stderr, flush=True)
        else:
            raise RuntimeError("no readable image in this list")
        i = j
        if seed is not None:  # timm transforms draw from `random`, torchvision ones from torch
            random.seed(seed)
            torch.manual_seed(seed)
        x = self.transform(img) if self.transform else img
        return x, (self.labels[i] if self.labels is not None else -1)


def read_transfer_list(path):
    """A transfer list (transfer_set.py): one image reference per line (see open_image)."""
    try:
        with open(path) as f:
            refs = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read transfer list {path} ({e.strerror}): run transfer_set.py first")
    if not refs:
        fail(f"transfer list {path} is empty: nothing to distill on")
    return refs


def split_refs(dataset, split, indices=None, root="data"):
    """References like `cifar10:train:17` for indices of a split (all of it when indices is None)."""
    ds, labels, _ = load_dataset(dataset, split, root)
    indices = range(len(ds)) if indices is None else indices
    if dataset.startswith("folder:"):  # real files: reference them by path
        return [ds.samples[i][0] for i in indices], [labels[i] for i in indices]
    return [f"{dataset}:{split}:{i}" for i in indices], [labels[i] for i in indices]


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) for one epoch; shuffled per (seed, epoch), sharded per rank.

    `start` skips the samples a resumed run has already trained on in this epoch.
    """

    def __init__(self, n, seed, shuffle=True, rank=0, world=1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _order(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        per_rank = math.ceil(self.n / self.world)  # pad by wrapping so every rank gets equal work
        order = torch.cat([order, order[: per_rank * self.world - self.n]])
        return order[self.rank::self.world].tolist(), seeds.tolist()

    def __iter__(self):
        order, seeds = self._order()
        return iter([(i, seeds[i]) for i in order[self.start:]])

    def __len__(self):
        return math.ceil(self.n / self.world) - self.start


def loader(dataset, batch_size, sampler, workers, drop_last=False, device=None):
    cuda = device is not None and device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# ------------------------------------------------------------------------------------------- models
class CLIPClassifier(nn.Module):
    """An OpenCLIP image tower plus a linear head: x (B,3,H,W) -> embedding (B,D) -> logits (B,C)."""

    def __init__(self, visual, num_classes):
        super().__init__()
        self.backbone = visual
        self.head = nn.Linear(visual.output_dim, num_classes)

    def forward_features(self, x):
        return self.backbone(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.backbone(x))

    def group_matcher(self, coarse=False):  # for timm's layer-wise lr decay (ViT towers)
        return dict(stem=r"^backbone\.(class_embedding|positional_embedding|conv1|ln_pre)",
                    blocks=[(r"^backbone\.transformer\.resblocks\.(\d+)", None),
                            (r"^backbone\.(ln_post|proj)", (99999,))])


def create_model(arch, num_classes, pretrained=False, weights=None, img_size=None, **kwargs):
    """Build `arch` with a `num_classes` head. Returns (model, recipe, data_config).

    arch: a timm name (`vit_large_patch14_dinov2.lvd142m`, `resnet18`, `test_vit`) or
    `open_clip:MODEL/TAG` (`open_clip:ViT-L-14/datacomp_xl_s13b_b90k`; MODEL may also be a .json config).
    pretrained: load the hub weights; weights: a local weights file instead (offline users).
    kwargs: timm overrides such as depth=2 (tests). The recipe rebuilds the model with random weights.
    """
    recipe = dict(arch=arch, num_classes=num_classes, img_size=img_size, kwargs=kwargs)
    if arch.startswith("open_clip:"):
        import open_clip
        spec = arch[len("open_clip:"):]
        if ".json" in spec:  # a custom config file (tests, new towers): registered under its file name
            path, _, tag = spec.partition(".json")
            name, tag = os.path.basename(path), tag.lstrip("/")
            if "clip_cfg" not in kwargs:  # rebuilding from a checkpoint needs no file: the recipe has it
                with open(path + ".json") as f:
                    kwargs = dict(kwargs, clip_cfg=json.load(f))
        else:
            name, _, tag = spec.partition("/")
        clip_cfg = kwargs.get("clip_cfg") or open_clip.get_model_config(name)
        if clip_cfg is None:
            fail(f"unknown open_clip model '{name}'; see open_clip.list_models()")
        open_clip.factory._MODEL_CONFIGS.setdefault(name, clip_cfg)  # so a checkpoint rebuilds anywhere
        recipe["kwargs"] = dict(clip_cfg=clip_cfg)
        source = weights or (tag if pretrained else None)
        if pretrained and not source:
            fail(f"{arch}: name a pretrained tag (open_clip:MODEL/TAG) or pass --weights PATH")
        if weights and not os.path.isfile(weights):
            fail(f"weights file {weights} not found")
        try:
            clip = open_clip.create_model(name, pretrained=source, force_image_size=img_size)
        except (OSError, RuntimeError, ValueError) as e:
            if weights:  # a local file of another architecture: open_clip's message names the keys
                fail(f"{weights} does not fit {name}: {' '.join(str(e).split())[:400]}")
            fail(f"could not get the '{tag}' weights of {name} ({_first_line(e)}); offline? "
                 "pass --weights PATH (README: Local weight files)")
        model = CLIPClassifier(clip.visual, num_classes)
        pp = clip.visual.preprocess_cfg
        cfg = dict(input_size=(3, *pp["size"]), interpolation=pp["interpolation"], mean=pp["mean"],
                   std=pp["std"], crop_pct=1.0, crop_mode="center")
    else:
        import timm
        if arch not in timm.list_models() and arch.split(".")[0] not in timm.list_models():
            fail(f"unknown model '{arch}'; try a timm name (timm.list_models()) or open_clip:MODEL/TAG")
        def build(**kw):
            try:
                return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs, **kw)
            except (OSError, RuntimeError, ValueError) as e:  # offline, or no such pretrained tag
                if not pretrained:
                    raise
                fail(f"could not get the pretrained weights of {arch} ({_first_line(e)}); offline? "
                     "pass --weights PATH (README: Local weight files)")
        try:
            model = build(**(dict(img_size=img_size) if img_size else {}))
        except TypeError:  # CNNs take any input size and have no img_size argument
            model = build()
        if weights:
            load_weights(model, weights)
        cfg = timm.data.resolve_data_config({}, model=model)
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
        sd = timm.models.load_state_dict(path)
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


def load_model(ckpt):
    """Rebuild the model a checkpoint describes and load its weights."""
    r = ckpt["recipe"]
    model, _, _ = create_model(r["arch"], r["num_classes"], img_size=r["img_size"], **r["kwargs"])
    model.load_state_dict(ckpt["model"])
    return model


def transform(cfg, train, normalize=True, scale=(0.08, 1.0)):
    """timm's train/eval transform for a model's data config; normalize=False keeps pixels in [0, 1]."""
    from timm.data import create_transform
    mean, std = (cfg["mean"], cfg["std"]) if normalize else ((0.0,) * 3, (1.0,) * 3)
    kw = dict(scale=scale, hflip=0.5, color_jitter=0.4) if train else dict(crop_pct=cfg["crop_pct"])
    return create_transform(tuple(cfg["input_size"]), is_training=train, interpolation=cfg["interpolation"],
                            mean=tuple(mean), std=tuple(std), **kw)


@functools.lru_cache(maxsize=None)
def _mean_std(mean, std, device):
    """(1,3,1,1) device tensors made once: a fresh host->device copy each step would make the CPU wait."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def normalize(x, cfg):
    """[0,1] images (B,3,H,W) -> the model's own resolution and mean/std, on the device."""
    size = tuple(cfg["input_size"][1:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean, std = _mean_std(tuple(cfg["mean"]), tuple(cfg["std"]), x.device)
    return (x - mean) / std


# -------------------------------------------------------------------------------------- checkpoints
def atomic_write(path, write):
    """Write via a temp file, flush, fsync, rename: a kill or a full disk never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(ckpt, path):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kinds=None, made_by=None):
    """A checkpoint dict, checked: it exists (else name the step that makes it) and is of `kinds`."""
    if not os.path.exists(path):
        fail(f"{path} not found" + (f": run {made_by} first" if made_by else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}): checkpoints here are plain dicts "
             "that torch.load(weights_only=True) reads")
    if kinds and ckpt.get("kind") not in kinds:
        fail(f"{path} is a '{ckpt.get('kind')}' checkpoint, expected one of {list(kinds)}")
    return ckpt


def plain(args):
    """argparse Namespace -> dict of plain types for a checkpoint."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
            for k, v in vars(args).items()}


# ------------------------------------------------------------------------------------- training kit
def setup(seed):
    """Device and torchrun/DDP context. Returns (device, rank, world). One process works unchanged."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            fail(f"local rank {local} but {torch.cuda.device_count()} GPU(s) on this node: lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return device, rank, world


def amp(device):
    """Autocast context and GradScaler: bf16 where the GPU has it, fp16 + loss scaling otherwise; fp32 on CPU."""
    if device.type != "cuda":
        return nullcontext, torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda",
                                                                               enabled=dtype == torch.float16)


def cosine_lr(step, total, warmup):
    """LR multiplier: linear warmup for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[keys.tolist(), pos, has_gauss, gauss],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def ddp(model, device, world):
    """Wrap a trained model for torchrun; the frozen teacher is never wrapped (it has no gradients)."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_state(path, model, optimizer, scaler, step, **extra):
    """A resumable training state: weights, optimizer, scaler, RNG, step (rank 0 writes it, atomically)."""
    save_checkpoint(dict(kind="resume", step=step, model=unwrap(model).state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng_state(),
                         **extra), path)


def load_state(path, model, optimizer, scaler):
    """Restore a state written by save_state; returns the whole dict (step, wall_s, ...)."""
    state = load_checkpoint(path, kinds=("resume",))
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


class Progress:
    """Everything a training loop does besides learning, so each step's loop shows only the lesson.

    Resumes from `path` (a resumable state) when asked; after each step `update()` adds the loss on the
    device (no host sync), and every `save_every` steps, after an epoch of `per_epoch` steps (at most once
    a minute: few-label epochs last seconds), at the end, or on Ctrl-C/SIGTERM, it syncs once,
    logs, stops on a NaN/inf loss (the last good state stays on disk), and saves the state atomically.

    Under torchrun the ranks decide together: every `agree_every` steps one all-reduce of (loss sum, count,
    stop, save) gives every rank the same decision at the same step (a signal reaches ranks at different
    steps; a rank that stopped alone would leave the others waiting in their next all-reduce forever), and
    the logged loss is the mean over all ranks.
    """

    def __init__(self, path, model, optimizer, scaler, total, save_every, rank=0, resume=False,
                 per_epoch=0, agree_every=20):
        self.path, self.model, self.opt, self.scaler = path, model, optimizer, scaler
        self.total, self.save_every, self.rank, self.per_epoch = total, save_every, rank, per_epoch
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.agree_every = min(agree_every, save_every) if self.world > 1 else 1
        self.step, self.images, self.wall, self.loss = 0, 0, 0.0, float("nan")
        if resume and os.path.exists(path):
            state = load_state(path, model, optimizer, scaler)
            self.step, self.images, self.wall = state["step"], state["images"], state["wall_s"]
            log(rank, f"resuming {path} at step {self.step}/{total}")

    def __enter__(self):
        self.stop, self.t0, self.running, self.count = False, time.time() - self.wall, 0.0, 0
        self.saved, self.saved_step = time.time(), self.step
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, frame):
        self.stop = True  # finish the current step, then save and exit

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    @property
    def done(self):
        return self.step >= self.total

    def update(self, loss, images):
        self.step, self.images, self.count = self.step + 1, self.images + images, self.count + 1
        self.running = self.running + loss.detach().float()
        if self.step % self.agree_every and not self.done:
            return  # torchrun: ranks decide only together
        since = self.step - self.saved_step  # steps since the last save
        epoch = self.per_epoch and since >= self.per_epoch and time.time() - self.saved > 60
        save = since >= self.save_every or epoch or self.done
        if self.world > 1:  # the one collective per agree_every steps: sums over ranks
            v = torch.stack([torch.as_tensor(self.running, device=loss.device), *(torch.tensor(
                float(f), device=loss.device) for f in (self.count, self.stop, save))])
            torch.distributed.all_reduce(v)
            running, count, stop, save = v.tolist()  # the host waits here, every agree_every steps
            self.stop, save = stop > 0, save > 0
        else:
            running, count = self.running, self.count
        if not (save or self.stop):
            return
        self.loss = float(running / count)  # the one host-device sync per interval
        self.running, self.count = 0.0, 0
        if not math.isfinite(self.loss):
            fail(f"loss is {self.loss} at step {self.step}; the last good state is {self.path}; lower --lr")
        log(self.rank, f"step {self.step}/{self.total} loss {self.loss:.4f} ({time.time() - self.t0:.0f}s)")
        if self.rank == 0:
            save_state(self.path, self.model, self.opt, self.scaler, self.step, images=self.images,
                       wall_s=time.time() - self.t0)
        self.saved, self.saved_step = time.time(), self.step
        if self.stop:
            fail(f"interrupted at step {self.step}: saved {self.path}; rerun with --resume to continue")

    def finish(self, name, batch):
        """The training cost for the checkpoint (the state file is no longer needed)."""
        if self.rank == 0 and os.path.exists(self.path):
            os.remove(self.path)
        return dict(step=name, steps=self.step, batch=batch, images=self.images,
                    wall_s=round(time.time() - self.t0, 2))


def log(rank, *msg):
    if rank == 0:
        print(*msg, file=sys.stderr, flush=True)

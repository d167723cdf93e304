"""Datasets by name, each listed from its own layout: all the project knows of datasets is here. split.py
lists them (and transfer_set.py, for a pool named DATASET:SPLIT); data.open_image opens their NAME:SPLIT:INDEX
images through indexed().

  * torchvision's eurosat flowers102 dtd pets food101 cifar10 cifar100 stl10 places365, the demo (and its
    harder sibling demo-clutter, kt.clutter) and py:MODULE: indexed() opens them (their images are
    referenced as NAME:SPLIT:INDEX);
  * imagenet (DATA_ROOT/imagenet/{train,val}/<wnid>/), folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*,
    optional PATH/val/), ham10000 (ISIC's metadata CSV): their images are referenced by path;
  * hf:NAME[:CONFIG] and hf:DIR, Hugging Face datasets (kt.hf_datasets, imported for them alone): their
    images are referenced as hf:SPEC:SPLIT:INDEX, SPLIT the dataset's own split name;
  * segmentation: ade20k (ADEChallengeData2016), demo-seg, folder:PATH with PATH/{train,test}/images/ +
    masks/ and PATH/classes.txt. A segmentation dataset has `dense = True`, and where a class index travels
    with an image, a mask reference travels with it here.
"""
import csv
import functools
import importlib
import os
import re

import numpy as np
import torch

from kt.checks import IMAGE_EXTS, fail, first_line

SPLITS = ("train", "val", "test", "unlabeled")  # the SPLIT of a NAME:SPLIT:INDEX reference
TORCHVISION = ("eurosat", "flowers102", "dtd", "pets", "food101", "cifar10", "cifar100", "stl10", "places365")
PAPER = ("imagenet", "ham10000", "ade20k")  # the paper's other tasks, from files the user downloads into DATA_ROOT
GENERATED = {"demo": "kt.demo", "demo-seg": "kt.demo", "demo-clutter": "kt.clutter"}  # offline, drawn


# ------------------------------------------------------------------------------ images kept by index
def indexed_ref(ref):
    """`NAME:SPLIT:INDEX` -> (NAME, SPLIT, INDEX); None for anything else (a file path, a tar member). Read
    from the right: an hf: NAME may hold ':' and '/', and its SPLIT is any of the dataset's own."""
    parts = ref.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit() and (parts[1] in SPLITS or parts[0].startswith("hf:") and
                                                    re.fullmatch(r"\w+(\.\w+)*", parts[1])):
        return parts[0], parts[1], int(parts[2])
    return None


@functools.lru_cache(maxsize=None)
def indexed(name, split, root="data", download=True):
    """A dataset whose images are not files of their own, opened by `NAME:SPLIT:INDEX`: torchvision's
    (their own download and layout), the demos', py:MODULE's (any module of yours with dataset(split)), or
    an hf: dataset's (its images alone: opening one needs no label column)."""
    if name.startswith("hf:"):
        from kt import hf_datasets
        return hf_datasets.open_split(name, split)
    if name in GENERATED or name.startswith("py:"):
        # imported by name when asked for: the offline demos' data lives in kt/demo.py and kt/clutter.py
        module = GENERATED.get(name) or name.removeprefix("py:")
        try:
            module = importlib.import_module(module)
            return module.scenes(split) if name == "demo-seg" else module.dataset(split)
        except (ImportError, AttributeError) as e:
            fail(f"dataset {name}: {first_line(e)}; py:MODULE names a module that defines dataset(split)")
    if name not in TORCHVISION:
        fail(f"image reference {name}:{split}:INDEX: {name} is not a dataset of torchvision's, "
             f"{', '.join(GENERATED)} or py:MODULE")
    try:
        return _torchvision(name, split, root, download)
    except (RuntimeError, OSError) as e:  # offline, or "Dataset not found or corrupted"
        fail(f"could not load {name}/{split} under {root} ({first_line(e)}); offline? copy torchvision's "
             f"files for {name} into {root}, or use folder:PATH")


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
    if name == "places365":  # the 256px images; the paper splits the official val set into its val and test
        return D.Places365(os.path.join(root, "places365"), split="train-standard" if split == "train" else "val",
                           small=True, download=download)
    # eurosat has no official split: a fixed 80/20 cut, the same for every run and seed
    full = D.EuroSAT(root, download=download)
    order = np.random.default_rng(0).permutation(len(full))
    cut = int(0.8 * len(full))
    sub = torch.utils.data.Subset(full, order[:cut] if split == "train" else order[cut:])
    sub.classes, sub.targets = full.classes, [full.targets[i] for i in sub.indices]
    return sub


# ----------------------------------------------------------------------------------- image files
class HAM10000(torch.utils.data.Dataset):
    """HAM10000 as ISIC ships it: ROOT/HAM10000_metadata.csv (image_id, dx, ...) and the images in any folder
    below ROOT (HAM10000_images_part_1/, ..._2/). 7 classes by `dx`, heavily imbalanced (mean per-class
    accuracy is the metric to read). It has no test split of its own: the paper's split files give one."""

    def __init__(self, root, split):
        if split != "train":
            fail(f"ham10000 has no {split} split of its own; use the paper's split files (--split-files "
                 "DIR/HAM10K --budget ...), which name val and test images from ISIC 2018")
        try:
            with open(os.path.join(root, "HAM10000_metadata.csv"), newline="") as f:
                rows = [(r["image_id"], r["dx"]) for r in csv.DictReader(f)]
        except (OSError, KeyError) as e:
            fail(f"ham10000: cannot read {root}/HAM10000_metadata.csv ({first_line(e)}); download HAM10000 "
                 f"(metadata and both image folders) into {root}")
        files = {os.path.splitext(n)[0]: os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                 if n.lower().endswith(".jpg")}
        missing = [i for i, _ in rows if i not in files]
        if missing:
            fail(f"ham10000: {len(missing)} images of the metadata are not under {root}, e.g. {missing[:3]}")
        self.classes = sorted({dx for _, dx in rows})
        self.samples = [(files[i], self.classes.index(dx)) for i, dx in rows]
        self.targets = [y for _, y in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, y = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), y


class Segmentation(torch.utils.data.Dataset):
    """Image and mask files of one split: .samples [(image path, mask path)], .classes; dataset[i] -> (PIL
    image, mask path). Masks are PNGs of class indices, 255 = not labeled (mmsegmentation's ignore index).

    ade20k: DATA_ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/ (*.png), 150
    classes; its 0 ("other") is not scored and 1-150 become 0-149 (mmsegmentation's reduce_zero_label).
    The official validation set is the test split, as in the paper. folder:PATH: PATH/SPLIT/images/NAME.* and
    PATH/SPLIT/masks/NAME.png, class names one a line in PATH/classes.txt."""
    dense = True

    def __init__(self, images, masks, classes, reduce_zero_label=False):
        if not os.path.isdir(images) or not os.path.isdir(masks):
            fail(f"segmentation dataset: expected the images in {images}/ and their masks in {masks}/")
        stems = {os.path.splitext(n)[0]: os.path.join(masks, n) for n in os.listdir(masks) if n.endswith(".png")}
        names = sorted(n for n in os.listdir(images) if n.lower().endswith(IMAGE_EXTS))
        alone = [n for n in names if os.path.splitext(n)[0] not in stems]
        if alone:
            fail(f"{len(alone)} images in {images} have no mask NAME.png in {masks}, e.g. {alone[:3]}")
        self.samples = [(os.path.join(images, n), stems[os.path.splitext(n)[0]]) for n in names]
        self.classes, self.reduce_zero_label = classes, reduce_zero_label
        self.targets = [-1] * len(self.samples)  # no image-level label

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.samples[i][0]) as im:
            return im.convert("RGB"), self.samples[i][1]


def ade20k(root, split):
    """ADEChallengeData2016 as the challenge zip unpacks, under root."""
    base = os.path.join(root, "ADEChallengeData2016")
    part = "training" if split == "train" else "validation"
    if split not in ("train", "test"):
        fail(f"ade20k has train and test (its official validation set); {split} comes from the paper's split files")
    try:  # the devkit's table, tab-separated "Idx Ratio Train Val Name"; "building, edifice" is called "building"
        with open(os.path.join(base, "objectInfo150.txt")) as f:
            classes = [line.split("\t")[-1].split(",")[0].strip() for line in f.readlines()[1:] if line.strip()]
    except OSError:
        classes = [f"class{i}" for i in range(1, 151)]
    if len(classes) != 150:
        fail(f"{base}/objectInfo150.txt names {len(classes)} classes; ADE20K has 150")
    return Segmentation(os.path.join(base, "images", part), os.path.join(base, "annotations", part), classes,
                        reduce_zero_label=True)


def segmentation_folder(root, split):
    """folder:PATH with PATH/SPLIT/images/, PATH/SPLIT/masks/ and PATH/classes.txt."""
    try:
        with open(os.path.join(root, "classes.txt"), encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"segmentation folder {root}: cannot read classes.txt ({e.strerror}), one class name a line")
    return Segmentation(os.path.join(root, split, "images"), os.path.join(root, split, "masks"), classes)


# ----------------------------------------------------------------------------------- by name
def _folder(root, split):
    """`folder:PATH` datasets: PATH/train/<class>/*.jpg, PATH/test/<class>/*, optional PATH/val/."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"folder dataset {root} has no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    seen = set()  # real paths: a file reached again (a directory symlink loop, a second link) counts once

    def first_visit(f):
        real = os.path.realpath(f)
        new = real not in seen
        seen.add(real)
        return new and has_file_allowed_extension(f, IMG_EXTENSIONS)
    try:
        return ImageFolder(path, is_valid_file=first_visit)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"folder dataset {path}: {e}")


def _labels(ds):
    """Integer labels of a dataset without decoding any image."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return [int(y) for y in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


@functools.lru_cache(maxsize=None)
def load_dataset(name, split, root="data", download=True, image_column=None, label_column=None):
    """(dataset, labels, classes) of one split; dataset[i] -> (PIL image, int label). Cached. The columns
    choose an hf: dataset's image and label columns (split.py's --image-column, --label-column)."""
    if name.startswith("hf:"):
        from kt import hf_datasets
        ds = hf_datasets.open_split(name, split, image_column, label_column, labeled=True)
    elif name in GENERATED or name.startswith("py:") or name in TORCHVISION:
        ds = indexed(name, split, root, download)
    elif name == "imagenet":  # DATA_ROOT/imagenet/train/<wnid>/*.JPEG and val/<wnid>/*: val is the test set
        ds = _folder(os.path.join(root, "imagenet"), "val" if split == "test" else split)
    elif name == "ham10000":
        ds = HAM10000(os.path.join(root, "ham10000"), split)
    elif name == "ade20k":
        ds = ade20k(root, split)
    elif name.startswith("folder:") and dense_by_name(name):
        ds = segmentation_folder(name[len("folder:"):], split)
    elif name.startswith("folder:"):
        ds = _folder(name[len("folder:"):], split)
        if split != "train":
            train_classes = _folder(name[len("folder:"):], "train").classes
            if ds.classes != train_classes:
                fail(f"{name}: {split}/ classes {ds.classes} differ from train/ classes {train_classes}")
    else:
        fail(f"unknown dataset '{name}'; choose {', '.join(GENERATED)}, {', '.join(TORCHVISION + PAPER)}, "
             "folder:PATH, py:MODULE or hf:NAME (a Hugging Face dataset)")
    classes = list(getattr(ds, "classes", None) or sorted(set(_labels(ds))))
    return ds, _labels(ds), [str(c) for c in classes]


def split_refs(dataset, split, indices=None, root="data", image_column=None, label_column=None):
    """References like `cifar10:train:17` for indices of a split (all of it when indices is None); an hf:
    dataset names its own (kt.hf_datasets: the split is the dataset's, the folder absolute)."""
    ds, labels, _ = load_dataset(dataset, split, root, True, image_column, label_column)
    indices = range(len(ds)) if indices is None else indices
    outside = [i for i in indices if not 0 <= i < len(ds)]
    if outside:
        fail(f"{len(outside)} indices outside {dataset}/{split} ({len(ds)} images), e.g. {outside[:3]}: "
             "the split file was made for other data")
    if hasattr(ds, "samples"):  # real files (folder:, imagenet, ham10000, ade20k): reference them by path
        refs = [os.path.abspath(ds.samples[i][0]) for i in indices]  # split.json works from any folder
        masks = [os.path.abspath(ds.samples[i][1]) for i in indices] if is_dense(ds) else None
        return refs, masks or [labels[i] for i in indices]
    refs = [ds.ref(i) if hasattr(ds, "ref") else f"{dataset}:{split}:{i}" for i in indices]
    return refs, refs if is_dense(ds) else [labels[i] for i in indices]  # a dense dataset's ref names its mask too


def has_val(name, image_column=None, label_column=None):
    """Whether a dataset has a val split of its own: a folder's val/, an hf: dataset's validation split (where
    its test split is not missing or unlabeled, which makes that the test set)."""
    if name.startswith("hf:"):
        from kt import hf_datasets
        return hf_datasets.has_val(name, image_column, label_column)
    return name.startswith("folder:") and os.path.isdir(os.path.join(name[len("folder:"):], "val"))


def is_dense(ds):
    """Whether a dataset is for segmentation: its labels are masks."""
    return getattr(ds, "dense", False)


def dense_by_name(name):
    """Whether a dataset is for segmentation, known from its name without listing its files."""
    return name in ("ade20k", "demo-seg") or name.startswith("folder:") and \
        os.path.isdir(os.path.join(name[len("folder:"):], "train", "masks"))

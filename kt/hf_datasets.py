"""Hugging Face datasets by name (`hf:`), read with the optional package `datasets`; kt.catalog imports this
module for hf: names alone. docs/datasets.md is the user's side of it.

  * names: `hf:OWNER/NAME[:CONFIG]`, a Hub dataset (datasets.load_dataset; offline, HF_HUB_OFFLINE=1, from
    the local cache under HF_HOME alone), and `hf:DIR[:CONFIG]`, a local folder: what save_to_disk wrote
    (load_from_disk), or the Hub's own layout (data/train-00000-of-00001.parquet, data/test-*.parquet, a
    README.md's configs: load_dataset(DIR)). A name that is a local folder is that folder, as for datasets;
  * columns: the image column is the first Image feature, the label column the first ClassLabel, else one
    named `label` (timm's hfds: default), or those split.py's --image-column and --label-column name. The
    class names are the ClassLabel's; integer labels are class indices (named "0", "1", ...) and strings
    class names (sorted, as folder names are), each said once;
  * splits: train is the train split (labeled and unlabeled images), validation (valid, val, dev) the val
    split, test the test split; a dataset whose test split is missing or has no labels (-1) tests on its
    validation split, as ImageNet's val is its test set. A pool (--pool hf:NAME:SPLIT) may name any split;
  * references: `hf:SPEC:SPLIT:INDEX`, with SPEC the name as above (a local folder's absolute path) and SPLIT
    the dataset's own split name; `hf:SPEC#COLUMN:SPLIT:INDEX` where --image-column chose another column
    than the first Image feature. Read from the right, so SPEC may hold ':' and '/'; SPLIT and COLUMN hold
    neither ':' nor '#'. Each process opens a dataset once (memory-mapped Arrow files, not loaded), and an
    image is decoded from its own row: DataLoader workers open any index at the cost of one image.
"""
import functools
import io
import os
import re
import warnings

import torch

from kt.checks import fail

PREFIX = "hf:"
PARTS = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # the datasets package's own rule for split names


def _datasets():
    """The optional package, or one line naming the pip command."""
    try:
        import datasets
    except ImportError:
        fail("hf: datasets need the optional package datasets: pip install datasets "
             "(or pip install -r requirements-extras.txt)")
    return datasets


def _one_line(e):
    """An exception as one line; datasets puts what to do on its second line (the configs it has)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def parse(name):
    """`hf:SPEC[#COLUMN]` -> (SPEC, image COLUMN or None). A '#' that is part of a local path is the path's."""
    body = name[len(PREFIX):]
    spec, sep, column = body.rpartition("#")
    if not sep or os.path.exists(os.path.expanduser(body)) or not column or ":" in column:
        return body, None
    return spec, column


def where(spec):
    """SPEC -> (a local folder or a Hub id, CONFIG or None, whether it is local)."""
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return os.path.abspath(path), None, True
    head, _, config = path.rpartition(":")
    if head and os.path.isdir(head) and config:
        return os.path.abspath(head), config, True
    if path.startswith(("/", "./", "../", "~")):
        fail(f"hf:{spec}: no such folder (hf:DIR is a folder save_to_disk wrote, or the Hub's parquet layout)")
    repo, _, config = spec.partition(":")
    return repo, config or None, False


def canonical(spec):
    """The SPEC that references carry: a local folder's absolute path, from any working directory."""
    path, config, local = where(spec)
    return path + (f":{config}" if config else "") if local else spec


@functools.lru_cache(maxsize=None)
def splits(spec):
    """{split name: datasets.Dataset} of SPEC, opened once per process (memory-mapped, nothing decoded)."""
    datasets = _datasets()
    path, config, local = where(spec)
    saved = local and any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    if saved and config:
        fail(f"hf:{spec}: {path} is what save_to_disk wrote, one configuration: name it hf:{path}")
    try:
        loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, config)
    except Exception as e:  # noqa: BLE001 (datasets raises a dozen kinds: each is the user's data, one line)
        if local:
            fail(f"hf:{spec}: cannot read {path} as a dataset ({_one_line(e)}); hf:DIR is a folder save_to_disk "
                 "wrote, or the Hub's layout (DIR/data/train-*.parquet, DIR/data/test-*.parquet)")
        if isinstance(e, ConnectionError):  # offline (HF_HUB_OFFLINE=1) or no network, and not in the cache
            config_arg = f", {config!r}" if config else ""
            fail(f"hf:{spec} is neither a local folder nor in the local cache of Hub datasets "
                 f"({datasets.config.HF_DATASETS_CACHE}), and the Hub cannot be reached: on a connected machine "
                 f"run python -c \"import datasets; datasets.load_dataset({path!r}{config_arg}).save_to_disk('DIR')\""
                 ", copy DIR here and name it hf:DIR (or point HF_HOME at a copy of that machine's cache)")
        fail(f"hf:{spec}: {_one_line(e)}")
    if isinstance(loaded, datasets.Dataset):  # a single split saved on its own
        loaded = {str(loaded.split or "train"): loaded}
    return dict(loaded)


def own_split(spec, split, found):
    """The dataset's own split for `split`: its own name, or split.py's part (train, val, test); None if none."""
    if split in found:
        return split
    return next((s for s in PARTS.get(split, ()) if s in found), None)


# ------------------------------------------------------------------------------------------ columns
def image_column(spec, ds, named=None):
    """The image column: `named` (checked), or the first Image feature."""
    datasets = _datasets()
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if named is not None:
        if named not in ds.features or named not in images:
            what = f"is a {type(ds.features[named]).__name__}, not an Image" if named in ds.features else "is not a column"
            fail(f"hf:{spec}: --image-column {named} {what} (its Image columns: {', '.join(images) or 'none'})")
        return named
    if not images:
        fail(f"hf:{spec} has no Image column (its columns: {', '.join(ds.features)}); a column of file paths or "
             "bytes becomes one with datasets' cast_column(NAME, datasets.Image())")
    return images[0]


def label_column(spec, ds, named=None):
    """The label column: `named` (checked), the first ClassLabel, or one called `label` (timm's default)."""
    datasets = _datasets()
    if named is not None:
        if named not in ds.features:
            fail(f"hf:{spec}: --label-column {named} is not a column (its columns: {', '.join(ds.features)})")
        return named
    found = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    found += [c for c in ("label", "labels") if c in ds.features]
    if not found:
        fail(f"hf:{spec} has no ClassLabel column nor one called label (its columns: {', '.join(ds.features)}): "
             "name the label column with --label-column")
    return found[0]


def _column(ds, column):
    """A column's values without decoding the others (images stay bytes in the Arrow file)."""
    return ds.with_format("arrow")[column]


def labels_and_classes(spec, split, ds, column, train_classes=None):
    """(labels, class names) of a split's label column: a ClassLabel's names; integers are class indices
    (named "0", "1", ...); strings are class names (sorted). Other splits follow train's `train_classes`."""
    datasets = _datasets()
    feature, values = ds.features[column], _column(ds, column).to_pylist()
    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        if train_classes is not None and classes != train_classes:
            fail(f"hf:{spec}: the {split} split's classes {classes[:5]} differ from train's {train_classes[:5]}")
    elif dtype in ("string", "large_string"):
        classes = train_classes or sorted({v for v in values if v is not None})
        unknown = sorted({v for v in values if v is not None and v not in classes})
        if unknown:
            fail(f"hf:{spec}: the {split} split's labels {unknown[:5]} are not classes of train's {column} column")
        index = {c: i for i, c in enumerate(classes)}
        values = [-1 if v is None else index[v] for v in values]
        if train_classes is None:
            warnings.warn(f"hf:{spec}: {column} is a column of strings, not a ClassLabel: its {len(classes)} "
                          "values are the class names, sorted")
    elif dtype is not None and re.fullmatch(r"u?int\d+", dtype):
        classes = train_classes or [str(c) for c in range(max((v for v in values if v is not None), default=-1) + 1)]
        if train_classes is None:
            warnings.warn(f"hf:{spec}: {column} is a column of integers, not a ClassLabel: they are the class "
                          f"indices, the classes named '0'-'{len(classes) - 1}'")
    else:
        fail(f"hf:{spec}: the label column {column} holds {feature}, not class labels (a ClassLabel, integers or "
             "strings); name another with --label-column")
    values = [-1 if v is None else v for v in values]
    outside = [v for v in values if v >= len(classes)]
    if outside:
        fail(f"hf:{spec}: the {split} split has labels up to {max(outside)}, past its {len(classes)} classes")
    return values, classes


# ------------------------------------------------------------------------------------------- a split
class Split(torch.utils.data.Dataset):
    """One split of an hf: dataset: split[i] -> (PIL image, label or -1); .ref(i) names image i, .targets and
    .classes the labels (read only when a label column is asked for: a pool needs none)."""

    def __init__(self, spec, split, ds, image, default_image, targets=None, classes=None):
        self.spec, self.split, self.ds, self.image = spec, split, ds, image
        # the reference names the column only where it is not the one found without a flag
        self.prefix = f"{PREFIX}{canonical(spec)}{'' if image == default_image else '#' + image}:{split}"
        self.raw = ds.select_columns([image]).cast_column(image, _datasets().Image(decode=False))
        self.targets, self.classes = targets, classes

    def __len__(self):
        return len(self.ds)

    def ref(self, i):
        return f"{self.prefix}:{i}"

    def file_names(self):
        """Each image's file name (the base name of the Image feature's `path`), or None where it has none."""
        import pyarrow.compute as pc
        paths = pc.struct_field(_column(self.ds, self.image), "path").to_pylist()
        return [os.path.basename(p) if p else None for p in paths]

    def __getitem__(self, i):
        from PIL import Image
        cell = self.raw[int(i)][self.image]
        with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as im:
            im.load()  # decoded here: the caller converts and closes nothing
            image = im.copy()
        return image, (self.targets[i] if self.targets is not None else -1)


def open_split(name, split, image=None, label=None, labeled=False):
    """Split `split` of the hf: dataset `name` (`hf:SPEC[#COLUMN]`): split.py's part (train, val, test) or the
    dataset's own split name. labeled: with its labels and class names (the train split's classes); a test
    split without labels, or none, is the validation split (said once)."""
    spec, image_named = parse(name)
    image = image or image_named
    found = splits(spec)
    own = own_split(spec, split, found)
    if own is None and split == "test":  # the Hub's Food-101: train and validation, the official test set
        own = own_split(spec, "val", found)
        if own:
            warnings.warn(f"hf:{spec} has no test split: the {own} split is the test set")
    if own is None:
        have = ", ".join(found)
        if split == "test":
            fail(f"hf:{spec} has no test split nor a validation split (its splits: {have}); cut one off with "
                 "datasets' train_test_split, save_to_disk it and use --dataset hf:DIR")
        fail(f"hf:{spec} has no {split} split (its splits: {have})")
    ds = found[own]
    default = image_column(spec, ds)
    image = image_column(spec, ds, image) if image else default
    if not labeled:
        return Split(spec, own, ds, image, default)
    train = found[own_split(spec, "train", found) or own]
    label = label_column(spec, train, label)
    if label not in ds.features:
        fail(f"hf:{spec}: its {own} split has no column {label} (its columns: {', '.join(ds.features)})")
    classes = labels_and_classes(spec, "train", train, label)[1]
    targets = labels_and_classes(spec, own, ds, label, classes)[0]
    if split == "test" and own == "test" and all(y < 0 for y in targets):
        val = own_split(spec, "val", found)
        if val is None:
            fail(f"hf:{spec}: its test split has no labels (-1) and it has no validation split to test on")
        warnings.warn(f"hf:{spec}: its test split has no labels (-1): the {val} split is the test set")
        return open_split(f"{PREFIX}{spec}", val, image, label, labeled=True)
    unlabeled = sum(y < 0 for y in targets)
    if unlabeled:
        fail(f"hf:{spec}: {unlabeled} images of its {own} split have no label (-1 or empty in {label})")
    return Split(spec, own, ds, image, default, targets, classes)


def tested_split(name, image=None, label=None):
    """The dataset's own split that split.py tests on (test, or validation where test has no labels)."""
    return open_split(name, "test", image, label, labeled=True).split


def has_val(name, image=None, label=None):
    """Whether the dataset has a validation split of its own, besides the one it tests on."""
    val = own_split(parse(name)[0], "val", splits(parse(name)[0]))
    return val is not None and val != tested_split(name, image, label)


def named_images(name, image=None, label=None):
    """For the paper's split files: (the classes, {file name: [(reference, label or -1)]} over every split,
    the train split's references). An image's name is the base name of its Image feature's `path`."""
    spec = parse(name)[0]
    classes = open_split(name, "train", image, label, labeled=True).classes
    named, train = {}, None
    for own in splits(spec):
        images = open_split(name, own, image)
        column = label_column(spec, splits(spec)["train" if "train" in splits(spec) else own], label)
        labels = labels_and_classes(spec, own, images.ds, column, classes)[0] if column in images.ds.features \
            else [-1] * len(images)
        refs = [images.ref(i) for i in range(len(images))]
        train = refs if own == own_split(spec, "train", splits(spec)) else train
        for file_name, ref, y in zip(images.file_names(), refs, labels):
            if file_name:
                named.setdefault(file_name, []).append((ref, y))
    if not named:
        fail(f"{name}: its images keep no file names (their Image feature's path is empty), so split files "
             "cannot name them; use --shots")
    return classes, named, train

"""Step 0, the label budget: which images are labeled, which are the task's unlabeled images, val and test.

Made once, so that every model sees the same labels: from --shots N (N labeled images per class) or
--shots P% (P% of each class), drawn from --seed, the rest of the train split unlabeled and the dataset's
test split the test set; or from the paper's split files (--split-files DIR --budget NAME, apple/ml-vfm-kt
datasplits/<Task>/). Segmentation: --shots N is N images, and every mask is checked here, once. A Hugging Face
dataset (--dataset hf:NAME or hf:DIR) takes its image and label columns from its features or from
--image-column and --label-column; its train, validation and test splits are the parts (docs/datasets.md).

Reads:  the dataset (kt.catalog lists it by name); split files with --split-files.
Uses:   kt.catalog, kt.data, kt.training; kt.checkpoints, kt.claims, kt.checks; where used: kt.masks
        (segmentation), kt.demo (the demo), kt.hf_datasets (hf: datasets, with the optional datasets).
Writes: split.json = {dataset, shots, seed | split_files, budget, classes, labeled, files: {part: [[image
        reference, label], ...]} for labeled, unlabeled, test (and val)}: every later step reads it, and
        nothing else of the dataset. Asked again with the same settings it is kept; with others, refused.
Run:    python split.py --dataset eurosat --shots 10 --seed 0 --out runs/eurosat/split.json
"""
import argparse
import collections
import json
import os
import re
import warnings

import numpy as np
from PIL import Image

from kt import catalog, data, training
from kt.checkpoints import atomic_write, differences
from kt.data import check_split
from kt.checks import IMAGE_EXTS, fail, first_line, positive


def label_budget(labels, shots, seed):
    """Pick `shots` images per class (a count, or "P%" of each class), balanced and deterministic in `seed`.

    labels: list of N ints. Returns (labeled, unlabeled) sorted index lists; a class with fewer than
    `shots` images gives all it has (with a warning). The rest of the split is the task's unlabeled pool.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    labeled = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(len(idx) * float(shots[:-1]) / 100)) if isinstance(shots, str) else shots
        if len(idx) < k:
            warnings.warn(f"class {c} has {len(idx)} images, fewer than --shots {shots}: using all of them")
        labeled += idx[:k].tolist()
    chosen = set(labeled)
    return sorted(labeled), [i for i in range(len(labels)) if i not in chosen]


def shots(s):
    """argparse type of --shots: a count per class (10), or a percentage of each class (1%, 0.5%)."""
    if s.endswith("%"):
        if not re.fullmatch(r"\d+(\.\d+)?", s[:-1]) or not 0 < float(s[:-1]) <= 100:
            raise argparse.ArgumentTypeError(f"{s!r} is not a percentage above 0 and at most 100")
        return s
    return positive(s)


def read_split_file(path, dense=False):
    """A split file: one `filename,class` a line -> [(filename, class)]; segmentation: `filename` (class None)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first name
            rows = [[field.strip() for field in line.split(",")] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read split file {path} ({first_line(e)})")
    form = "`filename`" if dense else "`filename,class`"
    bad = [",".join(r) for r in rows if len(r) != (1 if dense else 2) or not all(r)]
    if bad:
        fail(f"{path}: {len(bad)} lines are not {form}, e.g. {bad[0]!r}")
    return [(r[0], None if dense else r[1]) for r in rows]


def read_split_files(folder, budget, dense):
    """The split files of one task -> {part: [(filename, class)]}: labeled (the budget's file), train_full,
    val and test where the folder has them (ImageNet has no test.txt: its val.txt is the test set)."""
    budget_file = budget if budget.endswith(".txt") else budget + ".txt"
    if not os.path.exists(os.path.join(folder, budget_file)):
        have = sorted(f[:-4] for f in os.listdir(folder) if f.startswith("train_") and f.endswith(".txt"))
        fail(f"no budget {budget} in {folder}: choose one of {', '.join(have) or 'none (no train_*.txt)'}")
    read = {p: read_split_file(os.path.join(folder, p + ".txt"), dense) for p in ("train_full", "val", "test")
            if os.path.exists(os.path.join(folder, p + ".txt"))}
    read["labeled"] = read_split_file(os.path.join(folder, budget_file), dense)
    if "test" not in read and "val" in read:  # ImageNet: the val split is the test set
        read["test"] = read.pop("val")
    for part, rows in read.items():
        twice = [row for row, n in collections.Counter(rows).items() if n > 1]
        if twice:
            fail(f"the {part} split file names {len(twice)} images more than once, e.g. {','.join(filter(None, twice[0]))}")
    return read


def unlabeled_rest(files, rest):
    """The unlabeled part: the train images (`rest`) that are not labeled, val or test images."""
    taken = {p for part in ("labeled", "val", "test") for p, _ in files.get(part, [])}
    return [pair for pair in rest if pair[0] not in taken]


def segmentation_files(dataset, read, root):
    """Segmentation: each name is an image of the dataset's own listing, whose mask comes with it."""
    train, test = (catalog.load_dataset(dataset, part, root)[0] for part in ("train", "test"))
    if not hasattr(train, "samples"):
        fail(f"split files name image files; {dataset} has none")
    pairs = {os.path.basename(img): [os.path.abspath(img), os.path.abspath(mask)]
             for img, mask in train.samples + test.samples}
    lost = [n for rows in read.values() for n, _ in rows if n not in pairs]
    if lost:
        fail(f"{len(lost)} images of the split files are not in {dataset} under {root} (e.g. {lost[:3]})")
    files = {part: [pairs[n] for n, _ in rows] for part, rows in read.items() if part != "train_full"}
    rest = [pairs[n] for n, _ in read["train_full"]] if "train_full" in read else [list(s) for s in train.samples]
    files["unlabeled"] = unlabeled_rest(files, rest)
    return train.classes, files


def in_class_folder(path, cls, top):
    """Whether `path` lies in the folder of class `cls`: the folders between `top` and the file, read from the
    end and joined by "_", spell the class exactly (Places365's apartment_building_outdoor is in
    a/apartment_building/outdoor/; its house is not tree_house/)."""
    folders = os.path.relpath(os.path.dirname(path), top).split(os.sep)
    return any("_".join(folders[-j:]) == cls for j in range(1, len(folders) + 1))


def class_order(classes, found, top):
    """The classes in the order of their folders' paths, as torchvision lists them (Places365's desert/sand
    before desert_road), then by name where no class folder holds them (HAM10000's flat folders)."""
    folder = {}
    for (_, c), p in found.items():
        if c not in folder and p and in_class_folder(p, c, top):
            folder[c] = os.path.relpath(os.path.dirname(p), top)
    return sorted(classes, key=lambda c: (folder.get(c, ""), c))


def find_all(read, candidates, in_its_class, where, how):
    """Each (name, class) of the split files -> its one match: the candidates of that name (candidates[name]),
    narrowed to those in_its_class(match, class) when there are several. A name with none is one line (it is
    not `where`: `how` says how to get it), a name with several and none of its class too."""
    def find(name, cls):
        hits = candidates.get(name, [])
        if len(hits) > 1:
            hits = [h for h in hits if in_its_class(h, cls)]
        return hits[0] if len(hits) == 1 else None
    found = {(n, c): find(n, c) for rows in read.values() for n, c in rows}
    lost = [n for (n, c), hit in found.items() if hit is None and not candidates.get(n)]
    if lost:
        fail(f"{len(lost)} files of the split files are not {where} (e.g. {lost[:3]}); {how}")
    unsure = [f"{n} ({c})" for (n, c), hit in found.items() if hit is None]
    if unsure:
        fail(f"{len(unsure)} files of the split files are {where} more than once and none of them of its class, "
             f"e.g. {unsure[:3]}")
    return found


def classification_files(dataset, read, root):
    """Classification: each `filename,class` found under the dataset's folder by its file name; a name in
    several folders (Places365's 00000001.jpg is in every class folder) is the one in its class's folder."""
    top = dataset[len("folder:"):] if dataset.startswith("folder:") else os.path.join(root, dataset)
    paths = {}  # file name -> its paths under the dataset's folder
    for d, _, names in os.walk(top, followlinks=True):
        for name in names:
            if name.lower().endswith(IMAGE_EXTS):
                paths.setdefault(name, []).append(os.path.abspath(os.path.join(d, name)))
    found = find_all(read, paths, lambda p, cls: in_class_folder(p, cls, top), f"under {top}",
                     "download the dataset there first")
    classes = class_order({c for rows in read.values() for _, c in rows}, found, top)
    odd = sorted({c for _, c in read["labeled"]} ^ {c for _, c in read["test"]}) if "test" in read else []
    if odd:  # a typo ('circel') would be a class of its own, with no test image to score it
        fail(f"classes {odd[:5]} are named by only one of the budget and test split files: a typo, or files "
             "of another task?")
    index = {c: i for i, c in enumerate(classes)}
    files = {part: [[found[n, c], index[c]] for n, c in rows] for part, rows in read.items() if part != "train_full"}
    rest = ([found[n, c] for n, c in read["train_full"]] if "train_full" in read  # no train_full: all the others
            else sorted(p for ps in paths.values() for p in ps))
    files["unlabeled"] = unlabeled_rest(files, [[p, -1] for p in rest])
    return classes, files


def hf_files(dataset, read, image_column=None, label_column=None):
    """Split files on an hf: dataset: each name is the file name its image was made from (the Image feature's
    `path`, which the Hub's parquet files keep), found in any of its splits; its class is one of the dataset's
    and, where the dataset labels the image, that label (a name in several splits is the one of its class)."""
    from kt import hf_datasets
    classes, named, train = hf_datasets.named_images(dataset, image_column, label_column)
    index = {c: i for i, c in enumerate(classes)}
    odd = sorted({c for rows in read.values() for _, c in rows} - set(index))
    if odd:
        fail(f"the split files name classes {odd[:5]} that {dataset} does not have (its classes: {classes[:8]})")
    found = find_all(read, named, lambda hit, cls: hit[1] == index[cls], f"images of {dataset}",
                     "an image is named by the file it was made from, its Image feature's path")
    wrong = [f"{n} ({c}, {dataset}: {classes[hit[1]]})" for (n, c), hit in found.items() if hit[1] not in (index[c], -1)]
    if wrong:
        fail(f"{len(wrong)} files of the split files are of another class in {dataset}, e.g. {wrong[:3]}: split "
             "files of another task?")
    files = {part: [[found[n, c][0], index[c]] for n, c in rows] for part, rows in read.items() if part != "train_full"}
    rest = [found[n, c][0] for n, c in read["train_full"]] if "train_full" in read else train
    files["unlabeled"] = unlabeled_rest(files, [[r, -1] for r in rest])
    return classes, files


def check_masks(split, root):
    """Every labeled, val and test mask read once: the wrong size or a class out of range is one line, before
    any training (data.Images would otherwise skip that image with a warning)."""
    from kt import masks
    for part in ("labeled", "val", "test"):
        refs, labels = data.part_refs(split, part) or ([], [])
        for ref, mask in training.bar(list(zip(refs, labels)), desc=f"checking {part} masks", leave=False):
            try:
                if os.path.isfile(ref):  # the image's size from its header, without decoding it
                    with Image.open(ref) as im:
                        size = im.size
                else:
                    size = data.open_image(ref, root).size
                masks.open_mask(mask, root, split["reduce_zero_label"], len(split["classes"]), size)
            except ValueError as e:  # our own one-line message names the mask
                fail(f"{e}; fix or remove it (its {part} image: {ref})")
            except OSError as e:
                fail(f"cannot read the mask {mask} ({first_line(e)}) of {part} image {ref}")


def parts(dataset, labeled, unlabeled, root, columns=(None, None)):
    """[reference, label] pairs of each part: the labeled and unlabeled indices of the train split, the test
    split, and the val split of a folder dataset (val/) or an hf: dataset (the only ones with one of their own).
    columns: an hf: dataset's image and label columns."""
    wanted = {"labeled": ("train", labeled), "unlabeled": ("train", unlabeled), "test": ("test", None)}
    if catalog.has_val(dataset, *columns):
        wanted["val"] = ("val", None)
    files = {}
    for part, (split, indices) in wanted.items():
        refs, labels = catalog.split_refs(dataset, split, indices, root, *columns)
        files[part] = [[ref, label] for ref, label in zip(refs, labels)]
    return files


def make_split(path, dataset, shots, seed, root="data", split_files=None, budget=None, image_column=None,
               label_column=None):
    """Write split.json at `path`; if it is there for the same settings, read it back (for others: refused).
    image_column, label_column: an hf: dataset's columns, where they are not the ones found by their type."""
    budget = budget.removesuffix(".txt") if budget else budget  # train_10img_per_class, however it is given
    want = dict(dataset=dataset, split_files=os.path.abspath(split_files), budget=budget) if split_files else \
        dict(dataset=dataset, shots=shots, seed=seed)
    columns = (image_column, label_column)
    if any(columns) and not dataset.startswith("hf:"):
        fail(f"--image-column and --label-column choose the columns of an hf: dataset; {dataset} has none")
    want.update({k: v for k, v in (("image_column", image_column), ("label_column", label_column)) if v})
    if os.path.exists(path):
        try:
            with open(path) as f:
                split = json.load(f)
            differ = differences(split, want)
        except (OSError, ValueError, AttributeError) as e:
            fail(f"{path} is not a split file ({first_line(e)}); delete it or use another --out")
        if differ:
            fail(f"{path} records other settings than this step was asked for ({'; '.join(differ)}); "
                 "use another --out")
        if "files" in split:
            return split
        # else: a split.json of an older version, without its file lists; made again, with the same labels
    if split_files:
        if not budget:
            fail("--split-files needs --budget NAME (the file of labeled images, e.g. train_10img_per_class)")
        # the dataset is not listed (ImageNet's 1.2M files), but for segmentation: its listing pairs image and mask
        dense = catalog.dense_by_name(dataset)
        ds = catalog.load_dataset(dataset, "train", root)[0] if dense else None
        read = read_split_files(split_files, budget, dense)
        if dataset.startswith("hf:"):
            classes, files = hf_files(dataset, read, *columns)
        else:
            classes, files = (segmentation_files if dense else classification_files)(dataset, read, root)
        split = dict(want, classes=classes, labeled=[p for p, _ in files["labeled"]], files=files)
    else:
        ds, labels, classes = catalog.load_dataset(dataset, "train", root, True, *columns)
        dense = catalog.is_dense(ds)
        catalog.load_dataset(dataset, "test", root, True, *columns)  # a missing or mismatched test split: refused now
        if dense and isinstance(shots, int) and shots > len(labels):
            fail(f"--shots {shots}: {dataset} has {len(labels)} train images (segmentation: --shots counts images)")
        labeled, unlabeled = label_budget([0] * len(labels) if dense else labels, shots, seed)  # dense: N images
        split = dict(want, classes=classes, labeled=labeled, unlabeled=unlabeled,
                     files=parts(dataset, labeled, unlabeled, root, columns))
    if dense:
        split.update(dense=True, reduce_zero_label=getattr(ds, "reduce_zero_label", False))
        check_masks(split, root)
    check_split(split, path)  # what every later step checks (labeled and test images apart, ...): before writing
    atomic_write(path, lambda f: f.write(json.dumps(split).encode()))
    return split


def get_args_parser():
    p = argparse.ArgumentParser(description="split: the label budget, recorded once in split.json",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="demo", help="demo, demo-clutter (harder; both offline); torchvision's "
                   "eurosat, flowers102, dtd, pets, food101, cifar10, cifar100, stl10, places365; imagenet or "
                   "ham10000 (downloaded into DATA_ROOT/NAME); folder:PATH (PATH/train/<class>/*, "
                   "PATH/test/<class>/*); py:MODULE; hf:OWNER/NAME[:CONFIG] (a Hugging Face dataset: from the Hub, "
                   "offline from its cache) or hf:DIR (a folder save_to_disk wrote, or the Hub's parquet layout: "
                   "DIR/data/train-*.parquet, test-*); segmentation: demo-seg, ade20k "
                   "(DATA_ROOT/ADEChallengeData2016), folder:PATH "
                   "(PATH/{train,test}/images/ + masks/, PATH/classes.txt)")
    p.add_argument("--image-column", metavar="NAME", help="hf: datasets: the column of images (unset: the first "
                   "Image feature)")
    p.add_argument("--label-column", metavar="NAME", help="hf: datasets: the column of labels (unset: the first "
                   "ClassLabel, else `label`); integers are class indices, strings class names")
    p.add_argument("--data-root", default="data", help="where torchvision datasets live / download to")
    p.add_argument("--shots", type=shots, default=10, help="the label budget: labeled images per class (10), "
                   "or a percentage of each class (1%%); segmentation: images in all (1200), or a percentage")
    p.add_argument("--seed", type=int, default=0, help="picks the labeled images")
    p.add_argument("--split-files", metavar="DIR", help="the paper's split files (apple/ml-vfm-kt "
                   "datasplits/<Task>/) instead of --shots and --seed; with --budget")
    p.add_argument("--budget", metavar="NAME", help="with --split-files: the file of labeled images, "
                   "e.g. train_10img_per_class")
    p.add_argument("--out", default="runs/demo/split.json")
    return p


def main(args):
    split = make_split(args.out, args.dataset, args.shots, args.seed, args.data_root, args.split_files, args.budget,
                       args.image_column, args.label_column)
    sizes = ", ".join(f"{len(pairs)} {part}" for part, pairs in split["files"].items())
    training.log(0, f"{args.out}: {len(split['classes'])} classes; {sizes}")
    return split


if __name__ == "__main__":
    main(get_args_parser().parse_args())

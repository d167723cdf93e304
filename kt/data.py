"""The task's images: its split (split.json), image references, and loading batches.

  * split.json (split.py makes it): the task's classes and, for each part (labeled, unlabeled, val, test),
    its images as [reference, label] pairs; a segmentation split's labels are mask references;
  * image references, one a line in transfer lists: a file path, `SHARD.tar::MEMBER`, or `NAME:SPLIT:INDEX`
    for an image that is not a file of its own (torchvision's cifar10, the demo, py:MODULE, an hf: dataset:
    kt.catalog opens those, imported only for them);
  * Images + EpochSampler: every image's augmentation is seeded by (seed, epoch, index), so a run is the
    same for any worker count and resumes mid-epoch exactly.
"""
import io
import json
import math
import os
import random
import sys
import tarfile

import numpy as np
import torch

from kt import models
from kt.checks import fail, first_line



# ----------------------------------------------------------------------------------------- the split
def read_split(path):
    """A split.json (split.py), checked."""
    if not os.path.exists(path):
        fail(f"{path} not found: run split.py --out {path} first (the label budget)")
    try:
        with open(path) as f:
            split = json.load(f)
        split["classes"], split["files"]["labeled"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path} is not a split file ({first_line(e)}); split.py makes it (an older one, without `files`, "
             "is made again by split.py with its settings, or by run.sh --force)")
    check_split(split, path)
    return split


def check_split(split, path):
    """What every step may rely on, checked once, each problem one line: unique class names; for each part,
    [reference, label] pairs with a class index (or a mask reference, segmenting); some labeled images, no
    image both labeled (or unlabeled) and a test or val image. A relative path is relative to split.json."""
    classes, files = split["classes"], split["files"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        fail(f"{path}: classes is not a list of class names")
    if len(set(classes)) < len(classes):
        fail(f"{path}: class {next(c for c in classes if classes.count(c) > 1)!r} is named twice")
    if not isinstance(files, dict):
        fail(f"{path}: files is not a dict of parts (labeled, unlabeled, val, test)")
    base, dense = os.path.dirname(os.path.abspath(path)), is_segmentation(split)
    for part, pairs in files.items():
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            fail(f"{path}: files.{part} is not a list of [image, label] pairs")
        bad = next((r for r, _ in pairs if not isinstance(r, str) or not r or "\n" in r or "\0" in r), None)
        if bad is not None:
            fail(f"{path}: files.{part} names an image {bad!r}: references are one-line strings")
        for p in pairs:  # a relative path is relative to split.json's folder (when the file is there)
            if not os.path.isabs(p[0]) and os.path.exists(os.path.join(base, p[0])):
                p[0] = os.path.join(base, p[0])
        labels = [y for _, y in pairs]
        wrong = next((y for y in labels if not isinstance(y, str)), None) if dense else next(
            (y for y in labels if type(y) is not int or not (0 <= y < len(classes) or (part == "unlabeled" and y == -1))),
            None)
        if wrong is not None:
            what = "mask references" if dense else f"class indices 0-{len(classes) - 1}" + (
                " (-1: none)" if part == "unlabeled" else "")
            fail(f"{path}: files.{part} has the label {wrong!r}: its labels are {what}")
    if not files.get("labeled"):
        fail(f"{path} lists no labeled images: the teacher and the students need some")
    paths = [r for r, _ in files["labeled"] if ":" not in r]  # file paths (not NAME:SPLIT:INDEX, not tar members)
    if paths and not any(os.path.exists(r) for r in paths):
        fail(f"{path}: none of its {len(paths)} labeled image files is there (e.g. {paths[0]}); a relative path "
             "is relative to split.json's folder, or to the working directory")
    parts = {part: {r for r, _ in pairs} for part, pairs in files.items()}
    for a, b in [("labeled", "test"), ("labeled", "val"), ("unlabeled", "test")]:
        both = parts.get(a, set()) & parts.get(b, set())
        if both:
            fail(f"{path}: {len(both)} images are both {a} and {b} images, e.g. {sorted(both)[0]}: the table "
                 f"would score on images the models trained on")


def is_segmentation(split):
    """Whether a split's labels are masks (split.json's `dense`)."""
    return bool(split.get("dense"))


def part_refs(split, part):
    """(image references, labels) of one part of a split: labeled, unlabeled, val or test; None if it has no
    such part. A segmentation split's labels are mask references."""
    pairs = split["files"].get(part)
    return None if pairs is None else ([r for r, _ in pairs], [y for _, y in pairs])


def part_dataset(split, part, cfg, train, root="data", substitute=True):
    """An Images dataset of one part of the split with a model's transform (cfg: its data config);
    segmentation: the masks come with the images, through the paired transform (kt.masks)."""
    refs, labels = part_refs(split, part)
    if is_segmentation(split):
        from kt import masks
        return Images(refs, labels, masks.pair_transform(cfg, train), root, substitute,
                      len(split["classes"]), split["reduce_zero_label"])
    return Images(refs, labels, models.transform(cfg, train), root, substitute)


# ---------------------------------------------------------------------------------------------- images
_tars = {}  # (pid, shard) -> (open TarFile, {member name: member}); per pid: forked workers need their own


def open_image(ref, root="data"):
    """An image reference -> PIL RGB: `NAME:SPLIT:INDEX`, a file path, or `SHARD.tar::MEMBER`."""
    from PIL import Image
    if ":" in ref and not os.path.exists(ref):  # NAME:SPLIT:INDEX? an image of a dataset only kt.catalog knows
        from kt import catalog
        by_index = catalog.indexed_ref(ref)
        if by_index:
            name, split, i = by_index
            return _rgb(catalog.indexed(name, split, root)[i][0])
    if "::" in ref:  # a member of a webdataset / img2dataset tar shard
        shard, member = ref.split("::", 1)
        if (os.getpid(), shard) not in _tars:
            if len(_tars) >= 32:  # bound the open files: a pool may have thousands of shards
                for tf, _ in _tars.values():
                    tf.close()
                _tars.clear()
            tf = tarfile.open(shard)  # name -> member once: tarfile's own lookup scans every member
            _tars[os.getpid(), shard] = tf, {m.name: m for m in tf.getmembers()}
        tf, members = _tars[os.getpid(), shard]
        f = tf.extractfile(members[member]) if member in members else None
        if f is None:
            raise FileNotFoundError(f"{ref}: no such file in {shard}")
        ref = io.BytesIO(f.read())
    with Image.open(ref) as im:
        return _rgb(im)


def _rgb(im):
    """A PIL image as 8-bit RGB. 16-bit greys are scaled (convert("RGB") would clip them at 255); 32-bit
    ones have no agreed range and are refused (the caller skips the image and says so)."""
    from PIL import Image
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().astype(np.uint8))
    elif im.mode in ("I", "F"):
        raise ValueError(f"a 32-bit image (mode {im.mode}): save it with 8 or 16 bits per channel")
    return im.convert("RGB")


def hold_out(refs, n):
    """Up to n references (at most 5% of the list), evenly spread over it, kept out of training to measure
    progress on. -> (the rest, the held-out). distill.py and distill_agnostic.py hold out the same ones, and
    finetune.py watches them (its guard)."""
    n = min(n, len(refs) // 20)
    held = set(refs[::max(1, len(refs) // n)][:n]) if n else set()
    return [r for r in refs if r not in held], sorted(held)


def read_transfer_list(path):
    """A transfer list (transfer_set.py): one image reference per line, checked before any work."""
    try:
        with open(path, encoding="utf-8") as f:
            refs = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read transfer list {path} ({e.strerror}): run transfer_set.py first")
    except UnicodeDecodeError:
        fail(f"transfer list {path} is not UTF-8 text: transfer_set.py writes one image reference a line")
    if not refs:
        fail(f"transfer list {path} is empty: nothing to distill on")
    if any("\0" in r for r in refs):
        fail(f"transfer list {path} holds binary data: transfer_set.py writes one image reference a line")
    return refs  # a reference that cannot be opened (a missing file, an index past the end) is skipped later


class Images(torch.utils.data.Dataset):
    """Image references with optional labels -> (transformed image, label, or -1).

    A label that is a mask reference (segmentation) is read with its image, checked against its size and
    num_classes, and both go through the same transform (kt.masks.pair_transform). Items are (index, seed)
    pairs from EpochSampler: the augmentation of each image is seeded by the sampler, so a run is
    reproducible across worker counts and can resume mid-epoch exactly.
    """

    def __init__(self, refs, labels=None, transform=None, root="data", substitute=True, num_classes=None,
                 reduce_zero_label=False):
        self.refs, self.labels, self.transform, self.root = refs, labels, transform, root
        self.substitute = substitute  # an unreadable image: the next one takes its place, or None (evaluation)
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        j = i
        while True:  # a bad file never kills a long run: skip it, say so
            try:
                img = open_image(self.refs[j], self.root)
                label = self.labels[j] if self.labels is not None else -1
                if isinstance(label, str):  # segmentation: the mask travels with its image
                    from kt import masks
                    label = masks.open_mask(label, self.root, self.reduce_zero_label, self.num_classes, img.size)
                break
            except (Exception, SystemExit) as e:  # missing, truncated, not an image, a bomb, a broken tar, an
                # unknown NAME:SPLIT:INDEX dataset (a one-line SystemExit of kt.catalog), ...
                print(f"warning: skipped unreadable image {self.refs[j]} ({first_line(e)})", file=sys.stderr, flush=True)
            if not self.substitute:
                return None
            j = (j + 1) % len(self.refs)
            if j == i:
                raise RuntimeError("no readable image in this list")
        if seed is not None:  # timm's transforms draw from `random`, torchvision's from torch's CPU generator
            random.seed(seed)
            torch.default_generator.manual_seed(seed)  # torch.manual_seed would seed every GPU too: 100x slower
        if isinstance(label, torch.Tensor):
            return self.transform(img, label)  # one random crop and flip for both
        return (self.transform(img) if self.transform else img), label


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
    """A DataLoader with at most one worker per CPU core (more only compete for the same cores)."""
    workers = min(workers, os.cpu_count() or 1)
    cuda = device is not None and device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

"""The second offline task, harder than the demo: 20 classes of shapes, patterns and glyphs on cluttered
backgrounds, and a stand-in VFM pretrained on other classes drawn on the same clutter.

`split.py --dataset demo-clutter` (kt.catalog.indexed loads it through dataset(split)): the demo's 10
classes and 10 more (CLASSES), each object drawn over a colour gradient strewn with random polygons, blobs
and strokes, partly covered by more of them, with more noise than the demo; a pattern fills a rectangle,
not the whole image. 32x32; image i of a split is drawn from (split, i) alone. Splits: train (120 per
class), test (40 per class), unlabeled (a generic pool: the broad kinds and clutter, 1 in 10 a task class).
The stand-in VFM (`python -m kt.clutter --out FILE`) is kt.demo.pretrain on the demo's BROAD_CLASSES (none
a task class) drawn on this clutter: like a real VFM it has seen cluttered scenes, never a task label.
The task exists to measure what the demo cannot (bench/last_step.py, docs/last_step.md): more classes, a
harder background, a BatchNorm ResNet-18 student whose statistics the last step can move.

Run:    python -m kt.clutter --arch resnet18 --per-class 100 --epochs 30 --out runs/demo-clutter/standin_vfm.pth
        python -m kt.clutter --preview runs/demo-clutter/preview.png   (task classes, broad pool, generic pool)
"""
import argparse
import math

import numpy as np
from PIL import Image, ImageDraw

from kt import checkpoints, demo, training
from kt.checks import rate

SIZE = demo.SIZE
NEW = ["diamond", "xcross", "hourglass", "trapezoid", "bullseye", "glyph_C", "glyph_F", "glyph_P", "glyph_U",
       "glyph_6"]  # none of them a broad-pool class (kt.demo.BROAD_CLASSES)
CLASSES = demo.CLASSES + NEW
PER_CLASS = {"train": 120, "test": 40, "unlabeled": 100}  # unlabeled: 100 x 20 = 2000 generic images
SEEDS = {"train": 11, "test": 12, "unlabeled": 13, "broad": 14}  # x 10_000_000 + i: disjoint from the demo's


def background(rng, size=SIZE):
    """A colour gradient in a random direction with 3-6 random polygons, blobs and strokes on it."""
    a, b = rng.integers(0, 256, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0, 1)[..., None]
    img = Image.fromarray(((1 - t) * a + t * b).astype(np.uint8))
    clutter(img, rng, int(rng.integers(3, 7)), size)
    return img


def clutter(img, rng, n, size=SIZE):
    """n pieces of clutter in random colours: small polygons, blobs and strokes, none a class of either pool."""
    d = ImageDraw.Draw(img)
    for _ in range(n):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.06, 0.16) * size
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.polygon([(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.sort(rng.uniform(0, 2 * math.pi, 4))],
                      fill=col)
        elif kind == 1:
            d.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=col)
        else:
            d.line([tuple(p) for p in rng.uniform([cx - 2 * r, cy - 2 * r], [cx + 2 * r, cy + 2 * r], (3, 2))],
                   fill=col, width=int(rng.integers(1, 3)))


def _new_shape(d, kind, cx, cy, r, w):
    """Draw one of the new task shapes (NEW, but the glyphs) of radius r at (cx, cy) onto a mask."""
    if kind == "diamond":  # a rhombus taller than wide (the square's corners point sideways)
        d.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], fill=255)
    elif kind == "xcross":  # the cross turned 45 degrees
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=2 * w)
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=2 * w)
    elif kind == "hourglass":
        d.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx, cy)], fill=255)
        d.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy)], fill=255)
    elif kind == "trapezoid":
        d.polygon([(cx - 0.5 * r, cy - 0.6 * r), (cx + 0.5 * r, cy - 0.6 * r), (cx + r, cy + 0.6 * r),
                   (cx - r, cy + 0.6 * r)], fill=255)
    elif kind == "bullseye":  # a ring around a disc
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(1, w // 2 + 1))
        d.ellipse([cx - 0.35 * r, cy - 0.35 * r, cx + 0.35 * r, cy + 0.35 * r], fill=255)
    else:
        raise ValueError(kind)


def object_mask(kind, rng, size=SIZE):
    """The pixels of one object of `kind` (a task class, a broad-pool class, or polygon/scribble clutter) as an
    L mask: shapes at a random size and position, patterns inside a random rectangle of at least half the side."""
    mask = Image.new("L", (size, size), 0)
    if kind in demo.BROAD_CLASSES or kind.startswith("glyph_"):
        demo.broad_shape(mask, kind, rng, 255, 0, size)
        return mask
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    d = ImageDraw.Draw(mask)
    if kind in NEW:
        _new_shape(d, kind, cx, cy, r, max(1, int(r / 3)))
        return mask
    demo._shape(d, kind, rng, cx, cy, r, size, 255)
    if kind in ("hbars", "vbars", "diagonal", "checker", "dots"):  # a pattern: keep a rectangle of it
        w, h = rng.uniform(0.5, 0.9, 2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        region = Image.new("L", (size, size), 0)
        ImageDraw.Draw(region).rectangle([x0, y0, x0 + w, y0 + h], fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(region)))
    return mask


def draw(kind, rng, size=SIZE):
    """One image: a cluttered background, the object in a colour that stands out from the background's
    mean, 0-2 more pieces of clutter over it, and noise."""
    img = background(rng, size)
    mean = np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(0)
    col = tuple(int(c) for c in (mean + rng.integers(80, 176, 3)) % 256)
    img.paste(col, mask=object_mask(kind, rng, size))
    clutter(img, rng, int(rng.integers(0, 3)), size)
    noise = rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


class Cluttered(demo.Shapes):
    """The demo's dataset with this task's classes, sizes and seeds, each image drawn on clutter: dataset[i]
    -> (PIL image, label); its generic pool (unlabeled) as the demo's, every demo.TASK_EVERY-th a task class."""
    name, all_classes, per_class = "demo-clutter", CLASSES, PER_CLASS
    seeds = {split: SEEDS[split] for split in PER_CLASS}

    def draw(self, kind, rng):
        return draw(kind, rng)


def dataset(split):
    """The task's split, for catalog.load_dataset('demo-clutter', split) and catalog.indexed."""
    return Cluttered(split)


def broad_pool(per_class, offset=0):
    """The stand-in VFM's labeled pool: demo.BROAD_CLASSES x per_class images on this clutter, uint8
    (N, 32, 32, 3) and labels (N,); kt.demo.pretrain's `pool`."""
    n = per_class * len(demo.BROAD_CLASSES)
    labels = np.arange(n) % len(demo.BROAD_CLASSES)
    images = np.stack([np.asarray(draw(demo.BROAD_CLASSES[y], np.random.default_rng(
        SEEDS["broad"] * 10_000_000 + offset + i))) for i, y in enumerate(labels)])
    return images, labels


def preview(path, n=10):
    """A PNG grid: one row per task class, then 3 rows of the broad pool, then 3 of the generic pool."""
    rows = [[Cluttered("train")[c + len(CLASSES) * k][0] for k in range(n)] for c in range(len(CLASSES))]
    broad, _ = broad_pool(1)
    rows += [[Image.fromarray(broad[(r * n + k) % len(broad)]) for k in range(n)] for r in range(3)]
    rows += [[Cluttered("unlabeled")[r * n + k][0] for k in range(n)] for r in range(3)]
    grid = Image.new("RGB", (n * (SIZE + 2), len(rows) * (SIZE + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for k, im in enumerate(row):
            grid.paste(im, (k * (SIZE + 2), r * (SIZE + 2)))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


def get_args_parser():
    p = argparse.ArgumentParser("clutter: pretrain demo-clutter's stand-in foundation model (or ImageNet init) "
                                "on the broad pool drawn on clutter",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="timm model")
    p.add_argument("--img-size", type=int, default=32, help="input resolution; the images are 32px")
    p.add_argument("--per-class", type=int, default=100, help="broad-pool images per class (x %d classes)"
                   % len(demo.BROAD_CLASSES))
    p.add_argument("--epochs", type=int, default=30, help="more makes a stronger stand-in (and a slower run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=rate, default=2e-3, help="AdamW peak lr")
    p.add_argument("--train-seed", type=int, default=0, help="seeds initialisation, augmentation and order")
    p.add_argument("--preview", default=None, help="only write a PNG grid of task, broad and generic images")
    p.add_argument("--out", default="runs/demo-clutter/standin_vfm.pth", help="timm weights file for --weights PATH")
    return p


def main(args):
    if args.preview:
        return preview(args.preview)
    state, acc = demo.pretrain(args.arch, args.img_size, args.per_class, args.epochs, args.batch_size, args.lr,
                               args.train_seed, log=lambda m: training.log(0, m), pool=broad_pool)
    checkpoints.save_checkpoint(state, args.out)
    training.log(0, f"wrote {args.out}: {args.arch} pretrained on {len(demo.BROAD_CLASSES)} broad classes on "
                    f"clutter, held-out top-1 {acc:.1f}% (chance {100 / len(demo.BROAD_CLASSES):.1f}%)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

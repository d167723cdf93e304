"""The offline demo: its generated dataset, and the stand-in foundation model pretrained on the CPU.

`split.py --dataset demo` (kt.catalog.indexed loads it through dataset(split)): 10 classes of shapes and
patterns in random colours, sizes and positions on a noisy background, 32x32; image i of a split is drawn
from (split, i) alone. Splits: train (120 per class), test (40 per class), unlabeled (a generic pool, see pool_kind).
No VFM weights can be downloaded offline, so `python -m kt.demo --out FILE` pretrains a miniature one: a
small timm network trained with labels on BROAD_CLASSES (stars, arrows, spirals, letters, ...: none a task
class). Its weights are an ordinary timm file for `teacher.py --weights FILE`. Nothing else needs this file.

Run:    python -m kt.demo --arch test_resnet --img-size 32 --per-class 100 --epochs 15 --out runs/demo/standin_vfm.pth
        python -m kt.demo --preview runs/demo/preview.png   (a grid: task classes, broad pool, generic pool)
"""
import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from kt import checkpoints, models, training
from kt.checks import rate

SIZE = 32
CLASSES = ["circle", "square", "triangle", "cross", "ring", "hbars", "vbars", "diagonal", "checker", "dots"]
PER_CLASS = {"train": 120, "test": 40, "unlabeled": 200}  # unlabeled: 200 x 10 = 2000 generic images
# The stand-in VFM's pretraining classes: shapes, glyphs and textures that are NOT task classes.
SHAPES = ["star", "pentagon", "hexagon", "arrow", "crescent", "ellipse", "semicircle", "lshape", "tshape",
          "frame", "spiral", "waves", "zigzag", "concentric", "grid", "scatter"]
GLYPHS = list("AEHKMRSWZ") + list("2345789")  # letters and digits that look like no task class
BROAD_CLASSES = SHAPES + [f"glyph_{g}" for g in GLYPHS]
TASK_EVERY = 10  # 1 in 10 generic pool images shows a task shape: web pools hold some, retrieval finds them


def _canvas(rng, size):
    """A random background colour and a contrasting foreground colour; a blank image to draw on."""
    bg = rng.integers(0, 256, 3)
    fg = (bg + rng.integers(80, 176, 3)) % 256
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    return img, ImageDraw.Draw(img), tuple(int(c) for c in fg)


def _noisy(img, rng, size):
    noise = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def draw(kind, rng, size=SIZE):
    """One image of a task class `kind` (or a generic polygon/scribble): random background with noise,
    the shape in a contrasting colour. Broad-pool kinds go to draw_broad."""
    if kind in BROAD_CLASSES:
        return draw_broad(kind, rng, size)
    img, d, col = _canvas(rng, size)
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    _shape(d, kind, rng, cx, cy, r, size, col)
    return _noisy(img, rng, size)


def _shape(d, kind, rng, cx, cy, r, size, col):
    """Draw one task-class shape or pattern of radius r at (cx, cy) with ImageDraw d, in colour col."""
    box = [cx - r, cy - r, cx + r, cy + r]
    w = max(1, int(r / 3))
    if kind == "circle":
        d.ellipse(box, fill=col)
    elif kind == "square":
        d.rectangle(box, fill=col)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif kind == "cross":
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
    elif kind == "ring":
        d.ellipse(box, outline=col, width=w)
    elif kind in ("hbars", "vbars", "diagonal"):
        step = rng.integers(4, 8)
        for t in range(-size, 2 * size, step):
            line = {"hbars": [(0, t), (size, t)], "vbars": [(t, 0), (t, size)],
                    "diagonal": [(t, 0), (t + size, size)]}[kind]
            d.line(line, fill=col, width=max(1, step // 2 - 1))
    elif kind == "checker":
        step = int(rng.integers(4, 9))
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=col)
    elif kind == "dots":
        step = int(rng.integers(5, 9))
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=col)
    else:  # generic pool clutter, none of the task's classes: random polygons and lines
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(int(rng.integers(3, 7)))]
        d.polygon(pts, fill=col) if kind == "polygon" else d.line(pts, fill=col, width=w)


def _regular(cx, cy, r, n, rot, inner=None):
    """Vertices of a regular n-gon, or of an n-pointed star when an `inner` radius is given."""
    if inner is None:
        return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
                for k in range(n)]
    return [(cx + (r if k % 2 == 0 else inner) * math.cos(rot + math.pi * k / n),
             cy + (r if k % 2 == 0 else inner) * math.sin(rot + math.pi * k / n)) for k in range(2 * n)]


def draw_broad(kind, rng, size=SIZE):
    """One image of a broad-pool class: random colours, size, position and rotation, plus noise."""
    img, _, col = _canvas(rng, size)
    broad_shape(img, kind, rng, col, img.getpixel((0, 0)), size)
    return _noisy(img, rng, size)


def broad_shape(img, kind, rng, col, bg, size=SIZE):
    """Draw one broad-pool shape (or any `glyph_X`) onto img, an RGB image or an L mask, in colour col, at a
    random size, position and rotation; bg is the colour that cuts a crescent. (kt.clutter draws on masks.)"""
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.45) * size
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
    rot = rng.uniform(0, 2 * math.pi)
    w = max(1, int(r / 4))
    if kind == "star":
        d.polygon(_regular(cx, cy, r, 5, rot, inner=r * 0.4), fill=col)
    elif kind in ("pentagon", "hexagon"):
        d.polygon(_regular(cx, cy, r, 5 if kind == "pentagon" else 6, rot), fill=col)
    elif kind == "arrow":  # a shaft and a head, pointing in a random direction
        c, s = math.cos(rot), math.sin(rot)
        pts = [(-r, -w), (0.2 * r, -w), (0.2 * r, -2.5 * w), (r, 0), (0.2 * r, 2.5 * w), (0.2 * r, w), (-r, w)]
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=col)
    elif kind == "crescent":  # a disc with an offset disc of background colour cut out
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        ox, oy = 0.5 * r * math.cos(rot), 0.5 * r * math.sin(rot)
        d.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=bg)
    elif kind == "ellipse":  # elongated, unlike the task's circle
        a, b = r, r * rng.uniform(0.3, 0.5)
        horizontal = rng.random() < 0.5
        d.ellipse([cx - (a if horizontal else b), cy - (b if horizontal else a),
                   cx + (a if horizontal else b), cy + (b if horizontal else a)], fill=col)
    elif kind == "semicircle":
        start = float(rng.choice([0, 90, 180, 270]))
        d.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 180, fill=col)
    elif kind in ("lshape", "tshape"):
        c, s = math.cos(rot), math.sin(rot)
        bars = [[(-r, r - 2 * w), (r, r)], [(-r, -r), (-r + 2 * w, r)]] if kind == "lshape" else \
               [[(-r, -r), (r, -r + 2 * w)], [(-w, -r), (w, r)]]
        for (x0, y0), (x1, y1) in bars:
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=col)
    elif kind == "frame":  # a square outline
        d.rectangle([cx - r, cy - r, cx + r, cy + r], outline=col, width=w)
    elif kind == "spiral":
        turns = rng.uniform(1.5, 2.5)
        pts = [(cx + r * t * math.cos(rot + 2 * math.pi * turns * t), cy + r * t * math.sin(rot + 2 * math.pi *
                turns * t)) for t in np.linspace(0.05, 1, 60)]
        d.line(pts, fill=col, width=max(1, w // 2 + 1))
    elif kind in ("waves", "zigzag"):  # periodic curves across the image, in a random orientation
        step, amp = rng.uniform(5, 9), rng.uniform(1.5, 3.5)
        freq, vertical = rng.uniform(0.3, 0.6), rng.random() < 0.5
        xs = np.arange(-2, size + 3)
        for t in np.arange(-step, size + step, step):
            wave = np.sin(freq * xs) if kind == "waves" else 2 / math.pi * np.arcsin(np.sin(freq * xs))
            ys = t + amp * wave
            d.line(list(zip(ys, xs) if vertical else zip(xs, ys)), fill=col, width=2)
    elif kind == "concentric":  # nested squares (the task's ring is one round outline)
        for k in range(1, 5):
            rr = r * k / 4
            d.rectangle([cx - rr, cy - rr, cx + rr, cy + rr], outline=col, width=1)
    elif kind == "grid":  # thin lines both ways (the task's checker fills cells)
        step = int(rng.integers(5, 9))
        for t in range(int(rng.integers(0, step)), size, step):
            d.line([(t, 0), (t, size)], fill=col)
            d.line([(0, t), (size, t)], fill=col)
    elif kind == "scatter":  # random small dots (the task's dots lie on a lattice)
        for x, y in rng.uniform(0, size, (int(rng.integers(12, 25)), 2)):
            d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=col)
    elif kind.startswith("glyph_"):
        font = ImageFont.load_default(size=int(rng.integers(16, 26)))
        glyph = Image.new("L", (size, size), 0)
        ImageDraw.Draw(glyph).text((size / 2, size / 2), kind[6:], fill=255, font=font, anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR,
                             translate=tuple(rng.uniform(-5, 5, 2)))
        img.paste(col, mask=glyph)
    else:
        raise ValueError(kind)


def pool_kind(i, classes=CLASSES):
    """What the generic pool's image i shows: mostly broad-pool kinds and random clutter (like a web
    crawl), and every TASK_EVERY-th image a task shape (a web pool holds a few; nobody labeled them)."""
    if i % TASK_EVERY == 0:
        return classes[(i // TASK_EVERY) % len(classes)]
    kinds = BROAD_CLASSES + ["polygon", "scribble"]
    return kinds[(i * 7919) % len(kinds)]


class Shapes:
    """dataset[i] -> (PIL image, label); `.classes`, `.targets` as torchvision datasets have them. Image i of
    a split is drawn from (split, i) alone. A subclass (kt.clutter) changes what the class attributes say."""
    name, all_classes, per_class, seeds = "demo", CLASSES, PER_CLASS, {"train": 1, "test": 2, "unlabeled": 3}

    def __init__(self, split="train"):
        if split not in self.per_class:
            raise SystemExit(f"error: the {self.name} dataset has splits {list(self.per_class)}, not '{split}'")
        self.split, self.classes = split, list(self.all_classes)
        n = self.per_class[split] * len(self.classes)
        self.targets = [i % len(self.classes) for i in range(n)] if split != "unlabeled" else [-1] * n

    def __len__(self):
        return len(self.targets)

    def draw(self, kind, rng):
        return draw(kind, rng)

    def __getitem__(self, i):
        rng = np.random.default_rng(self.seeds[self.split] * 10_000_000 + i)
        kind = self.classes[self.targets[i]] if self.split != "unlabeled" else pool_kind(i, self.classes)
        return self.draw(kind, rng), self.targets[i]


def dataset(split):
    """The demo's split, for catalog.load_dataset('demo', split) and catalog.indexed."""
    return Shapes(split)


# ---------------------------------------------------------------------------- the segmentation demo
SCENE_SIZE = 64
SCENE_CLASSES = ["background", "circle", "square", "triangle", "cross", "ring", "checker", "hbars", "dots"]
PATTERNS = ("checker", "hbars", "dots")  # drawn inside a rectangle, which is the region labeled
SCENES = {"train": 600, "test": 150}


def scene(seed, size=SCENE_SIZE):
    """A scene of `--dataset demo-seg`: 1-3 shapes and patterned patches of SCENE_CLASSES, each in its own
    colour, on a noisy background. -> (PIL image, mask uint8 (size, size) of class indices; 0 background)."""
    rng = np.random.default_rng(seed)
    img, _, _ = _canvas(rng, size)
    bg = np.asarray(img.getpixel((0, 0)))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):  # later objects cover earlier ones, in the mask too
        c = int(rng.integers(1, len(SCENE_CLASSES)))
        r = rng.uniform(0.14, 0.28) * size
        cx, cy = rng.uniform(r, size - r, 2)
        ink = Image.new("L", (size, size), 0)
        _shape(ImageDraw.Draw(ink), SCENE_CLASSES[c], rng, cx, cy, r, size, 255)
        region = ink
        if SCENE_CLASSES[c] in PATTERNS:  # a pattern fills the canvas: keep a rectangle of it
            region = Image.new("L", (size, size), 0)
            ImageDraw.Draw(region).rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
            ink = Image.fromarray(np.minimum(np.asarray(ink), np.asarray(region)))
        img.paste(tuple(int(v) for v in (bg + rng.integers(80, 176, 3)) % 256), mask=ink)
        mask[np.asarray(region) > 0] = c
    return _noisy(img, rng, size), mask


class Scenes:
    """demo-seg's split: dataset[i] -> (PIL image, mask); `.mask(i)`; `dense`: its labels are masks."""
    dense = True

    def __init__(self, split="train"):
        if split not in SCENES:
            raise SystemExit(f"error: the demo-seg dataset has splits {list(SCENES)}, not '{split}'")
        self.split, self.classes, self.targets = split, list(SCENE_CLASSES), [-1] * SCENES[split]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return scene({"train": 5, "test": 6}[self.split] * 10_000_000 + i)

    def mask(self, i):
        return self[i][1]


def scenes(split):
    """The segmentation demo's split, for catalog.load_dataset('demo-seg', split)."""
    return Scenes(split)


def broad_pool(per_class, offset=0):
    """The labeled broad pool, BROAD_CLASSES x per_class images: uint8 (N, 32, 32, 3) and labels (N,).
    Seeds 4e7 + offset + i: disjoint from every task split and from the generic pool."""
    n = per_class * len(BROAD_CLASSES)
    labels = np.arange(n) % len(BROAD_CLASSES)
    images = np.stack([np.asarray(draw_broad(BROAD_CLASSES[y], np.random.default_rng(40_000_000 + offset + i)))
                       for i, y in enumerate(labels)])
    return images, labels


# ------------------------------------------------------------------------------ the stand-in pretraining
def augment(x, gen):
    """Cheap batch augmentation on the CPU, x (B, 3, 32, 32) in [0, 1]: a random shift of up to 4 pixels
    (reflect-pad, crop), a horizontal flip for half the batch, and a random colour-channel order."""
    b = len(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, b), generator=gen)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x[:, torch.randperm(3, generator=gen)]


def pretrain(arch, img_size, per_class, epochs, batch_size, lr, seed, log=print, pool=broad_pool):
    """Supervised pretraining of `arch` on the broad pool (`pool`: broad_pool, or kt.clutter's on cluttered
    backgrounds). Returns (timm state dict, held-out top-1 %).

    The images are drawn once into memory (a few seconds) and batches are augmented as tensors: no
    DataLoader, no PIL per step, so a few thousand images x tens of epochs fit in about a minute."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, _, cfg = models.create_model(arch, len(BROAD_CLASSES), img_size=img_size)
    images, labels = pool(per_class)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    y_all = torch.from_numpy(labels)
    val_x, val_y = pool(10, offset=5_000_000)
    val_x = torch.from_numpy(val_x).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = len(x_all) // batch_size
    total = epochs * per_epoch
    t0 = time.time()
    log(f"pretrain {arch} at {img_size or SIZE}px on {len(x_all)} images of {len(BROAD_CLASSES)} broad "
        f"classes, {total} steps")
    model.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        for g in opt.param_groups:
            g["lr"] = lr * training.cosine_lr(step, total, max(1, total // 20))
        logits = model(models.to_model_input(augment(x_all[idx], gen), cfg))  # (B, len(BROAD_CLASSES))
        loss = F.cross_entropy(logits, y_all[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % per_epoch == 0 and ((step + 1) // per_epoch) % max(1, epochs // 5) == 0:
            log(f"  epoch {(step + 1) // per_epoch}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    with torch.inference_mode():
        pred = model(models.to_model_input(val_x, cfg)).argmax(-1)
    return model.state_dict(), 100 * float((pred == torch.from_numpy(val_y)).float().mean())


def preview(path, n=10):
    """A PNG grid: one row per task class, then broad-pool rows, then generic-pool rows."""
    rows = [[Shapes("train")[c + len(CLASSES) * k][0] for k in range(n)] for c in range(len(CLASSES))]
    rows += [[draw_broad(BROAD_CLASSES[(r * n + k) % len(BROAD_CLASSES)], np.random.default_rng(r * n + k))
              for k in range(n)] for r in range(3)]
    rows += [[Shapes("unlabeled")[r * n + k][0] for k in range(n)] for r in range(3)]
    rows = [[im.resize((SIZE, SIZE)) for im in row] for row in rows]
    grid = Image.new("RGB", (n * (SIZE + 2), len(rows) * (SIZE + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for k, im in enumerate(row):
            grid.paste(im, (k * (SIZE + 2), r * (SIZE + 2)))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


def write_folder(root):
    """The demo's train and test images as PNG files, ROOT/{train,test}/<class>/NNNN.png (kt_in_one_file.py
    reads image folders)."""
    import os
    for split in ("train", "test"):
        ds = Shapes(split)
        for c in ds.classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i in range(len(ds)):
            image, label = ds[i]
            image.save(os.path.join(root, split, ds.classes[label], f"{i:04d}.png"))
    training.log(0, f"wrote the demo's images to {root}/train/<class>/ and {root}/test/<class>/")


def get_args_parser():
    p = argparse.ArgumentParser("demo: pretrain the demo's stand-in foundation model (or ImageNet init) "
                                "on the broad generated pool", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="test_resnet", help="timm model (CNNs learn this pool in a minute; "
                   "test_vit's 16px patches see a 2x2 grid of a 32px image and learn slowly)")
    p.add_argument("--img-size", type=int, default=32, help="input resolution; the images are 32px")
    p.add_argument("--per-class", type=int, default=100, help="broad-pool images per class (x %d classes)"
                   % len(BROAD_CLASSES))
    p.add_argument("--epochs", type=int, default=15, help="more makes a stronger stand-in (and a slower demo)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=rate, default=2e-3, help="AdamW peak lr")
    p.add_argument("--train-seed", type=int, default=0, help="seeds initialisation, augmentation and order")
    p.add_argument("--preview", default=None, help="only write a PNG grid of task, broad and generic images")
    p.add_argument("--folder", default=None, help="only write the task's train and test images into this folder")
    p.add_argument("--out", default="runs/demo/standin_vfm.pth", help="timm weights file for --weights PATH")
    return p


def main(args):
    if args.preview:
        return preview(args.preview)
    if args.folder:
        return write_folder(args.folder)
    state, acc = pretrain(args.arch, args.img_size, args.per_class, args.epochs, args.batch_size, args.lr,
                          args.train_seed, log=lambda m: training.log(0, m))
    checkpoints.save_checkpoint(state, args.out)
    training.log(0, f"wrote {args.out}: {args.arch} pretrained on {len(BROAD_CLASSES)} broad classes, "
                    f"held-out top-1 {acc:.1f}% (chance {100 / len(BROAD_CLASSES):.1f}%)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

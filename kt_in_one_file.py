"""The method in one file: task-oriented knowledge transfer from a vision foundation model (VFM) to a small
model (Vemulapalli et al., ICML 2024, arXiv 2311.18237), for classification, in one process.

With a few labeled images of a new task:
  1. teacher:  finetune the VFM plus a linear head on the labels, with layer-wise lr decay;
  2. distill:  a small student matches the finetuned teacher's class probabilities on the task's unlabeled
               images, both models seeing the same augmented view;
  3. finetune: the student on the labels;
  4. evaluate: test top-1 of the teacher, the student (KT) and the student trained on the labels alone.
The scripts beside this one (split.py, teacher.py, ... evaluate.py; run.sh runs them) are the same method,
resumable and at scale: torchrun, retrieval from web pools, segmentation, baselines, export. This file is
the method alone, to read and to copy: torch, timm and numpy, and its own settings.

Reads:  DATA/train/<class>/*, DATA/test/<class>/* (any image files; the rest of train/ is unlabeled);
        the VFM's weights (the hub, or a local timm file).
Writes: nothing but the table (stdout).
Run:    python -m kt.demo --folder runs/one_file/data          (the demo's images, a few seconds)
        python -m kt.demo --out runs/one_file/standin_vfm.pth   (the demo's stand-in VFM, about a minute)
        python kt_in_one_file.py                                (the demo: about a minute on 2 CPU cores)
        python kt_in_one_file.py --data /data/eurosat --teacher vit_large_patch14_dinov2.lvd142m \
            --teacher-weights hub --student fastvit_t8 --img-size 224 --workers 8
"""
import argparse
import glob
import math
import os

import numpy as np
import timm
import timm.data
import timm.optim
import torch
import torch.nn.functional as F
from PIL import Image

# ------------------------------------------------------------------------------------------- settings
# The demo's (offline, CPU, the images and stand-in VFM made as in Run above); every one is also a flag.
SETTINGS = dict(
    data="runs/one_file/data",          # DATA/train/<class>/*, DATA/test/<class>/*
    shots=10,                           # labeled images per class; the rest of train/ is the transfer set
    seed=0,                             # picks the labeled images and seeds training
    teacher="test_resnet",              # the VFM, a timm name: vit_large_patch14_dinov2.lvd142m, ...
    teacher_weights="runs/one_file/standin_vfm.pth",  # a local timm weights file, or hub
    student="test_resnet",              # the small model to deploy: fastvit_t8, mobilenetv3_large_100, ...
    img_size=32,                        # both models' input resolution (224 on real images)
    teacher_epochs=30, teacher_lr=1e-3, head_lr=3e-3, layer_decay=0.75,  # the VFM's top block at teacher_lr
    distill_epochs=15, distill_lr=1e-3, temperature=1.0, min_scale=0.25,  # smallest crop: 32px shows little
    finetune_epochs=20, finetune_lr=2e-4, scratch_lr=1e-3,  # a low lr keeps what distillation gave
    batch_size=32, distill_batch_size=64, weight_decay=0.05, smoothing=0.1, workers=0,
    amp="auto",                         # bf16 autocast: auto (on a GPU), bf16 (on any device), or off
)


# ---------------------------------------------------------------------------------- the lesson: KD
def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """Hinton et al.'s loss, as distill.py's: T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged
    over the batch, in float32 (a bf16 log-softmax loses the small probabilities that carry the knowledge)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def distill_step(student, teacher, x, s_cfg, t_cfg, temperature):
    """The KD loss on one batch of views x (B, 3, H, W) in [0, 1]: each model sees the same view, resized and
    normalised its own way (Beyer et al. 2022: a consistent teacher); the teacher is frozen."""
    with torch.no_grad():
        teacher_logits = teacher(to_input(x, t_cfg))
    return kd_loss(student(to_input(x, s_cfg)), teacher_logits, temperature)


# ------------------------------------------------------------------------------------------- the data
def image_folder(root):
    """ROOT/<class>/<image> -> (paths, labels, class names), classes in sorted order."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    pairs = [(p, y) for y, c in enumerate(classes) for p in sorted(glob.glob(os.path.join(root, c, "*")))]
    if not pairs:
        raise SystemExit(f"error: no images in {root}/<class>/ (make the demo's with python -m kt.demo --folder)")
    return [p for p, _ in pairs], [y for _, y in pairs], classes


def label_budget(labels, shots, seed):
    """`shots` images per class, drawn from `seed`: (labeled, unlabeled) index lists."""
    rng, labels = np.random.default_rng(seed), np.asarray(labels)
    labeled = sorted(i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:shots])
    return labeled, sorted(set(range(len(labels))) - set(labeled))


class Images(torch.utils.data.Dataset):
    """(path, label) pairs -> (transformed image, label)."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def loader(paths, labels, transform, args, train=True, batch_size=None):
    return torch.utils.data.DataLoader(
        Images(paths, labels, transform), batch_size=batch_size or args.batch_size, shuffle=train,
        drop_last=train and len(paths) > (batch_size or args.batch_size), num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed), pin_memory=torch.cuda.is_available())


def transform(cfg, train, normalize=True, min_scale=0.08):
    """timm's transform for a model's data config; normalize=False keeps pixels in [0, 1] (distillation)."""
    mean, std = (cfg["mean"], cfg["std"]) if normalize else ((0.0,) * 3, (1.0,) * 3)
    kw = dict(scale=(min_scale, 1.0), hflip=0.5, color_jitter=0.4) if train else dict(crop_pct=cfg["crop_pct"])
    return timm.data.create_transform(cfg["input_size"], is_training=train, interpolation=cfg["interpolation"],
                                      mean=mean, std=std, **kw)


def to_input(x, cfg):
    """[0, 1] views (B, 3, H, W) -> a model's input: its resolution, mean and std."""
    if tuple(x.shape[-2:]) != tuple(cfg["input_size"][1:]):
        x = F.interpolate(x, size=cfg["input_size"][1:], mode="bicubic", align_corners=False, antialias=True)
    mean, std = (torch.tensor(cfg[k], device=x.device).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std


# ------------------------------------------------------------------------------------------ the models
def create(arch, num_classes, weights, img_size):
    """A timm model with a new `num_classes` head -> (model, its data config). weights: none, hub, or a local
    timm file (timm loads it as it would the hub's, dropping a classifier of another class count)."""
    kw = dict(pretrained=weights != "none", num_classes=num_classes)
    if weights not in ("none", "hub"):
        kw["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        model = timm.create_model(arch, img_size=img_size, **kw)
    except TypeError:  # a CNN takes any input size
        model = timm.create_model(arch, **kw)
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, dict(cfg, input_size=(3, img_size, img_size))


def teacher_optimizer(model, args):
    """AdamW with layer-wise lr decay (the BEiT/MAE recipe): block i of L at teacher_lr * layer_decay^(L - i),
    so the lower blocks keep the VFM's general features; the new head at head_lr."""
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for g in timm.optim.param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay):
        for params, scale in (([p for p in g["params"] if id(p) not in head], g["lr_scale"]),
                              ([p for p in g["params"] if id(p) in head], args.head_lr / args.teacher_lr)):
            groups += [dict(g, params=params, lr_scale=scale)] if params else []
    return torch.optim.AdamW(groups, lr=args.teacher_lr, fused=True)


def precision(device, amp):
    """Autocast for every forward pass: bf16 on a GPU (amp auto), or as asked on any device. bf16 keeps
    float32's range, so no loss scaling; the losses compute in float32."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def fit(model, optimizer, batches, epochs, step_loss, device, autocast, warmup=0.1):
    """`epochs` passes over `batches` on `device`, lr = peak * lr_scale * (linear warmup, then cosine to 0).
    The loss is read back once, at the end: the GPU never waits for the host in between."""
    total = epochs * len(batches)
    peaks = [g["lr"] * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    model.train()
    for step, (x, y) in enumerate(b for _ in range(epochs) for b in batches):
        w = max(1, int(warmup * total))
        scale = (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
        for g, peak in zip(optimizer.param_groups, peaks):
            g["lr"] = peak * scale
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def top1(model, batches, device, autocast):
    model.eval()
    with autocast():
        hits = [(model(x.to(device)).argmax(-1).cpu() == y).float() for x, y in batches]
    return 100 * torch.cat(hits).mean().item()


def finetune(model, cfg, labeled, args, lr, device, autocast):
    """Cross-entropy on the labeled images."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    batches = loader(*labeled, transform(cfg, train=True), args)
    return fit(model, optimizer, batches, args.finetune_epochs,
               lambda x, y: F.cross_entropy(model(x), y, label_smoothing=args.smoothing), device, autocast)


# ----------------------------------------------------------------------------------------- the method
def main(args):
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the paper's: a GPU, with AMP
    autocast = precision(device, args.amp)
    paths, labels, classes = image_folder(os.path.join(args.data, "train"))
    test_paths, test_labels, test_classes = image_folder(os.path.join(args.data, "test"))
    if test_classes != classes:
        raise SystemExit(f"error: test/ has classes {test_classes}, train/ {classes}")
    chosen, rest = label_budget(labels, args.shots, args.seed)
    labeled = [paths[i] for i in chosen], [labels[i] for i in chosen]
    unlabeled = [paths[i] for i in rest]
    print(f"{len(classes)} classes: {len(chosen)} labeled, {len(rest)} unlabeled, {len(test_paths)} test images")

    # 1. The teacher: the VFM finetuned on the labels.
    teacher, t_cfg = create(args.teacher, len(classes), args.teacher_weights, args.img_size)
    teacher.to(device)
    loss = fit(teacher, teacher_optimizer(teacher, args), loader(*labeled, transform(t_cfg, train=True), args),
               args.teacher_epochs, lambda x, y: F.cross_entropy(teacher(x), y, label_smoothing=args.smoothing),
               device, autocast)
    print(f"teacher {args.teacher}: finetuned, loss {loss:.3f}")
    teacher.eval().requires_grad_(False)

    # 2. Distillation on the unlabeled images: one augmented view per image, at the larger resolution, in [0, 1].
    student, s_cfg = create(args.student, len(classes), "none", args.img_size)
    student.to(device)
    view = dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"]))
    views = loader(unlabeled, [-1] * len(unlabeled), transform(view, True, normalize=False, min_scale=args.min_scale),
                   args, batch_size=args.distill_batch_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.distill_lr, weight_decay=args.weight_decay, fused=True)
    loss = fit(student, optimizer, views, args.distill_epochs,
               lambda x, _: distill_step(student, teacher, x, s_cfg, t_cfg, args.temperature), device, autocast,
               warmup=0.05)
    print(f"student {args.student}: distilled, KD loss {loss:.3f}")

    # 3. The student finetuned on the labels; the baseline: the same student trained on the labels alone.
    finetune(student, s_cfg, labeled, args, args.finetune_lr, device, autocast)
    scratch, _ = create(args.student, len(classes), "none", args.img_size)
    finetune(scratch.to(device), s_cfg, labeled, args, args.scratch_lr, device, autocast)

    # 4. Test top-1.
    table = {name: top1(model, loader(test_paths, test_labels, transform(cfg, train=False), args, train=False),
                        device, autocast)
             for name, model, cfg in (("teacher", teacher, t_cfg), ("kt", student, s_cfg), ("scratch", scratch, s_cfg))}
    print("| model | top-1 |\n|---|---|\n" + "".join(f"| {n} | {v:.1f} |\n" for n, v in table.items()), end="")
    return table


def get_args_parser():
    p = argparse.ArgumentParser("kt_in_one_file: the method in one file (settings: the top of the file)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in SETTINGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=" ")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Step 6, evaluation: every model on the task's test split, side by side with what it cost.

For each checkpoint: top-1 and mean per-class accuracy (the metric for unbalanced test sets), parameters,
GFLOPs per image, images/s on this device, and the training it took (steps x batch per stage, wall time).
Runs named NAME@SEED are one row: mean ± std over the seeds.

Reads:  checkpoints (any step's), the dataset's test split.
Writes: results.json ({rows: {name: metrics}, runs: {...}}), results.md (the table, also printed) and
        results.png (a bar chart, when matplotlib is installed).
Run:    python evaluate.py --dataset eurosat teacher=runs/eurosat/teacher.pt kt=runs/eurosat/student_kt_ft.pt
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoints
import data
import models
import training
from checks import fail, nonnegative, positive


@torch.inference_mode()
def accuracy(model, loader, num_classes, device, autocast):
    """Top-1 and mean per-class accuracy (each class's recall, averaged), in percent, and the number of
    test images they count (an unreadable one is left out, never replaced by another)."""
    correct, count = np.zeros(num_classes), np.zeros(num_classes)
    for batch in loader:
        if batch is None:  # no readable image in this batch
            continue
        x, y = batch
        with autocast():
            pred = model(x.to(device, non_blocking=True)).argmax(-1).cpu()
        np.add.at(count, y.numpy(), 1)
        np.add.at(correct, y.numpy(), (pred == y).numpy())
    seen = count > 0
    if not seen.any():
        fail("no test image could be read")
    return 100 * correct.sum() / count.sum(), 100 * float(np.mean(correct[seen] / count[seen])), int(count.sum())


def readable(batch):
    """Collate the images that could be read (data.Images gives None for the others)."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


@torch.inference_mode()
def speed(model, cfg, device, autocast, batch=64, iters=10):
    """GFLOPs per image (torch's FLOP counter: 2 per multiply-add) and images/s on `device`."""
    x = torch.randn(1, *cfg["input_size"], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    x = x.expand(batch, -1, -1, -1).contiguous()
    for _ in range(2):  # warm up kernels and caches
        with autocast():
            model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        with autocast():
            model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return counter.get_total_flops() / 1e9, batch * iters / (time.perf_counter() - t)


def summarize(results):
    """Group runs named NAME@SEED into one row per NAME: mean and std of the accuracies over seeds."""
    rows = {}
    for name, r in results.items():
        rows.setdefault(name.split("@")[0], []).append(r)
    table = {}
    for name, runs in rows.items():
        row = dict(runs[0], seeds=len(runs))
        for k in ("top1", "mean_class", "train_wall_s"):
            row[k], row[k + "_std"] = float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))
        table[name] = row
    return table


def markdown(table):
    def acc(r, k):
        return f"{r[k]:.1f} ± {r[k + '_std']:.1f}" if r["seeds"] > 1 else f"{r[k]:.1f}"
    head = ("| model | arch | top-1 | mean/class | params (M) | GFLOPs | img/s | training (steps x batch) "
            "| train wall (s) |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {n} | {r['arch']} | {acc(r, 'top1')} | "
            f"{acc(r, 'mean_class')} | {r['params_m']:.2f} | {r['gflops']:.3f} | {r['images_per_s']:.0f} | "
            f"{r['training']} | {r['train_wall_s']:.0f} |" for n, r in table.items()]
    bad = max(r["unreadable_test_images"] for r in table.values())
    note = f"\n{bad} test images could not be read and are left out of every score.\n" if bad else ""
    return head + "\n".join(rows) + "\n" + note


def bar_chart(table, path):
    """A PNG of top-1 per row (with std over seeds) when matplotlib is installed; it is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(table) + 2, 3.5))
    ax.bar(list(table), [r["top1"] for r in table.values()], yerr=[r["top1_std"] for r in table.values()],
           capsize=4, color="tab:blue")
    ax.set_ylabel("test top-1 (%)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def get_args_parser():
    p = argparse.ArgumentParser(description="evaluate: test accuracy, size, speed and training cost of checkpoints",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="NAME=PATH pairs, e.g. teacher=runs/demo/teacher.pt; "
                   "kt@0=... kt@1=... are seeds of one row")
    p.add_argument("--dataset", default="demo", help="see teacher.py --help")
    p.add_argument("--data-root", default="data")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--workers", type=nonnegative, default=4)
    p.add_argument("--out", default="runs/demo/results.json", help="also writes the .md table beside it")
    return p


def main(args):
    checkpoints.check_writable(args.out)
    device, _, _ = training.setup(0)
    autocast, _ = training.amp(device)
    pairs = [c.partition("=") for c in args.checkpoints]
    if any(not name or not sep or not path for name, sep, path in pairs):
        fail("checkpoints are given as NAME=PATH, e.g. kt=runs/demo/student_kt_ft.pt")
    names = [name for name, _, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        fail(f"{', '.join(twice)} named twice: give each checkpoint its own NAME (NAME@SEED for seeds of a row)")
    paths = {name: path for name, _, path in pairs}
    ckpts = {name: checkpoints.load_checkpoint(path, kinds=("teacher", "student")) for name, path in paths.items()}
    refs, labels = data.split_refs(args.dataset, "test", root=args.data_root)
    classes = data.load_dataset(args.dataset, "test", args.data_root)[2]
    results = {}
    for name, ckpt in ckpts.items():
        if ckpt["classes"] != classes:
            fail(f"{name} was trained on {len(ckpt['classes'])} classes, {args.dataset} has {len(classes)}")
        model = models.load_model(ckpt).to(device).eval()
        images = data.Images(refs, labels, models.transform(ckpt["data_config"], train=False), args.data_root,
                             substitute=False)
        loader = torch.utils.data.DataLoader(images, args.batch_size, num_workers=min(args.workers, os.cpu_count()),
                                             collate_fn=readable)
        top1, mean_class, counted = accuracy(model, loader, len(classes), device, autocast)
        if counted < len(refs):
            training.log(0, f"warning: {len(refs) - counted} of {len(refs)} test images could not be read; "
                            f"{name} is scored on the other {counted}")
        gflops, ips = speed(model, ckpt["data_config"], device, autocast)
        cost = ckpt.get("cost", [])
        results[name] = dict(
            arch=ckpt["recipe"]["arch"], top1=top1, mean_class=mean_class,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6, gflops=gflops, images_per_s=ips,
            training=" + ".join(f"{c['step']} {c['steps']}x{c['batch']}" for c in cost) or "none",
            train_images=sum(c["images"] for c in cost), train_wall_s=sum(c["wall_s"] for c in cost),
            test_images=counted, unreadable_test_images=len(refs) - counted, device=str(device),
            checkpoint=paths[name])
        training.log(0, f"{name}: top-1 {top1:.2f}  mean/class {mean_class:.2f}")
    table = summarize(results)
    md, stem = markdown(table), os.path.splitext(args.out)[0]
    checkpoints.atomic_write(args.out, lambda f: f.write(json.dumps(dict(rows=table, runs=results), indent=1).encode()))
    checkpoints.atomic_write(stem + ".md", lambda f: f.write(md.encode()))
    if bar_chart(table, stem + ".png"):
        training.log(0, f"wrote {stem}.png")
    print(md)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())

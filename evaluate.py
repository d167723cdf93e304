"""Step 6, evaluation: every model on the task's test split, side by side with what it cost.

For each checkpoint: top-1 and mean per-class accuracy (the metric for unbalanced test sets), or for
segmentation mIoU, pixel accuracy and per-class IoU (in the JSON), beside parameters,
GFLOPs per image, images/s on this device, and the training it took (steps x batch per stage, wall time).
Runs named NAME@SEED are one row: mean ± std over the seeds.

Reads:  checkpoints (any step's), the test (and val) images of split.json (split.py).
Uses:   kt.data, kt.models, kt.training, kt.progress (its metrics files), kt.charts; kt.checkpoints,
        kt.claims, kt.checks; where used: kt.masks, kt.segmenters, kt.clip_towers.
Writes: results.json ({rows: {name: metrics}, runs: {...}}), results.md (the table, also printed),
        results.png (a bar chart) and results_curves.png (each row's training curves, from its steps'
        OUT.metrics.jsonl). Speed is timed in the deployed form (models.deployed).
Run:    python evaluate.py --split runs/eurosat/split.json teacher=runs/eurosat/teacher.pt \
            kt=runs/eurosat/student_kt_ft.pt
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kt import checkpoints, claims, data, models, training
from kt.charts import bar_chart, curves_chart
from kt.checks import fail, nonnegative, positive
from kt.progress import read_metrics


@torch.inference_mode()
def predict(model, loader, device, autocast, num_classes, ignore=None):
    """Over the images that could be read (an unreadable one is left out, never replaced by another):
    the confusion matrix (C, C) of true x predicted classes, the predicted classes (classification; None for
    segmentation) and the number of images. Segmentation counts pixels, each mask at its own resolution
    (the logits upsampled to it); pixels marked `ignore` (masks.IGNORE) are not counted."""
    confusion, predicted, n = torch.zeros(num_classes ** 2, dtype=torch.long, device=device), [], 0

    def count(true, guess):
        confusion.add_(torch.bincount(true * num_classes + guess, minlength=num_classes ** 2))
    for batch in training.bar(loader, unit="batch", leave=False):
        if batch is None:  # no readable image in this batch
            continue
        x, y = batch
        with autocast():
            logits = model(x.to(device, non_blocking=True))
        n += len(x)
        if logits.dim() == 2:
            predicted.append(logits.argmax(-1).cpu())
            count(y.to(device), predicted[-1].to(device))
            continue
        for z, mask in zip(logits, y):  # one image at a time: C x H x W floats each
            mask = mask.to(device)
            guess = F.interpolate(z[None].float(), size=mask.shape, mode="bilinear", align_corners=False)[0].argmax(0)
            keep = mask != ignore
            count(mask[keep], guess[keep])
    if not n:
        fail("no test image could be read")
    predicted = torch.cat(predicted).numpy() if predicted else None
    return confusion.view(num_classes, num_classes).cpu().numpy(), predicted, n


def scores(confusion, segmentation, classes):
    """Classification: top-1 and mean per-class accuracy (each class's recall, averaged over the classes in the
    test set), in percent. Segmentation, as mmsegmentation reports it: mIoU (IoU = intersection / union per
    class, averaged over the classes present in the masks or predictions), pixel accuracy, mean per-class
    accuracy, and each class's IoU."""
    hits, true, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, iou = hits / true, hits / (true + predicted - hits)
    accuracy, mean_class = 100 * hits.sum() / confusion.sum(), 100 * np.nanmean(recall)
    if not segmentation:
        return dict(top1=float(accuracy), mean_class=float(mean_class))
    return dict(miou=float(100 * np.nanmean(iou)), pixel_acc=float(accuracy), mean_class=float(mean_class),
                per_class_iou={c: None if np.isnan(v) else round(float(100 * v), 2) for c, v in zip(classes, iou)})


def collate_readable(batch):
    """Collate the images that could be read (data.Images gives None for the others); masks of different
    sizes stay a list."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    labels = [y for _, y in batch]
    if isinstance(labels[0], torch.Tensor) and any(y.shape != labels[0].shape for y in labels):
        return torch.stack([x for x, _ in batch]), labels
    return torch.utils.data.default_collate(batch)


@torch.inference_mode()
def gflops(model, cfg, device):
    """GFLOPs per image (torch's FLOP counter: 2 per multiply-add). The model's parameters stop asking for
    gradients first: the counter hooks every input that does, and an attention pool (SigLIP 2, PE-Core) feeds
    its latent, a parameter, to a layer as input, which the hook cannot follow in inference mode."""
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *cfg["input_size"], device=device))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def images_per_second(model, cfg, device, autocast, batch, iters):
    """Throughput of the forward pass on `device`: 2 warm-up batches, then `iters` timed ones."""
    x = torch.randn(batch, *cfg["input_size"], device=device)
    for i in range(2 + iters):
        if i == 2:  # kernels and caches are warm: start the clock
            if device.type == "cuda":  # CUDA only
                torch.cuda.synchronize()
            t = time.perf_counter()
        with autocast():
            model(x)
    if device.type == "cuda":  # CUDA only
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t)


def costs(model, ckpt, device, autocast, speed_batch=None):
    """What a model costs to run, in the form a deployment runs (models.deployed: counted and timed folded),
    and what it cost to train (the checkpoint's stages)."""
    deployed, folded = models.deployed(model)
    cfg, batch = ckpt["data_config"], 64 if device.type == "cuda" else 8
    batch, iters = batch if speed_batch is None else speed_batch, 10 if device.type == "cuda" else 3
    ips = images_per_second(deployed, cfg, device, autocast, batch, iters) if batch else None
    ips_train = images_per_second(model, cfg, device, autocast, batch, iters) if batch and folded else None
    trained = ckpt.get("cost", [])
    return dict(
        params_m=sum(p.numel() for p in deployed.parameters()) / 1e6, gflops=gflops(deployed, cfg, device),
        images_per_s=ips, images_per_s_training_form=ips_train, reparameterized=folded,
        training=" + ".join(f"{c.get('stage', c.get('step'))} {c['steps']}x{c['batch']}" for c in trained) or "none",
        train_images=sum(c["images"] for c in trained), train_wall_s=sum(c["wall_s"] for c in trained))


def summarize(results):
    """Group runs named NAME@SEED into one row per NAME: mean and std of the accuracies over seeds."""
    rows = {}
    for name, r in results.items():
        rows.setdefault(name.split("@")[0], []).append(r)
    table = {}
    for name, runs in rows.items():
        row = dict(runs[0], seeds=len(runs))
        if any(r.get("converged") is False for r in runs):
            row["converged"] = False
        for k in ("top1", "mean_class", "val_top1", "val_mean_class", "miou", "pixel_acc", "val_miou", "val_pixel_acc",
                  "agreement", "train_wall_s"):
            if k in runs[0]:
                row[k], row[k + "_std"] = float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))
        table[name] = row
    return table


def markdown(table):
    """The results table, a row per model (mean ± std over seeds); val and agreement columns when there."""
    def score(key):
        def cell(r):
            if key not in r:
                return "-"
            return f"{r[key]:.1f} ± {r[key + '_std']:.1f}" if r["seeds"] > 1 else f"{r[key]:.1f}"
        return cell

    def speed(r):  # deployed form; a reparameterised model also shows its training form
        if r["images_per_s"] is None:
            return "-"
        train = r["images_per_s_training_form"]
        return f"{r['images_per_s']:.0f}" + (f" (training form {train:.0f})" if train else "")
    columns = [("arch", lambda r: r["arch"])]
    if any("miou" in r for r in table.values()):  # segmentation
        columns += [("mIoU", score("miou")), ("pixel acc", score("pixel_acc")), ("mean/class acc", score("mean_class"))]
        columns += [("val mIoU", score("val_miou"))] if any("val_miou" in r for r in table.values()) else []
    else:
        columns += [("top-1", score("top1")), ("mean/class", score("mean_class"))]
        columns += [("val top-1", score("val_top1"))] if any("val_top1" in r for r in table.values()) else []
    if any("agreement" in r for r in table.values()):
        columns.append(("agrees with teacher", score("agreement")))
    columns += [("params (M)", lambda r: f"{r['params_m']:.2f}"), ("GFLOPs", lambda r: f"{r['gflops']:.3f}"),
                ("img/s", speed), ("training (steps x batch)", lambda r: r["training"]),
                ("train wall (s)", lambda r: f"{r['train_wall_s']:.0f}")]
    lines = ["| model | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n}{' (not converged)' if r.get('converged') is False else ''} | "
              + " | ".join(cell(r) for _, cell in columns) + " |" for n, r in table.items()]
    bad = max(r["unreadable_test_images"] for r in table.values())
    note = f"\n{bad} test images could not be read and are left out of every score.\n" if bad else ""
    if any(r.get("converged") is False for r in table.values()):
        note += ("\n(not converged): the held-out loss of its distillation was still falling at the end (the rule: "
                 "docs/files.md, metrics files); more distillation epochs would likely help.\n")
    return "\n".join(lines) + "\n" + note


def curves(ckpt):
    """A row's training curves, from the metrics files its checkpoint's stages wrote: (its distillation's
    held-out loss, the loss of its last stage if that trained on the labels), each [(images, value)] or None.
    Only the lines of each stage's own generation are read: after a redo into the same file that has not
    finished, the file holds another training's lines, and the row has no curve of that stage."""
    held_out, labels = None, None
    for c in ckpt.get("cost", []):
        stage, path = c.get("stage", c.get("step")), c.get("metrics")
        key = dict(distill="held_out_kd", distill_agnostic="held_out_loss").get(stage, "loss")
        records = read_metrics(path, c.get("generation")) if path else []
        curve = [(r["images"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if path and not records and os.path.exists(path):
            training.log(0, f"note: {path} holds another training's curves than this checkpoint's {stage} "
                            "(redone since): not drawn")
        if stage in ("distill", "distill_agnostic"):
            held_out = curve or held_out
        labels = curve or None if stage in ("teacher", "finetune") else None
    return held_out, labels


def draw_curves(ckpts):
    """results_curves.png as PNG bytes, or None when no row has a curve: each row's distillation held-out loss
    and its training on the labels, against images seen (a row's first run)."""
    first = {}
    for n in ckpts:
        first.setdefault(n.split("@")[0], curves(ckpts[n]))
    panels = []
    for i, title in enumerate(("distillation: held-out loss (KD; agnostic: 1 - cosine)", "training on the labels: loss")):
        drawn = {}  # a curve once: kt_target_distilled's distillation is kt_target's
        for name, c in sorted(first.items(), key=lambda row: row[0].endswith("_distilled")):
            if c[i] and c[i] not in drawn.values():
                drawn[name] = c[i]
        panels.append((title, drawn))
    return curves_chart([p for p in panels if p[1]]) if any(c for _, c in panels) else None


def get_args_parser():
    p = argparse.ArgumentParser(description="evaluate: test accuracy, size, speed and training cost of checkpoints",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="NAME=PATH pairs, e.g. teacher=runs/demo/teacher.pt; "
                   "kt@0=... kt@1=... are seeds of one row")
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): evaluate on its "
                   "test images (and its val images, beside them)")
    p.add_argument("--teacher-row", default="teacher", help="every other row's top-1 agreement with this one")
    p.add_argument("--data-root", default="data")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--workers", type=nonnegative, default=4)
    p.add_argument("--speed-batch", type=nonnegative, default=None, help="images per timed batch (default: 64 "
                   "on a GPU, 8 on a CPU, where a ViT-L takes seconds per image); 0: do not time")
    p.add_argument("--out", default="runs/demo/results.json", help="also writes the .md table beside it")
    return p


def main(args):
    stem, reads = os.path.splitext(args.out)[0], [args.split] + [c.partition("=")[2] for c in args.checkpoints]
    for out in (args.out, stem + ".md", stem + ".png", stem + "_curves.png"):  # none of them may be an input
        claims.check_writable(out, reads)
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
    if args.teacher_row not in paths and args.teacher_row != "teacher":
        fail(f"--teacher-row {args.teacher_row} is not one of the rows ({', '.join(paths)})")
    split = data.read_split(args.split)  # its test (and val) images: the paper's split files, or the dataset's
    ckpts = {name: checkpoints.load_checkpoint(path, kinds=("teacher", "student")) for name, path in paths.items()}
    classes, segmentation = split["classes"], data.is_segmentation(split)
    if segmentation:
        from kt.masks import IGNORE  # (kt.masks: segmentation's alone)
    parts = [p for p in ("val", "test") if data.part_refs(split, p)]
    if "test" not in parts:
        fail(f"{args.split} lists no test images")
    results, predictions = {}, {}
    for name, ckpt in ckpts.items():
        checkpoints.check_same_task(ckpt, name, split, args.split)
        labels = lambda s: {k: s.get(k) for k in ("dataset", "shots", "seed", "budget") if s.get(k) is not None}
        if "split" in ckpt and labels(ckpt["split"]) != labels(split):
            training.log(0, f"warning: {name} was trained on other labels ({labels(ckpt['split'])}) than "
                            f"{args.split} gives ({labels(split)}): its row is of another label budget")
        model = models.load_model(ckpt).to(device).eval()
        metrics, counted = {}, {}  # counted: per part, (images scored, images listed)
        for part in parts:  # nothing is tuned on test: val is reported beside it
            images = data.part_dataset(split, part, ckpt["data_config"], train=False, root=args.data_root,
                                       substitute=False)
            loader = torch.utils.data.DataLoader(images, args.batch_size, collate_fn=collate_readable,
                                                 num_workers=min(args.workers, os.cpu_count()))
            confusion, predictions[name, part], n = predict(model, loader, device, autocast, len(classes),
                                                            IGNORE if segmentation else None)
            counted[part] = n, len(images)
            prefix = "" if part == "test" else f"{part}_"
            metrics.update({prefix + k: v for k, v in scores(confusion, segmentation, classes).items()
                            if part == "test" or k != "per_class_iou"})
        scored, listed = counted["test"]
        if scored < listed:
            training.log(0, f"warning: {listed - scored} of {listed} test images could not be read; "
                            f"{name} is scored on the other {scored}")
        results[name] = dict(arch=ckpt["recipe"]["arch"], **metrics, converged=ckpt.get("metrics", {}).get("converged"),
                             **costs(model, ckpt, device, autocast, args.speed_batch), test_images=scored,
                             unreadable_test_images=listed - scored, device=str(device), checkpoint=paths[name])
        training.log(0, f"{name}: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                                if k != "per_class_iou"))
    teacher = predictions.get((args.teacher_row, "test"))  # does each model predict what the teacher does?
    for name in results:  # (classification: per image; not computed per pixel)
        if teacher is not None and name != args.teacher_row:
            results[name]["agreement"] = 100 * float(np.mean(predictions[name, "test"] == teacher))
    table = summarize(results)
    md, curves_png = markdown(table), draw_curves(ckpts)
    files = {args.out: json.dumps(dict(rows=table, runs=results), indent=1).encode(), stem + ".png": bar_chart(table)}
    if curves_png:
        md += f"\nTraining curves: [{os.path.basename(stem)}_curves.png]({os.path.basename(stem)}_curves.png)\n"
        files[stem + "_curves.png"] = curves_png
    elif os.path.exists(stem + "_curves.png"):
        os.remove(stem + "_curves.png")  # an earlier evaluation's: no curve of this one's rows
    files[stem + ".md"] = md.encode()
    checkpoints.atomic_write_all({path: (lambda f, b=b: f.write(b)) for path, b in files.items()})  # together
    print(md)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())

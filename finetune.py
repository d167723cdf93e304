"""Step 5, finetuning: train a student on the labeled images with cross-entropy (per pixel, on masks).

The last stage of task-oriented transfer: the distilled student (distill.py) learns from the ground-truth
labels. The same script trains the baselines: a student from random, ImageNet, CLIP or DINO weights
(student.py), with the same labels and budget. A few labels must not take back what distillation gave: a
distilled student keeps its BatchNorm statistics (--bn-stats), and with --teacher a guard (kt.guard) watches
it on unlabeled images distillation held out, and on val, and keeps the distilled weights, saying so, when
the finetune made it worse beyond chance (docs/last_step.md: what was measured).

Reads:  a student checkpoint (student.py or distill.py), split.json (split.py) and its labeled images;
        with --teacher, teacher.pt (its soft targets stay in the loss; the guard's reference).
Uses:   kt.data, kt.models, kt.training, kt.progress, kt.guard; kt.checkpoints, kt.claims, kt.checks; where
        used: kt.masks, kt.segmenters, kt.loggers (--log).
Writes: OUT = {kind: "student", recipe, data_config, classes, model, args, metrics (guard: what it kept),
        cost, split}; OUT.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python finetune.py --split runs/eurosat/split.json \
            --student runs/eurosat/student_kt.pt --out runs/eurosat/student_kt_ft.pt
        torchrun --nproc_per_node 8 finetune.py ...   (DDP; the same script runs as one process)
"""
import argparse
import math

import torch
import torch.nn.functional as F

from kt import checkpoints, claims, data, guard, models, training
from kt.checks import fail, fraction, log_kinds, nonnegative, nonnegative_number, positive, rate, share, smoothing
from kt.progress import Progress, check_logging, run_config


def finetune_loss(logits, labels, smoothing, teacher_logits=None, kd_weight=0.0, kd_logits=None):
    """Cross-entropy with the labels (per pixel, segmenting). With the teacher's logits on the same views:
    (1 - kd_weight) CE + kd_weight KL(softmax(teacher) || softmax(student)) (distill.py's loss at T = 1), so
    that a few labels do not pull the student away from what distillation taught it; kd_logits: the
    student's logits on the views the teacher's are for, when those are not the labeled views (--transfer)."""
    loss = training.label_loss(logits, labels, smoothing)
    if teacher_logits is None:
        return loss
    kd = F.kl_div(F.log_softmax((logits if kd_logits is None else kd_logits).float(), -1),
                  F.log_softmax(teacher_logits.float(), -1), reduction="batchmean", log_target=True)
    return (1 - kd_weight) * loss + kd_weight * kd


def shared_view(s_cfg, t_cfg):
    """The data config of one view for both models: the student's, at the larger of the two resolutions."""
    return dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))


def labeled_images(split, s_cfg, t_cfg, root, min_scale):
    """The labeled images for training: normalised for the student (a segmenter's with their masks); with a
    teacher, one view for both in [0, 1] at the larger resolution (as distill.py's), each model resizing and
    normalising its own way. Crops of at least min_scale of the image."""
    if data.is_segmentation(split):
        return data.part_dataset(split, "labeled", s_cfg, train=True, root=root)
    view = s_cfg if t_cfg is None else shared_view(s_cfg, t_cfg)
    return data.Images(*data.part_refs(split, "labeled"), models.transform(
        view, train=True, normalize=t_cfg is None, scale=(min_scale, 1.0)), root)


def keeps_bn_stats(bn_stats, ckpt):
    """Whether the BatchNorm layers keep the statistics the student starts with. A distilled student's were
    estimated on thousands of transfer views; re-estimated on batches of a few labeled images they move away
    from the test images', and the finetune takes back what distillation gave (docs/last_step.md: the main
    cause, measured). A random or ImageNet student's must be updated to the task's images."""
    if bn_stats == "auto":
        return "lineage" in ckpt and checkpoints.task(ckpt) == "classification"
    return bn_stats == "keep"


def transfer_batches(refs, view, args, step, rank, world, device):
    """Endless batches of augmented transfer images in [0, 1] for the KD term (--transfer), one a step;
    the batch of a step is the same whenever the run resumes (its epoch and place from `step`)."""
    images = data.Images(refs, None, models.transform(view, train=True, normalize=False,
                                                      scale=(args.min_scale, 1.0)), args.data_root)
    sampler = data.EpochSampler(len(images), args.train_seed + 1, rank=rank, world=world)
    many = len(sampler) >= args.batch_size  # whole batches, unless one batch is all there is
    loader = data.loader(images, args.batch_size, sampler, args.workers, drop_last=many, device=device)
    epoch, k = divmod(step, len(sampler) // args.batch_size if many else 1)
    while True:
        sampler.set_epoch(epoch, start=k * args.batch_size)
        for x, _ in loader:
            yield x.to(device, non_blocking=True)
        epoch, k = epoch + 1, 0


def watched_images(split, args):
    """The unlabeled images the guard watches: up to --guard of split.json's unlabeled part, those distill.py
    holds out of it (data.hold_out, the same rule), so that neither step trains on them; none without a teacher."""
    unlabeled = data.part_refs(split, "unlabeled")
    return data.hold_out(unlabeled[0], args.guard)[1] if unlabeled and args.teacher else []


def make_guard(model, split, refs, teacher, s_cfg, t_cfg, args, autocast, device):
    """The guard of this finetune (kt.guard): the student against the teacher on the watched unlabeled
    images `refs`, unaugmented, and on split.json's val part where it has one. None when there is nothing to
    watch (--guard 0; no teacher and no val; segmentation)."""
    val = data.part_refs(split, "val")
    val = val if val and val[0] else None
    if not args.guard or data.is_segmentation(split) or not (refs or val):
        return None
    x = teacher_logits = None
    if refs:  # one plain view of each at the larger resolution, as distill.py's held-out images
        plain = data.Images(refs, None, models.transform(shared_view(s_cfg, t_cfg), train=False, normalize=False),
                            args.data_root)
        x = torch.stack([plain[i][0] for i in range(len(refs))]).to(device)
        teacher_logits = guard.logits_of(teacher, x, t_cfg, autocast)
    if val:
        images = data.part_dataset(split, "val", s_cfg, train=False, root=args.data_root)
        val = torch.utils.data.DataLoader(images, 128, num_workers=0)
    return guard.Guard(model, s_cfg, autocast, x, teacher_logits, val)


def get_args_parser():
    p = argparse.ArgumentParser(description="finetune: train a student on the labeled images",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): the task's classes "
                   "and its images")
    p.add_argument("--data-root", default="data", help="where dataset references resolve")
    p.add_argument("--train-seed", type=int, default=0, help="seeds augmentation and data order")
    p.add_argument("--student", default="runs/demo/student_kt.pt", help="made by student.py or distill.py")
    p.add_argument("--epochs", type=positive, default=30, help="passes over the labeled images")
    p.add_argument("--batch-size", type=positive, default=32, help="per process")
    p.add_argument("--lr", type=rate, default=5e-4, help="AdamW peak lr; lower (1e-4) after distillation "
                   "keeps more of what the teacher taught, higher (1e-3) suits random init")
    p.add_argument("--weight-decay", type=nonnegative_number, default=0.05)
    p.add_argument("--smoothing", type=smoothing, default=0.1, help="label smoothing")
    p.add_argument("--teacher", help="teacher.pt (teacher.py): keep its soft targets in the loss, so that the "
                   "few labels do not undo distillation (classification)")
    p.add_argument("--kd-weight", type=fraction, default=None, help="with --teacher: the loss is (1 - w) CE + w KD "
                   "(default 0.5)")
    p.add_argument("--transfer", help="with --teacher: the KD term on views of these images (a transfer list, "
                   "transfer_set.py), as distillation had it, instead of on the labeled views")
    p.add_argument("--warmup", type=fraction, default=0.1, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=share, default=0.08, help="smallest RandomResizedCrop area "
                   "(classification); give distill.py's: the views the distilled student learned on")
    p.add_argument("--bn-stats", choices=["auto", "keep", "update"], default="auto", help="BatchNorm statistics: "
                   "keep those the student starts with, or update them on batches of the labeled views (timm's "
                   "default); auto: keep a distilled classifier's (estimated on its transfer set), update others'")
    p.add_argument("--guard", type=nonnegative, default=256, help="unlabeled images of split.json (at most 5%%: "
                   "those distill.py --holdout keeps out) on which the student is watched against --teacher, and "
                   "val where split.json has it: if the finetune made it worse beyond chance, the first weights "
                   "are kept (kt.guard); 0: always the last")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help=training.AMP_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the student (and the teacher)")
    p.add_argument("--workers", type=nonnegative, default=4)
    p.add_argument("--save-every", type=positive, default=200, help="steps between resumable states")
    p.add_argument("--log-every", type=nonnegative, default=0, help="steps between logs (stderr, "
                   "OUT.metrics.jsonl, --log); 0: about 20 a run, at least every 50 steps")
    p.add_argument("--log", type=log_kinds, default=[], help="also log to tensorboard, wandb and/or mlflow (comma list)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_kt_ft.pt")
    return p


def main(args):
    device, rank, world = training.setup(args.train_seed)
    if rank == 0:  # before any work: --out can be written, is no input, and no other process writes it
        claims.claim(args.out, reads=(args.student, args.split, args.teacher, args.transfer))
        check_logging(args.log, args.out)  # and the folders of --log can be made
    if args.kd_weight is not None and not args.teacher:
        fail("--kd-weight weighs the teacher's soft targets: it needs --teacher")
    args.kd_weight = 0.5 if args.kd_weight is None and args.teacher else args.kd_weight
    ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="student.py or distill.py")
    split = data.read_split(args.split)
    checkpoints.check_same_task(ckpt, args.student, split, args.split)
    model, channels_last = training.prepare(models.load_model(ckpt).to(device), device, world, args.compile, args.amp)
    teacher, t_cfg, s_cfg = None, None, ckpt["data_config"]
    if args.teacher:  # frozen, only to label the same views
        t_ckpt = checkpoints.load_checkpoint(args.teacher, kinds=("teacher",), made_by="teacher.py")
        checkpoints.check_same_task(t_ckpt, args.teacher, ckpt, args.student)
        if checkpoints.task(t_ckpt) == "segmentation":
            fail("finetune.py --teacher is for classification; a segmenter finetunes on its masks alone")
        teacher, t_cfg = models.load_model(t_ckpt).to(device).eval().requires_grad_(False), t_ckpt["data_config"]
        teacher = torch.compile(teacher) if args.compile else teacher
    autocast, scaler = training.amp(device, args.amp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)

    images = labeled_images(split, s_cfg, t_cfg, args.data_root, args.min_scale)
    sampler = data.EpochSampler(len(images), args.train_seed, rank=rank, world=world)
    loader = data.loader(images, args.batch_size, sampler, args.workers, device=device)
    per_epoch = math.ceil(len(sampler) / args.batch_size)
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)
    if args.transfer and teacher is None:
        fail("finetune.py --transfer is for the KD term: give the --teacher too")
    watched = watched_images(split, args)
    held = set(watched)  # --transfer: the KD term's images, but those the guard watches
    refs = [r for r in data.read_transfer_list(args.transfer) if r not in held] if args.transfer else None

    watch = make_guard(model, split, watched, training.unwrap(teacher), s_cfg, t_cfg, args, autocast, device) \
        if rank == 0 else None  # (the plain teacher: no second compile for the watched images)
    progress = Progress(args.out, model=model, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        measure=watch and (lambda: watch.measure(progress.step)), extra=watch,  # kt.guard
                        config=run_config(args, student=args.student, split=args.split, teacher=args.teacher,
                                          transfer=args.transfer))
    if args.resume:
        progress.resume()
    if refs:  # after the resume: the stream starts at the step it resumes at
        transfer = transfer_batches(refs, shared_view(s_cfg, t_cfg), args, progress.step, rank, world, device)
    model.train()
    if keeps_bn_stats(args.bn_stats, ckpt):
        training.freeze_batchnorm(model)
    training.log(rank, f"finetune {args.student}: {len(images)} labeled images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for g in opt.param_groups:
                    g["lr"] = args.lr * training.cosine_lr(progress.step, total, warmup)
                t_logits, n = None, len(x)
                if teacher is not None:  # x: [0, 1] views for both models (--transfer: the teacher's are others)
                    t_x = next(transfer) if refs else x
                    with torch.inference_mode(), autocast():
                        t_logits = teacher(models.to_model_input(t_x, t_cfg)).clone()
                    x = models.to_model_input(torch.cat([x, t_x]) if refs else x, s_cfg)  # one forward, one BN batch
                if channels_last:  # CUDA only (kt.training.prepare)
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    logits = model(x)
                    loss = finetune_loss(logits[:n], y, args.smoothing, t_logits, args.kd_weight,
                                         logits[n:] if refs else None)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, n * world)
                if progress.done:
                    break
    weights, chosen = training.unwrap(model).state_dict(), None
    if watch:  # the last weights, or the first ones (the file's) if the finetune made the student worse
        weights, chosen = watch.verdict(ckpt["model"], "the distilled student" if "lineage" in ckpt else
                                        "the weights it started from")
    progress.save_output(dict(
        ckpt, model=weights, args=checkpoints.plain(args),
        metrics=dict(ckpt.get("metrics", {}), train_loss=progress.loss, guard=chosen),
        cost=ckpt["cost"] + [progress.cost("finetune", args.batch_size * world)],
        split={k: v for k, v in split.items() if k not in ("unlabeled", "files")}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

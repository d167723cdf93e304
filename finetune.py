"""Step 5, finetuning: train a student on the labeled images with cross-entropy (per pixel, on masks).

The last stage of task-oriented transfer: the distilled student (distill.py) learns from the ground-truth
labels. The same script trains the baselines: a student from random, ImageNet, CLIP or DINO weights
(student.py), with the same labels and budget.

Reads:  a student checkpoint (student.py or distill.py), split.json (split.py) and its labeled images;
        with --teacher, teacher.pt (its soft targets stay in the loss).
Uses:   kt.data, kt.models, kt.training, kt.progress; kt.checkpoints, kt.claims, kt.checks; where used:
        kt.masks, kt.segmenters, kt.loggers (--log).
Writes: OUT = {kind: "student", recipe, data_config, classes, model, args, metrics, cost, split};
        OUT.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python finetune.py --split runs/eurosat/split.json \
            --student runs/eurosat/student_kt.pt --out runs/eurosat/student_kt_ft.pt
        torchrun --nproc_per_node 8 finetune.py ...   (DDP; the same script runs as one process)
"""
import argparse
import math

import torch
import torch.nn.functional as F

from kt import checkpoints, claims, data, models, training
from kt.checks import fail, fraction, log_kinds, nonnegative, nonnegative_number, positive, rate, smoothing
from kt.progress import Progress, check_logging, run_config


def finetune_loss(logits, labels, smoothing, teacher_logits=None, kd_weight=0.0):
    """Cross-entropy with the labels (per pixel, segmenting). With the teacher's logits on the same views:
    (1 - kd_weight) CE + kd_weight KL(softmax(teacher) || softmax(student)) (distill.py's loss at T = 1), so
    that a few labels do not pull the student away from what distillation taught it."""
    loss = training.label_loss(logits, labels, smoothing)
    if teacher_logits is None:
        return loss
    kd = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                  reduction="batchmean", log_target=True)
    return (1 - kd_weight) * loss + kd_weight * kd


def labeled_images(split, s_cfg, t_cfg, root):
    """The labeled images for training: normalised for the student; with a teacher, one view for both in
    [0, 1] at the larger resolution (as distill.py's), each model resizing and normalising its own way."""
    if t_cfg is None:
        return data.part_dataset(split, "labeled", s_cfg, train=True, root=root)
    view = dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    return data.Images(*data.part_refs(split, "labeled"), models.transform(view, train=True, normalize=False), root)


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
    p.add_argument("--warmup", type=fraction, default=0.1, help="fraction of steps with linear lr warmup")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help="mixed precision: auto (bf16 on a "
                   "GPU that has it, else fp16; float32 on the CPU), or bf16, fp16, off on any device (bf16 on the "
                   "CPU runs the GPU recipe: autocast, channels_last, fused AdamW)")
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
        claims.claim(args.out, reads=(args.student, args.split, args.teacher))
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

    images = labeled_images(split, s_cfg, t_cfg, args.data_root)
    sampler = data.EpochSampler(len(images), args.train_seed, rank=rank, world=world)
    loader = data.loader(images, args.batch_size, sampler, args.workers, device=device)
    per_epoch = math.ceil(len(sampler) / args.batch_size)
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = Progress(args.out, model=model, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        config=run_config(args, student=args.student, split=args.split, teacher=args.teacher))
    if args.resume:
        progress.resume()
    model.train()
    training.log(rank, f"finetune {args.student}: {len(images)} labeled images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for g in opt.param_groups:
                    g["lr"] = args.lr * training.cosine_lr(progress.step, total, warmup)
                t_logits = None
                if teacher is not None:  # x: [0, 1] views for both models
                    with torch.inference_mode(), autocast():
                        t_logits = teacher(models.to_model_input(x, t_cfg)).clone()
                    x = models.to_model_input(x, s_cfg)
                if channels_last:  # CUDA only (kt.training.prepare)
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    loss = finetune_loss(model(x), y, args.smoothing, t_logits, args.kd_weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    progress.save_output(dict(
        ckpt, model=training.unwrap(model).state_dict(), args=checkpoints.plain(args),
        metrics=dict(ckpt.get("metrics", {}), train_loss=progress.loss),
        cost=ckpt["cost"] + [progress.cost("finetune", args.batch_size * world)],
        split={k: v for k, v in split.items() if k not in ("unlabeled", "files")}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

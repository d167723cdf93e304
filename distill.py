"""Step 4, distillation: the small student learns to match the finetuned VFM's predictions on the task.

This is task-oriented knowledge transfer (Vemulapalli et al., ICML 2024, arXiv 2311.18237, Sec. 3): the
teacher is the VFM *finetuned on the target task* (teacher.py), and the student learns its class
probabilities on a large set of *unlabeled* images (the transfer set, transfer_set.py), with the loss of
Hinton et al. (2015):  loss = T^2 * KL( softmax(teacher / T) || softmax(student / T) ).
The few labels thus reach the student through thousands of soft-labeled images. Compared with training
the same student from ImageNet, CLIP or DINO pretraining, or with distilling the VFM's task-agnostic
features, the paper reports up to 13.7 / 22.1 / 29.8 / 11.6 points higher accuracy with few labels,
and finds the choice of transfer set matters a lot.

Both models see the *same* augmented view (Beyer et al. 2022: "consistent" teaching), each resized and
normalised with its own data config. The teacher is frozen and runs in inference mode; on a GPU both
run under autocast (bf16, or fp16 with loss scaling). finetune.py then trains the student on the labels.

Reads:  teacher.pt (teacher.py), student.pt (student.py), the transfer list (transfer_set.py).
Writes: student_kt.pt = {kind: "student", recipe, data_config, classes, model, args, metrics, cost};
        student_kt.pt.state while training (resumable; deleted when done).
Run:    python distill.py --teacher runs/eurosat/teacher.pt --student runs/eurosat/student_scratch.pt \
            --transfer runs/eurosat/transfer_target.txt --out runs/eurosat/student_kt.pt
        torchrun --nproc_per_node 8 distill.py ...   (DDP; the same script runs as one process)
"""
import argparse

import torch
import torch.nn.functional as F

import task


def kd_loss(student_logits, teacher_logits, T=1.0):
    """Knowledge-distillation loss, (B, C) logits -> scalar, averaged over the batch.

    KL(p_t || p_s) with p = softmax(logits / T). Softening with T > 1 exposes the teacher's ranking of
    the wrong classes; the T^2 factor keeps gradient sizes independent of T (they scale as 1/T^2).
    Computed in float32: a log-softmax in bf16 loses the small probabilities that carry the knowledge.
    """
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T * T


def read_transfer_list(path):
    """One image reference per line (see task.open_image)."""
    try:
        with open(path) as f:
            refs = [line.strip() for line in f if line.strip()]
    except OSError as e:
        task.fail(f"cannot read transfer list {path} ({e.strerror}): run transfer_set.py first")
    if not refs:
        task.fail(f"transfer list {path} is empty: nothing to distill on")
    return refs


def get_args_parser():
    p = argparse.ArgumentParser("distill: train the student to match the finetuned teacher",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="made by teacher.py")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T; try 1-4")
    p.add_argument("--epochs", type=int, default=20, help="passes over the transfer set; longer helps "
                   "(the paper trains for many epochs; Beyer et al. 2022: distillation is patient)")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (GPU)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers decoding images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable states")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_kt.pt")
    return p


def main(args):
    device, rank, world = task.setup(args.seed)
    t_ckpt = task.load_checkpoint(args.teacher, kinds=("teacher",), made_by="teacher.py")
    s_ckpt = task.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    if t_ckpt["classes"] != s_ckpt["classes"]:
        task.fail(f"teacher has {len(t_ckpt['classes'])} classes, student {len(s_ckpt['classes'])}: "
                  "they were made for different tasks")
    refs = read_transfer_list(args.transfer)

    teacher = task.load_model(t_ckpt).to(device).eval().requires_grad_(False)
    student = task.load_model(s_ckpt).to(device)
    t_cfg, s_cfg = t_ckpt["data_config"], s_ckpt["data_config"]
    convnet = device.type == "cuda" and not hasattr(student, "patch_embed")
    if convnet:  # NHWC convolutions are faster on tensor cores
        student = student.to(memory_format=torch.channels_last)
    if args.compile:
        teacher, student = torch.compile(teacher), torch.compile(student)
    autocast, scaler = task.amp(device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")

    # One augmented view per image at the larger of the two resolutions, pixels in [0, 1];
    # task.normalize then resizes and normalises it for each model on the device.
    view = dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    data = task.Images(refs, None, task.transform(view, train=True, normalize=False,
                                                  scale=(args.min_scale, 1.0)), args.data_root)
    sampler = task.EpochSampler(len(data), args.seed, rank=rank, world=world)
    loader = task.loader(data, args.batch_size, sampler, args.workers, drop_last=len(sampler) >
                         args.batch_size, device=device)
    per_epoch = len(sampler) // args.batch_size if len(sampler) > args.batch_size else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = task.Progress(args.out + ".state", student, opt, scaler, total, args.save_every, rank,
                             args.resume)
    student = task.ddp(student, device, world)
    student.train()
    task.log(rank, f"distill {t_ckpt['recipe']['arch']} -> {s_ckpt['recipe']['arch']}: "
                   f"{len(refs)} transfer images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, _ in loader:
                x = x.to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
                for g in opt.param_groups:
                    g["lr"] = args.lr * task.cosine_lr(progress.step, total, warmup)
                with torch.inference_mode(), autocast():
                    t_logits = teacher(task.normalize(x, t_cfg))  # (B, C), no graph kept
                xs = task.normalize(x, s_cfg)
                if convnet:
                    xs = xs.contiguous(memory_format=torch.channels_last)
                with autocast():
                    s_logits = student(xs)
                # inference tensors cannot enter autograd: clone (B x C, negligible) into a normal tensor
                loss = kd_loss(s_logits, t_logits.clone(), args.temperature)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = progress.finish("distill", args.batch_size * world)
    cost["teacher_images"] = cost["images"]  # one teacher forward per student image (online)
    if rank == 0:
        task.save_checkpoint(dict(
            s_ckpt, model=task.unwrap(student).state_dict(), args=task.plain(args),
            metrics=dict(distill_loss=progress.loss), cost=s_ckpt["cost"] + t_ckpt["cost"] + [cost],
            lineage=dict(teacher=args.teacher, transfer=args.transfer, transfer_images=len(refs))), args.out)
        task.log(rank, f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

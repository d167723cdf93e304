"""Step 4, distillation: the student learns to match the finetuned teacher's predictions on unlabeled images.

Task-oriented knowledge transfer (Vemulapalli et al., ICML 2024): the teacher is the VFM finetuned on this
task (teacher.py); on every image of the transfer set (transfer_set.py) the student matches its class
probabilities with Hinton et al.'s loss, T^2 KL(softmax(teacher / T) || softmax(student / T)), per pixel
for segmentation. Both see the same augmented view; the teacher is frozen. cache_teacher.py +
distill_cached.py are the variant that runs the teacher once and replays its outputs.

Reads:  teacher.pt (teacher.py), student.pt (student.py), the transfer list (transfer_set.py).
Uses:   kt.data, kt.models, kt.training, kt.progress; kt.checkpoints, kt.claims, kt.checks; where used:
        kt.segmenters, kt.clip_towers, kt.loggers (--log).
Writes: student_kt.pt = {kind: "student", recipe, data_config, classes, model, args, metrics, cost, lineage};
        student_kt.pt.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python distill.py --teacher runs/eurosat/teacher.pt --student runs/eurosat/student_scratch.pt \
            --transfer runs/eurosat/transfer_target.txt --out runs/eurosat/student_kt.pt
        torchrun --nproc_per_node 8 distill.py ...   (DDP; the same script runs as one process)
"""
import argparse

import torch
import torch.nn.functional as F

from kt import checkpoints, claims, data, models, training
from kt.checks import fraction, log_kinds, nonnegative, nonnegative_number, positive, positive_number, rate, share
from kt.progress import Progress, check_logging, converged, run_config


def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """Knowledge-distillation loss, (B, C) logits -> scalar, averaged over the batch.

    KL(p_teacher || p_student) with p = softmax(logits / temperature). A temperature above 1 exposes the
    teacher's ranking of the wrong classes; the temperature^2 factor keeps gradient sizes independent of it.
    Computed in float32: a log-softmax in bf16 loses the small probabilities that carry the knowledge.
    Segmentation: (B, C, H, W) logits, the teacher's resized to the student's grid; every pixel is one more
    row of the same loss, averaged over the pixels.
    """
    if student_logits.dim() == 4:
        teacher_logits = F.interpolate(teacher_logits.float(), size=student_logits.shape[-2:], mode="bilinear",
                                       align_corners=False)
        student_logits, teacher_logits = (z.permute(0, 2, 3, 1).flatten(0, 2)  # (B*H*W, C): a row per pixel
                                          for z in (student_logits, teacher_logits))
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def teacher_outputs(teacher, x, t_cfg, autocast):
    """The frozen teacher's logits (B, C), or (B, C, h, w) per patch, for views x (B, 3, H, W) in [0, 1]."""
    with torch.inference_mode(), autocast():
        t = teacher(models.to_model_input(x, t_cfg))
    return t.clone()  # inference tensors cannot enter autograd: a copy of the logits, negligible


def mixed_views(x, mix):
    """Function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
    consistent"): the batch of views x (B, 3, H, W) mixed with itself rolled by one, which the teacher labels
    and the student matches, so that the student learns the teacher's function between the images too.
    mixup: one coefficient a batch, the larger of two Dirichlet(1, 1) weights (big_vision's mixup p=1.0,
    n=2: each image keeps at least half of itself); cutmix: a box of a uniform share of the area pasted from
    the rolled batch (timm's cutmix, alpha 1); both: either, half the batches each; none: x itself. Drawn
    from torch's CPU generator, which OUT.state saves: a resumed run mixes the same."""
    if mix == "none":
        return x
    if mix == "both":
        mix = "mixup" if torch.rand(()) < 0.5 else "cutmix"
    lam = float(torch.rand(()))
    other = x.roll(1, dims=0)
    if mix == "mixup":
        lam = max(lam, 1 - lam)
        return x * lam + other * (1 - lam)
    h, w = x.shape[-2:]  # cutmix: a box of area (1 - lam) h w, centred anywhere, clipped at the edges
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1, x0, x1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return mixed


def student_step(student, opt, scaler, autocast, x, s_cfg, t_logits, temperature, channels_last):
    """One optimizer step of the student towards the teacher's logits on views x; returns the loss.

    Nothing here waits for the GPU (no .item()): Progress reads the loss once per log interval.
    """
    xs = models.to_model_input(x, s_cfg)
    if channels_last:  # CUDA only (kt.training.prepare)
        xs = xs.contiguous(memory_format=torch.channels_last)
    with autocast():
        loss = kd_loss(student(xs), t_logits, temperature)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


@torch.inference_mode()
def held_out_loss(student, teacher, x, s_cfg, t_cfg, temperature, autocast):
    """The KD loss on unaugmented images the student never trains on: whether distillation has converged.
    `student` is the plain module (a DDP forward on rank 0 alone would wait for the other ranks)."""
    student.eval()
    with autocast():  # in the training's precision
        loss = kd_loss(student(models.to_model_input(x, s_cfg)), teacher(models.to_model_input(x, t_cfg)), temperature)
    student.train()
    return loss.item()


def get_args_parser():
    p = argparse.ArgumentParser("distill: train the student to match the finetuned teacher",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="made by teacher.py")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--temperature", type=positive_number, default=1.0, help="softmax temperature; try 1-4")
    p.add_argument("--epochs", type=positive, default=20, help="passes over the transfer set; longer helps "
                   "(Beyer et al. 2022: distillation is patient)")
    p.add_argument("--batch-size", type=positive, default=128, help="per process")
    p.add_argument("--lr", type=rate, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=nonnegative_number, default=0.05)
    p.add_argument("--warmup", type=fraction, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=share, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--mix", choices=["none", "mixup", "cutmix", "both"], default="none", help="function "
                   "matching (Beyer et al. 2022): both models see the same mixed view of two transfer images")
    p.add_argument("--holdout", type=nonnegative, default=256, help="transfer images (at most 5%% of them) kept "
                   "out of training: the KD loss on them is logged, to see whether distillation has converged "
                   "(and finetune.py --guard watches the same ones)")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help=training.AMP_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--workers", type=nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--train-seed", type=int, default=0, help="seeds augmentation and data order")
    p.add_argument("--save-every", type=positive, default=500, help="steps between resumable states")
    p.add_argument("--log-every", type=nonnegative, default=0, help="steps between logs (stderr, "
                   "OUT.metrics.jsonl, --log); 0: about 20 a run, at least every 50 steps")
    p.add_argument("--log", type=log_kinds, default=[], help="also log to tensorboard, wandb and/or mlflow (comma list)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_kt.pt")
    return p


def main(args):
    device, rank, world = training.setup(args.train_seed)
    if rank == 0:  # before any work: --out can be written, is no input, and no other process writes it
        claims.claim(args.out, reads=(args.teacher, args.student, args.transfer))
        check_logging(args.log, args.out)  # and the folders of --log can be made
    autocast, scaler = training.amp(device, args.amp)
    t_ckpt = checkpoints.load_checkpoint(args.teacher, kinds=("teacher",), made_by="teacher.py")
    s_ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    checkpoints.check_same_task(t_ckpt, "the teacher", s_ckpt, "the student")
    refs = data.read_transfer_list(args.transfer)
    teacher = models.load_model(t_ckpt).to(device).eval().requires_grad_(False)
    teacher = torch.compile(teacher) if args.compile else teacher
    student, channels_last = training.prepare(models.load_model(s_ckpt).to(device), device, world, args.compile,
                                              args.amp)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)

    # One augmented view per image at the larger of the two resolutions, pixels in [0, 1];
    # models.to_model_input then resizes and normalises it for each model on the device.
    t_cfg, s_cfg = t_ckpt["data_config"], s_ckpt["data_config"]
    view = dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    refs, held = data.hold_out(refs, args.holdout)
    plain_view = data.Images(held, None, models.transform(view, train=False, normalize=False), args.data_root)
    held_x = torch.stack([plain_view[i][0] for i in range(len(held))]).to(device) if held else None
    images = data.Images(refs, None, models.transform(view, train=True, normalize=False,
                                                      scale=(args.min_scale, 1.0)), args.data_root)
    sampler = data.EpochSampler(len(images), args.train_seed, rank=rank, world=world)
    many = len(sampler) > args.batch_size  # drop a ragged last batch, unless one batch is all there is
    loader = data.loader(images, args.batch_size, sampler, args.workers, drop_last=many, device=device)
    per_epoch = len(sampler) // args.batch_size if many else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    def measure():  # at each log: the KD loss on the held-out images, by the plain modules (compiled ones would
        # compile again for the held-out batch's shape)
        return dict(held_out_kd=held_out_loss(training.unwrap(student), training.unwrap(teacher), held_x, s_cfg,
                                              t_cfg, args.temperature, autocast))
    progress = Progress(args.out, model=student, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        measure=measure if held else None,
                        config=run_config(args, teacher=args.teacher, student=args.student, transfer=args.transfer))
    if args.resume:
        progress.resume()  # the same state on every rank
    student.train()
    training.log(rank, f"distill {t_ckpt['recipe']['arch']} -> {s_ckpt['recipe']['arch']}: "
                       f"{len(refs)} transfer images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)  # resume mid-epoch exactly
            for x, _ in loader:
                x = mixed_views(x.to(device, non_blocking=True), args.mix)  # (B, 3, H, W) in [0, 1]
                for g in opt.param_groups:
                    g["lr"] = args.lr * training.cosine_lr(progress.step, total, warmup)
                t_logits = teacher_outputs(teacher, x, t_cfg, autocast)  # the teacher labels this view now
                loss = student_step(student, opt, scaler, autocast, x, s_cfg, t_logits, args.temperature,
                                    channels_last)
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = dict(progress.cost("distill", args.batch_size * world), teacher_images=progress.images)
    settled = converged(progress, "held_out_kd", "held-out KD loss",
                        "try more --epochs (Beyer et al. 2022: distillation is patient)")
    progress.save_output(dict(
        s_ckpt, model=training.unwrap(student).state_dict(), args=checkpoints.plain(args),
        metrics=dict(distill_loss=progress.loss, **progress.measured, converged=settled),
        cost=s_ckpt["cost"] + t_ckpt["cost"] + [cost],
        lineage=dict(teacher=args.teacher, transfer=args.transfer, transfer_images=len(refs),
                     held_out_images=len(held))))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

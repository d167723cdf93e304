"""Step 4, the paper's main baseline: task-agnostic distillation of the frozen VFM's image embedding.

The usual way to compress a foundation model: on the same unlabeled transfer set and budget as distill.py,
the student learns to reproduce the *frozen, not finetuned* VFM's embedding (through a linear projection
to the VFM's width, loss 1 - cosine), and is then finetuned on the labels (finetune.py). The embedding
knows nothing of the task; the paper finds task-oriented transfer up to 11.6 points better. For a
segmentation student the targets are the VFM's patch features, one per location (a 1x1 conv projection).

Reads:  the VFM (a timm name or open_clip:MODEL/TAG; hub or local weights), student.pt, the transfer list.
Uses:   kt.data, kt.models, kt.training, kt.progress; kt.checkpoints, kt.claims, kt.checks; where used:
        kt.segmenters, kt.clip_towers, kt.loggers (--log).
Writes: student_agnostic.pt, in distill.py's format (the projection is thrown away);
        student_agnostic.pt.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python distill_agnostic.py --vfm vit_large_patch14_dinov2.lvd142m --img-size 224 \
            --student runs/eurosat/student_scratch.pt --transfer runs/eurosat/transfer_target.txt \
            --out runs/eurosat/student_agnostic.pt
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from kt import checkpoints, claims, data, models, training
from kt.checks import fail, fraction, log_kinds, nonnegative, nonnegative_number, positive, rate, share
from kt.progress import Progress, check_logging, converged, run_config


def agnostic_loss(student_embedding, vfm_embedding):
    """1 - cosine(student's projected embedding (B, D), VFM embedding (B, D)), averaged -> scalar.

    Cosine ignores the embedding's scale, which differs wildly between VFMs. float32: the normalisation is
    fragile in bf16. The VFM side is detached, so gradients reach only the student and its projection.
    Segmentation: feature maps (B, D, h, w), the student's resized to the VFM's patch grid; each patch a row.
    """
    if student_embedding.dim() == 4:
        student_embedding = F.interpolate(student_embedding.float(), size=vfm_embedding.shape[-2:], mode="bilinear",
                                          align_corners=False)
        student_embedding, vfm_embedding = (z.permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, D): a row per patch
                                            for z in (student_embedding, vfm_embedding))
    pred = F.normalize(student_embedding.float(), dim=-1)
    target = F.normalize(vfm_embedding.detach().float(), dim=-1)
    return 1 - (pred * target).sum(-1).mean()


class StudentWithProjection(nn.Module):
    """The trained pair: forward(x) = projection(student's embedding), (B, D of the VFM).

    Both trained parts sit inside forward, so DDP sees every parameter that gets a gradient. The student's
    classifier gets none here (finetune.py trains it), so it is frozen."""

    def __init__(self, student, vfm_dim, per_location=False):
        super().__init__()
        self.student = student
        self.student.get_classifier().requires_grad_(False)
        if per_location:  # a segmenter's feature map: the same linear projection at each location
            self.projection = nn.Conv2d(student.num_features, vfm_dim, kernel_size=1)
        else:
            self.projection = nn.Linear(student.num_features, vfm_dim)

    def forward(self, x):
        embedding = models.image_embedding(self.student, x)
        with torch.autocast(x.device.type, enabled=False):  # float32, like the loss
            return self.projection(embedding.float())


def frozen_vfm(name, weights, img_size, dense, device):
    """The VFM as it was pretrained, frozen -> (model, data config, embedding width). Its head has 1 class and
    is never used (models.image_embedding stops before it); for a segmentation student it is read as a
    segmenter too, whose embedding is the last feature map (patch features)."""
    local = None if weights == "hub" else weights  # a weights file
    vfm, _, cfg = models.create_model(name, 1, pretrained=weights == "hub", weights=local, img_size=img_size,
                                      decoder="linear" if dense else None)
    vfm = vfm.to(device).eval().requires_grad_(False)
    with torch.inference_mode():  # the embedding width, from one dummy image
        dim = models.image_embedding(vfm, torch.zeros(1, *cfg["input_size"], device=device)).shape[1]
    return vfm, cfg, dim


@torch.inference_mode()
def held_out_loss(pair, vfm, x, s_cfg, v_cfg, autocast):
    """The agnostic loss on unaugmented images the student never trains on (`pair`: the plain module)."""
    pair.eval()
    with autocast():
        loss = agnostic_loss(pair(models.to_model_input(x, s_cfg)),
                             models.image_embedding(vfm, models.to_model_input(x, v_cfg)))
    pair.train()
    return loss.item()


def get_args_parser():
    p = argparse.ArgumentParser("distill_agnostic: train the student to match the frozen VFM's embedding",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vfm", default="vit_large_patch14_dinov2.lvd142m",
                   help="the VFM teacher.py finetunes, here frozen: timm name or open_clip:MODEL/TAG")
    p.add_argument("--vfm-weights", default="hub", help="hub (download) or a local weights file")
    p.add_argument("--img-size", type=positive, default=None, help="the VFM's input resolution (default: its "
                   "own; use the one teacher.py used)")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py; "
                   "use the list distill.py got, for a fair comparison")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--epochs", type=positive, default=20, help="passes over the transfer set; give it distill.py's")
    p.add_argument("--batch-size", type=positive, default=128, help="per process")
    p.add_argument("--lr", type=rate, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=nonnegative_number, default=0.05)
    p.add_argument("--warmup", type=fraction, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=share, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--holdout", type=nonnegative, default=256, help="transfer images (at most 5%% of them) kept "
                   "out of training, as distill.py keeps them: the loss on them is logged")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help=training.AMP_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile student and VFM")
    p.add_argument("--workers", type=nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--train-seed", type=int, default=0, help="seeds the projection, augmentation and data order")
    p.add_argument("--save-every", type=positive, default=500, help="steps between resumable states")
    p.add_argument("--log-every", type=nonnegative, default=0, help="steps between logs (stderr, "
                   "OUT.metrics.jsonl, --log); 0: about 20 a run, at least every 50 steps")
    p.add_argument("--log", type=log_kinds, default=[], help="also log to tensorboard, wandb and/or mlflow (comma list)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_agnostic.pt")
    return p


def main(args):
    device, rank, world = training.setup(args.train_seed)
    if rank == 0:  # before any work: --out can be written, is no input, and no other process writes it
        claims.claim(args.out, reads=(args.student, args.transfer, args.vfm_weights))
        check_logging(args.log, args.out)  # and the folders of --log can be made
    s_ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    refs = data.read_transfer_list(args.transfer)
    if args.vfm_weights == "none":
        fail("--vfm-weights none would distill a random network; give hub or a weights file")
    segmenting = checkpoints.task(s_ckpt) == "segmentation"
    vfm, v_cfg, vfm_dim = frozen_vfm(args.vfm, args.vfm_weights, args.img_size, segmenting, device)
    pair = StudentWithProjection(models.load_model(s_ckpt), vfm_dim, per_location=segmenting).to(device)
    vfm = torch.compile(vfm) if args.compile else vfm
    autocast, scaler = training.amp(device, args.amp)
    opt = torch.optim.AdamW([p for p in pair.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, fused=True)

    # As in distill.py: one augmented view in [0, 1] at the larger resolution, normalised per model.
    s_cfg = s_ckpt["data_config"]
    view = dict(s_cfg, input_size=max(v_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    refs, held = data.hold_out(refs, args.holdout)  # the images distill.py holds out: both train on the same
    plain_view = data.Images(held, None, models.transform(view, train=False, normalize=False), args.data_root)
    held_x = torch.stack([plain_view[i][0] for i in range(len(held))]).to(device) if held else None
    images = data.Images(refs, None, models.transform(view, train=True, normalize=False,
                                                      scale=(args.min_scale, 1.0)), args.data_root)
    sampler = data.EpochSampler(len(images), args.train_seed, rank=rank, world=world)
    many = len(sampler) > args.batch_size  # drop a ragged last batch, unless one batch is all there is
    loader = data.loader(images, args.batch_size, sampler, args.workers, drop_last=many, device=device)
    per_epoch = len(sampler) // args.batch_size if many else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    def measure():  # at each log: the loss on the held-out images
        return dict(held_out_loss=held_out_loss(training.unwrap(pair), training.unwrap(vfm), held_x, s_cfg, v_cfg,
                                                autocast))  # the plain modules: no compiling for another shape
    progress = Progress(args.out, model=pair, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        measure=measure if held else None,
                        config=run_config(args, student=args.student, transfer=args.transfer,
                                          vfm_weights=args.vfm_weights))
    if args.resume:
        progress.resume()
    pair, channels_last = training.prepare(pair, device, world, args.compile, args.amp)
    pair.train()
    training.log(rank, f"agnostic distill {args.vfm} (frozen, {vfm_dim}-d embedding) -> "
                       f"{s_ckpt['recipe']['arch']}: {len(refs)} transfer images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, _ in loader:
                x = x.to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
                for g in opt.param_groups:
                    g["lr"] = args.lr * training.cosine_lr(progress.step, total, warmup)
                with torch.inference_mode(), autocast():
                    v_emb = models.image_embedding(vfm, models.to_model_input(x, v_cfg))  # (B, D) or a map, no graph kept
                xs = models.to_model_input(x, s_cfg)
                if channels_last:  # CUDA only (kt.training.prepare)
                    xs = xs.contiguous(memory_format=torch.channels_last)
                with autocast():
                    s_emb = pair(xs)  # the same shape, projected; through DDP if distributed
                loss = agnostic_loss(s_emb, v_emb.clone())  # clone: inference tensors cannot enter autograd
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = dict(progress.cost("distill_agnostic", args.batch_size * world), teacher_images=progress.images)
    settled = converged(progress, "held_out_loss", "held-out loss", "try more --epochs")
    progress.save_output(dict(  # the student alone: the projection is discarded
        s_ckpt, model=training.unwrap(pair).student.state_dict(), args=checkpoints.plain(args),
        metrics=dict(agnostic_loss=progress.loss, **progress.measured, converged=settled), cost=s_ckpt["cost"] + [cost],
        lineage=dict(vfm=args.vfm, vfm_weights=args.vfm_weights, transfer=args.transfer,
                     transfer_images=len(refs), held_out_images=len(held))))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Step 1, the teacher: finetune a vision foundation model (VFM) plus a linear head on the few labels.

The finetuned VFM is far more accurate than a small model trained on the same labels; its class
probabilities on unlabeled images are what the student learns from (distill.py). `--mode finetune`
(default) trains every layer with layer-wise lr decay, so the lower blocks keep their general features;
`--mode linear` trains the head alone (try it with 1-5 labels per class). For segmentation (a dense
dataset) the head is linear on each patch token (kt.segmenters.Segmenter) and the loss is per pixel.

Reads:  split.json (split.py) and its labeled images.
Uses:   kt.data, kt.models, kt.training, kt.progress; kt.checkpoints, kt.claims, kt.checks; where used:
        kt.masks, kt.segmenters, kt.clip_towers, kt.loggers (--log).
Writes: teacher.pt = {kind: "teacher", recipe, data_config, classes, model, args, split, metrics, cost};
        teacher.pt.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python teacher.py --split runs/eurosat/split.json --model vit_large_patch14_dinov2.lvd142m \
            --img-size 224 --out runs/eurosat/teacher.pt
        torchrun --nproc_per_node 8 teacher.py ...   (DDP; the same script runs as one process)
"""
import argparse
import math

import timm.optim
import torch
from timm.models import group_parameters

from kt import checkpoints, claims, data, models, training
from kt.checks import fraction, log_kinds, nonnegative, nonnegative_number, positive, rate, share, smoothing
from kt.progress import Progress, check_logging, run_config


VIT_LEVELS = 13  # the layer-decay steps of a 12-block ViT, from its top (norm, head) down to its stem


def param_groups(model, mode, lr, head_lr, layer_decay, weight_decay):
    """AdamW parameter groups; each carries `lr_scale` so the schedule sets lr = base * scale * cosine.

    finetune: timm's LLRD groups (level i of L gets decay ** (L - i)), spread over the depth so that one
    --layer-decay means the same in every family: it is the factor per level of a 12-block ViT, and the stem
    of any network (a ViT-L's 25 levels below its top, a ConvNeXt's 19, a FastViT-MCi's 21) trains at
    layer_decay ** 13 of the top lr, as a ViT-B's does. The head is taken out into its own groups at head_lr.
    linear: only the head trains; the backbone is frozen (no grads, no DDP sync).
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    if mode == "linear":
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
        return [dict(params=list(model.get_classifier().parameters()), lr_scale=head_lr / lr,
                     weight_decay=0.0)]
    levels = max(group_parameters(model, model.group_matcher(coarse=False), reverse=True).values())
    per_level = layer_decay ** (VIT_LEVELS / max(levels, 1))
    groups = []
    for g in timm.optim.param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=per_level):
        body = [p for p in g["params"] if id(p) not in head]
        top = [p for p in g["params"] if id(p) in head]
        groups += [dict(g, params=body)] if body else []
        groups += [dict(g, params=top, lr_scale=head_lr / lr)] if top else []
    return groups


def get_args_parser():
    p = argparse.ArgumentParser(description="teacher: finetune a VFM + linear head on the labeled images",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): the task's classes "
                   "and its images")
    p.add_argument("--data-root", default="data", help="where dataset references resolve")
    p.add_argument("--train-seed", type=int, default=0, help="seeds initialisation, augmentation and data order")
    p.add_argument("--model", default="vit_large_patch14_dinov2.lvd142m",
                   help="timm name, or open_clip:MODEL/TAG e.g. open_clip:ViT-L-14/datacomp_xl_s13b_b90k")
    p.add_argument("--weights", default="hub", help="hub (download), none (random init), or a local file")
    p.add_argument("--img-size", type=positive, default=None, help="input resolution (default: the model's); "
                   "224 makes DINOv2-L ~5x cheaper than its native 518")
    p.add_argument("--mode", default="finetune", choices=["finetune", "linear"],
                   help="finetune with layer-wise lr decay, or linear probe (try it with 1-5 shots)")
    p.add_argument("--decoder", default="linear", choices=["linear", "lraspp"], help="segmentation only: a "
                   "linear head on the last feature map (a ViT's patch tokens), or LR-ASPP (a CNN's last map is 1/32)")
    p.add_argument("--epochs", type=positive, default=30, help="passes over the labeled images")
    p.add_argument("--batch-size", type=positive, default=32, help="per process")
    p.add_argument("--lr", type=rate, default=5e-5, help="top block's lr (try 1e-5 .. 1e-4)")
    p.add_argument("--head-lr", type=rate, default=1e-3, help="the new linear head's lr")
    p.add_argument("--layer-decay", type=share, default=0.75, help="layer-wise lr decay per level of a 12-block "
                   "ViT, spread over the depth of any other network: its stem trains at decay^13 of --lr (0.75: "
                   "2.4%%); lower keeps more of the VFM (try 0.65 with 1-5 labels per class)")
    p.add_argument("--weight-decay", type=nonnegative_number, default=0.05)
    p.add_argument("--smoothing", type=smoothing, default=0.1, help="label smoothing")
    p.add_argument("--warmup", type=fraction, default=0.1, help="fraction of steps with linear lr warmup")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help=training.AMP_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=nonnegative, default=4, help="DataLoader workers decoding images")
    p.add_argument("--save-every", type=positive, default=200, help="steps between resumable states")
    p.add_argument("--log-every", type=nonnegative, default=0, help="steps between logs (stderr, "
                   "OUT.metrics.jsonl, --log); 0: about 20 a run, at least every 50 steps")
    p.add_argument("--log", type=log_kinds, default=[], help="also log to tensorboard, wandb and/or mlflow (comma list)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/teacher.pt")
    return p


def main(args):
    device, rank, world = training.setup(args.train_seed)
    if rank == 0:  # before any work: --out can be written, is no input, and no other process writes it
        claims.claim(args.out, reads=(args.split, args.weights))
        check_logging(args.log, args.out)  # and the folders of --log can be made
    split = data.read_split(args.split)
    model, recipe, cfg = models.create_model(
        args.model, len(split["classes"]), pretrained=args.weights == "hub",
        weights=None if args.weights in ("hub", "none") else args.weights, img_size=args.img_size,
        decoder=args.decoder if data.is_segmentation(split) else None)  # segmentation: a head on the patch features
    groups = param_groups(model, args.mode, args.lr, args.head_lr, args.layer_decay, args.weight_decay)
    model, channels_last = training.prepare(model.to(device), device, world, args.compile, args.amp)
    opt = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    autocast, scaler = training.amp(device, args.amp)

    images = data.part_dataset(split, "labeled", cfg, train=True, root=args.data_root)  # with masks, segmenting
    sampler = data.EpochSampler(len(images), args.train_seed, rank=rank, world=world)
    loader = data.loader(images, args.batch_size, sampler, args.workers, device=device)
    per_epoch = math.ceil(len(sampler) / args.batch_size)
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = Progress(args.out, model=model, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        config=run_config(args, split=args.split, weights=args.weights))
    if args.resume:
        progress.resume()
    model.train()
    training.log(rank, f"teacher {args.model} ({args.mode}): {len(images)} labeled images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)  # resume mid-epoch exactly
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:  # CUDA only (kt.training.prepare)
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = args.lr * g["lr_scale"] * training.cosine_lr(progress.step, total, warmup)
                with autocast():
                    loss = training.label_loss(model(x), y, args.smoothing)  # per pixel, segmenting
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    progress.save_output(dict(
        kind="teacher", recipe=recipe, data_config=cfg, classes=split["classes"],
        model=training.unwrap(model).state_dict(), args=checkpoints.plain(args),
        split={k: v for k, v in split.items() if k not in ("unlabeled", "files")},
        metrics=dict(train_loss=progress.loss), cost=[progress.cost("teacher", args.batch_size * world)]))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

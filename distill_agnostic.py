"""Step 4b, the paper's main baseline: task-agnostic distillation of the VFM's image embedding.

Vemulapalli et al. (ICML 2024, arXiv 2311.18237, Sec. 4) compare task-oriented transfer (distill.py: the
student matches the *finetuned* VFM's class probabilities) with the usual way of compressing a
foundation model: the student learns to reproduce the *frozen, not finetuned* VFM's image embedding on
the same unlabeled transfer set, with the same budget, and is then finetuned on the labels (finetune.py).
The embedding knows nothing of the task, so the student spends its small capacity imitating features
the task may not need; the paper finds task-oriented transfer up to 11.6 points better with few labels.

The loss: the student's pooled features (B, Ds) go through a linear projection to the VFM's embedding
size (B, Dv) and are compared by cosine similarity, loss = 1 - cos(W f_s, f_v), averaged over the batch.
The projection only bridges the two widths; it is trained with the student and then thrown away, so the
checkpoint written is the student alone, in the format distill.py writes (its classifier is untouched
here: finetune.py trains it). The VFM is frozen, in inference mode; both models see the same augmented
view, each resized and normalised with its own data config.

Reads:  the VFM (a timm name or open_clip:MODEL/TAG, hub or local weights), student.pt (student.py), the
        transfer list (transfer_set.py).
Writes: student_agnostic.pt = {kind: "student", recipe, data_config, classes, model, args, metrics, cost};
        student_agnostic.pt.state while training (resumable; deleted when done).
Run:    python distill_agnostic.py --vfm vit_large_patch14_dinov2.lvd142m --img-size 224 \
            --student runs/eurosat/student_scratch.pt --transfer runs/eurosat/transfer_target.txt \
            --out runs/eurosat/student_agnostic.pt
        torchrun --nproc_per_node 8 distill_agnostic.py ...   (DDP; the same script runs as one process)
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import task


def agnostic_loss(student_feats, projection, vfm_feats):
    """1 - cosine(projection(student_feats), vfm_feats), averaged over the batch -> scalar.

    student_feats (B, Ds), vfm_feats (B, Dv), projection: a module (B, Ds) -> (B, Dv). Cosine ignores the
    embedding's scale, which differs wildly between VFMs. float32: the normalisation is fragile in bf16.
    The VFM side is detached, so gradients reach only the student and the projection.
    """
    pred = F.normalize(projection(student_feats.float()).float(), dim=-1)
    target = F.normalize(vfm_feats.detach().float(), dim=-1)
    return 1 - (pred * target).sum(-1).mean()


def embed(model, x):
    """A model's image embedding (B, D): an OpenCLIP tower's projected embedding, or a timm model's
    pooled pre-logits features (what its classifier would see)."""
    if isinstance(model, task.CLIPClassifier):
        return model.forward_features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


class StudentWithProjection(nn.Module):
    """The trained pair, one module so that the resumable state holds the projection too.

    forward() gives the student's embedding (B, Ds); the loss applies the projection. The student's
    classifier gets no gradient here (finetune.py trains it), so it is frozen: DDP wants every trained
    parameter to receive one."""

    def __init__(self, student, vfm_dim):
        super().__init__()
        self.student = student
        self.student.get_classifier().requires_grad_(False)
        self.projection = nn.Linear(student.num_features, vfm_dim)

    def forward(self, x):
        return embed(self.student, x)


def get_args_parser():
    p = argparse.ArgumentParser("distill_agnostic: train the student to match the frozen VFM's embedding",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vfm", default="vit_large_patch14_dinov2.lvd142m",
                   help="the VFM teacher.py finetunes, here frozen: timm name or open_clip:MODEL/TAG")
    p.add_argument("--vfm-weights", default="hub", help="hub (download) or a local weights file")
    p.add_argument("--img-size", type=task.positive, default=None, help="the VFM's input resolution (default: its own; "
                   "use the one teacher.py used)")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py; "
                   "use the list distill.py got, for a fair comparison")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--epochs", type=task.positive, default=20,
                   help="passes over the transfer set; give it distill.py's")
    p.add_argument("--batch-size", type=task.positive, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--compile", action="store_true", help="torch.compile student and VFM (GPU)")
    p.add_argument("--workers", type=task.nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=task.positive, default=500, help="steps between resumable states")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_agnostic.pt")
    return p


def main(args):
    device, rank, world = task.setup(args.seed)
    s_ckpt = task.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    refs = task.read_transfer_list(args.transfer)
    if args.vfm_weights == "none":
        task.fail("--vfm-weights none would distill a random network; give hub or a weights file")
    # a 1-class head that is never used (embed() stops before it); a stored classifier is dropped
    vfm, _, v_cfg = task.create_model(args.vfm, 1, pretrained=args.vfm_weights == "hub",
                                      weights=None if args.vfm_weights == "hub" else args.vfm_weights,
                                      img_size=args.img_size)
    vfm = vfm.to(device).eval().requires_grad_(False)
    s_cfg = s_ckpt["data_config"]
    with torch.inference_mode():  # the embedding width, from one dummy image
        vfm_dim = embed(vfm, torch.zeros(1, *v_cfg["input_size"], device=device)).shape[-1]
    pair = StudentWithProjection(task.load_model(s_ckpt), vfm_dim).to(device)
    if args.compile:
        vfm, pair = torch.compile(vfm), torch.compile(pair)
    autocast, scaler = task.amp(device)
    opt = torch.optim.AdamW([p for p in pair.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")

    # As in distill.py: one augmented view in [0, 1] at the larger resolution, normalised per model.
    view = dict(s_cfg, input_size=max(v_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    data = task.Images(refs, None, task.transform(view, train=True, normalize=False,
                                                  scale=(args.min_scale, 1.0)), args.data_root)
    sampler = task.EpochSampler(len(data), args.seed, rank=rank, world=world)
    loader = task.loader(data, args.batch_size, sampler, args.workers, drop_last=len(sampler) >
                         args.batch_size, device=device)
    per_epoch = len(sampler) // args.batch_size if len(sampler) > args.batch_size else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = task.Progress(args.out + ".state", pair, opt, scaler, total, args.save_every, rank,
                             args.resume)
    pair = task.ddp(pair, device, world)
    pair.train()
    task.log(rank, f"agnostic distill {args.vfm} (frozen, {vfm_dim}-d embedding) -> "
                   f"{s_ckpt['recipe']['arch']}: {len(refs)} transfer images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, _ in loader:
                x = x.to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
                for g in opt.param_groups:
                    g["lr"] = args.lr * task.cosine_lr(progress.step, total, warmup)
                with torch.inference_mode(), autocast():
                    v_feats = embed(vfm, task.normalize(x, v_cfg))  # (B, Dv), no graph kept
                with autocast():
                    s_feats = pair(task.normalize(x, s_cfg))  # (B, Ds), through DDP when distributed
                # clone: inference tensors cannot enter autograd (B x Dv, negligible)
                loss = agnostic_loss(s_feats, task.unwrap(pair).projection, v_feats.clone())
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = progress.finish("distill_agnostic", args.batch_size * world)
    cost["teacher_images"] = cost["images"]  # one VFM forward per student image (online)
    if rank == 0:
        task.save_checkpoint(dict(
            s_ckpt, model=task.unwrap(pair).student.state_dict(), args=task.plain(args),
            metrics=dict(agnostic_loss=progress.loss), cost=s_ckpt["cost"] + [cost],
            lineage=dict(vfm=args.vfm, vfm_weights=args.vfm_weights, transfer=args.transfer,
                         transfer_images=len(refs))), args.out)
        task.log(rank, f"wrote {args.out} (the projection is discarded)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

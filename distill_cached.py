"""Step 4, cached variant: distil from the teacher-output cache, with no teacher, on exactly its views.

Replays the views cache_teacher.py stored: each is rebuilt from its source image, crop box and flip, and
the student matches the teacher's stored top-k probabilities (renormalised; the same loss as distill.py's
when k = C). Epoch e shows view (e + i) mod K of image i, so K epochs see every view once.

Reads:  the cache DIR (cache_teacher.py), student.pt (student.py).
Uses:   kt.cached_views, kt.data, kt.models, kt.training, kt.progress; kt.checkpoints, kt.claims, kt.checks;
        where used: kt.segmenters, kt.loggers (--log).
Writes: student_kt.pt, as distill.py writes it (its cost includes building the cache);
        student_kt.pt.state while training (resumable with --resume) and .metrics.jsonl (its curves).
Run:    python distill_cached.py --cache runs/eurosat/cache --student runs/eurosat/student_scratch.pt \
            --epochs 10 --out runs/eurosat/student_kt.pt
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from kt import checkpoints, claims, data, models, training
from kt.cached_views import cache_shard, make_view, open_or_gray, shard_done
from kt.checks import fail, fraction, log_kinds, nonnegative, nonnegative_number, positive, positive_number, rate
from kt.progress import Progress, check_logging, run_config


def kd_loss_topk(student_logits, prob, cls, temperature=1.0):
    """The KD loss against a sparse teacher: top-k probabilities prob (B, k) of classes cls (B, k).

    The mass outside the top k was not stored, so the k probabilities are renormalised into a distribution
    q (zero elsewhere): the loss stays a proper KL (>= 0, zero when the student matches) and equals the
    dense loss when k = C. q^(1/T) renormalised is softmax(teacher / T) restricted to the top k.
    Segmentation: (B, k, h, w) at the teacher's grid; the student's logits are resized to it, a row per pixel.
    """
    if student_logits.dim() == 4:
        student_logits = F.interpolate(student_logits.float(), size=prob.shape[-2:], mode="bilinear",
                                       align_corners=False)
        student_logits, prob, cls = (t.permute(0, 2, 3, 1).flatten(0, 2) for t in (student_logits, prob, cls))
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, cls.long())  # (B, k)
    q = prob.float() ** (1 / temperature)
    q = q / q.sum(-1, keepdim=True)
    # xlogy: fp16 underflow leaves exact zeros, and 0 log 0 = 0
    return (torch.special.xlogy(q, q) - q * log_p_student).sum(-1).mean() * temperature ** 2


def student_step(student, opt, scaler, autocast, x, s_cfg, prob, cls, temperature, channels_last):
    """One optimizer step of the student towards the cached top-k on views x; returns the loss."""
    xs = models.to_model_input(x, s_cfg)
    if channels_last:  # CUDA only (kt.training.prepare)
        xs = xs.contiguous(memory_format=torch.channels_last)
    with autocast():
        loss = kd_loss_topk(student(xs), prob, cls, temperature)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


class CachedViews(torch.utils.data.Dataset):
    """(image, view) -> the exact view the teacher saw (3, S, S), and its (top-k probs, classes)."""

    def __init__(self, refs, cache, size, interpolation, root):
        self.refs, self.c, self.size, self.interpolation, self.root = refs, cache, size, interpolation, root

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, item):
        i, v = item
        img = open_or_gray(self.refs[i], self.root)
        x = make_view(img, self.c["box"][i, v], self.c["flip"][i, v], self.size, self.interpolation)
        return x, (self.c["prob"][i, v], self.c["cls"][i, v])


class ViewSampler(data.EpochSampler):
    """(image, view) pairs: epoch e replays view (e + i) mod K of image i."""

    def __init__(self, n, views, seed, rank=0, world=1):
        super().__init__(n, seed, rank=rank, world=world)
        self.views = views

    def __iter__(self):
        return iter([(i, (self.epoch + i) % self.views) for i, _ in super().__iter__()])


def load_cache(cache_dir):
    """(meta, cache, cost): every shard of DIR joined in image order; fails on a missing shard."""
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.exists(path):
        fail(f"{cache_dir} holds no teacher cache (no meta.json): build it with cache_teacher.py --out {cache_dir}")
    try:
        with open(path) as f:
            meta = json.load(f)
        n = math.ceil(len(meta["refs"]) / meta["shard_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path} is not a teacher cache's meta.json ({type(e).__name__}: {e}); rebuild the cache")
    missing = [s for s in range(n) if not shard_done(cache_dir, s)]
    if missing:
        fail(f"{cache_dir} has {n - len(missing)} of {n} shards (missing or broken: {cache_shard(cache_dir, missing[0])}): "
             "finish building it with cache_teacher.py, which remakes those")
    shards = [checkpoints.load_checkpoint(cache_shard(cache_dir, s)) for s in range(n)]
    broken = [s for s, sh in zip(range(n), shards) if not isinstance(sh, dict) or
              {"index", "box", "flip", "prob", "cls", "batches", "batch", "wall_s"} - set(sh)]
    if broken:
        fail(f"{cache_shard(cache_dir, broken[0])} is not a shard of cache_teacher.py's: delete it and rerun "
             "cache_teacher.py to remake it")
    cache = {k: torch.cat([sh[k] for sh in shards]) for k in ("index", "box", "flip", "prob", "cls")}
    if not torch.equal(cache["index"], torch.arange(len(meta["refs"]))):
        fail(f"{cache_dir}: shards do not cover images 0..{len(meta['refs']) - 1} in order; rebuild it")
    cost = dict(stage="cache_teacher", steps=sum(sh["batches"] for sh in shards), batch=shards[0]["batch"],
                images=len(meta["refs"]) * meta["views"], wall_s=round(sum(sh["wall_s"] for sh in shards), 2))
    return meta, cache, cost


def get_args_parser():
    p = argparse.ArgumentParser("distill_cached: train the student on the teacher's cached outputs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default="runs/demo/cache", help="made by cache_teacher.py")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--temperature", type=positive_number, default=1.0, help="softmax temperature; try 1-4")
    p.add_argument("--epochs", type=positive, default=10, help="passes over the transfer set; more than the "
                   "cached views (K) repeat views")
    p.add_argument("--batch-size", type=positive, default=128, help="per process")
    p.add_argument("--lr", type=rate, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=nonnegative_number, default=0.05)
    p.add_argument("--warmup", type=fraction, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help=training.AMP_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--workers", type=nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--train-seed", type=int, default=0, help="seeds the data order")
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
        claims.claim(args.out, reads=(args.student,))
        check_logging(args.log, args.out)  # and the folders of --log can be made
    autocast, scaler = training.amp(device, args.amp)
    s_ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    meta, cache, cache_cost = load_cache(args.cache)
    checkpoints.check_same_task(meta, f"the teacher of {args.cache}", s_ckpt, "the student")
    student, channels_last = training.prepare(models.load_model(s_ckpt).to(device), device, world, args.compile,
                                              args.amp)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    s_cfg = s_ckpt["data_config"]
    size = max(meta["view_size"], s_cfg["input_size"][-1])  # the same box, never upsampled for the student
    views = CachedViews(meta["refs"], cache, size, meta["interpolation"], args.data_root)
    sampler = ViewSampler(len(views), meta["views"], args.train_seed, rank=rank, world=world)
    many = len(sampler) > args.batch_size  # drop a ragged last batch, unless one batch is all there is
    loader = data.loader(views, args.batch_size, sampler, args.workers, drop_last=many, device=device)
    per_epoch = len(sampler) // args.batch_size if many else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = Progress(args.out, model=student, optimizer=opt, scaler=scaler, total=total, per_epoch=per_epoch,
                        save_every=args.save_every, log_every=args.log_every, log=args.log, rank=rank,
                        config=run_config(args, student=args.student, cache=os.path.join(args.cache, "meta.json")))
    if args.resume:
        progress.resume()
    student.train()
    training.log(rank, f"distill {meta['teacher_arch']} -> {s_ckpt['recipe']['arch']} from {args.cache}: "
                       f"{len(views)} transfer images x {meta['views']} views, {total} steps")
    if args.epochs > meta["views"]:
        training.log(rank, f"note: {args.epochs} epochs over {meta['views']} cached views repeat views")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, (prob, cls) in loader:  # x (B, 3, S, S) in [0, 1]; the view's top-k, (B, k) each
                x, prob, cls = (t.to(device, non_blocking=True) for t in (x, prob, cls))
                for g in opt.param_groups:
                    g["lr"] = args.lr * training.cosine_lr(progress.step, total, warmup)
                loss = student_step(student, opt, scaler, autocast, x, s_cfg, prob, cls, args.temperature,
                                    channels_last)
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = dict(progress.cost("distill", args.batch_size * world), teacher_images=0)  # paid in the cache
    progress.save_output(dict(
        s_ckpt, model=training.unwrap(student).state_dict(), args=checkpoints.plain(args),
        metrics=dict(distill_loss=progress.loss), cost=s_ckpt["cost"] + meta["teacher_cost"] + [cache_cost, cost],
        lineage=dict(teacher=meta["teacher"], transfer=meta["transfer"], cache=args.cache,
                     transfer_images=len(views))))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

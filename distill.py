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
run under autocast (bf16, or fp16 with loss scaling), a convolutional student in channels_last, AdamW fused,
and `--compile` compiles both. finetune.py then trains the student on the labels.

Speed: a ViT-L/14 teacher costs ~78 GMACs per 224px image, 20-100x a mobile student, so online distillation
is bound by the teacher's forward pass (bench.py measures how close it gets). To train students without the
teacher, `--cache-teacher DIR` runs it once over K augmented views of every transfer image (FKD, Shen & Xing
2022), storing each view's crop box and flip with the teacher's top-k probabilities (fp16) in shards, and
distillation replays exactly those views (`--from-cache DIR`). Online stays the default: Beyer et al. (2022)
found fixed precomputed views overfit on long schedules (and cached views carry no colour jitter).

Reads:  teacher.pt (teacher.py), student.pt (student.py), the transfer list (transfer_set.py).
        With --from-cache: student.pt and the cache DIR only (its meta.json holds the transfer list).
Writes: student_kt.pt = {kind: "student", recipe, data_config, classes, model, args, metrics, cost};
        student_kt.pt.state while training (resumable; deleted when done);
        --cache-teacher DIR: DIR/meta.json, DIR/shard_NNNNN.pt = {index (n,), box (n,K,4) int32 top/left/
        height/width in source pixels, flip (n,K) bool, prob (n,K,k) fp16, cls (n,K,k) int16}.
Run:    python distill.py --teacher runs/eurosat/teacher.pt --student runs/eurosat/student_scratch.pt \
            --transfer runs/eurosat/transfer_target.txt --out runs/eurosat/student_kt.pt
        torchrun --nproc_per_node 8 distill.py ...   (DDP; the same script runs as one process)
        python distill.py ... --cache-teacher runs/eurosat/cache --views 10 --topk 10 --cache-only
        python distill.py --from-cache runs/eurosat/cache --student ... --epochs 10 --out ...
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import task


# ------------------------------------------------------------------------------------------ the loss
def kd_loss(student_logits, teacher_logits, T=1.0):
    """Knowledge-distillation loss, (B, C) logits -> scalar, averaged over the batch.

    KL(p_t || p_s) with p = softmax(logits / T). Softening with T > 1 exposes the teacher's ranking of
    the wrong classes; the T^2 factor keeps gradient sizes independent of T (they scale as 1/T^2).
    Computed in float32: a log-softmax in bf16 loses the small probabilities that carry the knowledge.
    """
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T * T


def kd_loss_topk(student_logits, prob, cls, T=1.0):
    """The same loss against a cached sparse teacher: top-k probabilities prob (B, k) of classes cls (B, k).

    The mass outside the top k was not stored and its spread is unknown, so the k probabilities are
    renormalised into a distribution q (zero elsewhere): the loss stays a proper KL (>= 0, zero when the
    student matches) and equals kd_loss when k = C; a finetuned teacher's top 5-10 classes hold nearly all
    the mass. q^(1/T) renormalised is softmax(teacher / T) restricted to the top k: T works as online.
    """
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1).gather(1, cls.long())  # (B, k)
    q = prob.float() ** (1 / T)
    q = q / q.sum(-1, keepdim=True)
    # xlogy: fp16 underflow leaves exact zeros, and 0 log 0 = 0
    return (torch.special.xlogy(q, q) - q * log_p_student).sum(-1).mean() * T * T


# ------------------------------------------------------------------------------------- the step
def prepare(student, teacher, device, compile=False, world=1):
    """The speed settings main() and bench.py share. Returns (student, teacher, channels_last).

    Order matters: channels_last first (it re-lays the weights), then DDP (torchrun; the frozen teacher has
    no gradients to share and is never wrapped), then torch.compile of the DDP module, which lets the
    compiler split the graph at DDP's gradient buckets and overlap their all-reduce with the backward pass.
    """
    channels_last = device.type == "cuda" and not hasattr(student, "patch_embed")
    if channels_last:  # NHWC convolutions are faster on tensor cores; a ViT student gains nothing
        student = student.to(memory_format=torch.channels_last)
    student = task.ddp(student, device, world)
    if compile:
        student = torch.compile(student)
        teacher = torch.compile(teacher) if teacher is not None else None
    return student, teacher, channels_last


def teacher_logits(teacher, x, t_cfg, autocast):
    """The frozen teacher's logits (B, C) for views x (B, 3, H, W) in [0, 1]: inference mode, no graph."""
    with torch.inference_mode(), autocast():
        t = teacher(task.normalize(x, t_cfg))
    return t.clone()  # inference tensors cannot enter autograd: a (B, C) copy, negligible


def student_step(student, opt, scaler, autocast, x, s_cfg, target, T, channels_last):
    """One optimizer step of the student towards the teacher on views x; returns the loss, on the device.

    target: teacher logits (B, C) online, or the cached (probs, classes), each (B, k). Nothing here waits
    for the GPU (no .item()): task.Progress reads the loss once per logging interval.
    """
    xs = task.normalize(x, s_cfg)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    with autocast():
        s_logits = student(xs)
    loss = kd_loss(s_logits, target, T) if torch.is_tensor(target) else kd_loss_topk(s_logits, *target, T)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


# ---------------------------------------------------------------------- the teacher-output cache
def open_or_gray(ref, root):
    """An image, or a gray 32x32 stand-in for an unreadable one: building and replay agree either way."""
    try:
        return task.open_image(ref, root)
    except (OSError, ValueError, SyntaxError) as e:
        print(f"warning: unreadable image {ref} ({type(e).__name__}): a gray stand-in", file=sys.stderr)
        return __import__("PIL.Image").Image.new("RGB", (32, 32), (128, 128, 128))


def view_params(img, views, scale, seed):
    """K views of one image: (K, 5) int32 rows (top, left, height, width, flip) in source pixels.

    The same distribution as the online transform's RandomResizedCrop + horizontal flip, seeded per image.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(views)]
        flips = (torch.rand(views) < 0.5).tolist()
    return torch.tensor([[*b, f] for b, f in zip(boxes, flips)], dtype=torch.int32)


def make_view(img, box, flip, size, interpolation):
    """Crop box (top, left, height, width) of a PIL image, resized to size x size, flipped -> (3, S, S)."""
    top, left, h, w = (int(v) for v in box)
    x = TF.resized_crop(img, top, left, h, w, [size, size], T.InterpolationMode(interpolation))
    return TF.to_tensor(TF.hflip(x) if flip else x)  # pixels in [0, 1], as online


class CacheViews(torch.utils.data.Dataset):
    """Building: image index -> (index, its K views (K, 3, S, S), their parameters (K, 5))."""

    def __init__(self, refs, meta, root):  # read through a batch sampler of image indices: no __len__
        self.refs, self.meta, self.root = refs, meta, root

    def __getitem__(self, i):
        m, img = self.meta, open_or_gray(self.refs[i], self.root)
        p = view_params(img, m["views"], (m["min_scale"], 1.0), m["seed"] * 1_000_003 + i)
        return i, torch.stack([make_view(img, q[:4], q[4], m["view_size"], m["interpolation"]) for q in p]), p


class CachedViews(torch.utils.data.Dataset):
    """Replay: (image, view) -> the exact view the teacher saw (3, S, S), and its (top-k probs, classes)."""

    def __init__(self, refs, cache, size, interpolation, root):
        self.refs, self.c, self.size, self.interpolation, self.root = refs, cache, size, interpolation, root

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, item):
        i, v = item
        img = open_or_gray(self.refs[i], self.root)
        x = make_view(img, self.c["box"][i, v], self.c["flip"][i, v], self.size, self.interpolation)
        return x, (self.c["prob"][i, v], self.c["cls"][i, v])


class ViewSampler(task.EpochSampler):
    """(image, view) pairs: epoch e replays view (e + i) mod K of image i, so K epochs see every view."""

    def __init__(self, n, views, seed, rank=0, world=1):
        super().__init__(n, seed, rank=rank, world=world)
        self.views = views

    def __iter__(self):
        return iter([(i, (self.epoch + i) % self.views) for i, _ in super().__iter__()])


def shard_path(d, s):  # DIR/shard_00042.pt holds images 42 * shard_size ...
    return os.path.join(d, f"shard_{s:05d}.pt")


def cache_meta(d, meta):
    """Write DIR/meta.json, or check that an existing one records the same settings (resume)."""
    path = os.path.join(d, "meta.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                have = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            task.fail(f"{path} is not readable ({type(e).__name__}); use another --cache-teacher directory")
        diff = [k for k in meta if k != "teacher_cost" and have.get(k) != meta[k]]
        if diff:
            task.fail(f"{d} was built with other {', '.join(diff)}; use another --cache-teacher directory")
        return have
    task.atomic_write(path, lambda f: f.write(json.dumps(meta).encode()))
    return meta


def build_cache(d, teacher, t_cfg, refs, meta, args, device, part, parts, autocast):
    """Run the teacher once over K views of every image of this part's shards; a done shard is skipped.

    --cache-part I/N (independent jobs): shards I, I + N, ...; under torchrun each rank takes every world-th
    *missing* shard, so a resumed run stays balanced. Shards are written atomically: a kill loses one.
    """
    K, size = meta["views"], meta["shard_size"]
    per = max(1, args.batch_size // K)  # images per teacher batch: per * K views
    todo = [s for s in range(math.ceil(len(refs) / size)) if not os.path.exists(shard_path(d, s))]
    todo = [s for s in todo if s % parts == part] if args.cache_part else todo[part::parts]
    batches = [list(range(a, min(a + per, (s + 1) * size, len(refs))))
               for s in todo for a in range(s * size, min((s + 1) * size, len(refs)), per)]
    task.log(0, f"cache: {len(todo)} shards to make in {d}, {K} views x top-{meta['topk']} per image")
    loader = torch.utils.data.DataLoader(CacheViews(refs, meta, args.data_root), batch_sampler=batches,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    out, t0 = [], time.time()
    for i, x, p in loader:  # i (b,), x (b, K, 3, S, S), p (b, K, 5)
        logits = teacher_logits(teacher, x.flatten(0, 1).to(device, non_blocking=True), t_cfg, autocast)
        prob, cls = logits.float().softmax(-1).topk(meta["topk"], dim=-1)  # (b * K, k), largest first
        out.append((i, p, prob.half().unflatten(0, (len(i), K)), cls.unflatten(0, (len(i), K))))
        s = int(i[0]) // size
        if int(i[-1]) + 1 == min((s + 1) * size, len(refs)):  # the shard's last batch: write it
            i, p, prob, cls = (torch.cat([o[n].cpu() for o in out]) for n in range(4))
            dtype = torch.int16 if len(meta["classes"]) < 2**15 else torch.int32
            task.save_checkpoint(dict(index=i, box=p[..., :4].clone(), flip=p[..., 4].bool(), prob=prob,
                                      cls=cls.to(dtype), batches=len(out), batch=per * K,
                                      wall_s=time.time() - t0), shard_path(d, s))
            task.log(0, f"cache: wrote {shard_path(d, s)} ({time.time() - t0:.0f}s)")
            out, t0 = [], time.time()


def load_cache(d):
    """(meta, cache, cost): every shard of DIR joined in image order; fails on a missing shard."""
    path = os.path.join(d, "meta.json")
    if not os.path.exists(path):
        task.fail(f"{d} holds no teacher cache (no meta.json): build it with --cache-teacher {d}")
    try:
        with open(path) as f:
            meta = json.load(f)
        n = math.ceil(len(meta["refs"]) / meta["shard_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        task.fail(f"{path} is not a teacher cache's meta.json ({type(e).__name__}: {e}); rebuild the cache")
    missing = [s for s in range(n) if not os.path.exists(shard_path(d, s))]
    if missing:
        task.fail(f"{d} has {n - len(missing)} of {n} shards (missing {shard_path(d, missing[0])}): "
                  "finish building it with --cache-teacher")
    shards = [task.load_checkpoint(shard_path(d, s)) for s in range(n)]
    cache = {k: torch.cat([sh[k] for sh in shards]) for k in ("index", "box", "flip", "prob", "cls")}
    if not torch.equal(cache["index"], torch.arange(len(meta["refs"]))):
        task.fail(f"{d}: shards do not cover images 0..{len(meta['refs']) - 1} in order; rebuild it")
    cost = dict(step="cache_teacher", steps=sum(sh["batches"] for sh in shards), batch=shards[0]["batch"],
                images=len(meta["refs"]) * meta["views"], wall_s=round(sum(sh["wall_s"] for sh in shards), 2))
    return meta, cache, cost


def part_of(s):
    """--cache-part I/N -> (I, N), 0 <= I < N; argparse reports a ValueError as a usage error."""
    i, n = map(int, s.split("/"))
    return (i, n) if 0 <= i < n else int("not I/N")


def get_args_parser():
    p = argparse.ArgumentParser("distill: train the student to match the finetuned teacher",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="made by teacher.py")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T; try 1-4")
    p.add_argument("--epochs", type=task.positive, default=20, help="passes over the transfer set; longer helps "
                   "(the paper trains for many epochs; Beyer et al. 2022: distillation is patient)")
    p.add_argument("--batch-size", type=task.positive, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr; scale with the batch size")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear lr warmup")
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (GPU)")
    p.add_argument("--workers", type=task.nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=task.positive, default=500, help="steps between resumable states")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_kt.pt")
    c = p.add_argument_group("teacher-output cache (FKD; online distillation is the default)")
    c.add_argument("--cache-teacher", metavar="DIR", help="run the teacher once over --views views of every "
                   "transfer image into DIR (resumable shards), then distill from DIR without the teacher")
    c.add_argument("--from-cache", metavar="DIR", help="distill from a finished cache; no teacher, no list")
    c.add_argument("--cache-only", action="store_true", help="with --cache-teacher: build it, then stop")
    c.add_argument("--cache-part", type=part_of, metavar="I/N", help="build only shards I, I+N, ... "
                   "(independent jobs in parallel; default: this torchrun rank of the world)")
    c.add_argument("--views", type=task.positive, default=10,
                   help="augmented views kept per image (K); epochs > K repeat views")
    c.add_argument("--topk", type=task.positive, default=10, help="teacher probabilities kept per view (fp16)")
    c.add_argument("--shard-size", type=task.positive, default=1000, help="images per cache shard")
    return p


def main(args):
    device, rank, world = task.setup(args.seed)
    autocast, scaler = task.amp(device)
    s_ckpt = task.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    s_cfg, teacher, cache, cache_dir = s_ckpt["data_config"], None, None, args.from_cache or args.cache_teacher
    if args.from_cache:  # replay: the teacher's cost was paid when the cache was built
        meta, cache, cache_cost = load_cache(args.from_cache)
        refs, classes, t_cost, t_arch = meta["refs"], meta["classes"], meta["teacher_cost"], meta["teacher_arch"]
    else:
        t_ckpt = task.load_checkpoint(args.teacher, kinds=("teacher",), made_by="teacher.py")
        refs, classes, t_cost, t_arch = (task.read_transfer_list(args.transfer), t_ckpt["classes"], t_ckpt["cost"],
                                         t_ckpt["recipe"]["arch"])
        teacher = task.load_model(t_ckpt).to(device).eval().requires_grad_(False)
        t_cfg = t_ckpt["data_config"]
        # One augmented view per image at the larger of the two resolutions, pixels in [0, 1];
        # task.normalize then resizes and normalises it for each model on the device.
        view = dict(s_cfg, input_size=max(t_cfg["input_size"], s_cfg["input_size"], key=lambda s: s[1]))
    if classes != s_ckpt["classes"]:
        task.fail(f"teacher has {len(classes)} classes, student {len(s_ckpt['classes'])}: "
                  "they were made for different tasks")
    if args.cache_teacher:  # FKD: the teacher labels K fixed views of each image once, into shards
        meta = cache_meta(args.cache_teacher, dict(
            teacher=os.path.abspath(args.teacher), teacher_arch=t_arch, classes=classes, teacher_cost=t_cost,
            transfer=os.path.abspath(args.transfer), refs=refs, views=args.views, seed=args.seed,
            topk=min(args.topk, len(classes)), view_size=view["input_size"][-1],
            interpolation=view["interpolation"], min_scale=args.min_scale, shard_size=args.shard_size))
        part, parts = args.cache_part or (rank, world)
        barrier = torch.distributed.barrier if world > 1 else lambda: None
        barrier()  # all ranks list the missing shards before any rank writes one
        build_cache(args.cache_teacher, teacher, t_cfg, refs, meta, args, device, part, parts, autocast)
        barrier()  # every rank's shards are on disk before any rank reads them
        if args.cache_only:
            return
        meta, cache, cache_cost = load_cache(args.cache_teacher)
        teacher = None  # frees its memory: from here on the student trains alone
    student, teacher, channels_last = prepare(task.load_model(s_ckpt).to(device), teacher, device, args.compile,
                                              world)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if cache is None:  # online: a fresh random view of every image each epoch
        data = task.Images(refs, None, task.transform(view, train=True, normalize=False,
                                                      scale=(args.min_scale, 1.0)), args.data_root)
        sampler = task.EpochSampler(len(data), args.seed, rank=rank, world=world)
    else:  # replay: exactly the views the teacher saw, each with its stored top-k
        size = max(meta["view_size"], s_cfg["input_size"][-1])  # the same box, never upsampled for the student
        data = CachedViews(refs, cache, size, meta["interpolation"], args.data_root)
        sampler = ViewSampler(len(data), meta["views"], args.seed, rank=rank, world=world)
        if args.epochs > meta["views"]:
            task.log(rank, f"note: {args.epochs} epochs over {meta['views']} cached views repeat views")
    loader = task.loader(data, args.batch_size, sampler, args.workers, drop_last=len(sampler) >
                         args.batch_size, device=device)
    per_epoch = len(sampler) // args.batch_size if len(sampler) > args.batch_size else 1
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = task.Progress(args.out + ".state", student, opt, scaler, total, args.save_every, rank,
                             args.resume)  # loads the same state into every rank's student
    student.train()
    task.log(rank, f"distill {t_arch} -> {s_ckpt['recipe']['arch']} "
                   f"{'online' if cache is None else 'from ' + cache_dir}: "
                   f"{len(refs)} transfer images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, target in loader:
                x = x.to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
                for g in opt.param_groups:
                    g["lr"] = args.lr * task.cosine_lr(progress.step, total, warmup)
                if teacher is not None:  # online: the teacher labels this view now, (B, C) logits
                    target = teacher_logits(teacher, x, t_cfg, autocast)
                else:  # cached: its top-k for exactly this view, (B, k) probs and (B, k) classes
                    target = [t.to(device, non_blocking=True) for t in target]
                loss = student_step(student, opt, scaler, autocast, x, s_cfg, target, args.temperature,
                                    channels_last)
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = progress.finish("distill", args.batch_size * world)
    cost["teacher_images"] = cost["images"] if cache is None else 0  # online: one teacher pass per image
    costs, lineage = s_ckpt["cost"] + t_cost + [cost], dict(teacher=args.teacher, transfer=args.transfer)
    if cache is not None:  # the teacher ran when the cache was built: its cost and lineage are kept there
        costs.insert(-1, cache_cost)
        lineage = dict(teacher=meta["teacher"], transfer=meta["transfer"], cache=cache_dir)
    if rank == 0:
        task.save_checkpoint(dict(
            s_ckpt, model=task.unwrap(student).state_dict(), args=task.plain(args),
            metrics=dict(distill_loss=progress.loss), cost=costs,
            lineage=dict(lineage, transfer_images=len(refs))), args.out)
        task.log(rank, f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

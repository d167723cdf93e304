"""Step 4, cached variant (FKD, Shen & Xing 2022): run the teacher once over K views of each image.

For K random crops + flips of every transfer image, store the crop box, the flip and the teacher's top-k
probabilities, so that distill_cached.py can train any number of students without the teacher. Online
distillation (distill.py) stays the default: fixed views overfit on long schedules (Beyer et al. 2022).

Reads:  teacher.pt, student.pt (the view size and interpolation), the transfer list.
Uses:   kt.cached_views, kt.data, kt.models, kt.training; kt.checkpoints, kt.claims, kt.checks; where used:
        kt.segmenters, kt.clip_towers.
Writes: OUT/meta.json and OUT/shard_NNNNN.pt (cached_views.py); done shards are kept, so a killed run
        resumes; `--part I/N` builds shards I, I+N, ... (independent jobs); under torchrun each rank a share.
Run:    python cache_teacher.py --teacher runs/eurosat/teacher.pt --student runs/eurosat/student_scratch.pt \
            --transfer runs/eurosat/transfer_target.txt --views 10 --topk 10 --out runs/eurosat/cache
"""
import argparse
import json
import math
import os
import time

import torch
import torchvision.transforms as T

from kt import checkpoints, claims, data, models, training
from kt.cached_views import cache_shard, make_view, open_or_gray, shard_done
from kt.checks import fail, nonnegative, positive, share


def view_params(img, views, scale, seed):
    """K views of one image: (K, 5) int32 rows (top, left, height, width, flip) in source pixels.

    The same distribution as the online transform's RandomResizedCrop + horizontal flip, seeded per image.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(views)]
        flips = (torch.rand(views) < 0.5).tolist()
    return torch.tensor([[*b, f] for b, f in zip(boxes, flips)], dtype=torch.int32)


class Views(torch.utils.data.Dataset):
    """Image index -> (index, its K views (K, 3, S, S), their parameters (K, 5))."""

    def __init__(self, refs, meta, root):  # read through a batch sampler of image indices: no __len__
        self.refs, self.meta, self.root = refs, meta, root

    def __getitem__(self, i):
        m, img = self.meta, open_or_gray(self.refs[i], self.root)
        p = view_params(img, m["views"], (m["min_scale"], 1.0), m["seed"] * 1_000_003 + i)
        return i, torch.stack([make_view(img, q[:4], q[4], m["view_size"], m["interpolation"]) for q in p]), p


def write_meta(cache_dir, meta):
    """Write DIR/meta.json, or check that an existing one records the same settings (resume)."""
    path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                have = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            fail(f"{path} is not readable ({type(e).__name__}); use another --out directory")
        diff = checkpoints.differences(have, {k: v for k, v in meta.items() if k != "teacher_cost"})
        if diff:
            fail(f"{cache_dir} was built with other {', '.join(diff)}; use another --out directory")
        return have
    checkpoints.atomic_write(path, lambda f: f.write(json.dumps(meta).encode()))
    return meta


def build(cache_dir, teacher, t_cfg, refs, meta, args, device, part, parts, autocast):
    """Run the teacher once over K views of every image of this part's shards; a done shard is skipped.

    --part I/N (independent jobs): shards I, I + N, ...; under torchrun each rank takes every world-th
    *missing* shard, so a resumed run stays balanced. Shards are written atomically: a kill loses one.
    """
    K, size = meta["views"], meta["shard_size"]
    per = max(1, args.batch_size // K)  # images per teacher batch: per * K views
    todo = [s for s in range(math.ceil(len(refs) / size)) if not shard_done(cache_dir, s)]  # missing or broken
    todo = [s for s in todo if s % parts == part] if args.part else todo[part::parts]
    batches = [list(range(a, min(a + per, (s + 1) * size, len(refs))))
               for s in todo for a in range(s * size, min((s + 1) * size, len(refs)), per)]
    training.log(0, f"cache: {len(todo)} shards to make in {cache_dir}, {K} views x top-{meta['topk']} per image")
    loader = torch.utils.data.DataLoader(Views(refs, meta, args.data_root), batch_sampler=batches,
                                         num_workers=min(args.workers, os.cpu_count() or 1),
                                         pin_memory=device.type == "cuda")
    out, t0 = [], time.time()
    for i, x, p in training.bar(loader, total=len(batches), unit="batch", desc="cache"):  # i (b,), x (b, K, 3, S, S)
        with torch.inference_mode(), autocast():
            logits = teacher(models.to_model_input(x.flatten(0, 1).to(device, non_blocking=True), t_cfg))
        # over the class dim: (b * K, k), or (b * K, k, h, w) per patch for segmentation; largest first
        prob, cls = logits.float().softmax(1).topk(meta["topk"], dim=1)
        out.append((i, p, prob.half().unflatten(0, (len(i), K)), cls.unflatten(0, (len(i), K))))
        s = int(i[0]) // size
        if int(i[-1]) + 1 == min((s + 1) * size, len(refs)):  # the shard's last batch: write it
            i, p, prob, cls = (torch.cat([o[n].cpu() for o in out]) for n in range(4))
            dtype = torch.int16 if len(meta["classes"]) < 2**15 else torch.int32
            checkpoints.save_checkpoint(dict(index=i, box=p[..., :4].clone(), flip=p[..., 4].bool(), prob=prob,
                                             cls=cls.to(dtype), batches=len(out), batch=per * K,
                                             wall_s=time.time() - t0), cache_shard(cache_dir, s))
            training.log(0, f"cache: wrote {cache_shard(cache_dir, s)} ({time.time() - t0:.0f}s)")
            out, t0 = [], time.time()


def part_of(s):
    """--part I/N -> (I, N) with 0 <= I < N; anything else is a usage error."""
    i, _, n = s.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ValueError(s)
    return int(i), int(n)


def get_args_parser():
    p = argparse.ArgumentParser("cache_teacher: run the teacher once over K views of every transfer image",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="made by teacher.py")
    p.add_argument("--student", default="runs/demo/student_scratch.pt", help="made by student.py: the views "
                   "are cut at the larger of the two models' resolutions, with the student's interpolation")
    p.add_argument("--transfer", default="runs/demo/transfer_target.txt", help="made by transfer_set.py")
    p.add_argument("--data-root", default="data", help="where dataset references in the list resolve")
    p.add_argument("--views", type=positive, default=10, help="augmented views kept per image (K)")
    p.add_argument("--topk", type=positive, default=10, help="teacher probabilities kept per view (fp16)")
    p.add_argument("--min-scale", type=share, default=0.08, help="smallest RandomResizedCrop area")
    p.add_argument("--shard-size", type=positive, default=1000, help="images per shard (the resume unit)")
    p.add_argument("--part", type=part_of, metavar="I/N", help="build only shards I, I+N, ... "
                   "(independent jobs in parallel; default: this torchrun rank of the world)")
    p.add_argument("--batch-size", type=positive, default=128, help="views per teacher batch")
    p.add_argument("--workers", type=nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--train-seed", type=int, default=0, help="seeds the views' crops and flips")
    p.add_argument("--amp", default="auto", choices=training.AMP_MODES, help="the teacher's precision: auto (bf16 "
                   "on a GPU that has it, else fp16; float32 on the CPU), or bf16, fp16, off on any device")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    p.add_argument("--out", default="runs/demo/cache", help="the cache directory")
    return p


def main(args):
    device, rank, world = training.setup(args.train_seed)
    autocast, _ = training.amp(device, args.amp)
    t_ckpt = checkpoints.load_checkpoint(args.teacher, kinds=("teacher",), made_by="teacher.py")
    s_ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="student.py")
    checkpoints.check_same_task(t_ckpt, "the teacher", s_ckpt, "the student")
    refs, classes = data.read_transfer_list(args.transfer), t_ckpt["classes"]
    teacher = models.load_model(t_ckpt).to(device).eval().requires_grad_(False)
    teacher = torch.compile(teacher) if args.compile else teacher
    t_cfg, s_cfg = t_ckpt["data_config"], s_ckpt["data_config"]
    meta = write_meta(args.out, dict(
        teacher=os.path.abspath(args.teacher), teacher_sha1=checkpoints.digest(args.teacher),  # one teacher a cache
        teacher_arch=t_ckpt["recipe"]["arch"], classes=classes,
        teacher_cost=t_ckpt["cost"], transfer=os.path.abspath(args.transfer), refs=refs, views=args.views,
        seed=args.train_seed, topk=min(args.topk, len(classes)),
        view_size=max(t_cfg["input_size"][-1], s_cfg["input_size"][-1]), interpolation=s_cfg["interpolation"],
        min_scale=args.min_scale, shard_size=args.shard_size,
        **({"dense": True} if checkpoints.task(t_ckpt) == "segmentation" else {})))  # per-patch probabilities
    part, parts = args.part or (rank, world)
    claims.claim(os.path.join(args.out, f"part-{part}-of-{parts}"))  # a second job of the same part fails at once
    if world > 1:
        torch.distributed.barrier()  # every rank lists the missing shards before any rank writes one
    build(args.out, teacher, t_cfg, refs, meta, args, device, part, parts, autocast)
    if world > 1:
        torch.distributed.barrier()  # every rank's shards are on disk before rank 0 says so
    claims.release(os.path.join(args.out, f"part-{part}-of-{parts}"))
    training.log(rank, f"wrote {args.out}: {len(refs)} images x {args.views} views")


if __name__ == "__main__":
    main(get_args_parser().parse_args())

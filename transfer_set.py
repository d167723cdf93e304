"""Transfer set: the unlabeled images through which the teacher's knowledge is distilled into the student.

Distillation needs images but no labels, and the paper shows that *which* images matters a lot: the task's
own unlabeled images transfer best, a generic web-scale pool much worse, and images *retrieved* from the
generic pool by similarity to the few labeled target images close most of the gap (Vemulapalli et al.,
ICML 2024, the transfer-set study and its "retrieval-augmented knowledge transfer"). This step writes the
transfer list from any mix of three sources (--source):

  target     the task's own unlabeled train images (split.json "unlabeled");
  generic    every readable image of --pool;
  retrieval  each labeled image's top-k neighbours in --pool by cosine similarity of image embeddings
             (an OpenCLIP encoder or the teacher's own backbone), minus exact duplicates, near-duplicates
             and near-copies of the target test set (test leakage).

Pools: a folder of images (searched recursively, like img2dataset's `files` output), a text file of image
paths, webdataset `.tar` shards (a folder or glob of NNNNN.tar), or a dataset split `NAME:SPLIT`.
Embeddings are cached as L2-normalised float16 .npy shards (plus their image ids) under --cache-dir, keyed
by pool and encoder: a killed run resumes at the first unfinished shard, and under torchrun each rank
embeds its share of the shards. The search is exact, streamed shard by shard (memory: queries x k + one
shard), and on the GPU when there is one. Unreadable files are skipped, counted and listed, never fatal.

Reads:  split.json (made if missing), the pool.
Writes: --out (one image reference per line: `demo:train:17`, a file path, or `SHARD.tar::MEMBER`; read by
        distill.py); with a pool also OUT.report.json; with retrieval also OUT.png (queries | neighbours).

Run:
  python transfer_set.py --dataset demo --shots 5 --source target,retrieval --pool demo:unlabeled \\
      --embed open_clip:ViT-B-32/laion2b_s34b_b79k --k 50 --out runs/demo/transfer.txt
  torchrun --nproc_per_node 8 transfer_set.py --dataset eurosat --shots 10 --source retrieval \\
      --pool '/data/datacomp/*.tar' --k 1000 --out runs/eurosat/transfer.txt
"""
import argparse
import glob
import hashlib
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import task

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "val", "test", "unlabeled")


# ---------------------------------------------------------------------------------------------- pools
def tar_refs(shards):
    """Image members of webdataset shards -> `SHARD::MEMBER` refs; a shard that is not a tar is listed bad."""
    import tarfile
    refs, bad = [], []
    for shard in shards:
        try:
            with tarfile.open(shard) as tf:
                refs += [f"{shard}::{m.name}" for m in tf.getmembers()
                         if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)]
        except (OSError, tarfile.TarError) as e:
            bad.append([shard, f"{type(e).__name__}: {e}"])
    return refs, bad


def pool_refs(pool, root):
    """--pool -> (image refs in a fixed order, [[ref, reason]] of what could not even be listed)."""
    if os.path.isdir(pool):
        shards = sorted(glob.glob(os.path.join(os.path.abspath(pool), "*.tar")))
        if shards:
            refs, bad = tar_refs(shards)
        else:  # sidecars (.json, .txt) are skipped by extension; a bad image is found when decoded
            refs, bad = sorted(os.path.abspath(os.path.join(d, f)) for d, _, fs in os.walk(pool)
                               for f in fs if f.lower().endswith(IMAGE_EXTS)), []
    elif any(c in pool for c in "*?[") or pool.endswith(".tar"):
        shards = sorted(os.path.abspath(s) for s in glob.glob(pool))
        if not shards:
            task.fail(f"--pool {pool} matches no .tar shard")
        refs, bad = tar_refs(shards)
    elif os.path.isfile(pool):  # a list of paths; relative ones are relative to the list file
        base = os.path.dirname(os.path.abspath(pool))
        try:
            with open(pool, encoding="utf-8") as f:
                refs, bad = [os.path.normpath(os.path.join(base, ln.strip())) for ln in f if ln.strip()], []
        except UnicodeDecodeError:
            task.fail(f"--pool {pool} is not a UTF-8 text file of image paths")
    elif pool.rpartition(":")[0] and pool.rpartition(":")[2] in SPLITS:
        refs, bad = task.split_refs(*pool.rsplit(":", 1), root=root)[0], []
    else:
        task.fail(f"--pool {pool}: not a folder, a file of paths, .tar shards, or DATASET:SPLIT ({SPLITS})")
    bad += [[r, "newline in the path"] for r in refs if "\n" in r]  # the transfer list is one ref a line
    refs = [r for r in refs if "\n" not in r]
    if not refs:
        task.fail(f"--pool {pool} holds no images ({len(bad)} unreadable)")
    return refs, bad


class PoolImages(torch.utils.data.Dataset):
    """(shard, i) -> (shard, i, transformed image or None, pixel hash, error). Never raises on a bad file:
    one truncated JPEG must not kill a day-long run, so the error travels with the item and collate drops it."""

    def __init__(self, refs, transform, root):
        self.refs, self.transform, self.root = refs, transform, root

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, item):
        s, i = item
        try:
            img = task.open_image(self.refs[i], self.root)  # decodes fully: truncation raises here
            digest = hashlib.sha1(repr(img.size).encode() + img.tobytes()).hexdigest()[:20]
            return s, i, self.transform(img) if self.transform else torch.zeros(0), digest, ""
        except Exception as e:  # zero-byte, truncated, not an image, missing, a broken tar member
            return s, i, None, "", f"{type(e).__name__}: {str(e)[:200]}"


def collate(batch):
    """Items of one shard -> (shard, ids, x (B,3,H,W) or None, hashes, [[id, error]] of the bad ones)."""
    ok = [b for b in batch if b[2] is not None]
    x = torch.stack([b[2] for b in ok]) if ok else None
    return batch[0][0], [b[1] for b in ok], x, [b[3] for b in ok], [[b[1], b[4]] for b in batch if b[2] is None]


# ------------------------------------------------------------------------------------------ embedding
class Embedder:
    """--embed -> .model, .fn: x (B,3,H,W) -> (B,D), .transform (PIL -> tensor), .key (for the cache)."""

    def __init__(self, spec, weights=None, pretrained="hub", seed=0):
        torch.manual_seed(seed)  # random weights (tests) are then the same in every run and on every rank
        stamp = lambda p: [p, os.path.getsize(p), os.path.getmtime(p)] if p and os.path.exists(p) else p
        if spec.startswith("teacher:"):
            ckpt = task.load_checkpoint(spec[len("teacher:"):], made_by="teacher.py")
            self.model = task.load_model(ckpt).eval()
            if isinstance(self.model, task.CLIPClassifier):  # its forward_features is the CLIP embedding
                self.fn = self.model.forward_features
            else:  # timm: the pooled, pre-logits features the teacher's head sees
                self.fn = lambda x: self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            self.transform = task.transform(ckpt["data_config"], train=False)
            self.key = ["teacher", stamp(spec[len("teacher:"):])]
            return
        if not spec.startswith("open_clip:"):
            task.fail(f"--embed {spec}: use open_clip:MODEL/TAG, open_clip:CONFIG.json or teacher:PATH")
        import open_clip
        name, _, tag = spec[len("open_clip:"):].partition("/")
        if ".json" in spec:  # a custom config (open_clip:/path/cfg.json[/TAG]), registered by file name
            path, tag = spec[len("open_clip:"):spec.index(".json") + 5], spec[spec.index(".json") + 6:]
            if not os.path.exists(path):
                task.fail(f"--embed {spec}: {path} not found")
            name = os.path.splitext(os.path.basename(path))[0]
            with open(path) as f:
                open_clip.factory._MODEL_CONFIGS[name] = json.load(f)
        if open_clip.get_model_config(name) is None:
            task.fail(f"unknown open_clip model '{name}'; see open_clip.list_models()")
        source = weights or (tag if pretrained == "hub" else None)
        if pretrained == "hub" and not source:
            task.fail(f"--embed {spec}: name a tag (MODEL/TAG), pass --embed-weights, or --embed-pretrained none")
        pp = open_clip.get_pretrained_cfg(name, tag) if tag else {}  # the tag's own mean/std/resize
        try:
            model, _, self.transform = open_clip.create_model_and_transforms(
                name, pretrained=source, image_mean=pp.get("mean"), image_std=pp.get("std"),
                image_interpolation=pp.get("interpolation"), image_resize_mode=pp.get("resize_mode"))
        except Exception as e:
            task.fail(f"could not load {spec} ({type(e).__name__}: {str(e)[:150]}); offline? --embed-weights PATH")
        self.model, self.fn = model.eval(), model.encode_image
        self.key = [name, tag, open_clip.get_model_config(name), stamp(source), None if source else seed]


def shard_file(d, s, ext):
    return os.path.join(d, f"{s:05d}{ext}")


def save_shard(d, s, z, meta):
    """Embeddings first, then the .json: the .json marks a finished shard, both written atomically."""
    task.atomic_write(shard_file(d, s, ".npy"), lambda f: np.save(f, z))
    task.atomic_write(shard_file(d, s, ".json"), lambda f: f.write(json.dumps(meta).encode()))


def embed(refs, kind, name, emb, args, device, rank, world):
    """Embed refs into CACHE/NAME-KEY/, shard s = refs[s*S:(s+1)*S]: NNNNN.npy (n_ok, D) float16, unit
    norm, and NNNNN.json {ids, hashes, bad}. Finished shards are skipped; this rank does s % world == rank.
    Returns (dir, number of shards)."""
    S = args.shard_size
    h = hashlib.sha1(json.dumps([emb.key, S], default=str).encode())
    for r in refs:  # the key covers every ref: a changed pool gets a new cache
        h.update(r.encode() + b"\n")
    key = h.hexdigest()[:12]
    d = os.path.join(args.cache_dir, f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-50:]}-{key}")
    n = -(-len(refs) // S)
    todo = [s for s in range(rank, n, world) if not os.path.exists(shard_file(d, s, ".json"))]
    B = args.batch_size
    batches = [[(s, i) for i in range(j, min(j + B, (s + 1) * S, len(refs)))]
               for s in todo for j in range(s * S, min((s + 1) * S, len(refs)), B)]
    left = {s: sum(b[0][0] == s for b in batches) for s in todo}  # batches until shard s is complete
    cuda = device.type == "cuda"
    dl = torch.utils.data.DataLoader(  # decoding in workers, ordered, pinned: the encoder never waits
        PoolImages(refs, emb.transform, args.data_root), batch_sampler=batches, num_workers=args.workers,
        collate_fn=collate, pin_memory=cuda)
    autocast, _ = task.amp(device)
    acc, t0, done = {}, time.time(), 0
    for s, ids, x, hashes, bad in (dl if batches else []):
        a = acc.setdefault(s, dict(z=[], ids=[], hashes=[], bad=[]))
        if x is not None:
            with torch.no_grad(), autocast():
                z = F.normalize(emb.fn(x.to(device, non_blocking=True)).float(), dim=-1)  # (B, D)
            a["z"].append(z.half().cpu().numpy())
        a["ids"] += ids
        a["hashes"] += hashes
        a["bad"] += [[refs[i], err] for i, err in bad]
        done += len(ids) + len(bad)
        left[s] -= 1
        if left[s] == 0:
            a = acc.pop(s)
            z = np.concatenate(a.pop("z")) if a["z"] else np.zeros((0, 0), np.float16)
            save_shard(d, s, z, a)
            task.log(rank, f"{kind} {name}: shard {s + 1}/{n} embedded ({done / (time.time() - t0):.0f} img/s)")
    return d, n


def shards(d, n):
    """Yield each finished shard as (z (n_ok, D) float16, ids (n_ok,) int64, meta dict)."""
    for s in range(n):
        if not os.path.exists(shard_file(d, s, ".json")):
            task.fail(f"{shard_file(d, s, '.json')} missing: did a rank die? rerun to finish it")
        with open(shard_file(d, s, ".json")) as f:
            meta = json.load(f)
        yield np.load(shard_file(d, s, ".npy")), np.asarray(meta["ids"], dtype=np.int64), meta


# --------------------------------------------------------------------------------------------- search
def topk_lowest(s, k):
    """torch.topk along dim 1, except that among equal scores the lower column wins (topk's pick among
    ties is arbitrary). s (Q, n) -> (scores (Q, k), columns (Q, k)), k <= n. One extra candidate shows
    whether a tie crosses the k-th place; only those (rare) rows are redone, exactly."""
    v, c = s.topk(min(k + 1, s.shape[1]), dim=1)
    if v.shape[1] == k:  # k == n: every column is taken
        return v, c
    amb = (v[:, k] == v[:, k - 1]).nonzero().flatten()
    v, c = v[:, :k].clone(), c[:, :k].clone()
    if len(amb):
        sa, ka = s[amb], v[amb, k - 1:]  # (A, n), (A, 1) the tied k-th score
        need = k - (sa > ka).sum(1, keepdim=True)  # tied columns that fit, taken from the left
        keep = (sa > ka) | ((sa == ka) & ((sa == ka).cumsum(1) <= need))  # exactly k per row
        c[amb] = keep.nonzero()[:, 1].view(len(amb), k)
        v[amb] = sa.gather(1, c[amb])
    return v, c


def merge(s, i, k):
    """Best k of candidates (Q, m) by score, then lower id: sort by id, then a stable sort by score."""
    o = i.argsort(1)
    s, i = s.gather(1, o), i.gather(1, o)
    o = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, o), i.gather(1, o)


def search(queries, pool, k, device, chunk=16384):
    """Exact inner-product top-k of queries (Q, D) over pool = iterable of (emb (n, D), ids (n,)) shards,
    ids ascending within a shard. A running (Q, k) top-k is merged with each chunk's, so memory is
    Q x k plus one shard (plus Q x chunk scores). Returns (scores, ids) (Q, min(k, pool size)), best
    first, ties -> lower id first. (TF32 on the GPU is exact here: the cached embeddings are float16.)"""
    q = torch.as_tensor(queries).to(device, torch.float32)
    best_s = torch.empty(len(q), 0, device=device)
    best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
    buf = torch.empty(0, device=device)  # scores (Q, chunk), reused: no fresh 100 MB block per chunk
    for z, ids in pool:
        z, ids = torch.as_tensor(z).to(device, torch.float32), torch.as_tensor(ids).to(device)
        for a in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - a)
            if buf.numel() < len(q) * n:
                buf = torch.empty(len(q) * n, device=device)
            s = torch.mm(q, z[a:a + n].T, out=buf[:len(q) * n].view(len(q), n))  # (Q, n) cosines
            v, c = topk_lowest(s, min(k, n))
            best_s, best_i = merge(torch.cat([best_s, v], 1), torch.cat([best_i, ids[a + c]], 1), k)
    return best_s.cpu(), best_i.cpu()


# ------------------------------------------------------------------------------------------ selection
def near_duplicates(z, thr, device, chunk=1024, block=65536):
    """Greedy in priority order: drop row j if its cosine with an earlier kept row exceeds thr.
    z (R, D) unit rows, best first -> drop (R,) bool. Exact greedy; the Python loop runs only over the
    rows of a chunk that conflict with another row of the same chunk."""
    z = torch.as_tensor(z).to(device, torch.float32)
    drop = torch.zeros(len(z), dtype=torch.bool)
    for a in range(0, len(z), chunk):
        c = z[a:a + chunk]
        kept = (~drop[:a]).nonzero().flatten()
        for b in range(0, len(kept), block):  # vs every row kept in earlier chunks, blockwise
            drop[a:a + chunk] |= ((c @ z[kept[b:b + block].to(device)].T) > thr).any(1).cpu()
        conflict = ((c @ c.T) > thr).triu(1).cpu()  # (c, c): row i knocks out later row j
        d = drop[a:a + chunk]
        for i in conflict.any(1).nonzero().flatten().tolist():
            if not d[i]:
                d |= conflict[i]
    return drop.numpy()


def stats(x):
    x = np.asarray(x, dtype=np.float64)
    return {} if x.size == 0 else dict(min=float(x.min()), mean=float(x.mean()),
                                       median=float(np.median(x)), max=float(x.max()))


def contact_sheet(rows, root, size=64, pad=4):
    """[(query ref, [neighbour refs])] -> PIL image, one row per query: query, gap, its neighbours."""
    from PIL import Image
    ncol = 1 + max(len(n) for _, n in rows)
    sheet = Image.new("RGB", (ncol * (size + pad) + 3 * pad, len(rows) * (size + pad)), "white")
    for r, (q, ns) in enumerate(rows):
        for c, ref in enumerate([q] + ns):
            sheet.paste(task.open_image(ref, root).resize((size, size)),
                        (c * (size + pad) + (3 * pad if c else 0), r * (size + pad)))
    return sheet


def retrieve(refs, args, split, device, rank, world):
    """Embed queries, target test split and pool; search; filter. Rank 0 returns (kept refs, report,
    contact sheet); other ranks return None after embedding their shards."""
    emb = Embedder(args.embed, args.embed_weights, args.embed_pretrained, args.seed)
    emb.model.to(device)
    q_refs = task.split_refs(args.dataset, "train", split["labeled"], args.data_root)[0]
    t_refs = task.split_refs(args.dataset, "test", None, args.data_root)[0] if args.leak_threshold <= 1 else []
    tag = f"{args.dataset}-{args.shots}shot-seed{args.seed}"
    dq, dt, dp = (embed(r, kind, n, emb, args, device, rank, world) for r, kind, n in
                  [(q_refs, "queries", tag), (t_refs, "test", args.dataset), (refs, "pool", args.pool)])
    if world > 1:
        torch.distributed.barrier()  # every rank's shards are on disk
    if rank != 0:
        return None
    readable_queries = [(z, i) for z, i, _ in shards(*dq) if len(i)]
    if not readable_queries:
        task.fail(f"none of the {len(q_refs)} labeled images could be read: nothing to retrieve with")
    qz, qi = (np.concatenate(x) for x in zip(*readable_queries))
    top_s, top_i = search(qz, ((z, i) for z, i, _ in shards(*dp)), args.k, device)  # (Q, k)
    # the union of all queries' top-k, best first: each image ranked by its best score, ties by pool index
    fs, fi = top_s.flatten().numpy(), top_i.flatten().numpy()
    o = np.lexsort((fi, -fs))
    first = np.sort(np.unique(fi[o], return_index=True)[1])
    cand, best = fi[o][first], fs[o][first]
    rz, pos = np.zeros((len(cand), qz.shape[1]), np.float16), {int(c): n for n, c in enumerate(cand)}
    bad, hashes = [], {}
    for z, i, m in shards(*dp):  # fetch the retrieved rows' embeddings and pixel hashes
        bad += m["bad"]
        for r in np.flatnonzero(np.isin(i, cand)):
            rz[pos[int(i[r])]], hashes[int(i[r])] = z[r], m["hashes"][r]
    exact = np.ones(len(cand), bool)  # exact duplicates: same decoded pixels; the best-ranked copy stays
    exact[np.unique([hashes[int(c)] for c in cand], return_index=True)[1].astype(int)] = False
    leak_s = search(rz, ((z, i) for z, i, _ in shards(*dt)), 1, device)[0]  # (R, 1) nearest test image
    leak = ~exact & (leak_s[:, 0].numpy() > args.leak_threshold) if leak_s.shape[1] else np.zeros_like(exact)
    near = np.zeros_like(exact)
    rest = np.flatnonzero(~exact & ~leak)
    near[rest] = near_duplicates(rz[rest], args.dedup_threshold, device)
    keep = ~exact & ~leak & ~near
    kept = cand[keep]
    per_query = np.isin(top_i.numpy(), kept).sum(1)
    report = dict(
        pool=args.pool, embed=args.embed, k=args.k, queries=len(qi), unreadable_queries=len(q_refs) - len(qi),
        pool_images=len(refs), retrieved=len(cand), kept=int(keep.sum()),
        dropped=dict(exact_duplicates=int(exact.sum()), near_duplicates=int(near.sum()),
                     leaks=int(leak.sum()), unreadable=len(bad)),
        thresholds=dict(dedup=args.dedup_threshold, leak=args.leak_threshold),
        similarity=dict(topk=stats(top_s.numpy()), kept_best=stats(best[keep]),
                        nearest_test=stats(leak_s.numpy())),
        images_per_query=dict(stats(per_query), per_query={q_refs[j]: int(c) for j, c in zip(qi, per_query)}),
        unreadable_files=bad, cache=[dq[0], dt[0], dp[0]])
    show = np.linspace(0, len(qi) - 1, min(args.sheet, len(qi))).round().astype(int)
    kept_set = set(kept.tolist())
    rows = [(q_refs[qi[j]], [refs[c] for c in top_i[j].tolist() if c in kept_set][:args.sheet]) for j in show]
    rows = [r for r in rows if r[1]]
    return [refs[c] for c in kept], report, contact_sheet(rows, args.data_root) if rows else None


def readable(refs, args):
    """Decode every image once (in DataLoader workers): -> (readable refs, [[ref, error]])."""
    dl = torch.utils.data.DataLoader(PoolImages(refs, None, args.data_root), collate_fn=collate,
                                     batch_size=args.batch_size, num_workers=args.workers,
                                     sampler=[(0, i) for i in range(len(refs))])
    ok, bad = [], []
    for _, ids, _, _, b in dl:
        ok += [refs[i] for i in ids]
        bad += [[refs[i], err] for i, err in b]
    return ok, bad


def get_args_parser():
    p = argparse.ArgumentParser(description="Build the transfer set (the images distill.py trains on).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    task.add_task_args(p)  # --dataset --data-root --shots --seed --split: the labeled images are the queries
    p.add_argument("--source", default="target",
                   help="comma list of target, generic, retrieval; try target,retrieval when few unlabeled")
    p.add_argument("--pool", help="folder of images, text file of paths, .tar shards (folder or glob), "
                                  "or DATASET:SPLIT such as stl10:unlabeled")
    p.add_argument("--out", default="runs/demo/transfer_target.txt", help="the transfer list (one ref a line)")
    p.add_argument("--embed", default="open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
                   help="retrieval encoder: open_clip:MODEL/TAG, open_clip:CFG.json, or teacher:PATH/teacher.pt")
    p.add_argument("--embed-weights", help="local open_clip weights file (offline) instead of the hub")
    p.add_argument("--embed-pretrained", default="hub", choices=["hub", "none"],
                   help="none: random weights (tests only; the neighbours are then meaningless)")
    p.add_argument("--k", type=task.positive, default=100,
                   help="neighbours per labeled image (balanced); more: a larger, less on-task set; try 100-1000")
    p.add_argument("--dedup-threshold", type=float, default=0.95,
                   help="drop a retrieved image this cosine-close to a better-ranked one (lower: stricter)")
    p.add_argument("--leak-threshold", type=float, default=0.95,
                   help="drop a retrieved image this cosine-close to a target test image; above 1: no check")
    p.add_argument("--cache-dir", default="runs/embeddings", help="embedding shards, reused across runs")
    p.add_argument("--shard-size", type=task.positive, default=10000, help="images per cached shard (resume unit)")
    p.add_argument("--batch-size", type=task.positive, default=256, help="encoder batch")
    p.add_argument("--workers", type=task.nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--sheet", type=task.positive, default=8, help="queries (and neighbours each) in the contact sheet")
    return p


def main(args):
    sources = [s for s in args.source.split(",") if s]
    if not sources or set(sources) - {"target", "generic", "retrieval"}:
        task.fail(f"--source {args.source}: a comma list of target, generic, retrieval")
    if {"generic", "retrieval"} & set(sources) and not args.pool:
        task.fail("--source generic/retrieval needs --pool")
    if args.k < 1 or args.shard_size < 1 or args.batch_size < 1:
        task.fail("--k, --shard-size and --batch-size must be at least 1")
    device, rank, world = task.setup(args.seed)
    split = task.load_split(args.split, args.dataset, args.shots, args.seed, args.data_root)
    refs, bad = pool_refs(args.pool, args.data_root) if args.pool and sources != ["target"] else ([], [])
    out, report, sheet = [], dict(pool=args.pool, pool_images=len(refs)), None
    if "retrieval" in sources:
        got = retrieve(refs, args, split, device, rank, world)
        if got is None:
            return  # not rank 0: its shards are done
        kept, report, sheet = got
        report["unreadable_files"] = bad + report["unreadable_files"]
        report["dropped"]["unreadable"] = len(report["unreadable_files"])
    elif rank != 0:
        return
    if "target" in sources:
        out += task.split_refs(args.dataset, "train", split["unlabeled"], args.data_root)[0]
    if "generic" in sources:
        if "retrieval" in sources:  # the whole pool was decoded for embedding already
            skip = {r for r, _ in report["unreadable_files"]}
            out += [r for r in refs if r not in skip]
        else:
            ok, more = readable(refs, args)
            out += ok
            report.update(unreadable_files=bad + more, dropped=dict(unreadable=len(bad + more)))
    if "retrieval" in sources:
        out += kept
    out = list(dict.fromkeys(out))  # one copy of each ref: target, then generic, then retrieved images
    n_bad = len(report.get("unreadable_files", []))
    if not out:
        task.fail(f"the transfer set from --source {args.source} is empty (pool: {len(refs)} images, "
                  f"{n_bad} unreadable); try another --pool, a larger --k, or add target")
    task.log(rank, f"transfer set: {len(out)} images from {args.source}" + (f", {n_bad} unreadable skipped"
                                                                           if n_bad else ""))
    task.atomic_write(args.out, lambda f: f.write("".join(r + "\n" for r in out).encode("utf-8")))
    stem = os.path.splitext(args.out)[0]
    if args.pool and sources != ["target"]:
        report["sources"], report["transfer_set"] = sources, len(out)
        task.atomic_write(stem + ".report.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    if sheet is not None:
        task.atomic_write(stem + ".png", lambda f: sheet.save(f, format="PNG"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

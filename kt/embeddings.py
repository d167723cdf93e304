"""Image embeddings for retrieval, cached on disk in resumable shards.

Encoder(spec): an OpenCLIP image tower (`open_clip:MODEL/TAG`, or a .json config) with its own
preprocessing, a timm network's pooled features (`timm:NAME`: DINOv3, SigLIP 2, PE-Core, C-RADIO, AIMv2,
...), or a finetuned teacher's (`teacher:PATH`). embed_shards() writes
CACHE/KIND-NAME-KEY/NNNNN.npy (float16 (n, D), unit norm) and NNNNN.json ({ids, hashes, bad}), the .json
last: a killed run skips finished shards; under torchrun rank r embeds shards r, r + world, ...
"""
import hashlib
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from kt import checkpoints, claims, models, training
from kt.checks import fail
from kt.pools import PoolImages, collate


class Encoder:
    """--embed -> .model, .fn: x (B,3,H,W) -> (B,D), .transform (PIL -> tensor), .key (names the cache)."""

    def __init__(self, spec, weights=None, pretrained="hub", seed=0):
        torch.manual_seed(seed)  # random weights (tests) are then the same in every run and on every rank
        stamp = lambda p: [p, os.path.getsize(p), os.path.getmtime(p)] if p and os.path.exists(p) else p
        if spec.startswith("teacher:"):  # the finetuned teacher's pooled embedding (a segmenter's: averaged)
            ckpt = checkpoints.load_checkpoint(spec[len("teacher:"):], made_by="teacher.py")
            self.model, self.fn = models.load_model(ckpt).eval(), self.pooled
            self.transform = models.transform(ckpt["data_config"], train=False)
            self.key = ["teacher", stamp(spec[len("teacher:"):])]
        elif spec.startswith("timm:"):  # a VFM as it was pretrained: its pooled embedding, its data config
            self.model, _, cfg = models.create_model(spec[len("timm:"):], 1, pretrained=pretrained == "hub" and not weights,
                                                     weights=weights)
            self.model, self.fn = self.model.eval(), self.pooled
            self.transform = models.transform(cfg, train=False)
            self.key = ["timm", spec, stamp(weights), None if weights or pretrained == "hub" else seed]
        elif spec.startswith("open_clip:"):
            from kt import clip_towers
            self.model, self.fn, self.transform, key = clip_towers.encoder(spec[len("open_clip:"):], weights,
                                                                           pretrained)
            source = weights or (key[1] if pretrained == "hub" else None)
            self.key = key + [stamp(source), None if source else seed]
        else:
            fail(f"--embed {spec}: use open_clip:MODEL/TAG, open_clip:CONFIG.json, timm:NAME or teacher:PATH")

    def pooled(self, x):
        """x (B, 3, H, W) -> (B, D): a checkpoint's image embedding, averaged over locations if it is a map."""
        z = models.image_embedding(self.model, x)
        return z.mean((2, 3)) if z.dim() == 4 else z


def embedding_file(cache_dir, s, ext):
    """CACHE/.../NNNNN.npy or .json: shard s of an embedding cache."""
    return os.path.join(cache_dir, f"{s:05d}{ext}")


def save_shard(cache_dir, s, z, meta):
    """Embeddings first, then the .json: the .json marks a finished shard, both written atomically."""
    checkpoints.atomic_write(embedding_file(cache_dir, s, ".npy"), lambda f: np.save(f, z))
    checkpoints.atomic_write(embedding_file(cache_dir, s, ".json"), lambda f: f.write(json.dumps(meta).encode()))


def embed_shards(refs, kind, name, encoder, args, device, rank=0, world=1):
    """Embed refs into args.cache_dir/KIND-NAME-KEY/, shard s = refs[s*S:(s+1)*S] (S = args.shard_size).

    Finished shards are skipped; this rank does s % world == rank. Returns (dir, number of shards).
    """
    S = args.shard_size
    h = hashlib.sha1(json.dumps([encoder.key, S], default=str).encode())
    stat = {}
    for r in refs:  # the key covers every ref, and each file's size and time: a changed pool gets a new cache
        f = r.split("::")[0]  # a tar member: its shard
        if f not in stat:
            st = os.stat(f) if os.path.isfile(f) else None
            stat[f] = (st.st_size, st.st_mtime_ns) if st else ()
        h.update(f"{r}\0{stat[f]}\n".encode())
    key = h.hexdigest()[:12]
    d = os.path.join(args.cache_dir, f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-50:]}-{key}")
    n = -(-len(refs) // S)
    if rank == 0:
        claims.remove_dead_temps(os.path.join(d, ""))  # what killed writers left
    todo = [s for s in range(rank, n, world) if not shard_done(d, s)]  # missing or broken shards
    B = args.batch_size
    batches = [[(s, i) for i in range(j, min(j + B, (s + 1) * S, len(refs)))]
               for s in todo for j in range(s * S, min((s + 1) * S, len(refs)), B)]
    left = {s: sum(b[0][0] == s for b in batches) for s in todo}  # batches until shard s is complete
    dl = torch.utils.data.DataLoader(  # decoding in workers, ordered, pinned: the encoder never waits
        PoolImages(refs, encoder.transform, args.data_root), batch_sampler=batches, collate_fn=collate,
        num_workers=min(args.workers, os.cpu_count() or 1), pin_memory=device.type == "cuda")
    autocast, _ = training.amp(device)
    acc, t0, done = {}, time.time(), 0
    for s, ids, x, hashes, bad in training.bar(dl if batches else [], rank, total=len(batches), unit="batch",
                                               desc=f"embed {kind}"):
        a = acc.setdefault(s, dict(z=[], ids=[], hashes=[], bad=[]))
        if x is not None:
            with torch.no_grad(), autocast():
                z = F.normalize(encoder.fn(x.to(device, non_blocking=True)).float(), dim=-1)  # (B, D)
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
            training.log(rank, f"{kind} {name}: shard {s + 1}/{n} embedded ({done / (time.time() - t0):.0f} img/s)")
    return d, n


def shard_done(cache_dir, s):
    """Whether shard s is whole: its .json (written last) and .npy read back, with one row per id."""
    try:
        with open(embedding_file(cache_dir, s, ".json")) as f:
            meta = json.load(f)
        z = np.load(embedding_file(cache_dir, s, ".npy"), mmap_mode="r")  # the header alone
        return len(z) == len(meta["ids"]) == len(meta["hashes"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_shards(cache_dir, n):
    """Yield each finished shard as (z (n_ok, D) float16, ids (n_ok,) int64, meta dict)."""
    for s in range(n):
        if not shard_done(cache_dir, s):
            fail(f"{embedding_file(cache_dir, s, '.json')} is missing or broken: rerun to make it again (did a "
                 "rank die?)")
        with open(embedding_file(cache_dir, s, ".json")) as f:
            meta = json.load(f)
        yield np.load(embedding_file(cache_dir, s, ".npy")), np.asarray(meta["ids"], dtype=np.int64), meta


def read_embeddings(cache):
    """All readable rows of a cache -> (z (n, D) float16, ids (n,)); None when none could be read."""
    rows = [(z, i) for z, i, _ in read_shards(*cache) if len(i)]
    return tuple(np.concatenate(x) for x in zip(*rows)) if rows else None


class EmbeddedPool:
    """A pool's embedding cache, as transfer_set.py searches it: pool() streams its shards, rows(ids) reads
    some rows back with their pixel hashes (exact duplicates)."""

    def __init__(self, cache, shards, size, dim):
        self.cache, self.shards, self.size, self.dim = cache, shards, size, dim
        self.unreadable = [bad for _, _, m in read_shards(cache, shards) for bad in m["bad"]]

    def __call__(self):
        return ((z, i) for z, i, _ in read_shards(self.cache, self.shards))

    def rows(self, ids):
        """(embeddings (R, D) float16, {id: pixel hash}) of pool ids, in the order of `ids`."""
        z_out, hashes, pos = np.zeros((len(ids), self.dim), np.float16), {}, {int(c): n for n, c in enumerate(ids)}
        for z, i, m in read_shards(self.cache, self.shards):
            for r in np.flatnonzero(np.isin(i, ids)):
                z_out[pos[int(i[r])]], hashes[int(i[r])] = z[r], m["hashes"][r]
        return z_out, hashes

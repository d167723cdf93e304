"""Image embeddings for retrieval, cached on disk in resumable shards.

Encoder(spec): an OpenCLIP image tower (`open_clip:MODEL/TAG`, or a .json config) with its own
preprocessing, or a finetuned teacher's pooled features (`teacher:PATH`). embed_shards() writes
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

import checkpoints
import models
import segmenters
import training
from checks import fail
from pools import PoolImages, collate


class Encoder:
    """--embed -> .model, .fn: x (B,3,H,W) -> (B,D), .transform (PIL -> tensor), .key (names the cache)."""

    def __init__(self, spec, weights=None, pretrained="hub", seed=0):
        torch.manual_seed(seed)  # random weights (tests) are then the same in every run and on every rank
        stamp = lambda p: [p, os.path.getsize(p), os.path.getmtime(p)] if p and os.path.exists(p) else p
        if spec.startswith("teacher:"):
            ckpt = checkpoints.load_checkpoint(spec[len("teacher:"):], made_by="teacher.py")
            self.model = models.load_model(ckpt).eval()
            if isinstance(self.model, segmenters.Segmenter):  # a segmenter: its last feature map, averaged
                self.fn = lambda x: self.model.features(x)[-1].mean((2, 3))
            elif isinstance(self.model, models.CLIPClassifier):  # its forward_features is the CLIP embedding
                self.fn = self.model.forward_features
            else:  # timm: the pooled, pre-logits features the teacher's head sees
                self.fn = lambda x: self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            self.transform = models.transform(ckpt["data_config"], train=False)
            self.key = ["teacher", stamp(spec[len("teacher:"):])]
            return
        if not spec.startswith("open_clip:"):
            fail(f"--embed {spec}: use open_clip:MODEL/TAG, open_clip:CONFIG.json or teacher:PATH")
        import open_clip
        name, _, tag = spec[len("open_clip:"):].partition("/")
        if ".json" in spec:  # a custom config (open_clip:/path/cfg.json[/TAG]), registered by file name
            path, tag = spec[len("open_clip:"):spec.index(".json") + 5], spec[spec.index(".json") + 6:]
            if not os.path.exists(path):
                fail(f"--embed {spec}: {path} not found")
            name = os.path.splitext(os.path.basename(path))[0]
            with open(path) as f:
                open_clip.factory._MODEL_CONFIGS[name] = json.load(f)
        if open_clip.get_model_config(name) is None:
            fail(f"unknown open_clip model '{name}'; see open_clip.list_models()")
        source = weights or (tag if pretrained == "hub" else None)
        if pretrained == "hub" and not source:
            fail(f"--embed {spec}: name a tag (MODEL/TAG), pass --embed-weights, or --embed-pretrained none")
        pp = open_clip.get_pretrained_cfg(name, tag) if tag else {}  # the tag's own mean/std/resize
        try:
            model, _, self.transform = open_clip.create_model_and_transforms(
                name, pretrained=source, image_mean=pp.get("mean"), image_std=pp.get("std"),
                image_interpolation=pp.get("interpolation"), image_resize_mode=pp.get("resize_mode"))
        except Exception as e:
            fail(f"could not load {spec} ({type(e).__name__}: {str(e)[:150]}); offline? --embed-weights PATH")
        self.model, self.fn = model.eval(), model.encode_image
        self.key = [name, tag, open_clip.get_model_config(name), stamp(source), None if source else seed]


def shard_path(cache_dir, s, ext):
    return os.path.join(cache_dir, f"{s:05d}{ext}")


def save_shard(cache_dir, s, z, meta):
    """Embeddings first, then the .json: the .json marks a finished shard, both written atomically."""
    checkpoints.atomic_write(shard_path(cache_dir, s, ".npy"), lambda f: np.save(f, z))
    checkpoints.atomic_write(shard_path(cache_dir, s, ".json"), lambda f: f.write(json.dumps(meta).encode()))


def embed_shards(refs, kind, name, encoder, args, device, rank=0, world=1):
    """Embed refs into args.cache_dir/KIND-NAME-KEY/, shard s = refs[s*S:(s+1)*S] (S = args.shard_size).

    Finished shards are skipped; this rank does s % world == rank. Returns (dir, number of shards).
    """
    S = args.shard_size
    h = hashlib.sha1(json.dumps([encoder.key, S], default=str).encode())
    for r in refs:  # the key covers every ref: a changed pool gets a new cache
        h.update(r.encode() + b"\n")
    key = h.hexdigest()[:12]
    d = os.path.join(args.cache_dir, f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-50:]}-{key}")
    n = -(-len(refs) // S)
    todo = [s for s in range(rank, n, world) if not os.path.exists(shard_path(d, s, ".json"))]
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


def read_shards(cache_dir, n):
    """Yield each finished shard as (z (n_ok, D) float16, ids (n_ok,) int64, meta dict)."""
    for s in range(n):
        if not os.path.exists(shard_path(cache_dir, s, ".json")):
            fail(f"{shard_path(cache_dir, s, '.json')} missing: did a rank die? rerun to finish it")
        with open(shard_path(cache_dir, s, ".json")) as f:
            meta = json.load(f)
        yield np.load(shard_path(cache_dir, s, ".npy")), np.asarray(meta["ids"], dtype=np.int64), meta

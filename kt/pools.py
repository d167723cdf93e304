"""Image pools for transfer sets: a folder, a text file of paths, webdataset .tar shards, DATASET:SPLIT, or
hf:NAME:SPLIT (any split of a Hugging Face dataset, kt.hf_datasets).

pool_refs(pool) lists a pool's images as references (data.open_image opens them); PoolImages decodes them
in DataLoader workers and never raises on a bad file: the error travels with the item and is counted.
"""
import glob
import hashlib
import os
import tarfile

import torch

from kt import data, training
from kt.checks import IMAGE_EXTS, fail


def tar_refs(shards):
    """Image members of webdataset shards -> `SHARD::MEMBER` refs; a shard that is not a tar is listed bad."""
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
            fail(f"--pool {pool} matches no .tar shard")
        refs, bad = tar_refs(shards)
    elif os.path.isfile(pool):  # a list of paths; relative ones are relative to the list file
        base = os.path.dirname(os.path.abspath(pool))
        try:
            with open(pool, encoding="utf-8") as f:
                refs, bad = [os.path.normpath(os.path.join(base, ln.strip())) for ln in f if ln.strip()], []
        except UnicodeDecodeError:
            fail(f"--pool {pool} is not a UTF-8 text file of image paths")
    elif pool.startswith("hf:"):  # a Hugging Face dataset's split, any of its own: its images, no labels needed
        from kt import hf_datasets
        name, _, split = pool.rpartition(":")
        if not name.startswith("hf:") or len(name) == 3 or not hf_datasets.SPLIT_NAME.fullmatch(split):
            fail(f"--pool {pool}: an hf: pool names the dataset and one of its splits, hf:NAME[:CONFIG]:SPLIT")
        images = hf_datasets.open_split(name, split)
        refs, bad = [images.ref(i) for i in range(len(images))], []
    elif pool.rpartition(":")[0]:  # a dataset's split, by name (kt.catalog: imported for these pools alone)
        from kt import catalog
        if pool.rpartition(":")[2] not in catalog.SPLITS:
            fail(f"--pool {pool}: DATASET:SPLIT names one of the splits {catalog.SPLITS}")
        refs, bad = catalog.split_refs(*pool.rsplit(":", 1), root=root)[0], []
    else:
        fail(f"--pool {pool}: not a folder, a file of paths, .tar shards, DATASET:SPLIT or hf:NAME:SPLIT")
    bad += [[r, "newline in the path"] for r in refs if "\n" in r]  # the transfer list is one ref a line
    refs = [r for r in refs if "\n" not in r]
    if not refs:
        fail(f"--pool {pool} holds no images ({len(bad)} unreadable)")
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
            img = data.open_image(self.refs[i], self.root)  # decodes fully: truncation raises here
            digest = hashlib.sha1(repr(img.size).encode() + img.tobytes()).hexdigest()[:20]
            return s, i, self.transform(img) if self.transform else torch.zeros(0), digest, ""
        except (Exception, SystemExit) as e:  # zero-byte, truncated, not an image, missing, a broken tar member
            return s, i, None, "", f"{type(e).__name__}: {str(e)[:200]}"


def collate(batch):
    """Items of one shard -> (shard, ids, x (B,3,H,W) or None, hashes, [[id, error]] of the bad ones)."""
    ok = [b for b in batch if b[2] is not None]
    x = torch.stack([b[2] for b in ok]) if ok else None
    return batch[0][0], [b[1] for b in ok], x, [b[3] for b in ok], [[b[1], b[4]] for b in batch if b[2] is None]


def decode_all(refs, batch_size, workers, root):
    """Decode every image once (in DataLoader workers): -> (readable refs, [[ref, error]])."""
    dl = torch.utils.data.DataLoader(PoolImages(refs, None, root), collate_fn=collate, batch_size=batch_size,
                                     num_workers=min(workers, os.cpu_count() or 1),
                                     sampler=[(0, i) for i in range(len(refs))])
    ok, bad = [], []
    for _, ids, _, _, b in training.bar(dl, unit="batch", desc="decode"):
        ok += [refs[i] for i in ids]
        bad += [[refs[i], err] for i, err in b]
    return ok, bad


def named(path, refs, pool):
    """The paper's own transfer sets: a list of a pool's image names, one a line (its
    yfcc_retrieved_images_with_1200query.txt), each found in the local copy of the pool: a bare name by its
    file name or stem, a name with folders by the end of its path (a tar member's too). A name that the pool
    lacks, or that two of its images carry, is refused in one line; a name listed again is taken once."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --names {path} ({type(e).__name__})")
    by_name, by_stem = {}, {}
    for r in refs:
        base = os.path.basename(r.split("::")[-1])
        by_name.setdefault(base, []).append(r)
        by_stem.setdefault(os.path.splitext(base)[0], []).append(r)

    def images_named(n):
        base = os.path.basename(n)
        if base != n:  # folders too: the pool image whose path ends with them
            return [r for r in by_name.get(base, []) if ("/" + r.split("::")[-1]).endswith("/" + n.lstrip("/"))]
        return by_name.get(n) or by_stem.get(n, [])
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        training.log(0, f"--names {path}: {len(names) - len(unique)} lines repeat a name; each image is taken once")
    found = {n: images_named(n) for n in unique}
    missing = [n for n, hits in found.items() if not hits]
    if missing:
        fail(f"{len(missing)} of the {len(unique)} images --names {path} lists are not in --pool {pool} (e.g. "
             f"{missing[:3]}): download those images of the pool first")
    twice = next(((n, hits) for n, hits in found.items() if len(hits) > 1), None)
    if twice:
        n, hits = twice
        fail(f"--names {path}: {n!r} names {len(hits)} images of --pool {pool} ({hits[0]} and {hits[1]}): name "
             "them with their folders, or give a pool where each name is one image")
    return [hits[0] for hits in found.values()]

"""Benchmark of transfer_set.py's retrieval: the exact streaming search against faiss, and the embedding
pipeline against the encoder alone.

1. Search. knn.search (transfer_set.py's retrieval) computes an exact cosine top-k by streaming the pool
   in chunks (a matrix product, then topk merged into a running (queries, k) top-k), so its memory does
   not grow with the pool. Here it runs on the same random unit vectors as faiss.IndexFlatIP (exact inner product, the
   usual reference); we check that both return the same neighbours (an index may differ only where two
   scores tie to float rounding) and time each, best of --repeats, interleaved (a shared machine is noisy).
2. A web pool's published embeddings (kt.web_pools: LAION's img_emb/*.npy, float16 on disk, memory-mapped).
   The exact scan is bound by reading the files, not by the arithmetic, for a few thousand queries: it is
   timed beside the raw read rate of the same files (every chunk read and turned to float32, nothing else)
   and beside faiss.IndexFlatIP on the same rows in memory, with the same neighbours (--web-rows; 0: skip).
3. Embedding throughput. embeddings.embed_shards (JPEG decoding in DataLoader workers, the encoder, the cached
   shards) against the encoder's forward pass alone on the same, already decoded images: a ratio near 1
   means data loading is not the bottleneck. On CPU a small OpenCLIP config stands in for ViT-L-14.

faiss is compared at its best: its exact search takes a per-query path below
faiss.cvar.distance_compute_blas_threshold queries (128,000 in faiss-cpu 1.15) and a BLAS matrix product
above it; here the threshold is set to 1, so faiss uses BLAS for any number of queries, as kt.knn does.
faiss is an optional package (requirements-extras.txt; without it only this code's search is timed).
Nothing is downloaded; images are generated.

Run:
  python -m bench.search                                   # 1,000 x 200,000 x 512, k=100
  python -m bench.search --queries 100 --pool 20000 --images 128 --repeats 1   # a quick look
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import transfer_set
from kt import catalog, embeddings, knn

BENCH_CLIP = {"embed_dim": 256, "vision_cfg": {"image_size": 96, "layers": 6, "width": 256, "patch_size": 16,
                                               "head_width": 64},
              "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1}}


def same_neighbours(s, i, fs, fi, tol):
    """Compare two (Q, k) results: -> (rows with identical indices, rows equal up to ties within tol,
    rows that really differ). A row differs really if an index outside the other's list scores above
    that list's k-th score by more than tol."""
    same = (i == fi).all(1)
    sets_equal = np.array([set(a) == set(b) for a, b in zip(i, fi)])
    tie_ok = np.abs(np.sort(s, 1) - np.sort(fs, 1)).max(1) <= tol  # same score profile: swaps among ties
    return int(same.sum()), int((~same & (sets_equal | tie_ok)).sum()), int((~same & ~sets_equal & ~tie_ok).sum())


def faiss_at_its_best(threads):
    """faiss with `threads` threads and BLAS for every query count (its default per-query path below
    distance_compute_blas_threshold queries is several times slower); None if it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = 1
    return faiss


def bench_search(args):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)  # (Q, D)
    p = F.normalize(torch.randn(args.pool, args.dim, generator=g), dim=-1)     # (P, D)
    ids = torch.arange(args.pool)
    faiss = faiss_at_its_best(args.threads)
    if faiss:
        index = faiss.IndexFlatIP(args.dim)
        index.add(p.numpy())
    else:
        print("faiss is not installed: `pip install faiss-cpu` to compare against IndexFlatIP; timing ours only")
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits both alike
        t = time.perf_counter()
        s, i = knn.search(q, [(p, ids)], args.k, torch.device("cpu"), chunk=args.chunk)
        ours.append(time.perf_counter() - t)
        if faiss:
            t = time.perf_counter()
            fs, fi = index.search(q.numpy(), args.k)
            theirs.append(time.perf_counter() - t)
    print(f"search {args.queries} queries x {args.pool} pool x {args.dim}-d, k={args.k}, {args.threads} threads:")
    print(f"  ours (torch.mm + topk, chunk {args.chunk}): best {min(ours):.2f} s, all {[round(x, 2) for x in ours]}")
    if faiss:
        print(f"  faiss IndexFlatIP (BLAS):           best {min(theirs):.2f} s, all {[round(x, 2) for x in theirs]}")
        print(f"  ours / faiss = {min(ours) / min(theirs):.2f} (time; above 1: faiss is faster)")
        same, ties, wrong = same_neighbours(s.numpy(), i.numpy(), fs, fi, tol=1e-5)
        print(f"  neighbours: {same}/{args.queries} rows identical, {ties} differ only among float ties, "
              f"{wrong} differ; max |score diff| {np.abs(s.numpy() - fs).max():.1e}")


def bench_embedding(args):
    from PIL import Image
    tmp = tempfile.mkdtemp(prefix="bench_search_")
    ds = catalog.indexed("demo", "unlabeled")
    refs = []
    for n in range(args.images):  # JPEGs at a web-like size, so decoding and resizing cost what they do
        refs.append(os.path.join(tmp, f"{n:06d}.jpg"))
        ds[n % len(ds)][0].resize((args.image_px, args.image_px), Image.BICUBIC).save(refs[-1], quality=90)
    with open(os.path.join(tmp, "bench-clip.json"), "w") as f:
        json.dump(BENCH_CLIP, f)
    ts_args = transfer_set.get_args_parser().parse_args(
        ["--cache-dir", os.path.join(tmp, "cache"), "--batch-size", str(args.batch_size),
         "--workers", str(args.workers), "--shard-size", str(args.images)])
    emb = embeddings.Encoder(f"open_clip:{tmp}/bench-clip.json", pretrained="none")
    cpu = torch.device("cpu")
    x = torch.stack([emb.transform(Image.open(r).convert("RGB")) for r in refs])  # decoded beforehand
    with torch.no_grad():
        emb.fn(x[:args.batch_size])  # warm-up
        t = time.perf_counter()
        for a in range(0, len(x), args.batch_size):
            F.normalize(emb.fn(x[a:a + args.batch_size]).float(), dim=-1).half()
        forward = len(x) / (time.perf_counter() - t)
    t = time.perf_counter()
    embeddings.embed_shards(refs, "pool", "bench", emb, ts_args, cpu, 0, 1)
    pipeline = len(x) / (time.perf_counter() - t)
    print(f"embedding {args.images} JPEGs of {args.image_px}px, encoder {BENCH_CLIP['vision_cfg']}, "
          f"batch {args.batch_size}, {args.workers} workers:")
    print(f"  forward alone {forward:.0f} img/s, whole pipeline {pipeline:.0f} img/s, ratio {pipeline / forward:.2f}")
    shutil.rmtree(tmp)


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark the retrieval search and embedding pipeline.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--queries", type=int, default=1000, help="query vectors (labeled images)")
    p.add_argument("--pool", type=int, default=200000, help="pool vectors; try 1000000 with the RAM for it")
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B: 512, ViT-L: 768)")
    p.add_argument("--k", type=int, default=100, help="neighbours per query")
    p.add_argument("--chunk", type=int, default=16384, help="pool rows per matrix product; try 4096-65536")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each search (best is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and faiss")
    p.add_argument("--web-rows", type=int, default=200000, help="rows of the generated web pool (0: skip it)")
    p.add_argument("--images", type=int, default=512, help="images for the throughput test (0: skip it)")
    p.add_argument("--image-px", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (on 2 cores, 1 leaves one to the model)")
    return p


def bench_web_pool(args):
    """The exact scan of a LAION-layout pool against the raw read rate of its files and against faiss."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from kt import web_pools
    tmp, rng = tempfile.mkdtemp(prefix="bench_pool_"), np.random.default_rng(0)
    os.makedirs(os.path.join(tmp, "img_emb")), os.makedirs(os.path.join(tmp, "metadata"))
    per_file = max(1, args.web_rows // 4)
    for f, a in enumerate(range(0, args.web_rows, per_file)):
        n = min(per_file, args.web_rows - a)
        z = rng.standard_normal((n, args.dim), dtype=np.float32)
        np.save(os.path.join(tmp, f"img_emb/img_emb_{f}.npy"), (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16))
        pq.write_table(pa.table(dict(url=[f"u{a + i}" for i in range(n)])), os.path.join(tmp, f"metadata/metadata_{f}.parquet"))
    pool = web_pools.EmbeddingPool(f"emb:{tmp}")
    q = F.normalize(torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1)), dim=1)
    cpu, times = torch.device("cpu"), {}
    for _ in range(args.repeats):  # interleaved, best of --repeats
        t = time.perf_counter()
        for z, _ in pool():  # the floor: read every chunk and make it float32, as the scan must
            for a in range(0, len(z), args.chunk):
                torch.from_numpy(z[a:a + args.chunk].astype("float32"))
        times["read"] = min(times.get("read", 1e9), time.perf_counter() - t)
        t = time.perf_counter()
        s, i = knn.search(q, pool(), args.k, cpu, chunk=args.chunk)
        times["scan"] = min(times.get("scan", 1e9), time.perf_counter() - t)
    line = (f"web pool {args.web_rows:,} x {args.dim} float16 in {len(pool.files)} files, {args.queries} queries, "
            f"k={args.k}: raw read {args.web_rows / times['read']:,.0f} rows/s, exact scan "
            f"{args.web_rows / times['scan']:,.0f} rows/s = {times['read'] / times['scan']:.2f} of the read rate")
    faiss = faiss_at_its_best(args.threads)
    if faiss:
        index = faiss.IndexFlatIP(args.dim)
        index.add(np.concatenate([z for z, _ in pool()]).astype(np.float32))
        t = time.perf_counter()
        fs, fi = index.search(q.numpy(), args.k)
        flat = time.perf_counter() - t
        same, ties, differ = same_neighbours(s.numpy(), i.numpy(), fs, fi, 1e-5)
        line += (f"; faiss IndexFlatIP (in memory, BLAS) {args.web_rows / flat:,.0f} rows/s; the same neighbours: "
                 f"{same} rows identical, {ties} up to ties, {differ} differ")
    else:
        line += "; faiss not installed (pip install faiss-cpu)"
    print(line)
    shutil.rmtree(tmp)
    return times


def main(args):
    torch.set_num_threads(args.threads)
    bench_search(args)
    if args.web_rows:
        bench_web_pool(args)
    if args.images:
        bench_embedding(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Step 3, the transfer set: the unlabeled images through which the teacher's knowledge reaches the student.

Which images matters a lot (the paper's transfer-set study): the task's own unlabeled images transfer
best, a generic pool much worse, and images retrieved from the pool near the few labeled images close most
of the gap. --source mixes labeled (the labeled images themselves), target (split.json's unlabeled images),
generic (all of --pool) and retrieval (each labeled image's top --k pool neighbours by embedding cosine,
minus duplicates and test near-copies; --total N sets k for about N images with the queries).

Reads:  split.json (split.py), the pool, the retrieval encoder (an OpenCLIP tower or the teacher).
Writes: --out, one image reference a line (read by distill.py); with a pool also OUT.report.json; with
        retrieval also OUT.png (each labeled query, then its kept neighbours). docs/transfer_sets.md: formats.
Uses:   kt.knn, kt.pools, kt.embeddings, kt.data, kt.models, kt.training; kt.checkpoints, kt.claims,
        kt.checks; where used: kt.charts (the contact sheet), kt.catalog (DATASET:SPLIT pools), kt.hf_datasets
        (hf: pools), kt.clip_towers (open_clip: encoders), kt.web_pools and kt.downloads (emb: pools).
Run:    python transfer_set.py --split runs/demo/split.json --source target,retrieval --pool demo:unlabeled \
            --embed open_clip:ViT-B-32/laion2b_s34b_b79k --k 50 --out runs/demo/transfer.txt
        torchrun --nproc_per_node 8 transfer_set.py ...   (each rank embeds its share of the pool)
"""
import argparse
import json
import math
import os

import numpy as np
import torch

from kt import checkpoints, claims, data, training
from kt.checks import fail, finite, nonnegative, positive
from kt.embeddings import EmbeddedPool, Encoder, embed_shards, read_embeddings
from kt.knn import near_duplicates, search
from kt.pools import decode_all, named, pool_refs


# ------------------------------------------------------------------------------ the paper's retrieval
def retrieve(queries, pool, k, allowed, device, scan=search):
    """The paper's retrieval: each labeled image (a query) gets its k nearest pool images by the cosine of
    their embeddings, an equal number for every query, none taken by two queries. queries (Q, D) unit rows;
    pool() yields the pool's embedding shards (z, ids); allowed(top_s, top_i) -> the ids that pass the
    filters. The search goes deeper (2k, 4k, ... neighbours a query) until every query has its k, the pool
    is used up, or the scan has nothing more for the queries still short (an approximate index answers id -1
    past what the lists it probes hold). Returns (the pool ids of each query, the depth searched). scan: the
    exact search (kt.knn), or the same over torchrun ranks, or a faiss index."""
    depth = min(2 * k, pool.size)
    while True:
        top_s, top_i = scan(queries, pool(), depth, device)  # (Q, depth), best first; -1: no neighbour
        mine = balance(top_i.numpy(), allowed(top_s, top_i), k)
        short = [q for q, m in enumerate(mine) if len(m) < k]
        if not short or depth >= pool.size or bool((top_i[short] < 0).any(1).all()):
            return mine, depth
        depth = min(2 * depth, pool.size)


def balance(top_i, allowed, k):
    """Every query its own k images: in rounds, each query takes its next-best neighbour that passed the
    filters and no other query has taken. top_i (Q, depth) -> a list of pool ids per query."""
    allowed, taken, mine = set(allowed.tolist()), set(), [[] for _ in range(len(top_i))]
    rows = top_i.tolist()
    for r in range(top_i.shape[1]):
        for q, row in enumerate(rows):
            c = row[r]
            if len(mine[q]) < k and c in allowed and c not in taken:
                taken.add(c)
                mine[q].append(c)
    return mine


# --------------------------------------------------------------------------------------------- filters
def candidates(top_s, top_i):
    """The union of all queries' neighbours, best first: each ranked by its best score, ties by pool id (an id
    -1, no neighbour, is none). -> (ids (R,), best scores (R,))."""
    fs, fi = top_s.flatten().numpy(), top_i.flatten().numpy()
    fs, fi = fs[fi >= 0], fi[fi >= 0]
    order = np.lexsort((fi, -fs))
    first = np.sort(np.unique(fi[order], return_index=True)[1])  # each id's first (best) place
    return fi[order][first], fs[order][first]


def threshold(value, test_z, device, quantile=0.99):
    """A near-copy threshold: a number, or auto: just above how close distinct target test images come to one
    another (the 99th percentile of each one's cosine to its nearest other one), and at least 0.95. So it
    means "a copy" in any embedding: a finetuned teacher puts a whole class above 0.95, a CLIP model does not."""
    if value != "auto":
        return float(value)
    sample = test_z[np.random.default_rng(0).permutation(len(test_z))[:5000]]  # queries; all of them the pool
    s = search(sample, [(test_z, np.arange(len(test_z)))], 2, device)[0]  # (n, 2): itself, then its nearest other
    return max(0.95, float(np.quantile(s[:, 1].numpy(), quantile))) if s.shape[1] == 2 else 0.95


def near_copies(cand, rz, hashes, test_z, leak_threshold, dedup_threshold, device):
    """Retrieved images to drop, each a bool (R,) over candidates ranked best first: exact duplicates (same
    decoded pixels; the best-ranked copy stays), test leaks (cosine to a target test image above the leak
    threshold) and near-duplicates of a better-ranked kept image (above the dedup threshold)."""
    exact = np.ones(len(cand), bool)
    exact[np.unique([hashes[int(c)] for c in cand], return_index=True)[1].astype(int)] = False
    leak_s = search(rz, [(test_z, np.arange(len(test_z)))], 1, device)[0]  # (R, 1): nearest test image
    leak = ~exact & (leak_s[:, 0].numpy() > leak_threshold) if leak_s.shape[1] else np.zeros_like(exact)
    near = np.zeros_like(exact)
    rest = np.flatnonzero(~exact & ~leak)
    near[rest] = near_duplicates(rz[rest], dedup_threshold, device)
    return exact, leak, near, leak_s


class NearCopyFilter:
    """allowed(top_s, top_i) for retrieve(): the candidates that are no copy of a better-ranked one nor of a
    test image. Keeps what it found (candidates, scores, drops) for the report."""

    def __init__(self, pool, test_z, leak_threshold, dedup_threshold, device):
        self.pool, self.test_z, self.device = pool, test_z, device
        self.thresholds = leak_threshold, dedup_threshold

    def __call__(self, top_s, top_i):
        self.top_s, self.top_i, (self.cand, self.best) = top_s, top_i, candidates(top_s, top_i)
        self.rz, self.hashes = self.pool.rows(self.cand)  # their embeddings and pixel hashes
        self.exact, self.leak, self.near, self.leak_s = near_copies(self.cand, self.rz, self.hashes, self.test_z,
                                                                    *self.thresholds, self.device)
        return self.cand[~self.exact & ~self.leak & ~self.near]


# ------------------------------------------------------------------------------------- the whole step
def embed_all(refs, args, split, device, rank, world):
    """Embed the queries (labeled images), the target test images (for the near-copy filters) and the pool,
    each rank its share of the shards -> the three caches' (dir, shards); encoder's cache key inside."""
    encoder = Encoder(args.embed, args.embed_weights, args.embed_pretrained)
    encoder.model.to(device)
    q_refs = data.part_refs(split, "labeled")[0]
    tests = args.leak_threshold == "auto" or args.leak_threshold <= 1 or args.dedup_threshold == "auto"
    t_refs = (data.part_refs(split, "test") or ([], []))[0] if tests else []
    dataset = split.get("dataset", "task")
    tag = f"{dataset}-{split.get('budget') or str(split.get('shots')) + 'shot'}-seed{split.get('seed')}"
    caches = [embed_shards(r, kind, n, encoder, args, device, rank, world) for r, kind, n in
              [(q_refs, "queries", tag), (t_refs, "test", dataset), (refs, "pool", args.pool)]]
    if world > 1:
        torch.distributed.barrier()  # every rank's shards are on disk
    return q_refs, caches


def read_queries(dq, dt, q_refs):
    """The labeled images' embeddings (the queries) and the target test images' -> (qz, qi, test_z)."""
    queries = read_embeddings(dq)
    if queries is None:
        fail(f"none of the {len(q_refs)} labeled images could be read: nothing to retrieve with")
    qz, qi = queries
    return qz, qi, (read_embeddings(dt) or (np.zeros((0, qz.shape[1]), np.float16),))[0]


def kept_and_sheet(mine, filters, q_refs, qi, ref_of, args):
    """The kept pool ids, best first, and the contact sheet (a row per shown query: it, then its images)."""
    rank_of = {int(c): n for n, c in enumerate(filters.cand)}
    kept = np.array(sorted({c for m in mine for c in m}, key=rank_of.get), dtype=np.int64)
    show = np.linspace(0, len(qi) - 1, min(args.sheet, len(qi))).round().astype(int)
    rows = [(q_refs[qi[j]], [ref_of(c) for c in mine[j][:args.sheet]]) for j in show]
    rows = [r for r in rows if r[1]]
    from kt.charts import contact_sheet
    return kept, contact_sheet(rows, args.data_root) if rows else None


def retrieval(refs, args, split, device, rank, world):
    """--source retrieval: embed, search, filter, balance. Rank 0 returns (kept refs, report, contact sheet);
    other ranks return None after embedding their shards."""
    q_refs, (dq, dt, dp) = embed_all(refs, args, split, device, rank, world)
    if rank != 0:
        return None
    qz, qi, test_z = read_queries(dq, dt, q_refs)
    pool = EmbeddedPool(*dp, size=len(refs), dim=qz.shape[1])
    thresholds = [threshold(t, test_z, device) for t in (args.leak_threshold, args.dedup_threshold)]
    filters = NearCopyFilter(pool, test_z, *thresholds, device)
    mine, depth = retrieve(qz, pool, args.k, filters, device)
    kept, sheet = kept_and_sheet(mine, filters, q_refs, qi, refs.__getitem__, args)
    report = retrieval_report(args, q_refs, qi, mine, kept, depth, filters, pool, [dq[0], dt[0], dp[0]])
    return [refs[c] for c in kept], report, sheet, None


# ----------------------------------------------------------------------------------- web-scale pools
def web_retrieval(args, split, device, rank, world):
    """--pool emb:DIR: the same retrieval over the embeddings a web pool publishes (kt.web_pools: LAION,
    DataComp), searched where they lie, each torchrun rank its own files (or through a faiss --index); then
    only the kept rows are downloaded (kt.downloads, img2dataset), and a query whose images fail takes more
    from its reserve of neighbours. Every rank searches; rank 0 returns (downloaded refs, report, sheet)."""
    from kt import downloads, knn, web_pools  # (optional: pyarrow; img2dataset in its own environment)
    pool = web_pools.EmbeddingPool(args.pool)
    pool.check_metadata()
    q_refs, (dq, dt, _) = embed_all([], args, split, device, rank, world)  # the pool is embedded already
    qz, qi, test_z = read_queries(dq, dt, q_refs)
    pool.check_encoder(args.embed, qz.shape[1])
    scan, recall = search, None
    if args.index:  # approximate: a faiss index of this pool (built first with --autofaiss where it is not there)
        if not os.path.exists(args.index) and args.autofaiss and rank == 0:
            web_pools.build_index(pool, args.index, args.autofaiss)
        if world > 1:
            torch.distributed.barrier()
        scan, recall = web_pools.faiss_scan(args.index, pool, qz, device)
    elif world > 1:  # exact, each rank its own files, the lists merged: the answer of one process
        scan = lambda q, _, depth, dev: knn.gather_ranks(*search(q, pool(rank, world), depth, dev), depth)
    thresholds = [threshold(t, test_z, device) for t in (args.leak_threshold, args.dedup_threshold)]
    filters = NearCopyFilter(pool, test_z, *thresholds, device)
    both, depth = retrieve(qz, pool, 2 * args.k, filters, device, scan)  # k to fetch, k more in reserve
    if rank != 0:
        return None
    mine, images, tried, asked = downloads.download_rounds([m[:args.k] for m in both], [m[args.k:] for m in both],
                                                           filters, pool, [q_refs[j] for j in qi], args)
    kept, sheet = kept_and_sheet(mine, filters, q_refs, qi, images.__getitem__, args)
    report = retrieval_report(args, q_refs, qi, mine, kept, depth, filters, pool, [dq[0], dt[0]])
    report.update(downloaded=len(images), failed_downloads=len(tried) - len(images), recall_at_k=recall,
                  rows=os.path.splitext(args.out)[0] + ".parquet")
    return [images[c] for c in kept], report, sheet, downloads.parquet(asked)


# --------------------------------------------------------------------------------------------- report
def retrieval_report(args, q_refs, qi, mine, kept, depth, filters, pool, caches):
    """What retrieval did, for OUT.report.json: counts, thresholds, similarities, images per query."""
    per_query, rank_of = [len(m) for m in mine], {int(c): n for n, c in enumerate(filters.cand)}
    leak_t, dedup_t = filters.thresholds
    return dict(
        pool=args.pool, embed=args.embed, k=args.k, queries=len(qi), unreadable_queries=len(q_refs) - len(qi),
        pool_images=pool.size, searched_per_query=depth, retrieved=len(filters.cand), kept=len(kept),
        short_queries=sum(n < args.k for n in per_query),
        dropped=dict(exact_duplicates=int(filters.exact.sum()), near_duplicates=int(filters.near.sum()),
                     leaks=int(filters.leak.sum()), unreadable=len(pool.unreadable)),
        thresholds=dict(dedup=dedup_t, leak=leak_t, calibrated=[t == "auto" for t in
                                                                (args.dedup_threshold, args.leak_threshold)]),
        similarity=dict(topk=stats(filters.top_s.numpy()[:, :args.k][filters.top_i.numpy()[:, :args.k] >= 0]),
                        kept_best=stats(filters.best[[rank_of[int(c)] for c in kept]]),
                        nearest_test=stats(filters.leak_s.numpy())),
        images_per_query=dict(stats(per_query), per_query={q_refs[j]: n for j, n in zip(qi, per_query)}),
        unreadable_files=pool.unreadable, cache=caches)


def stats(x):
    x = np.asarray(x, dtype=np.float64)
    return {} if x.size == 0 else dict(min=float(x.min()), mean=float(x.mean()),
                                       median=float(np.median(x)), max=float(x.max()))


def auto_or_number(s):
    """argparse type of the thresholds: auto, or a finite number."""
    return s if s == "auto" else finite(s)


IMG2DATASET_ARGS = "--processes_count 1 --thread_count 32 --image_size 512 --resize_mode keep_ratio " \
                   "--resize_only_if_bigger True --timeout 10 --retries 1"  # --download-args


def get_args_parser():
    p = argparse.ArgumentParser(description="Build the transfer set (the images distill.py trains on).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): the labeled images "
                   "are the queries, its unlabeled ones the target set")
    p.add_argument("--data-root", default="data", help="where dataset references resolve")
    p.add_argument("--source", default="target", help="comma list of labeled, target, generic, retrieval; try "
                   "target,retrieval when few unlabeled, labeled,retrieval as the paper's ADE20K sets")
    p.add_argument("--pool", help="folder of images, text file of paths, .tar shards (folder or glob), "
                                  "DATASET:SPLIT such as stl10:unlabeled, or hf:NAME[:CONFIG]:SPLIT (any split of a "
                                  "Hugging Face dataset, or of hf:DIR)")
    p.add_argument("--out", default="runs/demo/transfer_target.txt", help="the transfer list (one ref a line)")
    p.add_argument("--embed", default="open_clip:ViT-L-14/datacomp_xl_s13b_b90k",
                   help="retrieval encoder: open_clip:MODEL/TAG (e.g. PE-Core-L-14-336/meta, ViT-B-16-SigLIP2/webli), "
                   "open_clip:CFG.json, timm:NAME (a timm VFM's pooled features, e.g. "
                   "timm:vit_base_patch16_dinov3.lvd1689m), or teacher:PATH/teacher.pt")
    p.add_argument("--embed-weights", help="local weights file of the open_clip or timm encoder (offline) instead "
                   "of the hub")
    p.add_argument("--embed-pretrained", default="hub", choices=["hub", "none"],
                   help="none: random weights (tests only; the neighbours are then meaningless)")
    p.add_argument("--k", type=positive, default=100,
                   help="neighbours per labeled image (balanced); more: a larger, less on-task set; try 100-1000")
    p.add_argument("--total", type=positive, help="instead of --k: about N images, the labeled queries plus "
                   "k = ceil(N / queries) - 1 neighbours each (the paper's ADE20K sets: 153,600; 1,200 x 127)")
    p.add_argument("--dedup-threshold", type=auto_or_number, default="auto",
                   help="drop a retrieved image this cosine-close to a better-ranked one; auto: calibrated on "
                   "the test set (how close distinct images come), at least 0.95")
    p.add_argument("--leak-threshold", type=auto_or_number, default="auto",
                   help="drop a retrieved image this cosine-close to a target test image (auto: as above); "
                   "above 1: no check")
    p.add_argument("--cache-dir", default="runs/embeddings", help="embedding shards, reused across runs")
    p.add_argument("--shard-size", type=positive, default=10000, help="images per cached shard (resume unit)")
    p.add_argument("--batch-size", type=positive, default=256, help="encoder batch")
    p.add_argument("--workers", type=nonnegative, default=8, help="DataLoader workers decoding images")
    p.add_argument("--sheet", type=positive, default=8, help="queries (and neighbours each) in the contact sheet")
    p.add_argument("--names", help="with --source named: a list of the pool's image names (the paper's "
                   "yfcc_retrieved_images_with_*query.txt), each found in --pool by file name, stem or key")
    w = p.add_argument_group("web-scale pools (--pool emb:DIR: LAION's or DataComp's published embeddings)")
    w.add_argument("--download", metavar="DIR", help="where the images retrieval keeps are downloaded "
                   "(webdataset shards); the transfer list names them")
    w.add_argument("--img2dataset", default="img2dataset", help="the img2dataset command (its own environment)")
    w.add_argument("--download-args", default=IMG2DATASET_ARGS, help="img2dataset's options: processes, threads, "
                   "size, --distributor pyspark or ray for many machines")
    w.add_argument("--index", help="a faiss index of the pool (autofaiss; index_infos.json beside it sets its "
                   "search): approximate, with recall@k on a sample reported; default: the exact scan")
    w.add_argument("--autofaiss", help="the autofaiss command (its own environment) that builds --index if it "
                   "is not there, from the pool's img_emb/ files")
    return p


def main(args):
    sources = [s for s in args.source.split(",") if s]
    if not sources or set(sources) - {"labeled", "target", "generic", "retrieval", "named"}:
        fail(f"--source {args.source}: a comma list of labeled, target, generic, retrieval, named")
    if {"generic", "retrieval", "named"} & set(sources) and not args.pool:
        fail("--source generic/retrieval/named needs --pool")
    if ("named" in sources) != bool(args.names):
        fail("--source named and --names FILE go together")
    web = bool(args.pool) and args.pool.startswith("emb:")
    if web and ({"generic", "named"} & set(sources) or not args.download):
        fail(f"--pool {args.pool} is embeddings, not images: --source retrieval with --download DIR (the kept "
             "images are downloaded there), not generic or named")
    if args.index and not os.path.exists(args.index) and not args.autofaiss:
        fail(f"--index {args.index} is not there: give a faiss index of the pool, or --autofaiss CMD to build it")
    claims.check_writable(args.out, reads=(args.split, args.pool))
    device, rank, world = training.setup(0)
    split = data.read_split(args.split)
    if "target" in sources and data.part_refs(split, "unlabeled") is None:  # before any embedding work
        fail(f"--source target: {args.split} lists no unlabeled images")
    refs, bad = pool_refs(args.pool, args.data_root) if args.pool and sources != ["target"] and not web else ([], [])
    out, report, sheet, rows = [], dict(pool=args.pool, pool_images=len(refs)), None, None
    if args.total:  # a fixed size, an equal share per query: the queries plus k neighbours each
        args.k = max(1, math.ceil(args.total / len(split["labeled"])) - 1)
    if "retrieval" in sources:
        got = web_retrieval(args, split, device, rank, world) if web else retrieval(refs, args, split, device, rank, world)
        if got is None:
            return  # not rank 0: its shards are done
        kept, report, sheet, rows = got
        report["unreadable_files"] = bad + report["unreadable_files"]
        report["dropped"]["unreadable"] = len(report["unreadable_files"])
    elif rank != 0:
        return
    if "labeled" in sources:
        out += data.part_refs(split, "labeled")[0]
    if "target" in sources:
        out += data.part_refs(split, "unlabeled")[0]
    if "generic" in sources:
        if "retrieval" in sources:  # the whole pool was decoded for embedding already
            skip = {r for r, _ in report["unreadable_files"]}
            out += [r for r in refs if r not in skip]
        else:
            ok, more = decode_all(refs, args.batch_size, args.workers, args.data_root)
            out += ok
            report.update(unreadable_files=bad + more, dropped=dict(unreadable=len(bad + more)))
    if "named" in sources:
        out += named(args.names, refs, args.pool)  # the paper's own sets
    if "retrieval" in sources:
        out += kept
    out = list(dict.fromkeys(out))  # one copy of each ref: labeled, target, generic, then retrieved images
    n_bad = len(report.get("unreadable_files", []))
    if not out:
        fail(f"the transfer set from --source {args.source} is empty (pool: {len(refs)} images, "
             f"{n_bad} unreadable); try another --pool, a larger --k, or add target")
    skipped = f", {n_bad} unreadable skipped" if n_bad else ""
    training.log(rank, f"transfer set: {len(out)} images from {args.source}{skipped}")
    stem = os.path.splitext(args.out)[0]  # the list and what it comes with, written together
    files = {args.out: lambda f: f.write("".join(r + "\n" for r in out).encode("utf-8"))}
    if args.pool and sources != ["target"]:
        report["sources"], report["transfer_set"] = sources, len(out)
        files[stem + ".report.json"] = lambda f: f.write(json.dumps(report, indent=1).encode())
    if sheet is not None:
        files[stem + ".png"] = lambda f: sheet.save(f, format="PNG")
    if rows is not None:
        files[stem + ".parquet"] = lambda f: f.write(rows)
    checkpoints.atomic_write_all(files)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

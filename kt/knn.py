"""Exact nearest neighbours by inner product (cosine, for unit rows), in torch alone: the search behind
retrieval (transfer_set.py) and its near-duplicate filter. Ties go to the lower id, so a result is the same
on any device, for any chunk or shard size, and split over torchrun ranks (gather_ranks); bench/search.py
checks it against faiss and times it.
"""
import torch


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
    for z, ids in pool:  # z: a tensor, an array, or a memory-mapped array: read a chunk at a time
        ids = torch.as_tensor(ids).to(device)
        for a in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - a)
            part = z[a:a + n]
            part = part if torch.is_tensor(part) else torch.from_numpy(part.astype("float32"))  # one copy, read
            part = part.to(device, torch.float32)
            if buf.numel() < len(q) * n:
                buf = torch.empty(len(q) * n, device=device)
            s = torch.mm(q, part.T, out=buf[:len(q) * n].view(len(q), n))  # (Q, n) cosines
            v, c = topk_lowest(s, min(k, n))
            best_s, best_i = merge(torch.cat([best_s, v], 1), torch.cat([best_i, ids[a + c]], 1), k)
    return best_s.cpu(), best_i.cpu()


def gather_ranks(best_s, best_i, k):
    """Under torchrun, each rank's top-k of its own part of the pool -> the top-k of the whole pool, the same
    on every rank and the same as one process's search (ties too: merge breaks them by id)."""
    world = torch.distributed.get_world_size()
    width = torch.tensor([best_s.shape[1]])
    widths = [torch.zeros_like(width) for _ in range(world)]
    torch.distributed.all_gather(widths, width)
    pad = k - best_s.shape[1]  # a rank with a small part has fewer than k: pad with -inf, never kept
    s = torch.cat([best_s, torch.full((len(best_s), pad), -float("inf"))], 1)
    i = torch.cat([best_i, torch.full((len(best_i), pad), -1, dtype=torch.long)], 1)
    all_s, all_i = [torch.empty_like(s) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    torch.distributed.all_gather(all_s, s)
    torch.distributed.all_gather(all_i, i)
    s, i = merge(torch.cat(all_s, 1), torch.cat(all_i, 1), min(k, int(sum(widths).item())))
    return s, i


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

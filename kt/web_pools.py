"""Web-scale pools as their makers publish them: CLIP image embeddings and metadata, no pixels. Retrieval
searches the embeddings where they lie and downloads only what it keeps (transfer_set.py --pool emb:DIR).

  * the clip-retrieval layout (LAION-400M: ViT-B/32, 512-d; LAION-5B, Re-LAION: ViT-L/14, 768-d):
    DIR/img_emb/img_emb_N.npy (float16, unit rows) and DIR/metadata/metadata_N.parquet (url, caption, key);
  * DataComp CommonPool: DIR/<stem>.npz (b32_img, l14_img, ...) beside DIR/<stem>.parquet (uid, url, text,
    sha256); emb:DIR:l14_img names the array.
A row's id is its position in the files taken in the order of their names (plain string order: LAION-400M's
N is not zero-padded). DIR/pool.json may declare {"model": "open_clip:ViT-L-14/openai", "key": "l14_img"}.
pyarrow reads the metadata (pip install pyarrow); the embeddings are memory-mapped, one file at a time.
"""
import glob
import json
import os
import zipfile

import numpy as np
import torch

from kt.checks import fail
from kt.knn import search


def _npy_shape(f):
    """The shape and dtype of the .npy array at the start of the open file f, from its header alone."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


class EmbeddingPool:
    """emb:DIR[:KEY]. pool() streams (embeddings (n, D) float16, ids (n,)) a file at a time; rows(ids) reads
    some rows back with each one's identity (sha256, else url); metadata(ids) their url, caption and key."""

    def __init__(self, spec):
        root, _, key = spec[len("emb:"):].partition(":") if spec.count(":") > 1 else (spec[len("emb:"):], "", "")
        declared = {}
        if os.path.isfile(os.path.join(root, "pool.json")):
            with open(os.path.join(root, "pool.json")) as f:
                declared = json.load(f)
        self.root, self.key, self.model = root, key or declared.get("key"), declared.get("model")
        npys = sorted(glob.glob(os.path.join(root, "img_emb", "*.npy")))
        if npys:  # clip-retrieval: img_emb/img_emb_N.npy beside metadata/metadata_N.parquet
            self.layout, self.key = "clip-retrieval", None
            self.files = [(p, os.path.join(root, "metadata", "metadata_" + os.path.basename(p)[len("img_emb_"):-4]
                                           + ".parquet")) for p in npys]
        else:  # DataComp: <stem>.npz beside <stem>.parquet
            self.layout = "datacomp"
            self.files = [(p, p[:-4] + ".parquet") for p in sorted(glob.glob(os.path.join(root, "**", "*.npz"),
                                                                           recursive=True))]
            if not self.files:
                fail(f"--pool {spec}: no img_emb/*.npy (LAION, clip-retrieval) nor *.npz (DataComp) under {root}")
            if not self.key:
                with zipfile.ZipFile(self.files[0][0]) as zf:
                    keys = [n[:-4] for n in zf.namelist() if n.endswith("_img.npy")]
                fail(f"--pool {spec}: name the embeddings of the npz files, e.g. emb:{root}:{keys[0] if keys else 'l14_img'} "
                     f"(they hold {', '.join(keys) or 'no *_img arrays'})")
        self.counts, self.dim = [], None
        for emb, meta in self.files:
            shape, dtype = self._shape(emb)
            if len(shape) != 2 or (self.dim and shape[1] != self.dim):
                fail(f"{emb} holds a {shape} array; a pool's embeddings are (rows, {self.dim or 'D'})")
            if not os.path.isfile(meta):
                fail(f"{emb} has no metadata beside it ({meta}): the urls of its rows are unknown")
            self.counts.append(shape[0])
            self.dim = shape[1]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.size, self.unreadable = int(self.offsets[-1]), []

    def check_encoder(self, embed, dim):
        """The queries come from the model that made the pool (pool.json's), at its width; else one line."""
        if self.model and self.model != embed:
            fail(f"emb:{self.root} was embedded by {self.model} (its pool.json); --embed {embed} would compare "
                 "the embeddings of two models")
        if dim != self.dim:
            fail(f"--embed {embed} makes {dim}-d embeddings, emb:{self.root} holds {self.dim}-d ones: embed the "
                 "queries with the model that made the pool")

    def _shape(self, path):
        """The (rows, D) of a file's embeddings, from its header; a file cut short (a download that stopped)
        is one line, not a failure of the memory map later."""
        try:
            if path.endswith(".npy"):
                with open(path, "rb") as f:
                    shape, dtype = _npy_shape(f)
                    whole = f.tell() + int(np.prod(shape)) * dtype.itemsize
                if os.path.getsize(path) < whole:
                    fail(f"{path} is cut short ({os.path.getsize(path)} of {whole} bytes): download it again")
                return shape, dtype
            with zipfile.ZipFile(path) as zf, zf.open(self.key + ".npy") as f:
                return _npy_shape(f)
        except KeyError:
            fail(f"{path} holds no array {self.key}")
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            fail(f"{path} is not a whole .npy / .npz file ({type(e).__name__}): download it again")

    def _array(self, i):
        """File i's embeddings: memory-mapped (.npy), or that one array of the .npz."""
        path = self.files[i][0]
        return np.load(path, mmap_mode="r") if path.endswith(".npy") else np.load(path)[self.key]

    def check_metadata(self):
        """Every metadata file has one row per embedding row (else its urls would be others' images)."""
        pq = _pyarrow()
        for (emb, meta), n in zip(self.files, self.counts):
            rows = pq.ParquetFile(meta).metadata.num_rows
            if rows != n:
                fail(f"{meta} has {rows} rows for the {n} embeddings of {emb}: a misaligned pool")

    def __call__(self, rank=0, world=1):
        """(embeddings, ids) of each file, this rank's files (i % world == rank) in order."""
        for i in range(rank, len(self.files), world):
            yield self._array(i), np.arange(self.offsets[i], self.offsets[i + 1], dtype=np.int64)

    def _by_file(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        file_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for i in np.unique(file_of):
            yield int(i), np.flatnonzero(file_of == i), ids[file_of == i] - self.offsets[i]

    def rows(self, ids):
        """(embeddings (R, D) float16 of pool ids, {id: identity}): sha256 where the metadata has it, else the url."""
        z, identity = np.zeros((len(ids), self.dim), np.float16), {}
        for i, where, local in self._by_file(ids):
            z[where] = self._array(i)[np.sort(local)][np.argsort(np.argsort(local))]
            meta = self._metadata(i, local)
            for j, m in zip(where, meta):
                identity[int(ids[j])] = m.get("sha256") or m["url"]
        return z, identity

    def metadata(self, ids):
        """{id: {url, caption, key}} of pool ids (key: LAION's key, DataComp's uid)."""
        out = {}
        for i, where, local in self._by_file(ids):
            for j, m in zip(where, self._metadata(i, local)):
                out[int(np.asarray(ids)[j])] = m
        return out

    def _metadata(self, i, local):
        pq = _pyarrow()
        table = pq.read_table(self.files[i][1])
        names = {c.lower(): c for c in table.column_names}
        want = dict(url=names.get("url"), caption=names.get("caption") or names.get("text"),
                    key=names.get("key") or names.get("uid"), sha256=names.get("sha256"))
        if not want["url"]:
            fail(f"{self.files[i][1]} has no url column: {table.column_names}")
        rows = table.take(np.asarray(local, dtype=np.int64))
        columns = {k: rows.column(c).to_pylist() for k, c in want.items() if c}
        return [{k: (str(v[r]) if v[r] is not None else None) for k, v in columns.items()} for r in range(len(local))]


def build_index(pool, path, command):
    """Build a faiss index of a LAION-layout pool's img_emb/ files with autofaiss, which picks the index for
    the pool's size and the memory given, and writes index_infos.json (its search parameters) beside it.
    autofaiss pins numpy<2: it lives in an environment of its own, its command given as --autofaiss."""
    import shutil
    import subprocess
    if pool.layout != "clip-retrieval":
        fail(f"autofaiss reads folders of .npy files; {pool.root} holds DataComp's .npz: give a built --index")
    found = shutil.which(command)
    if not found:
        fail(f"--autofaiss {command} is not there: python3 -m venv ~/af && ~/af/bin/pip install autofaiss "
             "'pyarrow<18', then --autofaiss ~/af/bin/autofaiss (it pins numpy<2: its own environment)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cmd = [found, "build_index", f"--embeddings={os.path.join(pool.root, 'img_emb')}", f"--index_path={path}",
           f"--index_infos_path={os.path.join(os.path.dirname(path), 'index_infos.json')}", "--metric_type=ip"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own environment, not ours
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode or not os.path.exists(path):
        fail(f"autofaiss failed ({(done.stderr or done.stdout).strip().splitlines()[-1:] or 'no output'}): {' '.join(cmd)}")


def faiss_scan(path, pool, qz, device, sample=64):
    """A faiss index of the pool (autofaiss builds one from its npy files; LAION publishes some), memory-mapped,
    with the search parameters its index_infos.json names -> (a scan for retrieve(), recall@k of a sample
    of queries against the exact scan)."""
    try:
        import faiss
    except ImportError:
        fail("--index needs faiss: pip install faiss-cpu (or faiss-gpu)")
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:  # not there, not an index, cut short
        fail(f"--index {path} is not a readable faiss index ({' '.join(str(e).split())[:150]})")
    if index.ntotal != pool.size or index.d != pool.dim:
        fail(f"--index {path} holds {index.ntotal} vectors of {index.d} dimensions, the pool {pool.size} of "
             f"{pool.dim}: an index of another pool")
    infos = os.path.join(os.path.dirname(path), "index_infos.json")
    if os.path.exists(infos):
        with open(infos) as f:
            faiss.ParameterSpace().set_index_parameters(index, json.load(f).get("index_param", ""))

    def scan(q, _, depth, dev):
        s, i = index.search(np.ascontiguousarray(q, dtype=np.float32), depth)
        s[i < 0] = -np.inf  # id -1: the probed lists held no more (retrieve() then stops going deeper)
        return torch.from_numpy(s), torch.from_numpy(i.astype(np.int64))
    some = qz[:sample]
    exact = search(some, pool(), 10, device)[1].numpy()  # the exact answer, for a few queries
    found = scan(some, None, 10, device)[1].numpy()
    return scan, float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, found)]))


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail("a pool of published embeddings needs pyarrow for its metadata: pip install pyarrow")
    return pq

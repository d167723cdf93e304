"""Only what retrieval keeps is downloaded: the kept rows of a web pool (url, caption, key, pool row, score,
query) go to a parquet, img2dataset fetches them into webdataset shards, and the transfer list names the
images in the shards (SHARD.tar::KEY.jpg, which kt.data opens).

A download is a folder per request, DOWNLOAD/<key>/, keyed by the rows it asks for, written aside and put in
place whole: nothing rewrites or deletes a folder that a transfer list may name (a second list downloaded
into the same DOWNLOAD gets folders of its own; a rerun that fails keeps the last list's images), and the
same request made again is not downloaded again.

img2dataset is an optional tool that pins its own versions of pandas, albumentations and others, so it lives
in an environment of its own: `python3 -m venv ~/i2d && ~/i2d/bin/pip install img2dataset`, then
--img2dataset ~/i2d/bin/img2dataset (or img2dataset on PATH). Its distributors (multiprocessing, pyspark,
ray) spread a large download over processes or machines: --download-args "--distributor pyspark ...".
"""
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tarfile

from kt.checkpoints import atomic_write
from kt.checks import fail
from kt.claims import remove_dead_temps

COLUMNS = ("url", "caption", "pool_key", "pool_row", "score", "query")  # pool_key: LAION's key, DataComp's uid


def parquet(rows):
    """Rows (dicts with COLUMNS, and any more keys) -> the bytes of a parquet file."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({c: [r.get(c) for r in rows] for c in dict.fromkeys([*COLUMNS, *rows[0]])})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def img2dataset_command(cmd):
    """--img2dataset: a command on PATH or a path; missing, it is one line that says how to get it."""
    found = shutil.which(cmd)
    if not found:
        fail(f"--img2dataset {cmd} is not there: install img2dataset in an environment of its own (it pins its "
             "own versions): python3 -m venv ~/i2d && ~/i2d/bin/pip install img2dataset, then --img2dataset "
             "~/i2d/bin/img2dataset")
    return found


def fetch(rows, download, command, extra):
    """Download rows into DOWNLOAD/<key>/ (webdataset shards; key: a digest of the rows) with img2dataset ->
    {pool row: image reference} of the images that came; a row whose url failed is not in it. The folder
    holds rows.parquet, what was asked for. A folder of the same request is there already: it is reused (a
    request of which no image came keeps no folder)."""
    key = hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = os.path.join(download, key)
    if os.path.isdir(folder):
        return shard_images(folder)
    tmp = f"{folder}.tmp{os.getpid()}"  # renamed to the key once img2dataset is done: a cut-short one never counts
    os.makedirs(tmp)
    try:
        atomic_write(os.path.join(tmp, "rows.parquet"), lambda f: f.write(parquet(rows)))
        cmd = [command, "--url_list", os.path.join(tmp, "rows.parquet"), "--input_format", "parquet", "--url_col",
               "url", "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", tmp,
               "--save_additional_columns", '["pool_row","query","pool_key"]', "--enable_wandb", "False",
               *shlex.split(extra)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own environment, not ours
        env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset's image library would call home
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            fail(f"img2dataset failed (exit {done.returncode}: {tail[0][:300]}); its command: {shlex.join(cmd)}")
        if not shard_images(tmp):
            return {}  # nothing came (offline?): no folder is kept, so a rerun asks again
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shard_images(folder)


def shard_images(folder):
    """{pool row: "SHARD.tar::KEY.jpg"} of the images in img2dataset's shards (each KEY.json names its row)."""
    refs = {}
    for shard in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(shard) as tf:
            members = {m.name for m in tf.getmembers()}
            for name in sorted(members):
                if not name.endswith(".json"):
                    continue
                meta = json.load(tf.extractfile(name))
                image = next((name[:-5] + ext for ext in (".jpg", ".png", ".webp") if name[:-5] + ext in members), None)
                if image and meta.get("status", "success") == "success" and meta.get("pool_row") is not None:
                    refs[int(meta["pool_row"])] = f"{os.path.abspath(shard)}::{image}"
    return refs


def download_rounds(mine, spare, filters, pool, queries, args, rounds=3):
    """Fetch each query's images (mine: its pool rows); where some fail, the query takes the next of its own
    reserve (spare: its next neighbours that passed the filters, retrieval gave no other query), and those are
    fetched, for a few rounds. -> (each query's downloaded rows, {row: image ref}, the rows tried, every row
    asked for with its score, query and image where it came: transfer_set.py writes them as OUT.parquet)."""
    command, want, spare = img2dataset_command(args.img2dataset), [list(m) for m in mine], [list(m) for m in spare]
    tried, images, asked = set(), {}, []
    remove_dead_temps(os.path.join(args.download, ""))  # the half downloads of a killed run
    best = {int(c): float(b) for c, b in zip(filters.cand, filters.best)}
    for r in range(rounds):
        todo = [(q, c) for q, m in enumerate(want) for c in m if c not in tried]
        if not todo:
            break
        meta = pool.metadata([c for _, c in todo])
        rows = [dict(url=meta[c]["url"], caption=meta[c].get("caption"), pool_key=meta[c].get("key"), pool_row=c,
                     score=best[c], query=queries[q]) for q, c in todo]
        images.update(fetch(rows, args.download, command, args.download_args))
        tried.update(c for _, c in todo)
        asked += rows
        for q, m in enumerate(want):  # refill a short query from its reserve
            got = [c for c in m if c in images]
            want[q] = got + [spare[q].pop(0) for _ in range(min(len(m) - len(got), len(spare[q])))]
    if not images:
        fail(f"none of the {len(tried)} images retrieval kept could be downloaded (img2dataset's log is in "
             f"{args.download}); offline?")
    asked = [dict(r, image=images.get(r["pool_row"])) for r in asked]
    return [[c for c in m if c in images] for m in want], images, tried, asked

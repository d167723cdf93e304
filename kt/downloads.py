"""Only what retrieval keeps is downloaded: the kept rows of a web pool (url, caption, key, pool row, score,
query) go to a parquet, img2dataset fetches them into webdataset shards, and the transfer list names the
images in the shards (SHARD.tar::KEY.jpg, which kt.data opens).

img2dataset is an optional tool that pins its own versions of pandas, albumentations and others, so it lives
in an environment of its own: `python3 -m venv ~/i2d && ~/i2d/bin/pip install img2dataset`, then
--img2dataset ~/i2d/bin/img2dataset (or img2dataset on PATH). Its distributors (multiprocessing, pyspark,
ray) spread a large download over processes or machines: --download-args "--distributor pyspark ...".
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import tarfile

import numpy as np

from kt.checkpoints import atomic_write
from kt.checks import fail

COLUMNS = ("url", "caption", "pool_key", "pool_row", "score", "query")  # pool_key: LAION's key, DataComp's uid
DEFAULT_ARGS = "--processes_count 1 --thread_count 32 --image_size 512 --resize_mode keep_ratio " \
               "--resize_only_if_bigger True --timeout 10 --retries 1"


def write_rows(path, rows):
    """Rows (dicts with COLUMNS, and any more keys) -> a parquet file, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({c: [r.get(c) for r in rows] for c in dict.fromkeys([*COLUMNS, *rows[0]])})
    atomic_write(path, lambda f: pq.write_table(table, f))


def img2dataset_command(cmd):
    """--img2dataset: a command on PATH or a path; missing, it is one line that says how to get it."""
    found = shutil.which(cmd)
    if not found:
        fail(f"--img2dataset {cmd} is not there: install img2dataset in an environment of its own (it pins its "
             "own versions): python3 -m venv ~/i2d && ~/i2d/bin/pip install img2dataset, then --img2dataset "
             "~/i2d/bin/img2dataset")
    return found


def fetch(rows, folder, command, extra=DEFAULT_ARGS):
    """Download rows into FOLDER (webdataset shards) with img2dataset -> {pool row: image reference} of the
    images that came; a row whose url failed is not in it. FOLDER.parquet holds what was asked for."""
    if os.path.isdir(folder):  # a round that was cut short is done again, whole
        shutil.rmtree(folder)
    write_rows(folder + ".parquet", rows)
    cmd = [command, "--url_list", folder + ".parquet", "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", folder,
           "--save_additional_columns", '["pool_row","query","pool_key"]', "--enable_wandb", "False",
           *shlex.split(extra)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own environment, not ours
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset's image library would call home
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        fail(f"img2dataset failed (exit {done.returncode}: {tail[0][:300]}); its command: {shlex.join(cmd)}")
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
    fetched, for a few rounds. -> (each query's downloaded rows, {row: image ref}, the rows tried).
    OUT.parquet lists every row asked for, its score and query, and its image where it came."""
    command, want, spare = img2dataset_command(args.img2dataset), [list(m) for m in mine], [list(m) for m in spare]
    tried, images, asked = set(), {}, []
    best = {int(c): float(b) for c, b in zip(filters.cand, filters.best)}
    for r in range(rounds):
        todo = [(q, c) for q, m in enumerate(want) for c in m if c not in tried]
        if not todo:
            break
        meta = pool.metadata([c for _, c in todo])
        rows = [dict(url=meta[c]["url"], caption=meta[c].get("caption"), pool_key=meta[c].get("key"), pool_row=c,
                     score=best[c], query=queries[q]) for q, c in todo]
        images.update(fetch(rows, os.path.join(args.download, f"round{r}"), command, args.download_args))
        tried.update(c for _, c in todo)
        asked += rows
        for q, m in enumerate(want):  # refill a short query from its reserve
            got = [c for c in m if c in images]
            want[q] = got + [spare[q].pop(0) for _ in range(min(len(m) - len(got), len(spare[q])))]
    if not images:
        fail(f"none of the {len(tried)} images retrieval kept could be downloaded (img2dataset's log is in "
             f"{args.download}); offline?")
    write_rows(os.path.splitext(args.out)[0] + ".parquet", [dict(r, image=images.get(r["pool_row"])) for r in asked])
    return [[c for c in m if c in images] for m in want], images, tried

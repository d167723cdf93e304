"""Files on disk: atomic writes, checkpoints that are plain dicts, and the settings a file records.

A checkpoint is a dict of plain types and tensors (kind, recipe, data_config, classes, model, args, cost,
...), so torch.load(weights_only=True) reads it and a file from elsewhere cannot run code. Every file is
written to a temp file, flushed, fsynced and renamed: a kill or a full disk never leaves half a file.
"""
import hashlib
import os

import torch

from kt.checks import fail, first_line

KEYS = dict(teacher=("recipe", "data_config", "classes", "model", "cost"),
            student=("recipe", "data_config", "classes", "model", "cost"),
            resume=("step", "model", "optimizer", "scaler", "rng", "images", "wall_s", "config"))


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, then rename it over `path`; a write error is one line."""
    atomic_write_all({path: write})


def atomic_write_all(files):
    """Several files of one output, {path: write(f)}: each written to a temp file beside it, flushed and
    fsynced, and only then all renamed over their paths, so that a failure while writing (a full disk, a
    file-size limit, a kill) leaves every old file as it was; a write error is one line."""
    temps, path = {}, None
    try:
        for path, write in files.items():
            temps[path] = f"{path}.tmp{os.getpid()}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(temps[path], "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temps.items():  # every file is whole on disk: now they replace the old ones at once
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a file-size limit, a read-only folder (torch's writer
        # raises RuntimeError for these): the old files are intact
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        fail(f"cannot write {path} ({reason}); the previous file, if any, is intact")
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def save_checkpoint(ckpt, path):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kinds=None, made_by=None):
    """A checkpoint dict, checked: it exists (else name the step that makes it), is of `kinds`, and has
    the keys its kind needs."""
    if not os.path.exists(path):
        fail(f"{path} not found" + (f": run {made_by} first" if made_by else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}): checkpoints here are plain dicts "
             "that torch.load(weights_only=True) reads")
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if kinds and kind not in kinds:
        fail(f"{path} is a '{kind}' checkpoint, expected one of {list(kinds)}")
    missing = [k for k in KEYS.get(kind, ()) if k not in ckpt]
    if kinds and missing:
        fail(f"{path} is not a whole '{kind}' checkpoint: it has no {', '.join(missing)}")
    if kinds and kind in ("teacher", "student"):
        check_recipe(ckpt, path)
    return ckpt


NOT_IN_A_RECIPE = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def check_recipe(ckpt, path):
    """A model checkpoint's recipe rebuilds a model and nothing else: an architecture name, a class count, an
    input size, a decoder, plain keyword arguments, none of which makes timm open a file or the network."""
    recipe = ckpt["recipe"]
    ok = isinstance(recipe, dict) and isinstance(recipe.get("arch"), str) and isinstance(recipe.get("kwargs"), dict) \
        and type(recipe.get("num_classes")) is int and recipe["num_classes"] > 0 \
        and (recipe.get("img_size") is None or isinstance(recipe.get("img_size"), int))
    if not ok or recipe.get("decoder") not in (None, "linear", "lraspp"):
        fail(f"{path} has a recipe that rebuilds no model: arch, num_classes, img_size, kwargs, decoder")
    unsafe = [k for k in recipe["kwargs"] if k in NOT_IN_A_RECIPE]
    if unsafe:
        fail(f"{path}: its recipe passes {unsafe[0]} to the model: a checkpoint may not make it load other files")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        fail(f"{path}: its model is not a state dict of tensors")
    if not isinstance(ckpt["classes"], list) or len(ckpt["classes"]) != recipe["num_classes"]:
        fail(f"{path}: its classes do not match its recipe's {recipe['num_classes']} classes")
    if not all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()):
        fail(f"{path} holds NaN or infinite weights: it would score as chance; retrain it (a lower --lr)")


def task(made_for):
    """What a checkpoint's model, a split's labels or a teacher cache are for: 'segmentation' (a checkpoint
    with a decoder on its backbone; a split or cache marked dense) or 'classification'."""
    dense = made_for["recipe"].get("decoder") if "recipe" in made_for else made_for.get("dense")
    return "segmentation" if dense else "classification"


def check_same_task(a, a_name, b, b_name):
    """Two checkpoints, splits or caches made for the same task: the same classes, both classifying or both
    segmenting. Anything else is one line naming both."""
    if task(a) != task(b) or len(a["classes"]) != len(b["classes"]):
        fail(f"{a_name} is for {task(a)} of {len(a['classes'])} classes, {b_name} for {task(b)} of "
             f"{len(b['classes'])}: they were made for different tasks")
    if a["classes"] != b["classes"]:
        k = next(i for i, (x, y) in enumerate(zip(a["classes"], b["classes"])) if x != y)
        fail(f"{a_name} and {b_name} name their {len(a['classes'])} classes differently (class {k}: "
             f"{a['classes'][k]!r} vs {b['classes'][k]!r}): they were made for different tasks")


def plain(args):
    """argparse Namespace -> dict of plain types, for a checkpoint's `args`."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
            for k, v in vars(args).items()}


def digest(path):
    """sha1 of a file's bytes (None for no file): what a resumable state records of its inputs."""
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def differences(have, want):
    """The settings in `want` that a file records otherwise (`have`), as short phrases for a one-line refusal
    ("--epochs 1 vs 2"; a long value, a digest or a list, by its name alone): how a split.json, a resumable
    state and a teacher cache each refuse to be continued by another run."""
    def short(v):
        text = repr(v) if isinstance(v, str) else str(v)
        return text if len(text) <= 40 else None
    phrases = []
    for k, v in want.items():
        if have.get(k) != v:
            a, b = short(have.get(k)), short(v)
            phrases.append(f"{k} {a} vs {b}" if a and b else str(k))
    return phrases

"""Files on disk: atomic writes and checkpoints that are plain dicts.

A checkpoint is a dict of plain types and tensors (kind, recipe, data_config, classes, model, args, cost,
...), so torch.load(weights_only=True) reads it and a file from elsewhere cannot run code. Every file is
written to a temp file, flushed, fsynced and renamed: a kill or a full disk never leaves half a file.
"""
import os

import torch

from checks import fail


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, then rename it over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(ckpt, path):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kinds=None, made_by=None):
    """A checkpoint dict, checked: it exists (else name the step that makes it) and is of `kinds`."""
    if not os.path.exists(path):
        fail(f"{path} not found" + (f": run {made_by} first" if made_by else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}): checkpoints here are plain dicts "
             "that torch.load(weights_only=True) reads")
    if kinds and ckpt.get("kind") not in kinds:
        fail(f"{path} is a '{ckpt.get('kind')}' checkpoint, expected one of {list(kinds)}")
    return ckpt


def plain(args):
    """argparse Namespace -> dict of plain types, for a checkpoint's `args`."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
            for k, v in vars(args).items()}

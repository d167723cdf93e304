"""Files on disk: atomic writes, checkpoints that are plain dicts, and a claim on a step's output.

A checkpoint is a dict of plain types and tensors (kind, recipe, data_config, classes, model, args, cost,
...), so torch.load(weights_only=True) reads it and a file from elsewhere cannot run code. Every file is
written to a temp file, flushed, fsynced and renamed: a kill or a full disk never leaves half a file.
"""
import atexit
import fcntl
import glob
import hashlib
import os

import torch

from checks import fail, first_line

KEYS = dict(teacher=("recipe", "data_config", "classes", "model", "cost"),
            student=("recipe", "data_config", "classes", "model", "cost"),
            resume=("step", "model", "optimizer", "scaler", "rng", "images", "wall_s", "config"))


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, then rename it over `path`; a write error is one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a file-size limit, a read-only folder: the old file is intact
        fail(f"cannot write {path} ({e.strerror or first_line(e)}); the previous file, if any, is intact")
    finally:
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
    return ckpt


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


# -------------------------------------------------------------------------- one writer per output
_claims = {}  # output path -> the open, locked OUT.lock (this process's claims)


def check_writable(path):
    """Before any work: `path` is not a folder, and its folder exists (or can be made) and is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"--out {path} is a folder; give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the folder of --out {path} ({e.strerror})")
    if not os.access(folder, os.W_OK):
        fail(f"cannot write into {folder}, the folder of --out {path}")


def claim(path):
    """Claim the output `path` for this process until release(path): a second writer fails at once.

    An exclusive flock on PATH.lock (the kernel drops it when the process dies, however it dies), checked
    to be on the lock file that is still there (a releasing writer deletes it). Temp files that dead
    writers left beside PATH are removed.
    """
    check_writable(path)
    key, lock = os.path.abspath(path), path + ".lock"
    while key not in _claims:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            fail(f"another process (pid {holder}) is writing {path}; wait for it, or stop it first")
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _claims[key] = fd
            atexit.register(release, path)  # however the step ends (but SIGKILL), its lock file goes
        else:  # its holder released and deleted it between our open and our lock: take the new one
            os.close(fd)
    for tmp in glob.glob(glob.escape(path) + "*.tmp*"):  # OUT.tmpPID, OUT.state.tmpPID of killed writers
        pid = tmp.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(tmp)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: is there such a process?
    except ProcessLookupError:
        return False
    except PermissionError:  # there is, and it is someone else's
        return True
    return True


def release(path):
    """Give up the claim on `path` (its output is written) and delete the lock file."""
    fd = _claims.pop(os.path.abspath(path), None)
    if fd is not None:
        if os.path.exists(path + ".lock"):
            os.remove(path + ".lock")
        os.close(fd)

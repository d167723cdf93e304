"""One writer per output: a step claims its --out before any work, so a second process given the same
--out fails at once, and a killed one never blocks the rerun.
"""
import atexit
import fcntl
import glob
import os

from kt.checks import fail

_claims = {}  # output path -> the open, locked OUT.lock (this process's claims)


def check_writable(path, reads=()):
    """Before any work: `path` is not a folder, nor one of the files the step `reads` (evaluate.py --out
    teacher.pt would overwrite its input), and its folder exists (or can be made) and is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"--out {path} is a folder; give a file name")
    for read in reads:
        if read and os.path.isfile(read) and os.path.exists(path) and os.path.samefile(read, path):
            fail(f"--out {path} is {read}, an input of this step: writing it would destroy it; give another --out")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the folder of --out {path} ({e.strerror})")
    if not os.access(folder, os.W_OK):
        fail(f"cannot write into {folder}, the folder of --out {path}")


def claim(path, reads=()):
    """Claim the output `path` for this process until release(path): a second writer fails at once.

    An exclusive POSIX record lock on PATH.lock: the kernel drops it when the process dies, however it dies,
    and a forked DataLoader worker does not inherit it (an flock would stay with an orphaned worker). It is
    checked to be on the lock file that is still there (a releasing writer deletes it). Temp files that
    dead writers left beside PATH are removed.
    """
    check_writable(path, reads)
    key, lock = os.path.abspath(path), path + ".lock"
    while key not in _claims:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
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
    remove_dead_temps(path)


def remove_dead_temps(path):
    """Remove PATH*.tmpPID files (OUT.tmpPID, OUT.state.tmpPID, DIR/NNNNN.npy.tmpPID) whose writer is dead."""
    for tmp in glob.glob(glob.escape(path) + "*.tmp*"):
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
        try:
            os.remove(path + ".lock")
        except OSError:  # gone, or a folder made read-only meanwhile: the lock itself goes with the fd
            pass
        os.close(fd)

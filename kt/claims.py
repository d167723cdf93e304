"""What a step writes: one writer per output, no output that is an input, and each output one generation
that lands whole.

  * a step claims its --out before any work (OUT.lock), so a second process given the same --out fails at
    once, and a killed one never blocks the rerun;
  * a training is one generation (new_generation(): an id kept in its state, its metrics lines and its
    checkpoint), so a redo into the same --out starts its side files anew (kt.progress);
  * an output of several files is a folder written aside and put in place whole (commit_folder), so a kill
    at any moment leaves the old generation or the new one, never a mix; the next claim tidies up after a
    dead writer.
"""
import atexit
import fcntl
import glob
import os
import shutil
import time

from kt.checks import fail

_claims = {}  # output path -> the open, locked OUT.lock (this process's claims)


def new_generation():
    """An id for one generation of an output: when it started, and 4 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def check_writable(path, reads=(), marker=None):
    """Before any work: `path` is not one of the files the step `reads` (evaluate.py --out teacher.pt would
    overwrite its input), and its folder exists (or can be made) and is writable. `path` is a file, or with
    `marker` a folder output: not a file, holding no input, and if it is there, an earlier generation of the
    same step's (it holds `marker`), never a folder of other files that the commit would replace."""
    folder = os.path.dirname(os.path.abspath(path))
    if marker is None and os.path.isdir(path):
        fail(f"--out {path} is a folder; give a file name")
    if marker is not None and os.path.exists(path):
        if not os.path.isdir(path):
            fail(f"--out {path} is a file; give a folder name")
        if not os.path.isfile(os.path.join(path, marker)):
            fail(f"--out {path} is a folder of other files (it has no {marker}); give a new folder")
    for read in reads:
        if read and os.path.isfile(read) and os.path.exists(path) and os.path.samefile(read, path):
            fail(f"--out {path} is {read}, an input of this step: writing it would destroy it; give another --out")
        inside = marker is not None and read and os.path.abspath(read).startswith(os.path.abspath(path) + os.sep)
        if inside:
            fail(f"--out {path} holds {read}, an input of this step: the new output would replace it; give "
                 "another --out")
    writable_folder(folder, f"the folder of --out {path}")


def writable_folder(folder, what):
    """Make `folder` if it is not there, and check it can be written; else one line naming it as `what`."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"cannot make {what}, {folder} ({e.strerror})")
    if not os.access(folder, os.W_OK):
        fail(f"cannot write into {what}, {folder}")


def claim(path, reads=(), marker=None):
    """Claim the output `path` (a folder output with `marker`: check_writable) for this process until
    release(path): a second writer fails at once.

    An exclusive POSIX record lock on PATH.lock: the kernel drops it when the process dies, however it dies,
    and a forked DataLoader worker does not inherit it (an flock would stay with an orphaned worker). It is
    checked to be on the lock file that is still there (a releasing writer deletes it). Temp files that
    dead writers left beside PATH are removed.
    """
    check_writable(path, reads, marker)
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
    """Tidy up after writers that died: remove PATH*.tmpPID files and folders (OUT.tmpPID, OUT.state.tmpPID,
    DIR/NNNNN.npy.tmpPID, a folder output's new generation); a folder output's old generation set aside
    (PATH.oldPID) goes back in place if the new one never came, else it goes."""
    for tmp in glob.glob(glob.escape(path) + "*.tmp*"):
        pid = tmp.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)
    for old in glob.glob(glob.escape(path) + ".old*"):
        pid = old.rpartition(".old")[2]
        if pid.isdigit() and not _alive(int(pid)):
            if os.path.exists(path):
                _remove(old)
            else:
                os.rename(old, path)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def commit_folder(tmp, path):
    """Put the folder `tmp`, a whole new generation, in the place of `path`: the old one is set aside, the new
    one renamed in, the old one deleted. A kill in between leaves the old generation whole (PATH.oldPID, put
    back by the next claim) or the new one whole."""
    old = f"{path}.old{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    _remove(old)


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

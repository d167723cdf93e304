"""Bad input, refused early: one clear line on stderr, a non-zero exit, nothing on disk touched.

fail() is how every step reports bad input; the argparse types below refuse a bad flag value as a usage
error (exit 2) before any work starts.
"""
import argparse
import importlib.util
import math


def fail(msg):
    """Stop with one line on stderr and exit status 1."""
    raise SystemExit(f"error: {msg}")


def first_line(e):
    """An exception as one short line, for fail()."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"


# The vision foundation models of 2025-26 and the first library version that has them: an older timm or
# open_clip is one line that says which to install, not "unknown model".
NEWER = [("dinov3", "timm", "1.0.20", "DINOv3"), ("mclip2", "timm", "1.0.20", "MobileCLIP2"),
         ("radio", "timm", "1.0.31", "C-RADIO"), ("siglip2", "open_clip_torch", "2.31", "SigLIP 2"),
         ("pe-core", "open_clip_torch", "3.0", "Perception Encoder"),
         ("mobileclip2", "open_clip_torch", "3.2", "MobileCLIP2")]


def unknown_model(name, package, hint):
    """Stop on a model name `package` does not know: a newer family than the installed version says which
    version has it; anything else is one line with `hint` (where to look for names)."""
    from importlib.metadata import version
    from packaging.version import Version
    have = version(package)
    for pattern, lib, first, family in NEWER:
        if lib == package and pattern in name.lower() and Version(have) < Version(first):
            fail(f"{package} {have} does not know '{name}': {family} came with {package} {first}; "
                 f"pip install -U '{package}>={first}'")
    fail(f"unknown model '{name}'; {hint}")


def positive(s):
    """argparse type for a count >= 1 (--shots, --epochs, ...)."""
    if int(s) < 1:
        raise ValueError(s)
    return int(s)


def nonnegative(s):
    """argparse type for a count >= 0 (--workers)."""
    if int(s) < 0:
        raise ValueError(s)
    return int(s)


def number(what, ok=lambda x: True):
    """An argparse type: a finite float x with ok(x); `what` says which numbers, in the usage error."""
    def parse(s):
        try:
            x = float(s)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
        return x
    return parse


finite = number("a finite number")
rate = number("a finite number above 0", lambda x: x > 0)  # learning rates
positive_number = number("a finite number above 0", lambda x: x > 0)  # the softmax temperature
nonnegative_number = number("a finite number, 0 or more", lambda x: x >= 0)  # weight decay
fraction = number("a number from 0 to 1", lambda x: 0 <= x <= 1)  # warmup
share = number("a number above 0, at most 1", lambda x: 0 < x <= 1)  # layer decay, crop area
smoothing = number("a number from 0 to just below 1", lambda x: 0 <= x < 1)  # label smoothing


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what a folder's images end with


LOGGERS = dict(tensorboard="tensorboard", wandb="wandb", mlflow="mlflow")  # --log NAME: pip install PACKAGE


def log_kinds(s):
    """argparse type of --log: a comma list of tensorboard, wandb, mlflow (or none), each installed (the
    loggers themselves, kt.loggers, are imported only when asked for)."""
    kinds = [k for k in s.split(",") if k and k != "none"]
    unknown = [k for k in kinds if k not in LOGGERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: --log takes a comma list of {', '.join(LOGGERS)}")
    missing = [LOGGERS[k] for k in kinds if importlib.util.find_spec(LOGGERS[k]) is None]
    if missing:
        raise argparse.ArgumentTypeError(f"--log {s} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    return kinds

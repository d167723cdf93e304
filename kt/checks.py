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
rate = number("a finite number above 0", lambda x: x > 0)  # learning rates, the temperature
nonnegative_number = number("a finite number, 0 or more", lambda x: x >= 0)  # weight decay
fraction = number("a number from 0 to 1", lambda x: 0 <= x <= 1)  # warmup
share = number("a number above 0, at most 1", lambda x: 0 < x <= 1)  # layer decay, crop area
smoothing = number("a number from 0 to just below 1", lambda x: 0 <= x < 1)  # label smoothing


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

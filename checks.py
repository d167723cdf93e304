"""Bad input, refused early: one clear line on stderr, a non-zero exit, nothing on disk touched.

fail() is how every step reports bad input; the argparse types below refuse a bad flag value as a usage
error (exit 2) before any work starts.
"""


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

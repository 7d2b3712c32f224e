"""Atomic outputs: write to a temporary file beside the target, rename on success.

On any error or interruption the temporary file is removed and an existing
target is left untouched. The target may not be one of the inputs.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile

from .errors import OutputError


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_target(path, *, force: bool = False, inputs=()) -> str:
    path = os.fspath(path)
    for src in inputs:
        if src is None or os.path.isdir(src):
            continue
        if os.path.realpath(path) == os.path.realpath(src) or (
                os.path.exists(path) and _same_file(path, src)):
            raise OutputError(path, "refusing to write over the input file")
    if os.path.isdir(path):
        raise OutputError(path, "output is a directory")
    if os.path.exists(path) and not force:
        raise OutputError(path, "output exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(path, f"output directory {parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_path(path, *, force: bool = False, inputs=()):
    """Yield a temporary path beside `path`; on clean exit it is renamed to `path`.

    On any exception (including KeyboardInterrupt, and SIGTERM once the CLI has
    turned it into one) the temporary file is removed and `path` is untouched.
    """
    path = check_target(path, force=force, inputs=inputs)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".wconv-tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputError(path, f"write failed: {os.strerror(e.errno)}; no output written") from None
            raise OutputError(path, f"write failed: {e.strerror or e}; no output written") from None
        raise


@contextlib.contextmanager
def atomic_output(path, *, force: bool = False, inputs=()):
    """Like atomic_path, but yields an open binary file."""
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            yield f

"""Linux C library calls that Python's os module lacks (sync_file_range, renameat2, mallopt),
through ctypes; None where the platform or the C library does not have them."""
from __future__ import annotations

import functools
import sys


@functools.cache
def function(name: str, *argtypes):
    """The C function `name` taking `argtypes` (errno kept for ctypes.get_errno), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # e.g. renameat2 before glibc 2.28, mallopt on musl
        return None
    fn.argtypes = list(argtypes)
    return fn


def errno() -> int:
    import ctypes

    return ctypes.get_errno()

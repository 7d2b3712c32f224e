"""Reporting to the user while working: progress bars (on a terminal only) and warnings."""
from __future__ import annotations

import contextlib
import sys

import click


class _Silent:
    def update(self, n=1, current_item=None):
        pass


@contextlib.contextmanager
def progress(total: int, label: str, *, quiet: bool = False):
    """Yield an object with .update(n); draws a bar only on an interactive stderr."""
    if quiet or total <= 0 or not sys.stderr.isatty():
        yield _Silent()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr,
                           item_show_func=lambda s: s or "") as bar:
        yield bar


def warn(where, message: str) -> None:
    """One `wconv: warning:` line on stderr, naming the file when there is one."""
    from .atomic import user_path

    prefix = f"{user_path(where)}: " if where else ""
    print(f"wconv: warning: {prefix}{message}", file=sys.stderr)

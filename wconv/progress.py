"""Progress reporting: a click progress bar on a terminal, silence otherwise."""
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

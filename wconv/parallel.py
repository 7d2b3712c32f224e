"""Both cores for streaming work: an ordered map with a bounded number of pieces in flight.

The toolbox commands (stats, diff, verify) read tensors in bounded pieces and reduce each
piece with numpy, which releases the GIL for the heavy loops; hashing with hashlib and
zlib.crc32 does too for large buffers. `ordered_map` runs those reductions on a small
thread pool while the calling thread produces the next piece, and keeps at most
`max_pending` pieces alive so memory stays at a few pieces whatever the model size.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def default_workers() -> int:
    """Threads for piece work: the cores this process may use, at most 2 (the target machine's count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def ordered_map(fn: Callable, items: Iterable, *, workers: int | None = None,
                max_pending: int | None = None, cancel=None) -> Iterator:
    """fn(item) for each item, in order, computed on `workers` threads.

    Items are pulled from `items` (often a generator producing pieces) only while fewer
    than `max_pending` results are outstanding (default: workers + 1), so at most that many
    pieces exist at once. An exception in fn is raised here, at that item's position.
    `cancel` (a threading.Event) is set when the caller stops early (an exception, Ctrl-C),
    before waiting for the running items: long-running fns can poll it and return.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1:
        for item in items:
            out = fn(item)
            del item  # neither the item nor its result stays alive while the next one is made
            yield out
            del out
        return
    max_pending = max(1, max_pending or workers + 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wconv-piece")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            del item  # the future holds the piece until it is done; do not keep it here too
            while len(pending) >= max_pending:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        if cancel is not None:
            cancel.set()
        raise
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)

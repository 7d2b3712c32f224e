"""Helpers several test files share: one copy of each.

(Real-data paths and skipping: conftest.realdata_path; torch files: torchfiles.)
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from wconv.atomic import TMP_SUFFIX
from wconv.tensor import LazyTensor

WCONV = os.path.join(os.path.dirname(sys.executable), "wconv")  # the installed console script


def hf_permute(w, n_heads: int):
    """Meta's interleaved rotary rows -> HF's rotate_half rows, the permute of transformers'
    convert_llama_weights_to_hf; the test oracle (numpy arrays and torch tensors alike)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def leftovers(directory) -> list:
    """wconv's temporary outputs left in `directory`."""
    return sorted(f for f in os.listdir(directory) if f.endswith(TMP_SUFFIX))


def assert_same_tensors(a, b, *, ordered: bool = False):
    """Models `a` and `b` hold the same tensors (names, in the same order if `ordered`), dtypes and raw values."""
    if ordered:
        assert list(a.tensors) == list(b.tensors)
    else:
        assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in b.tensors.items():
        assert a[name].dtype is t.dtype, name
        np.testing.assert_array_equal(a[name].raw(), t.raw(), err_msg=name)


def failing_model(model, *, fail_after: int, record, exc=None):
    """`model` with tensor loads that fail after `fail_after` loads: (model, state).

    At the failing load, state["seen"] = record() (e.g. the temporary outputs present then);
    the failure is `exc`, or a FormatError naming broken.pth.
    """
    from wconv.errors import FormatError

    state = {"calls": 0, "seen": None}

    def wrap(t):
        def load():
            state["calls"] += 1
            if state["calls"] > fail_after:
                state["seen"] = record()
                raise exc or FormatError("broken.pth", "tensor data unreadable (simulated)")
            return t.loader()

        return LazyTensor(t.name, t.dtype, t.shape, load, t.source, t.storage_key)

    model.tensors = {n: wrap(t) for n, t in model.tensors.items()}
    return model, state


def _default_sigint():
    # A test run started in the background of a non-interactive shell ignores SIGINT, and the
    # child would inherit that (wconv, like any program, keeps an ignored SIGINT ignored).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_freeze(args, out, ready):
    """Start `wconv convert -q ARGS` writing `out`, and SIGSTOP it once `ready(temporary output)`
    is true: (process, temporary path). Fails the test if that never happens."""
    proc = subprocess.Popen([WCONV, "convert", "-q", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    pattern = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.*{TMP_SUFFIX}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = glob.glob(pattern)
        if tmps and ready(tmps[0]):
            proc.send_signal(signal.SIGSTOP)
            return proc, tmps[0]
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"conversion ended or never got far enough (exit {proc.poll()}): {proc.communicate()}")

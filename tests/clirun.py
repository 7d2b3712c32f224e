"""Run the wconv CLI in-process (fast: no interpreter start-up per call)."""
from __future__ import annotations

import subprocess


def wconv(*args) -> subprocess.CompletedProcess:
    """`wconv ARGS`: .returncode, .stdout, .stderr like a finished subprocess; a bug is re-raised."""
    from click.testing import CliRunner

    from wconv.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)

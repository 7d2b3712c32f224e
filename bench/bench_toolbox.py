#!/usr/bin/env python3
"""Speed of the toolbox commands against the obvious alternatives, on files of a given size.

  edit    `wconv edit IN OUT --set general.name=...` vs `cp IN OUT` (same filesystem)
  verify  `wconv verify DIR` (checklist.chk, md5, 2 files at a time) vs `md5sum -c checklist.chk`
  stats   `wconv inspect --stats` (MB/s of tensor data, peak private memory)
  diff    `wconv diff A A-copy` (MB/s over both sides)

Files are written into --dir (default: a temporary directory beside this script, removed after).
Times are wall-clock, best of --repeat runs, with the files in the page cache (warm): what is
compared is the work each tool does, not the disk. Peak private memory (RssAnon) is sampled from
/proc every 5 ms.

    .venv/bin/python bench/bench_toolbox.py [--size-mb 1024] [--repeat 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WCONV = [sys.executable, "-m", "wconv.cli"]


def run(cmd, cwd=None) -> tuple[float, int]:
    """(seconds, peak RssAnon bytes) of one command, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {proc.stderr.read().decode()}")
    return seconds, peak


def best(cmd, repeat, cwd=None, fresh=None):
    """Best time and peak memory over `repeat` runs; `fresh`: an output removed before each run."""
    runs = []
    for _ in range(repeat):
        if fresh and os.path.exists(fresh):
            os.remove(fresh)
            subprocess.run(["sync"])  # the freed blocks are not charged to the next run
        runs.append(run(cmd, cwd))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def make_gguf(path, size_mb: int):
    """A llama-named GGUF of random F16 tensors, written by gguf-py (tensors of 64 MB)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_name("bench")
    w.add_context_length(4096)
    n = max(1, size_mb // 64)
    for i in range(n):
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((8192, 4096), dtype=np.float32).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def warm(*paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="bench-toolbox-", dir=os.path.join(ROOT, "bench"))
    os.makedirs(d, exist_ok=True)
    try:
        src = os.path.join(d, "model.gguf")
        make_gguf(src, args.size_mb)
        size = os.path.getsize(src)
        mb = size / 1e6
        warm(src)
        rows = []
        cp_out, edit_out = os.path.join(d, "cp.gguf"), os.path.join(d, "edit.gguf")
        t_cp, _ = best(["cp", src, cp_out], args.repeat, fresh=cp_out)
        # wconv edit fsyncs its output before renaming it into place; cp does not
        t_cps, _ = best(["sh", "-c", f"cp '{src}' '{cp_out}' && sync '{cp_out}'"], args.repeat, fresh=cp_out)
        t_edit, m_edit = best(WCONV + ["edit", src, edit_out, "--set", "general.name=edited by the benchmark"],
                              args.repeat, fresh=edit_out)
        t_start, _ = best(WCONV + ["--version"], args.repeat)
        rows.append(("edit (vs cp)", f"{t_edit:.2f} s", f"cp {t_cp:.2f} s, cp+sync {t_cps:.2f} s",
                     f"{t_edit / t_cp:.2f}x cp, {t_edit / t_cps:.2f}x cp+sync", f"{m_edit / 1e6:.0f} MB"))

        vdir = os.path.join(d, "download")
        os.makedirs(vdir, exist_ok=True)
        half = os.path.join(vdir, "consolidated.00.pth")
        shutil.copy(src, half)
        shutil.copy(src, os.path.join(vdir, "consolidated.01.pth"))
        with open(os.path.join(vdir, "checklist.chk"), "wb") as f:
            f.write(subprocess.run(["md5sum", "consolidated.00.pth", "consolidated.01.pth"], cwd=vdir,
                                   capture_output=True, check=True).stdout)
        warm(half, os.path.join(vdir, "consolidated.01.pth"))
        t_md5, _ = best(["md5sum", "-c", "--quiet", "checklist.chk"], args.repeat, cwd=vdir)
        t_ver, m_ver = best(WCONV + ["verify", "--quiet", vdir], args.repeat)
        rows.append(("verify md5, 2 files", f"{2 * mb / t_ver:.0f} MB/s", f"md5sum -c {2 * mb / t_md5:.0f} MB/s",
                     f"{t_md5 / t_ver:.2f}x md5sum", f"{m_ver / 1e6:.0f} MB"))

        t_base, m_base = best(WCONV + ["inspect", src], args.repeat)
        t_st, m_st = best(WCONV + ["inspect", "--stats", "--quiet", src], args.repeat)
        rows.append(("inspect --stats", f"{mb / t_st:.0f} MB/s", f"inspect alone {t_base:.2f} s", "",
                     f"{m_st / 1e6:.0f} MB (inspect {m_base / 1e6:.0f})"))
        copy = os.path.join(d, "cp.gguf")
        warm(copy)
        t_diff, m_diff = best(WCONV + ["diff", "--quiet", src, copy], args.repeat)
        rows.append(("diff A A-copy", f"{2 * mb / t_diff:.0f} MB/s", "", "", f"{m_diff / 1e6:.0f} MB"))

        print(f"(wconv start-up alone: {t_start:.2f} s)")
        print(f"file: {size / 1e9:.2f} GB GGUF ({size // (64 << 20)} F16 tensors of 64 MB); "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}, warm cache")
        head = ("command", "wconv", "alternative", "ratio", "peak private memory")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
        for r in [head] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

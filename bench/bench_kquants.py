"""Benchmark: wconv's numpy k-quant encoders vs llama.cpp's llama_model_quantize.

Writes a TinyLlama-shaped f32 GGUF (dim 2048, hidden 5632, 32 heads / 4 KV heads,
vocab 32000, untied; 2 layers by default) with wconv, then in the same run, for each
ftype (default Q4_K_M and Q6_K):

  llama.cpp: llama_model_quantize (llama-cpp-python, default params, nthread 2)
  wconv convert SRC OUT.gguf --dtype FTYPE --threads 2 (the CLI's real path), and, for
  the encoders alone,
  wconv:     quant_mix.plan for the types, then every tensor encoded with
             the codec table's encoders (wconv.kquants, wconv.blockquant) in pieces of rows on 2 threads
             and written to a file, tensor after tensor

each side in its own subprocess, and prints wall and CPU times (both sides use 2
threads; CPU time is the fairer figure on a shared machine) with ratios wconv /
llama.cpp, peak anonymous (private) RSS sampled from /proc every 20 ms, and checks
that every tensor's bytes are equal. Not a GGUF writer benchmark: wconv's output here is the raw tensor
data (what a GGUF writer streams), read from the f32 file through numpy's memmap.

Usage:
    .venv/bin/python bench/bench_kquants.py [--layers 2] [--ftypes q4_k_m,q6_k] [--workdir /tmp/wconv-kq-bench]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

PIECE_ELEMENTS = 1 << 21  # rows per piece: about 2M values (8 MB of float32)


# --shape: TinyLlama's (the anchor) or Llama 2 7B's, with --layers layers; vocab 32000.
SHAPES = {"tinyllama": dict(dim=2048, hidden_dim=5632, n_heads=32, n_kv_heads=4),
          "7b": dict(dim=4096, hidden_dim=11008, n_heads=32, n_kv_heads=32)}
SHAPE = SHAPES[os.environ.get("WCONV_BENCH_SHAPE", "tinyllama")]  # passed to the side processes too


def make_source(path: str, n_layers: int) -> None:
    import modelgen
    from wconv.formats import gguf_io

    cfg = modelgen.llama_config(**SHAPE, n_layers=n_layers, vocab_size=32000, max_seq_len=2048)
    model = modelgen.random_model(cfg, seed=0)
    with contextlib.redirect_stderr(io.StringIO()):
        gguf_io.write(model, path, quiet=True, dtype="f32")


@contextlib.contextmanager
def quiet_fd2():
    """llama.cpp logs every tensor to the C stderr: send file descriptor 2 to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(null)
        os.close(saved)


def llama_cpp_quantize(src: str, dst: str, ftype: str) -> tuple[float, float]:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    t0, c0 = time.perf_counter(), time.process_time()
    with quiet_fd2():
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert rc == 0, rc
    return time.perf_counter() - t0, time.process_time() - c0


def wconv_quantize(src: str, dst: str, ftype: str, n_layers: int) -> tuple[float, float, dict]:
    import gguf

    from wconv import codecs, quant_mix
    from wconv.parallel import ordered_map

    t0, c0 = time.perf_counter(), time.process_time()
    reader = gguf.GGUFReader(src)
    tensors = {t.name: t.data for t in reader.tensors}  # memmapped float32 (rows, cols)
    plan = quant_mix.plan({n: a.shape for n, a in tensors.items()},
                          quant_mix.HParams(n_layers, SHAPE["n_heads"], SHAPE["n_kv_heads"]), ftype)

    def pieces():
        for name in quant_mix.visiting_order(tensors):
            arr, qtype = tensors[name], plan.types[name]
            rows = max(1, PIECE_ELEMENTS // arr.shape[-1]) if arr.ndim > 1 else 1
            for start in range(0, arr.shape[0] if arr.ndim > 1 else 1, rows):
                yield name, qtype, (arr[start:start + rows] if arr.ndim > 1 else arr)

    def encode(item):
        name, qtype, piece = item
        if qtype == "F32":
            return name, np.ascontiguousarray(piece, np.float32).view(np.uint8).reshape(-1)
        return name, codecs.get(qtype).encode(np.asarray(piece, np.float32))

    offsets = {}
    with open(dst, "wb") as f:
        for name, data in ordered_map(encode, pieces(), workers=2):
            offsets.setdefault(name, [f.tell(), 0])
            offsets[name][1] += data.size
            f.write(memoryview(data))
    return time.perf_counter() - t0, time.process_time() - c0, offsets


def wconv_cli(src: str, dst: str, ftype: str) -> tuple[float, float]:
    """The real path: `wconv convert SRC DST --dtype FTYPE --threads 2` (plan, stream, GGUF writer)."""
    from click.testing import CliRunner

    from wconv.cli import main as cli

    t0, c0 = time.perf_counter(), time.process_time()
    r = CliRunner().invoke(cli, ["convert", src, dst, "--dtype", ftype, "--threads", "2", "-q", "--force"])
    assert r.exit_code == 0, r.output
    return time.perf_counter() - t0, time.process_time() - c0


def same_gguf_tensors(ours_path: str, theirs_path: str) -> bool:
    import gguf

    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    for t in gguf.GGUFReader(theirs_path).tensors:
        mine = ours.get(t.name)
        if mine is None or mine.tensor_type != t.tensor_type or \
                np.asarray(mine.data).tobytes() != np.asarray(t.data).tobytes():
            print(f"  differs: {t.name}")
            return False
    return len(ours) == len(gguf.GGUFReader(theirs_path).tensors)


def same_bytes(ours_path: str, offsets: dict, theirs_path: str) -> bool:
    import gguf

    ours = np.memmap(ours_path, np.uint8, mode="r")
    for t in gguf.GGUFReader(theirs_path).tensors:
        start, size = offsets[t.name]
        theirs = np.asarray(t.data).reshape(-1).view(np.uint8)
        if size != theirs.size or not np.array_equal(ours[start:start + size], theirs):
            print(f"  bytes differ: {t.name}")
            return False
    return True


def _anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_side(side: str, src: str, dst: str, ftype: str, layers: int) -> dict:
    """One side in a subprocess: its JSON result plus the peak anonymous RSS seen."""
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--src", src, "--dst", dst,
           "--ftypes", ftype, "--layers", str(layers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss(proc.pid))
            done.wait(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    assert proc.returncode == 0, (side, proc.returncode)
    result = json.loads(out.strip().splitlines()[-1])
    result["anon_peak"] = peak[0]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ftypes", default="q4_k_m,q6_k")
    ap.add_argument("--workdir", default="/tmp/wconv-kq-bench")
    ap.add_argument("--shape", choices=list(SHAPES), help="tinyllama (default) or 7b (Llama 2 7B's dims)")
    ap.add_argument("--side", choices=["llama", "wconv", "cli"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "llama":
        wall, cpu = llama_cpp_quantize(args.src, args.dst, args.ftypes)
        print(json.dumps({"wall": wall, "cpu": cpu}))
        return
    if args.side == "cli":
        wall, cpu = wconv_cli(args.src, args.dst, args.ftypes)
        print(json.dumps({"wall": wall, "cpu": cpu}))
        return
    if args.side == "wconv":
        wall, cpu, offsets = wconv_quantize(args.src, args.dst, args.ftypes, args.layers)
        print(json.dumps({"wall": wall, "cpu": cpu, "offsets": offsets}))
        return
    if args.shape and SHAPES[args.shape] is not SHAPE:  # re-run with the shape in the environment,
        os.environ["WCONV_BENCH_SHAPE"] = args.shape  # which the side processes inherit
        os.execv(sys.executable, [sys.executable, *sys.argv])
    os.makedirs(args.workdir, exist_ok=True)
    shape = os.environ.get("WCONV_BENCH_SHAPE", "tinyllama")
    src = os.path.join(args.workdir, f"{shape}-{args.layers}l-f32.gguf")
    if not os.path.exists(src):
        t0 = time.perf_counter()
        make_source(src, args.layers)
        print(f"source: {src} ({os.path.getsize(src) / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s)")
    mib = 2.0 ** 20
    for ftype in args.ftypes.split(","):
        theirs = os.path.join(args.workdir, f"llama-{ftype}.gguf")
        ours = os.path.join(args.workdir, f"wconv-{ftype}.bin")
        lr = run_side("llama", src, theirs, ftype, args.layers)
        wr = run_side("wconv", src, ours, ftype, args.layers)
        ok = same_bytes(ours, wr["offsets"], theirs)
        print(f"{ftype.upper():7s} wall: llama.cpp {lr['wall']:6.1f} s, wconv {wr['wall']:6.1f} s, "
              f"ratio {wr['wall'] / lr['wall']:4.2f} | cpu: llama.cpp {lr['cpu']:6.1f} s, wconv {wr['cpu']:6.1f} s, "
              f"ratio {wr['cpu'] / lr['cpu']:4.2f} | peak anon RSS: llama.cpp {lr['anon_peak'] / mib:5.0f} MiB, "
              f"wconv {wr['anon_peak'] / mib:5.0f} MiB | bytes {'identical' if ok else 'DIFFER'}")
        cli_out = os.path.join(args.workdir, f"wconv-cli-{ftype}.gguf")
        cr = run_side("cli", src, cli_out, ftype, args.layers)
        ok = same_gguf_tensors(cli_out, theirs)
        print(f"{'':7s} wconv convert --dtype {ftype} --threads 2: wall {cr['wall']:6.1f} s (ratio "
              f"{cr['wall'] / lr['wall']:4.2f}), cpu {cr['cpu']:6.1f} s, "
              f"peak anon RSS {cr['anon_peak'] / mib:5.0f} MiB "
              f"| tensors {'identical' if ok else 'DIFFER'}")


if __name__ == "__main__":
    main()

"""Benchmark: wconv pth-to-bin vs the obvious alternative (torch.load + llama2.c-style export).

Makes synthetic Meta-layout Llama checkpoints (bf16, like Meta's releases) of
growing size with real torch.save, then converts each to a llama2.c v0 .bin in
two ways, each in its own subprocess, in the same run:

  wconv:  `wconv pth-to-bin DIR OUT.bin`
  torch:  torch.load(..., map_location="cpu") of every shard, then write each
          tensor as fp32 in llama2.c's order (what llama2.c's export.py does)

and prints wall time, peak anonymous RSS (private memory, sampled from
/proc/PID/status every 20 ms) and VmHWM (peak RSS including file-backed mmap
pages, which the kernel can drop at any time), with ratios torch/wconv.
wconv's peak private memory should stay flat as the model grows.

Needs the test extra (torch). Usage:
    .venv/bin/python bench/bench_convert.py [--sizes-mb 256,1024] [--workdir /tmp/wconv-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def make_checkpoint(directory: str, target_mb: int) -> dict:
    """A Meta-layout bf16 checkpoint of about target_mb MB (dim 1024, vocab 32000), or
    with target_mb 0 one shaped exactly like Llama 2 7B (dim 4096, 32 layers: 13.5 GB)."""
    import torch

    if target_mb == 0:
        dim, hidden, vocab, n_heads, n_layers = 4096, 11008, 32000, 32, 32
    else:
        dim, hidden, vocab, n_heads = 1024, 2816, 32000, 16
        per_layer = (4 * dim * dim + 3 * dim * hidden + 2 * dim) * 2
        fixed = (2 * vocab * dim + dim) * 2
        n_layers = max(1, (target_mb * 2**20 - fixed) // per_layer)
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    sd = {"tok_embeddings.weight": w(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(dim, dim)
        sd[p + "attention.wk.weight"] = w(dim, dim)
        sd[p + "attention.wv.weight"] = w(dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        sd[p + "ffn_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    sd["norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    sd["output.weight"] = w(vocab, dim)
    torch.save(sd, os.path.join(directory, "consolidated.00.pth"))
    params = {"dim": dim, "n_layers": int(n_layers), "n_heads": n_heads, "multiple_of": 256,
              "norm_eps": 1e-5, "vocab_size": vocab}
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return params


# The alternative: what llama2.c's export.py does (legacy_export), reduced to its I/O pattern.
TORCH_EXPORT = textwrap.dedent("""
    import glob, json, os, struct, sys, torch
    src, out = sys.argv[1], sys.argv[2]
    p = json.load(open(os.path.join(src, "params.json")))
    shards = [torch.load(f, map_location="cpu", weights_only=True)
              for f in sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))]
    sd = shards[0]
    L = p["n_layers"]
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    with open(out, "wb") as f:
        f.write(struct.pack("iiiiiii", p["dim"], hidden, L, p["n_heads"], p["n_heads"],
                            -p["vocab_size"], 2048))
        def put(t):
            f.write(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        put(sd["tok_embeddings.weight"])
        for key in ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]:
            for i in range(L):
                put(sd[f"layers.{i}.{key}.weight"])
        put(sd["norm.weight"])
        hd = p["dim"] // p["n_heads"]
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        fc = torch.outer(torch.arange(2048), freqs)
        put(torch.cos(fc)); put(torch.sin(fc))
        put(sd["output.weight"])
""")


def _status(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmHWM"):
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return vals


def measure(cmd: list) -> dict:
    """Run cmd; return wall seconds, peak anonymous RSS and VmHWM (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"RssAnon": 0, "VmHWM": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": secs, "anon": peak["RssAnon"], "hwm": peak["VmHWM"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="256,1024")
    ap.add_argument("--workdir", default="/tmp/wconv-bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-torch", action="store_true",
                    help="measure wconv only (the torch route needs the whole model in RAM and twice the disk)")
    ap.add_argument("--version", type=int, default=0, help="llama2.c output version for wconv (0, 1 or 2)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]  # 0 = Llama-2-7B shapes
    wconv_bin = os.path.join(os.path.dirname(PY), "wconv")
    base = measure([wconv_bin, "--version"])
    print(f"baseline (python + wconv imports): anon {base['anon'] / 2**20:.0f} MiB, hwm {base['hwm'] / 2**20:.0f} MiB")
    rows = []
    for mb in sizes:
        d = os.path.join(args.workdir, f"meta-{mb}mb" if mb else "meta-7b-shapes")
        if not os.path.exists(os.path.join(d, "params.json")):
            print(f"making {mb} MB checkpoint in {d} ...", flush=True)
            make_checkpoint(d, mb)
        src_bytes = os.path.getsize(os.path.join(d, "consolidated.00.pth"))
        out_w = os.path.join(args.workdir, f"wconv-{mb}.bin")
        out_t = os.path.join(args.workdir, f"torch-{mb}.bin")
        for p in (out_w, out_t):
            if os.path.exists(p):
                os.unlink(p)
        subprocess.run(["sync"], check=False)
        w = measure([wconv_bin, "pth-to-bin", d, out_w, "--quiet", "--max-seq-len", "2048",
                     "--version", str(args.version)])
        if args.skip_torch:
            t, same = None, "(torch route skipped)"
        else:
            t = measure([PY, "-c", TORCH_EXPORT, d, out_t])
            same = _same_weights(out_w, out_t) if args.version == 0 else "(different output versions)"
        rows.append((mb, src_bytes, w, t, same))
        for p in (out_w, out_t):
            if not args.keep and os.path.exists(p):
                os.unlink(p)
    gb = 2**30
    print()
    print(f"{'source':>10} | {'wconv s':>8} {'anon GB':>8} {'hwm GB':>7} | {'torch s':>8} {'anon GB':>8} "
          f"{'hwm GB':>7} | {'time t/w':>8} {'anon t/w':>8} | same weights")
    for mb, src_bytes, w, t, same in rows:
        if t is None:
            print(f"{src_bytes / gb:8.2f}GB | {w['seconds']:8.1f} {w['anon'] / gb:8.3f} {w['hwm'] / gb:7.3f} | "
                  f"{'-':>8} {'-':>8} {'-':>7} | {'-':>8} {'-':>8} | {same}")
            continue
        print(f"{src_bytes / gb:8.2f}GB | {w['seconds']:8.1f} {w['anon'] / gb:8.3f} {w['hwm'] / gb:7.3f} | "
              f"{t['seconds']:8.1f} {t['anon'] / gb:8.3f} {t['hwm'] / gb:7.3f} | "
              f"{t['seconds'] / w['seconds']:8.2f} {t['anon'] / max(w['anon'], 1):8.2f} | {same}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _same_weights(a: str, b: str) -> str:
    """Both outputs hold the same fp32 values after the 28-byte header.

    Compared as floats: the RoPE tables run.c skips are computed by numpy in one and
    torch in the other and may differ in the last bit.
    """
    import numpy as np

    x = np.memmap(a, dtype=np.float32, mode="r", offset=28)
    y = np.memmap(b, dtype=np.float32, mode="r", offset=28)
    if x.size != y.size:
        return f"no (sizes {x.size} vs {y.size})"
    # Layout: ..., freq_cis_real, freq_cis_imag (2048 x head_dim/2 each), output.weight (vocab x dim).
    dim, n_heads, vocab = (int(v) for v in np.fromfile(a, dtype=np.int32, count=7)[[0, 3, 5]])
    vocab = abs(vocab)
    tables_end = x.size - vocab * dim
    tables_start = tables_end - 2048 * (dim // n_heads)
    worst = tables = 0.0
    step = 16 << 20
    for lo, hi, which in ((0, tables_start, "w"), (tables_start, tables_end, "t"), (tables_end, x.size, "w")):
        for i in range(lo, hi, step):
            d = float(np.abs(x[i:min(i + step, hi)] - y[i:min(i + step, hi)]).max())
            worst, tables = (max(worst, d), tables) if which == "w" else (worst, max(tables, d))
    verdict = "yes" if worst == 0 else f"NO (max |diff| {worst:.3g})"
    return f"{verdict}; RoPE tables run.c skips: max |diff| {tables:.1e}"


if __name__ == "__main__":
    main()

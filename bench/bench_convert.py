"""Benchmark: wconv's conversions next to `cp`, the torch route and llama.cpp's own converters.

One command, one session, the same generated files. It makes a Llama-2-7B-shaped bf16
checkpoint (dim 4096, hidden 11008, vocab 32000, 32 heads; --layers 2 gives ~1.27 GB, 32 the
full 13.5 GB) as a Meta directory (consolidated.00.pth, params.json, tokenizer.model), then
an HF directory from it with wconv, and measures, each in its own process:

  cp                    the input file (the throughput anchor), and cp of outputs where a
                        target compares with "cp of a file that size"
  wconv inspect         header-only read
  wconv -> GGUF         bf16 (same type: kernel copy for Meta input), f16, q8_0
  wconv -> llama2.c v0  fp32 (pth-to-bin)
  wconv -> safetensors  and -> HF directory
  wconv GGUF q8_0 -> GGUF (same type all the way)
  torch route           torch.load(mmap=True) + safetensors.torch.save_file (if torch imports)
  llama.cpp             convert_legacy_llama.py (Meta input) and convert_hf_to_gguf.py
                        (HF input) to f16/q8_0 (and bf16 for the HF converter), with --llama-cpp DIR;
                        the legacy converter runs on the Meta input only (its q8_0 run peaks near 20 GB)

For each: wall time, MB/s of the input, peak RSS (VmHWM: what the OS reports, mapped file
pages included), peak anonymous RSS, and ratios to cp and to the llama.cpp anchor. Results
go to stdout and to a Markdown file (--results, default bench/RESULTS.md) with the machine
description and the issue-9 targets checked.

Needs the test extra (torch) to generate the checkpoint. Usage:
    .venv/bin/python bench/bench_convert.py --llama-cpp /path/to/llama.cpp \\
        [--layers 2] [--workdir /tmp/wconv-bench] [--repeat 1] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
# This checkout's wconv (PYTHONPATH is set to it in main), whatever an installed `wconv` points at.
WCONV = [PY, "-m", "wconv.cli"]
DEFAULT_TOKENIZER = os.path.join(ROOT, "..", "shared", "realdata", "llama2c", "tokenizer.model")
MB = 1 << 20

DIM, HIDDEN, VOCAB, HEADS = 4096, 11008, 32000, 32


def make_meta(directory: str, n_layers: int, tokenizer: str) -> None:
    """A Meta-layout bf16 checkpoint with Llama 2 7B shapes and `n_layers` layers."""
    import torch

    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    sd = {"tok_embeddings.weight": w(VOCAB, DIM)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            sd[p + f"attention.{name}.weight"] = w(DIM, DIM)
        sd[p + "feed_forward.w1.weight"] = w(HIDDEN, DIM)
        sd[p + "feed_forward.w2.weight"] = w(DIM, HIDDEN)
        sd[p + "feed_forward.w3.weight"] = w(HIDDEN, DIM)
        sd[p + "attention_norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
        sd[p + "ffn_norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
    sd["norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
    sd["output.weight"] = w(VOCAB, DIM)
    torch.save(sd, os.path.join(directory, "consolidated.00.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump({"dim": DIM, "n_layers": n_layers, "n_heads": HEADS, "multiple_of": 256, "norm_eps": 1e-5,
                   "vocab_size": VOCAB}, f)
    shutil.copyfile(tokenizer, os.path.join(directory, "tokenizer.model"))


TORCH_ROUTE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    sd = torch.load(sys.argv[1], map_location="cpu", mmap=True, weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
""")


# --- measuring ---------------------------------------------------------------------------------

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


def _tree_peak(pid, peak):
    """Fold the status of pid and its children (converters may fork workers) into peak."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    total = {"RssAnon": 0, "VmHWM": 0}
    largest = 0
    for p in pids:
        for k, v in _status(p).items():
            total[k] += v
            if k == "VmHWM":
                largest = max(largest, v)
    for k in total:
        peak[k] = max(peak[k], total[k])
    peak["largest"] = max(peak["largest"], largest)


def measure(cmd: list, env=None) -> dict:
    """Run cmd; wall seconds, CPU seconds (user + system, its whole process tree), peak VmHWM
    and peak anonymous RSS (bytes, children summed)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = {"RssAnon": 0, "VmHWM": 0, "largest": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            _tree_peak(proc.pid, peak)
            time.sleep(0.01)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    secs = time.perf_counter() - t0
    done.set()
    th.join()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-1500:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    # hwm: the largest single process's peak, as /usr/bin/time reports it; tree: all processes'
    # peaks added (an upper bound for multi-process converters, which share some pages)
    return {"seconds": secs, "cpu": cpu, "hwm": peak["largest"], "tree": peak["VmHWM"], "anon": peak["RssAnon"]}


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _size(path) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


class Bench:
    def __init__(self, workdir, repeat):
        self.workdir, self.repeat, self.rows = workdir, repeat, []

    def run(self, label, group, cmd, out=None, *, input_bytes, env=None):
        """Measure cmd (best wall time of `repeat` runs, highest peaks; llama.cpp's converters run
        once: they take minutes and gigabytes); out is removed before each run."""
        best = None
        for _ in range(1 if label.startswith("llama.cpp") else self.repeat):
            if out:
                _remove(out)
            subprocess.run(["sync"], check=False)
            try:
                m = measure(cmd, env)
            except RuntimeError as e:
                print(f"  {label}: FAILED {str(e)[:300]}", flush=True)
                self.rows.append({"label": label, "group": group, "failed": str(e)[-300:]})
                return None
            if best is None:
                best = m
            else:
                best = {"seconds": min(best["seconds"], m["seconds"]), "cpu": min(best["cpu"], m["cpu"]),
                        "hwm": max(best["hwm"], m["hwm"]), "tree": max(best["tree"], m["tree"]),
                        "anon": max(best["anon"], m["anon"])}
        row = {"label": label, "group": group, "input_bytes": input_bytes, **best,
               "output_bytes": _size(out) if out and os.path.exists(out) else 0}
        self.rows.append(row)
        print(f"  {label:<44} {best['seconds']:7.2f} s  cpu {best['cpu']:6.2f} s  "
              f"{input_bytes / MB / best['seconds']:7.0f} MB/s  "
              f"peak {best['hwm'] / MB:6.0f} MB  (tree {best['tree'] / MB:6.0f} MB)  anon {best['anon'] / MB:6.0f} MB",
              flush=True)
        return row


def machine() -> list:
    lines = []
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    mem = next((int(ln.split()[1]) // 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    lines.append(f"CPU: {model}, {os.cpu_count()} logical cores; RAM {mem / 1024:.0f} GiB")
    lines.append(f"Kernel: {platform.system()} {platform.release()}; Python {platform.python_version()}")
    try:
        import numpy

        lines.append(f"numpy {numpy.__version__}")
    except ImportError:
        pass
    return lines


def _cases(args, meta, pth, hf, hf_files, out) -> list:
    """(label, group, command, output, input bytes or the earlier output it reads[, env]) of every
    measurement, in run order."""
    in_meta, in_hf = os.path.getsize(pth), (_size(hf) if hf_files else 0)
    cases = []
    for kind, src, size, cp_src in (("Meta", meta, in_meta, [pth]), ("HF", hf, in_hf, hf_files)):
        cp_dir = out(f"cp-{kind}")
        cases.append((f"cp {kind} input", kind, ["sh", "-c", 'mkdir -p "$0" && cp "$@" "$0"', cp_dir, *cp_src],
                      cp_dir, size))
        # wconv fsyncs each output before renaming it into place (no partial file after a crash);
        # cp does not. This anchor does the same work as wconv's same-type path: copy, then fsync.
        cases.append((f"cp + sync {kind} input", kind,
                      ["sh", "-c", 'mkdir -p "$0" && cp "$@" "$0" && sync "$0"/*', cp_dir, *cp_src], cp_dir, size))
        cases.append((f"wconv inspect {kind}", kind, [*WCONV, "inspect", src], None, size))
        for dt in ("bf16", "f16", "q8_0"):
            cases.append((f"wconv {kind} -> GGUF {dt}", kind,
                          [*WCONV, "convert", src, out(f"w-{dt}.gguf"), "--dtype", dt, "--quiet"],
                          out(f"w-{dt}.gguf"), size))
        cases.append((f"wconv {kind} -> llama2.c v0", kind,
                      [*WCONV, "pth-to-bin", src, out("w.bin"), "--quiet"], out("w.bin"), size))
        cases.append((f"cp of the v0 output ({kind})", kind, ["cp", out("w.bin"), out("cp-v0.bin")],
                      out("cp-v0.bin"), size))
        cases.append((f"cp + sync of the v0 output ({kind})", kind,
                      ["sh", "-c", 'cp "$0" "$1" && sync "$1"', out("w.bin"), out("cp-v0.bin")],
                      out("cp-v0.bin"), size))
        cases.append((f"wconv {kind} -> safetensors", kind,
                      [*WCONV, "convert", src, out("w.safetensors"), "--quiet"], out("w.safetensors"), size))
        if kind == "Meta":
            cases.append((f"wconv {kind} -> HF dir", kind,
                          [*WCONV, "convert", src, out("w-hf"), "--to", "hf", "--quiet"], out("w-hf"), size))
            cases.append(("wconv GGUF q8_0 -> GGUF (same type)", kind,
                          [*WCONV, "convert", out("w-q8_0.gguf"), out("w-q8_0-copy.gguf"), "--quiet"],
                          out("w-q8_0-copy.gguf"), out("w-q8_0.gguf")))
            cases.append(("cp GGUF q8_0", kind, ["cp", out("w-q8_0.gguf"), out("cp-q8.gguf")],
                          out("cp-q8.gguf"), out("w-q8_0.gguf")))
            cases.append(("cp + sync GGUF q8_0", kind,
                          ["sh", "-c", 'cp "$0" "$1" && sync "$1"', out("w-q8_0.gguf"), out("cp-q8.gguf")],
                          out("cp-q8.gguf"), out("w-q8_0.gguf")))
            try:
                import torch  # noqa: F401

                cases.append(("torch.load(mmap) + save_file (Meta)", kind, [PY, "-c", TORCH_ROUTE, pth,
                              out("t.safetensors")], out("t.safetensors"), size))
            except ImportError:
                print("torch is not importable: torch route not measured")
        if args.llama_cpp:
            env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py"))
            legacy = os.path.join(args.llama_cpp, "examples", "convert_legacy_llama.py")
            hf_conv = os.path.join(args.llama_cpp, "convert_hf_to_gguf.py")
            if os.path.exists(legacy) and kind == "Meta":  # (its q8_0 run peaks near 20 GB: once)
                for dt in ("f16", "q8_0"):
                    cases.append((f"llama.cpp convert_legacy_llama {kind} -> {dt}", kind,
                                  [PY, legacy, src, "--outtype", dt, "--outfile", out(f"l-{dt}.gguf")],
                                  out(f"l-{dt}.gguf"), size, env))
            if os.path.exists(hf_conv) and kind == "HF":
                for dt in ("bf16", "f16", "q8_0"):
                    cases.append((f"llama.cpp convert_hf_to_gguf {kind} -> {dt}", kind,
                                  [PY, hf_conv, src, "--outtype", dt, "--outfile", out(f"h-{dt}.gguf")],
                                  out(f"h-{dt}.gguf"), size, env))
    return cases


def _page_reporting_note() -> list:
    """A virtual machine that hands freed memory back to its host makes first touches slow."""
    if not (os.path.isdir("/sys/module/page_reporting") and os.path.isdir("/sys/bus/virtio/drivers/virtio_balloon")):
        return []
    return ["- This is a virtual machine with free page reporting (the kernel's page_reporting with "
            "virtio-balloon): memory the guest frees, such as the page cache of an output "
            "deleted before the next run, goes back to the host, and touching it again costs a host "
            "page fault, counted as the guest's system time (4 GB written by one process took 11.6 s "
            "of system time just after 13 GB were freed, 2.4 s on the next run). It is the likeliest "
            "cause of the spread between identical runs (up to 2x), and the reason every piece's "
            "buffers are reused (wconv.stream.keep_freed_memory)."]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="2 (~1.27 GB) or 32 (Llama 2 7B, 13.5 GB)")
    ap.add_argument("--workdir", default="/tmp/wconv-bench")
    ap.add_argument("--llama-cpp", help="a llama.cpp checkout (convert_hf_to_gguf.py, examples/convert_legacy_llama.py)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="a Llama sentencepiece tokenizer.model")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (best time is reported)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--only", help="comma-separated label substrings to run (debugging)")
    ap.add_argument("--report-from", help="rewrite the report from a saved RESULTS.json (no measuring)")
    ap.add_argument("--flat-against", help="a saved RESULTS.json of another model size: compare peak RSS "
                                           "per conversion (the flat-memory target)")
    args = ap.parse_args()
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        args.layers, args.repeat, args.only = saved["layers"], saved["repeat"], saved.get("only", args.only)
        print(write_results(args, saved["rows"], saved["load_before"], saved["in_meta"], saved["in_hf"],
                            saved.get("machine")))
        return
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    # An installed wheel carries compiled bytecode; a checkout run with PYTHONDONTWRITEBYTECODE
    # would compile every module at each start (0.14 s a run). Compile once, as pip does, for
    # wconv and for the llama.cpp converters' gguf-py alike.
    compiled = [os.path.join(ROOT, "wconv")] + ([os.path.join(args.llama_cpp, "gguf-py")] if args.llama_cpp else [])
    subprocess.run([PY, "-m", "compileall", "-q", *compiled], stdout=subprocess.DEVNULL, check=False)
    os.makedirs(args.workdir, exist_ok=True)
    load_before = os.getloadavg()

    meta = os.path.join(args.workdir, f"meta-{args.layers}l")
    pth = os.path.join(meta, "consolidated.00.pth")
    if not os.path.exists(os.path.join(meta, "params.json")):
        print(f"making the {args.layers}-layer checkpoint in {meta} ...", flush=True)
        make_meta(meta, args.layers, args.tokenizer)
    hf = os.path.join(args.workdir, f"hf-{args.layers}l")
    wanted = lambda label: not args.only or any(s in label for s in args.only.split(","))  # noqa: E731
    # The HF directory is made only when an HF case is wanted (at 7B: 13.5 GB of disk, which the
    # 27 GB v0 output and its 27 GB cp anchor need on a smaller disk).
    need_hf = any(wanted(c[0]) for c in _cases(args, meta, pth, hf, [], lambda n: n) if c[1] == "HF")
    if need_hf and not os.path.exists(os.path.join(hf, "config.json")):
        subprocess.run([*WCONV, "convert", meta, hf, "--to", "hf", "--dtype", "bf16", "--quiet"], check=True)
    hf_files = sorted(os.path.join(hf, n) for n in os.listdir(hf) if n.endswith(".safetensors")) if need_hf else []
    in_meta, in_hf = os.path.getsize(pth), (_size(hf) if need_hf else 0)
    out = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    b = Bench(args.workdir, args.repeat)

    print(f"inputs: Meta {in_meta / MB:.0f} MB, HF {in_hf / MB:.0f} MB; load average {load_before[0]:.1f}")
    subprocess.run(["cat", pth, *hf_files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    cases = [c for c in _cases(args, meta, pth, hf, hf_files, out) if wanted(c[0])]
    for i, case in enumerate(cases):
        label, group, cmd, dst, size = case[:5]
        env = case[5] if len(case) > 5 else None
        if isinstance(size, str):  # the input is an earlier case's output, named here
            if not os.path.exists(size):
                continue
            size = os.path.getsize(size)
        b.run(label, group, cmd, dst, input_bytes=size, env=env)
        if dst and not any(dst in later[2] and later[3] != dst for later in cases[i + 1:]):
            _remove(dst)  # outputs go as soon as no later case reads them (disk or tmpfs: 7B outputs are big)
    report = write_results(args, b.rows, list(load_before), in_meta, in_hf)
    print()
    print(report)
    for name in ("cp-Meta", "cp-HF", "w-bf16.gguf", "w-f16.gguf", "w-q8_0.gguf", "w.bin", "cp-v0.bin", "w.safetensors",
                 "w-hf", "w-q8_0-copy.gguf", "cp-q8.gguf", "t.safetensors", "l-f16.gguf", "l-q8_0.gguf",
                 "h-bf16.gguf", "h-f16.gguf", "h-q8_0.gguf"):
        _remove(out(name))
    if not args.keep:
        _remove(meta)
        _remove(hf)


# --- report ------------------------------------------------------------------------------------

def _find(rows, label):
    return next((r for r in rows if r["label"] == label and "failed" not in r), None)


def write_results(args, rows, load_before, in_meta, in_hf, machine_lines=None) -> str:
    machine_lines = machine_lines or machine()
    with open(os.path.splitext(args.results)[0] + ".json", "w") as f:
        json.dump({"layers": args.layers, "repeat": args.repeat, "load_before": load_before, "in_meta": in_meta,
                   "in_hf": in_hf, "machine": machine_lines, "only": args.only, "rows": rows}, f, indent=1)
    lines = ["# wconv conversion benchmark", "",
             f"`bench/bench_convert.py --layers {args.layers}"
             + (" --llama-cpp DIR" if args.llama_cpp else "") + f" --repeat {args.repeat}"
             + (f" --only \"{args.only}\"" if args.only else "") + "` on "
             f"{time.strftime('%Y-%m-%d')}.", "", "Machine:", ""]
    lines += [f"- {m}" for m in machine_lines]
    lines += [f"- load average before the run: {load_before[0]:.1f} (shared machine: other jobs ran too; "
              "times are wall clock, best of the repeats)",
              f"- inputs: Llama-2-7B shapes with {args.layers} layers, bf16: Meta .pth {in_meta / MB:.0f} MB, "
              f"HF dir {in_hf / MB:.0f} MB; warm page cache; outputs on the same filesystem", ""]
    lines += ["| conversion | wall s | CPU s (user+sys) | MB/s (input) | peak RSS MB | all processes MB "
              "| peak anon MB | × cp time | vs llama.cpp (wall; peak RSS) |",
              "|---|---|---|---|---|---|---|---|---|"]
    anchors = {}
    for kind in ("Meta", "HF"):
        for dt in ("bf16", "f16", "q8_0"):
            cands = [r for r in rows if "failed" not in r and r["group"] == kind and r["label"].startswith("llama.cpp")
                     and r["label"].endswith(f"-> {dt}")]
            if cands:
                anchors[(kind, dt)] = min(cands, key=lambda r: r["seconds"])
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | failed: {r['failed'][:120].replace('|', '/')} | | | | | | | |")
            continue
        cp = _find(rows, f"cp {r['group']} input")
        x_cp = f"{r['seconds'] / cp['seconds']:.2f}" if cp and r is not cp else ""
        vs = ""
        for dt in ("bf16", "f16", "q8_0"):
            a = anchors.get((r["group"], dt))
            if a and r["label"].startswith("wconv") and r["label"].endswith(f"GGUF {dt}"):
                vs = f"{a['seconds'] / r['seconds']:.1f}× faster, {a['hwm'] / max(r['hwm'], 1):.1f}× less peak"
        lines.append(f"| {r['label']} | {r['seconds']:.2f} | {r['cpu']:.2f} | {r['input_bytes'] / MB / r['seconds']:.0f} | "
                     f"{r['hwm'] / MB:.0f} | {r['tree'] / MB:.0f} | {r['anon'] / MB:.0f} | {x_cp} | {vs} |")
    lines += ["", "## Issue 9 targets", "",
              "Wall-clock ratios from this run, then the same comparison in CPU seconds (user + system of the "
              "whole process tree), which other jobs on a shared machine disturb less.", ""]
    lines += _targets(rows, anchors)
    if getattr(args, "flat_against", None):
        lines += _flat(rows, args.layers, args.flat_against)
    lines += ["", "## Notes", "",
              "- Peak RSS is VmHWM of the largest process (what `/usr/bin/time` reports), mapped input pages "
              "included; \"all processes\" adds the peaks of every process in the tree (convert_legacy_llama's "
              "q8_0 path forks workers, which share some pages: an upper bound).",
              "- wconv's fixed cost (interpreter start, imports, reading the headers and the 32000-token "
              "sentencepiece vocabulary) is the `wconv inspect` time; GGUF output adds packing that "
              "vocabulary into metadata. None of it grows with the model. The bytecode is compiled before measuring, as an installed "
              "wheel has it.",
              "- Every wconv output is fsynced before it is renamed into place; cp returns with its data "
              "still in the page cache (up to the kernel's dirty limit, ~20% of RAM), so on a disk-bound "
              "13.5 GB copy cp leaves gigabytes unwritten that wconv waits for (before wconv started the "
              "writeback as it wrote, its 13.5 GB copy reached 0.41× cp). "
              "`cp + sync` is the anchor with the same guarantee. wconv starts the disk writing every 64 MB "
              "(sync_file_range), so the fsync at the end finds little left to do.",
              "- On a machine shared with other jobs, wall times of long runs (the llama.cpp converters) "
              "suffer more than short ones; the CPU-time comparison is the steadier one.",
              *_page_reporting_note(),
              "- The other model size: " + ("the full 13.5 GB checkpoint (`--layers 32`) is in RESULTS-7b.md, "
                                            "which also compares peak memory across the two sizes."
                                            if args.layers != 32 else "the 2-layer checkpoint is in RESULTS.md."),
              "- k-quants (Q4_K_M, Q6_K against llama.cpp's `llama_model_quantize`): `bench/bench_kquants.py`, "
              "figures in RESULTS-kquants.md."]
    text = "\n".join(lines) + "\n"
    with open(args.results, "w") as f:
        f.write(text)
    return text


def _targets(rows, anchors) -> list:
    out = []

    def verdict(ok):
        return "met" if ok else "NOT met"

    for kind in ("Meta", "HF"):
        cp, w = _find(rows, f"cp {kind} input"), _find(rows, f"wconv {kind} -> GGUF bf16")
        ins = _find(rows, f"wconv inspect {kind}")
        if cp and w:
            ratio = cp["seconds"] / w["seconds"]
            fixed = (f"; without the fixed start-up cost `wconv inspect` shows ({ins['seconds']:.2f} s: interpreter, "
                     f"imports, headers, the 32000-token vocabulary) {cp['seconds'] / max(w['seconds'] - ins['seconds'], 1e-9):.2f}×"
                     if ins else "")
            durable = _find(rows, f"cp + sync {kind} input")
            against_durable = (f"; against cp + sync (the same durability as wconv's fsynced output) "
                               f"{durable['seconds'] / w['seconds']:.2f}×: {verdict(durable['seconds'] / w['seconds'] >= 0.8)}"
                               if durable else "")
            out.append(f"- same type, {kind} bf16 -> GGUF bf16: {ratio:.2f}× cp's throughput (target ≥ 0.8): "
                       f"{verdict(ratio >= 0.8)}{against_durable}{fixed}"
                       + (" (HF q/k rows are permuted, so not a pure copy)" if kind == "HF" else ""))
    cp, w = _find(rows, "cp GGUF q8_0"), _find(rows, "wconv GGUF q8_0 -> GGUF (same type)")
    if cp and w:
        ratio = cp["seconds"] / w["seconds"]
        durable = _find(rows, "cp + sync GGUF q8_0")
        against_durable = (f"; against cp + sync {durable['seconds'] / w['seconds']:.2f}×: "
                           f"{verdict(durable['seconds'] / w['seconds'] >= 0.8)}" if durable else "")
        out.append(f"- same type, GGUF q8_0 -> GGUF q8_0: {ratio:.2f}× cp's throughput (target ≥ 0.8): "
                   f"{verdict(ratio >= 0.8)}{against_durable}")
    for kind in ("Meta", "HF"):
        for dt in ("f16", "q8_0"):
            a, w = anchors.get((kind, dt)), _find(rows, f"wconv {kind} -> GGUF {dt}")
            if a and w:
                speed, mem = a["seconds"] / w["seconds"], a["hwm"] / max(w["hwm"], 1)
                cpu = a["cpu"] / max(w["cpu"], 1e-9)
                out.append(f"- {kind} bf16 -> {dt}: {speed:.1f}× faster than the faster llama.cpp converter "
                           f"({a['label']}, {a['seconds']:.1f} s), {mem:.1f}× less peak memory (targets ≥ 3× "
                           f"and ≥ 4×): {verdict(speed >= 3 and mem >= 4)}; in CPU time {cpu:.1f}× "
                           f"({a['cpu']:.1f} s vs {w['cpu']:.1f} s): {verdict(cpu >= 3)}")
            elif w:
                out.append(f"- {kind} bf16 -> {dt}: no llama.cpp anchor measured")
    for kind in ("Meta", "HF"):
        w, cp = _find(rows, f"wconv {kind} -> llama2.c v0"), _find(rows, f"cp of the v0 output ({kind})")
        if w and cp:
            ratio = w["seconds"] / cp["seconds"]
            cpu = w["cpu"] / max(cp["cpu"], 1e-9)
            durable = _find(rows, f"cp + sync of the v0 output ({kind})")
            against_durable = (f"; against cp + sync of it (wconv's output is fsynced) {w['seconds'] / durable['seconds']:.2f}×: "
                               f"{verdict(w['seconds'] / durable['seconds'] <= 1.5)}" if durable else "")
            out.append(f"- {kind} pth-to-bin v0: {ratio:.2f}× the time cp takes to write a file of the output's "
                       f"size (target ≤ 1.5): {verdict(ratio <= 1.5)}; in CPU time {cpu:.2f}×: {verdict(cpu <= 1.5)}"
                       f"{against_durable}")
    peaks = [r for r in rows if "failed" not in r and r["label"].startswith("wconv")]
    if peaks:
        worst = max(peaks, key=lambda r: r["hwm"])
        out.append(f"- peak RSS of every wconv run ≤ 300 MB: worst {worst['hwm'] / MB:.0f} MB ({worst['label']}): "
                   f"{verdict(worst['hwm'] <= 300 * MB)}")
    return out


def _flat(rows, layers, other_path) -> list:
    """Peak RSS of each wconv conversion here against the same conversion in another run."""
    with open(other_path) as f:
        other = json.load(f)
    pairs = [(r, _find(other["rows"], r["label"])) for r in rows
             if "failed" not in r and r["label"].startswith("wconv")]
    pairs = [(r, o) for r, o in pairs if o]
    if not pairs:
        return []
    worst = max(pairs, key=lambda p: abs(p[0]["hwm"] - p[1]["hwm"]))
    diff = abs(worst[0]["hwm"] - worst[1]["hwm"])
    out = [f"- peak RSS flat in model size ({other['layers']} layers, {os.path.basename(other_path)}, against "
           f"{layers} layers here; target: within 50 MB): largest difference {diff / MB:.0f} MB "
           f"({worst[0]['label']}): {'met' if diff <= 50 * MB else 'NOT met'}", "",
           f"| conversion | peak RSS MB, {other['layers']} layers | peak RSS MB, {layers} layers |", "|---|---|---|"]
    out += [f"| {r['label']} | {o['hwm'] / MB:.0f} | {r['hwm'] / MB:.0f} |" for r, o in pairs]
    return out


if __name__ == "__main__":
    main()

"""Hostile checkpoints, across every reader: each ends in a WconvError naming the problem.

The corpus (tests/hostile.py, built by code) covers code-running pickles (os.system,
subprocess, eval/exec/getattr/__import__/open, torch.load, nested pickle.loads,
INST/OBJ/NEWOBJ/NEWOBJ_EX/REDUCE, BUILD tricks, EXT opcodes with a populated copyreg
registry, out-of-band buffers), memo abuse and nesting bombs, lying tensor records,
zip parser differentials and bombs, legacy-format lies, and header bombs for GGUF,
safetensors, llama2.c, tokenizer.bin, ggjt and sentencepiece files; plus every
truncation of a small valid file of each format.

Everything runs in worker subprocesses that import only wconv, under a 3 GB address-space
limit and a timeout, with every payload aimed at a canary file. Checked: the library
raises WconvError (one line, naming the file and the problem); `inspect`, `scan` and
conversions to gguf/safetensors/llama2.c refuse and leave no output or temporary file;
nothing is executed; each operation finishes in seconds. A subset goes through the CLI.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import hostile

RLIMIT_AS = 3 << 30
OP_SECONDS = 30  # per operation on one hostile file (the slowest, memo_flood, takes ~4 s unloaded)
WORKER_TIMEOUT = 300
MAX_JSON_CHARS = 200_000  # inspect/scan output for a hostile file stays small
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_AS, RLIMIT_AS))


def _start_worker(tmp, name, jobs):
    spec = {"rlimit_as": RLIMIT_AS, "outdir": str(tmp / f"{name}-out"), "jobs": jobs}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "hostile.py"), str(path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp))


def _finish(proc):
    out, err = proc.communicate(timeout=WORKER_TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    canary = tmp / "CANARY"
    cases, valid = hostile.build_corpus(tmp / "files", canary)
    jobs = [{"name": c.name, "path": c.path, "ops": hostile.default_ops(c)} for c in cases]
    kinds = {"tokenizer": "tokenizer", "sentencepiece": "tokenizer", "torch_zip": "torch", "torch_legacy": "torch"}
    sweeps = [{"name": k, "path": p, "truncate": True, "kind": kinds.get(k, "model")} for k, p in valid.items()]
    sweeps.append({"name": "probe", "path": valid["gguf"], "ops": ["probe_limit"]})
    # Two workers at once (two cores): the hostile cases, and the truncation sweeps.
    procs = [_start_worker(tmp, "cases", jobs), _start_worker(tmp, "sweeps", sweeps)]
    results = [r for p in procs for r in _finish(p)]
    return {"cases": {c.name: c for c in cases}, "results": results, "canary": canary, "valid": valid,
            "tmp": tmp}


def _records(corpus, op):
    return [(corpus["cases"][r["name"]], r) for r in corpus["results"] if r["op"] == op]


def _fmt(problems):
    return "\n".join(problems[:40]) + (f"\n... {len(problems) - 40} more" if len(problems) > 40 else "")


def test_corpus_is_broad(corpus):
    tags = {}
    for c in corpus["cases"].values():
        for t in c.tags:
            tags[t] = tags.get(t, 0) + 1
    assert len(corpus["cases"]) > 200 and all(tags.get(t, 0) >= 10 for t in ("pickle", "tensor", "zip", "header"))


def test_memory_limit_applies_in_workers(corpus):
    (probe,) = [r for r in corpus["results"] if r["op"] == "probe_limit"]
    assert probe["outcome"] == "crash" and probe["type"] == "MemoryError"


def test_inspect_with_placeholders_bounded_on_wide_sharing(corpus):
    # The one case built to pass the interpreter's sharing check: it must be inspectable.
    (r,) = [r for c, r in _records(corpus, "inspect_unknown") if c.name == "zip_sharing_wide_placeholders"]
    assert r["outcome"] == "ok" and r["json_chars"] < MAX_JSON_CHARS


def test_nothing_is_executed(corpus):
    assert not corpus["canary"].exists()


def test_loading_raises_wconv_error_naming_the_problem(corpus):
    problems = []
    for op in ("load", "tokenizer"):
        for case, r in _records(corpus, op):
            if r["outcome"] != "error":
                problems.append(f"{case.name}: {op} gave {r['outcome']} {r.get('type', '')} {r.get('message', '')}")
            elif not re.search(case.error, r["message"]):
                problems.append(f"{case.name}: expected /{case.error}/, got: {r['message']}")
            elif "\n" in r["message"] or os.path.basename(case.path) not in r["message"]:
                problems.append(f"{case.name}: message must be one line naming the file: {r['message']!r}")
    assert not problems, _fmt(problems)


def test_sentencepiece_reader_refuses(corpus):
    records = _records(corpus, "spm")
    assert records
    bad = [f"{c.name}: {r['outcome']} {r.get('message')}" for c, r in records if r["outcome"] != "error"]
    assert not bad, _fmt(bad)


def test_inspect_refuses_or_stays_bounded(corpus):
    problems = []
    for case, r in _records(corpus, "inspect"):
        if r["outcome"] == "crash" or (r["outcome"] == "ok" and not case.inspect_ok):
            problems.append(f"{case.name}: inspect gave {r['outcome']} {r.get('message', '')}")
    # With placeholders for unknown globals, inspection may succeed, but its output stays small.
    for case, r in _records(corpus, "inspect_unknown"):
        if r["outcome"] == "crash" or r.get("json_chars", 0) > MAX_JSON_CHARS:
            problems.append(f"{case.name}: inspect --allow-unknown-globals gave {r['outcome']} "
                            f"{r.get('json_chars')} chars {r.get('message', '')}")
    assert not problems, _fmt(problems)


def test_conversions_refuse_and_leave_nothing(corpus):
    problems = []
    for op in ("convert:gguf", "convert:safetensors", "convert:bin", "tokenizer_to_bin"):
        records = _records(corpus, op)
        assert records, op
        for case, r in records:
            if r["outcome"] != "error":
                problems.append(f"{case.name}: {op} gave {r['outcome']} {r.get('message', '')}")
            if r.get("left"):
                problems.append(f"{case.name}: {op} left {r['left']}")
    assert not problems, _fmt(problems)


def test_scan_verdicts(corpus):
    problems = []
    for case, r in _records(corpus, "scan"):
        if r["outcome"] == "crash" or r.get("json_chars", 0) > MAX_JSON_CHARS:
            problems.append(f"{case.name}: scan gave {r['outcome']} {r.get('message', '')}")
            continue
        want = case.scan
        if want is None:
            continue
        if want == "unreadable":
            ok = r["outcome"] == "error"
        elif want == "safe":
            ok = r.get("verdict") == "safe"
        else:  # unsafe, with a reason naming the global / opcode
            ok = r.get("verdict") == "unsafe" and any(re.search(want[len("unsafe:"):], x) for x in r["reasons"])
        if not ok:
            problems.append(f"{case.name}: scan expected {want}, got {r['outcome']} {r.get('verdict')} "
                            f"{r.get('reasons', r.get('message'))}")
    assert not problems, _fmt(problems)


def test_every_code_running_pickle_is_flagged_by_scan(corpus):
    # Independent of the per-case expectations: every payload naming a non-data global is unsafe.
    named = [(c, r) for c, r in _records(corpus, "scan") if "pickle" in c.tags and c.scan
             and c.scan.startswith("unsafe:")]
    assert len(named) > 60
    assert all(r.get("verdict") == "unsafe" for _, r in named)


def test_no_crash_and_bounded_time(corpus):
    problems = [f"{r['name']} {r['op']}: {r.get('type')} {r.get('message', '')}" for r in corpus["results"]
                if r.get("outcome") == "crash" and r["op"] != "probe_limit"]
    problems += [f"{r['name']} {r['op']}: {r['seconds']:.1f} s" for r in corpus["results"]
                 if r["op"] != "truncate" and r["seconds"] > OP_SECONDS]
    assert not problems, _fmt(problems)


def test_every_truncation_fails_or_reads_consistently(corpus):
    sweeps = {r["name"]: r for r in corpus["results"] if r["op"] == "truncate"}
    assert set(sweeps) == set(corpus["valid"])
    problems = []
    for name, r in sweeps.items():
        assert r["n"] == os.path.getsize(corpus["valid"][name])
        bad = r["bad"]
        if name == "llama2c_v0":
            # v0 has no magic and two layouts (with and without RoPE tables): the file cut
            # exactly by the tables' size is a valid file of the other layout.
            tables = 2 * 4 * hostile.TINY["max_seq_len"] * (hostile.TINY["dim"] // hostile.TINY["n_heads"]) // 2
            bad = [b for b in bad if b != [r["n"] - tables, "inconsistent", ""]]
        problems += [f"{name} cut at {b[0]}: {b[1]} {b[2]}" for b in bad]
    # Formats with a tensor count or an end record never accept a prefix.
    for name in ("gguf", "safetensors", "llama2c_v1", "llama2c_v2", "torch_zip", "torch_legacy"):
        if sweeps[name]["ok"]:
            problems.append(f"{name}: {sweeps[name]['ok']} truncated copies opened without error")
    assert not problems, _fmt(problems)


# --- the command line, for a representative subset ---------------------------------------------


WCONV = os.path.join(os.path.dirname(sys.executable), "wconv")  # the installed console script


def _cli(args, cwd):
    return subprocess.Popen([WCONV, *args], env=ENV, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_memory)


def test_cli_refuses_with_one_line_errors(corpus, tmp_path):
    subset = [c for c in corpus["cases"].values() if c.cli]
    assert len(subset) >= 8
    runs = []
    for c in subset:
        out = tmp_path / c.name
        out.mkdir()
        runs.append((c, "inspect", ["inspect", c.path], out))
        runs.append((c, "convert", ["convert", c.path, str(out / "out.gguf")], out))
        if c.scan and "pickle" in c.tags:
            runs.append((c, "scan", ["scan", c.path], out))
    problems = []
    for i in range(0, len(runs), 3):  # a few at a time
        batch = [(c, what, out, _cli(args, str(out))) for c, what, args, out in runs[i:i + 3]]
        for c, what, out, proc in batch:
            stdout, stderr = proc.communicate(timeout=60)
            if what == "scan":
                want = {"unsafe": 1, "unreadable": 2, "safe": 0}[c.scan.split(":")[0]]
                if proc.returncode != want or stderr:
                    problems.append(f"{c.name} scan: exit {proc.returncode}, wanted {want}; {stderr!r}")
                continue
            if what == "inspect" and c.inspect_ok:
                continue
            lines = stderr.splitlines()
            error_lines = [line for line in lines if not line.startswith("wconv: warning")]
            if (proc.returncode in (0, 70) or len(error_lines) != 1 or not error_lines[0].startswith("wconv: error:")
                    or "Traceback" in stderr or os.path.basename(c.path) not in error_lines[0]):
                problems.append(f"{c.name} {what}: exit {proc.returncode}, stderr {stderr!r}")
            if what == "convert" and os.listdir(out):
                problems.append(f"{c.name} convert left {os.listdir(out)}")
    assert not corpus["canary"].exists()
    assert not problems, _fmt(problems)


def test_torch_files_saved_without_crc32_are_read(tmp_path):
    # torch.serialization.set_crc32_options(False) writes CRC 0 everywhere; torch.load reads
    # such files, so wconv must too (a wrong non-zero CRC is still refused: bad_crc_pickle).
    import torch
    from wconv.formats.torch_file import load_pickled

    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(3.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_pickled(tmp_path / "nocrc.pt")["w"].raw().tolist() == [0.0, 1.0, 2.0]

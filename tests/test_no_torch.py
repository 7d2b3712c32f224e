"""wconv runs without torch: the CLI, in a subprocess where torch, transformers and
sentencepiece cannot be imported, inspects, converts and checks parity on the fixtures.

The subprocess installs an import blocker before anything of wconv is imported; it records
every blocked import and who asked for it. The test fails if a command fails, or if any
module inside the wconv package even tried one of the blocked imports (a try/except
fallback in wconv would hide a torch dependency from the exit codes alone). The outputs
are then read back in this process by the real third-party readers.

No import cycles either: the import graph of wconv's modules is read from the source (ast;
imports inside functions count too, since a lazy import hides a cycle from Python but not the
two-way dependency). `from pkg import submodule` is an edge to the submodule; an edge to a
package only when names defined in its __init__ are taken.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import wconv
from conftest import fixture_path, realdata_path

BLOCKED = ("torch", "transformers", "sentencepiece")
WCONV_DIR = os.path.dirname(os.path.abspath(wconv.__file__))

# Runs in the child: argv[1] is a JSON list of wconv argument lists; prints one JSON report.
DRIVER = r'''
import contextlib, io, json, os, sys

BLOCKED = set(sys.argv[2].split(","))
attempts = []

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith("<frozen"):
            f = f.f_back
        attempts.append([name, f.f_code.co_filename if f is not None else "?"])
        raise ImportError(f"{name} is blocked in this test")

    def find_module(self, name, path=None):  # never used by the import system on 3.4+; for old hooks
        return None

sys.meta_path.insert(0, Blocker())
preloaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)

try:
    import torch  # noqa: F401  the blocker must be active, or the test proves nothing
    blocker_works = False
except ImportError:
    blocker_works = True
attempts.clear()

import wconv, wconv.cli  # noqa: E401

results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["wconv", *args]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            wconv.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append({"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})

loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"blocker_works": blocker_works, "preloaded": preloaded, "attempts": attempts,
                  "loaded": loaded, "results": results}))
'''


def run_without_torch(commands: list[list[str]]) -> list[dict]:
    """Run wconv CLI commands in one torch-less child process; check nothing reached for torch."""
    env = {k: v for k, v in os.environ.items() if k != "WCONV_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands), ",".join(BLOCKED)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["blocker_works"], "the import blocker did not stop `import torch`"
    assert report["preloaded"] == [], f"imported before wconv was: {report['preloaded']}"
    assert report["loaded"] == [], f"blocked packages ended up in sys.modules: {report['loaded']}"
    from_wconv = [(name, where) for name, where in report["attempts"]
                  if os.path.abspath(where).startswith(WCONV_DIR + os.sep)]
    assert from_wconv == [], f"wconv tried to import blocked packages: {from_wconv}"
    for r in report["results"]:
        assert r["code"] == 0, f"wconv {' '.join(r['args'])} exited {r['code']}: {r['stderr'][-2000:]}"
    return report["results"]


def test_inspect_convert_parity_without_torch(tmp_path):
    meta, hf_bin = fixture_path("meta-tiny"), fixture_path("hf-llama-tiny-bin")
    nano = fixture_path("nanogpt-ckpt.pt")
    out = {name: str(tmp_path / name) for name in ("meta.bin", "meta.gguf", "hf.safetensors", "nano.gguf")}
    results = run_without_torch([
        ["inspect", "--json", meta],
        ["inspect", "--json", nano],
        ["pth-to-bin", "-q", meta, out["meta.bin"]],
        ["convert", "-q", meta, out["meta.gguf"], "--dtype", "q8_0"],
        ["convert", "-q", hf_bin, out["hf.safetensors"], "--dtype", "f32"],
        ["convert", "-q", nano, out["nano.gguf"]],
        ["parity", "--json", meta, out["meta.bin"]],
        ["parity", "--json", meta, out["meta.gguf"]],
        ["parity", "--json", hf_bin, out["hf.safetensors"]],
        ["parity", "--json", nano, out["nano.gguf"]],
    ])

    # inspect: the facts fixtures/README.md states for these files.
    meta_report, nano_report = (json.loads(r["stdout"]) for r in results[:2])
    assert (meta_report["arch"], meta_report["layout"]) == ("llama", "meta")
    c = meta_report["config"]
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["vocab_size"], c["hidden_dim"]) == \
        (64, 2, 4, 2, 256, 224)
    assert meta_report["dtypes"] == {"BF16": 2 * 9 + 3}
    assert (nano_report["arch"], nano_report["layout"]) == ("gpt2", "nanogpt")
    assert nano_report["config"]["dim"] == 24 and nano_report["config"]["max_seq_len"] == 32
    assert "optimizer" in nano_report["metadata"]

    # parity: every conversion judged equal to its source.
    for r in results[6:]:
        verdict = json.loads(r["stdout"])
        assert verdict["ok"] is True and verdict["n_tokens"] > 1, r["args"]

    # The outputs are real files for their consumers' own readers (in this process, torch allowed).
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(out["meta.gguf"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == 2 * 9 + 3 and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    st = load_file(out["hf.safetensors"])
    assert len(st) == 2 * 9 + 3
    import torch  # the reference for the values: torch's own reading of the source shard

    shard = torch.load(os.path.join(hf_bin, "pytorch_model-00001-of-00002.bin"), weights_only=True)
    np.testing.assert_array_equal(st["token_embd.weight"], shard["model.embed_tokens.weight"].float().numpy())
    with open(out["meta.bin"], "rb") as f:
        header = np.frombuffer(f.read(28), dtype="<i4")
    assert header.tolist()[:5] == [64, 224, 2, 4, 2]


def test_tokenizer_and_legacy_torch_without_torch(tmp_path):
    """The sentencepiece and legacy-pickle readers are wconv's own: no sentencepiece, no torch."""
    model = realdata_path("llama2c", "tokenizer.model")
    expected = realdata_path("llama2c", "tokenizer.bin")  # llama2.c's own export of this tokenizer
    legacy = realdata_path("torch", "picklescan_hf_tiny-random-distilbert_pytorch_model_LEGACY.bin")
    out = tmp_path / "tokenizer.bin"
    results = run_without_torch([
        ["tokenizer-to-bin", model, str(out)],
        ["inspect", "--json", legacy],
    ])
    assert out.read_bytes() == open(expected, "rb").read()
    report = json.loads(results[1]["stdout"])
    assert report["format"] == "torch-legacy" and report["n_tensors"] == 38


# --- no import cycles ------------------------------------------------------------------------------

def modules(package_dir: str) -> dict:
    """{dotted module name: path} for every .py file under package_dir."""
    root, out = os.path.dirname(package_dir), {}
    for directory, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def import_graph(package_dir: str) -> dict:
    mods = modules(package_dir)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".") if is_package else m.split(".")[:-1]
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] + ([base] if any(t not in mods for t in subs) else [])
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_wconv_has_no_import_cycles():
    graph = import_graph(WCONV_DIR)
    assert len(graph) > 50 and graph["wconv.convert.mirror"]  # the graph was really read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")" for c in found)


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(str(pkg))) == [["pkg.a", "pkg.sub.b"]]

"""`wconv scan`: globals and risky opcodes of pickle-based files, found without running them.

Oracles: the globals pickletools decodes from the same bytes, and torch's own weights-only
unpickler (whatever it refuses, scan must call unsafe, naming the same global). The
hostile corpus is scanned in test_hostile.py.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import pickletools
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hostile
from conftest import fixture_path
from wconv.cli import main as cli
from wconv.errors import FormatError
from wconv.formats import pickle_vm
from wconv.inspect.scan import format_scan, scan_path

REAL_TORCH = ["candle_fortran_tensor_3d.pth", "nanogpt_style_small-gpt_ckpt.pt",
              "picklescan_hf_tiny-random-distilbert_pytorch_model_LEGACY.bin",
              "torchtune_tiny_fair_checkpoint_meta_format.pt"]
TENSOR_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}


class Canary:
    """Would create a file if anything ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _run(*args):
    res = CliRunner().invoke(cli, ["scan", *map(str, args)])
    return res.exit_code, res.output


# --- safe files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_TORCH)
def test_real_torch_files_are_safe(name, realdata):
    path = realdata("torch", name)
    res = scan_path(path)
    assert res["safe"] and res["verdict"] == "safe" and not res["reasons"]
    (f,) = res["files"]
    assert f["format"] == ("torch-legacy" if "LEGACY" in name else "torch-zip")
    used = {g for p in f["pickles"] for g in p["globals"]}
    assert TENSOR_GLOBALS <= used and all(re.fullmatch(r"torch\.\w+Storage|collections\.OrderedDict|"
                                                       r"torch\._utils\._rebuild_tensor_v2", g) for g in used)
    # Every tensor is rebuilt by one REDUCE of _rebuild_tensor_v2: count them against torch.
    n = sum(p["calls"].get("REDUCE", {}).get("torch._utils._rebuild_tensor_v2", 0) for p in f["pickles"])
    assert n == len(_tensors(torch.load(path, weights_only=True)))
    code, out = _run(path)
    assert code == 0 and "verdict: safe" in out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_fixture_checkpoints_and_hf_shards_are_safe():
    for path in (fixture_path("llama2c-ckpt.pt"), fixture_path("nanogpt-ckpt.pt"), fixture_path("meta-tiny"),
                 fixture_path("hf-llama-tiny-bin"), fixture_path("meta-tiny-2shard")):
        res = scan_path(path)
        assert res["verdict"] == "safe", (path, res["reasons"])
        assert res["files"] and all(f["pickles"] for f in res["files"])
    shards = scan_path(fixture_path("hf-llama-tiny-bin"))
    assert sorted(os.path.basename(f["path"]) for f in shards["files"]) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_non_pickle_formats_hold_nothing_executable(tmp_path):
    valid = hostile.write_valid_files(tmp_path / "v")
    expected = {"gguf": "gguf", "safetensors": "safetensors", "llama2c_v0": "llama2c-v0", "llama2c_v1": "llama2c",
                "llama2c_v2": "llama2c", "ggjt": "ggjt", "tokenizer": "llama2c-tokenizer"}
    for kind, fmt in expected.items():
        res = scan_path(valid[kind])
        assert res["verdict"] == "safe" and res["files"][0]["format"] == fmt, (kind, res)
        assert res["files"][0]["pickles"] == [] and "no pickle; nothing executable" in res["notes"]
    code, out = _run(valid["gguf"])
    assert code == 0 and "no pickle; nothing executable" in out


def test_real_non_pickle_files(realdata):
    for parts in (("gguf", "ggml-vocab-gpt-2.gguf"), ("safetensors", "tinygrad_mnist_mlp.safetensors"),
                  ("llama2c", "stories260K.bin"), ("llama2c", "tokenizer.bin"), ("llama2c", "out440k_v2_int8.bin")):
        res = scan_path(realdata(*parts))
        assert res["verdict"] == "safe" and not res["files"][0]["pickles"], parts


# --- unsafe files: oracles ---------------------------------------------------------------------


class _Inert:
    """Stands in for every global while the stdlib unpickler records names: runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass


class _Recorder(pickle.Unpickler):
    def __init__(self, data, protocol):
        super().__init__(io.BytesIO(data))
        self.seen, self.protocol = [], protocol

    def find_class(self, module, name):
        import _compat_pickle

        if self.protocol < 3:  # what the stdlib's own find_class does with Python 2 names
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        self.seen.append(f"{module}.{name}")
        return _Inert


@pytest.mark.parametrize("protocol", range(6))
def test_globals_match_the_stdlib_unpickler(protocol, tmp_path):
    canary = tmp_path / "canary"
    od = collections.OrderedDict(a=np.arange(3), b=Canary(canary))
    data = pickle.dumps([od, {"f": print, "n": np.float32(1)}, od], protocol=protocol)
    (p,) = scan_path(_write(tmp_path / "x.pkl", data))["files"][0]["pickles"]
    rec = _Recorder(data, protocol)
    rec.load()  # every global goes through find_class, which returns an inert stand-in
    assert p["globals"] == list(dict.fromkeys(rec.seen))
    assert p["protocol"] == (protocol if protocol >= 2 else 0)
    assert p["n_opcodes"] == len(list(pickletools.genops(data)))
    assert {"posix.system", "builtins.print"} <= set(p["unknown_globals"])
    assert not canary.exists()


@pytest.mark.parametrize("payload", ["canary", "module", "deque", "function", "partial"])
def test_whatever_torch_weights_only_refuses_is_unsafe(payload, tmp_path):
    import functools

    canary = tmp_path / "canary"
    obj = {"canary": Canary(canary), "module": torch.nn.Linear(2, 2), "deque": collections.deque([1]),
           "function": print, "partial": functools.partial(int, base=2)}[payload]
    path = tmp_path / f"{payload}.pt"
    torch.save({"w": torch.ones(2), "x": obj}, path)
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(path, weights_only=True)  # never executes anything
    refused = re.findall(r"GLOBAL ([\w.]+)", str(e.value))
    assert refused
    res = scan_path(path)
    assert res["verdict"] == "unsafe"
    assert any(refused[0].split(".")[-1] in r for r in res["reasons"]), (refused, res["reasons"])
    code, out = _run(path)
    assert code == 1 and "UNSAFE" in out
    assert not canary.exists()


def test_legacy_torch_file_with_payload(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "x": Canary(canary)}, path, _use_new_zipfile_serialization=False)
    res = scan_path(path)
    f = res["files"][0]
    assert f["format"] == "torch-legacy" and res["verdict"] == "unsafe"
    assert [p["name"] for p in f["pickles"]] == ["magic number", "protocol version", "sys_info", "main",
                                                  "storage keys"]
    assert any("posix.system" in r and "main" in r for r in res["reasons"])
    assert not canary.exists()


def test_nested_pickle_is_scanned_too(tmp_path):
    inner = pickle.dumps(Canary(tmp_path / "c"), protocol=2)

    class Outer:
        def __reduce__(self):
            return (pickle.loads, (inner,))

    path = _write(tmp_path / "nested.pkl", pickle.dumps(Outer(), protocol=4))
    res = scan_path(path)
    (p,) = res["files"][0]["pickles"]
    assert "_pickle.loads" in p["globals"]
    (nested,) = p["nested"]
    assert "posix.system" in nested["globals"]
    assert any(r.endswith("nested pickle: global posix.system is not an allowed data type "
                          "(loading would import it and may call it)") for r in res["reasons"])


def test_opcode_classes_reported(tmp_path):
    touch = hostile.ustr("true")
    cases = {
        "inst": (b"(S'true'\nios\nsystem\n.", ["INST instantiates os.system"], "INST"),
        "obj": (hostile.pickle_of(b"(" + hostile.glob("os", "system") + touch + b"o"), ["OBJ instantiates os.system"],
                "OBJ"),
        "newobj": (hostile.pickle_of(hostile.glob("argparse", "Namespace") + b")\x81" + b"}b"), [], "NEWOBJ"),
        "build_tuple": (hostile.pickle_of(b")}b"), ["BUILD sets the state of tuple"], "BUILD"),
        "ext": (hostile.pickle_of(b"\x82\x05" + b")R"), ["extension code 5"], None),
        "buffer": (pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=lambda b: False),
                   ["out-of-band buffer"], None),
        "hidden_stack_global": (b"\x80\x04K\x01K\x02\x93.", ["not plain strings"], None),
        "reduce_computed": (hostile.pickle_of(hostile.call(hostile.call(hostile.glob("collections", "OrderedDict")))),
                            ["REDUCE calls the result of collections.OrderedDict"], "REDUCE"),
        "slot_state": (hostile.pickle_of(hostile.odict() + b"N}" + hostile.ustr("x") + b"Ns\x86b"),
                       ["slot state"], "BUILD"),
    }
    for name, (data, reasons, op) in cases.items():
        res = scan_path(_write(tmp_path / f"{name}.pkl", data))
        p = res["files"][0]["pickles"][0]
        for r in reasons:
            assert any(r in x for x in res["reasons"]), (name, res["reasons"])
        assert res["safe"] == (not reasons), name
        if op:
            assert op in p["calls"], (name, p["calls"])
    ns = scan_path(str(tmp_path / "newobj.pkl"))
    assert ns["files"][0]["pickles"][0]["calls"] == {"NEWOBJ": {"argparse.Namespace": 1},
                                                    "BUILD": {"argparse.Namespace": 1}}


def test_memo_overwrite_cannot_hide_a_global(tmp_path):
    (name, data, _, _), = [p for p in hostile.payloads(str(tmp_path / "c")) if p[0] == "memo_put_overwrite"]
    res = scan_path(_write(tmp_path / "m.pkl", data))
    assert res["verdict"] == "unsafe" and any("os.system" in r for r in res["reasons"])
    assert "collections.OrderedDict" not in res["files"][0]["pickles"][0]["globals"]


def test_malformed_pickle_still_reports_what_would_run_first(tmp_path):
    data = hostile.pickle_of(hostile.call(hostile.glob("os", "system"), hostile.ustr("true")))[:-1] + b"\xff\xff"
    res = scan_path(_write(tmp_path / "prefix.pkl", data))
    assert res["verdict"] == "unsafe" and any("os.system" in r for r in res["reasons"])
    assert "not a complete pickle" in res["files"][0]["notes"][0]
    # the same inside a torch archive (torch.load would run it before failing)
    res = scan_path(_write(tmp_path / "prefix.pt", hostile.torch_zip(data)))
    assert res["verdict"] == "unsafe" and "not a complete pickle" in res["files"][0]["notes"][0]
    # a malformed pickle that would call nothing is merely unreadable
    with pytest.raises(FormatError, match="harmless.pt"):
        scan_path(_write(tmp_path / "harmless.pt", hostile.torch_zip(b"\x80\x02]K\x01\xff")))
    # garbage that is no pickle and no known format: unreadable, exit code 2
    garbage = _write(tmp_path / "garbage.bin", b"\xfe\xfd" * 100)
    with pytest.raises(FormatError, match="garbage.bin.*neither a pickle-based file nor a known weight format"):
        scan_path(garbage)
    code, out = _run(garbage)
    assert code == 2 and out.startswith("wconv: error:")


def test_polyglot_gguf_that_is_also_a_pickle(tmp_path):
    # "GGUF" begins with BINFLOAT ('G'): 8 bytes later a pickle can follow that torch.load
    # (which unpickles anything that is not a zip) would run.
    body = b"GGUF\x03\x00\x00\x00\x00" + b"0" + hostile.call(hostile.glob("os", "system"), hostile.ustr("true")) + b"."
    list(pickletools.genops(body))  # a well-formed pickle, as far as the stdlib is concerned
    res = scan_path(_write(tmp_path / "poly.gguf", body))
    assert res["files"][0]["format"] == "gguf" and res["verdict"] == "unsafe"
    assert any("os.system" in r for r in res["reasons"])


def test_torchscript_archive_is_unsafe(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    res = scan_path(path)
    assert res["verdict"] == "unsafe" and any("TorchScript" in r for r in res["reasons"])


def test_directory_scan(tmp_path):
    d = tmp_path / "repo"
    (d / "original").mkdir(parents=True)
    (d / ".git").mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    torch.save({"w": torch.ones(2)}, d / "original" / "consolidated.00.pth")
    (d / "config.json").write_text("{}")
    (d / ".git" / "evil.pt").write_bytes(pickle.dumps(Canary(tmp_path / "c")))  # hidden dirs are skipped
    assert scan_path(d)["verdict"] == "safe"
    assert len(scan_path(d)["files"]) == 2
    (d / "original" / "extra.pkl").write_bytes(pickle.dumps(Canary(tmp_path / "c")))
    res = scan_path(d)
    assert res["verdict"] == "unsafe" and any(r.startswith("original/extra.pkl:") for r in res["reasons"])
    code, out = _run(d)
    assert code == 1
    os.unlink(d / "original" / "extra.pkl")
    (d / "broken.bin").write_bytes(b"\xfe" * 64)
    res = scan_path(d)
    assert res["verdict"] == "unreadable" and not res["safe"] and res["unreadable"] == [str(d / "broken.bin")]
    assert _run(d)[0] == 2
    assert not (tmp_path / "c").exists()


def test_json_output(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Canary(tmp_path / "c")}, path)
    res = CliRunner().invoke(cli, ["scan", "--json", str(path)])
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["scan_version"] == 1 and out["verdict"] == "unsafe" and out["safe"] is False
    (f,) = out["files"]
    (p,) = f["pickles"]
    assert p["name"].endswith("data.pkl") and "posix.system" in p["unknown_globals"]
    assert p["calls"]["REDUCE"]["posix.system"] == 1 and p["persistent_ids"] == 1
    assert format_scan(out).startswith(f"path:    {path}")


def test_json_output_for_unreadable_input(tmp_path):
    # --json prints one object for every input, also when nothing could be scanned (exit 2).
    garbage = _write(tmp_path / "garbage.bin", b"\xfe\xfd" * 100)
    for path in (garbage, str(tmp_path / "missing.pt")):
        res = CliRunner().invoke(cli, ["scan", "--json", path])
        assert res.exit_code == 2
        out = json.loads(res.stdout)
        assert out["verdict"] == "unreadable" and out["safe"] is False and out["unreadable"] == [path]
        assert path in out["error"] and out["files"][0]["error"] == out["error"]
        assert format_scan(out).startswith(f"path:    {path}")


def test_scanner_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_vm.DEFAULT_LIMITS, "max_memo", 1000)
    monkeypatch.setattr(pickle_vm.DEFAULT_LIMITS, "max_marks", 1000)
    for name, data in (("memo", b"\x80\x04N" + b"\x94" * 2000 + b"."), ("marks", b"\x80\x02" + b"(" * 2000 + b".")):
        with pytest.raises(FormatError, match=f"{name}.pkl"):
            scan_path(_write(tmp_path / f"{name}.pkl", data))


def test_many_nested_pickles_stay_bounded(tmp_path):
    inner = hostile.raw_bytes(hostile.pickle_of(hostile.call(hostile.glob("os", "system"), hostile.ustr("true"))))
    body = b"".join(hostile.call(hostile.glob("pickle", "loads"), inner) + b"0" for _ in range(2000)) + b"N"
    res = scan_path(_write(tmp_path / "nested.pkl", hostile.pickle_of(body, proto=4)))
    (p,) = res["files"][0]["pickles"]
    assert len(p["nested"]) == 20 and p["calls"]["REDUCE"]["pickle.loads"] == 2000
    assert len(json.dumps(res)) < 200_000


def test_output_is_bounded_for_many_globals(tmp_path):
    body = b"".join(hostile.glob("m%d" % i, "f") + b"0" for i in range(5000)) + b"N"
    res = scan_path(_write(tmp_path / "many.pkl", hostile.pickle_of(body)))
    assert res["verdict"] == "unsafe" and len(json.dumps(res)) < 100_000


def test_empty_and_missing(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        scan_path(tmp_path / "nope")
    with pytest.raises(FormatError, match="empty"):
        scan_path(_write(tmp_path / "empty.pt", b""))

"""The pickle machine's two policies agree: a pickle scans safe <=> loading it raises no UnsafeFileError.

`wconv scan` (scan policy) and every reader (load policy) run the same interpreter over the
same table of globals; this checks that they give the same answer on inputs built to make
them differ: real pickles (plain data at protocols 0-5, torch.save archives at protocols
2-5 and in the legacy format, the third-party torch files in ../shared/realdata),
the hostile corpus (tests/hostile.py), and hypothesis mutations of all of these (bit
flips, byte writes, opcode swaps, truncations, inserted GLOBAL / STACK_GLOBAL / REDUCE /
BUILD / INST / OBJ / NEWOBJ / NEWOBJ_EX / EXT opcodes).

Checked for every input:
- the pickle itself (a raw pickle, or data.pkl in a torch zip with its storages): the
  scan record has no reasons exactly when loading raises no UnsafeFileError; when loading
  succeeds, the scan decoded the whole pickle and no handler refused anything;
- the legacy stream: its main pickle unsafe => loading refuses it as unsafe; loading
  refuses => some pickle of the stream is unsafe; loading succeeds => every pickle is safe;
- the file, through `wconv scan`'s `scan_path`: loading succeeds => verdict "safe"; loading
  raises UnsafeFileError => verdict not "safe"; for zips, verdict "unsafe" => UnsafeFileError;
- loading raises only WconvError (with and without allow_unknown_globals), scanning never
  raises, and nothing runs (every payload aims at a canary file).

Budget: derandomized, EXAMPLES examples (~15 s); WCONV_FUZZ_EXAMPLES=N for long random runs.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import pickletools
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
from conftest import REALDATA
from wconv.errors import UnsafeFileError, WconvError
from wconv.formats import pickle_vm
from wconv.formats.torch_file import open_torch_file, scan_zip_pickles
from wconv.formats.torch_legacy import LEGACY_PICKLES, scan_stream
from wconv.formats.torch_zip import MappedFile, ZipArchive
from wconv.inspect.scan import scan_path

EXAMPLES = int(os.environ.get("WCONV_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="WCONV_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = tempfile.mkdtemp(prefix="wconv-policies-")
CANARY = os.path.join(WORK, "CANARY")


# --- seeds --------------------------------------------------------------------------------


def _plain_objects():
    od = collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=[1.5, "x", b"\x00\xff"])
    od._metadata = collections.OrderedDict({"": {"version": 1}})
    return [od, {"cfg": argparse.Namespace(lr=0.1, tags=["a"]), "n": np.int64(3), "f": np.float16(0.5)},
            [{1, 2}, frozenset({"a"}), collections.Counter("aab"), collections.defaultdict(list, a=[1])],
            {"s": slice(1, None, 2), "c": complex(1, -2), "t": (1, (2, 3)), "big": 2 ** 70, "ba": bytearray(b"ab")},
            np.asfortranarray(np.arange(24.0).reshape(2, 3, 4))]


def _torch_state():
    g = torch.Generator().manual_seed(0)
    return {"model": collections.OrderedDict(w=torch.randn(3, 2, generator=g), b=torch.zeros(2, dtype=torch.bfloat16),
                                             t=torch.arange(6).reshape(2, 3).T),
            "iter_num": 7, "args": {"lr": 0.5}}


def _zip_parts(data: bytes):
    """(data.pkl, {key: blob}, archive name) of a torch zip archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        (pkl_name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        arch = pkl_name[:-len("/data.pkl")]
        blobs = {n[len(arch) + len("/data/"):]: z.read(n) for n in z.namelist() if n.startswith(f"{arch}/data/")}
        return z.read(pkl_name), blobs, arch


def _legacy_parts(data: bytes):
    """(bytes before the main pickle, main pickle, the rest) of a legacy torch stream."""
    ends = [p.end for p in scan_stream(memoryview(data), len(data), "seed")]
    assert len(ends) == len(LEGACY_PICKLES) and None not in ends
    return data[:ends[2]], data[ends[2]:ends[3]], data[ends[3]:]


def _seeds():
    """{"raw": [pickle], "zip": [(data.pkl, blobs, arch)], "legacy": [(head, main, tail)]}."""
    raw = [pickle.dumps(o, protocol=p) for o in _plain_objects() for p in range(6)]
    zips, legacies = [], []
    for p in range(2, 6):
        buf = io.BytesIO()
        torch.save(_torch_state(), buf, pickle_protocol=p)
        zips.append(_zip_parts(buf.getvalue()))
    buf = io.BytesIO()
    torch.save(_torch_state(), buf, _use_new_zipfile_serialization=False)
    legacies.append(_legacy_parts(buf.getvalue()))
    for pkl, blobs in (hostile.llama2c_ckpt(), hostile.small_tree()):
        zips.append((pkl, blobs, "archive"))
    legacies.append(_legacy_parts(hostile.small_torch_legacy()))
    for path in _real_torch_files():
        data = open(path, "rb").read()
        (zips.append(_zip_parts(data)) if data[:4] == b"PK\x03\x04" else legacies.append(_legacy_parts(data)))
    payloads = [p[1] for p in hostile.payloads(CANARY) if len(p[1]) < 4096]
    raw += payloads
    zips += [(p, {}, "archive") for p in payloads]
    return {"raw": raw, "zip": zips, "legacy": legacies}


def _real_torch_files() -> list:
    d = os.path.join(REALDATA, "torch")
    return sorted(os.path.join(d, n) for n in os.listdir(d)) if os.path.isdir(d) else []


SEEDS = _seeds()


# --- the checks ---------------------------------------------------------------------------


def _load(fn):
    """'ok', 'unsafe' or 'error' (any other WconvError) of loading; nothing else may escape."""
    try:
        fn()
        return "ok"
    except UnsafeFileError as e:
        assert "\n" not in str(e)
        return "unsafe"
    except WconvError as e:
        assert "\n" not in str(e)
        return "error"


def _verdict(path):
    try:
        return scan_path(path)["verdict"]
    except WconvError:
        return "unreadable"


def _agree(pickle_scan, loaded, what):
    assert pickle_scan.safe == (loaded != "unsafe"), (what, loaded, pickle_scan.reasons, pickle_scan.error)
    if loaded == "ok":  # the scan went through the same complete pickle, refusing nothing
        assert pickle_scan.error is None and pickle_scan.failures == 0, (what, pickle_scan.error)


def _write(name, data: bytes) -> str:
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def check_raw(pkl: bytes):
    loaded = _load(lambda: pickle_vm.loads(pkl))
    _load(lambda: pickle_vm.loads(pkl, allow_unknown_globals=True))
    _agree(pickle_vm.scan(pkl), loaded, "raw pickle")
    path = _write("raw.pkl", pkl)
    # wconv reads a non-zip file as a legacy torch stream: its first pickle is the magic number.
    loaded_file = _load(lambda: open_torch_file(path))
    verdict = _verdict(path)
    assert loaded_file != "ok"
    if loaded_file == "unsafe":
        assert verdict != "safe", verdict


def check_zip(pkl: bytes, blobs: dict, arch: str):
    path = _write("model.pt", hostile.torch_zip(pkl, blobs, arch=arch))
    loaded = _load(lambda: open_torch_file(path))
    _load(lambda: open_torch_file(path, allow_unknown_globals=True))
    ((_, data_pkl),) = scan_zip_pickles(ZipArchive(MappedFile(path)), path)
    _agree(data_pkl, loaded, "data.pkl")
    verdict = _verdict(path)
    assert (verdict == "unsafe") == (loaded == "unsafe") or verdict == "unreadable", (loaded, verdict)
    if loaded == "ok":
        assert verdict == "safe"


def check_legacy(head: bytes, main: bytes, tail: bytes):
    data = head + main + tail
    path = _write("legacy.pt", data)
    loaded = _load(lambda: open_torch_file(path))
    _load(lambda: open_torch_file(path, allow_unknown_globals=True))
    pickles = scan_stream(memoryview(data), len(data), path)
    (main_scan,) = [p for p in pickles if p.label == "main"]
    if not main_scan.safe:
        assert loaded == "unsafe", main_scan.reasons
    if loaded == "unsafe":
        assert not all(p.safe for p in pickles)
    if loaded == "ok":
        assert all(p.safe and p.error is None and not p.failures for p in pickles)
    verdict = _verdict(path)
    assert (verdict == "safe") <= (loaded != "unsafe") and (loaded == "ok") <= (verdict == "safe"), (loaded, verdict)


# --- unmutated inputs ---------------------------------------------------------------------


def test_seeds_load_and_scan_safe():
    # The mutations start from pickles both policies accept (the hostile payloads aside).
    payloads = {p[1] for p in hostile.payloads(CANARY)}
    for pkl in SEEDS["raw"]:
        if pkl not in payloads:
            assert pickle_vm.scan(pkl).safe
            pickle_vm.loads(pkl)
        check_raw(pkl)
    for pkl, blobs, arch in SEEDS["zip"]:
        if pkl not in payloads:
            check_zip(pkl, blobs, arch)
            assert _verdict(os.path.join(WORK, "model.pt")) == "safe"
    for parts in SEEDS["legacy"]:
        check_legacy(*parts)
        assert _verdict(os.path.join(WORK, "legacy.pt")) == "safe"
    assert not os.path.exists(CANARY)


@pytest.mark.parametrize("name", [os.path.basename(p) for p in _real_torch_files()] or ["(none)"])
def test_real_torch_pickles_agree(name, realdata):
    path = realdata("torch", name)
    data = open(path, "rb").read()
    if data[:4] == b"PK\x03\x04":
        check_zip(*_zip_parts(data))
    else:
        check_legacy(*_legacy_parts(data))
    assert scan_path(path)["verdict"] == "safe"
    open_torch_file(path)


def test_hostile_pickles_agree(tmp_path):
    """Every code-running or malformed payload of the corpus, raw, in a zip and as a legacy main
    pickle, and every lying tensor record (zip and legacy cases)."""
    head, _, tail = _legacy_parts(hostile.small_torch_legacy())
    n_unsafe = 0
    for name, pkl, _, _ in hostile.payloads(CANARY):
        if name == "memo_flood":  # 4 million opcodes: loaded and scanned in test_hostile.py
            continue
        check_raw(pkl)
        if name not in hostile.SLOW_PAYLOADS:  # 100,000-deep nestings: the same machine run, once is enough
            check_zip(pkl, {}, "archive")
            check_legacy(head, pkl, tail)
        n_unsafe += not pickle_vm.scan(pkl).safe
    assert n_unsafe > 30

    def write(fname, data):
        return _write(fname, data)

    for case in hostile.tensor_cases(write) + hostile.legacy_cases(CANARY, write):
        data = open(case.path, "rb").read()
        if data[:4] == b"PK\x03\x04":
            check_zip(*_zip_parts(data))
        else:
            loaded = _load(lambda: open_torch_file(case.path))
            verdict = _verdict(case.path)
            assert (loaded == "ok") <= (verdict == "safe") and (loaded == "unsafe") <= (verdict != "safe"), case.name
    assert not os.path.exists(CANARY)


# --- mutations ----------------------------------------------------------------------------


def _glob(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _sglob(module, name):
    return hostile.ustr(module) + hostile.ustr(name) + b"\x93"


_NAMES = [("os", "system"), ("builtins", "list"), ("collections", "OrderedDict"), ("argparse", "Namespace"),
          ("torch._utils", "_rebuild_tensor_v2"), ("copyreg", "_reconstructor"), ("numpy", "dtype"),
          ("__builtin__", "eval"), ("pickle", "loads"), ("builtins", "set"), ("torch", "FloatStorage")]
INSERTS = ([_glob(m, n) for m, n in _NAMES] + [_sglob(m, n) for m, n in _NAMES[:4]]
           + [b"i" + f"{m}\n{n}\n".encode() for m, n in _NAMES[:3]]
           + [b"R", b"b", b"o", b"\x81", b"\x92", b"\x82\x05", b"\x83\x34\x12", b"\x84\x01\x00\x00\x00", b"(", b")",
              b"}", b"]", b"N", b"\x85", b"0", b"2", b"t", b"s", b"a", b"u", b"e", b".", b"h\x00", b"q\x00", b"\x94",
              b"Q", hostile.ustr("__class__"), hostile.ustr("x") + b"\x93", hostile.raw_bytes(b"\x80\x02N.")])
OPCODES = [bytes([c]) for c in pickle_vm.OPNAMES]


def _boundaries(data: bytes) -> list:
    try:
        return [pos for _, _, pos in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 - mutated or hostile seeds: any position will do
        return list(range(len(data)))


def mutate(draw, seed: bytes) -> bytes:
    buf = bytearray(seed)
    cuts = _boundaries(seed) or [0]
    for _ in range(draw(st.integers(1, 4), label="n_mutations")):
        op = draw(st.sampled_from(["flip", "byte", "swap", "insert", "insert", "truncate"]))
        if not buf:
            break
        at = min(draw(st.sampled_from(cuts)), len(buf) - 1) if op in ("swap", "insert") else draw(
            st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[at] = draw(st.integers(0, 255))
        elif op == "swap":  # another opcode in place of this one (its argument bytes stay)
            buf[at:at + 1] = draw(st.sampled_from(OPCODES))
        elif op == "insert":
            buf[at:at] = draw(st.sampled_from(INSERTS))
        else:
            del buf[at:]
    return bytes(buf)


@FUZZ
@given(data=st.data())
def test_mutated_pickles_agree(data):
    kind = data.draw(st.sampled_from(["raw", "raw", "zip", "legacy"]))
    seed = data.draw(st.sampled_from(SEEDS[kind]))
    if kind == "raw":
        check_raw(mutate(data.draw, seed))
    elif kind == "zip":
        pkl, blobs, arch = seed
        check_zip(mutate(data.draw, pkl), blobs, arch)
    else:
        head, main, tail = seed
        check_legacy(head, mutate(data.draw, main), tail)
    assert not os.path.exists(CANARY)

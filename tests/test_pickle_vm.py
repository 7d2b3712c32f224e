"""The pickle machine under its load policy: same data as pickle.loads, refusals, resource limits.

(The scan policy and its agreement with loading: tests/test_pickle_policies.py.)"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import pickletools
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wconv.errors import FormatError, UnsafeFileError, UnsupportedError, WconvError
from wconv.formats import pickle_vm as pv

PROTOCOLS = range(0, 6)

DATA = [0, 1, -1, 255, 256, 65535, 65536, -2 ** 31, 2 ** 31, 2 ** 63, -(2 ** 200), 0.5, -1e300,
        float("inf"), "", "héllo ✓", "x" * 300, b"", b"\x00\xff" * 200, bytearray(b"ab"), None, True,
        False, (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], [1, [2, [3]]], {}, {"a": 1, 3: [4], (1, "x"): None},
        {1, 2, "x"}, frozenset({3, (4, 5)}), collections.OrderedDict(b=1, a=2), collections.Counter("aab"),
        complex(1, -2), slice(1, None, 2), list(range(2500)), {i: str(i) for i in range(1500)}]


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_same_as_pickle(protocol):
    for obj in DATA:
        data = pickle.dumps(obj, protocol=protocol)
        assert _same(pv.loads(data), pickle.loads(data)), (protocol, repr(obj)[:60])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_references_preserved(protocol):
    shared = [1, 2]
    got = pv.loads(pickle.dumps({"a": shared, "b": shared, "c": (shared,)}, protocol=protocol))
    assert got["a"] is got["b"] is got["c"][0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_values_same_as_pickle(protocol):
    arrays = [(np.arange(12) % 3).astype(dt).reshape(3, 4) for dt in ("<f4", ">f8", "<i2", ">u4", "u1", "?", "<c8")]
    arrays += [np.asfortranarray(np.arange(24.0).reshape(2, 3, 4)), np.zeros((0, 3)), np.array(2.5, dtype=np.float32)]
    scalars = [np.float64(1.25), np.float32(-3.5), np.int64(-7), np.uint8(200), np.bool_(True),
               np.complex128(1 - 2j), np.float16(0.5)]
    for obj in arrays:
        data = pickle.dumps(obj, protocol=protocol)
        got, want = pv.loads(data), pickle.loads(data)
        assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, want)
    for obj in scalars:
        data = pickle.dumps(obj, protocol=protocol)
        got = pv.loads(data)
        assert got == pickle.loads(data).item() and type(got) is type(obj.item())


def test_numpy_object_arrays_refused():
    with pytest.raises(UnsupportedError, match="numpy dtype 'O"):
        pv.loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))


def test_argparse_namespace_becomes_dict():
    for protocol in PROTOCOLS:
        got = pv.loads(pickle.dumps(argparse.Namespace(lr=0.1, tags=["a"]), protocol=protocol))
        assert isinstance(got, pv.Namespace) and got == {"lr": 0.1, "tags": ["a"]}


def test_ordered_dict_metadata_attribute():
    od = collections.OrderedDict(w=1)
    od._metadata = collections.OrderedDict({"": {"version": 1}})
    for protocol in PROTOCOLS:
        got = pv.loads(pickle.dumps(od, protocol=protocol))
        assert got == od and got._metadata == od._metadata


def test_defaultdict_is_plain_dict():
    got = pv.loads(pickle.dumps(collections.defaultdict(list, {"a": [1]}), protocol=2))
    assert got == {"a": [1]} and type(got) is dict


# --- refusals ---------------------------------------------------------------------------------

DANGEROUS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
             ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"),
             ("builtins", "compile"), ("__builtin__", "eval"), ("subprocess", "Popen"),
             ("subprocess", "check_output"), ("torch", "load"), ("torch.serialization", "load"),
             ("pickle", "loads"), ("numpy", "load"), ("runpy", "_run_code"), ("webbrowser", "open"),
             ("shutil", "rmtree"), ("torch._utils", "_rebuild_tensor_v9"), ("numpy.testing._private.utils", "runstring"),
             ("collections", "namedtuple"), ("copyreg", "__newobj__"), ("functools", "partial")]


def _global_proto0(module, name, arg="echo hi"):
    return f"c{module}\n{name}\n(S'{arg}'\ntR.".encode()


def _global_proto4(module, name, arg="echo hi"):
    def s(x):
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b

    return b"\x80\x04" + s(module) + b"\x94" + s(name) + b"\x94\x93" + s(arg) + b"\x85R."


@pytest.mark.parametrize("module,name", DANGEROUS)
def test_dangerous_globals_refused(module, name):
    for make in (_global_proto0, _global_proto4):
        data = make(module, name)
        with pytest.raises(UnsafeFileError) as e:
            pv.loads(data, path="evil.pkl")
        msg = str(e.value)
        # Python 2 module names are mapped (as pickle does) only for protocols < 3
        shown = "builtins" if module == "__builtin__" and make is _global_proto0 else module
        assert msg.startswith("evil.pkl:") and f"'{shown}.{name}'" in msg and "\n" not in msg
        got = pv.loads(data, allow_unknown_globals=True)
        assert isinstance(got, pv.UnknownObject) and got.args == ("echo hi",)
        assert str(got.cls) == f"{shown}.{name}"


def test_nothing_runs_even_with_placeholders(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {canary}",))

    for protocol in PROTOCOLS:
        data = pickle.dumps({"x": Evil(), "y": [Evil()]}, protocol=protocol)
        with pytest.raises(UnsafeFileError):
            pv.loads(data)
        tree = pv.loads(data, allow_unknown_globals=True)
        assert isinstance(tree["x"], pv.UnknownObject)
    assert not canary.exists()
    pickle.loads(data)
    assert canary.exists()  # the payload was real


class Custom(dict):
    """A class outside the allowlist (module-level so pickle can name it)."""


def test_placeholder_records_build_and_items():
    obj = Custom(a=1)
    obj.attr = [1, 2]
    tree = pv.loads(pickle.dumps(obj, protocol=2), allow_unknown_globals=True)
    assert isinstance(tree, pv.UnknownObject)
    assert tree.dict_items == [("a", 1)] and tree.state == {"attr": [1, 2]}


@pytest.mark.parametrize("data,match", [
    (b"(ios\nsystem\nS'echo'\n.", "os.system"),  # INST
    (b"(cos\nsystem\nS'echo'\no.", "os.system"),  # OBJ (global refused first)
    (b"\x80\x02(ccollections\nOrderedDict\no.", "INST/OBJ"),  # OBJ with an allowed class
    (b"\x80\x02\x82\x01.", "extension"),  # EXT1
    (b"\x80\x02\x83\x01\x00.", "extension"),
    (b"\x80\x02\x84\x01\x00\x00\x00.", "extension"),
    (b"\x80\x05\x97.", "out-of-band"),
    (b"\x80\x05C\x01a\x98.", "out-of-band"),
    (b"\x80\x02}N\x85b.", "BUILD"),  # BUILD on a dict
    (b"\x80\x02]]b.", "BUILD"),  # BUILD on a list
    (b"\x80\x02c_codecs\nencode\nN\x85b.", "BUILD"),  # BUILD on a global token
    (b"\x80\x02X\x01\x00\x00\x00a)R.", "cannot call"),  # REDUCE on a string
    (b"\x80\x02c_codecs\nencode\n)\x81.", "NEWOBJ"),  # NEWOBJ on a function
    (b"\x80\x02cbuiltins\nobject\n)R.", "cannot be called"),  # inert token
    (b"\x80\x02X\x01\x00\x00\x00aQ.", "persistent id"),
    (b"Pfoo\n.", "persistent id"),
])
def test_refused_opcodes(data, match):
    with pytest.raises(WconvError, match=match):
        pv.loads(data, path="x.pkl")


def test_codecs_encode_only_latin1():
    ok = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xbfX\x06\x00\x00\x00latin1\x86R."
    assert pv.loads(ok) == b"\xff"
    bad = ok.replace(b"X\x06\x00\x00\x00latin1", b"X\x05\x00\x00\x00rot13")
    with pytest.raises(FormatError, match="_codecs.encode"):
        pv.loads(bad)


# --- malformed input and resource limits ------------------------------------------------------


def _assert_quick_format_error(data, match=None, limits=None, seconds=30.0):
    # A guard against hangs and exponential work, not a speed measurement: the bound is far above
    # the ~0.3 s these take on an idle machine, so a loaded CI machine does not fail it.
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match=match):
        pv.loads(data, path="x.pkl", limits=limits)
    assert time.perf_counter() - t0 < seconds


def test_deep_tuple_nesting():
    _assert_quick_format_error(b"\x80\x02N" + b"\x85" * 300_000 + b".", "nested")


def test_deep_list_nesting_built_by_mutation():
    # Lists created empty and appended into each other afterwards: heights are only known at the end.
    n = 100_000
    data = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    _assert_quick_format_error(data, "nested")


def test_cycle_refused():
    _assert_quick_format_error(b"\x80\x02]q\x00h\x00a.", "cycle")
    _assert_quick_format_error(b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.", "cycle")


def test_sharing_bomb_refused():
    # x0 = []; x1 = [x0, x0]; ... x60 = [x59, x59]: 60 lists, 2**60 nodes as a tree.
    data = b"\x80\x02]q\x000"
    for i in range(1, 61):
        data += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]) + b"0"
    data += b"h" + bytes([60]) + b"."
    _assert_quick_format_error(data, "enormous tree")
    # ordinary sharing (the same object in a few places) is fine
    shared = {"w": [1, 2, 3]}
    got = pv.loads(pickle.dumps({"a": shared, "b": [shared] * 100}, protocol=2))
    assert got["b"][99] is got["a"]


def test_oversized_lengths_do_not_allocate():
    _assert_quick_format_error(b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x00" * 10 + b".", "LONG4")
    _assert_quick_format_error(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"abc.", "past the end")
    _assert_quick_format_error(b"\x80\x04\x8d" + struct.pack("<Q", 1 << 62) + b".", "past the end")
    _assert_quick_format_error(b"\x80\x02T\xff\xff\xff\xff.", "negative")
    _assert_quick_format_error(b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.", "FRAME")
    _assert_quick_format_error(b"I" + b"9" * 10_000 + b"\n.", "too long")


def test_memo_ops_and_stack_limits():
    small = pv.Limits(max_memo=100, max_ops=10_000, max_stack=1000, max_marks=50)
    _assert_quick_format_error(b"\x80\x04N" + b"\x94" * 200 + b".", "memo", small)
    _assert_quick_format_error(b"\x80\x02" + b"N" * 2000 + b".", "stack", small)
    _assert_quick_format_error(b"\x80\x02" + b"(" * 100 + b".", "MARK", small)
    _assert_quick_format_error(b"\x80\x02N" + b"0N" * 6000 + b".", "opcodes", small)
    _assert_quick_format_error(b"\x80\x02r\xff\xff\xff\xff" + b".", "underflow")


def test_work_amplification_bounded():
    # A 100k-item list stored once, then set() of it requested 100k times: quadratic unless bounded.
    body = b"\x80\x02]q\x00(" + b"K\x01" * 100_000 + b"e0"
    body += b"cbuiltins\nset\nq\x01" + b"h\x01h\x00\x85R0" * 100_000 + b"N."
    _assert_quick_format_error(body, "more work", seconds=5)
    # Same with bytes: one 1 MB string encoded over and over.
    body = b"\x80\x02X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20) + b"q\x00"
    body += b"c_codecs\nencode\nq\x01" + b"h\x01h\x00X\x06\x00\x00\x00latin1\x86R0" * 10_000 + b"N."
    _assert_quick_format_error(body, "more work", seconds=5)


def test_dict_keys_restricted():
    for key in (2 ** 61, -(2 ** 64), (1, 2 ** 62)):
        data = pickle.dumps({key: 1}, protocol=2)
        _assert_quick_format_error(data, "range")
    _assert_quick_format_error(pickle.dumps({tuple(range(5000)): 1}, protocol=2), "too large")
    _assert_quick_format_error(b"\x80\x02}]Ns.", "list")
    # hash-colliding integer keys (all congruent modulo 2**61 - 1) are among those refused
    p = (1 << 61) - 1
    _assert_quick_format_error(pickle.dumps({k * p: 0 for k in range(2, 50)}, protocol=2), "range")


def test_set_elements_restricted():
    _assert_quick_format_error(pickle.dumps({2 ** 70}, protocol=4), "range")
    _assert_quick_format_error(pickle.dumps(frozenset({2 ** 70}), protocol=4), "range")
    _assert_quick_format_error(pickle.dumps({2 ** 70}, protocol=2), "range")  # via builtins.set


def _sample_pickles():
    od = collections.OrderedDict(a=np.arange(3), b=[1.5, "x", b"\x00"])
    od._metadata = {"": {"version": 2}}
    objs = [od, {"cfg": argparse.Namespace(lr=0.1)}, [np.float64(2.0), {1: (2, 3)}, {4, 5}]]
    return [pickle.dumps(o, protocol=p) for o in objs for p in PROTOCOLS]


def test_every_truncation_is_a_format_error():
    for data in _sample_pickles():
        for cut in range(len(data)):
            with pytest.raises(FormatError):
                pv.loads(data[:cut], path="t.pkl")


def test_unknown_opcode_and_trailing_garbage():
    with pytest.raises(FormatError, match="unknown opcode 0xff"):
        pv.loads(b"\x80\x02\xff.")
    with pytest.raises(FormatError, match="unsupported pickle protocol"):
        pv.loads(b"\x80\x09N.")
    with pytest.raises(FormatError, match="unbalanced"):
        pv.loads(b"\x80\x02NN.")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutations_only_raise_wconv_errors(data):
    base = data.draw(st.sampled_from(_sample_pickles()))
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    allow = data.draw(st.booleans())
    try:
        pv.loads(bytes(buf), allow_unknown_globals=allow)
    except WconvError:
        pass


# --- decoding without executing ---------------------------------------------------------------


def test_iter_opcodes_agrees_with_pickletools():
    for data in _sample_pickles():
        ours = [(op.pos, op.name) for op in pv.iter_opcodes(data)]
        theirs = [(pos, op.name) for op, _, pos in pickletools.genops(io.BytesIO(data))]
        assert ours == theirs
        ours = [(op.name, op.arg) for op in pv.iter_opcodes(data)]
        want = [arg for _, arg, _ in pickletools.genops(io.BytesIO(data))]
        assert len(ours) == len(want)
        for (name, a), b in zip(ours, want):
            if name in ("GLOBAL", "INST"):  # ours: (module, name); pickletools joins them with a space
                assert type(a) is tuple and len(a) == 2
                a = " ".join(a)
            # Every argument decoded, and decoded alike (None only where pickletools has none).
            assert type(a) is type(b) and a == b, (name, a, b)


def test_scan_lists_globals_without_running(tmp_path):
    canary = tmp_path / "c"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {canary}",))

    for protocol in PROTOCOLS:
        data = pickle.dumps([collections.OrderedDict(), Evil(), Evil(), np.float32(1)], protocol=protocol)
        found = pv.scan(data).globals
        assert ("collections", "OrderedDict") in found
        assert ("posix", "system") in found or ("os", "system") in found
        assert any(m.startswith("numpy") and n == "scalar" for m, n in found)
        res = pv.scan(data)
        assert res.end == len(data) and res.protocol == (protocol if protocol >= 2 else 0)
        assert res.opcodes["STOP"] == 1
    assert not canary.exists()


def test_scan_unresolvable_stack_global():
    data = b"\x80\x04K\x01K\x02\x93."  # STACK_GLOBAL with integer operands
    assert pv.scan(data).globals == [("?", "?")]
    with pytest.raises(UnsafeFileError, match="not strings"):  # the global it names is hidden
        pv.loads(data)


def test_scan_reports_position_of_bad_opcode():
    with pytest.raises(FormatError, match="byte 2"):
        list(pv.iter_opcodes(b"\x80\x02\xfe."))


# --- module structure -------------------------------------------------------------------------

PICKLE_MODULES = ["formats.pickle_records", "formats.pickle_opcodes", "formats.pickle_globals", "formats.pickle_vm",
                  "formats.torch_tensors", "formats.torch_zip", "formats.torch_legacy", "formats.torch_file",
                  "inspect.scan"]


def _wconv_imports(module: str) -> set:
    """wconv modules `module` imports anywhere in its source (function-level imports too)."""
    import ast
    import os

    import wconv

    root = os.path.dirname(wconv.__file__)
    tree = ast.parse(open(os.path.join(root, *module.split(".")) + ".py").read())
    package = module.rsplit(".", 1)[0].split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            names = [".".join(base)] if node.module else [".".join(base + [a.name]) for a in node.names]
            out.update(n for n in names if n)
    return out


def test_pickle_modules_import_each_other_in_one_direction():
    # One machine, one table, torch handlers beside it: no module of this group imports back.
    graph = {m: _wconv_imports(m) & set(PICKLE_MODULES) for m in PICKLE_MODULES}
    order = []
    while graph:
        leaves = [m for m, deps in graph.items() if deps <= set(order)]
        assert leaves, f"import cycle among {sorted(graph)}"
        order += sorted(leaves)
        for m in leaves:
            del graph[m]
    assert order.index("formats.pickle_vm") < order.index("formats.torch_legacy") < order.index("formats.torch_file")

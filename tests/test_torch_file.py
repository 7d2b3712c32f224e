"""wconv's torch-free reader against torch.load on the same files (written by torch.save)."""
from __future__ import annotations

import argparse
import collections
import glob
import os
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchfiles
from conftest import REALDATA, realdata_path
from wconv import dtypes
from wconv.errors import FormatError, UnsafeFileError, UnsupportedError, WconvError
from wconv.formats import torch_file, torch_zip
from wconv.formats.pickle_vm import Marker, Namespace, UnknownObject
from wconv.formats.torch_file import load_pickled, open_torch_file, walk_tensors
from wconv.tensor import LazyTensor

NEW_ZIP = dict()
LEGACY = dict(_use_new_zipfile_serialization=False)
FORMATS = pytest.mark.parametrize("fmt", [NEW_ZIP, LEGACY], ids=["zip", "legacy"])


def _roundtrip(obj, tmp_path, *, weights_only=True, **kw):
    path = torchfiles.save(obj, tmp_path / "t.pt", **kw)
    ours = load_pickled(path)
    ref = torch.load(path, weights_only=weights_only)
    n = torchfiles.assert_same_tensors(ours, ref)
    return ours, ref, n


def _values(dtype, shape=(3, 5)):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g) * 3
        if x.numel() >= 4:
            x.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
        return x.to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2 ** 62)), min(info.max, 2 ** 62)
    x = torch.randint(lo, hi, shape, generator=g, dtype=torch.int64)
    return x.to(dtype)


PLAIN = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
         torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
V3 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
UNSIGNED = [torch.uint16, torch.uint32, torch.uint64]


@FORMATS
@pytest.mark.parametrize("dtype", PLAIN + V3, ids=str)
def test_dtypes_match_torch(dtype, fmt, tmp_path):
    obj = {"t": _values(dtype), "s": _values(dtype, ())}
    if fmt is LEGACY and dtype in V3:
        return _legacy_v3(obj, tmp_path)
    ours, _, n = _roundtrip(obj, tmp_path, **fmt)
    assert n == 2
    assert ours["t"].dtype is torch_file.TORCH_DTYPES[str(dtype)[len("torch."):]]


def _legacy_v3(obj, tmp_path):
    # torch 2.13 writes these dtypes to legacy files but its own loader fails on them
    # ("UntypedStorage has no attribute dtype"), so compare with the tensors that were saved.
    path = torchfiles.save(obj, tmp_path / "v3.pt", **LEGACY)
    with pytest.raises(AttributeError):
        torch.load(path, weights_only=True)
    torchfiles.assert_same_tensors(load_pickled(path), obj)


@FORMATS
@pytest.mark.parametrize("dtype", UNSIGNED, ids=str)
def test_wide_unsigned_match_torch(dtype, fmt, tmp_path):
    # torch has no random/arange kernels for these; build from int64 (values < 2**15 are exact).
    t = torch.tensor([[0, 1, 7], [300, 2 ** 15 - 1, 42]]).to(dtype)
    obj = {"t": t, "tv": t[:, 1:]}
    if fmt is LEGACY:
        return _legacy_v3(obj, tmp_path)
    _roundtrip(obj, tmp_path, **fmt)


@pytest.mark.parametrize("dtype,name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_float8_values_via_dtypes_table(dtype, name, tmp_path):
    x = torch.linspace(-400, 400, 97).to(dtype)
    path = torchfiles.save({"x": x}, tmp_path / "f8.pt")
    lt = load_pickled(path)["x"]
    assert lt.dtype.name == name
    np.testing.assert_array_equal(dtypes.f8_to_f32(lt.raw(), name), x.float().numpy())
    np.testing.assert_array_equal(lt.float32(), x.float().numpy())


def test_bf16_widens_like_torch(tmp_path):
    x = torch.randn(64, 3).to(torch.bfloat16)
    lt = load_pickled(torchfiles.save({"x": x}, tmp_path / "b.pt"))["x"]
    assert lt.dtype is dtypes.BF16 and lt.raw().dtype == np.uint16
    np.testing.assert_array_equal(lt.float32(), x.float().numpy())


@FORMATS
def test_views_match_torch(fmt, tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {
        "base": base,
        "offset": base[2:],  # storage offset
        "transposed": base.T,
        "strided": base[1:5:2, ::3],  # non-contiguous slice
        "column": base[:, 7],
        "scalar": base[3, 4],  # 0-dim view with an offset
        "zero_dim": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "empty_view": base[6:],  # empty, offset at the end of the storage
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # zero stride
        "fortran": torch.from_numpy(np.asfortranarray(np.arange(24).reshape(2, 3, 4))),
        "permuted": torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
    }
    ours, _, n = _roundtrip(obj, tmp_path, **fmt)
    assert n == len(obj)
    assert ours["transposed"].shape == (10, 6)
    assert ours["expanded"].raw().strides[-1] == 4  # materialised C-contiguous copy
    # views of one storage report the same storage key (tied-weight detection)
    keys = {name: ours[name].storage_key for name in ("base", "offset", "transposed", "strided", "scalar")}
    assert len(set(keys.values())) == 1
    assert ours["zero_dim"].storage_key != keys["base"]


def test_contiguous_tensors_are_zero_copy_views(tmp_path):
    path = torchfiles.save({"w": torch.randn(16, 8), "tail": torch.randn(10)[4:]}, tmp_path / "z.pt")
    ours = load_pickled(path)
    for name in ("w", "tail"):
        arr = ours[name].raw()
        assert not arr.flags.owndata and not arr.flags.writeable  # a view of the file mapping
        assert arr.flags.c_contiguous


def test_tied_weights_same_storage(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4)
            self.head = torch.nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight

    ours, _, _ = _roundtrip(Tiny().state_dict(), tmp_path)
    assert ours["emb.weight"].storage_key == ours["head.weight"].storage_key
    assert ours["emb.weight"].storage_key[0] == str(tmp_path / "t.pt")


@FORMATS
@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_pickle_protocols(protocol, fmt, tmp_path):
    obj = {"w": torch.randn(3, 4), "b": b"\x00\xffbytes", "cfg": {"lr": 1e-3, "layers": [1, 2]},
           "n": 2 ** 40, "flag": True, "none": None, "pair": (1, "a")}
    # torch's weights_only unpickler handles only protocol 2 here: the fixture is ours, so trust it.
    ours, ref, _ = _roundtrip(obj, tmp_path, pickle_protocol=protocol, weights_only=protocol == 2, **fmt)
    torchfiles.assert_same_data(ours, ref)
    assert open_torch_file(tmp_path / "t.pt").pickle_protocol == (protocol if protocol >= 2 else 0)


@FORMATS
def test_state_dict_metadata_kept(fmt, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ours, ref, n = _roundtrip(model.state_dict(), tmp_path, **fmt)
    assert n == 4
    assert isinstance(ours, collections.OrderedDict)
    assert list(ours) == list(ref)
    torchfiles.assert_same_data(ours._metadata, ref._metadata)


@FORMATS
def test_optimizer_state_int_keys(fmt, tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 7, "best_val_loss": 1.25}
    ours, ref, n = _roundtrip(ckpt, tmp_path, **fmt)
    torchfiles.assert_same_data(ours, ref)
    assert set(ours["optimizer"]["state"]) == {0, 1}
    assert "optimizer.state.0.exp_avg" in dict(walk_tensors(ours))


def test_parameters_and_requires_grad(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    ours, ref, _ = _roundtrip({"p": p, "list": [p, torch.ones(1, requires_grad=True)]}, tmp_path)
    assert isinstance(ours["p"], LazyTensor)
    assert ours["list"][0] is ours["p"]  # the same object, pickled once


def test_tensor_with_python_attributes(tmp_path):
    t = torch.randn(4)
    t.note = "hello"  # pickled through torch._tensor._rebuild_from_type_v2
    _roundtrip({"t": t}, tmp_path)


def test_compile_prefix_preserved(tmp_path):
    compiled = torch.compile(torch.nn.Linear(3, 2))  # compilation is lazy: never run here
    ours, _, _ = _roundtrip(compiled.state_dict(), tmp_path)
    assert list(ours) == ["_orig_mod.weight", "_orig_mod.bias"]


@FORMATS
def test_conj_and_neg_bits(fmt, tmp_path):
    c = torch.randn(5, dtype=torch.complex64)
    obj = {"conj": c.conj(), "neg": torch.randn(4)._neg_view(), "both": c.conj()._neg_view()}
    _roundtrip(obj, tmp_path, **fmt)


def test_plain_python_values(tmp_path):
    obj = {"size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
           "dtype": torch.bfloat16, "set": {1, 2}, "complex": 1 + 2j, "neg": -5, "big": -(2 ** 70)}
    path = torchfiles.save(obj, tmp_path / "p.pt")
    ours = load_pickled(path)
    torchfiles.assert_same_data(ours, torchfiles.reference(path))
    assert ours["size"] == (2, 3) and type(ours["size"]) is tuple
    assert ours["device"] == "cuda:1"
    assert ours["dtype"] == Marker("dtype", "torch.bfloat16")


def test_numpy_and_argparse_values(tmp_path):
    args = argparse.Namespace(lr=0.1, name="run", dims=[1, 2])
    obj = {"best_val_loss": np.float64(1.5), "step": np.int64(3), "arr": np.arange(6, dtype=np.float32)
           .reshape(2, 3), "args": args, "w": torch.ones(2)}
    path = torchfiles.save(obj, tmp_path / "np.pt")
    ours = load_pickled(path)
    ref = torch.load(path, weights_only=False)  # our own trusted fixture: torch needs numpy globals
    assert ours["best_val_loss"] == 1.5 and ours["step"] == 3
    np.testing.assert_array_equal(ours["arr"], ref["arr"])
    assert isinstance(ours["args"], Namespace) and ours["args"] == vars(ref["args"])


def test_meta_tensor_has_shape_but_no_data(tmp_path):
    path = torchfiles.save({"m": torch.empty(3, 4, device="meta", dtype=torch.float16)}, tmp_path / "m.pt")
    lt = load_pickled(path)["m"]
    assert lt.shape == (3, 4) and lt.dtype is dtypes.F16
    with pytest.raises(UnsupportedError, match="meta"):
        lt.raw()


@pytest.mark.parametrize("dtype,name", [(torch.float8_e8m0fnu, "torch.float8_e8m0fnu"), (torch.complex32, "C32")])
def test_dtype_without_numpy_form_is_recognised(dtype, name, tmp_path):
    t = torch.zeros(2, 3, dtype=dtype)
    path = torchfiles.save({"x": t}, tmp_path / "x.pt")
    lt = load_pickled(path)["x"]
    assert lt.dtype.name == name and lt.shape == (2, 3) and lt.nbytes == t.nbytes
    with pytest.raises(UnsupportedError, match=name):
        lt.raw()


def test_quantized_tensor_refused_clearly(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    path = torchfiles.save({"q": q}, tmp_path / "q.pt")
    with pytest.raises(UnsupportedError, match="quantized"):
        load_pickled(path)


# --- container variants ---------------------------------------------------------------------


BIG_ENDIAN_CASES = {
    2: lambda: {"h": torch.randn(5, 3).half(), "b": torch.randn(4).bfloat16(), "s": torch.arange(6, dtype=torch.int16)},
    4: lambda: {"a": torch.randn(4, 5), "b": torch.arange(7, dtype=torch.int32), "t": torch.randn(3, 2).T},
    8: lambda: {"d": torch.randn(3, 3, dtype=torch.float64)[:, 1:], "l": torch.arange(-3, 3)},
}


@pytest.mark.parametrize("itemsize", sorted(BIG_ENDIAN_CASES))
def test_big_endian_archive(itemsize, tmp_path):
    obj = BIG_ENDIAN_CASES[itemsize]()
    le = torchfiles.save(obj, tmp_path / "le.pt")
    be = torchfiles.make_big_endian(le, tmp_path / "be.pt", itemsize)
    tf = open_torch_file(be)
    assert tf.byteorder == "big"
    torchfiles.assert_same_tensors(tf.root, torchfiles.reference(be))  # torch byteswaps big-endian archives
    torchfiles.assert_same_tensors(tf.root, obj)


def test_missing_byteorder_means_little(tmp_path):
    src = torchfiles.save({"a": torch.randn(3)}, tmp_path / "a.pt")
    dst = torchfiles.rewrite_zip(src, tmp_path / "nobo.pt", drop=("/byteorder",))
    tf = open_torch_file(dst)
    assert tf.byteorder == "little"
    torchfiles.assert_same_tensors(tf.root, torchfiles.reference(src))


def test_deflated_archive(tmp_path):
    obj = {"a": torch.zeros(100, 10), "b": torch.randn(5)}
    src = torchfiles.save(obj, tmp_path / "s.pt")
    dst = torchfiles.rewrite_zip(src, tmp_path / "d.pt", compression=zipfile.ZIP_DEFLATED)
    torchfiles.assert_same_tensors(load_pickled(dst), torchfiles.reference(dst))


def test_zip64_archive(tmp_path):
    obj = {"a": torch.randn(6, 3), "b": torch.arange(5)}
    src = torchfiles.save(obj, tmp_path / "s.pt")
    dst = torchfiles.write_zip64(src, tmp_path / "z64.pt")
    torchfiles.assert_same_tensors(load_pickled(dst), obj)


def test_archive_name_is_any_folder(tmp_path):
    src = torchfiles.save({"a": torch.randn(2)}, tmp_path / "whatever.pt")
    renamed = torchfiles.rewrite_zip(src, tmp_path / "r.pt")  # still 'whatever/...' inside
    assert open_torch_file(renamed).archive_name == "whatever"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "archive.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr("archive/" + info.filename.split("/", 1)[1], zin.read(info))
    tf = open_torch_file(tmp_path / "archive.pt")
    assert tf.archive_name == "archive"
    torchfiles.assert_same_tensors(tf.root, torchfiles.reference(tmp_path / "archive.pt"))


def test_torchscript_refused(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsupportedError, match="TorchScript"):
        load_pickled(path)


# --- laziness -------------------------------------------------------------------------------


class _Recorder:
    """Records every byte range the torch readers read or map."""

    def __init__(self, monkeypatch):
        self.ranges = []
        real_read, real_view = torch_zip.MappedFile.read, torch_zip.MappedFile.view
        rec = self

        def read(mf, offset, n, what="data"):
            rec.ranges.append((offset, offset + n))
            return real_read(mf, offset, n, what)

        def view(mf, offset, n, what="data"):
            rec.ranges.append((offset, offset + n))
            return real_view(mf, offset, n, what)

        monkeypatch.setattr(torch_zip.MappedFile, "read", read)
        monkeypatch.setattr(torch_zip.MappedFile, "view", view)

    def touched(self, ranges):
        return [(a, b) for a, b in self.ranges for s, e in ranges if a < e and s < b]


def test_opening_reads_no_tensor_bytes(tmp_path, monkeypatch):
    obj = {f"w{i}": torch.randn(256, 64) for i in range(4)}
    path = torchfiles.save(obj, tmp_path / "lazy.pt")
    blobs = torchfiles.blob_ranges(path)
    assert len(blobs) == 4
    rec = _Recorder(monkeypatch)
    tf = open_torch_file(path)
    assert rec.ranges, "the recorder saw the directory and data.pkl reads"
    assert rec.touched(blobs) == []
    arr = tf.root["w2"].raw()
    touched = rec.touched(blobs)
    assert len(touched) == 1  # exactly the one blob asked for
    np.testing.assert_array_equal(arr, obj["w2"].numpy())


def test_legacy_opening_reads_no_tensor_bytes(tmp_path, monkeypatch):
    obj = {f"w{i}": torch.randn(128, 32) for i in range(3)}
    path = torchfiles.save(obj, tmp_path / "lazy_legacy.pt", **LEGACY)
    size = os.path.getsize(path)
    nbytes = 128 * 32 * 4
    # The legacy stream ends with the storages: [int64 count][data] each, back to back.
    first = size - 3 * (8 + nbytes)
    data_ranges = [(first + i * (8 + nbytes) + 8, first + (i + 1) * (8 + nbytes)) for i in range(3)]
    rec = _Recorder(monkeypatch)
    tf = open_torch_file(path)
    # The pickles are parsed in place from one view of the whole file (the parser stops at
    # each STOP); the only other read is the 4-byte format sniff. Storage offsets come
    # from the declared sizes, so no storage header or data is read.
    assert sorted(rec.ranges) == [(0, 4), (0, size)]
    arr = tf.root["w1"].raw()
    header, data = rec.ranges[-2:]
    assert header == (data[0] - 8, data[0]) and data in data_ranges  # count checked, then mapped
    np.testing.assert_array_equal(arr, obj["w1"].numpy())


def test_legacy_storage_views(tmp_path):
    path = torchfiles.write_legacy_with_storage_view(tmp_path / "view.pt")
    torchfiles.assert_same_tensors(load_pickled(path), torchfiles.reference(path))


def test_legacy_storage_count_mismatch(tmp_path):
    path = torchfiles.save({"a": torch.randn(6)}, tmp_path / "l.pt", **LEGACY)
    data = bytearray(open(path, "rb").read())
    header_at = len(data) - 6 * 4 - 8
    assert int.from_bytes(data[header_at:header_at + 8], "little") == 6
    data[header_at] = 5
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    t = load_pickled(tmp_path / "bad.pt")["a"]  # offsets come from the pickle: opening succeeds
    with pytest.raises(FormatError, match="bad.pt.*holds 5 elements"):
        t.raw()


# --- real third-party files -----------------------------------------------------------------

REAL = sorted(glob.glob(os.path.join(REALDATA, "torch", "*.p*"))) + sorted(
    glob.glob(os.path.join(REALDATA, "torch", "*.bin")))


@pytest.mark.parametrize("path", REAL or ["missing"], ids=os.path.basename)
def test_real_files_match_torch(path):
    if not os.path.exists(path):
        pytest.skip("../shared/realdata is not available")
    tf = open_torch_file(path)
    ref = torch.load(path, weights_only=True)
    n = torchfiles.assert_same_tensors(tf.root, ref)
    torchfiles.assert_same_data(tf.root, ref)
    assert n > 0


def test_real_file_facts():
    path = realdata_path("torch", "candle_fortran_tensor_3d.pth")
    legacy = realdata_path("torch", "picklescan_hf_tiny-random-distilbert_pytorch_model_LEGACY.bin")
    (name, t), = walk_tensors(load_pickled(path))
    assert t.dtype is dtypes.I64 and t.shape == (2, 3, 4)
    assert open_torch_file(legacy).format == "torch-legacy"


# --- malformed and hostile inputs -----------------------------------------------------------


@FORMATS
def test_truncated_files(fmt, tmp_path):
    src = torchfiles.save({"a": torch.randn(50, 4), "b": [1, 2, 3]}, tmp_path / "full.pt", **fmt)
    data = open(src, "rb").read()
    cuts = sorted({1, 2, 10, 30, 64, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 22,
                   len(data) - 1})
    for cut in cuts:
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(WconvError) as e:
            tf = open_torch_file(p)
            for _, t in walk_tensors(tf.root):
                t.raw()
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_empty_and_garbage_files(tmp_path):
    for name, content in (("empty.pt", b""), ("junk.pt", b"hello world, not a checkpoint"),
                          ("zipjunk.pt", b"PK\x03\x04" + b"\x00" * 100)):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(FormatError, match=name):
            load_pickled(p)


def test_missing_blob(tmp_path):
    src = torchfiles.save({"a": torch.randn(3), "b": torch.randn(2)}, tmp_path / "s.pt")
    dst = torchfiles.rewrite_zip(src, tmp_path / "nob.pt", drop=("/data/1",))
    with pytest.raises(FormatError, match="data/1.*missing"):
        load_pickled(dst)


def test_short_blob(tmp_path):
    src = torchfiles.save({"a": torch.randn(8)}, tmp_path / "s.pt")
    dst = torchfiles.rewrite_zip(src, tmp_path / "short.pt",
                               transform=lambda n, d: d[:12] if "/data/" in n else d)
    with pytest.raises(FormatError, match="needs 32"):
        load_pickled(dst)


def test_bad_pickle(tmp_path):
    src = torchfiles.save({"a": torch.randn(3)}, tmp_path / "s.pt")
    for i, junk in enumerate((b"\x80\x02garbage", b"", b"\x80\x02}q\x00(X\x01\x00\x00\x00a")):
        dst = torchfiles.rewrite_zip(src, tmp_path / f"bad{i}.pt",
                                   transform=lambda n, d: junk if n.endswith("data.pkl") else d)
        with pytest.raises(FormatError, match=f"bad{i}.pt"):
            load_pickled(dst)


def test_corrupt_pickle_crc(tmp_path):
    src = torchfiles.save({"a": torch.randn(3)}, tmp_path / "s.pt")
    data = bytearray(open(src, "rb").read())
    i = data.find(b"_rebuild_tensor_v2")
    data[i] ^= 1
    (tmp_path / "crc.pt").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="CRC"):
        load_pickled(tmp_path / "crc.pt")


def test_view_outside_storage_refused(tmp_path):
    src = torchfiles.save({"a": torch.randn(4)}, tmp_path / "s.pt")
    # Claim 400 elements over a 4-element storage: must fail on open, not allocate on raw().
    dst = torchfiles.rewrite_zip(src, tmp_path / "big.pt", transform=lambda n, d: d.replace(
        b"K\x04\x85", b"M\x90\x01\x85") if n.endswith("data.pkl") else d)
    with pytest.raises(FormatError, match="beyond its storage"):
        load_pickled(dst)


def _zip_with_pickle(tmp_path, name, pkl: bytes):
    src = torchfiles.save({"a": torch.randn(3)}, tmp_path / "base.pt")
    return torchfiles.rewrite_zip(src, tmp_path / name, transform=lambda n, d: pkl if n.endswith("data.pkl") else d)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_unknown_global_refused_nothing_runs(protocol, tmp_path):
    canary = tmp_path / "canary"
    path = _zip_with_pickle(tmp_path, "evil.pt", torchfiles.pickle_with_canary(canary, protocol))
    with pytest.raises(UnsafeFileError) as e:
        load_pickled(path)
    msg = str(e.value)
    assert "evil.pt" in msg and "system" in msg and "\n" not in msg
    # placeholders for inspection: still nothing runs
    tree = load_pickled(path, allow_unknown_globals=True)
    assert isinstance(tree["x"], UnknownObject) and str(tree["x"].cls).endswith("system")
    assert tree["weights"] == [1, 2]
    assert not canary.exists()
    assert torch.load(path, weights_only=False) == {"weights": [1, 2], "x": 0} and canary.exists()  # proof


def test_unknown_global_in_legacy_file(tmp_path):
    canary = tmp_path / "canary"
    path = torchfiles.save({"w": torch.ones(2), "x": torchfiles.Canary(canary)}, tmp_path / "evil_legacy.pt", **LEGACY)
    with pytest.raises(UnsafeFileError, match="evil_legacy.pt.*system"):
        load_pickled(path)
    tree = load_pickled(path, allow_unknown_globals=True)
    np.testing.assert_array_equal(tree["w"].raw(), np.ones(2, np.float32))
    assert not canary.exists()


def test_whole_module_pickle_refused(tmp_path):
    path = torchfiles.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeFileError, match="torch.nn.modules.linear"):
        load_pickled(path)
    tree = load_pickled(path, allow_unknown_globals=True)
    assert isinstance(tree, UnknownObject)


def _fuzz_sources():
    import tempfile

    d = tempfile.mkdtemp(prefix="wconv_fuzz_")
    obj = {"w": torch.randn(4, 3), "t": torch.arange(6).reshape(2, 3).T, "h": torch.ones(2, dtype=torch.bfloat16),
           "cfg": {"n": 2, "name": "x"}}
    return [open(torchfiles.save(obj, os.path.join(d, f"{i}.pt"), **fmt), "rb").read()
            for i, fmt in enumerate((NEW_ZIP, LEGACY))]


_FUZZ = []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_files_only_raise_wconv_errors(data, tmp_path_factory):
    if not _FUZZ:
        _FUZZ.extend(_fuzz_sources())
    buf = bytearray(data.draw(st.sampled_from(_FUZZ)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fz") / "m.pt"
    path.write_bytes(bytes(buf))
    try:
        tf = open_torch_file(path, allow_unknown_globals=data.draw(st.booleans()))
        for _, t in walk_tensors(tf.root):
            t.raw()
    except WconvError as e:
        assert str(path) in str(e) and "\n" not in str(e)


def test_scan_torch_file_without_executing(tmp_path):
    canary = tmp_path / "canary"
    zip_path = _zip_with_pickle(tmp_path, "evil.pt", torchfiles.pickle_with_canary(canary, 4))
    legacy = torchfiles.save({"w": torch.ones(2), "x": torchfiles.Canary(canary)}, tmp_path / "evil_l.pt", **LEGACY)
    for path, labels in ((zip_path, ["base/data.pkl"]), (legacy, list(torch_file.LEGACY_PICKLES))):
        found = torch_file.scan_torch_file(path)
        assert [label for label, _ in found] == labels
        globals_ = {g for _, res in found for g in res.globals}
        assert ("posix", "system") in globals_ or ("os", "system") in globals_
    clean = torch_file.scan_torch_file(torchfiles.save({"w": torch.ones(2)}, tmp_path / "ok.pt"))
    assert {f"{m}.{n}" for m, n in clean[0][1].globals} == {
        "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "collections.OrderedDict"}
    assert not canary.exists()

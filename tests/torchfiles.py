"""Helpers for tests of the torch readers: real torch.save files and torch's view of them.

(Not named torchgen.py: torch ships a top-level `torchgen` package that it imports.)

torch is a test dependency only. Every expected value comes from torch itself
(`torch.load(weights_only=True)` of the same file), never from wconv's output.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib

import numpy as np
import torch

# torch dtypes numpy lacks are compared through their bits, as wconv stores them.
_BITS = {torch.bfloat16: (torch.int16, np.uint16), torch.uint16: (torch.int16, np.uint16),
         torch.uint32: (torch.int32, np.uint32), torch.uint64: (torch.int64, np.uint64),
         torch.float8_e4m3fn: (torch.uint8, np.uint8), torch.float8_e5m2: (torch.uint8, np.uint8),
         torch.float8_e4m3fnuz: (torch.uint8, np.uint8), torch.float8_e5m2fnuz: (torch.uint8, np.uint8)}


def torch_raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's values in wconv's raw storage form (bf16 -> uint16 bits, f8 -> uint8 bits)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype in _BITS:
        same_width, np_type = _BITS[t.dtype]
        return t.view(same_width).numpy().view(np_type)
    return t.numpy()


def flatten(obj, prefix: str = "") -> dict:
    """{dotted path: tensor} for a torch.load result, with wconv's path convention."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def assert_same_tensors(ours_root, torch_root) -> int:
    """Every tensor wconv found equals torch's (dtype, shape, bits). Returns how many."""
    from wconv.formats.torch_file import walk_tensors

    ours = dict(walk_tensors(ours_root))
    ref = flatten(torch_root)
    assert set(ours) == set(ref), f"tensor paths differ: {sorted(set(ours) ^ set(ref))[:10]}"
    for name, t in ref.items():
        lt = ours[name]
        assert lt.shape == tuple(t.shape), name
        want = torch_raw(t)
        got = lt.raw()
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.tobytes() == want.tobytes(), name  # bitwise: NaNs and -0.0 included
    return len(ref)


def assert_same_data(ours, ref, where="root"):
    """Non-tensor content equal to torch's, mapping torch types to wconv's plain forms."""
    from wconv.formats.pickle_vm import Marker
    from wconv.tensor import LazyTensor

    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, LazyTensor), where
    elif isinstance(ref, torch.dtype):
        assert isinstance(ours, Marker) and ours.name == str(ref), where
    elif isinstance(ref, torch.device):
        assert ours == str(ref), where
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), where
        for k in ref:
            assert_same_data(ours[k], ref[k], f"{where}.{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) or isinstance(ref, torch.Size), (where, type(ours), type(ref))
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same_data(a, b, f"{where}.{i}")
    elif isinstance(ref, float) and ref != ref:
        assert ours != ours, where
    else:
        assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


def save(obj, path, **kw) -> str:
    torch.save(obj, path, **kw)
    return str(path)


def reference(path):
    return torch.load(path, weights_only=True)


# --- archive surgery (for inputs torch cannot write directly) ------------------------------


def rewrite_zip(src, dst, transform=None, *, compression=zipfile.ZIP_STORED, drop=()):
    """Copy a torch zip member by member; `transform(name, data) -> data` may change members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            if any(info.filename.endswith(d) for d in drop):
                continue
            data = zin.read(info)
            if transform is not None:
                data = transform(info.filename, data)
            zout.writestr(info.filename, data)
    return str(dst)


def make_big_endian(src, dst, itemsize: int):
    """A big-endian torch archive: byteorder record 'big' and every blob byteswapped.

    torch.save cannot be made to write one on a little-endian machine (it records
    sys.byteorder and writes native bytes), but torch.load reads such archives, so the
    result can still be checked against torch. All tensors in `src` must have `itemsize`.
    """
    swap = {2: ("<u2", ">u2"), 4: ("<u4", ">u4"), 8: ("<u8", ">u8")}[itemsize]

    def transform(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, swap[0]).astype(swap[1]).tobytes()
        return data

    return rewrite_zip(src, dst, transform)


def write_zip64(src, dst):
    """Re-pack a zip so every size and offset lives in zip64 extra fields (as >4 GB files do).

    Written by hand from the zip specification: all central-directory sizes/offsets are
    0xFFFFFFFF with a zip64 extra field, and the end record points to a zip64 end record.
    """
    with zipfile.ZipFile(src) as zin:
        members = [(i.filename, zin.read(i)) for i in zin.infolist()]
    out = bytearray()
    central = bytearray()
    for name, data in members:
        raw_name = name.encode()
        crc = zlib.crc32(data)
        offset = len(out)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                           len(raw_name), len(local_extra)) + raw_name + local_extra + data
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(raw_name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF)
        central += raw_name + extra
    cd_offset = len(out)
    out += central
    eocd64 = len(out)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, len(members), len(members),
                       len(central), cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(dst, "wb") as f:
        f.write(out)
    with zipfile.ZipFile(dst) as check:  # the stdlib reader agrees it is a valid zip64 archive
        assert [(i.filename, check.read(i)) for i in check.infolist()] == members
    return str(dst)


def blob_ranges(path) -> list:
    """[(start, end)] byte ranges of every tensor blob's data in a torch zip (stdlib zipfile)."""
    ranges = []
    with open(path, "rb") as f, zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            f.seek(info.header_offset)
            head = f.read(30)
            nlen, elen = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + nlen + elen
            ranges.append((start, start + info.compress_size))
    return ranges


class Canary:
    """A pickle payload that would create a file if anything executed it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os as _os

        return (_os.system, (f"touch {self.path}",))


def pickle_with_canary(canary_path, protocol=2) -> bytes:
    return pickle.dumps({"weights": [1, 2], "x": Canary(canary_path)}, protocol=protocol)


def write_legacy_with_storage_view(path, *, whole: bool = True):
    """A legacy-format file whose tensor uses a storage *view* (written by torch < 0.4 only).

    Assembled by hand from the legacy layout: magic, protocol, sys_info, the object (a
    tensor over elements 4..6 of a 10-element FloatStorage, and unless whole=False a tensor
    over all of it), the key list, the storage.
    """
    from collections import OrderedDict

    class _StorageRef:
        def __init__(self, pid):
            self.pid = pid

    class _Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, OrderedDict())

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _StorageRef) else None

    view = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", 10, ("1", 4, 3)))
    obj = {"view": _Tensor(view, 1, (2,), (1,))}
    if whole:
        obj["whole"] = _Tensor(_StorageRef(("storage", torch.FloatStorage, "0", "cpu", 10, None)), 0, (2, 5), (5, 1))
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(header, buf, protocol=2)
    _Pickler(buf, protocol=2).dump(obj)
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", 10) + np.arange(10, dtype="<f4").tobytes())
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)

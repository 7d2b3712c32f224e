"""The pre-1.6 torch.save stream (`_use_new_zipfile_serialization=False`).

Layout: five pickles back to back - magic number, protocol version (1001), sys_info
dict, the object itself (storages as persistent ids ('storage', type, key, location,
numel, view)), the sorted list of storage keys - then for each key in that order an
int64 element count followed by the raw elements. torch writes both little-endian
whatever the machine. Storage offsets follow from the sizes declared in the pickle, so
opening reads no storage bytes; each count is verified when its storage is first mapped.
"""
from __future__ import annotations

import os
import struct

from ..errors import FormatError, UnsupportedError
from .pickle_vm import scan, unpickle
from .torch_tensors import Storage, storage_pid

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
LEGACY_PICKLES = ("magic number", "protocol version", "sys_info", "main", "storage keys")


def storage_resolver(path):
    """(persistent_load, storages, views) for the main pickle: its persistent ids become
    Storages (root storages by key, torch < 0.4 storage views by view key)."""
    base = os.path.basename(path)
    storages: dict = {}  # root key -> Storage
    views: dict = {}  # view key -> Storage

    def persistent_load(ctx, pid):
        parsed = storage_pid(ctx, pid, legacy=True)
        if parsed is None:  # pickled nn.Module source, tolerated for inspection
            return None
        dt, key, location, numel = parsed
        root = storages.get(key)
        if root is None:
            root = Storage(key, dt, numel * dt.itemsize, location, f"{base}:storage {key}", path)
            storages[key] = root
        view_meta = pid[5]
        if view_meta is None:
            return root
        # Storage views (torch < 0.4): (view key, element offset, element count) of the root.
        if (type(view_meta) is not tuple or len(view_meta) != 3 or type(view_meta[0]) is not str
                or not all(type(v) is int and v >= 0 for v in view_meta[1:])):
            ctx.fail("bad storage view in persistent id")
        vkey, off, size = view_meta
        if vkey in views:
            return views[vkey]
        start, nbytes = off * root.dtype.itemsize, size * root.dtype.itemsize
        if start + nbytes > root.nbytes:
            ctx.fail(f"storage view {vkey} reaches beyond storage {key}")
        st = Storage(vkey, root.dtype, nbytes, location, f"{base}:storage {key}[{off}:{off + size}]", path)
        st.fetch = lambda: root.data()[start:start + nbytes]
        st.base, st.base_offset = root, start
        views[vkey] = st
        return st

    return persistent_load, storages, views


def _small_pickle(mf, view, pos, what, limits):
    vm = unpickle(view, path=mf.path, where=f"{what} pickle", start=pos, limits=limits)
    return vm.value, vm.end_pos


def open_legacy(mf, path, allow_unknown_globals, limits):
    """(machine of the main pickle, {key: Storage}) of a legacy file; storages not yet read."""
    view = mf.view(0, mf.size, "file")  # the pickles are read in place, in order
    try:
        magic, pos = _small_pickle(mf, view, 0, "magic number", limits)
    except FormatError:
        magic, pos = None, 0
    if magic != MAGIC_NUMBER or type(magic) is not int:
        if mf.size > 262 and mf.read(257, 5) == b"ustar":
            raise UnsupportedError(path, "this is a torch < 0.4 tar checkpoint; re-save it with a newer torch")
        raise FormatError(path, "not a torch checkpoint (neither a zip archive nor the legacy magic number)")
    proto, pos = _small_pickle(mf, view, pos, "protocol version", limits)
    if proto != PROTOCOL_VERSION:
        raise UnsupportedError(path, f"legacy torch file with protocol version {proto!r:.20} "
                                     f"(only {PROTOCOL_VERSION} is supported)")
    sys_info, pos = _small_pickle(mf, view, pos, "sys_info", limits)
    if type(sys_info) is not dict:
        raise FormatError(path, "legacy torch file: sys_info is not a dict")

    persistent_load, storages, views = storage_resolver(path)
    vm = unpickle(view, path=path, where="main pickle", start=pos, persistent_load=persistent_load,
                  allow_unknown_globals=allow_unknown_globals, limits=limits)
    keys, pos = _small_pickle(mf, view, vm.end_pos, "storage keys", limits)
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise FormatError(path, "legacy torch file: storage key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise FormatError(path, "legacy torch file lists a storage twice")
    # Storages follow back to back as [int64 count][bytes]; their offsets follow from the
    # sizes the pickle declared, so opening reads none of them. Each count is checked when
    # its storage is first read.
    data_start = pos
    for key in keys:
        st = storages.get(key)
        if st is None:
            raise FormatError(path, f"legacy torch file has data for storage {key} that nothing uses")
        st.fetch, st.locate = _accessors(mf, pos, st)
        st.file_size = mf.size
        pos += 8 + st.nbytes
    mf.check_range(data_start, pos - data_start, "storage data")  # arithmetic only: reads nothing
    missing = [k for k in storages if k not in set(keys)]
    if missing:
        raise FormatError(path, f"legacy torch file has no data for storage {missing[0]}")
    return vm, {**storages, **views}


def scan_stream(view, size, path, *, start=0, labels=LEGACY_PICKLES, limits=None) -> list:
    """The pickles of a legacy stream from `start`, back to back, scanned without running
    anything (the main one with its storage ids resolved as loading does). Stops at the
    end of the data or after a pickle that has no STOP."""
    persistent_load = storage_resolver(path)[0]
    out, pos = [], start
    for label in labels:
        if pos >= size:
            break
        p = scan(view, pos, path=path, label=label, persistent_load=persistent_load if label == "main" else None,
                 limits=limits)
        out.append(p)
        if p.end is None:
            break
        pos = p.end
    return out


def _accessors(mf, header_at: int, st: Storage):
    """(fetch, locate) of a storage: its bytes as a view, or their file offset for a kernel copy;
    either checks the element count stored before the bytes first."""
    checked = []

    def check():
        if not checked:
            (numel,) = struct.unpack("<q", mf.read(header_at, 8, f"header of storage {st.key}"))
            if numel * st.dtype.itemsize != st.nbytes:
                raise FormatError(mf.path, f"storage {st.key} holds {numel} elements in the file but the "
                                           f"pickle declares {st.nbytes // max(st.dtype.itemsize, 1)}")
            checked.append(True)

    def fetch():
        check()
        return mf.view(header_at + 8, st.nbytes, f"data of storage {st.key}")

    def locate():
        check()
        return header_at + 8

    return fetch, locate

"""torch.save files (zip archives and the pre-1.6 legacy stream) read without torch.

`load_pickled(path)` returns the pickled object tree: dicts, lists, numbers, strings as
plain Python data, every tensor as a `LazyTensor` whose bytes stay in the file (memory
mapped) until `raw()` is called. Opening reads the zip directory and `data.pkl` (or the
legacy pickles) and nothing else. `open_torch_file` also reports container facts,
`walk_tensors` lists (dotted path, tensor) pairs, `scan_torch_file` decodes every pickle
without executing it.

Plain forms: torch.Size -> tuple, torch.device -> "cuda:0", dtypes/layouts -> `Marker`,
argparse.Namespace -> `Namespace` (a dict), numpy scalars -> Python numbers, numpy arrays
-> ndarray, unknown globals (only with allow_unknown_globals) -> `UnknownObject` records.

The pickles run in wconv's pickle machine (`pickle_vm`) with its one table of globals
(`pickle_globals`; the torch entries are in `torch_tensors`): tensor rebuild functions
become LazyTensors with validated views, storage and dtype classes are inert markers, and
anything else is refused. This module says where a zip archive's storages are;
`torch_legacy` does the same for the legacy stream.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..errors import FormatError, UnsupportedError, WconvError
from ..tensor import LazyTensor
from .pickle_vm import DEFAULT_LIMITS, Limits, scan, unpickle
from .torch_legacy import LEGACY_PICKLES, PROTOCOL_VERSION, open_legacy, scan_stream
from .torch_tensors import (STORAGE_TYPES, TORCH_DTYPES, Storage, dtype_by_torch_name,  # noqa: F401 (re-exported)
                            has_numpy_form, make_tensor, storage_pid)
from .torch_zip import MappedFile, ZipArchive

MAX_PICKLE_BYTES = DEFAULT_LIMITS.max_pickle_bytes  # data.pkl larger than this is refused rather than read


# --- results -------------------------------------------------------------------------------


@dataclass
class TorchFile:
    """What open_torch_file found: the object tree plus facts about the container."""

    path: str
    format: str  # "torch-zip" | "torch-legacy"
    root: object
    storages: dict = field(default_factory=dict)  # key -> Storage
    pickle_protocol: int = 0
    byteorder: str = "little"
    version: str | None = None  # zip `version` record / legacy protocol version
    archive_name: str | None = None  # zip folder prefix
    globals: list = field(default_factory=list)  # allowlisted globals used, "module.name"
    unknown_globals: list = field(default_factory=list)  # with allow_unknown_globals


def _find_archive_name(zf, path) -> str:
    names = zf.members
    prefixes = {n[:-len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsupportedError(path, "this is a TorchScript archive (torch.jit.save), not a torch.save "
                                     "checkpoint; load it in torch and save its state_dict() instead")
    if not prefixes:
        if any(n.endswith("archive_format") or n.endswith(".json") for n in names):
            raise UnsupportedError(path, "zip archive is not a torch.save checkpoint (no data.pkl); "
                                         "torch.export / .pt2 packages are not supported")
        raise FormatError(path, "zip archive has no data.pkl: not a torch.save checkpoint")
    if len(prefixes) > 1:
        raise FormatError(path, f"zip archive has {len(prefixes)} data.pkl files: ambiguous")
    return prefixes.pop()


def zip_storages(zf, folder: str, path, *, big_endian: bool = False):
    """(persistent_load, storages) for a pickle whose storages are the members `folder/KEY`
    (torch.save: `ARCHIVE/data/KEY` for `ARCHIVE/data.pkl`)."""
    base = os.path.basename(path)
    where = folder.rsplit("/", 1)[-1]
    storages: dict = {}

    def persistent_load(ctx, pid):
        dt, key, location, numel = storage_pid(ctx, pid, legacy=False)
        st = storages.get(key)
        if st is not None:
            return st
        member = zf.members.get(f"{folder}/{key}")
        if member is None:
            ctx.fail(f"tensor data '{where}/{key}' is missing from the archive")
        nbytes = numel * dt.itemsize
        if member.size < nbytes:
            ctx.fail(f"tensor data '{where}/{key}' has {member.size} bytes, its storage needs {nbytes}")
        st = Storage(key, dt, nbytes, location, f"{base}:{where}/{key}", path, big_endian)
        st.fetch = lambda: zf.view(member)
        st.locate = lambda: zf.data_offset(member) if member.method == 0 else None
        st.file_size = zf.mf.size
        storages[key] = st
        return st

    return persistent_load, storages


def _open_zip(mf, path, allow_unknown_globals, limits) -> TorchFile:
    zf = ZipArchive(mf)
    prefix = _find_archive_name(zf, path)

    def record(name, max_size=4096):
        m = zf.members.get(f"{prefix}/{name}")
        return None if m is None else zf.read(m, max_size)

    byteorder = record("byteorder")
    byteorder = "little" if byteorder is None else byteorder.decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise FormatError(path, f"unknown byteorder record {byteorder!r:.40}")
    version = record("version") or record(".data/version")
    version = version.decode("ascii", "replace").strip() if version else None
    pkl = zf.read(zf.members[f"{prefix}/data.pkl"], (limits or DEFAULT_LIMITS).max_pickle_bytes)
    persistent_load, storages = zip_storages(zf, f"{prefix}/data", path, big_endian=byteorder == "big")
    vm = unpickle(pkl, path=path, where=f"{prefix}/data.pkl", persistent_load=persistent_load,
                  allow_unknown_globals=allow_unknown_globals, limits=limits)
    return _torch_file(path, "torch-zip", vm, storages, byteorder, version, prefix)


def _torch_file(path, fmt, vm, storages, byteorder, version, prefix) -> TorchFile:
    return TorchFile(path, fmt, vm.value, storages, vm.proto, byteorder, version, prefix,
                     [f"{m}.{n}" for (m, n), known in vm.seen.items() if known],
                     [f"{m}.{n}" for (m, n), known in vm.seen.items() if not known and m != "?"])


def open_torch_file(path, *, allow_unknown_globals: bool = False, limits: Limits | None = None) -> TorchFile:
    """Open a torch.save file (zip or legacy) lazily; tensors in the tree are LazyTensors."""
    path = os.fspath(path)
    mf = MappedFile(path)
    try:
        head = mf.read(0, min(4, mf.size))
        if head in (b"PK\x03\x04", b"PK\x05\x06"):
            tf = _open_zip(mf, path, allow_unknown_globals, limits)
        else:
            vm, storages = open_legacy(mf, path, allow_unknown_globals, limits)
            tf = _torch_file(path, "torch-legacy", vm, storages, "little", str(PROTOCOL_VERSION), None)
    except WconvError:
        raise
    except RecursionError:
        raise FormatError(path, "structure nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, struct.error,
            BufferError, OSError) as e:
        raise FormatError(path, f"cannot read torch file: {type(e).__name__}: {e}") from None
    name_tensors(tf.root)
    return tf


def load_pickled(path, *, allow_unknown_globals: bool = False):
    """The object tree pickled in a torch.save file; tensors are LazyTensors."""
    return open_torch_file(path, allow_unknown_globals=allow_unknown_globals).root


# --- walking the tree ----------------------------------------------------------------------


def walk_tensors(root, prefix: str = ""):
    """(dotted path, LazyTensor) for every tensor in the tree, in pickle order.

    Paths join dict keys and list indices with '.', e.g. "model.layers.0.attention.wq.weight".
    A tensor object reachable by several paths is reported at each of them.
    """
    out = []
    stack = [(prefix, root)]
    while stack:
        where, obj = stack.pop()
        if type(obj) is LazyTensor:
            out.append((where, obj))
            continue
        if isinstance(obj, dict):
            items = obj.items()
        elif type(obj) in (list, tuple):
            items = enumerate(obj)
        else:
            continue
        items = [(str(k), v) for k, v in items if type(v) is LazyTensor or isinstance(v, (dict, list, tuple))]
        for k, v in reversed(items):  # scalars were skipped above: paths only for what may hold tensors
            stack.append((f"{where}.{k}" if where else k, v))
    return out


def name_tensors(root) -> None:
    """Give every LazyTensor the first dotted path it appears under as its name."""
    for where, t in walk_tensors(root):
        if not t.name:
            t.name = where


# --- scanning without executing ------------------------------------------------------------


def scan_zip_pickles(zf, path, limits: Limits | None = None) -> list:
    """[(member name, PickleScan)] for every `*.pkl` member of a zip archive (data.pkl;
    TorchScript's constants.pkl too), each with its storage ids resolved as loading does."""
    limits = limits or DEFAULT_LIMITS
    out = []
    for name, m in zf.members.items():
        if name.endswith(".pkl"):
            persistent_load, _ = zip_storages(zf, name[:-len(".pkl")], path)
            out.append((name, scan(zf.read(m, limits.max_pickle_bytes), path=path, label=name,
                                   persistent_load=persistent_load, limits=limits)))
    return out


def scan_torch_file(path) -> list:
    """[(label, pickle_vm.ScanResult)] for every pickle in a torch file, none executed.

    Zip archives: every `*.pkl` member (data.pkl; TorchScript's constants.pkl too).
    Other files: the pickles found back to back from the start (five in a legacy torch
    file, one in a plain pickle file). A pickle that cannot be decoded is a FormatError.
    """
    path = os.fspath(path)
    mf = MappedFile(path)
    try:
        if mf.read(0, min(4, mf.size)) in (b"PK\x03\x04", b"PK\x05\x06"):
            found = scan_zip_pickles(ZipArchive(mf), path)
        else:
            found = [(p.label, p) for p in scan_stream(mf.view(0, mf.size), mf.size, path)]
    except WconvError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as e:
        raise FormatError(path, f"cannot scan: {type(e).__name__}: {e}") from None
    for label, p in found:
        if p.error:
            raise FormatError(path, f"{label}: {p.error}")
    return found

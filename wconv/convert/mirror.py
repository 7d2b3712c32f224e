"""The safe mirror: a torch checkpoint's state dict as one safetensors file, exactly as stored.

The most common reason to turn a .bin/.pt into safetensors is to stop unpickling it. This
works from the file view (the pickled tree wconv's load policy rebuilds, nothing executed),
not from the Model, so any state dict mirrors: BERT, CNNs, LoRA adapters, torchtune
checkpoints. Names, dtypes, shapes and values are kept exactly:

- a training checkpoint ({"model": state dict, "optimizer": ..., "iter_num": ...}) mirrors its
  model state dict; every other top-level entry is summarised as JSON in __metadata__
  (`checkpoint.KEY`), tensors there by dtype and shape only;
- safetensors stores one tensor per byte region: exact aliases (same bytes, same view, e.g. a
  tied lm_head) are stored once under the first name, with one note naming what was dropped
  (the list is also in __metadata__ `shared_tensors`); views that overlap only partially
  cannot be stored faithfully and are refused;
- safetensors has no strides: a non-contiguous (e.g. Fortran-ordered) tensor is written
  contiguous in C order with the same logical values.

Contiguous little-endian data travels by kernel copy (wconv.mapped.copy_range); anything
else in pieces of at most PIECE_BYTES.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..errors import FormatError, UnsupportedError
from ..formats.torch_file import open_torch_file
from ..formats.torch_tensors import MAX_EXPAND_BYTES, StorageView, negate
from ..mapped import copy_range
from ..progress import progress
from ..tensor import LazyTensor
from .state_dict import split_checkpoint, summarise

PIECE_BYTES = 16 << 20  # largest temporary when a tensor cannot be copied byte for byte

# wconv dtype name -> safetensors dtype name, for the types safetensors can hold.
ST_DTYPES = {d: d for d in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8",
                            "BOOL", "C64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")}


@dataclass
class MirrorPlan:
    path: str
    tensors: list  # [(name, LazyTensor)] to write, in file order
    metadata: dict  # __metadata__ strings
    dropped: dict = field(default_factory=dict)  # alias name -> the name it is stored under
    values: list = field(default_factory=list)  # dotted paths of non-tensor values inside the state dict

    def notes(self) -> list:
        """One line per kind of thing the mirror does not store as a tensor."""
        lines = [self.note()] if self.dropped else []
        if self.values:
            shown = ", ".join(self.values[:3]) + (", ..." if len(self.values) > 3 else "")
            lines.append(f"{len(self.values)} value(s) in the state dict are not tensors ({shown}): summarised as "
                         "JSON in __metadata__ 'state_dict_values', not stored as tensors")
        return lines

    def note(self) -> str | None:
        """One line naming the aliases that were stored once, or None."""
        if not self.dropped:
            return None
        kept: dict = {}
        for gone, name in self.dropped.items():
            kept.setdefault(name, []).append(gone)
        groups = "; ".join(f"kept {k}, dropped {', '.join(v)}" for k, v in kept.items())
        return f"tensors sharing their data are stored once (safetensors has no aliases): {groups}"


def plan_mirror(path) -> MirrorPlan:
    """What the mirror of torch file `path` holds; refuses what safetensors cannot store exactly."""
    path = os.fspath(path)
    tf = open_torch_file(path)
    if isinstance(tf.root, LazyTensor):
        tensors, extras = {"tensor": tf.root}, {}
    else:
        tensors, extras, _ = split_checkpoint(tf.root)
    if not tensors:
        raise UnsupportedError(path, "the file holds no tensors; nothing to mirror")
    if "__metadata__" in tensors:
        raise UnsupportedError(path, "a tensor is named __metadata__, which safetensors reserves")
    for name, t in tensors.items():
        _check_storable(path, name, t)
    dropped = _aliases(path, tensors)
    metadata = {"format": "pt"}  # transformers loads only files that say so
    for key, value in extras.items():
        metadata[f"checkpoint.{key}"] = json.dumps(summarise(value), separators=(",", ":"))
    if dropped:
        metadata["shared_tensors"] = json.dumps(dropped, separators=(",", ":"))
    # Non-tensor leaves of the mirrored tree (e.g. a "version" entry in a state dict): not lost silently.
    rest = [k for k in tf.root if str(k) not in extras] if isinstance(tf.root, dict) else []
    tree = tf.root[rest[0]] if len(rest) == 1 and isinstance(tf.root[rest[0]], dict) else tf.root  # {"model": sd}
    values = {p: v for p, v in _non_tensor_leaves(tree) if tree is not tf.root or p.split(".")[0] not in extras}
    if values:
        metadata["state_dict_values"] = json.dumps(summarise(values), separators=(",", ":"))
    kept = [(n, t) for n, t in tensors.items() if n not in dropped]
    return MirrorPlan(path, kept, metadata, dropped, list(values))


def _non_tensor_leaves(obj, prefix: str = ""):
    """(dotted path, value) of every leaf of a dict/list tree that is not a tensor, in the
    spelling iter_tensors gives tensor paths."""
    if isinstance(obj, LazyTensor):
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else None
    if items is None or not obj:
        yield prefix or "value", obj
        return
    for k, v in items:
        yield from _non_tensor_leaves(v, f"{prefix}.{k}" if prefix else str(k))


def _check_storable(path, name, t: LazyTensor) -> None:
    if t.dtype.name not in ST_DTYPES:
        raise UnsupportedError(path, f"tensor {name!r} is {t.dtype.name}, which safetensors cannot store")
    view = t.loader
    if type(view) is not StorageView:
        if t.source == "meta":
            raise UnsupportedError(path, f"tensor {name!r} was saved on the meta device: it has no data to mirror")
        return
    if not view.contiguous and t.nbytes > max(16 * view.storage.nbytes, MAX_EXPAND_BYTES):
        raise UnsupportedError(path, f"tensor {name!r} is an expanded view of shape {list(t.shape)}: written out "
                                     f"it would need {t.nbytes} bytes from a {view.storage.nbytes}-byte storage")


def _view_key(view: StorageView) -> tuple:
    """Two tensors with equal keys are the same values read from the same bytes."""
    size = view.dtype.itemsize
    return (view.byte_span()[0], view.shape, tuple(s * size for s in view.strides), view.dtype.name,
            view.conj, view.neg)


def _aliases(path, tensors: dict) -> dict:
    """{dropped name: kept name} for exact aliases; refuses tensors that share bytes partially."""
    by_base: dict = {}
    for name, t in tensors.items():
        if type(t.loader) is StorageView and t.n_elements:
            by_base.setdefault(id(t.loader.storage.base), []).append((name, t.loader))
    dropped = {}
    for views in by_base.values():
        if len(views) < 2:
            continue
        first_of: dict = {}
        for name, view in views:  # file order: the first name of each view is the one kept
            key = _view_key(view)
            if key in first_of:
                dropped[name] = first_of[key]
            else:
                first_of[key] = name
        spans = sorted((view.byte_span(), name) for name, view in views if name not in dropped)
        reach, holder = -1, None
        for (begin, end), name in spans:
            if begin < reach:
                raise UnsupportedError(path, f"tensors {holder!r} and {name!r} share part of their data (one is "
                                             "a view into the other); safetensors cannot store that: save clones "
                                             "of the views, or drop one of them, before converting")
            if end > reach:
                reach, holder = end, name
    return dropped


# --- writing -----------------------------------------------------------------------------------

def write_mirror(plan: MirrorPlan, tmp_path, *, quiet: bool = False) -> None:
    """Stream the plan to `tmp_path`: header first, then each tensor's bytes in file order."""
    header, offset = {"__metadata__": plan.metadata}, 0
    for name, t in plan.tensors:
        header[name] = {"dtype": ST_DTYPES[t.dtype.name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data region starts 8-byte aligned
    with open(tmp_path, "wb") as f, progress(offset, "writing safetensors", quiet=quiet) as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in plan.tensors:
            start = f.tell()
            _write_tensor(plan.path, name, t, f)
            if f.tell() - start != t.nbytes:
                raise FormatError(plan.path, f"tensor {name!r}: wrote {f.tell() - start} bytes, expected {t.nbytes}")
            bar.update(t.nbytes)


def _write_tensor(path, name, t: LazyTensor, f) -> None:
    view = t.loader
    if type(view) is not StorageView:  # an array already in memory (e.g. pickled numpy data)
        for piece in _c_order_pieces(np.asarray(t.raw()).reshape(t.shape)):
            f.write(_little_endian(piece).reshape(-1).view(np.uint8))
        return
    if t.n_elements == 0:
        return
    st = view.storage
    size = view.dtype.itemsize
    plain = not view.neg and not (view.conj and dtypes.C64 is view.dtype) and (size == 1 or not st.big_endian)
    located = st.base.locate() if plain and view.contiguous else None
    if located is not None:
        st.data()  # lets the container check the storage first (legacy files: its element count)
        copy_range(path, located + view.byte_span()[0], t.nbytes, f, file_size=st.base.file_size,
                   what=f"tensor {name!r}")
        return
    np_dt = view.dtype.storage.newbyteorder(">" if st.big_endian and size > 1 else "<")
    elems = np.frombuffer(st.data(), dtype=np_dt, count=st.nbytes // size)
    arr = np.lib.stride_tricks.as_strided(elems[view.offset:], view.shape, [s * size for s in view.strides],
                                          writeable=False)
    for piece in _c_order_pieces(arr):
        if view.neg:
            piece = negate(piece, view.dtype)
        if view.conj and np.iscomplexobj(piece):
            piece = np.conj(piece)
        f.write(_little_endian(piece).reshape(-1).view(np.uint8))


def _little_endian(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr


def _c_order_pieces(arr: np.ndarray, max_bytes: int = PIECE_BYTES):
    """`arr`'s values in C order, as contiguous pieces of whole rows of at most max_bytes
    (a single row larger than that is split along its own leading axis)."""
    if arr.ndim == 0 or arr.nbytes <= max_bytes:
        yield np.ascontiguousarray(arr)
        return
    row = arr.nbytes // arr.shape[0]
    if row > max_bytes:
        for i in range(arr.shape[0]):
            yield from _c_order_pieces(arr[i], max_bytes)
        return
    step = max_bytes // row
    for i in range(0, arr.shape[0], step):
        yield np.ascontiguousarray(arr[i:i + step])

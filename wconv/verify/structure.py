"""Structural check of one model file without loading its tensors (`wconv verify FILE`).

The readers already refuse what they cannot trust: every count, offset and size is checked
against the bytes present, tensor byte ranges against their dtype and shape, and (zip,
safetensors, GGUF) ranges against each other. So the check is "open it with the reader",
plus what a reader tolerates but a consumer does not:

* torch zip: every member's local header (the reader looks at it lazily), member data
  before the central directory, CRC-32 of every member with `crc=True` (torch.load checks
  them; a CRC of 0 means torch wrote none), storages no tensor uses (a warning).
* legacy torch: every storage's element-count header.
* safetensors: the data region must be covered exactly, tensor after tensor, as the
  safetensors library requires.
* GGUF: tensors one after another in header order, each padded to the alignment, as
  llama.cpp requires; a split set (`NAME-0000N-of-0000M.gguf`) is checked as a whole:
  every part present, `split.no` / `split.count` / `split.tensors.count` as llama.cpp reads
  them, no tensor in two parts.
* llama2.c .bin, GGML/GGJT: the reader's size checks are the whole check.

`deep=True` adds a NaN/Inf scan of every floating-point tensor, in bounded pieces.
Problems are collected as one-line messages; nothing here raises for a damaged file.
"""
from __future__ import annotations

import os
import re
import zlib

from ..errors import WconvError
from ..inspect.stats import has_values, nonfinite_scan
from ..parallel import ordered_map
from ..progress import progress
from .checksums import READ_PIECE, failed_download, read_head

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MODEL_FORMATS = ("torch-zip", "torch-legacy", "safetensors", "gguf", "ggml", "llama2c")


class _Report:
    def __init__(self, path):
        self.path = path
        self.format = None
        self.files = [path]
        self.checks: list = []
        self.problems: list = []
        self.warnings: list = []
        self.nonfinite: list = []
        self.n_tensors = 0
        self.n_bytes = 0
        self.tensors: list = []  # LazyTensors for the deep scan

    def problem(self, message: str):
        self.problems.append(" ".join(str(message).split()))

    def as_dict(self) -> dict:
        return {"kind": "structure", "path": self.path, "format": self.format, "files": self.files,
                "ok": not self.problems, "n_tensors": self.n_tensors, "n_bytes": self.n_bytes,
                "checks": self.checks, "problems": self.problems, "warnings": self.warnings,
                "nonfinite": self.nonfinite}


def verify_model_file(path, *, crc: bool = False, deep: bool = False, quiet: bool = True,
                      workers=None) -> dict:
    """Check one model file (or the GGUF split set it belongs to); see the module docstring."""
    from ..convert.load import sniff

    path = os.fspath(path)
    r = _Report(path)
    fmt = None
    try:
        page = failed_download(path, read_head(path))
        if page:
            r.format = "html"
            r.problem(f"{path}: {page}")
            return r.as_dict()
        fmt = sniff(path)
        r.format = fmt
        if fmt not in MODEL_FORMATS:
            r.problem(f"{path}: not a model file wconv recognises ({fmt})")
            return r.as_dict()
        {"torch-zip": _torch_zip, "torch-legacy": _torch_legacy, "safetensors": _safetensors,
         "gguf": _gguf, "ggml": _ggml, "llama2c": _llama2c}[fmt](r, crc, workers)
    except WconvError as e:
        r.problem(str(e))
    except OSError as e:
        r.problem(f"{path}: cannot read: {e.strerror or e}")
    if crc and fmt not in ("torch-zip",) and not r.problems:
        r.warnings.append(f"{fmt} files carry no checksums; --crc checked nothing more")
    if deep and not r.problems:
        _deep_scan(r, quiet, workers)
    return r.as_dict()


# --- torch -------------------------------------------------------------------------------

def _torch_zip(r: _Report, crc: bool, workers):
    from ..formats.torch_file import open_torch_file, walk_tensors
    from ..formats.torch_zip import MappedFile, ZipArchive

    zf = ZipArchive(MappedFile(r.path))  # directory, zip64 records, member layout and overlaps
    for m in zf.members.values():
        zf.data_offset(m)  # local header present, same name and compression as the directory says
        if m.method not in (0, 8):
            r.problem(f"{r.path}: zip member '{m.name}' uses compression method {m.method}, which torch "
                      "never writes")
    r.checks.append(f"zip directory and {len(zf.members)} member headers")
    tf = open_torch_file(r.path)  # the pickle, and every tensor view inside its storage
    _collect_torch(r, tf, walk_tensors)
    prefix = tf.archive_name + "/data/"
    unused = [n for n in zf.members if n.startswith(prefix) and n[len(prefix):] not in tf.storages]
    if unused:
        r.warnings.append(f"{len(unused)} storage member(s) no tensor uses, e.g. {unused[0]}")
    if crc:
        members = [m for m in zf.members.values() if m.crc != 0]
        bad = [name for name, ok in ordered_map(lambda m: (m.name, _member_crc_ok(zf, m)), members,
                                                workers=workers) if not ok]
        for name in bad:
            r.problem(f"{r.path}: zip member '{name}' fails its CRC-32 check: corrupt data")
        no_crc = len(zf.members) - len(members)
        r.checks.append(f"CRC-32 of {len(members)} members" + (f" ({no_crc} carry no CRC)" if no_crc else ""))


def _member_crc_ok(zf, m) -> bool:
    """CRC-32 of one member's (decompressed) bytes, read in pieces; compared with the directory's."""
    start, remaining, crc = zf.data_offset(m), m.compressed_size, 0
    inflate = zlib.decompressobj(-15) if m.method == 8 else None
    with open(zf.path, "rb", buffering=0) as f:
        f.seek(start)
        while remaining:
            chunk = f.read(min(READ_PIECE, remaining))
            if not chunk:
                return False
            remaining -= len(chunk)
            if inflate is not None:
                chunk = inflate.decompress(chunk)
            crc = zlib.crc32(chunk, crc)
        if inflate is not None:
            crc = zlib.crc32(inflate.flush(), crc)
    return crc == m.crc


def _collect_torch(r: _Report, tf, walk_tensors):
    seen = {}
    for _, t in walk_tensors(tf.root):
        seen.setdefault(id(t), t)  # a tensor reachable by several paths (tied weights) once
    r.tensors = list(seen.values())
    r.n_tensors = len(r.tensors)
    r.n_bytes = sum(st.nbytes for st in tf.storages.values())
    r.checks.append(f"pickle and {r.n_tensors} tensor views inside {len(tf.storages)} storages")


def _torch_legacy(r: _Report, crc: bool, workers):
    from ..formats.torch_file import open_torch_file, walk_tensors

    tf = open_torch_file(r.path)
    for st in tf.storages.values():
        st.data()  # checks the element count written in front of the storage's bytes
    _collect_torch(r, tf, walk_tensors)
    r.checks.append("every storage's element count")


# --- safetensors -------------------------------------------------------------------------

def _safetensors(r: _Report, crc: bool, workers):
    from ..formats.safetensors_io import read, read_header

    entries, _, data_start, size = read_header(r.path)  # offsets in bounds, sizes = dtype x shape, no overlap
    r.checks.append(f"header and {len(entries)} tensor ranges (in bounds, sized by dtype and shape, no overlaps)")
    expected = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"])):
        if e["begin"] != expected:
            r.problem(f"{r.path}: tensor {name!r} starts at data offset {e['begin']}, not {expected} where the "
                      "previous tensor ends; the safetensors library refuses such files")
            break
        expected = e["end"]
    else:
        if expected != size - data_start:
            r.problem(f"{r.path}: {size - data_start - expected} bytes after the last tensor; the safetensors "
                      "library refuses such files (truncated write or appended data?)")
    r.tensors = list(read(r.path)[0].values())
    r.n_tensors, r.n_bytes = len(r.tensors), sum(t.nbytes for t in r.tensors)


# --- GGUF --------------------------------------------------------------------------------

def _gguf(r: _Report, crc: bool, workers):
    from ..formats import gguf_io

    m = SPLIT_NAME.match(os.path.basename(r.path))
    if m is None:
        h, _ = gguf_io.read_header(r.path)
        _gguf_layout(r, r.path, h)
        _gguf_part_is_alone(r, h)
        r.tensors = list(gguf_io.read(r.path, strict=False, whole_set=False).tensors.values())  # metadata and vocabulary consistent
    else:
        _gguf_split_set(r, m)
    r.n_tensors, r.n_bytes = len(r.tensors), sum(t.nbytes for t in r.tensors)


def _gguf_layout(r: _Report, path: str, h):
    """llama.cpp's rule: tensor i starts where tensor i-1 ends, rounded up to the alignment."""
    expected = 0
    for info in h.tensors:
        at = info.offset - h.data_offset
        if at != expected:
            r.problem(f"{path}: tensor {info.name!r} is at data offset {at}, llama.cpp expects {expected} "
                      "(tensors one after another in header order, each padded to the alignment)")
            break
        expected += -(-info.nbytes // h.alignment) * h.alignment
    r.checks.append(f"{os.path.basename(path)}: header, {len(h.tensors)} tensors in bounds, sized by type and "
                    "shape, no overlaps, laid out as llama.cpp reads them")


def _gguf_part_is_alone(r: _Report, h):
    count = h.kv.get("split.count")
    if isinstance(count, int) and count > 1:
        r.problem(f"{r.path}: metadata says this is part {h.kv.get('split.no', 0) + 1} of a {count}-part split set, "
                  "but the file is not named NAME-0000N-of-0000M.gguf, so llama.cpp cannot find the other parts")


def _split_key(r, path, h, key, want_type, expected, required=True):
    kind = h.kv_types.get(key, (None,))[0]
    if kind is None:
        if required:
            r.problem(f"{path}: split set part without {key} (llama.cpp needs it to load the set)")
    elif kind != want_type:
        r.problem(f"{path}: {key} is {kind}, llama.cpp reads it as {want_type}")
    elif h.kv[key] != expected:
        r.problem(f"{path}: {key} is {h.kv[key]}, expected {expected}")


def _gguf_split_set(r: _Report, m):
    from ..formats import gguf_io

    directory = os.path.dirname(r.path)
    count = int(m.group("count"))
    paths = [os.path.join(directory, f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    r.files = paths
    headers = []
    for p in paths:
        if not os.path.isfile(p):
            r.problem(f"{p}: part {paths.index(p) + 1} of the {count}-part split set is missing")
            continue
        try:
            h, _ = gguf_io.read_header(p)
        except WconvError as e:
            r.problem(str(e))
            continue
        _gguf_layout(r, p, h)
        headers.append((p, h))
    total = sum(len(h.tensors) for _, h in headers)
    names = {}
    for p, h in headers:
        no = paths.index(p)
        # llama.cpp reads split.no (uint16) from every part, split.count (uint16) and
        # split.tensors.count (int32) from the first; gguf-split writes all three everywhere.
        first = no == 0
        _split_key(r, p, h, "split.no", "UINT16", no)
        _split_key(r, p, h, "split.count", "UINT16", count, required=first)
        _split_key(r, p, h, "split.tensors.count", "INT32", total if len(headers) == count else h.kv.get(
            "split.tensors.count"), required=first)
        for info in h.tensors:
            if info.name in names:
                r.problem(f"{p}: tensor {info.name!r} is also in {os.path.basename(names[info.name])}")
            names[info.name] = p
    if headers and headers[0][0] == paths[0] and "general.architecture" not in headers[0][1].kv:
        r.problem(f"{paths[0]}: the first part of a split set has no general.architecture")
    r.checks.append(f"split set of {count} parts: split.no/count/tensors.count, no tensor in two parts")
    if not r.problems:
        for p, _ in headers:
            r.tensors += list(gguf_io.read(p, strict=False, whole_set=False).tensors.values())


# --- the rest ----------------------------------------------------------------------------

def _ggml(r: _Report, crc: bool, workers):
    from ..formats.ggml_legacy import read

    _model_reader(r, read)


def _llama2c(r: _Report, crc: bool, workers):
    from ..formats.llama2c import read

    _model_reader(r, read)


def _model_reader(r: _Report, read):
    model = read(r.path)  # sizes from the header must add up to the file (llama2.c) / stay in bounds (GGML)
    r.format = model.source_format
    r.tensors = list(model.tensors.values())
    r.n_tensors, r.n_bytes = len(r.tensors), sum(t.nbytes for t in r.tensors)
    r.checks.append(f"header and {r.n_tensors} tensors: sizes add up, every tensor in bounds")


# --- values ------------------------------------------------------------------------------

def _deep_scan(r: _Report, quiet: bool, workers):
    tensors = [t for t in r.tensors if t.dtype.is_float and has_values(t)]
    with progress(sum(t.nbytes for t in tensors), "scanning for NaN/Inf", quiet=quiet) as bar:
        for t in tensors:
            try:
                nan, inf = nonfinite_scan(t, workers=workers)
            except WconvError as e:  # e.g. a tensor saved on torch's meta device has no values
                r.warnings.append(f"{t.name}: not scanned: {e}")
                continue
            if nan or inf:
                r.nonfinite.append({"name": t.name, "nan": nan, "inf": inf})
                r.problem(f"{r.path}: tensor {t.name} has {nan} NaN and {inf} infinite values")
            bar.update(t.nbytes, t.name)
    r.checks.append(f"no NaN/Inf in {len(tensors)} floating-point tensors" if not r.nonfinite
                    else f"NaN/Inf scan of {len(tensors)} floating-point tensors")


"""safetensors: our own header parser and a lazy, zero-copy reader; a streaming writer.

File layout: u64 little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`),
then the data region; offsets are relative to the start of the data region.

We parse the header ourselves instead of using the `safetensors` library because
its numpy API (`safe_open(...).get_tensor`) copies each whole tensor into memory; here
a tensor is a zero-copy view of a read-only mmap of its byte range, made only when a
writer asks for it.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from .. import arch, codecs, dtypes, quant, stream
from ..dtypes import DType
from ..errors import FormatError, UnsupportedError, UsageError
from ..mapped import map_array
from ..notes import emit as emit_notes
from ..notes import tensor_note
from ..progress import progress
from ..tensor import FileSpan, LazyTensor

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names we map to our table (same spelling).
_ST_DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
              "F8_E5M2", "F8_E4M3", "C64")
# Valid in the safetensors spec but without a representation here.
_ST_UNSUPPORTED = ("F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FN")

CONFIG_PREFIX = "wconv."  # __metadata__ keys carrying Config fields (as strings)


def read_header(path) -> tuple[dict, dict, int, int]:
    """(tensor entries in file order, __metadata__, data start, file size); validated."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(path, f"safetensors file too short ({size} bytes) for its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise FormatError(path, f"safetensors header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
            if 8 + n > size:
                raise FormatError(path, f"safetensors header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting bombs
        raise FormatError(path, f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = {name: _check_entry(path, name, e, size - data_start) for name, e in header.items()}
    _check_no_overlap(path, entries)
    return entries, metadata, data_start, size


def _check_entry(path, name, e, data_len) -> dict:
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise FormatError(path, f"tensor {name!r}: header entry needs dtype, shape and data_offsets")
    dt_name, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dt_name in _ST_UNSUPPORTED:
        raise UnsupportedError(path, f"tensor {name!r}: dtype {dt_name} is not supported")
    if dt_name not in _ST_DTYPES:
        raise FormatError(path, f"tensor {name!r}: unknown dtype {dt_name!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                               for s in shape):
        raise FormatError(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise FormatError(path, f"tensor {name!r}: data_offsets must be two integers, got {offs!r:.80}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise FormatError(path, f"tensor {name!r}: data_offsets [{begin}, {end}] outside the "
                                f"{data_len}-byte data region")
    dt = dtypes.by_name(dt_name)
    n_elements = 1
    for s in shape:
        n_elements *= s
    if n_elements * dt.itemsize != end - begin:
        raise FormatError(path, f"tensor {name!r}: {dt_name} shape {shape} needs {n_elements * dt.itemsize} "
                                f"bytes but data_offsets span {end - begin}")
    return {"dtype": dt, "shape": tuple(shape), "begin": begin, "end": end}


def _check_no_overlap(path, entries: dict) -> None:
    spans = sorted((e["begin"], e["end"], name) for name, e in entries.items() if e["end"] > e["begin"])
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(path, f"tensors {n0!r} and {n1!r} overlap in the data region")


def read(path) -> tuple[dict, dict]:
    """(dict name -> LazyTensor in file order, __metadata__). Reads only the header."""
    path = os.fspath(path)
    entries, metadata, data_start, size = read_header(path)
    base = os.path.basename(path)
    # File order is data order (the JSON object itself is usually sorted by name).
    ordered = sorted(entries.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"]))
    tensors = {}
    for name, e in ordered:
        tensors[name] = LazyTensor(name, e["dtype"], e["shape"], _loader(path, size, data_start, name, e),
                                   f"{base}:{name}", (path, "safetensors", data_start + e["begin"]),
                                   span=FileSpan(path, data_start + e["begin"], e["end"] - e["begin"], size))
    return tensors, metadata


def _loader(path: str, size: int, data_start: int, name: str, e: dict):
    dt, begin, end = e["dtype"], e["begin"], e["end"]
    storage = dt.storage.newbyteorder("<")  # safetensors data is little-endian
    if dt is dtypes.C64:
        storage = np.dtype("<c8")

    def load():
        # One map per tensor (not per file): its pages leave RSS when the writer drops the array.
        return map_array(path, data_start + begin, end - begin, storage, file_size=size,
                         what=f"tensor {name!r}").reshape(e["shape"])

    return load


# --- writer ----------------------------------------------------------------------



def _out_dtype(t: LazyTensor, requested: DType | None) -> DType:
    if requested is not None and t.dtype.is_float and t.dtype.name not in ("C64", "C128", "C32"):
        return requested
    if t.dtype.name in _ST_DTYPES:
        return t.dtype
    if t.dtype.quantized or t.dtype.name.startswith("F8_"):
        return dtypes.F32  # no safetensors form: store the dequantised values
    raise UnsupportedError(t.source or t.name, f"tensor {t.name}: dtype {t.dtype} cannot be stored in safetensors")


def _hf_plan(model) -> list:
    """[(hf name, lazy tensor in HF's orientation)] for names="hf"."""
    cfg = model.config
    fam = arch.get(cfg.arch)
    if fam is None or "hf" not in fam.names:
        raise UsageError(model.path or None, f"no Hugging Face names for architecture {cfg.arch!r}")
    plan = []
    for name, t in model.tensors.items():
        hf_name = fam.from_canonical(name, "hf")
        if hf_name is None:
            raise UsageError(model.path or None, f"tensor {name} has no Hugging Face {fam.title} name")
        plan.append((hf_name, fam.to_layout(name, t, cfg, "hf")))
    return plan


def config_metadata(model) -> dict:
    """__metadata__ strings: format 'pt' (what HF loaders expect) and the Config fields."""
    meta = {"format": "pt"}
    for key, value in model.config.to_dict().items():
        meta[CONFIG_PREFIX + key] = json.dumps(value)
    return meta


def hf_config(model) -> dict:
    """A config.json for the HF-named file `write(..., names="hf")` produces."""
    fam = arch.get(model.config.arch)
    if fam is None:
        raise UsageError(model.path or None, f"no Hugging Face config for architecture {model.config.arch!r}")
    try:
        return fam.hf_config(model.config)
    except UnsupportedError as e:
        raise UnsupportedError(model.path or None, e.message) from None


def check_options(model, out, *, dtype=None) -> None:
    """Refuse, naming OUT, what a safetensors file cannot hold, before anything is written."""
    requested = codecs.from_option(dtype, ("f32", "f16", "bf16"), out, "safetensors output") if dtype else None
    for t in model.tensors.values():
        _out_dtype(t, requested)  # a tensor with no safetensors form is refused here (names its source)


def write(model, tmp_path, *, quiet: bool = False, dtype=None, names: str = "canonical", notes=None,
          threads: int | None = None) -> None:
    """Stream `model` to `tmp_path`: header first, then the tensors' bytes (wconv.stream).

    Notes (dequantised tensors, F16 overflow) are printed once at the end, or, when a list is
    given as `notes`, added to it for the caller to print (hf_dir: once for every shard)."""
    requested = None
    if dtype is not None:
        requested = codecs.from_option(dtype, ("f32", "f16", "bf16"), model.path or tmp_path, "safetensors output")
    if names == "canonical":
        plan = list(model.tensors.items())
    elif names == "hf":
        plan = _hf_plan(model)
    else:
        raise UsageError(tmp_path, f"names must be 'canonical' or 'hf', not {names!r}")
    own_notes = notes is None
    notes = [] if own_notes else notes

    header, offset, items = {"__metadata__": config_metadata(model)}, 0, []
    for out_name, t in plan:
        out = _out_dtype(t, requested)
        if t.dtype.quantized and not out.quantized:
            notes.append(tensor_note(f"{t.dtype.name} tensors dequantised to {out.name} (safetensors has no "
                                     "quantised types)", t.name, f"{t.dtype.name} dequantised to {out.name}"))
        nbytes = out.nbytes(t.n_elements)
        header[out_name] = {"dtype": out.name, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append((out_name, t, out, nbytes))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad so the data region starts 8-byte aligned

    with open(tmp_path, "wb") as f, progress(offset, "writing safetensors", quiet=quiet) as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        results = stream.write_tensors(f, [(t, out) for _, t, out, _ in items], threads=threads,
                                       after=lambda i: bar.update(items[i][3]))
    notes += [quant.overflow_note(t.name) for (_, t, _, _), r in zip(items, results) if r.overflowed]
    if own_notes:
        emit_notes(model.path or None, notes)

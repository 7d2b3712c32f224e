"""`convert --name` / `--metadata FILE`: general.* keys for GGUF outputs, as llama.cpp's converter takes them.

The file is JSON with the keys convert_hf_to_gguf.py's `--metadata` reads (gguf-py's
Metadata.load): the authorship strings (general.name, author, version, organization,
finetune, basename, description, quantized_by, size_label, license.name, license.link, url,
doi, uuid, repo_url, source.url/doi/uuid/repo_url), the sampling defaults
(general.sampling.*), general.tags and general.languages (lists of strings), and
general.base_models / general.datasets (lists of objects with name, author, version,
organization, description, url, doi, uuid, repo_url), which become
general.base_model.count + general.base_model.{i}.{field} (and general.dataset.*).
Types are gguf-py's (top_k, penalty_last_n, mirostat INT32; other sampling values FLOAT32).
`--name` wins over the file's general.name, as --model-name does there. Keys the converter
does not read are not written; wconv says so rather than dropping them silently. A value of
the wrong type is refused naming the file.
"""
from __future__ import annotations

import json

from .errors import FormatError
from .mapped import read_whole
from .progress import warn

_STRINGS = ("name", "author", "version", "organization", "finetune", "basename", "description", "quantized_by",
            "size_label", "license.name", "license.link", "url", "doi", "uuid", "repo_url", "source.url",
            "source.doi", "source.uuid", "source.repo_url", "sampling.sequence")
_INTS = ("sampling.top_k", "sampling.penalty_last_n", "sampling.mirostat")
_FLOATS = ("sampling.top_p", "sampling.min_p", "sampling.xtc_probability", "sampling.xtc_threshold",
           "sampling.temp", "sampling.penalty_repeat", "sampling.mirostat_tau", "sampling.mirostat_eta")
KEY_TYPES = {**{f"general.{k}": "STRING" for k in _STRINGS}, **{f"general.{k}": "INT32" for k in _INTS},
             **{f"general.{k}": "FLOAT32" for k in _FLOATS},
             "general.tags": "ARRAY", "general.languages": "ARRAY"}
_ENTRY_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")
_LISTS = {"general.base_models": "general.base_model", "general.datasets": "general.dataset"}
MAX_METADATA_BYTES = 16 << 20


def overrides(metadata_file=None, name: str | None = None) -> dict:
    """key -> (GGUF type name, value) for gguf_io.write's metadata_overrides."""
    out = {}
    if metadata_file is not None:
        out.update(_from_file(metadata_file))
    if name is not None:
        out["general.name"] = ("STRING", name)
    return out


def _from_file(path) -> dict:
    raw = read_whole(path, max_bytes=MAX_METADATA_BYTES, what="metadata file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"not a JSON metadata file: {e}") from None
    if not isinstance(data, dict):
        raise FormatError(path, "a metadata file is a JSON object of general.* keys")
    out, ignored = {}, []
    for key, value in data.items():
        if key in _LISTS:
            out.update(_entries(path, key, value))
        elif key in KEY_TYPES:
            out[key] = (KEY_TYPES[key], _typed(path, key, KEY_TYPES[key], value))
        else:
            ignored.append(key)
    if ignored:
        warn(path, f"not written (llama.cpp's converter reads no such metadata key): {', '.join(ignored[:6])}"
                   + (f" and {len(ignored) - 6} more" if len(ignored) > 6 else ""))
    return out


def _typed(path, key: str, kind: str, value):
    if kind == "STRING" and isinstance(value, str):
        return value
    if kind == "INT32" and isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31:
        return value
    if kind == "FLOAT32" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "ARRAY" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    want = {"STRING": "a string", "INT32": "an integer", "FLOAT32": "a number",
            "ARRAY": "a list of strings"}[kind]
    raise FormatError(path, f"{key} must be {want}, not {json.dumps(value)[:60]}")


def _entries(path, key: str, value) -> dict:
    """general.base_models: [{name, author, ...}] -> general.base_model.count and .{i}.{field}."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise FormatError(path, f"{key} must be a list of objects (name, author, version, organization, ...)")
    prefix = _LISTS[key]
    out = {f"{prefix}.count": ("UINT32", len(value))}
    for i, entry in enumerate(value):
        for field in _ENTRY_FIELDS:
            if field in entry:
                out[f"{prefix}.{i}.{field}"] = ("STRING", _typed(path, f"{key}[{i}].{field}", "STRING", entry[field]))
    return out

"""`wconv verify PATH`: is this download / this file intact?

* A directory with a checksum list (Meta's `checklist.chk`, or `checksums=` any
  md5sum/sha256sum-style file): every listed file is hashed and compared; missing,
  mismatching, HTML-instead-of-data and unlisted files are problems
  (wconv.verify.checksums). With `crc`/`deep`, the model files are also checked
  structurally.
* A directory without one: every model file in it is checked structurally.
* A file: checked structurally (wconv.verify.structure); with `checksums=` also against its
  line in that list.

`verify_path` returns a dict whose "ok" says whether anything was wrong; `format_result`
renders it. Unusable arguments (no such path, unreadable list) raise WconvError.
"""
from __future__ import annotations

import os

from ..errors import FormatError, UsageError
from .checksums import parse_list, verify_checksums
from .structure import MODEL_FORMATS, SPLIT_NAME, verify_model_file

DEFAULT_LIST = "checklist.chk"  # what Meta's download.sh fetches beside the weights
_MODEL_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".gguf", ".ggml", ".ggjt", ".ckpt")


def _model_files(directory: str, names=None) -> list:
    """Model files of a directory (or of `names` in it), one per GGUF split set."""
    from ..convert.load import sniff

    if names is None:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    out, sets = [], set()
    for name in names:
        full = os.path.join(directory, name)
        if not os.path.isfile(full) or not name.endswith(_MODEL_EXTENSIONS) or name == "tokenizer.bin":
            continue
        m = SPLIT_NAME.match(os.path.basename(name))
        if m:  # a split set is checked as a whole, once
            key = (os.path.dirname(full), m.group("prefix"), m.group("count"))
            if key in sets:
                continue
            sets.add(key)
        try:
            if sniff(full) not in MODEL_FORMATS and not name.endswith((".pth", ".safetensors", ".gguf")):
                continue  # e.g. a .bin that is not a model: nothing to check structurally
        except FormatError:
            pass  # unreadable or empty: the structural check says so
        out.append(full)
    return out


def verify_path(path, *, checksums=None, crc: bool = False, deep: bool = False, quiet: bool = True,
                workers=None) -> dict:
    """Verify a download directory or a model file; see the module docstring."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or directory")
    if checksums is not None and not os.path.isfile(checksums):
        raise UsageError(checksums, "checksum list not found")
    result = {"path": path, "ok": True, "checksums": None, "structure": []}
    if os.path.isdir(path):
        list_path = os.fspath(checksums) if checksums is not None else os.path.join(path, DEFAULT_LIST)
        if os.path.isfile(list_path):
            result["checksums"] = verify_checksums(path, list_path, quiet=quiet, workers=workers)
            files = _model_files(path, [r["name"] for r in result["checksums"]["files"]
                                        if r["status"] == "ok"]) if (crc or deep) else []
        else:
            files = _model_files(path)
            if not files:
                raise UsageError(path, f"no {DEFAULT_LIST} and no model files here; pass --checksums FILE")
    else:
        files = [path]
        if checksums is not None:
            from ..convert.load import sniff

            result["checksums"] = _verify_listed_file(path, os.fspath(checksums), quiet, workers)
            try:
                if sniff(path) not in MODEL_FORMATS:  # e.g. tokenizer.model, params.json: the digest is the check
                    files = []
            except FormatError:
                pass
    for f in files:
        result["structure"].append(verify_model_file(f, crc=crc, deep=deep, quiet=quiet, workers=workers))
    result["ok"] = (result["checksums"] is None or result["checksums"]["ok"]) and \
        all(s["ok"] for s in result["structure"])
    return result


def _verify_listed_file(path: str, list_path: str, quiet, workers) -> dict:
    """A single file against its line in a checksum list (by path relative to the list, else by
    the longest listed path the file's path ends with)."""
    full = os.path.abspath(path)
    base = os.path.dirname(os.path.abspath(list_path))
    rel = os.path.relpath(full, base).replace(os.sep, "/")
    names = [e.name for e in parse_list(list_path)]
    if rel not in names:
        posix = full.replace(os.sep, "/")
        ends = sorted((n for n in names if posix.endswith("/" + n)), key=len)
        if not ends:
            raise UsageError(path, f"is not listed in {list_path}")
        rel = ends[-1]
        base = full[: len(full) - len(rel) - 1]
    return verify_checksums(base, list_path, quiet=quiet, workers=workers, only=[rel])


_STATUS = {"ok": "OK", "mismatch": "MISMATCH", "missing": "MISSING", "html": "HTML", "unreadable": "UNREADABLE"}


def _human(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_result(result: dict) -> str:
    lines = []
    c = result.get("checksums")
    if c:
        lines.append(f"{c['list']} ({', '.join(c['algorithms'])}): {c['n_files']} file(s)")
        for row in c["files"]:
            tail = f": {row['detail']}" if row["detail"] else ""
            lines.append(f"  {_STATUS[row['status']]:<10} {row['name']}{tail}")
        for name in c["extra"]:
            lines.append(f"  {'EXTRA':<10} {name}: not in the list")
        speed = f" ({c['mb_per_s']} MB/s)" if c.get("mb_per_s") else ""
        lines.append(f"  hashed {_human(c['bytes_hashed'])} in {c['seconds']:.2f} s{speed}")
    for s in result.get("structure", []):
        head = f"{s['path']} ({s['format']})"
        if s["ok"]:
            lines.append(f"{head}: OK, {s['n_tensors']} tensors, {_human(s['n_bytes'])}")
        else:
            lines.append(f"{head}: {len(s['problems'])} problem(s)")
        lines += [f"  checked: {c_}" for c_ in s["checks"]] if s["ok"] else []
        lines += [f"  PROBLEM: {p}" for p in s["problems"]]
        lines += [f"  warning: {w}" for w in s["warnings"]]
    n_problems = (c["n_problems"] if c else 0) + sum(len(s["problems"]) for s in result.get("structure", []))
    lines.append("result: OK" if result["ok"] else f"result: {n_problems} problem(s)")
    return "\n".join(lines)

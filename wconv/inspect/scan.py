"""`wconv scan`: what loading a file with pickle/torch.load would call, found without running it.

Every pickle in the file runs in wconv's pickle machine under its scan policy
(`pickle_vm.scan`): the interpreter, table of globals and storage resolution that loading
uses, with every unsafe use recorded as a reason instead of refused - so a pickle scans
safe exactly when wconv would load it without an UnsafeFileError. Nothing is imported or
called. The verdict is "safe" when the pickles only use wconv's allowlist of data globals
(plain containers, numpy scalars/arrays, torch tensor rebuilding) in the ways wconv's own
reader accepts; anything else is "unsafe", with reasons that name the global or opcode.
Files that are not pickle-based (safetensors, GGUF, GGML, llama2c) hold nothing
executable; they are still checked for being a pickle prefix in disguise, since
torch.load would unpickle any file that is not a zip.

scan_path(path) -> dict (the `--json` output; a single unreadable file raises WconvError),
scan_report(path) -> the same dict for every input, unreadable ones included (never raises),
format_scan(dict) -> text.
"""
from __future__ import annotations

import os
import struct

from ..errors import FormatError, WconvError
from ..formats import pickle_vm
from ..formats.pickle_vm import DEFAULT_LIMITS, IDENTIFIER

SCAN_VERSION = 1
PICKLE_EXTENSIONS = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt")
WEIGHT_EXTENSIONS = (".safetensors", ".gguf", ".ggml", ".ggjt")
MAX_TOKENIZER_BYTES = 64 << 20  # unknown files larger than this are not tried as tokenizers
_MAX_FILES = 10_000


def _known_non_pickle(path: str, head: bytes, size: int) -> str | None:
    from ..sniff import GGML_MAGICS, GGUF_MAGIC, LLAMA2C_MAGIC

    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head[:4] in GGML_MAGICS:
        return GGML_MAGICS[head[:4]]
    if head[:4] == LLAMA2C_MAGIC[::-1]:
        return "llama2c"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack_from("<Q", head)[0] <= size:
        return "safetensors"
    from ..formats.llama2c import looks_like_v0

    if looks_like_v0(path):
        return "llama2c-v0"
    return None


def _known_tokenizer(path: str) -> str | None:
    if os.path.getsize(path) > MAX_TOKENIZER_BYTES:  # these readers load the whole file
        return None
    for module, fmt in (("llama2c_tokenizer", "llama2c-tokenizer"), ("sentencepiece", "sentencepiece")):
        try:
            mod = __import__(f"wconv.formats.{module}", fromlist=["read"])
            if mod.read(path).tokens:
                return fmt
        except WconvError:
            continue
    return None


def _file_result(path, fmt, pickles, reasons, notes) -> dict:
    return {"path": path, "format": fmt, "safe": not reasons, "verdict": "unsafe" if reasons else "safe",
            "reasons": reasons[:DEFAULT_LIMITS.max_listed], "notes": notes, "pickles": [p.as_dict() for p in pickles]}


def _unreadable_result(path, error: WconvError) -> dict:
    return {"path": path, "format": "unknown", "safe": False, "verdict": "unreadable", "reasons": [], "notes": [],
            "pickles": [], "error": str(error)}


def _collect(pickles) -> list:
    return [f"{p.label}: {r}" for p in pickles for r in p.reasons]


def _executable_prefix(p) -> bool:
    # A malformed prefix matters only if it names importable globals or uses opcodes that call
    # (an unpickler acts on opcodes as it reads them); other bytes that merely decode as a
    # few opcodes are not a pickle.
    return any(IDENTIFIER.match(g.rsplit(".", 1)[0]) for g in p.unknown) or bool(
        set(p.calls) & {"INST", "OBJ"}) or bool(p.ext)


def scan_file(path: str) -> dict:
    """Scan one file. Raises WconvError when it cannot be read or decoded at all."""
    from ..formats.torch_zip import MappedFile, ZipArchive

    mf = MappedFile(path)
    head = mf.read(0, min(16, mf.size))
    try:
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _scan_zip(path, ZipArchive(mf))
        return _scan_stream(path, mf, head)
    except WconvError as e:
        if e.path is None:
            e = FormatError(path, e.message)
        raise e from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error, UnicodeError) as e:
        raise FormatError(path, f"cannot scan: {type(e).__name__}: {e}") from None


def _scan_zip(path, zf) -> dict:
    from ..formats.torch_file import scan_zip_pickles

    pickles, notes = [], []
    for name, p in scan_zip_pickles(zf, path):
        if p.error and not (p.reasons and _executable_prefix(p)):
            raise FormatError(path, f"{name}: {p.error}")
        if p.error:  # torch.load would act on the opcodes before the malformed part
            notes.append(f"{name} is not a complete pickle ({p.error}); an unpickler would act on the "
                         "opcodes before the error")
        pickles.append(p)
    reasons = _collect(pickles)
    code = [n for n in zf.members if "/code/" in n or n.startswith("code/")]
    if code:
        reasons.append(f"TorchScript archive: {len(code)} code members are compiled and run by torch.jit.load")
    if not pickles:
        notes.append("zip archive without pickles: nothing torch.load would unpickle")
    return _file_result(path, "torch-zip", pickles, reasons, notes)


def _is_legacy_magic(p) -> bool:
    # torch.load unpickles the first pickle and compares it with the magic number.
    from ..formats.torch_legacy import MAGIC_NUMBER

    return p.error is None and not p.failures and type(p.value) is int and p.value == MAGIC_NUMBER


def _scan_stream(path, mf, head) -> dict:
    from ..formats.torch_legacy import LEGACY_PICKLES, scan_stream

    view = mf.view(0, mf.size)
    first = pickle_vm.scan(view, 0, path=path, label="pickle 0")
    known = _known_non_pickle(path, head, mf.size)
    if first.error is not None:
        tokenizer = None if known else _known_tokenizer(path)
        if first.reasons and _executable_prefix(first):
            # pickle.load would run these opcodes before reaching the malformed part.
            first.label = "pickle prefix"
            reasons = _collect([first])
            return _file_result(path, known or tokenizer or "pickle (malformed)", [first], reasons,
                                [f"not a complete pickle ({first.error}); an unpickler would act on the "
                                 "opcodes before the error"])
        if known or tokenizer:
            return _file_result(path, known or tokenizer, [], [], ["no pickle; nothing executable"])
        raise FormatError(path, f"neither a pickle-based file nor a known weight format ({first.error})")
    if known:  # a complete pickle that also parses as another format: report the pickle
        first.label = "pickle prefix"
        return _file_result(path, known, [first], _collect([first]),
                            ["the file is also a complete pickle (a polyglot): torch.load would unpickle it"])
    if _is_legacy_magic(first):
        first.label = LEGACY_PICKLES[0]
        pickles = [first] + scan_stream(view, mf.size, path, start=first.end, labels=LEGACY_PICKLES[1:])
        for p in pickles:
            if p.error is not None:
                raise FormatError(path, f"legacy torch file: {p.label} pickle: {p.error}")
        notes = ["legacy torch file ends before all of its pickles: truncated"] if len(pickles) < len(
            LEGACY_PICKLES) else []
        return _file_result(path, "torch-legacy", pickles, _collect(pickles), notes)
    pickles, notes, pos = [first], [], first.end
    while pos < mf.size:  # pickle.load reads only the first; what follows is reported all the same
        if len(pickles) >= DEFAULT_LIMITS.max_listed:
            notes.append(f"{mf.size - pos} bytes after pickle {len(pickles) - 1} not scanned (more than "
                         f"{DEFAULT_LIMITS.max_listed} pickles back to back)")
            break
        p = pickle_vm.scan(view, pos, path=path, label=f"pickle {len(pickles)}")
        if p.error is not None:
            if p.reasons and _executable_prefix(p):
                pickles.append(p)
            notes.append(f"{mf.size - pos} bytes after pickle {len(pickles) - 1} are not a pickle "
                         "(pickle.load reads only the first one)")
            break
        pickles.append(p)
        pos = p.end
    if len(pickles) > 1:
        notes.append(f"{len(pickles)} pickles back to back; pickle.load reads only the first")
    if any(p.persistent_ids for p in pickles):
        notes.append("persistent ids without a torch container: pickle.load would fail on them")
    return _file_result(path, "pickle", pickles, _collect(pickles), notes)


def _candidates(directory: str) -> list:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(PICKLE_EXTENSIONS + WEIGHT_EXTENSIONS):
                out.append(os.path.join(root, f))
                if len(out) > _MAX_FILES:
                    raise FormatError(directory, f"more than {_MAX_FILES} files to scan")
    return out


def _summary(path, files, notes=()) -> dict:
    is_dir = os.path.isdir(path)
    reasons = [f"{os.path.relpath(f['path'], path) if is_dir else os.path.basename(f['path'])}: {r}"
               for f in files for r in f["reasons"]][:DEFAULT_LIMITS.max_listed]
    unreadable = [f["path"] for f in files if f["verdict"] == "unreadable"]
    verdict = "unsafe" if reasons else "unreadable" if unreadable else "safe"
    notes = list(notes)
    if is_dir and not files:
        notes.append("no pickle or weight files found")
    if all(not f["pickles"] for f in files) and verdict == "safe":
        notes.append("no pickle; nothing executable")
    return {"scan_version": SCAN_VERSION, "path": path, "safe": verdict == "safe", "verdict": verdict,
            "reasons": reasons, "unreadable": unreadable, "notes": notes, "files": files}


def scan_path(path) -> dict:
    """Scan a file, or every weight/pickle file under a directory. JSON-serialisable result.

    `safe` is True only if nothing scanned is unsafe or unreadable. `verdict` is "safe",
    "unsafe" (reasons name the globals/opcodes) or "unreadable" (some file could not be
    decoded; no file unsafe). A single unreadable file raises WconvError instead.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or directory")
    if not os.path.isdir(path):
        return _summary(path, [scan_file(path)])
    files = []
    for p in _candidates(path):
        try:
            files.append(scan_file(p))
        except WconvError as e:
            files.append(_unreadable_result(p, e))
    return _summary(path, files)


def scan_report(path) -> dict:
    """scan_path's result for any input: one that cannot be scanned at all (missing,
    unreadable, too many files) is a result with verdict "unreadable" and its `error`."""
    path = os.fspath(path)
    try:
        return scan_path(path)
    except WconvError as e:
        result = _summary(path, [_unreadable_result(path, e)])
        result["error"] = str(e)
        return result


# --- text --------------------------------------------------------------------------------


def format_scan(result: dict) -> str:
    lines = [f"path:    {result['path']}"]
    verdict = result["verdict"]
    if verdict == "safe":
        lines.append("verdict: safe" + (f" ({result['notes'][-1]})" if result.get("notes") else
                                        " (only allowlisted data types: containers, numbers, tensor rebuilding)"))
    elif verdict == "unsafe":
        lines.append(f"verdict: UNSAFE - loading with pickle/torch.load(weights_only=False) could run code "
                     f"({len(result['reasons'])} reasons)")
        lines += [f"  - {r}" for r in result["reasons"]]
    else:
        lines.append(f"verdict: unreadable ({len(result['unreadable'])} files could not be decoded)")
    for f in result["files"]:
        lines.append(f"{f['path']}: {f['format']}, {f['verdict']}" + (f" ({f['error']})" if f.get("error") else ""))
        for p in f["pickles"]:
            calls = ", ".join(f"{op} {t} x{n}" for op, c in p["calls"].items() for t, n in c.items())
            lines.append(f"  {p['name']}: protocol {p['protocol']}, {p['n_opcodes']} opcodes"
                         + (f", {p['persistent_ids']} persistent ids" if p["persistent_ids"] else ""))
            if p["globals"]:
                lines.append(f"    globals: {', '.join(p['globals'])}")
            if calls:
                lines.append(f"    calls:   {calls}")
            for n in p.get("nested", []):
                lines.append(f"    nested pickle ({n['name'].rsplit(' > ', 1)[-1]}): globals: "
                             f"{', '.join(n['globals']) or '(none)'}")
        for note in f.get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)

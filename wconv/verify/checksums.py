"""Checksum lists (`md5sum` / `sha256sum` output, Meta's checklist.chk) verified with hashlib.

Meta's download script checks its downloads with `md5sum -c checklist.chk`, which macOS
does not have; this does the same natively. Lines are GNU style (`DIGEST  NAME`, `DIGEST
*NAME`, a leading backslash for escaped names) or BSD style (`SHA256 (NAME) = DIGEST`); the
algorithm of each line follows from its digest's length (md5, sha1, sha224, sha256, sha384,
sha512). Files are read in large pieces and hashed two at a time (hashlib releases the GIL
for large buffers, so both cores hash). A weight file that is an HTML or XML page - what a
download saves when its link expired or needed a login - is named as such.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass

from ..errors import FormatError, UsageError
from ..parallel import default_workers, ordered_map
from ..progress import progress

READ_PIECE = 8 << 20  # bytes per read (hashlib then runs without the GIL on each piece)
MAX_LIST_BYTES = 16 << 20
DIGEST_LENGTHS = {32: "md5", 40: "sha1", 56: "sha224", 64: "sha256", 96: "sha384", 128: "sha512"}
DIGEST_LENGTHS_INV = {v: k for k, v in DIGEST_LENGTHS.items()}
_BSD = re.compile(r"^(MD5|SHA1|SHA224|SHA256|SHA384|SHA512) \((.*)\) ?= ?([0-9a-fA-F]+)$")
_GNU = re.compile(r"^([0-9a-fA-F]+) [ *]?(.+)$")


@dataclass
class Entry:
    name: str  # path relative to the list's directory, '/'-separated
    digest: str  # lower-case hex
    algorithm: str  # hashlib name
    line: int


def page_kind(head: bytes) -> str | None:
    """'an HTML page' / 'an XML error page' when the first bytes of a file are one, else None."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return "an HTML page"
    if text.startswith(b"<?xml") and b"<error" in text[:512] or text.startswith(b"<error"):
        return "an XML error page"
    return None


def failed_download(path, head: bytes) -> str | None:
    """A one-line explanation when `head` (a file's first bytes) is a saved web page."""
    kind = page_kind(head)
    if kind is None:
        return None
    code = re.search(rb"<code>([^<]{1,64})</code>", head, re.IGNORECASE)
    why = f" ({code.group(1).decode('utf-8', 'replace')})" if code else ""
    return (f"is {kind}{why}, not model data: a failed download (expired link or missing access?); "
            "download it again")


def read_head(path, n: int = 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _unescape(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", "r": "\r"}.get(m.group(1), m.group(0)), name)


def _relative(list_path, lineno: int, name: str) -> str:
    clean = name.replace("\\", "/") if os.sep == "\\" else name
    if clean.startswith("./"):
        clean = clean[2:]
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if not parts or clean.startswith("/") or ".." in parts or (len(clean) > 1 and clean[1] == ":"):
        raise FormatError(list_path, f"line {lineno} names {name!r}, which is not a path inside the directory")
    return "/".join(parts)


def parse_list(path) -> list[Entry]:
    """The entries of a checksum list file; malformed lines are FormatErrors naming the line."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_LIST_BYTES:
            raise FormatError(path, f"{size} bytes is too large for a checksum list")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(path, f"cannot read checksum list: {e.strerror or e}") from None
    page = failed_download(path, data[:1024])
    if page:
        raise FormatError(path, page.replace("not model data", "not a checksum list"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "is not a text checksum list (not UTF-8)") from None
    entries, seen = [], {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        m = _BSD.match(body)
        if m:
            algo, name, digest = m.group(1).lower(), m.group(2), m.group(3)
            if DIGEST_LENGTHS.get(len(digest)) != algo:
                raise FormatError(path, f"line {lineno}: a {algo} digest has {DIGEST_LENGTHS_INV[algo]} hex "
                                        f"digits, this one {len(digest)}")
        else:
            m = _GNU.match(body)
            if not m:
                raise FormatError(path, f"line {lineno} is not a checksum line ('DIGEST  NAME'): {line[:60]!r}")
            digest, name = m.group(1), m.group(2)
            algo = DIGEST_LENGTHS.get(len(digest))
            if algo is None:
                raise FormatError(path, f"line {lineno}: a {len(digest)}-digit digest is not md5, sha1 or sha2")
        if escaped:
            name = _unescape(name)
        rel = _relative(path, lineno, name)
        digest = digest.lower()
        if rel in seen:
            if seen[rel].digest != digest:
                raise FormatError(path, f"line {lineno} lists {rel} again with another digest "
                                        f"(first on line {seen[rel].line})")
            continue
        seen[rel] = Entry(rel, digest, algo, lineno)
        entries.append(seen[rel])
    if not entries:
        raise FormatError(path, "has no checksum lines")
    return entries


def hash_file(path, algorithm: str, on_bytes=None) -> str:
    """Hex digest of a file read in READ_PIECE pieces; on_bytes(n) is called after each."""
    h = hashlib.new(algorithm)
    buf = bytearray(READ_PIECE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def _extra_files(directory: str, listed: set, skip: set) -> list:
    extra = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel not in listed and os.path.abspath(full) not in skip:
                extra.append(rel)
    return extra


def verify_checksums(directory, list_path, *, quiet: bool = True, workers: int | None = None,
                     only=None) -> dict:
    """Check every file a checksum list names (relative to `directory`); report missing,
    mismatching, HTML and extra files. The result's "ok" is False on any problem.
    `only`: check just these listed names (and do not look for unlisted files)."""
    directory, list_path = os.fspath(directory), os.fspath(list_path)
    if not os.path.isdir(directory):
        raise UsageError(directory, "not a directory")
    entries = parse_list(list_path)
    if only is not None:
        entries = [e for e in entries if e.name in set(only)]
    started = time.monotonic()
    sizes = {}
    for e in entries:
        full = os.path.join(directory, e.name)
        if os.path.isfile(full):
            sizes[e.name] = os.path.getsize(full)
    lock, stop = threading.Lock(), threading.Event()

    with progress(sum(sizes.values()), "verifying checksums", quiet=quiet) as bar:
        def update(n):
            if stop.is_set():  # Ctrl-C: do not finish hashing a 16 GB file first
                raise KeyboardInterrupt
            with lock:
                bar.update(n)

        def check(e: Entry) -> dict:
            full = os.path.join(directory, e.name)
            row = {"name": e.name, "algorithm": e.algorithm, "expected": e.digest, "actual": None,
                   "size": sizes.get(e.name), "status": "ok", "detail": None}
            if e.name not in sizes:
                row.update(status="missing", detail="is listed but missing" if not os.path.exists(full)
                           else "is listed but is not a regular file")
                return row
            try:
                head = read_head(full)
                row["actual"] = hash_file(full, e.algorithm, update)
            except OSError as err:
                row.update(status="unreadable", detail=f"cannot be read: {err.strerror or err}")
                return row
            if row["actual"] != e.digest:
                page = failed_download(full, head)
                row.update(status="html" if page else "mismatch",
                           detail=page or f"{e.algorithm} is {row['actual']}, the list says {e.digest}")
            return row

        # Two files at a time (one per core); each file's result is small, so keep few pending.
        rows = list(ordered_map(check, entries, workers=workers or default_workers(), cancel=stop))
    extra = [] if only is not None else _extra_files(directory, {e.name for e in entries},
                                                      {os.path.abspath(list_path)})
    seconds = time.monotonic() - started
    hashed = sum(r["size"] or 0 for r in rows if r["actual"] is not None)
    problems = [r for r in rows if r["status"] != "ok"]
    return {
        "kind": "checksums", "path": directory, "list": list_path,
        "algorithms": sorted({e.algorithm for e in entries}),
        "ok": not problems and not extra,
        "files": rows, "extra": extra,
        "n_files": len(rows), "n_ok": len(rows) - len(problems), "n_problems": len(problems) + len(extra),
        "bytes_hashed": hashed, "seconds": round(seconds, 3),
        "mb_per_s": round(hashed / 1e6 / seconds, 1) if seconds > 0 and hashed else None,
    }

"""Zip archives as torch.save writes them, read with our own parser.

torch's writer sets the sizes in each local header to zero and puts the real ones in the
central directory (and in data descriptors), so sizes always come from the central
directory; the local header is only read, lazily, to find where a member's data starts.
Stored members are returned as zero-copy views of a map of just their bytes (see
wconv.mapped: it is unmapped when the last view is dropped, so tensor pages do not stay
resident); deflated members are decompressed with their declared size as a hard bound.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from ..errors import FormatError, UnsupportedError
from ..mapped import map_array, read_bytes

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data by more than this
_U32 = 0xFFFFFFFF


class MappedFile:
    """One file, with bounds-checked access to byte ranges (no map of the whole file).

    All reads of file contents by the torch readers go through `read` (copies, for
    headers and pickles) or `view` (zero-copy, for tensor data), which makes laziness
    testable by instrumenting these two methods. Both come from wconv.mapped: `read` is
    a plain read (a map would make each scattered local header cost up to 2 MB of
    resident pages), each `view` maps only its own range, so tensor pages leave the
    resident set when the tensor is dropped.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.size = os.path.getsize(self.path)
        except OSError as e:
            raise FormatError(self.path, f"cannot read: {e.strerror or e}") from None
        if self.size == 0:
            raise FormatError(self.path, "file is empty")
        self._tail = None  # (offset, bytes) last read by rfind

    def check_range(self, offset: int, n: int, what: str):
        if offset < 0 or n < 0 or offset + n > self.size:
            raise FormatError(self.path, f"{what} (bytes {offset}..{offset + n}) lies beyond the end of the "
                                         f"{self.size}-byte file: truncated or corrupt")

    def read(self, offset: int, n: int, what: str = "data") -> bytes:
        self.check_range(offset, n, what)
        return read_bytes(self.path, offset, n, file_size=self.size, what=what)

    def view(self, offset: int, n: int, what: str = "data") -> memoryview:
        self.check_range(offset, n, what)
        return memoryview(map_array(self.path, offset, n, file_size=self.size, what=what))

    def rfind(self, needle: bytes, start: int, end: int) -> int:
        """Like bytes.rfind over [start, end) of the file (used on the last 64 KiB)."""
        start = max(0, start)
        if end - start < len(needle):
            return -1
        if self._tail is None or not (self._tail[0] <= start and end <= self._tail[0] + len(self._tail[1])):
            self._tail = (start, read_bytes(self.path, start, end - start, file_size=self.size))
        base, buf = self._tail  # repeated searches backwards through the same tail read it once
        pos = buf.rfind(needle, start - base, end - base)
        return pos if pos < 0 else base + pos


@dataclass
class ZipMember:
    name: str
    method: int  # 0 stored, 8 deflate
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    _data_offset: int | None = None
    _name_len: int = 0  # bytes of the name in the directory (the local header must repeat it)


def _check_member_name(zf, name: str) -> None:
    # Nothing is ever extracted, but a name that climbs out of the archive or is absolute
    # has no place in a checkpoint and is what path-traversal attacks look like.
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or ".." in parts or "\0" in name or "\\" in name
            or (len(name) > 1 and name[1] == ":")):
        zf._fail(f"zip member name {name!r:.80} is not a plain relative path (path traversal?)")


class ZipArchive:
    """The central directory of a zip file; member data is located on demand."""

    def __init__(self, mf: MappedFile):
        self.mf = mf
        self.path = mf.path
        self.members: dict[str, ZipMember] = {}
        self._read_directory()

    def _fail(self, message):
        raise FormatError(self.path, message)

    def _find_eocd(self) -> int:
        # Every signature whose comment length reaches exactly the end of the file is a
        # candidate; zip readers differ in which one they pick, so more than one is refused.
        size = self.mf.size
        end = size
        found = []
        while True:
            pos = self.mf.rfind(_EOCD, size - 22 - 0xFFFF, end)
            if pos < 0:
                break
            if pos + 22 <= size:
                comment_len = struct.unpack_from("<H", self.mf.read(pos + 20, 2))[0]
                if pos + 22 + comment_len == size:
                    found.append(pos)
            end = pos  # a signature inside the comment or data: keep looking backwards
        if not found:
            self._fail("zip archive without an end-of-central-directory record: truncated or corrupt")
        if len(found) > 1:
            self._fail(f"zip archive has {len(found)} end-of-central-directory records (one hidden in the "
                       "comment?): ambiguous, refusing it")
        return found[0]

    def _read_directory(self):
        mf = self.mf
        eocd = self._find_eocd()
        (_, disk, cd_disk, _, n_entries, cd_size, cd_offset, _) = struct.unpack(
            "<4sHHHHIIH", mf.read(eocd, 22, "end of central directory"))
        if disk != 0 or cd_disk != 0:
            raise UnsupportedError(self.path, "multi-disk zip archives are not supported")
        cd_end = eocd
        if n_entries == 0xFFFF or cd_size == _U32 or cd_offset == _U32:
            n_entries, cd_size, cd_offset, cd_end = self._read_zip64_eocd(eocd)
        elif cd_offset + cd_size < eocd and eocd >= 20 and mf.read(eocd - 20, 4) == _EOCD64_LOCATOR:
            # torch (miniz) writes zip64 end records even when not needed: they must agree.
            if self._read_zip64_eocd(eocd) != (n_entries, cd_size, cd_offset, cd_offset + cd_size):
                self._fail("zip64 end record disagrees with the end-of-central-directory record: crafted archive")
            cd_end = cd_offset + cd_size
        if cd_offset + cd_size > cd_end:
            self._fail("zip central directory overlaps its end record: truncated or corrupt")
        if cd_offset + cd_size < cd_end:
            self._fail(f"{cd_end - cd_offset - cd_size} bytes between the zip central directory and its end "
                       "record: corrupt or crafted")
        if n_entries * 46 > cd_size:
            self._fail("zip central directory is smaller than its entry count")
        self.cd_offset = cd_offset
        directory = mf.read(cd_offset, cd_size, "zip central directory")
        pos = 0
        for _ in range(n_entries):
            if pos + 46 > cd_size or directory[pos:pos + 4] != _CENTRAL:
                self._fail("corrupt zip central directory entry")
            (flags, method, crc, csize, usize, nlen, elen, clen, lho) = struct.unpack_from(
                "<8xHH4xIIIHHH8xI", directory, pos)
            name_raw = directory[pos + 46:pos + 46 + nlen]
            extra = directory[pos + 46 + nlen:pos + 46 + nlen + elen]
            pos += 46 + nlen + elen + clen
            if pos > cd_size:
                self._fail("corrupt zip central directory entry")
            name = name_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
            if _U32 in (csize, usize, lho):
                usize, csize, lho = self._zip64_extra(extra, usize, csize, lho, name)
            if name in self.members:
                self._fail(f"zip archive lists member '{name}' twice")
            _check_member_name(self, name)
            if lho + 30 + nlen + csize > cd_offset:
                self._fail(f"zip member '{name}' lies beyond the start of the central directory: "
                           "truncated or corrupt")
            self.members[name] = ZipMember(name, method, flags, crc, csize, usize, lho, None, nlen)
        self._check_layout()

    def _check_layout(self):
        """Members must start at byte 0 and not overlap: otherwise readers that locate data
        differently (or an archive appended to another) could each see different contents."""
        order = sorted(self.members.values(), key=lambda m: m.header_offset)
        if order and order[0].header_offset != 0:
            self._fail(f"{order[0].header_offset} bytes before the first zip member: another archive or "
                       "crafted data in front, refusing it")
        for a, b in zip(order, order[1:]):
            if a.header_offset + 30 + a._name_len + a.compressed_size > b.header_offset:
                self._fail(f"zip members '{a.name}' and '{b.name}' overlap: crafted archive")

    def _read_zip64_eocd(self, eocd: int):
        loc = eocd - 20
        if loc < 0 or self.mf.read(loc, 4) != _EOCD64_LOCATOR:
            self._fail("zip64 archive without its end-of-central-directory locator")
        rec = struct.unpack_from("<Q", self.mf.read(loc + 8, 8))[0]
        if rec + 56 > loc or self.mf.read(rec, 4) != _EOCD64:
            self._fail("corrupt zip64 end-of-central-directory record")
        n_entries, cd_size, cd_offset = struct.unpack_from("<24xQQQ", self.mf.read(rec + 8, 48))
        if cd_offset + cd_size > rec:
            self._fail("zip64 central directory overlaps its end record")
        return n_entries, cd_size, cd_offset, rec

    def _zip64_extra(self, extra: bytes, usize, csize, lho, name):
        pos = 0
        while pos + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, pos)
            body = extra[pos + 4:pos + 4 + size]
            pos += 4 + size
            if tag != 1:
                continue
            values = []
            for i in range(len(body) // 8):
                values.append(struct.unpack_from("<Q", body, 8 * i)[0])
            it = iter(values)
            try:  # only the fields that overflowed are present, in this order
                if usize == _U32:
                    usize = next(it)
                if csize == _U32:
                    csize = next(it)
                if lho == _U32:
                    lho = next(it)
            except StopIteration:
                break
            return usize, csize, lho
        self._fail(f"zip member '{name}' needs a zip64 extra field but has none")

    # --- member data ---
    def data_offset(self, m: ZipMember) -> int:
        """Where member data starts: after the local header, whose extra field torch uses for alignment."""
        if m._data_offset is None:
            head = self.mf.read(m.header_offset, 30, f"zip member '{m.name}' header")
            if head[:4] != _LOCAL:
                self._fail(f"zip member '{m.name}' has no local header at offset {m.header_offset}")
            nlen, elen = struct.unpack_from("<HH", head, 26)
            if struct.unpack_from("<H", head, 8)[0] != m.method:
                self._fail(f"zip member '{m.name}': local header and central directory disagree on compression")
            local_name = self.mf.read(m.header_offset + 30, nlen, f"zip member '{m.name}' header")
            if local_name.decode("utf-8" if m.flags & 0x800 else "cp437", "replace") != m.name:
                self._fail(f"zip member '{m.name}': local header names a different file")
            start = m.header_offset + 30 + nlen + elen
            if start + m.compressed_size > self.cd_offset:
                self._fail(f"zip member '{m.name}' data runs into the central directory: truncated or corrupt")
            m._data_offset = start
        return m._data_offset

    def _check_method(self, m: ZipMember):
        if m.flags & 0x1:
            raise UnsupportedError(self.path, f"zip member '{m.name}' is encrypted")
        if m.method == 0:
            if m.compressed_size != m.size:
                self._fail(f"stored zip member '{m.name}' has inconsistent sizes")
        elif m.method == 8:
            if m.size > _MAX_DEFLATE_RATIO * m.compressed_size + 1024:
                self._fail(f"zip member '{m.name}' claims an impossible compression ratio")
        else:
            raise UnsupportedError(self.path, f"zip member '{m.name}' uses compression method {m.method} "
                                              "(only stored and deflate are supported)")

    def stored_offset(self, m: ZipMember) -> int | None:
        """File offset of a stored (uncompressed) member's data, None if it is compressed."""
        self._check_method(m)
        return self.data_offset(m) if m.method == 0 else None

    def view(self, m: ZipMember):
        """Member data: a zero-copy view if stored, else decompressed bytes (bounded by its size)."""
        self._check_method(m)
        start = self.data_offset(m)
        if m.method == 0:
            return self.mf.view(start, m.size, f"zip member '{m.name}'")
        raw = self.mf.view(start, m.compressed_size, f"zip member '{m.name}'")
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(raw, m.size)
            # One more byte must not be produced: the stream has to end exactly here.
            extra = d.decompress(d.unconsumed_tail, 1) if d.unconsumed_tail else b""
        except zlib.error as e:
            self._fail(f"zip member '{m.name}' is corrupt: {e}")
        if len(out) != m.size or extra:
            self._fail(f"zip member '{m.name}' does not decompress to its declared {m.size} bytes")
        return out

    def read(self, m: ZipMember, max_size: int, *, check_crc: bool = True) -> bytes:
        """A small member's bytes (pickles, version records), CRC-checked.

        A CRC of 0 is not checked: torch.save writes 0 everywhere after
        torch.serialization.set_crc32_options(False), and torch.load reads such files.
        """
        if m.size > max_size:
            raise UnsupportedError(self.path, f"zip member '{m.name}' is {m.size} bytes, larger than the "
                                              f"{max_size}-byte limit for it")
        data = bytes(self.view(m))
        if check_crc and m.crc != 0 and zlib.crc32(data) != m.crc:
            self._fail(f"zip member '{m.name}' fails its CRC check: corrupt")
        return data

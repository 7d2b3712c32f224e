"""Bounds-checked access to byte ranges of a file: zero-copy maps for tensor data,
plain reads for headers.

Every reader hands tensor data out through `map_array`: a read-only numpy array over
a memory map of just that tensor's bytes. The array keeps its map alive, so when the
writer drops the array the map is unmapped and its pages leave the process's resident
set. One map of the whole file would instead keep every page it ever touched resident
until the model is closed, and peak RSS would grow to the size of the model.

Small scattered pieces (zip local headers, storage headers) are read with `read_bytes`
rather than through a map: on current kernels touching one byte of a mapped file can
map a whole large folio (up to 2 MB) into the resident set.
"""
from __future__ import annotations

import errno
import mmap
import os
import sys

import numpy as np

from . import libc
from .errors import FormatError

# Python 3.13+ can map without keeping a duplicated file descriptor per map.
_NO_FD = {"trackfd": False} if sys.version_info >= (3, 13) else {}


# Tokenizer files are read whole; real ones are under 20 MB (a 256k-token vocab is ~5 MB).
MAX_TOKENIZER_FILE = 256 << 20


def _check_range(path: str, fileno: int, offset: int, nbytes: int, file_size, what: str) -> None:
    size = os.fstat(fileno).st_size
    if file_size is not None and size != file_size:
        raise FormatError(path, f"file changed size since it was opened ({file_size} -> {size} bytes)")
    if offset + nbytes > size:
        raise FormatError(path, f"{what} (bytes {offset}..{offset + nbytes}) lies beyond the end of the "
                                f"{size}-byte file: truncated or corrupt")


def map_array(path, offset: int, nbytes: int, dtype=np.uint8, *, file_size: int | None = None,
              what: str = "tensor data") -> np.ndarray:
    """Bytes [offset, offset + nbytes) of `path` as a read-only 1-D array of `dtype`.

    The range is checked against the file's current size (and against `file_size`, the
    size the caller saw when it parsed the headers, if given); problems are FormatErrors
    naming the file and `what`. Nothing is read until the array's elements are used.
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    if offset < 0 or nbytes < 0 or nbytes % dtype.itemsize:
        raise FormatError(path, f"{what}: bad byte range at offset {offset} ({nbytes} bytes of {dtype})")
    try:
        with open(path, "rb") as f:
            _check_range(path, f.fileno(), offset, nbytes, file_size, what)
            if nbytes == 0:
                return np.empty(0, dtype=dtype)
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(f.fileno(), nbytes + (offset - start), access=mmap.ACCESS_READ, offset=start, **_NO_FD)
    except OSError as e:
        raise FormatError(path, f"cannot map {what}: {e.strerror or e}") from None
    # frombuffer keeps `mm` as the array's base: the map lives exactly as long as some view of it.
    return np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start)


def read_array(path, offset: int, nbytes: int, dtype=np.uint8, *, file_size: int | None = None,
               what: str = "tensor data") -> np.ndarray:
    """read_bytes as a read-only 1-D array of `dtype`, checked like map_array. The writers read
    their pieces this way rather than through a map: a file truncated (or a disk failing) under a
    map kills the process with SIGBUS, while a read gives an error that names the file."""
    dtype = np.dtype(dtype)
    if nbytes % dtype.itemsize:
        raise FormatError(os.fspath(path), f"{what}: bad byte range at offset {offset} ({nbytes} bytes of {dtype})")
    return np.frombuffer(read_bytes(path, offset, nbytes, file_size=file_size, what=what), dtype=dtype)


def read_bytes(path, offset: int, nbytes: int, *, file_size: int | None = None, what: str = "data") -> bytes:
    """A copy of bytes [offset, offset + nbytes) of `path`, read without a map; checked like map_array."""
    path = os.fspath(path)
    if offset < 0 or nbytes < 0:
        raise FormatError(path, f"{what}: bad byte range at offset {offset} ({nbytes} bytes)")
    try:
        with open(path, "rb") as f:
            _check_range(path, f.fileno(), offset, nbytes, file_size, what)
            f.seek(offset)
            data = f.read(nbytes)
    except OSError as e:
        raise FormatError(path, f"cannot read {what}: {e.strerror or e}") from None
    if len(data) != nbytes:
        raise FormatError(path, f"file changed while being read ({what} at offset {offset})")
    return data


COPY_PIECE = 64 << 20  # bytes per copy_file_range/sendfile call and per fallback read


def copy_range(src, offset: int, nbytes: int, dst, *, file_size: int | None = None,
               what: str = "tensor data") -> None:
    """Append bytes [offset, offset + nbytes) of file `src` (a path) to the open binary file `dst`.

    Same-type tensor data travels this way, kernel to kernel: os.copy_file_range (which a
    filesystem may turn into a reflink), else os.sendfile, else large buffered reads. The
    bytes never enter a numpy array, so they cost no private memory. `dst`'s position moves
    past the copy; anything buffered in `dst` is flushed first. `file_size`: the size the
    caller saw when it parsed `src`'s headers; a file of another size now is refused.
    """
    src = os.fspath(src)
    dst.flush()
    out_fd = dst.fileno()
    try:
        f = open(src, "rb")
    except OSError as e:  # gone or unreadable since it was parsed: the input's fault, named as such
        raise FormatError(src, f"cannot read {what}: {e.strerror or e}") from None
    try:
        with f:
            _check_range(src, f.fileno(), offset, nbytes, file_size, what)
            in_fd, done = f.fileno(), 0
            pos = os.lseek(out_fd, 0, os.SEEK_CUR)
            for copy in (_copy_file_range, _sendfile):
                done = copy(in_fd, offset, out_fd, pos, nbytes, done)
                if done == nbytes:
                    break
            if done < nbytes:  # neither kernel path applies here (e.g. another OS)
                f.seek(offset + done)
                os.lseek(out_fd, pos + done, os.SEEK_SET)
                while done < nbytes:
                    chunk = f.read(min(COPY_PIECE, nbytes - done))
                    if not chunk:
                        raise FormatError(src, f"file shrank while copying {what}")
                    dst.write(chunk)
                    done += len(chunk)
                dst.flush()
            os.lseek(out_fd, pos + nbytes, os.SEEK_SET)
            start_writeback(dst, pos, pos + nbytes)  # outputs are fsynced before the rename: start now
    except OSError as e:
        if e.errno in (errno.EIO, errno.EACCES, errno.EPERM) and not _readable(src, offset, nbytes):
            raise FormatError(src, f"cannot read {what}: {e.strerror or e}") from None
        if e.filename is None:
            e.filename = getattr(dst, "name", None)  # a write error: the output's, for atomic's message
        raise


def _readable(path: str, offset: int, nbytes: int) -> bool:
    """Whether the first and last byte of a range can still be read (a copy error that also
    fails this is the input's; copy_file_range does not say which side failed)."""
    try:
        with open(path, "rb") as f:
            return all(f.seek(p) == p and len(f.read(1)) == 1 for p in {offset, offset + max(nbytes - 1, 0)})
    except OSError:
        return False


def _copy_file_range(in_fd, offset, out_fd, pos, nbytes, done) -> int:
    if not hasattr(os, "copy_file_range"):
        return done
    while done < nbytes:
        try:
            n = os.copy_file_range(in_fd, out_fd, min(COPY_PIECE, nbytes - done), offset + done, pos + done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY):
                return done  # not possible between these files: let the next method continue
            raise
        if n == 0:
            return done
        done += n
    return done


def _sendfile(in_fd, offset, out_fd, pos, nbytes, done) -> int:
    if not hasattr(os, "sendfile"):
        return done
    os.lseek(out_fd, pos + done, os.SEEK_SET)
    while done < nbytes:
        try:
            n = os.sendfile(out_fd, in_fd, offset + done, min(COPY_PIECE, nbytes - done))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return done
            raise
        if n == 0:
            return done
        done += n
    return done


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(f, start: int, end: int) -> None:
    """Ask the kernel to begin writing bytes [start, end) of the open file `f` to disk, now,
    without waiting (Linux sync_file_range(SYNC_FILE_RANGE_WRITE); a no-op elsewhere).

    Outputs are fsynced before they are renamed into place (wconv.atomic); started early, that
    writeback overlaps the rest of the conversion instead of all waiting at the end. Python's
    os module lacks sync_file_range, hence ctypes.
    """
    import ctypes

    sync_file_range = libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if sync_file_range is not None and end > start:
        f.flush()
        sync_file_range(f.fileno(), start, end - start, _SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored


def read_whole(path, *, max_bytes: int, what: str = "file") -> bytes:
    """All of a small file (tokenizers), refusing one larger than max_bytes before reading it."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    if size > max_bytes:
        raise FormatError(path, f"{size} bytes is too large for a {what} (limit {max_bytes})")
    return read_bytes(path, 0, size, file_size=size, what=what)

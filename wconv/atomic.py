"""Atomic outputs: write to a temporary file (or directory) beside the target, rename on success.

On any error or interruption (exceptions, KeyboardInterrupt, and SIGTERM/SIGHUP once the
CLI has turned them into KeyboardInterrupt) the temporary file is removed and an existing
target is left untouched. The target may not be one of the inputs (compared by path, by
symlink target and by inode, so hard links count too). The finished file gets the mode a
plain open() would give it (or keeps the mode of the file it replaces).

SIGKILL (and a power cut) cannot be handled: then a stale temporary file named
`.NAME.XXXXXXXX.wconv-tmp` may remain in the target's directory. It is never at the
target path itself, so a half-written output is never mistaken for a finished one.

Directory outputs (atomic_dir) work the same way with a temporary directory; with --force the
old directory is renamed aside, the new one renamed in, and only then is the old one deleted.

--force never destroys what wconv did not write: the caller says how to recognise a previous
output of the same format (`own_output(path)` returns None for "ours, replaceable" or the reason
it is not, e.g. "it holds .git, README.md"); anything else is refused before any work is done.
An empty file or directory holds nothing and may always be replaced.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading

from . import libc
from .errors import OutputError, WconvError

try:
    import resource
except ImportError:  # not on Windows
    resource = None

TMP_SUFFIX = ".wconv-tmp"
_CLEANUP_SIGNALS = {s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s}


# Temporary output -> the path the user named, while the output is being written: messages
# (warnings, errors raised inside the writer) name the user's path, never the temporary one.
_LIVE: dict = {}
_FINISHED: list = []  # outputs complete at their final paths (finished_outputs)


def user_path(path):
    """`path` with a live temporary output (or a file inside a temporary directory) replaced by
    the output path it will become; any other path unchanged."""
    if not path:
        return path
    p = os.fspath(path)
    for tmp, final in _LIVE.items():
        if p == tmp:
            return final
        if p.startswith(tmp + os.sep):
            return os.path.join(final, p[len(tmp) + 1:])
    return p


def _user_message(e: WconvError) -> None:
    """Rewrite an error raised while writing so it names the user's output, not the temporary."""
    for tmp, final in _LIVE.items():
        e.message = e.message.replace(tmp, final)
    e.path = user_path(e.path)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_target(path, *, force: bool = False, inputs=(), own_output=None) -> str:
    path = os.fspath(path)
    for src in inputs:
        if src is None or os.path.isdir(src):
            continue
        if os.path.realpath(path) == os.path.realpath(src) or (
                os.path.exists(path) and _same_file(path, src)):
            raise OutputError(path, "refusing to write over the input file")
    if os.path.isdir(path):
        raise OutputError(path, "output is a directory")
    return _check_replaceable(path, os.path.exists(path), force, own_output)


def _check_replaceable(path: str, exists: bool, force: bool, own_output=None) -> str:
    """An existing output needs --force and must be a previous output of this format;
    the output's parent directory must exist."""
    if exists and not force:
        raise OutputError(path, "output exists; pass --force to replace it")
    if exists and own_output is not None and not _empty(path):
        why = own_output(path)
        if why:
            raise OutputError(path, f"refusing to replace it with --force: {why}; wconv only replaces its own "
                                    "outputs (remove it yourself, or choose another name)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(path, f"output directory {parent} does not exist")
    return path


def _recheck(path: str, force: bool, own_output, *, is_dir: bool = False) -> bool:
    """check_target's (or check_dir_target's) verdict on `path` once more, just before the output
    is renamed there: it may have appeared, or been replaced, during the conversion. Whether
    `path` exists, as those checks count it (for a file, a dangling symlink does not)."""
    exists = os.path.lexists(path) if is_dir else os.path.exists(path)
    if exists and is_dir != os.path.isdir(path):
        raise OutputError(path, "output exists and is not a directory" if is_dir else "output is a directory")
    if exists and not force:
        raise _appeared(path)
    _check_replaceable(path, exists, force, own_output)
    return exists


def _place_file(tmp: str, path: str, replace: bool) -> None:
    """The final rename of a file output: over `path` if it may be replaced (or is a dangling
    symlink, which check_target counts as absent), else only if nothing has appeared there."""
    if replace or os.path.islink(path):
        os.replace(tmp, path)
    else:
        _rename_new(tmp, path)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _rename_new(src: str, dst: str) -> None:
    """rename(src, dst) that refuses (the OutputError of an output that appeared) instead of
    replacing a `dst` that appeared a moment ago (Linux renameat2 RENAME_NOREPLACE; elsewhere, or
    on filesystems without it, a plain rename after the existence check)."""
    import ctypes

    renameat2 = libc.function("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                              ctypes.c_uint)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = libc.errno()
        if code == errno.EEXIST:
            raise _appeared(dst)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), dst)
    if os.path.lexists(dst):
        raise _appeared(dst)
    os.rename(src, dst)


def _appeared(path: str):
    return OutputError(path, "output appeared while converting; pass --force to replace it")


def _empty(path: str) -> bool:
    try:
        if os.path.isdir(path):
            return not os.listdir(path)
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: str, default: int = 0o666) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # --force keeps the replaced file's mode
    except OSError:
        return default & ~_umask()  # mkstemp/mkdtemp make 0600/0700; give what open()/mkdir() would


@contextlib.contextmanager
def _signals_deferred(pending: list | None = None):
    """Hold Ctrl-C / SIGTERM / SIGHUP until the block is done.

    They are delivered right after it, or, given a `pending` list, recorded there for the caller
    to deliver (deliver_pending) once its output is complete. Blocking the signals in this thread
    would not do: the kernel hands a process signal to any thread that does not block it (numpy's
    BLAS threads, for one), and Python then runs the handler in the main thread wherever it is.
    So the Python handlers themselves are swapped for one that only records the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: nothing can interrupt this block
        return
    held = [] if pending is None else pending
    saved = {}
    try:  # (a signal while the handlers are swapped either way still finds them all restored)
        for signum in _CLEANUP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler in (signal.SIG_IGN, None):  # ignored (nohup), or not set from Python: left alone
                continue
            saved[signum] = handler
            signal.signal(signum, lambda n, frame: held.append(n))
        yield
    finally:
        interrupted = None
        for signum, handler in saved.items():
            for _ in range(100):  # signal.signal first runs the handlers of signals just arrived: they may raise
                try:
                    signal.signal(signum, handler)
                    break
                except BaseException as e:  # (the handler was not changed yet: try again)
                    interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted
        if pending is None:
            deliver_pending(held)


def deliver_pending(pending: list) -> None:
    """Deliver, once each, the signals a _signals_deferred block recorded."""
    todo = list(dict.fromkeys(pending))
    pending.clear()
    for signum in todo:
        signal.raise_signal(signum)


def finished_outputs() -> list:
    """The outputs renamed into place by this process since forget_finished(), in order: what an
    interruption after them has not undone."""
    return list(_FINISHED)


def forget_finished() -> None:
    _FINISHED.clear()


def _remove_now(tmp: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        else:
            os.unlink(tmp)


def _remove_quietly(tmp: str) -> None:
    # A second Ctrl-C / SIGTERM during cleanup must not leave the temporary file (or
    # directory) behind: those signals wait until it is gone.
    with _signals_deferred():
        _remove_now(tmp)


def _fsize_limit():
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _write_failure(e: OSError, tmp: str, directory: str) -> str:
    """Why a write failed, in words. numpy's tofile reports a short write without errno."""
    code = e.errno
    if code is None:
        written = e.filename if isinstance(e.filename, str) else tmp  # a file inside a temporary directory
        size = os.path.getsize(written) if os.path.isfile(written) else 0
        soft = _fsize_limit()
        if soft is not None and size >= soft:
            code = errno.EFBIG
        else:
            with contextlib.suppress(OSError):
                st = os.statvfs(directory)
                if st.f_bavail * st.f_frsize < 1 << 20:
                    code = errno.ENOSPC
    if code == errno.EFBIG:
        soft = _fsize_limit()
        return os.strerror(code) + (f" (file-size limit, ulimit -f: {soft} bytes)" if soft is not None else "")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{os.strerror(code)} in {directory}"
    return e.strerror or str(e)


def _new_temporary(path: str, directory: str, *, is_dir: bool = False) -> str:
    """A new hidden temporary file (or directory) beside `path`; failing that, an OutputError
    naming `path` (an unwritable or read-only directory, no inodes left)."""
    prefix = "." + os.path.basename(path) + "."
    try:
        if is_dir:
            return tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=directory)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=directory)
        os.close(fd)
        return tmp
    except OSError as e:
        raise OutputError(path, f"cannot create the output in {directory}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(path, *, force: bool = False, inputs=(), own_output=None):
    """Yield a temporary path beside `path`; on clean exit it is renamed to `path`.

    On any exception (including KeyboardInterrupt, and SIGTERM once the CLI has
    turned it into one) the temporary file is removed and `path` is untouched.
    """
    path = check_target(path, force=force, inputs=inputs, own_output=own_output)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _new_temporary(path, directory)
    _LIVE[tmp] = path
    pending = []  # an interruption during the rename: delivered once the output is complete
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with _signals_deferred(pending):
            _place_file(tmp, path, _recheck(path, force, own_output))
            _FINISHED.append(path)
    except BaseException as e:
        _fail(e, path, tmp, directory, pending)
    finally:
        _LIVE.pop(tmp, None)
    _fsync_dir(directory)  # make the rename itself durable
    deliver_pending(pending)


def _fail(e: BaseException, path: str, tmp: str, directory: str, pending: list | None = None):
    """Remove the temporary output and re-raise; an OSError becomes a one-line OutputError. Signals
    held during a final rename that failed (`pending`) are delivered then."""
    try:
        reason = _write_failure(e, tmp, directory) if isinstance(e, OSError) else None
        _remove_quietly(tmp)
        if isinstance(e, WconvError):
            _user_message(e)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise OutputError(path, f"write failed: {reason}; no output written") from None
        raise e
    finally:
        if pending:
            deliver_pending(pending)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_output(path, *, force: bool = False, inputs=(), own_output=None):
    """Like atomic_path, but yields an open binary file."""
    with atomic_path(path, force=force, inputs=inputs, own_output=own_output) as tmp:
        with open(tmp, "wb") as f:
            yield f


# --- directory outputs -------------------------------------------------------------------

def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it (by real path, or by identity of an ancestor)."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
        return True
    if not os.path.isdir(directory):
        return False
    p = os.path.abspath(path)
    while True:  # bind mounts and the like: compare each ancestor by inode
        if _same_file(p, directory) and os.path.exists(p):
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def check_dir_target(path, *, force: bool = False, inputs=(), own_output=None) -> str:
    """Checks for a directory output: not an input nor holding one, absent unless force."""
    path = os.fspath(path).rstrip(os.sep) or os.sep  # "out/" names the directory "out"
    for src in inputs:
        if src is not None and _inside(src, path):
            raise OutputError(path, f"refusing to write over a directory that is or contains the input {src}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(path, "output exists and is not a directory")
    return _check_replaceable(path, os.path.lexists(path), force, own_output)


def _fsync_tree(top: str) -> None:
    for root, dirs, files in os.walk(top):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _swap_in(tmp: str, path: str, directory: str, pending: list, force: bool, own_output) -> None:
    """Rename `tmp` to `path`; an existing `path` (one --force may replace) goes aside first and is
    deleted last."""
    with _signals_deferred(pending):  # an interruption between the two renames would lose both
        if not _recheck(path, force, own_output, is_dir=True):
            _rename_new(tmp, path)
            _FINISHED.append(path)
            return
        aside = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".old.", suffix=TMP_SUFFIX, dir=directory)
        os.rmdir(aside)  # reserve a unique name, then take it (path may be a symlink to a directory)
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)  # put the old output back
            raise
        _FINISHED.append(path)
        _remove_now(aside)


@contextlib.contextmanager
def atomic_dir(path, *, force: bool = False, inputs=(), own_output=None):
    """Yield a new empty temporary directory beside `path`; on clean exit it becomes `path`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and an
    existing `path` is untouched. With force, an existing `path` is replaced only on success.
    """
    path = check_dir_target(path, force=force, inputs=inputs, own_output=own_output)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _new_temporary(path, directory, is_dir=True)
    _LIVE[tmp] = path
    pending = []
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, _final_mode(path, 0o777))
        _swap_in(tmp, path, directory, pending, force, own_output)
    except BaseException as e:
        _fail(e, path, tmp, directory, pending)
    finally:
        _LIVE.pop(tmp, None)
    _fsync_dir(directory)
    deliver_pending(pending)


# --- sets of files (GGUF split sets) -------------------------------------------------------

@contextlib.contextmanager
def atomic_files(paths, *, force: bool = False, inputs=(), own_output=None):
    """Yield a temporary directory beside `paths` (all in one directory); the caller writes each
    output there under its final base name. On clean exit every file is renamed into place, on
    any exception none is: all the outputs or none (files replaced under --force go aside first
    and come back if a rename fails)."""
    paths = [check_target(p, force=force, inputs=inputs, own_output=own_output) for p in paths]
    directory = os.path.dirname(os.path.abspath(paths[0]))
    if any(os.path.dirname(os.path.abspath(p)) != directory for p in paths):
        raise OutputError(paths[0], "the files of one output must share a directory")
    tmp = _new_temporary(paths[0], directory, is_dir=True)
    pending = []
    try:
        yield tmp
        for p in paths:
            staged = os.path.join(tmp, os.path.basename(p))
            os.chmod(staged, _final_mode(p))
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
        _swap_files_in(tmp, paths, pending, force, own_output)
    except BaseException as e:
        _fail(e, paths[0], tmp, directory, pending)
    _remove_quietly(tmp)
    _fsync_dir(directory)
    deliver_pending(pending)


def _swap_files_in(tmp: str, paths: list, pending: list, force: bool, own_output) -> None:
    aside = os.path.join(tmp, ".replaced")
    os.mkdir(aside)
    moved, placed = [], []
    with _signals_deferred(pending):  # an interruption between the renames would leave half a set
        try:
            existing = [p for p in paths if _recheck(p, force, own_output)]
            for p in existing:
                os.rename(p, os.path.join(aside, os.path.basename(p)))
                moved.append(p)
            for p in paths:  # (the existing ones are aside now)
                _place_file(os.path.join(tmp, os.path.basename(p)), p, replace=False)
                placed.append(p)
            _FINISHED.extend(paths)
        except BaseException:
            for p in placed:
                _remove_now(p)
            for p in moved:
                os.rename(os.path.join(aside, os.path.basename(p)), p)
            raise


@contextlib.contextmanager
def scratch_file(beside):
    """Yield the path of a new empty temporary file in `beside`'s directory, removed afterwards
    whatever happens (an intermediate output, e.g. the single GGUF a split set is cut from)."""
    path = os.fspath(beside)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _new_temporary(path, directory)
    try:
        yield tmp
    except BaseException as e:
        _fail(e, path, tmp, directory)
    _remove_quietly(tmp)

"""Output guarantees: a conversion either produces the whole file at the target path or
leaves nothing (no partial output, no temporary file); an existing target survives any
failure; inputs are never written over (same path, symlink, hard link, a file read from an
input directory, the tokenizer) and never modified; SIGTERM/SIGINT/SIGHUP midway leave
nothing; a full disk / file-size limit gives a one-line error.
"""
from __future__ import annotations

import contextlib
import errno
import io
import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

import helpers
import hostile
from conftest import fixture_path
from helpers import WCONV, leftovers, start_and_freeze
from modelgen import llama_config, random_model
from wconv.atomic import atomic_path
from wconv.convert import save as save_mod
from wconv.convert.save import convert, save, write_tokenizer_bin
from wconv.errors import FormatError, OutputError, UsageError, WconvError
from wconv.formats import safetensors_io
from wconv.model import Tokenizer

WRITERS = [("gguf", "out.gguf", {}), ("safetensors", "out.safetensors", {}), ("llama2c", "out.bin", {"version": 0}),
           ("llama2c", "out.bin", {"version": 2}), ("ggjt", "out.ggjt", {})]
IDS = ["gguf", "safetensors", "llama2c-v0", "llama2c-v2", "ggjt"]


def snapshot(*paths) -> dict:
    """(mtime, sha256) of every file under `paths`: inputs must come out unchanged."""
    out = {}
    for p in paths:
        files = [p] if os.path.isfile(p) else sorted(glob.glob(os.path.join(p, "**", "*"), recursive=True))
        for f in files:
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    out[f] = (os.stat(f).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def _model(seed=1):
    m = random_model(llama_config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64),
                     seed=seed)
    m.tokenizer = None
    return m


def failing_model(directory):
    """A model whose tensors fail to load halfway through a write, after bytes were written.

    Records, at the moment of failure, the temporary files present and their sizes.
    """
    model = _model()
    return helpers.failing_model(model, fail_after=len(model.tensors) // 2,
                                 record=lambda: {f: os.path.getsize(os.path.join(directory, f))
                                                 for f in leftovers(directory)})


@pytest.mark.parametrize("fmt,name,opts", WRITERS, ids=IDS)
def test_writer_error_leaves_nothing(fmt, name, opts, tmp_path):
    model, state = failing_model(tmp_path)
    out = tmp_path / name
    with pytest.raises(FormatError, match="simulated"):
        save(model, out, to=fmt, quiet=True, **opts)
    assert not out.exists() and leftovers(tmp_path) == []
    # the failure really happened mid-write: a temporary file with content existed then
    assert state["seen"] and all(f.startswith(f".{name}.") and size > 0 for f, size in state["seen"].items())


@pytest.mark.parametrize("fmt,name,opts", WRITERS, ids=IDS)
def test_existing_target_untouched(fmt, name, opts, tmp_path):
    out = tmp_path / name
    save(_model(seed=2), out, to=fmt, quiet=True, **opts)  # a previous output, which --force may replace
    precious = out.read_bytes()
    os.chmod(out, 0o640)
    with pytest.raises(OutputError, match="exists; pass --force"):
        save(_model(), out, to=fmt, quiet=True, **opts)
    assert out.read_bytes() == precious
    model, _ = failing_model(tmp_path)
    with pytest.raises(FormatError):
        save(model, out, to=fmt, quiet=True, force=True, **opts)
    assert out.read_bytes() == precious and leftovers(tmp_path) == []
    save(_model(), out, to=fmt, quiet=True, force=True, **opts)  # replaced only on success
    assert out.read_bytes() != precious and leftovers(tmp_path) == []
    assert os.stat(out).st_mode & 0o777 == 0o640  # the replaced file's mode is kept


def test_new_output_gets_the_usual_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save(_model(), tmp_path / "m.gguf", quiet=True)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.gguf").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o640


def _failing_tokenizer():
    class FailingScores(list):  # the scores become unreadable after 200 tokens were written
        def __iter__(self):
            for i, v in enumerate(list.__iter__(self)):
                if i == 200:
                    raise FormatError("tok.model", "score unreadable (simulated)")
                yield v

    n = 300
    return Tokenizer(model="llama", tokens=[b"t%d" % i for i in range(n)], scores=FailingScores([0.0] * n),
                     source="tok.model")


def test_tokenizer_to_bin_error_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(save_mod, "load_tokenizer", lambda src: _failing_tokenizer())
    out = tmp_path / "tokenizer.bin"
    with pytest.raises(FormatError, match="simulated"):
        write_tokenizer_bin("tok.model", out)
    assert not out.exists() and leftovers(tmp_path) == []
    from wconv.formats import llama2c_tokenizer

    llama2c_tokenizer.write(Tokenizer(model="llama", tokens=[b"<unk>", b"<s>", b"</s>", b"a"], bos_id=1, eos_id=2),
                            out)  # a previous tokenizer.bin: replaceable
    old = out.read_bytes()
    with pytest.raises(FormatError):
        write_tokenizer_bin("tok.model", out, force=True)
    assert out.read_bytes() == old and leftovers(tmp_path) == []
    out.write_bytes(b"old notes")  # not a tokenizer.bin: --force refuses before doing anything
    with pytest.raises(OutputError, match="not a llama2.c tokenizer.bin"):
        write_tokenizer_bin("tok.model", out, force=True)
    assert out.read_bytes() == b"old notes"


def test_keyboard_interrupt_inside_atomic_path(tmp_path):
    out = tmp_path / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_message(tmp_path):
    out = tmp_path / "x.bin"
    with pytest.raises(OutputError) as e:
        with atomic_path(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == f"{out}: write failed: No space left on device in {tmp_path}; no output written"
    assert not out.exists() and leftovers(tmp_path) == []


# --- never over an input --------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(fixture_path("hf-llama-tiny"), d)
    n = 256  # a tokenizer.model beside the weights (vocab 256): attached when loading
    tok = Tokenizer(model="llama", tokens=[b"<unk>", b"<s>", b"</s>"] + [b"\xe2\x96\x81t%d" % i for i in range(n - 3)],
                    scores=[0.0] * n, token_types=[2, 3, 3] + [1] * (n - 3))
    (d / "tokenizer.model").write_bytes(hostile.sentencepiece_model(tok))
    return d


def test_refuses_to_write_over_inputs(hf_dir, tmp_path):
    st = str(hf_dir / "model.safetensors")
    before = snapshot(hf_dir)
    attempts = [
        (st, st, {"to": "safetensors"}),  # the same path
        (str(hf_dir), st, {}),  # a file read from a directory input
        (str(hf_dir), str(hf_dir / "config.json"), {"to": "gguf"}),
        (str(hf_dir), str(hf_dir / "tokenizer.model"), {"to": "gguf"}),  # the attached tokenizer
        (st, str(hf_dir / "tokenizer.model"), {"to": "gguf", "tokenizer": str(hf_dir / "tokenizer.model")}),
    ]
    os.symlink(st, tmp_path / "link.safetensors")
    attempts.append((st, str(tmp_path / "link.safetensors"), {}))  # a symlink to the input
    os.link(st, tmp_path / "hard.safetensors")
    attempts.append((st, str(tmp_path / "hard.safetensors"), {}))  # a hard link to the input
    os.symlink(hf_dir, tmp_path / "dirlink")
    attempts.append((str(tmp_path / "dirlink"), st, {}))  # the directory through a symlink
    for src, out, opts in attempts:
        with pytest.raises(OutputError, match="refusing to write over the input"):
            convert(src, out, force=True, quiet=True, **opts)
    assert snapshot(hf_dir) == before
    assert leftovers(hf_dir) == [] and leftovers(tmp_path) == []


def test_pth_to_bin_tokenizer_checked_before_writing(tmp_path):
    src = tmp_path / "meta"
    shutil.copytree(fixture_path("meta-tiny"), src)
    tok = tmp_path / "out" / "tokenizer.bin"
    tok.parent.mkdir()
    hostile_tok = Tokenizer(model="llama", tokens=[b"<unk>", b"<s>", b"</s>"] + [b"x%d" % i for i in range(253)],
                            scores=[0.0] * 256)
    from wconv.formats import llama2c_tokenizer

    llama2c_tokenizer.write(hostile_tok, tok)
    before = snapshot(src, tok)
    out = tmp_path / "out" / "model.bin"
    with pytest.raises(OutputError, match="refusing to write over the input"):
        convert(str(src), str(out), to="llama2c", tokenizer=str(tok), force=True, quiet=True)
    assert not out.exists() and snapshot(src, tok) == before  # refused before the model was written
    with pytest.raises(UsageError, match="tokenizer.bin"):
        convert(str(src), str(tok.parent / "tokenizer.bin"), to="llama2c", tokenizer=str(tok), force=True, quiet=True)


@pytest.mark.parametrize("src", ["meta-tiny", "hf-llama-tiny", "hf-llama-tiny-bin", "llama2c-ckpt.pt"])
def test_inputs_unchanged_by_conversions(src, tmp_path):
    path = fixture_path(src)
    before = snapshot(path)
    for name, opts in (("a.gguf", {"dtype": "q8_0"}), ("b.safetensors", {}), ("c.bin", {"version": 2}),
                       ("d.ggjt", {})):
        convert(path, tmp_path / name, quiet=True, **opts)
    assert snapshot(path) == before
    assert leftovers(tmp_path) == []


# --- signals, SIGKILL, file-size limits (subprocesses) -------------------------------------


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """A ~56 MB safetensors model: converting it to q4_0 takes long enough to stop midway."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    model = random_model(llama_config(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=1024,
                                      vocab_size=4000), seed=3)
    safetensors_io.write(model, path, quiet=True)
    return str(path)


def _start_and_freeze(src, out):
    """Start a conversion and SIGSTOP it once its temporary output holds > 256 KiB."""
    proc, tmp = start_and_freeze([src, out, "--dtype", "q4_0"], out, lambda tmp: os.path.getsize(tmp) > 256 << 10)
    assert not os.path.exists(out), "the target appeared before the conversion finished"
    return proc, tmp


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_midway_leaves_nothing(sig, big_input, tmp_path):
    before = snapshot(big_input)
    out = tmp_path / "out.gguf"
    proc, tmp = _start_and_freeze(big_input, out)
    proc.send_signal(getattr(signal, sig))
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), stderr  # SIGINT 130, SIGTERM 143, SIGHUP 129
    assert stderr.strip().splitlines()[-1] == "wconv: interrupted; no output written" and "Traceback" not in stderr
    assert not out.exists() and not os.path.exists(tmp) and leftovers(tmp_path) == []
    assert snapshot(big_input) == before


def test_sigkill_leaves_only_a_hidden_temporary(big_input, tmp_path):
    out = tmp_path / "out.gguf"
    proc, tmp = _start_and_freeze(big_input, out)
    proc.kill()
    proc.wait(timeout=30)
    # Nothing can clean up after SIGKILL: the stale file is hidden, never at the target path.
    assert not out.exists()
    assert leftovers(tmp_path) == [os.path.basename(tmp)] and os.path.basename(tmp).startswith(".out.gguf.")


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_file_size_limit_one_line_error_and_no_output(tmp_path):
    src = fixture_path("hf-llama-tiny")
    tok = tmp_path / "tok.model"
    tok.write_bytes(hostile.sentencepiece_model(Tokenizer(
        model="llama", tokens=[b"<unk>", b"<s>", b"</s>"] + [b"\xe2\x96\x81%04d" % i for i in range(3000)],
        scores=[0.0] * 3003, token_types=[2, 3, 3] + [1] * 3000)))
    runs = [["convert", "-q", src, "out.gguf"], ["convert", "-q", src, "out.safetensors"],
            ["convert", "-q", src, "out.bin"], ["convert", "-q", src, "out2.bin", "--version", "2"],
            ["convert", "-q", src, "out.ggjt"], ["tokenizer-to-bin", str(tok), "tokenizer.bin"]]
    procs = [(args, subprocess.Popen([WCONV, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_limit_file_size)) for args in runs]
    for args, proc in procs:
        _, stderr = proc.communicate(timeout=60)
        errors = [line for line in stderr.splitlines() if not line.startswith("wconv: warning")]
        target = args[3] if args[0] == "convert" else args[2]
        assert proc.returncode == 2 and errors == [
            f"wconv: error: {target}: write failed: File too large (file-size limit, ulimit -f: 20000 bytes); "
            "no output written"], (args, stderr)
    assert os.listdir(tmp_path) == ["tok.model"]


def test_cli_force_and_errors_are_one_line(tmp_path):
    src = fixture_path("hf-llama-tiny")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    res = subprocess.run([WCONV, "convert", "-q", src, str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.splitlines()[-1] == (
        f"wconv: error: {out}: output exists; pass --force to replace it")
    assert out.read_bytes() == b"keep"
    res = subprocess.run([WCONV, "convert", "-q", src, str(out), "--force"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith(
        f"wconv: error: {out}: refusing to replace it with --force: it is not a gguf file")
    assert out.read_bytes() == b"keep"
    out.unlink()
    subprocess.run([WCONV, "convert", "-q", fixture_path("meta-tiny"), str(out)], check=True)
    res = subprocess.run([WCONV, "convert", "-q", src, str(out), "--force"], capture_output=True, text=True)
    assert res.returncode == 0 and out.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path) == []


def test_wconv_error_is_what_conversions_raise(tmp_path):
    # Reading errors inside a writer surface as the reader's WconvError, not as OutputError.
    model, _ = failing_model(tmp_path)
    with pytest.raises(WconvError) as e:
        save(model, tmp_path / "m.safetensors", quiet=True)
    assert type(e.value) is FormatError


# A signal the kernel hands to another thread (numpy's BLAS threads, here a Python thread that
# waits) still runs its Python handler in the main thread: the rename and cleanup steps that
# must not be cut short hold it by swapping the handlers, not by masking this thread.
_SIGNAL_IN_CLEANUP = r"""
import os, shutil, signal, sys, threading, time
from wconv import atomic, cli
signal.signal(signal.SIGTERM, cli._raise_interrupt)  # as the wconv command installs it
threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread that takes signals
tmp = sys.argv[1]
real_rmtree = shutil.rmtree
def rmtree_interrupted(path, *a, **k):  # a second SIGTERM halfway through the cleanup
    names = sorted(os.listdir(path))
    for n in names[:len(names) // 2]:
        os.unlink(os.path.join(path, n))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    real_rmtree(path, *a, **k)
atomic.shutil.rmtree = rmtree_interrupted
try:
    atomic._remove_quietly(tmp)
except KeyboardInterrupt as e:
    print("interrupted after the cleanup" if not os.path.exists(tmp) else "interrupted during the cleanup")
"""


def test_a_signal_during_cleanup_waits_until_the_temporary_is_gone(tmp_path):
    tmp = tmp_path / ".out.gguf.x.wconv-tmp"
    tmp.mkdir()
    for i in range(50):
        (tmp / f"f{i}").write_bytes(b"x")
    res = subprocess.run([sys.executable, "-c", _SIGNAL_IN_CLEANUP, str(tmp)], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "interrupted after the cleanup", res.stdout + res.stderr
    assert not tmp.exists()


_SIGNAL_IN_SWAP = r"""
import os, signal, sys, threading, time
from wconv import atomic, cli
threading.Thread(target=threading.Event().wait, daemon=True).start()
src, out = sys.argv[1], sys.argv[2]
real_rename = os.rename
def rename_then_signal(a, b):  # SIGTERM just after the old output went aside
    real_rename(a, b)
    if a == out:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
atomic.os.rename = rename_then_signal
sys.argv = ["wconv", "convert", src, out, "--to", "hf", "--force", "--quiet"]
cli.main()
"""


def test_a_signal_while_an_output_is_swapped_in_keeps_the_new_output(tmp_path):
    src, out = fixture_path("hf-llama-tiny"), tmp_path / "hf"
    convert(src, str(out), to="hf", quiet=True)
    (out / "config.json").write_text((out / "config.json").read_text().replace("{", '{"old": 1, ', 1))
    res = subprocess.run([sys.executable, "-c", _SIGNAL_IN_SWAP, src, str(out)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 143, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"wconv: interrupted after writing {out}", res.stderr
    assert '"old"' not in (out / "config.json").read_text()  # the new output, whole, at OUT
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # and neither the old one nor a temporary beside it


def _during_conversion(monkeypatch, make):
    """Run `make()` once, late in the conversion: just before the output is made durable."""
    from wconv import atomic

    real_tree, real_fsync, done = atomic._fsync_tree, os.fsync, []

    def once():
        if not done:
            done.append(make())
    monkeypatch.setattr(atomic, "_fsync_tree", lambda top: (once(), real_tree(top)))
    monkeypatch.setattr(os, "fsync", lambda fd: (once(), real_fsync(fd)))


@pytest.mark.parametrize("to, name", [(None, "out.gguf"), ("hf", "hf-out")])
def test_an_output_that_appears_during_the_conversion_is_not_replaced(to, name, tmp_path, monkeypatch):
    """OUT was absent when the conversion started and someone made it meanwhile: without --force it
    is kept as it is, and the conversion fails saying so."""
    out = tmp_path / name

    def make():
        if to == "hf":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        else:
            out.write_bytes(b"mine")
    _during_conversion(monkeypatch, make)
    with pytest.raises(OutputError, match="output appeared while converting; pass --force"), \
            contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(out), to=to, quiet=True)
    assert (out / "notes.txt").read_text() == "mine" if to == "hf" else out.read_bytes() == b"mine"
    assert leftovers(tmp_path) == []


def test_force_rechecks_what_it_replaces_just_before_replacing_it(tmp_path, monkeypatch):
    """--force replaces a previous output; if it was swapped for something wconv did not write while
    the conversion ran, that is refused as it would have been at the start."""
    out = tmp_path / "hf-out"
    with contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(out), to="hf", quiet=True)

    def swap_for_foreign():
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    _during_conversion(monkeypatch, swap_for_foreign)
    with pytest.raises(OutputError, match="refusing to replace it with --force"), \
            contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(out), to="hf", force=True, quiet=True)
    assert os.listdir(out) == ["notes.txt"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("to, name", [(None, "out.gguf"), ("hf", "hf-out"), (None, "split.gguf")])
def test_an_output_directory_that_takes_no_new_file_is_a_one_line_error(to, name, tmp_path, monkeypatch):
    """A read-only or full directory fails where the temporary output is created: an OutputError
    naming the user's OUT (not the temporary, not an internal error)."""
    from wconv import atomic

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    out = tmp_path / name
    options = {"split_max_tensors": 4} if name == "split.gguf" else {}
    with pytest.raises(OutputError) as e, contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(out), to=to, quiet=True, **options)
    named = str(out) if name != "split.gguf" else str(tmp_path / "split-00001-of-")  # (a set: its first part)
    assert str(e.value).startswith(named) and str(e.value).endswith(
        f": cannot create the output in {tmp_path}: Read-only file system"), str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_source_removed_during_the_conversion_is_named(tmp_path, monkeypatch):
    """The input vanishing between its headers being read and its tensors being copied is the
    input's error, not an internal one nor the output's."""
    from wconv import stream

    src = tmp_path / "m.gguf"
    with contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(src), dtype="f32", quiet=True)
    real_copy = stream.copy_range

    def copy_after_removal(path, *a, **k):
        if os.path.exists(src):
            os.unlink(src)
        return real_copy(path, *a, **k)
    monkeypatch.setattr(stream, "copy_range", copy_after_removal)
    with pytest.raises(FormatError, match=r"cannot read tensor .*: No such file or directory") as e, \
            contextlib.redirect_stderr(io.StringIO()):
        convert(str(src), str(tmp_path / "out.gguf"), quiet=True)
    assert e.value.path == str(src) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_dangling_symlink_at_out_is_replaced_as_before(force, tmp_path):
    """check_target counts a dangling symlink at OUT as absent; the check just before the rename
    counts it the same way (it is replaced, not taken for an output that appeared)."""
    out = tmp_path / "out.gguf"
    out.symlink_to(tmp_path / "nowhere")
    with contextlib.redirect_stderr(io.StringIO()):
        convert(fixture_path("hf-llama-tiny"), str(out), force=force, quiet=True)
    assert out.is_file() and not out.is_symlink() and leftovers(tmp_path) == []


class _Held(BaseException):
    pass


def test_handlers_come_back_whenever_a_signal_lands_while_they_are_swapped(monkeypatch):
    """A handler that runs inside signal.signal (a signal that arrived just then) raises there:
    every handler the block swapped is still put back, and the interruption goes on."""
    from wconv import atomic

    before = {s: signal.getsignal(s) for s in atomic._CLEANUP_SIGNALS}
    real_signal = signal.signal
    for fail_at in range(1, 2 * len(before) + 1):
        calls = []

        def flaky(signum, handler, fail_at=fail_at):
            calls.append(signum)
            if len(calls) == fail_at:
                raise _Held()
            return real_signal(signum, handler)
        monkeypatch.setattr(signal, "signal", flaky)
        with pytest.raises(_Held):
            with atomic._signals_deferred():
                pass
        monkeypatch.setattr(signal, "signal", real_signal)
        assert {s: signal.getsignal(s) for s in before} == before, fail_at


def test_a_signal_held_during_a_failed_rename_is_delivered(tmp_path, monkeypatch):
    from wconv import atomic

    def hold(signum, frame):
        raise _Held()
    old = signal.signal(signal.SIGHUP, hold)
    try:
        def rename_refused(tmp, path, replace):
            os.kill(os.getpid(), signal.SIGHUP)  # held: the rename must not be cut short
            raise OutputError(path, "output appeared while converting; pass --force to replace it")
        monkeypatch.setattr(atomic, "_place_file", rename_refused)
        with pytest.raises(_Held):
            with atomic.atomic_output(tmp_path / "out.bin") as f:
                f.write(b"x")
    finally:
        signal.signal(signal.SIGHUP, old)
    assert os.listdir(tmp_path) == []

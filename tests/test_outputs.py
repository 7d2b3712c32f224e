"""Output guarantees: a conversion either produces the whole file at the target path or
leaves nothing (no partial output, no temporary file); an existing target survives any
failure; inputs are never written over (same path, symlink, hard link, a file read from an
input directory, the tokenizer) and never modified; SIGTERM/SIGINT/SIGHUP midway leave
nothing; a full disk / file-size limit gives a one-line error.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess

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

"""Property-based fuzzing of every reader through the public API.

For any input - random bytes behind a format's magic, or a small valid file of the format
mutated by bit flips, byte writes, interesting integers written over header fields,
truncations, range deletions/duplications and splices with other formats - opening,
inspecting, scanning and READING every tensor (lazy readers defer errors to raw()) either
succeeds or raises WconvError: never another exception, never a hang.

Budget: about a hundred derandomized examples per reader (reproducible in CI). Deeper,
open-ended runs: fuzz/README.md.
"""
from __future__ import annotations

import contextlib
import os
import signal
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
import wconv
from wconv.convert.load import load_tokenizer
from wconv.errors import WconvError
from wconv.formats import sentencepiece
from wconv.formats.torch_file import open_torch_file, walk_tensors
from wconv.inspect.scan import scan_path

MAX_READ_BYTES = 64 << 20  # tensors larger than this are not materialised (a declared size, not data)
HANG_SECONDS = 20
# WCONV_FUZZ_EXAMPLES=N: a longer, randomised run (see fuzz/README.md); default: 100, derandomized.
EXAMPLES = int(os.environ.get("WCONV_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="WCONV_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EXTENSIONS = {"gguf": ".gguf", "safetensors": ".safetensors", "llama2c_v0": ".bin", "llama2c_v1": ".bin",
              "llama2c_v2": ".bin", "ggjt": ".ggjt", "tokenizer": ".bin", "sentencepiece": ".model",
              "torch_zip": ".pt", "torch_legacy": ".pt", "torch_model_zip": ".pth", "torch_model_legacy": ".pth"}
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _seeds() -> dict:
    d = tempfile.mkdtemp(prefix="wconv-fuzz-seeds-")
    paths = hostile.write_valid_files(d)
    seeds = {k: open(p, "rb").read() for k, p in paths.items()}
    pkl, blobs = hostile.llama2c_ckpt()
    seeds["torch_model_zip"] = hostile.torch_zip(pkl, blobs)
    pkl, blobs = hostile.llama2c_ckpt(legacy=True)
    seeds["torch_model_legacy"] = hostile.torch_legacy(pkl, [(k, 4, v) for k, v in blobs.items()])
    return seeds


SEEDS = _seeds()


@contextlib.contextmanager
def _deadline(seconds):
    def fail(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _read_all(tensors):
    for t in tensors:
        if t.nbytes <= MAX_READ_BYTES:
            t.raw()
            if not t.dtype.name.startswith("C"):  # complex tensors have no float32 form
                t.float32()


def exercise(path: str, kind: str) -> list:
    """Every public way of opening `path`; returns the outcome of each (only WconvError may escape)."""
    outcomes = []

    def attempt(what, fn):
        try:
            with _deadline(HANG_SECONDS):
                fn()
            outcomes.append((what, "ok"))
        except WconvError as e:
            assert "\n" not in str(e), (what, str(e))
            outcomes.append((what, type(e).__name__))

    if kind in ("tokenizer", "sentencepiece"):
        attempt("tokenizer", lambda: load_tokenizer(path))
        if kind == "sentencepiece":
            attempt("sentencepiece", lambda: sentencepiece.read(path))
    else:
        attempt("load", lambda: _read_all(wconv.load(path).tensors.values()))
        attempt("inspect", lambda: wconv.inspect(path, allow_unknown_globals=True))
    if kind.startswith("torch"):
        attempt("torch_file", lambda: _read_all(t for _, t in walk_tensors(open_torch_file(path).root)))
    attempt("scan", lambda: scan_path(path))
    return outcomes


def mutate(data, seed: bytes) -> bytes:
    """One to four random mutations of `seed`, drawn from hypothesis' `data`."""
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        op = data.draw(st.sampled_from(["flip", "byte", "int", "truncate", "delete", "duplicate", "splice"]))
        n = len(buf)
        if n == 0:
            break
        i = data.draw(st.integers(0, n - 1), label="at")
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "int":  # an interesting integer over a 1/2/4/8-byte field
            size = data.draw(st.sampled_from([1, 2, 4, 8]))
            value = data.draw(st.sampled_from(INTERESTING)) & ((1 << (8 * size)) - 1)
            if i + size <= n:
                buf[i:i + size] = value.to_bytes(size, "little")
        elif op == "truncate":
            del buf[i:]
        elif op == "delete":
            del buf[i:i + data.draw(st.integers(1, 64))]
        elif op == "duplicate":
            j = min(n, i + data.draw(st.integers(1, 64)))
            buf[i:i] = buf[i:j]
        else:  # splice bytes of another format's file in
            other = data.draw(st.sampled_from(sorted(SEEDS)))
            src = SEEDS[other]
            k = data.draw(st.integers(0, len(src) - 1))
            buf[i:i + data.draw(st.integers(0, 64))] = src[k:k + data.draw(st.integers(1, 256))]
    return bytes(buf)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _write(workdir, kind, content) -> str:
    path = os.path.join(workdir, "input" + EXTENSIONS[kind])
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_seeds_are_valid(workdir):
    # The mutations start from files every reader accepts (else fuzzing tests little).
    for kind, seed in SEEDS.items():
        outcomes = dict(exercise(_write(workdir, kind, seed), kind))
        if kind in ("torch_zip", "torch_legacy"):  # plain trees, not models: the container must read
            assert outcomes["torch_file"] == "ok" and outcomes["inspect"] == "ok", outcomes
        else:
            assert set(outcomes.values()) == {"ok"}, (kind, outcomes)


@pytest.mark.parametrize("kind", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_files_only_raise_wconv_errors(kind, data, workdir):
    exercise(_write(workdir, kind, mutate(data, SEEDS[kind])), kind)


MAGICS = {"gguf": b"GGUF\x03\x00\x00\x00", "ggjt": b"tjgg\x03\x00\x00\x00", "llama2c_v1": b"42ka\x01\x00\x00\x00",
          "torch_zip": b"PK\x03\x04", "torch_legacy": b"\x80\x02", "safetensors": struct.pack("<Q", 64) + b"{",
          "sentencepiece": b"\x0a", "tokenizer": b"\x10\x00\x00\x00"}


@pytest.mark.parametrize("kind", sorted(MAGICS))
@FUZZ
@given(body=st.binary(max_size=600))
def test_random_bytes_behind_a_magic(kind, body, workdir):
    exercise(_write(workdir, kind, MAGICS[kind] + body), kind)


@settings(max_examples=3 * EXAMPLES, deadline=None, derandomize="WCONV_FUZZ_EXAMPLES" not in os.environ,
          database=None)
@given(data=st.data())
def test_mutated_pickles_scan_and_load_only_raise_wconv_errors(data, workdir):
    # data.pkl mutated and re-zipped with a correct CRC (a zip with a mutated pickle fails its
    # CRC check, which would hide the interpreter and layout code from the fuzzer).
    pkl, blobs = data.draw(st.sampled_from(_pickles()))
    mutated = mutate(data, pkl)
    exercise(_write(workdir, "torch_model_zip", hostile.torch_zip(mutated, blobs)), "torch_model_zip")
    exercise(_write(workdir, "torch_legacy", mutated), "torch_legacy")  # as a bare pickle stream
    assert not os.path.exists(CANARY)


CANARY = os.path.join(tempfile.gettempdir(), "wconv-fuzz-canary-never-created")
_PICKLES = []


def _pickles():
    """(pickle, blobs): the tiny model's data.pkl, a small tree, and the small hostile payloads."""
    if not _PICKLES:
        _PICKLES.extend([hostile.llama2c_ckpt(), hostile.small_tree()])
        _PICKLES.extend((p[1], {}) for p in hostile.payloads(CANARY) if len(p[1]) < 4096)
    return _PICKLES

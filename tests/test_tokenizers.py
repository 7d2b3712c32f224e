"""sentencepiece tokenizer.model reader and llama2.c tokenizer.bin reader/writer.

Checked against: llama2.c's own tokenizer.bin (byte-identical output), llama.cpp's
own GGUF conversion of the same vocabulary, and the sentencepiece library on
freshly trained models (when it is installed).
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
import struct

import pytest
from click.testing import CliRunner

from conftest import REALDATA, realdata_path
from wconv.cli import main as cli
from wconv.convert.load import load_tokenizer
from wconv.errors import FormatError, UnsupportedError
from wconv.formats import llama2c_tokenizer, sentencepiece
from wconv.model import Tokenizer

real = realdata_path


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ real files

def test_tokenizer_bin_byte_identical_to_llama2c(tmp_path):
    tok = sentencepiece.read(real("llama2c", "tokenizer.model"))
    out = tmp_path / "tokenizer.bin"
    llama2c_tokenizer.write(tok, out)
    assert _bytes(out) == _bytes(real("llama2c", "tokenizer.bin"))


def test_cli_tokenizer_to_bin(tmp_path):
    out = tmp_path / "tok.bin"
    res = CliRunner().invoke(cli, ["tokenizer-to-bin", real("llama2c", "tokenizer.model"), str(out)])
    assert res.exit_code == 0, res.output
    assert _bytes(out) == _bytes(real("llama2c", "tokenizer.bin"))


def test_sentencepiece_matches_llama_cpp_gguf_vocab():
    gguf = pytest.importorskip("gguf")
    tok = sentencepiece.read(real("llama2c", "tokenizer.model"))
    reader = gguf.GGUFReader(real("gguf", "ggml-vocab-llama-spm.gguf"))

    def array(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    def scalar(key):
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    assert tok.tokens == [bytes(p) for p in array("tokenizer.ggml.tokens")]
    assert tok.scores == [float(p[0]) for p in array("tokenizer.ggml.scores")]
    assert tok.token_types == [int(p[0]) for p in array("tokenizer.ggml.token_type")]
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (scalar("tokenizer.ggml.bos_token_id"),
                                                    scalar("tokenizer.ggml.eos_token_id"),
                                                    scalar("tokenizer.ggml.unknown_token_id"))
    assert tok.pad_id is None and tok.model == "llama"


@pytest.mark.parametrize("name", ["tokenizer.bin", "tok1024.bin"])
def test_tokenizer_bin_read_write_round_trip(tmp_path, name):
    src = real("llama2c", name)
    tok = llama2c_tokenizer.read(src)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.tokens[1] == b"<s>" and tok.token_types[3] == 6  # <0x00>
    out = tmp_path / "again.bin"
    llama2c_tokenizer.write(tok, out)
    assert _bytes(out) == _bytes(src)


def test_tokenizer_bin_read_agrees_with_sentencepiece_read():
    a = llama2c_tokenizer.read(real("llama2c", "tokenizer.bin"))
    b = sentencepiece.read(real("llama2c", "tokenizer.model"))
    assert a.tokens == b.tokens and a.scores == b.scores and a.token_types == b.token_types


def test_load_tokenizer_dispatch():
    assert len(load_tokenizer(real("llama2c", "tokenizer.model")).tokens) == 32000
    assert len(load_tokenizer(real("llama2c", "tok1024.bin")).tokens) == 1024


# ------------------------------------------- freshly trained sentencepiece models

CORPUS = (["the quick brown fox jumps over the lazy dog %d times" % i for i in range(200)]
          + ["héllo wörld ünïcode ✓ 你好 " * 3] * 20)


def _train(**options) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, minloglevel=2, **options)
    return buf.getvalue()


@pytest.mark.parametrize("options", [
    dict(vocab_size=340, model_type="bpe", byte_fallback=True, user_defined_symbols=["<sep>", "<cls>"],
         control_symbols=["<ctl>"], pad_id=3),
    dict(vocab_size=60, model_type="unigram", bos_id=-1, eos_id=1, unk_id=2, pad_id=0),
], ids=["bpe-bytes-userdef-pad", "unigram-no-bos"])
def test_matches_sentencepiece_library(tmp_path, options):
    spm = pytest.importorskip("sentencepiece")
    proto = _train(**options)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tok = sentencepiece.read(path)
    n = sp.get_piece_size()
    assert tok.tokens == [sp.id_to_piece(i).encode("utf-8") for i in range(n)]
    assert tok.scores == [sp.get_score(i) for i in range(n)]
    user = set(options.get("user_defined_symbols", []))

    def expected_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) in user else 1

    assert tok.token_types == [expected_type(i) for i in range(n)]

    def opt(v):
        return None if v < 0 else v

    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (opt(sp.bos_id()), opt(sp.eos_id()),
                                                                opt(sp.unk_id()), opt(sp.pad_id()))
    detail = sentencepiece.read_model_proto(path)
    assert detail.model_type == options["model_type"]
    assert detail.byte_fallback == options.get("byte_fallback", False)


def test_tokenizer_bin_from_trained_model_matches_llama2c_rules(tmp_path):
    # llama2.c's rules, restated independently: BOS/EOS become "\n<s>\n" / "\n</s>\n",
    # '▁' becomes ' ', scores kept, header = longest token.
    spm = pytest.importorskip("sentencepiece")
    proto = _train(vocab_size=340, model_type="bpe", byte_fallback=True)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    (tmp_path / "t.model").write_bytes(proto)
    llama2c_tokenizer.write(sentencepiece.read(tmp_path / "t.model"), tmp_path / "t.bin")
    pieces = []
    for i in range(sp.get_piece_size()):
        t = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i))
        pieces.append((sp.get_score(i), t.replace("\u2581", " ").encode("utf-8")))
    expected = struct.pack("<I", max(len(b) for _, b in pieces))
    expected += b"".join(struct.pack("<fI", s, len(b)) + b for s, b in pieces)
    assert (tmp_path / "t.bin").read_bytes() == expected


# ------------------------------------------------- the inline piece reader

def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _odd_layouts() -> bytes:
    """A ModelProto whose pieces take each branch of the inline reader and of the general one."""
    def piece(body):
        return b"\x0a" + _varint(len(body)) + body
    text = lambda t: b"\x0a" + _varint(len(t)) + t  # noqa: E731
    score = b"\x15" + struct.pack("<f", -1.5)
    return b"".join([
        piece(text(b"<unk>") + score + b"\x18\x02"),          # sentencepiece's layout, typed
        piece(text(b"plain") + score),                        # untyped: NORMAL
        piece(text(b"x" * 130) + score),                      # text length is a 2-byte varint
        piece(text(b"y" * 200) + score + b"\x18\x06"),        # piece length is a 2-byte varint too
        piece(score + text(b"swapped")),                      # fields out of order
        piece(text(b"typed-late") + b"\x18\x03" + score),      # type before score
        piece(text(b"big-type") + score + b"\x18\x81\x00"),   # non-canonical type varint
        b"\x0a" + bytes([0x80 | 15, 0]) + text(b"long-len") + score,  # non-canonical piece length
        b"\x12\x04\x18\x02\x20\x07",                          # trainer_spec between pieces
        piece(text(b"after") + score + b"\x18\x01"),
        piece(text(b"") + score),                             # empty text (7 bytes: the minimum)
        piece(text(b"\x0a\x05" + b"z" * 1273) + score),         # length 0x83 0x0A: its 2nd byte a text tag
        _misread_length_bait(),
    ])


def _misread_length_bait() -> bytes:
    """A 1281-byte piece (length bytes 0x81 0x0A) whose bytes, were its length read as the single
    byte 0x81, would pass for a piece in sentencepiece's layout; an unknown field 15 leads it."""
    tail = b"\x0a\x05hello\x15" + struct.pack("<f", -1.0)
    filler = bytearray(1281 - 3 - len(tail))
    filler[120] = 0x15
    body = b"\x7a" + _varint(len(filler)) + bytes(filler) + tail
    assert len(body) == 1281 and _varint(len(body)) == b"\x81\x0a"
    return b"\x0a" + _varint(len(body)) + body


def _outcome(buf, fast):
    try:
        m = sentencepiece.parse_model_proto(buf, fast=fast)
    except sentencepiece._Malformed as e:
        return "error", str(e)
    # scores by their bits: a NaN score must compare equal to itself
    return dataclasses.replace(m, scores=[struct.pack("<f", x) for x in m.scores])


def test_inline_piece_reader_agrees_with_the_field_parser():
    """The inline reader (fast=True) gives what the general protobuf parser gives, on sentencepiece's
    own layout, on every other layout it hands back, and on thousands of corrupted files: the same
    pieces, or the same error."""
    seeds = [_odd_layouts()]
    for parts in (("llama2c", "tokenizer.model"), ("tokenizers", "mistral", "tokenizer.model.v1")):
        path = os.path.join(REALDATA, *parts)  # (optional: the odd layouts always run)
        if os.path.exists(path):
            seeds.append(_bytes(path))
    good = _outcome(seeds[0], True)
    assert [t for t in good.pieces[:3]] == [b"<unk>", b"plain", b"x" * 130]
    assert good.types[:4] == [2, 1, 1, 6] and good.types[5] == 3 and len(good.pieces) == 12
    assert good.pieces[-1] == b"hello"
    assert good.model_type == "bpe"
    rng = random.Random(9)
    for seed in seeds:
        assert _outcome(seed, True) == _outcome(seed, False)
        head = seed[:4000]  # corruptions near the start: the parse fails or ends there, quickly
        for _ in range(1500):
            buf = bytearray(head)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] = rng.choice((0x0A, 0x15, 0x18, 0x80, 0x00, 0x07, rng.randrange(256)))
            buf = bytes(buf[:rng.randrange(len(buf) // 2, len(buf) + 1)])
            assert _outcome(buf, True) == _outcome(buf, False), buf


# ----------------------------------------------------------------- bad inputs

def test_bad_sentencepiece_files(tmp_path):
    good = _bytes(real("llama2c", "tokenizer.model"))
    for name, data in {"truncated": good[:1000], "garbage": b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                       "empty-message": b"\x12\x00", "bad-wire": b"\x0b\x01"}.items():
        p = tmp_path / f"{name}.model"
        p.write_bytes(data)
        with pytest.raises(FormatError) as e:
            sentencepiece.read(p)
        assert str(p) in str(e.value)


def test_bad_tokenizer_bins(tmp_path):
    good = _bytes(real("llama2c", "tok1024.bin"))
    cases = {
        "short": b"\x01\x00",
        "truncated": good[:-3],
        "zero-max": struct.pack("<I", 0) + struct.pack("<fi", 0.0, 1) + b"a",
        "negative-len": struct.pack("<I", 4) + struct.pack("<fi", 0.0, -1),
        "too-long": struct.pack("<I", 2) + struct.pack("<fi", 0.0, 3) + b"abc",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(data)
        with pytest.raises(FormatError):
            llama2c_tokenizer.read(p)


def test_gpt2_vocab_refused_for_tokenizer_bin(tmp_path):
    with pytest.raises(UnsupportedError):
        llama2c_tokenizer.write(Tokenizer(model="gpt2", tokens=[b"a"]), tmp_path / "x.bin")


def test_word_and_char_models_refused(tmp_path):
    proto = _train(vocab_size=60, model_type="char")
    (tmp_path / "c.model").write_bytes(proto)
    assert sentencepiece.read_model_proto(tmp_path / "c.model").model_type == "char"
    with pytest.raises(UnsupportedError):
        sentencepiece.read(tmp_path / "c.model")


def test_fuzzed_inputs_raise_only_wconv_errors(tmp_path):
    from hypothesis import given, settings, strategies as st
    from wconv.errors import WconvError

    spm_head = _bytes(real("llama2c", "tokenizer.model"))[:3000]
    bin_head = _bytes(real("llama2c", "tok1024.bin"))[:2000]
    path = tmp_path / "fuzz"

    @settings(max_examples=150, deadline=None)
    @given(which=st.sampled_from(["spm", "bin"]), cut=st.integers(0, 1999),
           flips=st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), max_size=6))
    def check(which, cut, flips):
        data = bytearray((spm_head if which == "spm" else bin_head)[:cut])
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
        path.write_bytes(bytes(data))
        try:
            (sentencepiece.read if which == "spm" else llama2c_tokenizer.read)(path)
        except WconvError:
            pass

    check()

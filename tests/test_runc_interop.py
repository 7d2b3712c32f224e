"""Interop with llama2.c's own C programs: run.c reads our v0 .bin, runq.c our v2 .bin.

llama2.c cannot be pip-installed and this repository does not carry or build it. These tests
run only when the environment points at compiled binaries:

    WCONV_LLAMA2C_RUN=/path/to/run  WCONV_LLAMA2C_RUNQ=/path/to/runq  pytest tests/test_runc_interop.py

(build them from karpathy/llama2.c with e.g. `gcc -O3 -o run run.c -lm`). Each test writes a
model with wconv plus a tokenizer.bin whose token i prints as "[i]", runs the binary greedily
(-t 0, empty prompt = start from BOS) and reads the token ids back from its output. They are
compared with wconv.reference's greedy choice at every step, teacher-forced on the binary's
own sequence: each token the binary chose must be the reference's argmax, or within `gap` of it
(near-ties; runq.c also quantises activations to int8, which the reference does not).
"""
from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

import modelgen
import wconv
from conftest import realdata_path
from wconv import reference
from wconv.formats import llama2c, llama2c_tokenizer
from wconv.model import Tokenizer

pytestmark = pytest.mark.interop

RUN = os.environ.get("WCONV_LLAMA2C_RUN")
RUNQ = os.environ.get("WCONV_LLAMA2C_RUNQ")
BOS = 1  # run.c hard-codes BOS = 1 and stops when it samples it

needs_run = pytest.mark.skipif(not RUN, reason="set WCONV_LLAMA2C_RUN to a compiled llama2.c run binary")
needs_runq = pytest.mark.skipif(not RUNQ, reason="set WCONV_LLAMA2C_RUNQ to a compiled llama2.c runq binary")

_PIECE = re.compile(r"\[(\d+)\]|<unk>|\n</s>\n")


def id_tokenizer(vocab_size: int) -> Tokenizer:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"[{i}]".encode() for i in range(3, vocab_size)]
    return Tokenizer(model="llama", tokens=tokens, scores=[0.0] * vocab_size, bos_id=1, eos_id=2, unk_id=0)


def run_binary(binary: str, model_path, vocab_size: int, steps: int, tmp_path) -> list[int]:
    tok = tmp_path / f"ids{vocab_size}.bin"
    if not tok.exists():
        llama2c_tokenizer.write(id_tokenizer(vocab_size), str(tok))
    proc = subprocess.run([binary, str(model_path), "-z", str(tok), "-t", "0", "-n", str(steps), "-s", "1"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode()
    ids = []
    for m in _PIECE.finditer(out):
        ids.append(int(m.group(1)) if m.group(1) else (0 if m.group(0) == "<unk>" else 2))
    assert _PIECE.sub("", out).strip() == "", f"unparsed output: {out!r}"
    return ids


def check_greedy(model, generated: list[int], gap: float) -> dict:
    """Teacher-forced: every generated token is the reference argmax or within gap * scale of it."""
    assert generated, "the binary generated nothing"
    seq = [BOS] + generated
    logits = reference.forward(model, seq[:-1] if len(seq) > 1 else seq)
    scale = float(np.abs(logits).max())
    chosen = logits[np.arange(len(generated)), generated]
    shortfall = logits.max(axis=-1)[:len(generated)] - chosen
    ours = reference.generate(model, [BOS], len(generated))[1:]
    if BOS in ours:
        ours = ours[:ours.index(BOS)]
    exact = 0
    while exact < min(len(ours), len(generated)) and ours[exact] == generated[exact]:
        exact += 1
    assert shortfall.max() <= gap * scale, (
        f"binary chose a token {shortfall.max():.4g} below the reference argmax (scale {scale:.3g}); "
        f"binary {generated}, reference {ours}")
    return {"steps": len(generated), "same_prefix": exact, "max_shortfall": float(shortfall.max())}


def _random(tied: bool, **over):
    cfg = modelgen.llama_config(vocab_size=96, max_seq_len=32, tie_embeddings=tied, **over)
    return modelgen.random_model(cfg, seed=31 + tied)


@needs_run
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_run_c_reads_our_v0(tmp_path, tied):
    model = _random(tied)
    llama2c.write(model, str(tmp_path / "m.bin"), quiet=True, version=0)
    got = run_binary(RUN, tmp_path / "m.bin", 96, 31, tmp_path)
    stats = check_greedy(model, got, gap=1e-4)
    assert stats["same_prefix"] == len(got)  # fp32: the same greedy sequence
    assert len(got) >= 5


@needs_runq
@pytest.mark.parametrize("tied,hidden", [(False, 160), (True, 256)], ids=["untied-g32", "tied-g64"])
def test_runq_c_reads_our_v2(tmp_path, tied, hidden):
    model = _random(tied, hidden_dim=hidden)
    summary = llama2c.write(model, str(tmp_path / "q.bin"), quiet=True, version=2)
    assert summary["group_size"] == (32 if hidden == 160 else 64)
    got = run_binary(RUNQ, tmp_path / "q.bin", 96, 31, tmp_path)
    # Against the dequantised weights runq.c actually holds; its int8 activations add noise.
    stats = check_greedy(wconv.load(str(tmp_path / "q.bin")), got, gap=0.1)
    assert stats["same_prefix"] >= 3


def _stories(tmp_path):
    src = realdata_path("llama2c", "stories260K.bin")
    model = wconv.load(src)
    model.tokenizer = None
    return src, model


@needs_run
def test_run_c_stories260k_original_and_our_v0_agree(tmp_path):
    src, model = _stories(tmp_path)
    llama2c.write(model, str(tmp_path / "v0.bin"), quiet=True, version=0)
    original = run_binary(RUN, src, 512, 60, tmp_path)
    ours = run_binary(RUN, tmp_path / "v0.bin", 512, 60, tmp_path)
    assert ours == original and len(original) >= 20
    assert check_greedy(model, original, gap=1e-4)["same_prefix"] == len(original)


@needs_runq
def test_runq_c_stories260k_through_our_v2(tmp_path):
    src, model = _stories(tmp_path)
    llama2c.write(model, str(tmp_path / "v2.bin"), quiet=True, version=2)  # group size 4
    got = run_binary(RUNQ, tmp_path / "v2.bin", 512, 60, tmp_path)
    check_greedy(wconv.load(str(tmp_path / "v2.bin")), got, gap=0.1)


@needs_runq
def test_runq_c_out440k_original_and_requantised(tmp_path):
    src = realdata_path("llama2c", "out440k_v2_int8.bin")
    model = wconv.load(src)
    model.tokenizer = None
    llama2c.write(model, str(tmp_path / "again.bin"), quiet=True, version=2)
    original = run_binary(RUNQ, src, 1024, 60, tmp_path)
    assert run_binary(RUNQ, tmp_path / "again.bin", 1024, 60, tmp_path) == original
    check_greedy(model, original, gap=0.1)


@needs_run
def test_run_c_out440k_dequantised_to_v0(tmp_path):
    src = realdata_path("llama2c", "out440k_v2_int8.bin")
    model = wconv.load(src)
    model.tokenizer = None
    llama2c.write(model, str(tmp_path / "f.bin"), quiet=True, version=0)
    got = run_binary(RUN, tmp_path / "f.bin", 1024, 60, tmp_path)
    assert check_greedy(model, got, gap=1e-4)["same_prefix"] == len(got)

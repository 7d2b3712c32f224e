"""The vocabulary wconv writes into GGUF equals llama.cpp's own conversion of the same tokenizer.

Compared on the WRITTEN file (read back with gguf-py's GGUFReader, not our reader) against
llama.cpp's ggml-vocab-llama-spm.gguf, for both vocab sources a user may have: the
sentencepiece tokenizer.model and llama2.c's tokenizer.bin made from it.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import modelgen
from conftest import realdata_path
from wconv.formats import safetensors_io

KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id")


def vocab(path):
    import gguf

    r = gguf.GGUFReader(path)

    def arr(key):
        f = r.fields[key]
        return [bytes(f.parts[i]) if key.endswith("tokens") else float(f.parts[i][0]) for i in f.data]

    out = {k: arr(k) for k in KEYS}
    out.update({k: int(r.fields[k].parts[r.fields[k].data[0]][0]) for k in IDS})
    out["tokenizer.ggml.model"] = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    return out


@pytest.fixture(scope="module")
def reference():
    return vocab(realdata_path("gguf", "ggml-vocab-llama-spm.gguf"))


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.bin"])
def test_gguf_vocab_equals_llama_cpp_conversion(tmp_path, source, reference):
    tok = realdata_path("llama2c", source)
    # A small model with the Llama 2 vocabulary size, on disk, converted by the CLI with --tokenizer.
    m = modelgen.random_model(modelgen.llama_config(vocab_size=32000, dim=32, n_heads=4, n_kv_heads=4,
                                                    hidden_dim=64, n_layers=1), seed=3)
    src = tmp_path / "m.safetensors"
    safetensors_io.write(m, str(src), quiet=True)
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "wconv.cli", "convert", str(src), str(out), "--tokenizer", tok,
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours = vocab(str(out))
    assert ours["tokenizer.ggml.model"] == reference["tokenizer.ggml.model"] == "llama"
    for key in KEYS + IDS:
        assert ours[key] == reference[key], key
    assert np.array_equal(np.array(ours["tokenizer.ggml.scores"]), np.array(reference["tokenizer.ggml.scores"]))

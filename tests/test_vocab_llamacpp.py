"""llama.cpp tokenises text with the GGUF vocabulary wconv writes exactly as it should.

For every tokenizer kind with a real source in ../shared/realdata, llama.cpp (llama-cpp-python,
vocab_only=True, tokenize(text, add_bos=False, special=False)) must give the ids of llama.cpp's own
reference test (models/ggml-vocab-NAME.gguf.inp/.out) for every case. Kinds without a real source
of a reference vocabulary (Llama 3 / Qwen2 BPE, a Meta tiktoken file, Mistral's sentencepiece
model) are compared, on the same texts, with the source's own tokeniser: HF `tokenizers`,
`tiktoken`, `sentencepiece`. The GGUF is also read back and rewritten (a GGUF given as
--tokenizer) and must tokenise the same.

Without llama-cpp-python these tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import os

import pytest

from conftest import realdata_path
from vocabcases import TOKENIZER_FIXTURES, reference_encoder, vocab_cases, vocab_texts, write_gguf
from wconv.formats import gguf_io
from wconv.vocab import load_tokenizer

pytestmark = pytest.mark.interop


def vocab_only(llama_cpp, path):
    return llama_cpp.Llama(model_path=os.fspath(path), vocab_only=True, verbose=False)


def failures(llm, cases) -> list:
    out = []
    for text, want in cases:
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if got != want:
            out.append((text, want, got))
    return out


# (source under realdata, llama.cpp reference vocabulary whose .out it must reproduce)
REAL_SOURCES = [
    (("llama2c", "tokenizer.model"), "llama-spm"),  # Meta's Llama 2 sentencepiece model
    (("tokenizers", "llama2-hf", "tokenizer.json"), "llama-spm"),  # HF Llama 2 / TinyLlama tokenizer.json
    (("llama2c", "tokenizer.bin"), "llama-spm"),  # llama2.c's export of the same vocabulary
    (("tokenizers", "gpt2-openai", "encoder.json"), "gpt-2"),  # OpenAI's GPT-2 encoder.json + vocab.bpe
    (("gguf", "ggml-vocab-llama-spm.gguf"), "llama-spm"),  # a GGUF's vocabulary as --tokenizer
    (("gguf", "ggml-vocab-gpt-2.gguf"), "gpt-2"),
]


@pytest.mark.parametrize("parts,reference", REAL_SOURCES, ids=["/".join(p) for p, _ in REAL_SOURCES])
def test_llama_cpp_reproduces_its_reference_ids(llama_cpp, tmp_path, parts, reference):
    cases = vocab_cases(reference)
    path = write_gguf(load_tokenizer(realdata_path(*parts)), tmp_path / "ours.gguf")
    bad = failures(vocab_only(llama_cpp, path), cases)
    print(f"{'/'.join(parts)}: {len(cases) - len(bad)}/{len(cases)} of llama.cpp's {reference} cases")
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, e.g. {bad[0]}"
    # The GGUF as a tokenizer source again (GGUF -> GGUF) tokenises the same.
    again = write_gguf(gguf_io.read(path).tokenizer, tmp_path / "again.gguf")
    assert not failures(vocab_only(llama_cpp, again), cases)


# (source, reference tokeniser kind); fixtures/tokenizers/ are made by make_tokenizer_fixtures.py.
OTHER_SOURCES = [
    (("realdata", "tokenizers", "mistral", "tokenizer.model.v1"), "sentencepiece"),
    (("realdata", "tokenizers", "tiktoken", "torchtune_tiktoken_small.model"), "tiktoken"),
    (("fixture", "llama3-tiktoken", "tokenizer.model"), "tiktoken"),
    (("fixture", "llama3-bpe", "tokenizer.json"), "tokenizers"),
    (("fixture", "qwen2-bpe", "tokenizer.json"), "tokenizers"),
]


def source_path(parts):
    where, *rest = parts
    return realdata_path(*rest) if where == "realdata" else os.path.join(TOKENIZER_FIXTURES, *rest)


@pytest.mark.parametrize("parts,kind", OTHER_SOURCES, ids=["/".join(p[1:]) for p, _ in OTHER_SOURCES])
def test_llama_cpp_tokenises_like_the_source_library(llama_cpp, tmp_path, parts, kind):
    src = source_path(parts)
    encode = reference_encoder(kind, src)
    cases = [(t, encode(t)) for t in vocab_texts()]
    llm = vocab_only(llama_cpp, write_gguf(load_tokenizer(src), tmp_path / "ours.gguf"))
    bad = failures(llm, cases)
    print(f"{'/'.join(parts[1:])}: {len(cases) - len(bad)}/{len(cases)} cases as {kind}")
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, e.g. {bad[0]}"


def test_a_wrong_pre_tokenizer_name_would_be_caught(llama_cpp, tmp_path):
    # The comparison above can fail: the Llama 3 fixture under GPT-2's pre-tokenizer tokenises differently.
    src = os.path.join(TOKENIZER_FIXTURES, "llama3-bpe", "tokenizer.json")
    tok = load_tokenizer(src)
    tok.pre = "gpt-2"
    encode = reference_encoder("tokenizers", src)
    bad = failures(vocab_only(llama_cpp, write_gguf(tok, tmp_path / "wrong.gguf")),
                   [(t, encode(t)) for t in vocab_texts()])
    assert len(bad) >= 5


def test_special_tokens_and_chat_template_reach_llama_cpp(llama_cpp, tmp_path):
    src = os.path.join(TOKENIZER_FIXTURES, "llama3-bpe", "tokenizer.json")
    tok = load_tokenizer(src)
    llm = vocab_only(llama_cpp, write_gguf(tok, tmp_path / "l3.gguf"))
    ids = {t: i for i, t in enumerate(tok.tokens)}
    bos, eot = ids[b"<|begin_of_text|>"], ids[b"<|eot_id|>"]
    assert (llm.token_bos(), llm.token_eos()) == (bos, eot)  # tokenizer_config.json's eos_token
    text = b"<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    got = llm.tokenize(text, add_bos=True, special=True)
    assert got[:2] == [bos, ids[b"<|start_header_id|>"]] and got[-1] == eot
    assert eot not in llm.tokenize(text, add_bos=False, special=False)  # CONTROL: text unless asked
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), ids[b"<|eom_id|>"])
    # Qwen's added tokens: special ones CONTROL, <think> USER_DEFINED (matched in plain text too).
    qwen = load_tokenizer(os.path.join(TOKENIZER_FIXTURES, "qwen2-bpe", "tokenizer.json"))
    llm = vocab_only(llama_cpp, write_gguf(qwen, tmp_path / "q.gguf"))
    qids = {t: i for i, t in enumerate(qwen.tokens)}
    assert qids[b"<think>"] in llm.tokenize(b"a<think>b", add_bos=False, special=False)
    assert qids[b"<|im_end|>"] not in llm.tokenize(b"a<|im_end|>", add_bos=False, special=False)
    assert llm.token_eos() == qids[b"<|im_end|>"]


def test_padded_embedding_rows_load_in_llama_cpp(llama_cpp, tmp_path):
    # nanoGPT's 50304 rows for GPT-2's 50257 tokens: [PAD{id}] tokens fill the rest; text is unchanged.
    tok = load_tokenizer(realdata_path("tokenizers", "gpt2-openai", "encoder.json"))
    llm = vocab_only(llama_cpp, write_gguf(tok, tmp_path / "p.gguf", rows=50304))
    assert llm.n_vocab() == 50304
    assert not failures(llm, vocab_cases("gpt-2"))

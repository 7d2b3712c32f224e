"""Tokenizer files in and out: recognised by content, equal to llama.cpp's own vocab GGUFs, carried
into HF directories that transformers' AutoTokenizer loads and that encode like the original,
found beside a model (and announced), inspected, and refused saying what they are."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import modelgen
from conftest import realdata_path
from vocabcases import TOKENIZER_FIXTURES, reference_encoder, tiny_model, vocab_cases, vocab_texts, write_gguf
from wconv.cli import main as cli
from wconv.errors import UnsupportedError, WconvError
from wconv.formats import gguf_io, hf_tokenizer, safetensors_io
from wconv.vocab import find_tokenizer_beside, load_tokenizer, sniff

LLAMA3 = os.path.join(TOKENIZER_FIXTURES, "llama3-bpe", "tokenizer.json")
QWEN2 = os.path.join(TOKENIZER_FIXTURES, "qwen2-bpe", "tokenizer.json")
TIKTOKEN = os.path.join(TOKENIZER_FIXTURES, "llama3-tiktoken", "tokenizer.model")


def reader_vocab(path) -> dict:
    """tokenizer.ggml.* of a GGUF, raw (our header parser, itself checked against gguf-py's GGUFReader)."""
    with open(path, "rb") as f:
        h = gguf_io.parse_header(str(path), f.read())
    return {k: v for k, v in h.kv.items() if k.startswith("tokenizer.ggml.")}


# ----------------------------------------------------------------------------- equal to llama.cpp's own conversions
def test_gpt2_files_give_llama_cpp_gpt2_vocab(tmp_path):
    ours = reader_vocab(write_gguf(load_tokenizer(realdata_path("tokenizers", "gpt2-openai", "vocab.bpe")),
                                   tmp_path / "g.gguf"))
    theirs = reader_vocab(realdata_path("gguf", "ggml-vocab-gpt-2.gguf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours[key] == theirs[key], key
    assert set(ours) == set(theirs)  # nothing more, nothing less (no scores for BPE)


@pytest.mark.parametrize("source", [("llama2c", "tokenizer.model"), ("tokenizers", "llama2-hf", "tokenizer.json")])
def test_llama2_sources_give_llama_cpp_spm_vocab(tmp_path, source):
    ours = reader_vocab(write_gguf(load_tokenizer(realdata_path(*source)), tmp_path / "s.gguf"))
    theirs = reader_vocab(realdata_path("gguf", "ggml-vocab-llama-spm.gguf"))
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"]
    if source[-1] == "tokenizer.model":
        keys.append("tokenizer.ggml.scores")  # tokenizer.json has no scores: ours are rebuilt from its merges
    for key in keys:
        assert ours[key] == theirs[key], key


def test_scores_rebuilt_from_merges_keep_sentencepiece_order():
    spm = load_tokenizer(realdata_path("llama2c", "tokenizer.model"))
    hf = load_tokenizer(realdata_path("tokenizers", "llama2-hf", "tokenizer.json"))
    # Ordering normal pieces by our scores orders them as sentencepiece's scores do (ties aside).
    normal = [i for i, t in enumerate(spm.token_types) if t == 1 and spm.scores[i] > -1e8]
    assert sorted(normal, key=lambda i: -hf.scores[i])[:5000] == sorted(normal, key=lambda i: -spm.scores[i])[:5000]


def test_tiktoken_merges_rebuilt_like_hf_converter():
    # The Llama 3 fixture exists twice: HF tokenizers' own BPE files, and its tiktoken rank form.
    ours = load_tokenizer(TIKTOKEN)
    hf = json.load(open(LLAMA3, encoding="utf-8"))
    assert ours.merges == [" ".join(m) for m in hf["model"]["merges"]]
    assert ours.tokens[:len(hf["model"]["vocab"])] == [t.encode() for t, _ in
                                                       sorted(hf["model"]["vocab"].items(), key=lambda x: x[1])]
    assert ours.pre == "llama-bpe" and ours.bos_id == len(hf["model"]["vocab"])


# ----------------------------------------------------------------------------- --to hf
HF_SOURCES = [  # source, reference tokeniser
    (("realdata", "llama2c", "tokenizer.model"), ("cases", "llama-spm")),
    (("realdata", "tokenizers", "llama2-hf", "tokenizer.json"), ("cases", "llama-spm")),
    (("realdata", "tokenizers", "gpt2-openai", "encoder.json"), ("cases", "gpt-2")),
    pytest.param(("realdata", "tokenizers", "mistral", "tokenizer.model.v1"), ("sentencepiece", None),
                 marks=pytest.mark.slow),  # the same path as Llama 2's tokenizer.model
    (("realdata", "tokenizers", "tiktoken", "torchtune_tiktoken_small.model"), ("tiktoken", None)),
    (("fixture", "llama3-bpe", "tokenizer.json"), ("tokenizers", None)),
    (("fixture", "qwen2-bpe", "tokenizer.json"), ("tokenizers", None)),
]


def _path(parts):
    where, *rest = parts
    return realdata_path(*rest) if where == "realdata" else os.path.join(TOKENIZER_FIXTURES, *rest)


def _expected(parts, ref):
    kind, name = ref
    if kind == "cases":
        return vocab_cases(name)
    encode = reference_encoder(kind, _path(parts))
    return [(t, encode(t)) for t in vocab_texts()]


def _auto_encode(directory, cases):
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(os.fspath(directory))
    got = [(t, want, at.encode(t, add_special_tokens=False)) for t, want in cases]
    return [g for g in got if g[1] != g[2]], at


@pytest.mark.parametrize("parts,ref", HF_SOURCES, ids=lambda v: "/".join(v[1:]) if isinstance(v, tuple) and
                         v and v[0] in ("realdata", "fixture") else None)
def test_hf_tokenizer_files_encode_like_the_original(tmp_path, parts, ref):
    src = _path(parts)
    cases = _expected(parts, ref)
    tok = load_tokenizer(src)
    out = tmp_path / "direct"
    out.mkdir()
    hf_tokenizer.write(tok, out)
    bad, at = _auto_encode(out, cases)
    assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[0]}"
    assert at.bos_token_id == tok.bos_id and at.eos_token_id == tok.eos_id
    # GGUF -> HF: the vocabulary as llama.cpp holds it becomes a working HF tokenizer again.
    back = gguf_io.read(write_gguf(tok, tmp_path / "v.gguf")).tokenizer
    again = tmp_path / "from-gguf"
    again.mkdir()
    hf_tokenizer.write(back, again)
    bad, at = _auto_encode(again, cases)
    assert not bad, f"via GGUF: {len(bad)} of {len(cases)} differ, e.g. {bad[0]}"


def test_convert_gguf_to_hf_keeps_tokenizer_and_chat_template(tmp_path):
    tok = load_tokenizer(QWEN2)
    m = tiny_model(tok)
    gguf = tmp_path / "q.gguf"
    gguf_io.write(m, str(gguf), quiet=True)
    res = CliRunner().invoke(cli, ["convert", str(gguf), str(tmp_path / "hf"), "--to", "hf", "--quiet"])
    assert res.exit_code == 0, res.output
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    encode = reference_encoder("tokenizers", QWEN2)
    bad, at = _auto_encode(tmp_path / "hf", [(t, encode(t)) for t in vocab_texts()])
    assert not bad
    assert at.chat_template == tok.chat_template
    chat = at.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert at.convert_tokens_to_ids("<|im_end|>") == tok.eos_id


def test_convert_sentencepiece_to_hf_copies_tokenizer_model(tmp_path):
    src = realdata_path("llama2c", "tokenizer.model")
    m = tiny_model(load_tokenizer(src))
    st = tmp_path / "m.safetensors"
    safetensors_io.write(m, str(st), quiet=True)
    res = CliRunner().invoke(cli, ["convert", str(st), str(tmp_path / "hf"), "--to", "hf", "--tokenizer", src,
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    assert open(tmp_path / "hf" / "tokenizer.model", "rb").read() == open(src, "rb").read()
    bad, _ = _auto_encode(tmp_path / "hf", vocab_cases("llama-spm"))
    assert not bad


# ----------------------------------------------------------------------------- found beside, announced
def _model_dir(tmp_path, tok, name="m.safetensors"):
    d = tmp_path / "model"
    d.mkdir()
    safetensors_io.write(tiny_model(tok), str(d / name), quiet=True)
    return d


def test_tokenizer_beside_is_found_by_content_and_announced(tmp_path):
    tok = load_tokenizer(QWEN2)
    d = _model_dir(tmp_path, tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # odd names: found by what they hold
        shutil.copyfile(os.path.join(os.path.dirname(QWEN2), name), d / f"x-{name}")
    out = tmp_path / "o.gguf"
    proc = subprocess.run([sys.executable, "-m", "wconv.cli", "convert", str(d / "m.safetensors"), str(out),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    found = [line for line in proc.stderr.splitlines() if "tokenizer found beside" in line]
    assert len(found) == 1 and "x-tokenizer.json" in found[0] and "tokenizer.json" in found[0]
    back = gguf_io.read(str(out)).tokenizer
    assert back.tokens == tok.tokens and back.merges == tok.merges and back.pre == "qwen2"
    assert back.chat_template == tok.chat_template and back.eos_id == tok.eos_id


def test_meta_tiktoken_beside_consolidated_pth(tmp_path):
    # Meta's Llama 3 download: consolidated.00.pth, params.json, tokenizer.model (tiktoken) side by side.
    shutil.copytree(os.path.join(os.path.dirname(TOKENIZER_FIXTURES), "meta-tiny"), tmp_path / "meta")
    tiktoken_path = realdata_path("tokenizers", "tiktoken", "torchtune_tiktoken_small.model")
    shutil.copyfile(tiktoken_path, tmp_path / "meta" / "tokenizer.model")
    from wconv.convert.load import find_tokenizer_beside, load_model

    tok = find_tokenizer_beside(tmp_path / "meta")
    assert tok.kind == "tiktoken" and tok.pre == "llama-bpe" and tok.tokens[tok.eot_id] == b"<|eot_id|>"
    assert tok.found_beside and tok.source == str(tmp_path / "meta" / "tokenizer.model")
    # meta-tiny has 256 embedding rows, fewer than this vocabulary: load_model does not take it.
    assert load_model(tmp_path / "meta").tokenizer is None


def test_two_candidate_tokenizers_beside_are_not_guessed(tmp_path):
    d = _model_dir(tmp_path, load_tokenizer(realdata_path("llama2c", "tokenizer.model")))
    shutil.copyfile(realdata_path("llama2c", "tokenizer.model"), d / "a.model")
    shutil.copyfile(realdata_path("tokenizers", "mistral", "tokenizer.model.v1"), d / "b.model")
    from wconv.convert.load import load_model

    model = load_model(d / "m.safetensors")
    assert model.tokenizer is None
    assert any("several" in n for n in model.metadata["notes"])


# ----------------------------------------------------------------------------- inspect
INSPECTED = [  # path, kind, n_tokens, pre, chat template, special roles
    (("realdata", "llama2c", "tokenizer.model"), "sentencepiece", 32000, "default", False, {"bos", "eos", "unk"}),
    (("realdata", "llama2c", "tokenizer.bin"), "llama2c-tokenizer", 32000, "default", False, {"bos", "eos", "unk"}),
    (("realdata", "tokenizers", "llama2-hf", "tokenizer.json"), "hf-tokenizer-json", 32000, "default", False,
     {"bos", "eos", "unk"}),
    (("realdata", "tokenizers", "gpt2-openai", "encoder.json"), "gpt2-vocab-json", 50257, "gpt-2", False,
     {"bos", "eos"}),
    (("realdata", "tokenizers", "gpt2-openai", "vocab.bpe"), "bpe-merges", 50257, "gpt-2", False, {"bos", "eos"}),
    (("realdata", "tokenizers", "tiktoken", "torchtune_tiktoken_small.model"), "tiktoken", 2256, "llama-bpe", False,
     {"bos", "eos", "eot", "eom"}),
    (("fixture", "qwen2-bpe", "tokenizer.json"), "hf-tokenizer-json", None, "qwen2", True, {"eos", "pad"}),
    (("realdata", "gguf", "ggml-vocab-gpt-2.gguf"), "gguf-v3", 50257, "gpt-2", False, {"bos", "eos"}),
]


@pytest.mark.parametrize("parts,fmt,n,pre,template,roles", INSPECTED, ids=[p[-1] for p, *_ in INSPECTED])
def test_inspect_tokenizer_files(parts, fmt, n, pre, template, roles):
    path = _path(parts)
    res = CliRunner().invoke(cli, ["inspect", "--json", path])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    t = report["tokenizer"]
    assert report["format"] == fmt and report["n_tensors"] == (0 if fmt != "gguf-v3" else 0)
    assert t["n_tokens"] == (n or len(load_tokenizer(path).tokens))
    assert t["pre"] == pre and t["has_chat_template"] is template and set(t["special"]) == roles
    text = CliRunner().invoke(cli, ["inspect", path])
    assert text.exit_code == 0 and f"pre-tokenizer {pre}" in text.output
    assert ("chat template: yes" if template else "chat template: no") in text.output


# ----------------------------------------------------------------------------- refused, saying what it is
def _wrong_files(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    no_vocab = tmp_path / "model.gguf"
    gguf_io.write(m, str(no_vocab), quiet=True)
    st = tmp_path / "model.safetensors"
    safetensors_io.write(m, str(st), quiet=True)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(realdata_path("tokenizers", "gpt2-openai", "vocab.bpe"), lonely / "merges.txt")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "empty.model").write_bytes(b"")
    return {
        str(no_vocab): "is a GGUF model without a vocabulary",
        str(st): "is a safetensors file, not a tokenizer",
        os.path.join(os.path.dirname(os.path.dirname(TOKENIZER_FIXTURES)), "fixtures", "llama2c-ckpt.pt"):
            "is a torch checkpoint (zip), not a tokenizer",
        realdata_path("tokenizers", "qwen3", "tokenizer_config.json"):
            "is a Hugging Face tokenizer_config.json (settings only, no vocabulary)",
        os.path.join(TOKENIZER_FIXTURES, "llama3-bpe", "generation_config.json"): "generation_config.json",
        str(lonely / "merges.txt"): "its vocab.json / encoder.json was not found beside it",
        str(tmp_path / "junk.bin"): "not a tokenizer file wconv knows",
        str(tmp_path / "empty.model"): "is an empty file",
    }


def test_wrong_files_as_tokenizer_say_what_they_are(tmp_path):
    m = tiny_model(load_tokenizer(realdata_path("llama2c", "tokenizer.model")))
    src = tmp_path / "src.safetensors"
    safetensors_io.write(m, str(src), quiet=True)
    for path, says in _wrong_files(tmp_path).items():
        for args in (["tokenizer-to-bin", path, str(tmp_path / "t.bin")],
                     ["convert", str(src), str(tmp_path / "o.gguf"), "--tokenizer", path]):
            res = CliRunner().invoke(cli, args)
            assert res.exit_code != 0, (args, res.output)
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and says in lines[0] and path in lines[0], (args, res.output)
            assert "max_token_length" not in res.output and "Traceback" not in res.output
        assert not os.path.exists(tmp_path / "t.bin") and not os.path.exists(tmp_path / "o.gguf")


@pytest.mark.parametrize("parts,what", [
    (("realdata", "tokenizers", "tiktoken", "torchtune_tiktoken_small.model"), "is a tiktoken BPE file"),
    (("realdata", "tokenizers", "gpt2-openai", "encoder.json"), "is a GPT-2 style vocab.json"),
    (("fixture", "qwen2-bpe", "tokenizer.json"), "is a Hugging Face tokenizer.json"),
    (("realdata", "gguf", "ggml-vocab-gpt-2.gguf"), "is a GGUF file"),
])
def test_tokenizer_to_bin_refuses_byte_level_bpe(tmp_path, parts, what):
    path = _path(parts)
    res = CliRunner().invoke(cli, ["tokenizer-to-bin", path, str(tmp_path / "t.bin")])
    assert res.exit_code != 0 and what in res.output and "run.c" in res.output and path in res.output
    assert len(res.output.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "t.bin")


def test_tokenizer_to_bin_from_gguf_and_tokenizer_json(tmp_path):
    # llama.cpp's vocab GGUF holds the Llama 2 scores: llama2.c's own tokenizer.bin, byte for byte.
    out = tmp_path / "a.bin"
    res = CliRunner().invoke(cli, ["tokenizer-to-bin", realdata_path("gguf", "ggml-vocab-llama-spm.gguf"), str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == open(realdata_path("llama2c", "tokenizer.bin"), "rb").read()
    # An HF tokenizer.json of the same vocabulary: the same pieces (its scores are rebuilt, so not the bytes).
    from wconv.formats import llama2c_tokenizer

    res = CliRunner().invoke(cli, ["tokenizer-to-bin", realdata_path("tokenizers", "llama2-hf", "tokenizer.json"),
                                   str(tmp_path / "b.bin")])
    assert res.exit_code == 0, res.output
    assert (llama2c_tokenizer.read(tmp_path / "b.bin").tokens
            == llama2c_tokenizer.read(realdata_path("llama2c", "tokenizer.bin")).tokens)


# ----------------------------------------------------------------------------- pre-tokenizer table
def test_unknown_pre_tokenizer_is_refused_showing_the_pattern(tmp_path):
    tj = json.load(open(LLAMA3, encoding="utf-8"))
    pattern = r"\p{N}{1,4}|[^\s\p{L}\p{N}]+|\p{L}+|\s+"
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(UnsupportedError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and repr(pattern) in message
    assert "unknown pre-tokenizer" in message
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code != 0 and "unknown pre-tokenizer" in res.output


def test_pre_tokenizer_options_are_part_of_the_description(tmp_path):
    for change in ({"normalizer": {"type": "NFKC"}}, {"model.ignore_merges": False},
                   {"pre.add_prefix_space": True}):
        tj = json.load(open(LLAMA3, encoding="utf-8"))
        for key, value in change.items():
            if key == "model.ignore_merges":
                tj["model"]["ignore_merges"] = value
            elif key == "pre.add_prefix_space":
                tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = value
            else:
                tj[key] = value
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(tj), encoding="utf-8")
        with pytest.raises(UnsupportedError, match="unknown pre-tokenizer"):
            load_tokenizer(path)


def test_sniff_recognises_by_content_not_name(tmp_path):
    for src, kind in ((TIKTOKEN, "tiktoken"), (realdata_path("llama2c", "tokenizer.model"), "sentencepiece"),
                      (realdata_path("llama2c", "tok1024.bin"), "llama2c-tokenizer"),
                      (realdata_path("tokenizers", "gpt2-openai", "vocab.bpe"), "bpe-merges"),
                      (QWEN2, "hf-tokenizer-json")):
        renamed = tmp_path / "tokenizer.model"
        shutil.copyfile(src, renamed)
        assert sniff(renamed) == kind


def test_gpt2_pair_from_another_tokenizer_is_refused(tmp_path):
    shutil.copyfile(realdata_path("tokenizers", "gpt2-openai", "encoder.json"), tmp_path / "vocab.json")
    tj = json.load(open(QWEN2, encoding="utf-8"))
    (tmp_path / "merges.txt").write_text("\n".join(" ".join(m) for m in tj["model"]["merges"]), encoding="utf-8")
    with pytest.raises(WconvError, match="belong to different tokenizers"):
        load_tokenizer(tmp_path / "vocab.json")


def test_fuzzed_tokenizer_files_raise_only_wconv_errors(tmp_path):
    from hypothesis import given, settings, strategies as st

    heads = [open(p, "rb").read()[:3000] for p in (TIKTOKEN, QWEN2, realdata_path("tokenizers", "gpt2-openai",
                                                                                  "encoder.json"))]
    path = tmp_path / "fuzz"

    @settings(max_examples=60, deadline=None)
    @given(which=st.integers(0, 2), cut=st.integers(0, 2999),
           flips=st.lists(st.tuples(st.integers(0, 2999), st.integers(0, 255)), max_size=4))
    def check(which, cut, flips):
        data = bytearray(heads[which][:cut])
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
        path.write_bytes(bytes(data))
        try:
            load_tokenizer(path)
        except WconvError:
            pass

    check()


def test_qwen3_tokenizer_config_gives_eos_pad_and_chat_template(tmp_path):
    # The real Qwen3 tokenizer_config.json beside a Qwen2-style tokenizer.json: roles by token text.
    shutil.copyfile(QWEN2, tmp_path / "tokenizer.json")
    real = realdata_path("tokenizers", "qwen3", "tokenizer_config.json")
    shutil.copyfile(real, tmp_path / "tokenizer_config.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    config = json.load(open(real, encoding="utf-8"))
    assert tok.chat_template == config["chat_template"] and len(tok.chat_template) > 1000
    assert tok.tokens[tok.eos_id].decode() == config["eos_token"]
    assert tok.tokens[tok.pad_id].decode() == config["pad_token"]
    back = gguf_io.read(write_gguf(tok, tmp_path / "q.gguf")).tokenizer
    assert back.chat_template == config["chat_template"]


def test_llama3_generation_config_eog_ids():
    tok = load_tokenizer(LLAMA3)
    names = [tok.tokens[i] for i in tok.eog_ids]
    assert names == [b"<|end_of_text|>", b"<|eom_id|>", b"<|eot_id|>"]
    assert tok.tokens[tok.eos_id] == b"<|eot_id|>" and tok.add_bos is True



def test_pth_to_bin_refuses_a_byte_level_tokenizer_before_writing(tmp_path):
    src = os.path.join(os.path.dirname(TOKENIZER_FIXTURES), "llama2c-ckpt.pt")
    out = tmp_path / "model.bin"
    res = CliRunner().invoke(cli, ["pth-to-bin", src, str(out), "--tokenizer", TIKTOKEN])
    assert res.exit_code != 0 and "is a tiktoken BPE file" in res.output
    assert os.listdir(tmp_path) == []


def test_merges_rebuilt_from_ranks_equal_openai_vocab_bpe():
    # GPT-2's ids are its tiktoken ranks (r50k_base): rebuilding merges from them as wconv does for
    # Meta's tiktoken files must give OpenAI's own vocab.bpe, merge for merge.
    from wconv.formats import byte_level, gpt2_vocab, tiktoken_bpe

    vocab = gpt2_vocab.read_vocab_json(realdata_path("tokenizers", "gpt2-openai", "encoder.json"))
    ranks = [byte_level.decode(t) for t, i in sorted(vocab.items(), key=lambda x: x[1]) if t != "<|endoftext|>"]
    rebuilt = [f"{byte_level.encode(a)} {byte_level.encode(b)}" for a, b in tiktoken_bpe.merges_from_ranks(ranks)]
    assert rebuilt == gpt2_vocab.read_merges(realdata_path("tokenizers", "gpt2-openai", "vocab.bpe"))


def test_a_directory_load_parses_each_json_side_file_once_and_sees_changed_files(tmp_path, monkeypatch):
    """Sniffing a directory's files (for its tokenizer, then for its config files) parses a large
    tokenizer.json once per file version; a file changed in place is looked at afresh."""
    d = tmp_path / "tok"
    shutil.copytree(os.path.dirname(LLAMA3), d)
    parsed = []
    real_read_json = hf_tokenizer.read_json
    monkeypatch.setattr(hf_tokenizer, "read_json", lambda p, *a, **k: parsed.append(os.path.basename(p))
                        or real_read_json(p, *a, **k))
    tok = find_tokenizer_beside(str(d / "model.gguf"))
    assert tok is not None and tok.model == "gpt2" and tok.eos_id is not None
    sniffs = parsed.count("tokenizer.json")
    find_tokenizer_beside(str(d / "model.gguf"))
    assert parsed.count("tokenizer.json") - sniffs <= 1  # the load itself reads it again; no sniff does
    (d / "tokenizer.json").write_text(json.dumps({"bos_token": "<s>", "model_max_length": 8}).ljust(80))
    assert sniff(d / "tokenizer.json") == "hf-tokenizer-config"
    st = os.stat(d / "tokenizer.json")  # rewritten in place, same size, mtime set back (rsync -t, cp -p)
    (d / "tokenizer.json").write_text(json.dumps({"_from_model_config": True, "eos_token_id": 2}).ljust(st.st_size))
    os.utime(d / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(d / "tokenizer.json").st_size == st.st_size and sniff(d / "tokenizer.json") == "hf-generation-config"


def test_special_token_ids_are_found_as_by_decoding_every_token():
    """hf_tokenizer.token_ids looks up only the texts asked for, by their UTF-8 bytes; it gives the
    ids a decoded {text: first id} table of the whole vocabulary gives, invalid UTF-8 included."""
    from wconv.model import Tokenizer

    tokens = [b"<s>", b"a", b"\xff", b"</s>", b"<s>", "é".encode(), b"\xe9", b"\xef\xbf\xbd"]
    tok = Tokenizer(model="llama", tokens=tokens)
    table = {}
    for i, t in enumerate(tokens):
        table.setdefault(t.decode("utf-8", "replace"), i)
    for texts in (["<s>", "</s>"], ["é", "missing"], ["\ufffd"], ["\ufffd", "a", "<s>"], [], ["\ud800", "a"]):
        assert hf_tokenizer.token_ids(tok, texts) == {t: table[t] for t in texts if t in table}

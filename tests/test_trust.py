"""Trust (issue 8): every check runs before the output exists, per-tensor notes are summaries,
and whatever the output cannot hold of the source is named once at convert time."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from wconv import dtypes
import pytest

from clirun import wconv
from conftest import fixture_path, realdata_path
from modelgen import gpt2_config, llama_config, random_model
from wconv import atomic, notes
from wconv.convert import carried
from wconv.convert.save import save
from wconv.errors import WconvError
from wconv.formats import gguf_io
from wconv.model import Tokenizer
from wconv.tensor import LazyTensor


def vocab(n, **over) -> Tokenizer:
    toks = [b"<unk>", b"<s>", b"</s>"] + [b"\xe2\x96\x81t%d" % i for i in range(n - 3)]
    fields = dict(model="llama", tokens=toks, scores=[0.0] * n, token_types=[2, 3, 3] + [1] * (n - 3),
                  bos_id=1, eos_id=2, unk_id=0, kind="sentencepiece")
    fields.update(over)
    return Tokenizer(**fields)


def warnings_of(res) -> list:
    return [line for line in res.stderr.splitlines() if line.startswith("wconv: warning:")]


# ----------------------------------------------------------------------------- pre-flight
def _no_vocab_ctx():
    return random_model(llama_config(max_seq_len=0))


def _big_vocab():
    m = random_model(llama_config())
    m.tokenizer = vocab(200)  # 96 embedding rows
    return m


def _bias_llama():
    return random_model(gpt2_config())


PREFLIGHT = [  # (output name, options, model maker, words the error says)
    ("out.gguf", {}, _no_vocab_ctx, "pass --max-seq-len"),
    ("out.gguf", {}, _big_vocab, "200 tokens"),
    ("out.gguf", {"max_seq_len": 99}, lambda: random_model(gpt2_config()), "position_embd"),
    ("out.safetensors", {"dtype": "q8_0"}, lambda: random_model(llama_config()), "f32, f16 or bf16"),
    ("out.bin", {"version": 2, "group_size": 7}, lambda: random_model(llama_config()), "group size 7"),
    ("out.bin", {"version": 1, "group_size": 8}, lambda: random_model(llama_config()), "only applies to version 2"),
    ("out.bin", {}, _bias_llama, "Llama-architecture"),
    ("out.ggjt", {"dtype": "bf16"}, lambda: random_model(llama_config()), "no bf16"),
    ("out.ggjt", {}, _bias_llama, "llama models only"),
    ("out.ggjt", {}, _big_vocab, "200 tokens"),
    ("hf", {"dtype": "q8_0"}, lambda: random_model(llama_config()), "q8_0"),
    ("hf", {}, _big_vocab, "200 tokens"),
]


@pytest.mark.parametrize("name,options,make,says", PREFLIGHT,
                         ids=[f"{p[0]}-{p[3][:18]}" for p in PREFLIGHT])
def test_refused_before_any_temporary_exists(tmp_path, monkeypatch, name, options, make, says):
    def no_temporary(*a, **k):
        raise AssertionError("a temporary output was created before the checks")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", no_temporary)
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", no_temporary)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = make()  # in memory: no input path, so a writer's fallback would name the temporary file
    with pytest.raises(WconvError) as e:
        save(model, out_dir / name, to="hf" if name == "hf" else None, quiet=True, **options)
    assert says in str(e.value) and "wconv-tmp" not in str(e.value)
    assert str(out_dir) in str(e.value) or (model.tokenizer is not None and "tokens" in str(e.value))
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("out,args", [("a.safetensors", ["--dtype", "q8_0"]), ("a.ggjt", ["--dtype", "bf16"]),
                                      ("a.bin", ["--version", "2", "--group-size", "7"]),
                                      ("a.bin", ["--version", "1", "--group-size", "8"])])
def test_cli_option_errors_name_out(tmp_path, out, args):
    res = wconv("convert", fixture_path("hf-llama-tiny"), tmp_path / out, *args)
    assert res.returncode == 2
    assert str(tmp_path / out) in res.stderr and "wconv-tmp" not in res.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- summaries
def test_summarise_groups_by_kind():
    many = [notes.tensor_note("Q4_K tensors re-quantised to Q8_0", f"blk.{i}.w", "re-quantised") for i in range(61)]
    lines = notes.summarise(["no tokenizer", *many, "no tokenizer"], verbose=False)
    assert lines[0] == "no tokenizer" and len(lines) == 2
    assert lines[1].startswith("61 Q4_K tensors re-quantised to Q8_0 (blk.0.w, blk.1.w, ...;")
    lines = notes.summarise(many, verbose=True)
    assert lines[0] == "61 Q4_K tensors re-quantised to Q8_0:" and len(lines) == 62
    assert lines[5] == "  blk.4.w: re-quantised"
    assert notes.summarise(many[:1]) == ["blk.0.w: re-quantised"]  # one tensor: its own line


def _gguf(tmp_path, cfg, name="src.gguf", **options) -> str:
    path = tmp_path / name
    save(random_model(cfg), path, quiet=True, **options)
    return str(path)


def test_fallback_to_f16_is_one_line_and_verbose_lists_every_tensor(tmp_path):
    cfg = llama_config(dim=40, hidden_dim=96)  # rows of 40 elements: not whole Q8_0 blocks
    src = _gguf(tmp_path, cfg)
    fallback = [n for n, s in random_model(cfg).tensors.items() if len(s.shape) == 2 and s.shape[-1] % 32]
    assert len(fallback) > 5
    res = wconv("convert", src, tmp_path / "q.gguf", "--dtype", "q8_0")
    assert res.returncode == 0, res.stderr
    about = [w for w in warnings_of(res) if "instead of Q8_0" in w]
    assert len(about) == 1 and f"{len(fallback)} tensors written as F16 instead of Q8_0" in about[0]
    assert "wconv-tmp" not in res.stderr
    res = wconv("convert", src, tmp_path / "v.gguf", "--dtype", "q8_0", "--verbose")
    listed = [w for w in warnings_of(res) if "row length" in w]
    assert sorted(w.split(": ")[3].strip() for w in listed) == sorted(fallback)


def test_warnings_while_writing_name_out_not_the_temporary(tmp_path, capsys):
    save(random_model(llama_config()), tmp_path / "out.gguf", quiet=True)  # in memory: no input path
    err = capsys.readouterr().err
    assert "no tokenizer" in err and f"{tmp_path / 'out.gguf'}: no tokenizer" in err and "wconv-tmp" not in err


def test_errors_raised_while_writing_name_out(tmp_path):
    from wconv.errors import FormatError

    out = tmp_path / "out.gguf"
    with pytest.raises(FormatError) as e:
        with atomic.atomic_path(out) as tmp:
            raise FormatError(tmp, f"something about {tmp}")
    assert str(e.value) == f"{out}: something about {out}"
    assert os.listdir(tmp_path) == []


def test_requantised_tensors_counted_by_kind(tmp_path):
    cfg = llama_config()
    src = _gguf(tmp_path, cfg, dtype="q4_0")
    from wconv.formats import gguf_io

    q4 = [n for n, t in gguf_io.read(src).tensors.items() if t.dtype.name == "Q4_0"]  # output.weight: Q8_0
    res = wconv("convert", src, tmp_path / "q8.gguf", "--dtype", "q8_0")
    assert res.returncode == 0, res.stderr
    assert [w for w in warnings_of(res) if "re-quantised" in w] == [
        w for w in warnings_of(res) if f"{len(q4)} Q4_0 tensors dequantised and re-quantised to q8_0" in w]
    assert len([w for w in warnings_of(res) if "re-quantised" in w]) == 1


def test_safetensors_says_it_dequantises(tmp_path):
    src = _gguf(tmp_path, llama_config(), dtype="q8_0")
    res = wconv("convert", src, tmp_path / "o.safetensors")
    assert res.returncode == 0, res.stderr
    lines = [w for w in warnings_of(res) if "dequantised" in w]
    assert len(lines) == 1 and "Q8_0 tensors dequantised to F32" in lines[0]


def test_f16_overflow_named_once_for_safetensors(tmp_path):
    m = random_model(llama_config())
    big = [n for n, t in m.tensors.items() if len(t.shape) == 2][:3]
    for n in big:
        arr = m.tensors[n].float32().copy()
        arr[0, 0] = 1e6
        m.tensors[n] = LazyTensor.from_array(n, arr)
    src = tmp_path / "big.safetensors"
    save(m, src, quiet=True)
    res = wconv("convert", src, tmp_path / "f16.safetensors", "--dtype", "f16")
    lines = [w for w in warnings_of(res) if "beyond the F16 range" in w]
    assert len(lines) == 1 and lines[0].count("3 tensors") == 1, res.stderr


# ----------------------------------------------------------------------------- lossless or loud
@pytest.fixture
def gguf_with_extras(tmp_path):
    """A GGUF with a vocabulary, a chat template and general.* keys the writers do not all carry."""
    from wconv.gguf_edit import edit_gguf

    m = random_model(llama_config())
    m.tokenizer = vocab(96, bos_id=5)
    plain = tmp_path / "plain.gguf"
    save(m, plain, quiet=True)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    src = tmp_path / "src.gguf"
    edit_gguf(str(plain), str(src), set=["general.license=MIT", "general.url=https://example.org"],
              chat_template=str(template))
    return str(src)


def test_gguf_to_gguf_names_exactly_the_keys_it_drops(tmp_path, gguf_with_extras):
    out = tmp_path / "out.gguf"
    res = wconv("convert", gguf_with_extras, out)
    assert res.returncode == 0, res.stderr
    lost = [w for w in warnings_of(res) if "does not carry" in w]
    assert len(lost) == 1 and lost[0].endswith("general.license, general.url")
    src_keys = set(gguf_io.read_header(gguf_with_extras)[0].kv)
    out_keys = set(gguf_io.read_header(str(out))[0].kv)
    assert src_keys - out_keys == {"general.license", "general.url"}  # the warning is the whole truth


def test_each_output_names_what_it_drops_once(tmp_path, gguf_with_extras):
    expect = {  # output -> words in the warnings; words that must not appear
        "o.safetensors": (["vocabulary (96 tokens) is not carried", "general.name, general.license"], ["chat"]),
        "o.ggjt": (["chat template", "bos id 5 (readers assume 1)", "general.license"], []),
        "o.bin": (["vocabulary (96 tokens) is not carried", "tokenizer-to-bin"], []),
    }
    for out, (says, never) in expect.items():
        res = wconv("convert", gguf_with_extras, tmp_path / out)
        assert res.returncode == 0, res.stderr
        text = "\n".join(warnings_of(res))
        for words in says:
            assert text.count(words) == 1, (out, words, text)
        for words in never:
            assert words not in text, (out, words, text)


def test_hf_output_carries_the_chat_template(tmp_path, gguf_with_extras):
    res = wconv("convert", gguf_with_extras, tmp_path / "hf", "--to", "hf")
    assert res.returncode == 0, res.stderr
    assert "chat template" not in res.stderr
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for m in messages %}")


def test_every_output_format_has_a_row():
    from wconv.convert.save import WRITERS

    assert set(carried.OUTPUTS) == set(WRITERS)
    for holds in carried.OUTPUTS.values():
        assert holds.fields <= set(carried.TOKENIZER_FIELDS)


def test_too_large_tokenizer_beside_the_input_is_announced(tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(fixture_path("hf-llama-tiny"), d)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # 1148 tokens; the model has 256 rows
        shutil.copyfile(fixture_path("tokenizers", "llama3-bpe", name), d / name)
    res = wconv("convert", d, tmp_path / "o.gguf")
    assert res.returncode == 0, res.stderr
    said = [w for w in warnings_of(res) if "ignored the tokenizer beside it" in w]
    assert len(said) == 1 and "1148 tokens" in said[0] and "256 embedding rows" in said[0]
    assert gguf_io.read(str(tmp_path / "o.gguf")).tokenizer is None


def test_real_gguf_to_gguf_drops_nothing_silently(tmp_path):
    src = realdata_path("gguf", "ollama_llama-2-tiny-random_f16.gguf")
    out = tmp_path / "o.gguf"
    res = wconv("convert", src, out)
    assert res.returncode == 0 and "does not carry" not in res.stderr, res.stderr
    assert set(gguf_io.read_header(src)[0].kv) <= set(gguf_io.read_header(str(out))[0].kv)


# ----------------------------------------------------------------------------- options and errors
def test_model_files_given_as_tokenizers_say_what_they_are(tmp_path):
    for path, says in ((fixture_path("hf-llama-tiny", "model.safetensors"), "is a safetensors file, not a tokenizer"),
                       (fixture_path("meta-tiny", "params.json"), "is a JSON file that is not a tokenizer")):
        res = wconv("tokenizer-to-bin", path, tmp_path / "t.bin")
        assert res.returncode == 2 and says in res.stderr, res.stderr
        assert not re.search(r"knows, not a tokenizer", res.stderr)
    assert os.listdir(tmp_path) == []


def test_inspect_tokenizer_shows_some_tokens():
    res = wconv("inspect", realdata_path("llama2c", "tokenizer.bin"))
    assert res.returncode == 0
    line = next(l for l in res.stdout.splitlines() if l.strip().startswith("first tokens:"))
    assert "'▁▁'" in line or "▁" in line
    report = json.loads(wconv("inspect", "--json", realdata_path("llama2c", "tokenizer.model")).stdout)
    assert len(report["tokenizer"]["sample_tokens"]) == 8
    assert all(t["id"] > 258 for t in report["tokenizer"]["sample_tokens"])  # past <unk>, <s>, </s>, bytes


def test_f16_overflow_check_ignores_infinities_already_in_the_source(tmp_path):
    from wconv import stream

    def overflowed(values):
        t = LazyTensor.from_array("x", np.array(values, np.float32))
        with open(tmp_path / "o.bin", "wb") as f:
            (result,) = stream.write_tensors(f, [(t, dtypes.F16)], threads=1)
        return result.overflowed

    assert not overflowed([1.0, np.inf])  # already infinite in the source: nothing new to say
    assert overflowed([1.0, 1e6])


def test_tokenizer_beside_not_carried_is_named_once(tmp_path):
    import shutil

    import hostile

    d = tmp_path / "model"
    shutil.copytree(fixture_path("hf-llama-tiny"), d)
    (d / "tokenizer.model").write_bytes(hostile.sentencepiece_model(vocab(200)))
    res = wconv("convert", d, tmp_path / "o.safetensors")
    assert res.returncode == 0, res.stderr
    about = [w for w in warnings_of(res) if "tokenizer.model" in w]
    assert len(about) == 1 and "(200 tokens) is not carried" in about[0], res.stderr
    res = wconv("convert", d, tmp_path / "o.gguf")  # an output that takes it: announced, not warned about
    assert [w for w in warnings_of(res) if "tokenizer.model" in w and "using the tokenizer found beside" in w]
    assert "not carried" not in res.stderr

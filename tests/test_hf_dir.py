"""`wconv convert SRC OUTDIR --to hf`: Hugging Face model directories.

The consumer is transformers: AutoModelForCausalLM.from_pretrained(OUTDIR) must load what we
write, and its logits must match the numpy reference run on the SOURCE. Lossy --dtype outputs
are checked against torch's own rounding of the source weights. wconv reads the directory back
exactly (single file and sharded index). Outputs are atomic like every other wconv output.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import weakref

import numpy as np
import pytest
from click.testing import CliRunner

import helpers
import wconv
from conftest import fixture_path, realdata_path
from helpers import assert_same_tensors, leftovers, start_and_freeze
from modelgen import gpt2_config, llama_config, random_model
from wconv import dtypes, reference
from wconv.cli import main as cli
from wconv.convert.load import load_tokenizer
from wconv.convert.save import convert, save
from wconv.errors import FormatError, OutputError, UsageError
from wconv.formats import hf_dir
from wconv.formats.safetensors_io import read_header
from wconv.tensor import LazyTensor

TOKENS = [1, 5, 9, 2, 7, 3, 11, 4, 0, 8, 6, 10]
F32_REL = 1e-4  # consumer vs reference, relative to the logit scale, when no rounding is involved
# Rounding the weights of these tiny f32 models moves their logits by up to 1.0e-3 (f16) and
# 6.4e-3 (bf16) of the logit scale (measured); bounds with ~5x headroom, well inside the parity
# defaults of docs/parity.md. The stored bits are also checked exactly against torch's rounding.
LOSSY_REL = {"f16": 5e-3, "bf16": 3e-2}


@pytest.fixture(scope="module")
def hf():
    """(transformers, torch), imported once for the module (the import takes seconds)."""
    transformers = pytest.importorskip("transformers")
    import torch

    transformers.logging.set_verbosity_error()
    return transformers, torch


def hf_model(hf, directory, dtype="float32"):
    transformers, torch = hf
    dt = getattr(torch, dtype) if dtype != "auto" else "auto"
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dt).eval()


def hf_logits(hf, directory) -> np.ndarray:
    _, torch = hf
    model = hf_model(hf, directory)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


def scale(logits) -> float:
    return max(1.0, float(np.abs(logits).max()))


def stored_names(directory) -> list:
    names = []
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        names += list(read_header(path)[0])
    return names


# --- fixtures through transformers ------------------------------------------------------------

@pytest.mark.parametrize("src", ["meta-tiny", "llama2c-ckpt.pt", "nanogpt-ckpt.pt"])
def test_fixture_loads_in_transformers_with_source_logits(hf, src, tmp_path):
    path = fixture_path(src)
    out = tmp_path / "hf"
    assert convert(path, out, to="hf", quiet=True) == "hf"
    source = wconv.load(path)
    ours = reference.forward(source, TOKENS)
    theirs = hf_logits(hf, out)
    err = np.abs(ours - theirs).max()
    assert err <= F32_REL * scale(ours)  # measured ~5e-7 on logits of scale ~2
    assert np.abs(theirs).max() > 0.5  # not a degenerate all-zero model

    config = json.loads((out / "config.json").read_text())
    names = stored_names(out)
    if src == "meta-tiny":  # bf16, GQA: kept bf16, and transformers' "auto" picks that up
        assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
        assert {read_header(str(out / "model.safetensors"))[0][n]["dtype"].name for n in names} == {"BF16"}
        _, torch = hf
        assert hf_model(hf, out, "auto").dtype == torch.bfloat16
    elif src == "llama2c-ckpt.pt":  # tied classifier: no lm_head stored, HF re-ties it
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in names
        assert config["torch_dtype"] == "float32"
    else:  # nanoGPT: nn.GELU() is the erf form, HF's "gelu"
        assert config["activation_function"] == "gelu" and "lm_head.weight" not in names
        # This tiny model's activations are small, so tanh-vs-erf moves logits by only ~1.4e-4,
        # still ~300 times what we measure with the right form: transformers really used erf.
        source.config.gelu = "tanh"
        assert np.abs(reference.forward(source, TOKENS) - theirs).max() > 20 * err


def _as_source(model, tmp_path):
    """Write a random model as a canonical safetensors file and read it back: a real source."""
    path = tmp_path / "src.safetensors"
    save(model, path, quiet=True)
    return wconv.load(path)


@pytest.mark.parametrize("case", ["gpt2-untied", "gpt2-no-bias", "llama-mqa-theta"])
def test_random_models_load_in_transformers(hf, case, tmp_path):
    if case == "llama-mqa-theta":
        model = random_model(llama_config(n_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6), seed=11)
    else:
        model = random_model(gpt2_config(tie_embeddings=False), seed=12)
    expected = reference.forward(model, TOKENS)  # gpt2-no-bias: zero biases, the same function
    if case == "gpt2-no-bias":
        model.tensors = {n: t for n, t in model.tensors.items() if not n.endswith(".bias")}
        model.config.bias = False
        for name in ("blk.0.attn_qkv.bias", "output_norm.bias"):
            assert model.get(name) is None
        zero = random_model(gpt2_config(tie_embeddings=False), seed=12)
        for n, t in zero.tensors.items():
            if n.endswith(".bias"):
                zero.tensors[n] = LazyTensor.from_array(n, np.zeros(t.shape, np.float32))
        expected = reference.forward(zero, TOKENS)
    source = model if case == "gpt2-no-bias" else _as_source(model, tmp_path)
    out = tmp_path / "hf"
    save(source, out, to="hf", quiet=True, max_seq_len=64 if case == "llama-mqa-theta" else None)
    theirs = hf_logits(hf, out)
    assert np.abs(expected - theirs).max() <= F32_REL * scale(expected)
    config = json.loads((out / "config.json").read_text())
    if case == "llama-mqa-theta":
        assert config["max_position_embeddings"] == 64 and config["rope_theta"] == 500000.0
        source.config.rope_theta = 10000.0  # the test would notice a dropped rope_theta
        assert np.abs(reference.forward(source, TOKENS) - theirs).max() > F32_REL * scale(expected)
    else:
        assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is False
        assert "lm_head.weight" in stored_names(out)


# --- lossy dtypes ---------------------------------------------------------------------------------

def _torch_rounded(hf, arr: np.ndarray, dtype: str) -> np.ndarray:
    """The storage bits torch produces when it rounds float32 `arr` to `dtype`."""
    _, torch = hf
    t = torch.from_numpy(np.array(arr, np.float32))  # a writable copy
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(torch.float16).numpy()


@pytest.mark.parametrize("src,dtype", [("llama2c-ckpt.pt", "f16"), ("llama2c-ckpt.pt", "bf16"),
                                       ("nanogpt-ckpt.pt", "bf16"), ("meta-tiny", "f32")])
def test_dtype_option(hf, src, dtype, tmp_path):
    path = fixture_path(src)
    out = tmp_path / "hf"
    convert(path, out, to="hf", dtype=dtype, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    source, back = wconv.load(path), wconv.load(out)
    for name, t in source.tensors.items():
        want = t.float32() if dtype == "f32" else _torch_rounded(hf, t.float32(), dtype)
        np.testing.assert_array_equal(back[name].raw(), want, err_msg=name)
    ours = reference.forward(source, TOKENS)
    theirs = hf_logits(hf, out)
    # What transformers computes is what the stored weights say...
    assert np.abs(reference.forward(back, TOKENS) - theirs).max() <= F32_REL * scale(ours)
    # ...and within the documented rounding noise of the source.
    assert np.abs(ours - theirs).max() <= LOSSY_REL.get(dtype, F32_REL) * scale(ours)


def test_lossy_and_quantised_dtypes_refused_before_writing(tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(UsageError, match="f32, f16 or bf16, not q8_0") as e:
        convert(fixture_path("meta-tiny"), out, to="hf", dtype="q8_0", quiet=True)
    assert str(out) in str(e.value)
    assert os.listdir(tmp_path) == []


# --- sharding -------------------------------------------------------------------------------------

def test_sharded_output(hf, tmp_path):
    src = fixture_path("meta-tiny")
    out = tmp_path / "hf"
    convert(src, out, to="hf", max_shard_size="40KB", quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(glob.glob(str(out / "model-*-of-*.safetensors")))
    assert not (out / "model.safetensors").exists()
    assert len(shards) > 3 and [os.path.basename(s) for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = 0
    for shard in shards:
        entries = read_header(shard)[0]
        sizes = [e["end"] - e["begin"] for e in entries.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1  # one oversized tensor gets its own shard
        total += sum(sizes)
        for name in entries:
            assert index["weight_map"][name] == os.path.basename(shard)
    assert sorted(index["weight_map"]) == sorted(stored_names(out))
    assert index["metadata"]["total_size"] == total

    source = wconv.load(src)
    ours = reference.forward(source, TOKENS)
    assert np.abs(ours - hf_logits(hf, out)).max() <= F32_REL * scale(ours)
    back = wconv.load(out)
    assert back.config == source.config
    assert_same_tensors(back, source)


def test_parse_size():
    assert hf_dir.parse_size("5GB") == 5 * 10**9 == hf_dir.DEFAULT_MAX_SHARD_SIZE
    assert hf_dir.parse_size("64KiB") == 65536 and hf_dir.parse_size("1000") == 1000
    assert hf_dir.parse_size("1.5 MB") == 1_500_000 and hf_dir.parse_size(7) == 7
    for bad in ("abc", "5 parsecs", "0", "-3MB", ""):
        with pytest.raises(UsageError):
            hf_dir.parse_size(bad)


def test_plan_shards():
    sizes = [("a", 30), ("b", 30), ("c", 100), ("d", 10), ("e", 50)]
    assert hf_dir.plan_shards(sizes, 60) == [["a", "b"], ["c"], ["d", "e"]]
    assert hf_dir.plan_shards(sizes, 10**9) == [["a", "b", "c", "d", "e"]]


# --- wconv reads it back ------------------------------------------------------------------------

@pytest.mark.parametrize("src", ["meta-tiny", "meta-tiny-2shard", "meta-tiny-f16", "hf-llama-tiny-bin",
                                 "llama2c-ckpt.pt", "nanogpt-ckpt.pt"])
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_round_trip_is_exact(src, shard, tmp_path):
    source = wconv.load(fixture_path(src))
    out = tmp_path / "hf"
    save(source, out, to="hf", max_shard_size=shard, quiet=True)
    back = wconv.load(out)
    assert back.source_layout == ("hf-gpt2" if source.config.arch == "gpt2" else "hf-llama")
    assert back.config == source.config
    assert list(back.tensors) == list(source.tensors)
    assert_same_tensors(back, source)


def test_tokenizer_model_travels_with_the_weights(tmp_path):
    spm = realdata_path("llama2c", "tokenizer.model")
    model = random_model(llama_config(vocab_size=32000, dim=32, n_heads=2, n_kv_heads=1, n_layers=1,
                                      hidden_dim=64), seed=3)
    model.tokenizer = load_tokenizer(spm)
    out = tmp_path / "hf"
    save(model, out, to="hf", quiet=True)
    with open(spm, "rb") as a, open(out / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # Llama 2's <s>, </s>
    assert wconv.load(out).tokenizer.tokens == model.tokenizer.tokens
    small = random_model(llama_config(), seed=3)  # 96 rows: a 32000-token tokenizer cannot belong to it
    small.tokenizer = model.tokenizer
    with pytest.raises(UsageError, match="32000 tokens"):
        save(small, tmp_path / "small", to="hf", quiet=True)
    assert leftovers(tmp_path) == [] and not (tmp_path / "small").exists()


def test_no_tokenizer_no_copy_and_defaults_in_range(tmp_path):
    out = tmp_path / "hf"
    convert(fixture_path("nanogpt-ckpt.pt"), out, to="hf", quiet=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] is None  # GPT2Config's 50256 would be past this 96-token vocab


# --- streaming ------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads, most", [(1, 1), (2, 3)])
def test_one_source_tensor_alive_at_a_time(tmp_path, threads, most):
    """One thread: one source tensor at a time. More: the pieces being encoded (one per
    thread) plus the one being written, each from a tensor of its own at worst."""
    model = random_model(llama_config(), seed=5)
    alive, peak = set(), [0]

    def wrap(t):
        def load():
            arr = np.array(t.loader())  # our own copy, so its lifetime is what we measure
            alive.add(id(arr))
            weakref.finalize(arr, alive.discard, id(arr))
            peak[0] = max(peak[0], len(alive))
            return arr

        return LazyTensor(t.name, t.dtype, t.shape, load, t.source)

    model.tensors = {n: wrap(t) for n, t in model.tensors.items()}
    save(model, tmp_path / "hf", to="hf", max_shard_size="30KB", quiet=True, threads=threads)
    assert 1 <= peak[0] <= most


# --- atomicity ----------------------------------------------------------------------------------

def failing_model(parent, *, fail_after, exc=None):
    """A model whose tensor loads fail after `fail_after` loads; records the temporary directory then."""
    return helpers.failing_model(random_model(llama_config(), seed=1), fail_after=fail_after, exc=exc,
                                 record=lambda: {d: sorted(os.listdir(os.path.join(parent, d)))
                                                 for d in leftovers(parent)})


@pytest.mark.parametrize("exc", [None, KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_midway_leaves_nothing(exc, tmp_path):
    model, state = failing_model(str(tmp_path), fail_after=12, exc=exc)
    out = tmp_path / "hf"
    with pytest.raises(FormatError if exc is None else KeyboardInterrupt):
        save(model, out, to="hf", max_shard_size="30KB", quiet=True)
    (tmp, files), = state["seen"].items()  # the failure happened with shards already written
    assert tmp.startswith(".hf.") and any(f.startswith("model-00001-of-") for f in files)
    assert os.listdir(tmp_path) == []


def _snapshot(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
    return out


def test_existing_output_needs_force_and_survives_failure(tmp_path):
    out = tmp_path / "hf"
    convert(fixture_path("meta-tiny"), out, to="hf", quiet=True)
    old = _snapshot(out)
    with pytest.raises(OutputError, match="pass --force"):
        convert(fixture_path("meta-tiny"), out, to="hf", quiet=True)
    model, _ = failing_model(str(tmp_path), fail_after=5)
    with pytest.raises(FormatError):
        save(model, out, to="hf", force=True, quiet=True)
    assert _snapshot(out) == old and leftovers(tmp_path) == []


def test_force_replaces_only_on_success(tmp_path):
    out = tmp_path / "hf"
    convert(fixture_path("meta-tiny"), out, to="hf", quiet=True)
    convert(fixture_path("llama2c-ckpt.pt"), out, to="hf", force=True, quiet=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # the old directory, set aside, is gone too
    assert_same_tensors(wconv.load(out), wconv.load(fixture_path("llama2c-ckpt.pt")))


def test_force_never_deletes_what_wconv_did_not_write(tmp_path):
    # A project directory (a git checkout with a README) is not a previous wconv output.
    out = tmp_path / "project"
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "README.md").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(OutputError, match=r"refusing to replace it with --force: it holds \.git, README\.md"):
        convert(fixture_path("meta-tiny"), out, to="hf", force=True, quiet=True)
    assert _snapshot(out) == before and os.path.isdir(out / ".git" / "objects")
    # A transformers save_pretrained directory (no wconv metadata in its safetensors) is not ours either.
    hf = tmp_path / "hf-original"
    shutil.copytree(fixture_path("hf-llama-tiny"), hf)
    with pytest.raises(OutputError, match="was not written by wconv"):
        convert(fixture_path("meta-tiny"), hf, to="hf", force=True, quiet=True)
    # A wconv output the user added a file to: refused, naming the file.
    ours = tmp_path / "ours"
    convert(fixture_path("meta-tiny"), ours, to="hf", quiet=True)
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        convert(fixture_path("meta-tiny"), ours, to="hf", force=True, quiet=True)
    # An empty directory holds nothing to lose.
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(fixture_path("meta-tiny"), empty, to="hf", force=True, quiet=True)
    assert (empty / "config.json").exists()


def test_force_over_a_file_of_another_kind_is_refused(tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, not a model")
    for fmt in ("gguf", "safetensors", "llama2c", "ggjt"):
        with pytest.raises(OutputError, match=f"it is not a {fmt} file"):
            convert(fixture_path("meta-tiny"), notes, to=fmt, force=True, quiet=True)
    assert notes.read_text() == "my notes, not a model"
    out = tmp_path / "model.gguf"
    convert(fixture_path("meta-tiny"), out, quiet=True)
    convert(fixture_path("meta-tiny-f16"), out, force=True, quiet=True)  # a GGUF over a GGUF: fine


def test_trailing_slash_and_force_over_a_symlink(tmp_path):
    convert(fixture_path("llama2c-ckpt.pt"), str(tmp_path / "hf") + os.sep, to="hf", quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    elsewhere = tmp_path / "elsewhere"
    convert(fixture_path("meta-tiny"), elsewhere, to="hf", quiet=True)
    old = _snapshot(elsewhere)
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    convert(fixture_path("llama2c-ckpt.pt"), link, to="hf", force=True, quiet=True)
    # The link itself is replaced by the new directory; what it pointed to is not deleted.
    assert not link.is_symlink() and (link / "config.json").exists()
    assert _snapshot(elsewhere) == old
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "hf", "link"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("old")
    link2 = tmp_path / "link2"
    link2.symlink_to(foreign, target_is_directory=True)
    with pytest.raises(OutputError, match="keep.txt"):
        convert(fixture_path("llama2c-ckpt.pt"), link2, to="hf", force=True, quiet=True)
    assert link2.is_symlink() and _snapshot(foreign) == {"keep.txt": b"old"}


def test_new_directory_gets_the_usual_mode(tmp_path):
    out = tmp_path / "hf"
    convert(fixture_path("llama2c-ckpt.pt"), out, to="hf", quiet=True)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(out / "config.json").st_mode & 0o777 == 0o666 & ~umask


def test_refuses_an_output_that_is_or_contains_an_input(tmp_path):
    parent = tmp_path / "models"
    shutil.copytree(fixture_path("meta-tiny"), parent / "meta-tiny")
    src = parent / "meta-tiny"
    before = _snapshot(parent)
    for out in (src, parent, tmp_path):  # the input directory itself, and directories holding it
        with pytest.raises(OutputError, match="is or contains the input"):
            convert(src, out, to="hf", force=True, quiet=True)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(OutputError, match="is or contains the input"):
        convert(src, link, to="hf", force=True, quiet=True)
    single = tmp_path / "one" / "ckpt.pt"
    single.parent.mkdir()
    shutil.copy(fixture_path("llama2c-ckpt.pt"), single)
    with pytest.raises(OutputError, match="is or contains the input"):
        convert(single, single.parent, to="hf", force=True, quiet=True)
    assert _snapshot(parent) == before and single.exists()


def test_refuses_a_file_or_a_missing_parent(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        convert(fixture_path("llama2c-ckpt.pt"), target, to="hf", force=True, quiet=True)
    with pytest.raises(OutputError, match="does not exist"):
        convert(fixture_path("llama2c-ckpt.pt"), tmp_path / "no" / "hf", to="hf", quiet=True)
    assert target.read_text() == "x"


# --- command line ---------------------------------------------------------------------------------

def test_cli(tmp_path):
    out = tmp_path / "hf"
    run = CliRunner().invoke
    res = run(cli, ["convert", "-q", fixture_path("meta-tiny"), str(out), "--to", "hf", "--max-shard-size",
                    "100KB", "--dtype", "f16"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    for args, message in (
            (["--to", "hf", "--dtype", "q4_0"], "not q4_0"),
            (["--to", "hf", "--max-shard-size", "lots"], "expected a size"),
            (["--to", "gguf", "--max-shard-size", "1GB"], "--max-shard-size does not apply to"),
            ([], "pass --to (--to hf for a Hugging Face model directory)")):
        res = run(cli, ["convert", "-q", fixture_path("meta-tiny"), str(tmp_path / "other"), *args])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "other").exists()
    res = run(cli, ["convert", "-q", fixture_path("meta-tiny"), str(out), "--to", "hf"])
    assert res.exit_code == 2 and "pass --force" in res.output
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# --- signals, end to end through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """A ~40 MB f32 model: its bf16 HF form takes long enough to stop between shards."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save(random_model(llama_config(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, hidden_dim=768,
                                   vocab_size=8000), seed=3), path, quiet=True)
    return str(path)


def _start_and_freeze(src, out, *extra):
    """Start `wconv convert --to hf` and SIGSTOP it once its temporary directory holds a shard."""
    return start_and_freeze([src, out, "--to", "hf", "--dtype", "bf16", "--max-shard-size", "1MB", *extra], out,
                            lambda tmp: bool(glob.glob(os.path.join(tmp, "model-00002-of-*.safetensors"))))


@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-old"])
def test_sigterm_midway_leaves_nothing_and_keeps_the_old_output(existing, big_input, tmp_path):
    out = tmp_path / "hf"
    if existing:  # a previous wconv output, which --force may replace
        convert(fixture_path("llama2c-ckpt.pt"), out, to="hf", quiet=True)
        old = _snapshot(out)
    proc, tmp = _start_and_freeze(big_input, out, *(["--force"] if existing else []))
    assert existing == out.exists()  # nothing at the target until the end
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip().splitlines()[-1] == "wconv: interrupted; no output written"
    assert not os.path.exists(tmp) and leftovers(tmp_path) == []
    assert (_snapshot(out) == old) if existing else not out.exists()


def test_sigkill_leaves_only_a_hidden_temporary_directory(big_input, tmp_path):
    out = tmp_path / "hf"
    proc, tmp = _start_and_freeze(big_input, out)
    proc.kill()
    proc.wait(timeout=30)
    assert not out.exists() and leftovers(tmp_path) == [os.path.basename(tmp)]

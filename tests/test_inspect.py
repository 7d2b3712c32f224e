"""`wconv inspect`: the JSON contract, the text view, and that no tensor data is read."""
from __future__ import annotations

import glob
import json
import os

import pytest

import modelgen
from conftest import REALDATA, fixture_path, realdata_path
from wconv import tensor as tensor_mod
from wconv.errors import WconvError
from wconv.inspect.report import MAX_METADATA_CHARS, format_text, inspect_path, report_for

import torch  # noqa: E402  (a pinned test dependency: fail, never skip, when it is missing)

FIXTURES = ["meta-tiny", "meta-tiny-2shard", "meta-tiny-f16", "hf-llama-tiny", "hf-llama-tiny-bin",
            "llama2c-ckpt.pt", "nanogpt-ckpt.pt"]
# Real files that are models: tokenizer files, llama.cpp's tokenizer test texts and Meta's side files
# (meta/: params.json and checklist.chk without weights) are not.
NOT_MODELS = ("tokenizers", "llamacpp_vocab_tests", "meta")
REAL = sorted(p for p in glob.glob(os.path.join(REALDATA, "*", "*"))
              if not os.path.basename(p).startswith(("tok", "README"))
              and os.path.basename(os.path.dirname(p)) not in NOT_MODELS)
REQUIRED = {"format", "arch", "layout", "config", "n_params", "n_bytes", "n_tensors", "tensors", "metadata",
            "path", "input_files", "tokenizer", "dtypes", "report_version"}


def check_contract(report):
    assert REQUIRED <= report.keys()
    text = json.dumps(report, allow_nan=False)  # strict JSON: no NaN/Infinity, only plain types
    assert json.loads(text) == report
    entry_keys = {"name", "dtype", "shape", "n_params", "nbytes", "offset", "file", "canonical_name",
                  "canonical_shape"}
    for t in report["tensors"]:
        optional = {"ggml_shape", "note", "stats"}
        assert entry_keys <= set(t) <= entry_keys | optional, set(t)
        assert isinstance(t["shape"], list) and all(isinstance(s, int) for s in t["shape"])
        assert t["canonical_name"] is None or isinstance(t["canonical_shape"], list)
        assert t["offset"] is None or isinstance(t["offset"], int)
    assert report["n_tensors"] == len(report["tensors"])
    assert report["n_params"] == sum(t["n_params"] for t in report["tensors"])
    assert report["n_bytes"] == sum(t["nbytes"] for t in report["tensors"])
    assert len(json.dumps(report["metadata"])) <= MAX_METADATA_CHARS
    assert not any(k.startswith("_") for k in report["metadata"])
    return text


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Every LazyTensor made while active fails the test if its data is requested."""
    original = tensor_mod.LazyTensor.__post_init__

    def post_init(self):
        original(self)
        name = self.name

        def refuse():
            pytest.fail(f"inspect read the data of tensor {name!r}")

        self.loader = refuse

    monkeypatch.setattr(tensor_mod.LazyTensor, "__post_init__", post_init)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reports(name, no_tensor_reads):
    report = inspect_path(fixture_path(name))
    check_contract(report)
    assert report["arch"] in ("llama", "gpt2")
    assert report["format"] in ("torch-zip", "safetensors")
    assert report["config"]["n_heads"] > 0
    text = format_text(report)
    assert f"layout:  {report['layout']}" in text and "blk.0.ffn_down.weight" in text
    assert report["report_version"] == 2
    # The file view: stored names, with the canonical name beside each recognised tensor.
    views = {t["canonical_name"] for t in report["tensors"]}
    assert "blk.0.ffn_down.weight" in views and "token_embd.weight" in views
    assert f"{report['n_params']:,} params" in text


def test_report_numbers_match_torch():
    report = inspect_path(fixture_path("meta-tiny"))
    sd = torch.load(fixture_path("meta-tiny", "consolidated.00.pth"), weights_only=True)
    assert report["n_params"] == sum(t.numel() for t in sd.values())
    assert report["n_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    shapes = sorted(tuple(t.shape) for t in sd.values())
    assert sorted(tuple(t["shape"]) for t in report["tensors"]) == shapes
    assert {t["dtype"] for t in report["tensors"]} == {"BF16"}
    assert report["layout"] == "meta" and report["config"]["n_kv_heads"] == 2
    assert report["metadata"]["params"]["ffn_dim_multiplier"] == 1.3


def test_training_checkpoint_metadata():
    report = inspect_path(fixture_path("llama2c-ckpt.pt"))
    ck = torch.load(fixture_path("llama2c-ckpt.pt"), weights_only=True)
    md = report["metadata"]
    assert md["iter_num"] == 100 and md["model_args"] == ck["model_args"]
    assert md["optimizer"]["optimizer"]["n_tensors"] == sum(len(v) for v in ck["optimizer"]["state"].values())
    assert report["config"]["tie_embeddings"] is True
    assert "output.weight" not in [t["canonical_name"] for t in report["tensors"]]
    # ...but the file's own output.weight (the same storage as the embedding) is shown as stored.
    stored = {t["name"]: t for t in report["tensors"]}
    assert stored["output.weight"]["canonical_name"] is None and "tied" in stored["output.weight"]["note"]
    text = format_text(report)
    assert "iter_num: 100" in text and "optimizer:" in text and "tie_embeddings  True" in text


@pytest.mark.parametrize("path", REAL, ids=[os.path.basename(p) for p in REAL])
def test_real_files(path, no_tensor_reads):
    report = inspect_path(path)
    check_contract(report)
    assert format_text(report).startswith("path:")
    assert report["n_params"] == independent_n_params(path)


def independent_n_params(path) -> int:
    """Elements in the file's weights, counted by the format's own library (or header arithmetic)."""
    import struct

    if path.endswith(".gguf"):
        with open(path, "rb") as f:
            n_tensors = struct.unpack_from("<Q", f.read(16), 8)[0]  # GGUF: magic, version, tensor count
        if n_tensors == 0:
            return 0  # llama.cpp's vocab-only files
        # ../shared/realdata/README.md: ollama's tiny llama, n_embd 8, 1 block, ff 32, 2 heads, 2 kv heads,
        # vocab 32000, untied (gguf.GGUFReader would say the same in ~3 s of vocabulary parsing).
        assert os.path.basename(path) == "ollama_llama-2-tiny-random_f16.gguf", path
        dim, ff, vocab = 8, 32, 32000
        return 2 * vocab * dim + (2 * dim + 4 * dim * dim + 3 * dim * ff) + dim
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from safetensors import safe_open

        st = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
        with safe_open(st, "np") as f:
            return sum(int(np_prod(f.get_slice(k).get_shape())) for k in f.keys())
    if os.path.basename(os.path.dirname(path)) == "llama2c":
        with open(path, "rb") as f:
            head = f.read(36)
        magic = struct.unpack_from("<I", head)[0] == 0x616B3432
        dim, hidden, layers, heads, kv, vocab, _ = struct.unpack_from("<7i", head, 8 if magic else 0)
        shared = bool(open(path, "rb").read(37)[36]) if magic else vocab > 0
        vocab, kv_dim = abs(vocab), dim // heads * kv
        per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * dim * hidden
        return vocab * dim * (1 if shared else 2) + layers * per_layer + dim
    obj = torch.load(path, weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # training checkpoint: its other entries are not weights
    tensors = [obj] if isinstance(obj, torch.Tensor) else [v for v in obj.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() for t in tensors)


def np_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def test_custom_nanogpt_shown_as_unknown():
    path = realdata_path("torch", "nanogpt_style_small-gpt_ckpt.pt")
    report = inspect_path(path)
    assert report["arch"] == "unknown" and report["layout"] == "unknown"
    assert "transformer.h.0.ffd.w1.weight" in [t["name"] for t in report["tensors"]]
    assert report["metadata"]["model_args"]["n_embed"] == 64
    assert any("ffd.w1" in w for w in report["metadata"]["warnings"])
    assert "hyperparameters" not in format_text(report)


def test_metadata_is_bounded():
    model = modelgen.random_model(modelgen.llama_config(n_layers=1))
    deep = {}
    node = deep
    for i in range(50):
        node["next"] = node = {"i": i}
    model.metadata = {"_input_files": ["x"], "tokens": [f"tok{i}" for i in range(100_000)],
                      "scores": [float(i) for i in range(100_000)], "deep": deep, "nan": float("inf"),
                      "blob": b"\0" * 10_000, "wide": {f"k{i}": "v" * 1000 for i in range(500)}}
    report = report_for(model)
    check_contract(report)
    assert report["metadata"]["tokens"]["list_length"] == 100_000


def test_unreadable_input_is_a_wconv_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x08\0\0\0\0\0\0\0{broken}")
    with pytest.raises(WconvError, match="x.safetensors"):
        inspect_path(bad)


def test_cli_json_equals_library(tmp_path):
    from click.testing import CliRunner

    from wconv.cli import main

    result = CliRunner().invoke(main, ["inspect", "--json", fixture_path("nanogpt-ckpt.pt")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == inspect_path(fixture_path("nanogpt-ckpt.pt"))
    text = CliRunner().invoke(main, ["inspect", fixture_path("nanogpt-ckpt.pt")])
    assert text.exit_code == 0 and "layout:  nanogpt" in text.output

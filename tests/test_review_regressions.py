"""Regressions found in review: user input that used to escape as a non-WconvError
("internal error", exit 70) or was silently ignored."""
from __future__ import annotations

import json
import shutil

import pytest

import wconv
from conftest import fixture_path
from wconv.convert.save import convert
from wconv.errors import FormatError, UsageError
from wconv.inspect.report import inspect_path


def _meta_copy(tmp_path, **params):
    d = tmp_path / "meta"
    shutil.copytree(fixture_path("meta-tiny"), d)
    p = json.loads((d / "params.json").read_text())
    p.update(params)
    (d / "params.json").write_text(json.dumps(p))
    return d


@pytest.mark.parametrize("key, value", [("norm_eps", "abc"), ("rope_theta", [1]), ("max_seq_len", "x"),
                                        ("vocab_size", "x"), ("n_kv_heads", True), ("dim", 64.0)])
def test_wrongly_typed_params_json_is_a_format_error(tmp_path, key, value):
    d = _meta_copy(tmp_path, **{key: value})
    with pytest.raises(FormatError) as e:
        wconv.load(d)
    assert str(e.value).startswith(str(d)) and "params.json" in str(e.value) and key in str(e.value)
    assert "\n" not in str(e.value)
    report = inspect_path(d)  # inspect still shows the file, with the problem as a warning
    assert any(key in w and "params.json" in w for w in report["metadata"]["warnings"])


def test_non_numeric_ffn_dim_multiplier_is_only_noted(tmp_path):
    model = wconv.load(_meta_copy(tmp_path, ffn_dim_multiplier="1.3"))
    assert model.config.hidden_dim == 224  # from the w1 tensor, as always
    assert any("ffn_dim_multiplier" in n for n in model.metadata["notes"])


def test_wrongly_typed_hf_config_is_a_format_error(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(fixture_path("hf-llama-tiny"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = "1e-5"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="config.json gives norm_eps='1e-5'"):
        wconv.load(d)


def test_wrongly_typed_wconv_metadata_is_a_format_error(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    good = tmp_path / "good.safetensors"
    convert(fixture_path("meta-tiny"), good, dtype="f32", quiet=True)
    with safe_open(str(good), "np") as f:
        metadata = f.metadata()
    assert json.loads(metadata["wconv.dim"]) == 64
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**metadata, "wconv.dim": '"64"'})
    with pytest.raises(FormatError, match="wconv.dim"):
        wconv.load(bad)


@pytest.mark.parametrize("value", [0, -5])
def test_gguf_max_seq_len_must_be_positive(tmp_path, value):
    out = tmp_path / "o.gguf"
    with pytest.raises(UsageError, match="max.seq.len must be (positive|at least 1)"):
        convert(fixture_path("meta-tiny"), out, max_seq_len=value, quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("atol", [-1.0, float("nan"), float("inf")])
def test_parity_refuses_meaningless_atol(atol):
    m = fixture_path("meta-tiny")
    with pytest.raises(UsageError, match="atol"):
        wconv.parity(m, m, atol=atol)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": ["model.safetensors"]}, "x"])
def test_malformed_index_beside_a_single_file_is_no_crash(tmp_path, weight_map):
    shutil.copy(fixture_path("hf-llama-tiny", "model.safetensors"), tmp_path)
    shutil.copy(fixture_path("hf-llama-tiny", "config.json"), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = wconv.load(tmp_path / "model.safetensors")  # the index says nothing usable: read the file
    assert model.config.arch == "llama" and model.config.n_layers == 2


def test_lone_shard_named_by_index_is_still_refused(tmp_path):
    shutil.copy(fixture_path("hf-llama-tiny", "model.safetensors"), tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": "other.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wconv.UnsupportedError, match="one of 2 shards"):
        wconv.load(tmp_path / "model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5])
def test_gguf_non_integral_hyperparameter_is_a_format_error(tmp_path, value):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_float32("llama.attention.head_count", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="llama.attention.head_count"):
        wconv.load(path)


# --- options a format does not take are refused, not dropped or crashed on --------------------
@pytest.mark.parametrize("out,options,message", [
    ("m.safetensors", {"max_seq_len": 5}, "--max-seq-len does not apply to safetensors"),
    ("m.ggjt", {"max_seq_len": 5}, "--max-seq-len does not apply to ggjt"),
    ("m.gguf", {"version": 2}, "--version does not apply to gguf"),
    ("m.gguf", {"group_size": 32}, "--group-size does not apply to gguf"),
    ("m.bin", {"dtype": "f16"}, "use --version 2"),
    ("m.gguf", {"max_seq_len": 0}, "at least 1"),
])
def test_inapplicable_options_refused(tmp_path, out, options, message):
    with pytest.raises(UsageError, match=message):
        convert(fixture_path("meta-tiny"), str(tmp_path / out), quiet=True, **options)
    assert list(tmp_path.iterdir()) == []


def test_cli_max_seq_len_must_be_positive(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wconv.cli", "pth-to-bin", fixture_path("meta-tiny"),
                           str(tmp_path / "m.bin"), "--max-seq-len", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "max-seq-len" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_hf_config_v5_rope_parameters_and_odd_architectures(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(fixture_path("hf-llama-tiny"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    assert wconv.load(str(d)).config.rope_theta == 500000.0
    cfg["architectures"] = 5  # not a list: ignored, model_type still identifies the layout
    (d / "config.json").write_text(json.dumps(cfg))
    assert wconv.load(str(d)).source_layout == "hf-llama"

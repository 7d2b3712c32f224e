"""Type confusion in the JSON side files (params.json, config.json, *.index.json).

Any JSON value in any field must give a Model or a one-line WconvError: never another
exception type. Conversions must then still refuse or succeed cleanly.
"""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wconv
from conftest import fixture_path
from wconv.errors import FormatError, WconvError
from wconv.inspect.report import inspect_path

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _open_all_ways(path):
    try:
        model = wconv.load(path)
        model.config.to_dict()
    except WconvError as e:
        assert "\n" not in str(e)
    try:
        report = wconv.inspect(path)  # strict=False: unknown layouts still give a report
    except WconvError as e:
        assert "\n" not in str(e)
    else:
        json.dumps(report, allow_nan=False)


def _mutated_copy(tmp_path, fixture, side_file, key, value):
    d = tmp_path / "m"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(fixture_path(fixture), d)
    data = json.loads((d / side_file).read_text())
    target = data
    for part in key[:-1]:
        target = target[part]
    target[key[-1]] = value
    (d / side_file).write_text(json.dumps(data))
    return str(d)


PARAMS_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_seq_len"]
CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "max_position_embeddings", "model_type",
               "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "vocab_size", "rope_scaling"]


@pytest.mark.parametrize("key", PARAMS_KEYS)
@SETTINGS
@given(value=JSON_VALUES)
def test_params_json_fields(tmp_path, key, value):
    _open_all_ways(_mutated_copy(tmp_path, "meta-tiny", "params.json", [key], value))


@pytest.mark.parametrize("key", CONFIG_KEYS)
@SETTINGS
@given(value=JSON_VALUES)
def test_hf_config_json_fields(tmp_path, key, value):
    _open_all_ways(_mutated_copy(tmp_path, "hf-llama-tiny", "config.json", [key], value))


@pytest.mark.parametrize("key", [["weight_map"], ["metadata"], ["weight_map", "lm_head.weight"],
                                 ["weight_map", "model.embed_tokens.weight"]])
@SETTINGS
@given(value=JSON_VALUES)
def test_index_json_fields(tmp_path, key, value):
    _open_all_ways(_mutated_copy(tmp_path, "hf-llama-tiny-bin", "pytorch_model.bin.index.json", key, value))


@pytest.mark.parametrize("fixture,side_file", [("meta-tiny", "params.json"), ("hf-llama-tiny", "config.json"),
                                               ("hf-llama-tiny-bin", "pytorch_model.bin.index.json")])
@pytest.mark.parametrize("text", ["", "{", "[]", "null", "1e999", '"x"', "\x00\xff", "{" * 5000])
def test_unparsable_side_files(tmp_path, fixture, side_file, text):
    d = tmp_path / "m"
    shutil.copytree(fixture_path(fixture), d)
    (d / side_file).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(WconvError) as e:
        wconv.load(str(d))
    assert "\n" not in str(e.value) and side_file in str(e.value)


# --- specific wrong types: one-line errors naming the field, or ignored where harmless ------------

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

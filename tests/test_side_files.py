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
from wconv.errors import WconvError

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

"""Files and directories -> Model (wconv.convert.sources), checked against torch.load."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import fixture_path, realdata_path
from helpers import assert_same_tensors
from wconv.convert.load import load_model
from wconv.convert.sources import load_safetensors_file, load_torch_file
from wconv.errors import FormatError, UnsupportedError

import torch  # noqa: E402  (a pinned test dependency: fail, never skip, when it is missing)

META_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight", "attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k",
              "attention.wv.weight": "attn_v", "attention.wo.weight": "attn_output",
              "feed_forward.w1.weight": "ffn_gate", "feed_forward.w2.weight": "ffn_down",
              "feed_forward.w3.weight": "ffn_up", "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}
GPT2_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
              "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
              "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def meta_canon(name):
    if name in META_NAMES:
        return META_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{META_NAMES[rest]}.weight"


def gpt2_canon(name):
    if name in GPT2_NAMES:
        return GPT2_NAMES[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GPT2_NAMES[module]}.{kind}"


def bits(t: "torch.Tensor") -> np.ndarray:
    """A torch tensor's stored bits as numpy (bf16 as uint16, like LazyTensor.raw())."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


# --- fixtures against torch ----------------------------------------------------------------------

def test_meta_tiny_matches_torch_load():
    m = load_model(fixture_path("meta-tiny"))
    theirs = torch.load(fixture_path("meta-tiny", "consolidated.00.pth"), weights_only=True)
    assert len(m.tensors) == len(theirs)
    for name, t in theirs.items():
        np.testing.assert_array_equal(m[meta_canon(name)].raw(), bits(t), err_msg=name)
    c = m.config
    params = json.load(open(fixture_path("meta-tiny", "params.json")))
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (64, 2, 4, 2, 256)
    assert c.hidden_dim == theirs["layers.0.feed_forward.w1.weight"].shape[0] == 224
    assert c.rope_theta == params["rope_theta"] and c.norm_eps == params["norm_eps"]
    assert m.source_format == "torch-zip" and m.source_layout == "meta"
    assert sorted(m.metadata["_input_files"]) == sorted([fixture_path("meta-tiny", "consolidated.00.pth"),
                                                         fixture_path("meta-tiny", "params.json")])


def test_two_shards_merge_like_torch_cat():
    merged = load_model(fixture_path("meta-tiny-2shard"))
    shards = [torch.load(fixture_path("meta-tiny-2shard", f"consolidated.{k:02d}.pth"), weights_only=True)
              for k in range(2)]
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        if shards[0][name].ndim == 1:
            expect = shards[0][name]
        else:
            axis = 1 if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
            expect = torch.cat([s[name] for s in shards], dim=axis)
        np.testing.assert_array_equal(merged[meta_canon(name)].raw(), bits(expect), err_msg=name)
    assert_same_tensors(merged, load_model(fixture_path("meta-tiny")), ordered=True)
    assert merged.metadata["n_shards"] == 2 and "rope.freqs" not in merged.tensors
    assert len(merged.metadata["_input_files"]) == 3


@pytest.mark.parametrize("hf_dir", ["hf-llama-tiny", "hf-llama-tiny-bin"])
def test_hf_llama_dirs_give_the_meta_weights(hf_dir):
    meta = load_model(fixture_path("meta-tiny"))
    hf = load_model(fixture_path(hf_dir))
    assert hf.source_layout == "hf-llama"
    assert hf.config == meta.config
    assert_same_tensors(hf, meta, ordered=True)


def test_hf_fixture_runs_in_transformers_like_our_meta_reading():
    transformers = pytest.importorskip("transformers")
    from wconv import reference

    hf = transformers.LlamaForCausalLM.from_pretrained(fixture_path("hf-llama-tiny"), dtype=torch.float32).eval()
    tokens = [5, 17, 200, 3, 99, 42, 7, 255]
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].numpy()
    ours = reference.forward(load_model(fixture_path("meta-tiny")), tokens)
    assert np.abs(ours - theirs).max() < 1e-4 and np.abs(theirs).max() > 0.1


def test_meta_f16_llama2_style_params():
    m = load_model(fixture_path("meta-tiny-f16"))
    c = m.config
    assert c.vocab_size == 128  # params.json: -1
    assert c.n_kv_heads == c.n_heads == 4  # no n_kv_heads
    assert c.rope_theta == 10000.0 and c.norm_eps == 1e-6 and c.max_seq_len == 2048
    assert all(t.dtype.name == "F16" for t in m)
    theirs = torch.load(fixture_path("meta-tiny-f16", "consolidated.00.pth"), weights_only=True)
    for name, t in theirs.items():
        np.testing.assert_array_equal(m[meta_canon(name)].raw(), t.numpy())


def test_llama2c_ckpt():
    m = load_torch_file(fixture_path("llama2c-ckpt.pt"))
    ck = torch.load(fixture_path("llama2c-ckpt.pt"), weights_only=True)
    assert m.source_layout == "llama2c-ckpt"
    sd = ck["model"]
    assert sd["output.weight"].untyped_storage().data_ptr() == sd["tok_embeddings.weight"].untyped_storage().data_ptr()
    assert m.config.tie_embeddings and "output.weight" not in m.tensors
    for name, t in sd.items():
        if name != "output.weight":
            np.testing.assert_array_equal(m[meta_canon(name)].raw(), t.numpy(), err_msg=name)
    args = ck["model_args"]
    c = m.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        args["dim"], args["n_layers"], args["n_heads"], args["n_kv_heads"], args["vocab_size"], args["max_seq_len"])
    assert c.hidden_dim == sd["layers.0.feed_forward.w1.weight"].shape[0]
    md = m.metadata
    assert md["iter_num"] == ck["iter_num"] and md["model_args"] == args and md["config"] == ck["config"]
    opt = md["optimizer"]["optimizer"]
    state = ck["optimizer"]["state"]
    assert opt["n_param_states"] == len(state)
    assert opt["n_tensors"] == sum(len(v) for v in state.values())
    assert opt["n_bytes"] == sum(t.numel() * t.element_size() for v in state.values() for t in v.values())
    assert md["best_val_loss"] == {"tensor": {"dtype": "F32", "shape": []}}


def test_nanogpt_ckpt():
    m = load_torch_file(fixture_path("nanogpt-ckpt.pt"))
    ck = torch.load(fixture_path("nanogpt-ckpt.pt"), weights_only=True)
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    assert m.source_layout == "nanogpt" and m.config.tie_embeddings and m.config.bias
    for name, t in sd.items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(m[gpt2_canon(name)].raw(), t.numpy(), err_msg=name)
    assert len(m.tensors) == len(sd) - 1
    a, c = ck["model_args"], m.config
    assert (c.dim, c.n_layers, c.n_heads, c.vocab_size, c.max_seq_len, c.hidden_dim) == (
        a["n_embd"], a["n_layer"], a["n_head"], a["vocab_size"], a["block_size"], 4 * a["n_embd"])
    assert c.norm_eps == 1e-5


# --- real third-party files --------------------------------------------------------------------

def test_real_hf_gpt2_dir_against_safetensors_lib():
    from safetensors import safe_open

    d = realdata_path("safetensors", "lm-buddy_fake_gpt2")
    m = load_model(d)
    assert m.source_layout == "hf-gpt2" and m.config.tie_embeddings
    assert (m.config.dim, m.config.n_heads, m.config.vocab_size, m.config.max_seq_len) == (2, 1, 50257, 1024)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with safe_open(f"{d}/model.safetensors", framework="numpy") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            np.testing.assert_array_equal(m[gpt2_canon(name)].raw(), w.T if name.endswith(conv1d) else w)


def test_real_custom_nanogpt_refused_with_reason():
    path = realdata_path("torch", "nanogpt_style_small-gpt_ckpt.pt")
    with pytest.raises(UnsupportedError, match=r"ffd\.w1.*n_embed") as e:
        load_model(path)
    assert path in str(e.value)
    m = load_model(path, strict=False)
    assert m.config.arch == "unknown" and len(m.tensors) == 18
    assert m.metadata["model_args"]["n_embed"] == 64 and m.metadata["iter_num"] == 20


def test_real_bare_meta_state_dict(tmp_path):
    path = realdata_path("torch", "torchtune_tiny_fair_checkpoint_meta_format.pt")
    with pytest.raises(UnsupportedError, match="n_heads cannot be inferred"):
        load_model(path)
    loose = load_model(path, strict=False)
    assert loose.config.arch == "llama" and loose.config.n_heads == 0 and loose.config.dim == 32
    # with Meta's params.json beside it, it loads; n_kv_heads comes from wk's shape
    shutil.copy(path, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    m = load_model(tmp_path / "consolidated.00.pth")
    assert (m.config.n_heads, m.config.n_kv_heads, m.config.vocab_size, m.config.hidden_dim) == (4, 4, 500, 256)
    assert_same_tensors(m, load_model(str(tmp_path)), ordered=True)


# --- errors ------------------------------------------------------------------------------------

def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture_path(name), dst)
    return dst


def test_missing_shard(tmp_path):
    d = _copy("meta-tiny-2shard", tmp_path)
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(FormatError, match="missing shard consolidated.00.pth"):
        load_model(str(d))


def test_mismatched_shard_shapes(tmp_path):
    d = _copy("meta-tiny-2shard", tmp_path)
    shard = torch.load(d / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:, :10].clone()
    torch.save(shard, d / "consolidated.01.pth")
    with pytest.raises(FormatError, match=r"consolidated.01.pth: tensor layers.0.attention.wq.weight.*does not fit"):
        load_model(str(d))


def test_lone_shard_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="one of 2 model-parallel shards"):
        load_model(fixture_path("meta-tiny-2shard", "consolidated.01.pth"))
    with pytest.raises(UnsupportedError, match="one of 2 shards listed in pytorch_model.bin.index.json"):
        load_model(fixture_path("hf-llama-tiny-bin", "pytorch_model-00001-of-00002.bin"))


def test_index_naming_missing_file_or_tensor(tmp_path):
    d = _copy("hf-llama-tiny-bin", tmp_path)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FormatError, match="names shard pytorch_model-00002-of-00002.bin which does not exist"):
        load_model(str(d))
    d = _copy("hf-llama-tiny-bin", tmp_path / "b")
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00002.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="does not contain 'model.norm.weight'"):
        load_model(str(d))
    index["weight_map"] = {}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="no weight_map"):
        load_model(str(d))


def test_bad_json_and_missing_params(tmp_path):
    d = _copy("meta-tiny", tmp_path)
    (d / "params.json").write_text("{dim: 64")
    with pytest.raises(FormatError, match="params.json: not valid JSON"):
        load_model(str(d))
    (d / "params.json").unlink()
    with pytest.raises(FormatError, match="no params.json"):
        load_model(str(d))
    assert load_model(str(d), strict=False).config.n_heads == 0  # inspect still shows it
    h = _copy("hf-llama-tiny", tmp_path / "h")
    (h / "config.json").write_text("[]")
    with pytest.raises(FormatError, match="config.json: expected a JSON object"):
        load_model(str(h))


def test_directories_without_a_model(tmp_path):
    with pytest.raises(FormatError, match="no model files"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="no model.safetensors"):
        load_model(str(tmp_path))
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(fixture_path("llama2c-ckpt.pt"), single / "ckpt.pt")
    assert load_model(str(single)).source_layout == "llama2c-ckpt"


def test_safetensors_shard_passed_alone(tmp_path):
    d = _copy("hf-llama-tiny", tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UnsupportedError, match="one of 2 shards"):
        load_safetensors_file(str(d / "model-00001-of-00002.safetensors"))

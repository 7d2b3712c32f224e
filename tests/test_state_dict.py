"""Layout detection and hyperparameter derivation (wconv.convert.state_dict).

State dicts here are built by hand with each project's own tensor names (not from
wconv.layouts), and HF checkpoints are made from Meta ones with torch, the way
transformers' conversion script permutes q/k.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import hf_permute
from wconv.convert import state_dict as sd
from wconv.errors import FormatError, UnsupportedError
from wconv.tensor import LazyTensor


def _t(name, arr, key=None):
    t = LazyTensor.from_array(name, np.ascontiguousarray(arr))
    t.storage_key = key if key is not None else ("mem", name)
    return t


def meta_state(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, hidden=48, seed=0, tie=False):
    """A Meta/llama2.c-named state dict of random float32 tensors."""
    rng = np.random.default_rng(seed)
    hd = dim // n_heads

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    out = {"tok_embeddings.weight": _t("tok_embeddings.weight", r(vocab, dim))}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name, shape in [("attention.wq.weight", (n_heads * hd, dim)),
                            ("attention.wk.weight", (n_kv_heads * hd, dim)),
                            ("attention.wv.weight", (n_kv_heads * hd, dim)),
                            ("attention.wo.weight", (dim, n_heads * hd)),
                            ("feed_forward.w1.weight", (hidden, dim)), ("feed_forward.w2.weight", (dim, hidden)),
                            ("feed_forward.w3.weight", (hidden, dim)), ("attention_norm.weight", (dim,)),
                            ("ffn_norm.weight", (dim,))]:
            out[p + name] = _t(p + name, r(*shape))
    out["norm.weight"] = _t("norm.weight", r(dim))
    if tie:
        emb = out["tok_embeddings.weight"]
        out["output.weight"] = LazyTensor("output.weight", emb.dtype, emb.shape, emb.loader, "mem", emb.storage_key)
    else:
        out["output.weight"] = _t("output.weight", r(vocab, dim))
    return out


def build(tensors, **kw):
    kw.setdefault("path", "test.pth")
    kw.setdefault("source_format", "memory")
    kw.setdefault("files", ["test.pth"])
    return sd.build_model(tensors, **kw)


META_TO_CANON = {"attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k", "attention.wv.weight": "attn_v",
                 "attention.wo.weight": "attn_output", "feed_forward.w1.weight": "ffn_gate",
                 "feed_forward.w2.weight": "ffn_down", "feed_forward.w3.weight": "ffn_up",
                 "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}


def canon_name(meta_name):
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if meta_name in top:
        return top[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{META_TO_CANON[rest]}.weight"


# --- Meta hyperparameters ----------------------------------------------------------------------

def test_meta_hparams_from_params_and_shapes():
    state = meta_state(dim=32, n_heads=4, n_kv_heads=2, vocab=40, hidden=48)
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1, "multiple_of": 16,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-6, "rope_theta": 500000.0}
    m = build(state, params=params)
    c = m.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads) == ("llama", 32, 2, 4)
    assert c.n_kv_heads == 2  # from wk: 16 rows / head_dim 8
    assert c.vocab_size == 40  # params said -1
    assert c.hidden_dim == 48  # from w1
    assert c.norm_eps == 1e-6 and c.rope_theta == 500000.0 and not c.tie_embeddings
    assert c.max_seq_len == 2048  # Meta's ModelArgs default
    assert any("max_seq_len" in n for n in m.metadata["notes"])
    assert m.metadata["params"]["ffn_dim_multiplier"] == 1.3
    assert m.source_layout == "meta" and m.metadata["_input_files"] == ["test.pth"]
    for name, t in state.items():
        np.testing.assert_array_equal(m[canon_name(name)].raw(), t.raw())
    assert list(m.tensors)[:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]


def test_meta_declared_values_that_contradict_shapes():
    state = meta_state(n_kv_heads=2)
    bad = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": -1}
    with pytest.raises(FormatError, match="n_kv_heads=4"):
        build(state, params=bad)
    with pytest.raises(FormatError, match="vocab_size=41"):
        build(state, params={"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 41})
    with pytest.raises(FormatError, match="n_layers=3"):
        build(state, params={"dim": 32, "n_layers": 3, "n_heads": 4})
    with pytest.raises(FormatError, match="even-sized heads"):
        build(state, params={"n_heads": 5})
    m = build(state, params=bad, strict=False)
    assert any("n_kv_heads=4" in w for w in m.metadata["warnings"])


def test_bare_meta_state_dict_needs_n_heads():
    state = meta_state()
    with pytest.raises(UnsupportedError, match="n_heads cannot be inferred.*params.json"):
        build(state)
    m = build(state, strict=False)
    assert m.config.arch == "llama" and m.config.n_heads == 0 and m.config.n_kv_heads == 0
    assert m.config.dim == 32 and m.config.vocab_size == 40 and m.config.hidden_dim == 48
    assert any("n_heads" in w for w in m.metadata["warnings"])


def test_tie_detected_by_shared_storage_only():
    tied = build(meta_state(tie=True), model_args={"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                   "vocab_size": 40, "multiple_of": 16, "max_seq_len": 64})
    assert tied.source_layout == "llama2c-ckpt"
    assert tied.config.tie_embeddings and "output.weight" not in tied.tensors
    assert tied.config.max_seq_len == 64
    # Equal values in separate storages stay untied: we never read data to compare.
    state = meta_state()
    emb = state["tok_embeddings.weight"]
    state["output.weight"] = LazyTensor("output.weight", emb.dtype, emb.shape, emb.loader, "mem", ("other", 1))
    untied = build(state, params={"n_heads": 4})
    assert not untied.config.tie_embeddings and "output.weight" in untied.tensors


def test_prefixes_and_ignored_buffers():
    state = {"_orig_mod.module." + k: v for k, v in meta_state().items()}
    state["rope.freqs"] = _t("rope.freqs", np.ones(4, np.float32))
    m = build(state, params={"n_heads": 4})
    assert m.source_layout == "meta" and len(m.tensors) == 2 + 2 * 9 + 1


def test_duplicate_after_prefix_stripping():
    state = meta_state()
    state["module.norm.weight"] = state["norm.weight"]
    with pytest.raises(FormatError, match="appears twice"):
        build(state, params={"n_heads": 4})


def test_missing_and_misshapen_tensors():
    state = meta_state()
    del state["layers.1.feed_forward.w3.weight"]
    with pytest.raises(FormatError, match="missing tensors blk.1.ffn_up.weight"):
        build(state, params={"n_heads": 4})
    state = meta_state()
    w2 = state["layers.0.feed_forward.w2.weight"]
    state["layers.0.feed_forward.w2.weight"] = _t("w2", w2.raw().T)
    with pytest.raises(FormatError, match=r"blk.0.ffn_down.weight has shape \[48, 32\], expected \[32, 48\]"):
        build(state, params={"n_heads": 4})


def test_unknown_layout():
    state = {"l1.weight": _t("l1.weight", np.zeros((3, 4), np.float32))}
    with pytest.raises(UnsupportedError, match="unrecognised checkpoint layout.*l1.weight"):
        build(state)
    m = build(state, strict=False, extras={"epoch": 3})
    assert m.config.arch == "unknown" and list(m.tensors) == ["l1.weight"] and m.metadata["epoch"] == 3


def _custom_nanogpt():
    """Same structure as ../shared/realdata/torch/nanogpt_style_small-gpt_ckpt.pt (SwiGLU, no biases)."""
    rng = np.random.default_rng(1)
    d, v, h = 16, 30, 40
    state = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (8, d), "transformer.ln_f.weight": (d,),
             "lm_head.weight": (v, d)}
    for i in range(2):
        p = f"transformer.h.{i}."
        state.update({p + "ln_1.weight": (d,), p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_proj.weight": (d, d),
                      p + "ln_2.weight": (d,), p + "ffd.w1.weight": (h, d), p + "ffd.w2.weight": (d, h),
                      p + "ffd.w3.weight": (h, d)})
    return {k: _t(k, rng.standard_normal(s).astype(np.float32)) for k, s in state.items()}


def test_custom_nanogpt_variant_is_refused_but_inspectable():
    args = {"n_layer": 2, "n_head": 2, "n_embed": 16, "block_size": 8, "bias": False, "vocab_size": 30}
    with pytest.raises(UnsupportedError, match=r"nanoGPT-style checkpoint with unrecognised tensors "
                                               r"transformer\.h\.0\.ffd\.w1\.weight.*model_args n_embed"):
        build(_custom_nanogpt(), model_args=args)
    m = build(_custom_nanogpt(), model_args=args, strict=False, extras={"iter_num": 20})
    assert m.config.arch == "unknown" and m.source_layout == "unknown"
    assert "transformer.h.0.ffd.w1.weight" in m.tensors and m.metadata["model_args"]["n_embed"] == 16
    assert m.metadata["layout_guess"] == "nanogpt" and m.metadata["iter_num"] == 20


# --- Hugging Face Llama -----------------------------------------------------------------------

def _hf_from_meta(state, n_heads, n_kv_heads, tie=False):
    """An HF LlamaForCausalLM state dict from Meta weights, permuted with torch like transformers does."""
    import torch

    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
           "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
           "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
           "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
           "ffn_norm.weight": "post_attention_layernorm.weight"}
    out = {}
    for name, t in state.items():
        w = torch.from_numpy(np.array(t.raw()))
        if name in names:
            hf = names[name]
        else:
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{per[rest]}"
            if rest == "attention.wq.weight":
                w = hf_permute(w, n_heads)
            elif rest == "attention.wk.weight":
                w = hf_permute(w, n_kv_heads)
        if tie and hf == "lm_head.weight":
            continue
        out[hf] = _t(hf, w.contiguous().numpy())
    return out


def _hf_config(n_heads, n_kv_heads, tie=False, **over):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "intermediate_size": 48,
           "vocab_size": 40, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": tie}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (2, 1)])
def test_hf_llama_unpermute_recovers_meta_weights(n_heads, n_kv_heads):
    state = meta_state(n_heads=n_heads, n_kv_heads=n_kv_heads, seed=n_heads * 10 + n_kv_heads)
    hf = _hf_from_meta(state, n_heads, n_kv_heads)
    m = build(hf, hf_config=_hf_config(n_heads, n_kv_heads))
    assert m.source_layout == "hf-llama"
    c = m.config
    assert (c.n_heads, c.n_kv_heads, c.max_seq_len, c.norm_eps) == (n_heads, n_kv_heads, 128, 1e-6)
    for name, t in state.items():
        np.testing.assert_array_equal(m[canon_name(name)].raw(), t.raw(), err_msg=name)


def test_hf_k_permutation_really_depends_on_n_kv_heads():
    # Guard against a test that cannot fail: un-permuting k with n_heads gives other rows.
    from wconv.arch.decoder import hf_unpermute

    state = meta_state(n_heads=4, n_kv_heads=2, seed=3)
    hf = _hf_from_meta(state, 4, 2)
    k_hf = hf["model.layers.0.self_attn.k_proj.weight"].raw()
    assert not np.array_equal(hf_unpermute(k_hf, 4), state["layers.0.attention.wk.weight"].raw())
    assert np.array_equal(hf_unpermute(k_hf, 2), state["layers.0.attention.wk.weight"].raw())


def test_hf_llama_tie_and_missing_lm_head():
    state = meta_state(seed=4)
    hf = _hf_from_meta(state, 4, 2, tie=True)
    m = build(hf, hf_config=_hf_config(4, 2, tie=True))
    assert m.config.tie_embeddings and "output.weight" not in m.tensors
    with pytest.raises(FormatError, match="lm_head.weight is missing"):
        build(hf, hf_config=_hf_config(4, 2, tie=False))
    with pytest.raises(FormatError, match="head_dim 16 x 4 heads does not match"):
        build(_hf_from_meta(state, 4, 2), hf_config=_hf_config(4, 2, head_dim=16))


# --- GPT-2 --------------------------------------------------------------------------------------

def _gpt2_state(d=16, n_layers=2, vocab=30, n_ctx=12, bias=True, hf=False, seed=0):
    """nanoGPT (nn.Linear [out, in]) or HF GPT-2 (Conv1D [in, out]) names and shapes."""
    rng = np.random.default_rng(seed)

    def lin(name, n_out, n_in):
        shape = (n_in, n_out) if hf else (n_out, n_in)
        return {name + ".weight": shape, **({name + ".bias": (n_out,)} if bias else {})}

    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (n_ctx, d)}
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (d,), **({p + "ln_1.bias": (d,)} if bias else {})})
        shapes.update(lin(p + "attn.c_attn", 3 * d, d))
        shapes.update(lin(p + "attn.c_proj", d, d))
        shapes.update({p + "ln_2.weight": (d,), **({p + "ln_2.bias": (d,)} if bias else {})})
        shapes.update(lin(p + "mlp.c_fc", 4 * d, d))
        shapes.update(lin(p + "mlp.c_proj", d, 4 * d))
    shapes.update({"transformer.ln_f.weight": (d,), **({"transformer.ln_f.bias": (d,)} if bias else {})})
    return {k: _t(k, rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}


def test_nanogpt_tied_lm_head_and_mask_buffers():
    state = _gpt2_state(bias=False)
    wte = state["transformer.wte.weight"]
    state["lm_head.weight"] = LazyTensor("lm_head.weight", wte.dtype, wte.shape, wte.loader, "m", wte.storage_key)
    state["transformer.h.0.attn.bias"] = _t("mask", np.ones((1, 1, 12, 12), np.float32))
    args = {"n_layer": 2, "n_head": 4, "n_embd": 16, "block_size": 12, "bias": False, "vocab_size": 30, "dropout": 0.0}
    m = build(state, model_args=args)
    c = m.config
    assert m.source_layout == "nanogpt"
    assert (c.arch, c.dim, c.n_heads, c.max_seq_len, c.hidden_dim, c.bias, c.tie_embeddings) == \
        ("gpt2", 16, 4, 12, 64, False, True)
    np.testing.assert_array_equal(m["blk.1.attn_qkv.weight"].raw(), state["transformer.h.1.attn.c_attn.weight"].raw())
    assert not any(n.endswith(".bias") for n in m.tensors)
    with pytest.raises(FormatError, match="bias"):
        build(state, model_args=dict(args, bias=True))


def test_hf_gpt2_transposed_and_prefix_optional():
    state = _gpt2_state(hf=True, seed=2)
    bare = {k[len("transformer."):]: v for k, v in state.items()}  # GPT2Model saves without the prefix
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2,
           "n_positions": 12, "vocab_size": 30, "layer_norm_epsilon": 1e-5}
    for tensors in (state, bare):
        m = build(tensors, hf_config=cfg)
        assert m.source_layout == "hf-gpt2" and m.config.tie_embeddings and m.config.bias
        np.testing.assert_array_equal(m["blk.0.attn_qkv.weight"].raw(),
                                      state["transformer.h.0.attn.c_attn.weight"].raw().T)
        np.testing.assert_array_equal(m["blk.1.ffn_down.weight"].raw(),
                                      state["transformer.h.1.mlp.c_proj.weight"].raw().T)
        np.testing.assert_array_equal(m["blk.1.ffn_down.bias"].raw(), state["transformer.h.1.mlp.c_proj.bias"].raw())
        assert m["blk.0.ffn_up.weight"].shape == (64, 16)
    # without config.json the Conv1D orientation alone says it is HF
    m = build(state, strict=False)
    assert m.source_layout == "hf-gpt2" and m.config.n_heads == 0


# --- shards ---------------------------------------------------------------------------------------

def _split(state, n):
    axis_of = {"attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1}
    shards = [dict() for _ in range(n)]
    for name, t in state.items():
        arr = t.raw()
        key = name.split(".", 2)[-1] if name.startswith("layers.") else name
        axis = axis_of.get(key, 0 if arr.ndim == 2 else None)
        for k in range(n):
            part = arr if axis is None else np.array_split(arr, n, axis=axis)[k]
            shards[k][name] = _t(name, part, key=(k, name))
    return [(f"consolidated.{k:02d}.pth", s) for k, s in enumerate(shards)]


def test_merge_meta_shards_equals_numpy_concat():
    state = meta_state(n_kv_heads=4, seed=7)
    merged = sd.merge_meta_shards(_split(state, 2))
    for name, t in state.items():
        np.testing.assert_array_equal(merged[name].raw(), t.raw(), err_msg=name)


def test_merge_meta_shards_errors():
    shards = _split(meta_state(n_kv_heads=4), 2)
    bad = [shards[0], (shards[1][0], dict(shards[1][1]))]
    bad[1][1]["norm.weight"] = _t("norm.weight", np.ones(7, np.float32))
    with pytest.raises(FormatError, match="consolidated.01.pth: replicated tensor norm.weight"):
        sd.merge_meta_shards(bad)
    bad[1][1]["norm.weight"] = shards[1][1]["norm.weight"]
    bad[1][1]["layers.0.attention.wq.weight"] = _t("wq", np.ones((16, 31), np.float32))
    with pytest.raises(FormatError, match="does not fit"):
        sd.merge_meta_shards(bad)
    del bad[1][1]["layers.0.attention.wq.weight"]
    with pytest.raises(FormatError, match="different tensors"):
        sd.merge_meta_shards(bad)


# --- summaries -------------------------------------------------------------------------------------

def test_summarise_is_bounded_and_reads_no_data():
    never = LazyTensor("x", sd.LazyTensor.from_array("y", np.zeros(2, np.float32)).dtype, (3, 4),
                       lambda: pytest.fail("tensor data read"))
    opt = {"state": {i: {"step": never, "exp_avg": never, "exp_avg_sq": never} for i in range(5)},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": list(range(5))}]}
    out = sd.summarise({"optimizer": opt, "losses": list(range(1000)), "text": "x" * 5000,
                        "nan": float("nan"), "best": never})
    assert out["optimizer"]["optimizer"]["n_tensors"] == 15
    assert out["optimizer"]["optimizer"]["n_bytes"] == 15 * 12 * 4
    assert out["optimizer"]["optimizer"]["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert out["optimizer"]["optimizer"]["param_groups"][0] == {"lr": 1e-3, "betas": [0.9, 0.95], "n_params": 5}
    assert out["losses"]["list_length"] == 1000 and len(out["losses"]["head"]) == 8
    assert len(out["text"]) < 400 and out["nan"] == "nan"
    assert out["best"] == {"tensor": {"dtype": "F32", "shape": [3, 4]}}

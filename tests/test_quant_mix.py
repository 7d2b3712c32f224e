"""wconv.quant_mix (+ wconv.kquants) against llama.cpp's own llama_model_quantize.

Whole models: f32 GGUFs written by wconv are quantised by llama.cpp (default params,
no imatrix, 2 threads) for every ftype; each output tensor's type must equal the
plan and its bytes our encoder applied to the f32 source tensor. Further synthetic
GGUFs (written with gguf-py: llama_model_quantize only reads hparams and names) check
the types for GPT-2's fused attn_qkv, Falcon, 8 experts, the 70B rule and the
overrides. The first block of tests needs no llama.cpp.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os

import numpy as np
import pytest

import modelgen
from wconv import codecs, quant_mix
from wconv.formats import gguf_io
from wconv.quant_mix import HParams, Overrides
from wconv.tensor import LazyTensor

FTYPES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
          "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32"]


def llama_names(n_layers, dim, hidden, vocab, tied=False, kv_dim=None):
    kv_dim = kv_dim or dim
    t = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        t["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": (dim,), p + "attn_q.weight": (dim, dim), p + "attn_k.weight": (kv_dim, dim),
                  p + "attn_v.weight": (kv_dim, dim), p + "attn_output.weight": (dim, dim),
                  p + "ffn_norm.weight": (dim,), p + "ffn_gate.weight": (hidden, dim),
                  p + "ffn_up.weight": (hidden, dim), p + "ffn_down.weight": (dim, hidden)})
    return t


# ----------------------------------------------------------------------------- rules, no llama.cpp

def test_visiting_order_is_by_layer_number_then_name():
    names = ["blk.10.attn_v.weight", "blk.2.ffn_down.weight", "output.weight", "blk.2.attn_v.weight",
             "token_embd.weight"]
    assert quant_mix.visiting_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_v.weight",
                                               "blk.2.ffn_down.weight", "blk.10.attn_v.weight"]


def test_q4_k_m_more_bits_layers_and_output():
    p = quant_mix.plan(llama_names(8, 256, 512, 512), HParams(8, 4, 4), "Q4_K_M")
    more = {i for i in range(8) if p.types[f"blk.{i}.attn_v.weight"] == "Q6_K"}
    assert more == {0, 3, 6, 7}  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2
    assert {i for i in range(8) if p.types[f"blk.{i}.ffn_down.weight"] == "Q6_K"} == more
    assert p.types["output.weight"] == "Q6_K" and p.types["token_embd.weight"] == "Q4_K"
    assert p.types["blk.0.attn_norm.weight"] == "F32" and p.types["blk.1.attn_q.weight"] == "Q4_K"
    assert p.file_type == 15 and not p.fallbacks


def test_tied_embedding_is_the_output_and_fallbacks_are_reported():
    p = quant_mix.plan(llama_names(8, 256, 352, 512, tied=True), HParams(8, 8, 2), "q4_k_m")
    assert p.types["token_embd.weight"] == "Q6_K"
    assert p.types["blk.0.ffn_down.weight"] == "Q8_0" and p.types["blk.1.ffn_down.weight"] == "Q5_0"
    assert [(f.name, f.wanted, f.used) for f in p.fallbacks][:2] == [
        ("blk.0.ffn_down.weight", "Q6_K", "Q8_0"), ("blk.1.ffn_down.weight", "Q4_K", "Q5_0")]
    assert "352" in p.fallbacks[0].why
    odd = quant_mix.plan({"output.weight": (512, 100), "token_embd.weight": (512, 100)}, HParams(1, 1, 1), "q4_k_m")
    assert odd.types == {"output.weight": "F16", "token_embd.weight": "F16"}  # Q8_0 would not fit either


def test_gqa_and_70b_and_experts():
    names = llama_names(8, 256, 512, 512, kv_dim=64)
    assert quant_mix.plan(names, HParams(8, 8, 2), "q2_k").types["blk.3.attn_v.weight"] == "Q4_K"
    assert quant_mix.plan(names, HParams(8, 8, 4), "q2_k").types["blk.3.attn_v.weight"] == "Q3_K"
    big = llama_names(80, 256, 256, 256, kv_dim=32)
    assert quant_mix.plan(big, HParams(80, 8, 1), "q3_k_s").types["blk.40.attn_v.weight"] == "Q5_K"
    assert quant_mix.plan(big, HParams(80, 8, 8), "q3_k_s").types["blk.40.attn_v.weight"] == "Q3_K"  # 65B
    moe = {"blk.0.attn_v.weight": (256, 256), "blk.0.attn_k.weight": (256, 256), "blk.0.attn_output.weight": (256, 256),
           "blk.0.ffn_down_exps.weight": (8, 256, 512), "blk.0.ffn_gate_inp.weight": (8, 256)}
    p = quant_mix.plan(moe, HParams(8, 4, 4, n_expert=8), "q4_k_m")
    assert p.types == {"blk.0.attn_v.weight": "Q8_0", "blk.0.attn_k.weight": "Q8_0",
                       "blk.0.attn_output.weight": "Q5_K", "blk.0.ffn_down_exps.weight": "Q6_K",
                       "blk.0.ffn_gate_inp.weight": "F32"}


def test_gpt2_fused_qkv_takes_the_attn_v_rules():
    names = {"token_embd.weight": (512, 256), "position_embd.weight": (64, 256)}
    for i in range(8):
        names[f"blk.{i}.attn_qkv.weight"] = (768, 256)
        names[f"blk.{i}.attn_qkv.bias"] = (768,)
    p = quant_mix.plan(names, HParams(8, 4, 4, arch="gpt2"), "q4_k_m")
    assert [p.types[f"blk.{i}.attn_qkv.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K",
                                                                       "Q4_K", "Q6_K", "Q6_K"]
    assert p.types["position_embd.weight"] == "F32" and p.types["blk.0.attn_qkv.bias"] == "F32"


def test_overrides_and_names():
    names = llama_names(8, 256, 512, 512)
    p = quant_mix.plan(names, HParams(8, 4, 4), "Q4_K_M",
                       {"output_tensor_type": "q8_0", "token_embedding_type": "Q6_K"})
    assert p.types["output.weight"] == "Q8_0" and p.types["token_embd.weight"] == "Q6_K"
    pure = quant_mix.plan(names, HParams(8, 4, 4), "q4_k_m", Overrides(pure=True))
    assert {t for n, t in pure.types.items() if n.endswith("attn_v.weight") or n == "output.weight"} == {"Q4_K"}
    tied = quant_mix.plan(llama_names(8, 256, 512, 512, tied=True), HParams(8, 4, 4), "q5_k_s",
                          Overrides(output_tensor_type="q8_0"))
    assert tied.types["token_embd.weight"] == "Q8_0"
    with pytest.raises(ValueError, match="unknown quantisation"):
        quant_mix.plan(names, HParams(8, 4, 4), "q4_k_x")
    with pytest.raises(ValueError, match="row length 352"):
        quant_mix.plan({"token_embd.weight": (10, 352)}, HParams(1, 1, 1), "q8_0",
                       Overrides(token_embedding_type="q4_k"))
    f16 = quant_mix.plan([("a.weight", (4, 256), "F16"), ("b_norm.weight", (256,), "F16")], HParams(1, 1, 1), "Q4_0")
    assert f16.types == {"a.weight": "Q4_0", "b_norm.weight": "F16"}


# ----------------------------------------------------------------------------- against llama.cpp
def llama_quantize(llama_cpp, src, dst, ftype, overrides=None):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 0 if ftype == "f32" else getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    ov = overrides or Overrides()
    if ov.output_tensor_type:
        params.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{ov.output_tensor_type.upper()}")
    if ov.token_embedding_type:
        params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{ov.token_embedding_type.upper()}")
    params.pure = ov.pure
    assert llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(params)) == 0


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in r.tensors}
    return tensors, int(r.fields["general.file_type"].parts[-1][0])


def with_edge_rows(model, seed):
    """Every matrix gets a zero row, a constant row, a row with one huge outlier, a tiny row, heavy tails."""
    rng = np.random.default_rng(seed)
    for t in list(model):
        a = t.float32().copy()
        if a.ndim != 2 or a.shape[0] < 8:
            continue
        a[0] = 0.0
        a[1] = 0.05
        a[2, rng.integers(a.shape[1])] = 1e3 * np.abs(a[2]).max()
        a[3] *= 1e-9
        a[4:8] = 0.02 * rng.standard_t(1.5, a[4:8].shape)
        model.add(LazyTensor.from_array(t.name, a))
    return model


MODELS = {
    # untied, no GQA, every row a multiple of 256
    "untied": dict(dim=256, hidden_dim=512, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=256),
    # tied embedding, GQA 4, ffn_down rows of 352: the Q4_K -> Q5_0, Q6_K -> Q8_0 ... fallbacks
    "tied_gqa_352": dict(dim=256, hidden_dim=352, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=256,
                         tie_embeddings=True),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("mix")
    for i, (key, cfg) in enumerate(MODELS.items()):
        m = with_edge_rows(modelgen.random_model(modelgen.llama_config(**cfg), seed=20 + i), seed=i)
        path = os.path.join(d, f"{key}.gguf")
        with contextlib.redirect_stderr(io.StringIO()):
            gguf_io.write(m, path, quiet=True, dtype="f32")
        tensors, _ = read_gguf(path)
        assert all(t == "F32" for t, _ in tensors.values())
        hp = HParams(cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"])
        out[key] = (path, {n: a for n, (_, a) in tensors.items()}, hp, {})
    return out


def encode(src_cache, data, name, qtype):
    key = (name, qtype)
    if key not in src_cache:
        x = data[name]
        if qtype == "F32":
            b = x.astype(np.float32).view(np.uint8).reshape(-1)
        elif qtype == "F16":
            b = x.astype(np.float16).view(np.uint8).reshape(-1)
        elif qtype == "BF16":
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize
            b = quantize(x.astype(np.float32), GGMLQuantizationType.BF16).view(np.uint8).reshape(-1)
        else:
            b = codecs.get(qtype).encode(x)
        src_cache[key] = b
    return src_cache[key]


@pytest.mark.interop
@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_llama_model_quantize_types_and_bytes(llama_cpp, sources, tmp_path, model, ftype):
    src, data, hp, cache = sources[model]
    dst = os.path.join(tmp_path, "q.gguf")
    llama_quantize(llama_cpp, src, dst, ftype)
    theirs, file_type = read_gguf(dst)
    plan = quant_mix.plan({n: a.shape for n, a in data.items()}, hp, ftype)
    assert file_type == plan.file_type
    assert set(theirs) == set(plan.types)
    got_types = {n: t for n, (t, _) in theirs.items()}
    assert got_types == plan.types
    for name, (qtype, arr) in theirs.items():
        assert np.array_equal(encode(cache, data, name, qtype), arr.reshape(-1).view(np.uint8)), (name, qtype)
    if model == "tied_gqa_352" and ftype not in ("f16", "bf16", "f32", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        assert {f.name for f in plan.fallbacks} == {f"blk.{i}.ffn_down.weight" for i in range(8)}


# Types only (llama_model_quantize reads hparams and names, not the architecture's graph).
def synthetic_gguf(path, arch, hp: HParams, tensors: dict, ctx=64):
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_context_length(ctx)
    w.add_embedding_length(64)
    w.add_block_count(hp.n_layers)
    w.add_feed_forward_length(64)
    w.add_head_count(hp.n_heads)
    w.add_head_count_kv(hp.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(2)
    rng = np.random.default_rng(0)
    for name, shape in tensors.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_names(n):
    t = {"token_embd.weight": (256, 256), "position_embd.weight": (64, 256), "output_norm.weight": (256,),
         "output_norm.bias": (256,)}
    for i in range(n):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": (256,), p + "attn_norm.bias": (256,), p + "attn_qkv.weight": (768, 256),
                  p + "attn_qkv.bias": (768,), p + "attn_output.weight": (256, 256), p + "ffn_up.weight": (256, 256),
                  p + "ffn_down.weight": (256, 256)})
    return t


def moe_names(n):
    t = {"token_embd.weight": (256, 256), "output.weight": (256, 256), "output_norm.weight": (256,)}
    for i in range(n):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": (256, 256), p + "attn_k.weight": (64, 256), p + "attn_v.weight": (64, 256),
                  p + "attn_output.weight": (256, 256), p + "ffn_gate_inp.weight": (8, 256),
                  p + "ffn_gate_exps.weight": (8, 32, 256), p + "ffn_up_exps.weight": (8, 32, 256),
                  p + "ffn_down_exps.weight": (8, 32, 256)})
    return t


SYNTHETIC = {
    "gpt2": ("gpt2", HParams(8, 4, 4, arch="gpt2"), gpt2_names(8), ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q4_k_s"]),
    "falcon": ("falcon", HParams(16, 4, 1, arch="falcon"),
               {k.replace("attn_q.weight", "attn_qkv.weight"): v for k, v in llama_names(16, 64, 128, 64).items()
                if "attn_k." not in k and "attn_v." not in k},
               ["q3_k_m", "q3_k_l", "q4_k_m", "q4_k_s"]),
    "moe8": ("llama", HParams(8, 4, 1, n_expert=8), moe_names(8), ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m"]),
    "llama70b": ("llama", HParams(80, 8, 1), llama_names(80, 64, 64, 64, kv_dim=8),
                 ["q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"]),
}


@pytest.mark.interop
@pytest.mark.parametrize("key", sorted(SYNTHETIC))
def test_llama_model_quantize_types_other_shapes(llama_cpp, tmp_path, key):
    arch, hp, names, ftypes = SYNTHETIC[key]
    src = os.path.join(tmp_path, "src.gguf")
    synthetic_gguf(src, arch, hp, names)
    for ftype in ftypes:
        dst = os.path.join(tmp_path, f"{ftype}.gguf")
        llama_quantize(llama_cpp, src, dst, ftype)
        theirs, file_type = read_gguf(dst)
        plan = quant_mix.plan(names, hp, ftype)
        assert {n: t for n, (t, _) in theirs.items()} == plan.types, (key, ftype)
        assert file_type == plan.file_type


@pytest.mark.interop
@pytest.mark.parametrize("overrides", [Overrides(output_tensor_type="q8_0"), Overrides(token_embedding_type="q5_k"),
                                       Overrides(output_tensor_type="q4_k", token_embedding_type="q8_0"),
                                       Overrides(pure=True)])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_model_quantize_overrides(llama_cpp, tmp_path, overrides, tied):
    hp = HParams(8, 8, 2)
    names = llama_names(8, 256, 352, 256, tied=tied, kv_dim=64)
    src = os.path.join(tmp_path, "src.gguf")
    synthetic_gguf(src, "llama", hp, names)
    for ftype in ["q4_k_m", "q3_k_m"]:
        dst = os.path.join(tmp_path, f"{ftype}.gguf")
        llama_quantize(llama_cpp, src, dst, ftype, overrides)
        theirs, _ = read_gguf(dst)
        assert {n: t for n, (t, _) in theirs.items()} == quant_mix.plan(names, hp, ftype, overrides).types, ftype

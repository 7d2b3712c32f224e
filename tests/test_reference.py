"""wconv.reference against independent torch implementations (and transformers when installed)."""
from __future__ import annotations

import numpy as np
import pytest

import modelgen
import torch_reference
from helpers import hf_permute
from wconv import reference
from wconv.errors import UnsupportedError, UsageError
from wconv.model import Config, Model

TOL = 1e-4  # max |logit difference| in float32 (logits are O(1..10) here)

CASES = {
    "llama-gqa": modelgen.llama_config(),
    "llama-tied-mha": modelgen.llama_config(tie_embeddings=True, n_kv_heads=4),
    "llama-mqa-theta": modelgen.llama_config(n_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6),
    "gpt2-tied": modelgen.gpt2_config(),
    "gpt2-untied": modelgen.gpt2_config(tie_embeddings=False),
}


def _tokens(cfg, n=20, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, cfg.vocab_size, n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_float32(case):
    cfg = CASES[case]
    model = modelgen.random_model(cfg, seed=3)
    toks = _tokens(cfg)
    ours = reference.forward(model, toks)
    theirs = torch_reference.logits(model, toks)
    assert ours.shape == (len(toks), cfg.vocab_size) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(ours).max() > 0.5  # not a degenerate all-zero comparison


@pytest.mark.parametrize("case", ["llama-gqa", "gpt2-untied"])
def test_float64_matches_torch_float64(case):
    import torch

    cfg = CASES[case]
    model = modelgen.random_model(cfg, seed=4)
    toks = _tokens(cfg, 12)
    ours = reference.forward(model, toks, float64=True)
    assert ours.dtype == np.float64
    assert np.abs(ours - torch_reference.logits(model, toks, torch.float64)).max() <= 1e-10


def test_rotary_position_matters():
    # Without position information attention is blind to the order of earlier tokens; with
    # RoPE swapping them changes the last logits. A causal prefix ignores what follows.
    cfg = modelgen.llama_config()
    model = modelgen.random_model(cfg, seed=5)
    a = reference.forward(model, [4, 9, 7, 3])
    b = reference.forward(model, [9, 4, 7, 9])
    assert np.abs(a[2] - b[2]).max() > 1e-3
    np.testing.assert_allclose(a[:3], reference.forward(model, [4, 9, 7, 11])[:3], atol=1e-6)


def test_bad_tokens_and_arch():
    cfg = modelgen.llama_config()
    model = modelgen.random_model(cfg)
    with pytest.raises(UsageError):
        reference.forward(model, [cfg.vocab_size])
    with pytest.raises(UsageError):
        reference.forward(model, [])
    with pytest.raises(UsageError):
        reference.forward(model, [1] * (cfg.max_seq_len + 1))
    with pytest.raises(UnsupportedError):
        reference.forward(Model(config=Config(arch="unknown", vocab_size=10)), [1])
    del model.tensors["blk.1.attn_q.weight"]
    with pytest.raises(UnsupportedError):
        reference.forward(model, [1, 2])
    for over in ({"n_kv_heads": 3}, {"n_heads": 5}, {"dim": 32}):  # config no longer fits the tensors
        bad = modelgen.random_model(cfg)
        bad.config = modelgen.llama_config(**over)
        with pytest.raises(UnsupportedError):
            reference.forward(bad, [1, 2])


def test_generate_greedy_is_argmax_chain():
    cfg = modelgen.llama_config()
    model = modelgen.random_model(cfg, seed=6)
    seq = reference.generate(model, [1, 5], 6)
    assert seq[:2] == [1, 5] and len(seq) == 8
    for i in range(2, len(seq)):
        expected = int(np.argmax(torch_reference.logits(model, seq[:i])[-1]))
        assert seq[i] == expected
    # stops at the context length
    assert len(reference.generate(model, [1], 100)) == cfg.max_seq_len


# ----------------------------------------------------------------- transformers (optional)

def test_llama_matches_transformers():
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = CASES["llama-gqa"]
    model = modelgen.random_model(cfg, seed=7)
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                                      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                                      rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
           "ffn_up": "mlp.up_proj"}
    state = {}
    for name, t in model.tensors.items():
        w = t.float32()
        if name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            if kind == "attn_q":
                w = hf_permute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = hf_permute(w, cfg.n_kv_heads)
            state[f"model.layers.{i}.{per[kind]}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        else:
            state[names[name]] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    toks = _tokens(cfg)
    with torch.no_grad():
        theirs = hf(torch.tensor([toks])).logits[0].numpy()
    assert np.abs(reference.forward(model, toks) - theirs).max() <= TOL


def test_gpt2_matches_transformers():
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = CASES["gpt2-tied"]
    model = modelgen.random_model(cfg, seed=8)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim,
                                     n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.hidden_dim,
                                     layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    from wconv import arch

    state = {}
    transposed = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}  # HF Conv1D stores [in, out]
    gpt2 = arch.require("gpt2")
    for name, t in model.tensors.items():
        w = t.float32()
        if name.endswith(".weight") and name.split(".")[-2] in transposed:
            w = w.T
        state[gpt2.from_canonical(name, "hf")] = torch.from_numpy(np.ascontiguousarray(w))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("attn.bias") or m.endswith("masked_bias") for m in missing), missing
    toks = _tokens(cfg)
    with torch.no_grad():
        theirs = hf(torch.tensor([toks])).logits[0].numpy()
    assert np.abs(reference.forward(model, toks) - theirs).max() <= TOL

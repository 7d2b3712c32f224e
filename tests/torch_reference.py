"""Independent torch forward passes (test-only) to check wconv.reference against.

Written the way the original projects compute: Llama like Meta's model.py
(complex-number rotary embeddings via torch.polar, repeat_kv, F.silu), GPT-2
like nanoGPT (scaled_dot_product_attention, nn.functional.gelu(approximate="tanh"),
F.layer_norm). Only the Model's tensors (float32()) and config are shared with
the code under test.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _w(model, name, dtype):
    return torch.from_numpy(np.array(model[name].float32())).to(dtype)


def llama_logits(model, tokens, dtype=torch.float32) -> np.ndarray:
    c = model.config
    n_kv = c.n_kv_heads or c.n_heads
    hd = c.dim // c.n_heads
    toks = torch.tensor(tokens, dtype=torch.long)
    T = toks.numel()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                            torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def rotary(x):  # x [T, heads, hd]; pairs (2i, 2i+1) are complex numbers
        xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2).to(dtype)

    x = F.embedding(toks, _w(model, "token_embd.weight", dtype))
    mask = torch.full((T, T), float("-inf"), dtype=dtype).triu(1)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        h = rms(x, _w(model, p + "attn_norm.weight", dtype))
        q = F.linear(h, _w(model, p + "attn_q.weight", dtype)).view(T, c.n_heads, hd)
        k = F.linear(h, _w(model, p + "attn_k.weight", dtype)).view(T, n_kv, hd)
        v = F.linear(h, _w(model, p + "attn_v.weight", dtype)).view(T, n_kv, hd)
        q, k = rotary(q), rotary(k)
        rep = c.n_heads // n_kv
        k = k[:, :, None, :].expand(T, n_kv, rep, hd).reshape(T, c.n_heads, hd)
        v = v[:, :, None, :].expand(T, n_kv, rep, hd).reshape(T, c.n_heads, hd)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5 + mask, dim=-1)
        out = (att @ v).transpose(0, 1).reshape(T, c.dim)
        x = x + F.linear(out, _w(model, p + "attn_output.weight", dtype))
        h = rms(x, _w(model, p + "ffn_norm.weight", dtype))
        ff = F.silu(F.linear(h, _w(model, p + "ffn_gate.weight", dtype))) * \
            F.linear(h, _w(model, p + "ffn_up.weight", dtype))
        x = x + F.linear(ff, _w(model, p + "ffn_down.weight", dtype))
    x = rms(x, _w(model, "output_norm.weight", dtype))
    cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
    return F.linear(x, _w(model, cls, dtype)).numpy()


def _approx(c) -> str:
    # nanoGPT's nn.GELU() is exact ("none"); GPT-2 / HF gelu_new use the tanh approximation.
    return "none" if getattr(c, "gelu", "tanh") == "erf" else "tanh"


def gpt2_logits(model, tokens, dtype=torch.float32) -> np.ndarray:
    c = model.config
    hd = c.dim // c.n_heads
    toks = torch.tensor(tokens, dtype=torch.long)
    T = toks.numel()

    def ln(x, name):
        return F.layer_norm(x, (c.dim,), _w(model, name + ".weight", dtype), _w(model, name + ".bias", dtype),
                            eps=c.norm_eps)

    def lin(x, name):
        return F.linear(x, _w(model, name + ".weight", dtype), _w(model, name + ".bias", dtype))

    x = _w(model, "token_embd.weight", dtype)[toks] + _w(model, "position_embd.weight", dtype)[:T]
    for i in range(c.n_layers):
        p = f"blk.{i}."
        q, k, v = lin(ln(x, p + "attn_norm"), p + "attn_qkv").split(c.dim, dim=1)
        q, k, v = (t.view(T, c.n_heads, hd).transpose(0, 1) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(T, c.dim)
        x = x + lin(y, p + "attn_output")
        x = x + lin(F.gelu(lin(ln(x, p + "ffn_norm"), p + "ffn_up"), approximate=_approx(c)), p + "ffn_down")
    x = ln(x, "output_norm")
    cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
    return F.linear(x, _w(model, cls, dtype)).numpy()


def logits(model, tokens, dtype=torch.float32) -> np.ndarray:
    return (llama_logits if model.config.arch == "llama" else gpt2_logits)(model, tokens, dtype)

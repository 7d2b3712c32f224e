"""A tiny numpy forward pass for Llama and GPT-2, used to verify conversions.

It computes logits for every position of a prompt (causal attention, no KV
cache) in float32, or float64 on request. Weights are loaded through
LazyTensor.float32() one tensor at a time and dropped after use, so peak memory
is about one layer plus the activations (and the token embedding / classifier).

Llama: RMSNorm, rotary embeddings on interleaved pairs (Meta's convention, the
one llama2.c and llama.cpp use) with `config.rope_theta`, grouped-query
attention (query head h reads kv head h // (n_heads / n_kv_heads)), SwiGLU,
tied or separate classifier. GPT-2: LayerNorm with bias, learned positions,
fused qkv with bias, GELU with the tanh approximation, tied or separate lm_head.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import UnsupportedError, UsageError
from .model import Model


def _weights(model: Model, dt):
    def get(name: str) -> np.ndarray:
        t = model.get(name)
        if t is None:
            raise UnsupportedError(model.path or None, f"the reference needs tensor {name}, which is missing")
        return np.asarray(t.float32(), dtype=dt)

    return get


def check_tokens(model: Model, tokens) -> np.ndarray:
    c = model.config
    toks = np.asarray(list(tokens), dtype=np.int64)
    where = model.path or None
    if toks.ndim != 1 or toks.size == 0:
        raise UsageError(where, "need at least one prompt token")
    if toks.min() < 0 or toks.max() >= c.vocab_size:
        raise UsageError(where, f"token ids must be in [0, {c.vocab_size}); got {toks.min()}..{toks.max()}")
    if c.max_seq_len and toks.size > c.max_seq_len:
        raise UsageError(where, f"{toks.size} tokens exceed the context length {c.max_seq_len}")
    return toks


def forward(model: Model, tokens, *, float64: bool = False) -> np.ndarray:
    """Logits [T, vocab] for every position of `tokens`."""
    toks = check_tokens(model, tokens)
    dt = np.float64 if float64 else np.float32
    c, where = model.config, model.path or None
    if c.arch not in ("llama", "gpt2"):
        raise UnsupportedError(where, f"the reference forward pass supports llama and gpt2, not {c.arch!r}")
    n_kv = c.n_kv_heads or c.n_heads
    if not c.n_heads or c.dim % c.n_heads or c.n_heads % n_kv or (c.arch == "llama" and (c.dim // c.n_heads) % 2):
        raise UnsupportedError(where, f"config does not fit together: dim {c.dim}, n_heads {c.n_heads}, "
                                      f"n_kv_heads {c.n_kv_heads}")
    try:
        return (_llama if c.arch == "llama" else _gpt2)(model, toks, dt)
    except ValueError as e:  # a tensor whose shape disagrees with the config
        raise UnsupportedError(where, f"tensor shapes do not fit the config: {e}") from None


def _causal_attention(q, k, v, dt) -> np.ndarray:
    """q [H, T, hd], k/v [H, T, hd] (kv already expanded to H heads) -> [T, H*hd]."""
    T, hd = q.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / dt(np.sqrt(hd))
    scores = scores + np.triu(np.full((T, T), -np.inf, dtype=dt), k=1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(T, -1)


# ----------------------------------------------------------------------------- llama

def _rms_norm(x, w, eps, dt):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + dt(eps)) * w


def rope_cos_sin(T: int, head_dim: int, theta: float, dt):
    """cos/sin [T, head_dim/2] for positions 0..T-1, computed in float64 then cast."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.outer(np.arange(T, dtype=np.float64), inv)
    return np.cos(ang).astype(dt), np.sin(ang).astype(dt)


def _rotate(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [heads, T, hd] by the position angles."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def _llama(model: Model, toks, dt) -> np.ndarray:
    c = model.config
    W = _weights(model, dt)
    T = toks.size
    n_heads, n_kv = c.n_heads, c.n_kv_heads or c.n_heads
    hd = c.dim // n_heads
    x = W("token_embd.weight")[toks]
    cos, sin = rope_cos_sin(T, hd, c.rope_theta or 10000.0, dt)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, W(p + "attn_norm.weight"), c.norm_eps, dt)
        q = (h @ W(p + "attn_q.weight").T).reshape(T, n_heads, hd).transpose(1, 0, 2)
        k = (h @ W(p + "attn_k.weight").T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        v = (h @ W(p + "attn_v.weight").T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        x = x + _causal_attention(q, k, v, dt) @ W(p + "attn_output.weight").T
        h = _rms_norm(x, W(p + "ffn_norm.weight"), c.norm_eps, dt)
        gate = h @ W(p + "ffn_gate.weight").T
        up = h @ W(p + "ffn_up.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W(p + "ffn_down.weight").T
    x = _rms_norm(x, W("output_norm.weight"), c.norm_eps, dt)
    cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
    return x @ W(cls).T


# ------------------------------------------------------------------------------ gpt2

def _layer_norm(x, w, b, eps, dt):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + dt(eps)) * w + b


def _gelu_tanh(x, dt):
    return dt(0.5) * x * (1 + np.tanh(dt(np.sqrt(2 / np.pi)) * (x + dt(0.044715) * x ** 3)))


_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf; activations are small, so this is cheap


def _gelu_erf(x, dt):
    return (dt(0.5) * x * (1 + _erf(x.astype(np.float64) / math.sqrt(2)).astype(np.float64))).astype(dt)


def _gelu(x, dt, kind):
    return _gelu_erf(x, dt) if kind == "erf" else _gelu_tanh(x, dt)


def _gpt2(model: Model, toks, dt) -> np.ndarray:
    c = model.config
    W = _weights(model, dt)
    T = toks.size
    n_heads, hd = c.n_heads, c.dim // c.n_heads
    x = W("token_embd.weight")[toks] + W("position_embd.weight")[:T]
    for i in range(c.n_layers):
        p = f"blk.{i}."
        h = _layer_norm(x, W(p + "attn_norm.weight"), W(p + "attn_norm.bias"), c.norm_eps, dt)
        qkv = h @ W(p + "attn_qkv.weight").T + W(p + "attn_qkv.bias")
        q, k, v = (qkv[:, j * c.dim:(j + 1) * c.dim].reshape(T, n_heads, hd).transpose(1, 0, 2)
                   for j in range(3))
        x = x + _causal_attention(q, k, v, dt) @ W(p + "attn_output.weight").T + W(p + "attn_output.bias")
        h = _layer_norm(x, W(p + "ffn_norm.weight"), W(p + "ffn_norm.bias"), c.norm_eps, dt)
        h = _gelu(h @ W(p + "ffn_up.weight").T + W(p + "ffn_up.bias"), dt, c.gelu)
        x = x + h @ W(p + "ffn_down.weight").T + W(p + "ffn_down.bias")
    x = _layer_norm(x, W("output_norm.weight"), W("output_norm.bias"), c.norm_eps, dt)
    cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
    return x @ W(cls).T


# -------------------------------------------------------------------------- generate

def generate(model_or_path, tokens, steps: int, *, float64: bool = False) -> list[int]:
    """Greedy decoding: the prompt followed by up to `steps` argmax tokens.

    Stops early at the context length. (Recomputes the whole prefix each step:
    this is a checking tool for small models, not an inference engine.)
    """
    if isinstance(model_or_path, Model):
        model = model_or_path
    else:
        from . import load

        model = load(model_or_path)
    seq = [int(t) for t in tokens]
    check_tokens(model, seq)
    if steps < 0:
        raise UsageError(model.path or None, f"steps must be >= 0, got {steps}")
    limit = model.config.max_seq_len or (len(seq) + steps)
    for _ in range(steps):
        if len(seq) >= limit:
            break
        logits = forward(model, seq, float64=float64)
        seq.append(int(np.argmax(logits[-1])))
    return seq

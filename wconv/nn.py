"""numpy building blocks of the reference forward passes (wconv/arch/* compose them).

Everything works on float32 (or float64 on request: `dt`) activations [T, width]; weights
come from LazyTensor.float32() one tensor at a time.
"""
from __future__ import annotations

import math

import numpy as np


def weights(model, dt):
    """get(name) -> that tensor as a `dt` array (loaded now, dropped by the caller)."""
    from .errors import UnsupportedError

    def get(name: str) -> np.ndarray:
        t = model.get(name)
        if t is None:
            raise UnsupportedError(model.path or None, f"the reference needs tensor {name}, which is missing")
        return np.asarray(t.float32(), dtype=dt)

    return get


def rms_norm(x, w, eps, dt):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + dt(eps)) * w


def layer_norm(x, w, b, eps, dt):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + dt(eps)) * w + b


def silu(x):
    return x / (1 + np.exp(-x))


def gelu_tanh(x, dt):
    return dt(0.5) * x * (1 + np.tanh(dt(np.sqrt(2 / np.pi)) * (x + dt(0.044715) * x ** 3)))


_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf; activations are small, so this is cheap


def gelu_erf(x, dt):
    return (dt(0.5) * x * (1 + _erf(x.astype(np.float64) / math.sqrt(2)).astype(np.float64))).astype(dt)


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Rotary inverse frequencies [head_dim/2] in float64, with the config's RoPE scaling."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return inv / rope_factors(inv, scaling)


def rope_factors(inv: np.ndarray, scaling: dict | None) -> np.ndarray:
    """Per-frequency divisors of a RoPE scaling (1 = unscaled), as llama.cpp's rope_freqs holds them."""
    if not scaling:
        return np.ones_like(inv)
    kind = scaling["type"]
    if kind == "linear":
        return np.full_like(inv, float(scaling["factor"]))
    if kind == "freq_factors":  # read from a GGUF rope_freqs tensor
        return np.asarray(scaling["factors"], dtype=np.float64)
    if kind == "llama3":
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        medium = 1.0 / ((1 - smooth) / factor + smooth)
        return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium))
    raise ValueError(f"unknown RoPE scaling {kind!r}")


def rope_cos_sin(T: int, inv: np.ndarray, dt):
    """cos/sin [T, head_dim/2] for positions 0..T-1, computed in float64 then cast."""
    ang = np.outer(np.arange(T, dtype=np.float64), inv)
    return np.cos(ang).astype(dt), np.sin(ang).astype(dt)


def rotate_interleaved(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) of x [heads, T, hd] (Meta's / llama.cpp's NORM rope)."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def rotate_half(x, cos, sin):
    """Rotate pairs (x[i], x[i + hd/2]) of x [heads, T, hd] (HF's rotate_half, llama.cpp's NEOX)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def causal_attention(q, k, v, dt, *, window: int = 0) -> np.ndarray:
    """q [H, T, hd], k/v [H, T, hd] (kv already expanded to H heads) -> [T, H*hd].

    window > 0: position i attends to positions i - window + 1 .. i only (transformers'
    sliding-window attention).
    """
    T, hd = q.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / dt(np.sqrt(hd))
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)
    if window:
        mask |= np.tril(np.ones((T, T), dtype=bool), k=-window)
    scores = np.where(mask, dt(-np.inf), scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(T, -1)

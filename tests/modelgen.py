"""Random tiny models built directly in the internal representation (no readers needed)."""
from __future__ import annotations

import numpy as np

from wconv import layouts
from wconv.model import Config, Model
from wconv.tensor import LazyTensor


def llama_config(**over) -> Config:
    cfg = dict(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160,
               max_seq_len=32, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False)
    cfg.update(over)
    return Config(**cfg)


def gpt2_config(**over) -> Config:
    cfg = dict(arch="gpt2", dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=80, hidden_dim=192,
               max_seq_len=32, norm_eps=1e-5, tie_embeddings=True, bias=True)
    cfg.update(over)
    return Config(**cfg)


def _shape(template: str, c: Config) -> tuple:
    hd = c.dim // c.n_heads
    return {
        "token_embd.weight": (c.vocab_size, c.dim),
        "position_embd.weight": (c.max_seq_len, c.dim),
        "output.weight": (c.vocab_size, c.dim),
        "blk.{i}.attn_q.weight": (c.dim, c.dim),
        "blk.{i}.attn_k.weight": (c.n_kv_heads * hd, c.dim),
        "blk.{i}.attn_v.weight": (c.n_kv_heads * hd, c.dim),
        "blk.{i}.attn_output.weight": (c.dim, c.dim),
        "blk.{i}.attn_output.bias": (c.dim,),
        "blk.{i}.attn_qkv.weight": (3 * c.dim, c.dim),
        "blk.{i}.attn_qkv.bias": (3 * c.dim,),
        "blk.{i}.ffn_gate.weight": (c.hidden_dim, c.dim),
        "blk.{i}.ffn_up.weight": (c.hidden_dim, c.dim),
        "blk.{i}.ffn_up.bias": (c.hidden_dim,),
        "blk.{i}.ffn_down.weight": (c.dim, c.hidden_dim),
        "blk.{i}.ffn_down.bias": (c.dim,),
    }.get(template, (c.dim,))  # norms and their biases


def random_model(config: Config, seed: int = 0, dtype=np.float32) -> Model:
    """A Model of random weights (norm weights near 1), scaled so logits stay O(1)."""
    rng = np.random.default_rng(seed)
    model = Model(config=config, source_format="memory", source_layout="canonical")
    for name in layouts.expected_names(config.arch, config.n_layers, config.tie_embeddings):
        template, _ = layouts.template_of(name)
        shape = _shape(template, config)
        if "norm" in name and name.endswith(".weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            arr = 0.02 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        model.add(LazyTensor.from_array(name, arr.astype(dtype)))
    return model

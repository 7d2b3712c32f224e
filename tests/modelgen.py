"""Random tiny models built directly in the internal representation (no readers needed)."""
from __future__ import annotations

import numpy as np

from wconv import arch
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


def random_model(config: Config, seed: int = 0, dtype=np.float32, scale: float = 1.0) -> Model:
    """A Model of random weights (norm weights near 1), scaled so logits stay O(1) (times `scale`)."""
    rng = np.random.default_rng(seed)
    fam = arch.require(config.arch)
    model = Model(config=config, source_format="memory", source_layout="canonical")
    for name, shape in fam.shapes(config).items():
        if "norm" in name and name.endswith(".weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            arr = 0.02 * scale * rng.standard_normal(shape)
        else:
            arr = scale * rng.standard_normal(shape) / np.sqrt(shape[-1])
        model.add(LazyTensor.from_array(name, arr.astype(dtype)))
    return model

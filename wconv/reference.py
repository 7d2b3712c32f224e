"""A tiny numpy forward pass per architecture, used to verify conversions.

It computes logits for every position of a prompt (causal attention, no KV cache) in
float32, or float64 on request. Each family's forward lives in its module under
wconv/arch/ (built from wconv/nn.py); weights are loaded through LazyTensor.float32() one
tensor at a time and dropped after use, so peak memory is about one layer plus the
activations (and the token embedding / classifier). Only families registered in wconv.arch
run: anything else is refused, never approximated by another family's math.
"""
from __future__ import annotations

import numpy as np

from . import arch
from .errors import UnsupportedError, UsageError
from .model import Model


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


def family_of(model: Model):
    """The family whose reference runs `model`, or a one-line refusal."""
    fam = arch.get(model.config.arch)
    where = model.path or None
    if fam is None:
        why = "; ".join(model.metadata.get("warnings", [])[:1])
        raise UnsupportedError(where, f"the reference forward pass implements {', '.join(arch.FAMILIES)}, "
                                      f"not {model.config.arch!r}" + (f" ({why})" if why else ""))
    fam.check_reference(model.config, where)
    return fam


def forward(model: Model, tokens, *, float64: bool = False) -> np.ndarray:
    """Logits [T, vocab] for every position of `tokens`."""
    toks = check_tokens(model, tokens)
    fam = family_of(model)
    try:
        return fam.forward(model, toks, np.float64 if float64 else np.float32)
    except ValueError as e:  # a tensor whose shape disagrees with the config
        raise UnsupportedError(model.path or None, f"tensor shapes do not fit the config: {e}") from None


def generate(model_or_path, tokens, steps: int, *, float64: bool = False) -> list[int]:
    """Greedy decoding: the prompt followed by up to `steps` argmax tokens.

    Stops early at the context length. (Recomputes the whole prefix each step:
    this is a checking tool for small models, not an inference engine.)
    """
    if isinstance(model_or_path, Model):
        model = model_or_path
    else:
        from .convert.load import load_model as load

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

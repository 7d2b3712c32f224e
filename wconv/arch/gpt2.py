"""GPT-2 and nanoGPT: LayerNorm with biases, learned positions, fused qkv, GELU MLP.

HF's GPT2LMHeadModel stores its Conv1D weights [in, out]; canonical is [out, in] like
nanoGPT's nn.Linear, so they are transposed on the way in and out. nanoGPT's MLP uses the
exact (erf) GELU, GPT-2 / HF `gelu_new` / llama.cpp the tanh approximation (Config.gelu).
nanoGPT with bias=False has no biases; HF's GPT-2 always has them (zeros are written).
"""
from __future__ import annotations

import numpy as np

from .. import nn
from ..errors import FormatError, UnsupportedError
from ..model import Config
from .family import Family, agree, layer_count, refuse, template_of

TEMPLATES = (
    "token_embd.weight", "position_embd.weight",
    "blk.{i}.attn_norm.weight", "blk.{i}.attn_norm.bias",
    "blk.{i}.attn_qkv.weight", "blk.{i}.attn_qkv.bias",
    "blk.{i}.attn_output.weight", "blk.{i}.attn_output.bias",
    "blk.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.bias",
    "blk.{i}.ffn_up.weight", "blk.{i}.ffn_up.bias",
    "blk.{i}.ffn_down.weight", "blk.{i}.ffn_down.bias",
    "output_norm.weight", "output_norm.bias",
    "output.weight",
)

NANOGPT = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
    "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
HF_TRANSPOSED = ("blk.{i}.attn_qkv.weight", "blk.{i}.attn_output.weight", "blk.{i}.ffn_up.weight",
                 "blk.{i}.ffn_down.weight")
NANOGPT_ARGS = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
HF_NEUTRAL = {"scale_attn_weights": (True, None), "scale_attn_by_inverse_layer_idx": (False, None),
              "reorder_and_upcast_attn": (False, None), "add_cross_attention": (False, None),
              "quantization_config": (None,)}
GGUF_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_epsilon", "vocab_size")


class GPT2(Family):
    name = "gpt2"
    title = "GPT-2"
    other_sources = ("nanoGPT",)
    hf_special_ids = (50256, 50256)
    gguf_arch = "gpt2"
    hf_classes = ("GPT2LMHeadModel",)
    hf_model_types = ("gpt2",)
    templates = TEMPLATES
    names = {"nanogpt": NANOGPT, "hf": NANOGPT}
    hparam_keys = {
        "nanogpt": {"dim": ("n_embd",), "n_layers": ("n_layer",), "n_heads": ("n_head",),
                    "vocab_size": ("vocab_size",), "max_seq_len": ("block_size",)},
        "hf": {"dim": ("n_embd",), "n_layers": ("n_layer",), "n_heads": ("n_head",), "vocab_size": ("vocab_size",),
               "hidden_dim": ("n_inner",), "max_seq_len": ("n_positions",), "norm_eps": ("layer_norm_epsilon",)},
    }
    gguf_keys = GGUF_KEYS
    hf_tie_default = True

    def present(self, name, cfg):
        if name.endswith(".bias") and not cfg.bias:
            return False
        return super().present(name, cfg)

    def shape(self, name, c: Config):
        template, _ = template_of(name)
        d, f = c.dim, c.hidden_dim
        return {"token_embd.weight": (c.vocab_size, d), "output.weight": (c.vocab_size, d),
                "position_embd.weight": (c.max_seq_len, d), "blk.{i}.attn_qkv.weight": (3 * d, d),
                "blk.{i}.attn_qkv.bias": (3 * d,), "blk.{i}.attn_output.weight": (d, d),
                "blk.{i}.ffn_up.weight": (f, d), "blk.{i}.ffn_up.bias": (f,),
                "blk.{i}.ffn_down.weight": (d, f)}.get(template, (d,))

    def declared(self, layout, side, problems, where):
        d = super().declared(layout, side, problems, where)
        if layout == "nanogpt":
            if "bias" in side:
                d["bias"] = side["bias"]
            d["gelu"] = "erf"  # nanoGPT's MLP uses nn.GELU(), the exact erf form
        elif layout == "hf":
            d["gelu"] = "erf" if side.get("activation_function") == "gelu" else "tanh"
        return d

    def refusals(self, layout, side):
        out = []
        if layout == "nanogpt":
            odd = sorted(str(k) for k in side if k not in NANOGPT_ARGS)
            if odd:
                out.append(f"model_args {', '.join(odd[:4])}, which nanoGPT's GPT does not have")
        elif layout == "hf":
            act = side.get("activation_function")
            if act not in (None, "gelu_new", "gelu", "gelu_pytorch_tanh", "gelu_fast"):
                out.append(f"activation_function {act!r}")
            for key, neutral in HF_NEUTRAL.items():
                if key in side and side[key] not in neutral:
                    out.append(f"{key} = {side[key]!r:.60}")
        return out

    def build_config(self, canon, declared, layout, problems):
        vocab, dim = canon["token_embd.weight"].shape
        pos = canon.get("position_embd.weight")
        n_ctx = pos.shape[0] if pos is not None else 0
        n_layers = layer_count(canon)
        up = canon.get("blk.0.ffn_up.weight")
        hidden = up.shape[0] if up is not None else 0
        agree(declared, "dim", dim, "the token embedding", problems)
        agree(declared, "n_layers", n_layers, "the layer tensors", problems)
        agree(declared, "vocab_size", vocab, "the token embedding", problems)
        agree(declared, "max_seq_len", n_ctx, "the position embedding", problems)
        agree(declared, "hidden_dim", hidden, "the c_fc tensor", problems)
        bias = "blk.0.attn_qkv.bias" in canon
        agree(declared, "bias", bias, "the presence of c_attn.bias", problems)
        n_heads = declared.get("n_heads")
        if n_heads is None:
            problems.hparam_problem(UnsupportedError, "n_heads cannot be inferred from tensor shapes; it must be "
                                                      "given in model_args (n_head) or config.json")
            n_heads = 0
        elif n_heads <= 0 or dim % n_heads:
            problems.hparam_problem(FormatError, f"n_heads={n_heads!r} does not divide dim {dim}")
            n_heads = 0
        return Config(arch="gpt2", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                      vocab_size=vocab, hidden_dim=hidden, max_seq_len=n_ctx,
                      norm_eps=float(declared.get("norm_eps", 1e-5)), tie_embeddings="output.weight" not in canon,
                      bias=bias, gelu=declared.get("gelu", "tanh"))

    def orient(self, canon, layout):
        if layout == "hf":
            for name, t in list(canon.items()):
                if template_of(name)[0] in HF_TRANSPOSED and len(t.shape) == 2:
                    canon[name] = t.derive(lambda a: np.ascontiguousarray(a.T), shape=t.shape[::-1])

    def to_layout(self, name, t, cfg, layout):
        if layout == "hf" and template_of(name)[0] in HF_TRANSPOSED:
            return t.derive(lambda a: np.ascontiguousarray(a.T), shape=t.shape[::-1])
        return t

    def hf_transposed_orientation(self, name, shape):
        """Shape of canonical tensor `name` as HF's Conv1D stores it."""
        return shape[::-1] if template_of(name)[0] in HF_TRANSPOSED else shape

    def gguf_config(self, kv, tensors, problems):
        def get(key, default=0):
            v = kv.get(f"gpt2.{key}", default)
            return default if isinstance(v, (bytes, list)) else v

        def count(key):
            v = get(key)
            if isinstance(v, float) and not v.is_integer():
                raise FormatError(problems.path, f"metadata gpt2.{key} is {v!r}, expected a whole number")
            return int(v)

        emb = tensors.get("token_embd.weight")
        n_heads = count("attention.head_count")
        if count("attention.head_count_kv") not in (0, n_heads):
            refuse(problems, "GPT-2 with grouped-query attention is not supported")
        vocab = count("vocab_size") or (emb.shape[0] if emb is not None else 0)
        return Config(arch="gpt2", dim=count("embedding_length"), n_layers=count("block_count"), n_heads=n_heads,
                      n_kv_heads=n_heads, vocab_size=int(vocab), hidden_dim=count("feed_forward_length"),
                      max_seq_len=count("context_length"),
                      norm_eps=float(str(np.float32(get("attention.layer_norm_epsilon") or 1e-5))),
                      tie_embeddings=bool(tensors) and "output.weight" not in tensors, bias=True)

    def gguf_metadata(self, cfg, n_ctx, n_vocab):
        return [("context_length", n_ctx, "UINT32"), ("embedding_length", cfg.dim, "UINT32"),
                ("block_count", cfg.n_layers, "UINT32"), ("feed_forward_length", cfg.hidden_dim, "UINT32"),
                ("attention.head_count", cfg.n_heads, "UINT32"), ("attention.head_count_kv", cfg.n_heads, "UINT32"),
                ("attention.layer_norm_epsilon", float(cfg.norm_eps), "FLOAT32"), ("vocab_size", n_vocab, "UINT32")]

    def gguf_cannot_hold(self, cfg, runtime="llama.cpp"):
        if cfg.gelu == "erf":
            return ["GELU: the model uses the exact erf form (nanoGPT's nn.GELU); llama.cpp computes GPT-2's "
                    "MLP with the tanh approximation"]
        return []

    def hf_config(self, c):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": c.dim,
                "n_layer": c.n_layers, "n_head": c.n_heads, "n_positions": c.max_seq_len,
                "n_inner": c.hidden_dim, "vocab_size": c.vocab_size, "layer_norm_epsilon": c.norm_eps,
                "activation_function": "gelu" if c.gelu == "erf" else "gelu_new",  # HF: gelu = erf form
                "tie_word_embeddings": c.tie_embeddings}

    def check_reference(self, c, where):
        if not c.n_heads or c.dim % c.n_heads:
            raise UnsupportedError(where, f"config does not fit together: dim {c.dim}, n_heads {c.n_heads}")

    def forward(self, model, toks, dt):
        c = model.config
        W = nn.weights(model, dt)
        T = toks.size
        n_heads, hd = c.n_heads, c.dim // c.n_heads
        x = W("token_embd.weight")[toks] + W("position_embd.weight")[:T]

        def bias(name):
            return W(name) if c.bias else dt(0)

        gelu = (lambda a: nn.gelu_erf(a, dt)) if c.gelu == "erf" else (lambda a: nn.gelu_tanh(a, dt))
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = nn.layer_norm(x, W(p + "attn_norm.weight"), bias(p + "attn_norm.bias"), c.norm_eps, dt)
            qkv = h @ W(p + "attn_qkv.weight").T + bias(p + "attn_qkv.bias")
            q, k, v = (qkv[:, j * c.dim:(j + 1) * c.dim].reshape(T, n_heads, hd).transpose(1, 0, 2)
                       for j in range(3))
            x = x + nn.causal_attention(q, k, v, dt) @ W(p + "attn_output.weight").T + bias(p + "attn_output.bias")
            h = nn.layer_norm(x, W(p + "ffn_norm.weight"), bias(p + "ffn_norm.bias"), c.norm_eps, dt)
            h = gelu(h @ W(p + "ffn_up.weight").T + bias(p + "ffn_up.bias"))
            x = x + h @ W(p + "ffn_down.weight").T + bias(p + "ffn_down.bias")
        x = nn.layer_norm(x, W("output_norm.weight"), bias("output_norm.bias"), c.norm_eps, dt)
        cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
        return x @ W(cls).T


FAMILY = GPT2()

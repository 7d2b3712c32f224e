"""The Llama-style decoder every rotary family shares (Llama, Mistral, Qwen2, Gemma).

RMSNorm → attention with RoPE (GQA) → residual → RMSNorm → gated MLP → residual, a final
RMSNorm and a classifier (tied or not). What differs between the families is data on the
subclass: the rotary pairing GGUF stores (`rope_style`), q/k/v biases, the MLP activation,
an embedding scale, whether HF's q/k row permutation must be undone, and the norm-weight
convention. Each family module (llama.py, mistral.py, ...) sets those and its names.
"""
from __future__ import annotations

import math

import numpy as np

from .. import nn
from ..errors import FormatError, UnsupportedError
from ..model import Config
from .family import Family, Problems, agree, layer_count, refuse, template_of

BLOCK = ("blk.{i}.attn_norm.weight", "blk.{i}.attn_q.weight", "blk.{i}.attn_q.bias", "blk.{i}.attn_k.weight",
         "blk.{i}.attn_k.bias", "blk.{i}.attn_v.weight", "blk.{i}.attn_v.bias", "blk.{i}.attn_output.weight",
         "blk.{i}.ffn_norm.weight", "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_down.weight", "blk.{i}.ffn_up.weight")
TEMPLATES = ("token_embd.weight",) + BLOCK + ("output_norm.weight", "output.weight")
_QKV_BIAS = ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias")

# Hugging Face names shared by LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM.
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

HF_KEYS = {
    "dim": ("hidden_size",), "n_layers": ("num_hidden_layers",), "n_heads": ("num_attention_heads",),
    "n_kv_heads": ("num_key_value_heads",), "vocab_size": ("vocab_size",), "hidden_dim": ("intermediate_size",),
    "max_seq_len": ("max_position_embeddings",), "norm_eps": ("rms_norm_eps",), "head_width": ("head_dim",),
}

# config.json fields that change the math, with the values that leave it unchanged.
HF_NEUTRAL = {"attention_bias": (False, None), "mlp_bias": (False, None), "logit_scale": (None, 1, 1.0),
              "embedding_multiplier": (None, 1, 1.0), "residual_multiplier": (None, 1, 1.0),
              "attention_multiplier": (None,), "logits_scaling": (None, 1, 1.0), "num_local_experts": (None, 0),
              "num_experts": (None, 0), "quantization_config": (None,), "attn_logit_softcapping": (None,),
              "final_logit_softcapping": (None,), "partial_rotary_factor": (None, 1, 1.0),
              "qk_layernorm": (None, False), "use_qk_norm": (None, False)}

GGUF_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "rope.dimension_count", "vocab_size", "attention.key_length", "attention.value_length",
             "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear", "attention.sliding_window",
             "expert_count", "expert_used_count")

# (original context, low_freq_factor, high_freq_factor) settings tried first when a GGUF rope_freqs
# table is turned back into llama3 parameters: Llama 3.1-3.3's, then other round ones.
_LLAMA3_SETTINGS = ((8192, 1.0, 4.0),) + tuple((2 ** k, low, high)
                                               for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0))
                                               for k in range(2, 21))


def hf_rope(c: dict) -> tuple:
    """(rope_theta, rope scaling dict or None, refusal or None) from a config.json, in
    transformers 4.x style (rope_theta, rope_scaling) or 5.x style (rope_parameters)."""
    params = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else None
    scaling = c.get("rope_scaling") if isinstance(c.get("rope_scaling"), dict) else None
    theta = c.get("rope_theta")
    if theta is None and params:
        theta = params.get("rope_theta")
    spec = scaling or params or {}
    if params and "full_attention" in params and isinstance(params["full_attention"], dict):
        spec = params["full_attention"]
    kind = spec.get("rope_type", spec.get("type"))
    if spec.get("partial_rotary_factor") not in (None, 1, 1.0):
        return theta, None, f"partial_rotary_factor = {spec['partial_rotary_factor']!r:.40} (partial rotary)"
    if kind in (None, "default"):
        if c.get("rope_scaling") not in (None, {}) and not isinstance(c.get("rope_scaling"), dict):
            return theta, None, f"rope_scaling {c['rope_scaling']!r:.60} is not understood"
        return theta, None, None
    if kind == "linear":
        try:
            return theta, {"type": "linear", "factor": float(spec["factor"])}, None
        except (KeyError, TypeError, ValueError):
            return theta, None, "rope_scaling of type linear without a numeric factor"
    if kind == "llama3":
        try:
            out = {"type": "llama3", "factor": float(spec["factor"]), "low_freq_factor": float(spec["low_freq_factor"]),
                   "high_freq_factor": float(spec["high_freq_factor"]),
                   "original_max_position_embeddings": int(spec["original_max_position_embeddings"])}
        except (KeyError, TypeError, ValueError):
            return theta, None, "rope_scaling of type llama3 lacks factor / low_freq_factor / high_freq_factor / " \
                                "original_max_position_embeddings"
        if out["factor"] <= 0 or out["high_freq_factor"] <= out["low_freq_factor"] or out["low_freq_factor"] <= 0:
            return theta, None, f"rope_scaling llama3 parameters {out} do not fit together"
        return theta, out, None
    return theta, None, f"RoPE scaling of type {kind!r} is not implemented (wconv implements linear and llama3)"


class Decoder(Family):
    """Base of the Llama-style families; subclasses set the class attributes below."""

    templates = TEMPLATES
    rope_style = "interleaved"  # how GGUF stores q/k rows: "interleaved" (llama) or "neox" (half split)
    qkv_bias = False  # q/k/v projections have biases (Qwen2)
    hf_permuted = True  # HF stores q/k rows permuted for rotate_half: undo to reach `interleaved`
    activation = "silu"  # gated MLP: silu (SwiGLU) or gelu_tanh (GeGLU)
    embed_scale = False  # embeddings multiplied by sqrt(dim) (Gemma)
    norm_plus_one = False  # HF stores RMSNorm weights w with y = x·(1 + w); GGUF stores 1 + w (Gemma)
    hf_activations = ("silu",)
    default_rope_theta = 10000.0
    # RoPE scalings llama.cpp's graph for this family applies: linear (rope.scaling.factor, read for
    # every architecture) and llama3 (a rope_freqs tensor, which only its llama graph passes to ggml_rope_ext)
    rope_scalings = ("linear",)

    # --- names and shapes ------------------------------------------------------------------
    def present(self, name, cfg):
        template, _ = template_of(name)
        if template in _QKV_BIAS:
            return self.qkv_bias
        return super().present(name, cfg)

    def shape(self, name, c: Config):
        template, _ = template_of(name)
        if not c.n_heads and template.startswith("blk.{i}.attn_") and "norm" not in template:
            return None  # head count unknown (inspect of an incomplete checkpoint): not checkable
        hd, d, f, v = c.head_dim, c.dim, c.hidden_dim, c.vocab_size
        q, kv = c.n_heads * hd, (c.n_kv_heads or c.n_heads) * hd
        return {"token_embd.weight": (v, d), "output.weight": (v, d),
                "blk.{i}.attn_q.weight": (q, d), "blk.{i}.attn_k.weight": (kv, d), "blk.{i}.attn_v.weight": (kv, d),
                "blk.{i}.attn_q.bias": (q,), "blk.{i}.attn_k.bias": (kv,), "blk.{i}.attn_v.bias": (kv,),
                "blk.{i}.attn_output.weight": (d, q), "blk.{i}.ffn_gate.weight": (f, d),
                "blk.{i}.ffn_up.weight": (f, d), "blk.{i}.ffn_down.weight": (d, f)}.get(template, (d,))

    # --- hyperparameters -------------------------------------------------------------------
    def declared(self, layout, side, problems, where):
        d = super().declared(layout, side, problems, where)
        if layout == "hf":
            theta, scaling, why = hf_rope(side)
            if theta is not None:
                d.update(self._checked({"rope_theta": theta}, problems, where))
            if scaling:
                d["rope_scaling"] = scaling
            if "tie_word_embeddings" in side:
                d["tie"] = bool(side["tie_word_embeddings"])
        return d

    @staticmethod
    def _checked(values, problems, where):
        from .family import checked_types
        return checked_types(values, problems, where)

    def refusals(self, layout, side):
        if layout != "hf":
            return []
        out = []
        _, scaling, why = hf_rope(side)
        if why:
            out.append(why)
        elif scaling and scaling["type"] not in self.rope_scalings:
            out.append(f"RoPE scaling of type {scaling['type']!r} (llama.cpp's {self.gguf_arch} applies "
                       f"{' and '.join(self.rope_scalings)} only)")
        out += self.hf_activation_refusals(side)
        for key, neutral in HF_NEUTRAL.items():
            if key in side and side[key] not in neutral:
                out.append(f"{key} = {side[key]!r:.60}")
        layer_types = side.get("layer_types")
        if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
            kinds = sorted({str(t) for t in layer_types if t != "full_attention"})
            out.append(f"layer_types {', '.join(kinds)[:60]} (per-layer attention kinds)")
        return out

    def hf_activation_refusals(self, side) -> list:
        """transformers 4.x and 5.x both run ACT2FN[hidden_act] in the MLP of these families."""
        act = side.get("hidden_act")
        if act is not None and act not in self.hf_activations:
            return [f"hidden_act {act!r:.40} (wconv implements {', '.join(self.hf_activations)} for {self.title})"]
        return []

    def build_config(self, canon, declared, layout, problems):
        emb = canon["token_embd.weight"]
        vocab, dim = emb.shape
        n_layers = layer_count(canon)
        gate = canon.get("blk.0.ffn_gate.weight")
        hidden = gate.shape[0] if gate is not None and len(gate.shape) == 2 else 0
        agree(declared, "dim", dim, "the token embedding", problems)
        agree(declared, "n_layers", n_layers, "the layer tensors", problems)
        agree(declared, "vocab_size", vocab, "the token embedding", problems)
        agree(declared, "hidden_dim", hidden, "the feed-forward gate tensor", problems)
        n_heads = declared.get("n_heads")
        q = canon.get("blk.0.attn_q.weight")
        k = canon.get("blk.0.attn_k.weight")
        q_rows = q.shape[0] if q is not None else dim
        kv_rows = k.shape[0] if k is not None else 0
        n_kv, head_width = 0, 0
        if n_heads is None:
            src = {"meta": "params.json beside the checkpoint (n_heads)", "hf": "config.json (num_attention_heads)",
                   "llama2c-ckpt": "model_args (n_heads)"}.get(layout, "the checkpoint")
            problems.hparam_problem(UnsupportedError, f"n_heads cannot be inferred from tensor shapes; it must be "
                                                      f"given in {src}")
            n_heads = 0
        elif n_heads <= 0 or q_rows % n_heads or (q_rows // n_heads) % 2:
            problems.hparam_problem(FormatError, f"n_heads={n_heads} does not split the {q_rows} query rows into "
                                                 "even-sized heads")
            n_heads = 0
        if n_heads:
            head_dim = declared.get("head_width") or q_rows // n_heads
            if head_dim * n_heads != q_rows:
                problems.hparam_problem(FormatError, f"head_dim {head_dim} x {n_heads} heads does not match the "
                                                     f"{q_rows} query rows")
            if head_dim * n_heads != dim:
                head_width = head_dim
            n_kv = declared.get("n_kv_heads") or n_heads
            if kv_rows != n_kv * head_dim:
                if "n_kv_heads" in declared or kv_rows % head_dim:
                    problems.hparam_problem(FormatError, f"attn_k has {kv_rows} rows, which does not fit "
                                                         f"n_kv_heads={n_kv} x head_dim {head_dim}")
                n_kv = kv_rows // head_dim if kv_rows % head_dim == 0 else 0
            if n_kv and n_heads % n_kv:
                problems.hparam_problem(FormatError, f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
        max_seq_len = declared.get("max_seq_len")
        if max_seq_len is None:
            max_seq_len, why = self.default_context(layout, declared)
            problems.notes.append(f"max_seq_len not stated; using {max_seq_len} ({why})")
        tie = "output.weight" not in canon
        return Config(arch=self.name, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                      vocab_size=vocab, hidden_dim=hidden, max_seq_len=int(max_seq_len),
                      norm_eps=float(declared.get("norm_eps", 1e-5)),
                      rope_theta=float(declared.get("rope_theta", self.default_rope_theta)), tie_embeddings=tie,
                      head_width=head_width, rope_scaling=declared.get("rope_scaling"),
                      sliding_window=int(declared.get("sliding_window") or 0))

    def default_context(self, layout, declared) -> tuple[int, str]:
        """(context length, why) when the checkpoint does not state one (Meta's params.json never does)."""
        return 2048, "Meta's ModelArgs default"

    # --- layout fix-ups --------------------------------------------------------------------
    def from_layout(self, canon, cfg, layout, problems):
        if layout == "hf":
            if self.hf_permuted:
                for name, t in list(canon.items()):
                    heads = self._rotary_heads(name, cfg)
                    if heads is None:
                        continue
                    if not heads or t.shape[0] % (2 * heads):
                        problems.notes.append(f"{name}: left in HF rotary order (head count unknown)")
                        continue
                    per_head = t.shape[0] // heads  # rows of one head: the permutation stays inside them
                    canon[name] = t.derive_rows(lambda a, g=per_head: hf_unpermute(a, a.shape[0] // g), per_head)
            if self.norm_plus_one:
                for name, t in list(canon.items()):
                    if name.endswith("norm.weight"):
                        canon[name] = t.derive(lambda a: a + np.float32(1), float_input=True)

    def to_layout(self, name, t, cfg, layout):
        if layout == "hf":
            heads = self._rotary_heads(name, cfg) if self.hf_permuted else None
            if heads:
                per_head = t.shape[0] // heads  # rows of one head: the permutation stays inside them
                if t.dtype.quantized:
                    # Rows of quantised blocks move as they are: no dequantised copy of the tensor.
                    row_bytes = t.row_bytes()
                    return t.derive_rows(lambda a, g=per_head, rb=row_bytes: hf_permute(
                        np.asarray(a).reshape(-1, rb), a.size // rb // g).reshape(-1), per_head)
                return t.derive_rows(lambda a, g=per_head: hf_permute(a, a.shape[0] // g), per_head)
            if self.norm_plus_one and name.endswith("norm.weight"):
                return t.derive(lambda a: a - np.float32(1), float_input=True)
        return t

    @staticmethod
    def _rotary_heads(name, cfg):
        """Heads whose rows a q/k weight (or bias) holds, or None for other tensors."""
        template, _ = template_of(name)
        if template in ("blk.{i}.attn_q.weight", "blk.{i}.attn_q.bias"):
            return cfg.n_heads
        if template in ("blk.{i}.attn_k.weight", "blk.{i}.attn_k.bias"):
            return cfg.n_kv_heads
        return None

    # --- GGUF ----------------------------------------------------------------------------
    gguf_keys = GGUF_KEYS

    def gguf_config(self, kv, tensors, problems):
        a = self.gguf_arch

        def get(key, default=0):
            v = kv.get(f"{a}.{key}", default)
            if isinstance(v, list):  # per-layer values (some architectures): report the first
                v = v[0] if v else default
            return default if isinstance(v, bytes) else v

        def count(key):
            v = get(key)
            if isinstance(v, float) and not v.is_integer():
                raise FormatError(problems.path, f"metadata {a}.{key} is {v!r}, expected a whole number")
            return int(v)

        emb = tensors.get("token_embd.weight")
        n_heads = count("attention.head_count")
        dim = count("embedding_length")
        key_len = count("attention.key_length")
        rot = count("rope.dimension_count")
        head_width = 0
        if key_len and n_heads and key_len * n_heads != dim:
            head_width = key_len
        if count("expert_count"):
            refuse(problems, f"{a}.expert_count = {count('expert_count')}: Mixture-of-Experts models are not "
                             "supported")
        if key_len and rot and rot != key_len or count("attention.value_length") not in (0, key_len or 0):
            refuse(problems, "partial rotary or unequal key/value head widths are not supported")
        scaling = None
        stype = kv.get(f"{a}.rope.scaling.type")
        stype = stype.decode("utf-8", "replace") if isinstance(stype, bytes) else stype
        factor = get("rope.scaling.factor", 0) or get("rope.scale_linear", 0)
        if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
            refuse(problems, f"{a}.rope.scaling.factor {factor!r:.40} is not a usable number")
        elif stype in (None, "linear"):
            # llama.cpp's default type is linear and it reads the factor whatever else is stated
            if factor and factor != 1:
                scaling = {"type": "linear", "factor": f32(factor)}
        elif stype != "none":  # "none": llama.cpp never scales
            refuse(problems, f"{a}.rope.scaling.type {stype!r:.40} is not implemented (wconv implements linear, "
                             "and llama3 as a rope_freqs tensor)")
        eps = get("attention.layer_norm_rms_epsilon") or 1e-5
        vocab = count("vocab_size") or (emb.shape[0] if emb is not None else 0)
        return Config(arch=self.name, dim=dim, n_layers=count("block_count"), n_heads=n_heads,
                      n_kv_heads=count("attention.head_count_kv") or n_heads, vocab_size=int(vocab),
                      hidden_dim=count("feed_forward_length"), max_seq_len=count("context_length"),
                      norm_eps=f32(eps), rope_theta=f32(get("rope.freq_base") or self.default_rope_theta),
                      tie_embeddings=bool(tensors) and "output.weight" not in tensors, head_width=head_width,
                      rope_scaling=scaling, sliding_window=self.gguf_sliding_window(kv, problems))

    def gguf_sliding_window(self, kv, problems) -> int:
        """The attention window a GGUF records, for families that have one (others: llama.cpp's
        graph for them attends over everything, and so does the model as read)."""
        return 0

    def gguf_metadata(self, cfg, n_ctx, n_vocab):
        out = [("context_length", n_ctx, "UINT32"), ("embedding_length", cfg.dim, "UINT32"),
               ("block_count", cfg.n_layers, "UINT32"), ("feed_forward_length", cfg.hidden_dim, "UINT32"),
               ("attention.head_count", cfg.n_heads, "UINT32"),
               ("attention.head_count_kv", cfg.n_kv_heads or cfg.n_heads, "UINT32"),
               ("rope.freq_base", float(cfg.rope_theta), "FLOAT32"),
               ("attention.layer_norm_rms_epsilon", float(cfg.norm_eps), "FLOAT32"),
               ("vocab_size", n_vocab, "UINT32"), ("rope.dimension_count", cfg.head_dim, "UINT32")]
        if cfg.head_width:
            out += [("attention.key_length", cfg.head_dim, "UINT32"),
                    ("attention.value_length", cfg.head_dim, "UINT32")]
        s = cfg.rope_scaling
        if s and s["type"] == "linear":
            out += [("rope.scaling.type", "linear", "STRING"), ("rope.scaling.factor", float(s["factor"]), "FLOAT32")]
        return out

    def gguf_extra_tensors(self, cfg):
        s = cfg.rope_scaling
        if not s or s["type"] not in ("llama3", "freq_factors"):
            return {}
        from ..tensor import LazyTensor

        inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        factors = nn.rope_factors(inv, s).astype(np.float32)
        return {"rope_freqs.weight": LazyTensor.from_array("rope_freqs.weight", factors, source="RoPE scaling")}

    def gguf_absorb(self, cfg, tensors, problems):
        """A GGUF rope_freqs.weight tensor becomes the config's RoPE scaling (popped from tensors)."""
        t = tensors.pop("rope_freqs.weight", None)
        if t is None:
            return cfg
        if cfg.rope_scaling:
            refuse(problems, "rope_freqs.weight together with rope.scaling.type is not supported")
            return cfg
        try:
            factors = np.asarray(t.float32(), dtype=np.float64).reshape(-1)
        except Exception as e:  # a malformed tensor: the reader's own error when strict
            refuse(problems, f"rope_freqs.weight is unreadable: {e}")
            return cfg
        if factors.size != cfg.head_dim // 2:
            refuse(problems, f"rope_freqs.weight has {factors.size} values, expected head_dim/2 = {cfg.head_dim // 2}")
            return cfg
        if "llama3" not in self.rope_scalings:
            refuse(problems, f"rope_freqs.weight: llama.cpp's {self.gguf_arch} graph does not apply a RoPE "
                             "factor table")
            return cfg
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        if not (np.all(np.isfinite(factors)) and np.all(factors > 0)):
            refuse(problems, "rope_freqs.weight holds values that are not positive finite numbers")
            return cfg
        if np.all(factors == 1):
            return cfg  # an identity table: plain RoPE
        cfg.rope_scaling = llama3_from_factors(inv, factors) or {"type": "freq_factors",
                                                                 "factors": [float(x) for x in factors]}
        return cfg

    # --- Hugging Face ----------------------------------------------------------------------
    hf_model_type = ""
    hf_class = ""

    def hf_config(self, c):
        config = {"architectures": [self.hf_class], "model_type": self.hf_model_type, "hidden_size": c.dim,
                  "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
                  "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads or c.n_heads,
                  "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len,
                  "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "hidden_act": self.hf_activations[0],
                  "tie_word_embeddings": c.tie_embeddings}
        s = c.rope_scaling
        if s and s["type"] == "freq_factors":
            raise UnsupportedError(None, "the RoPE scaling of this model is a table of per-frequency factors "
                                         "(GGUF rope_freqs) that no Hugging Face rope_scaling type expresses")
        if s:
            config["rope_scaling"] = {"rope_type": s["type"], **{k: v for k, v in s.items() if k != "type"}}
        return config

    # --- reference -----------------------------------------------------------------------
    def check_reference(self, c, where):
        n_kv = c.n_kv_heads or c.n_heads
        if not c.n_heads or c.n_heads % n_kv or c.head_dim % 2:
            raise UnsupportedError(where, f"config does not fit together: dim {c.dim}, n_heads {c.n_heads}, "
                                          f"n_kv_heads {c.n_kv_heads}, head_dim {c.head_dim}")

    def math_key(self):
        # what forward() branches on: Llama and Mistral (window in Config) compute the same function
        return ("decoder", self.rope_style, self.qkv_bias, self.activation, self.embed_scale)

    def forward(self, model, toks, dt):
        c = model.config
        W = nn.weights(model, dt)
        T = toks.size
        n_heads, n_kv, hd = c.n_heads, c.n_kv_heads or c.n_heads, c.head_dim
        x = W("token_embd.weight")[toks]
        if self.embed_scale:
            x = x * dt(np.sqrt(c.dim))
        cos, sin = nn.rope_cos_sin(T, nn.inv_frequencies(hd, c.rope_theta or self.default_rope_theta,
                                                         c.rope_scaling), dt)
        rotate = nn.rotate_interleaved if self.rope_style == "interleaved" else nn.rotate_half
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = nn.rms_norm(x, W(p + "attn_norm.weight"), c.norm_eps, dt)
            q, k, v = h @ W(p + "attn_q.weight").T, h @ W(p + "attn_k.weight").T, h @ W(p + "attn_v.weight").T
            if self.qkv_bias:
                q, k, v = q + W(p + "attn_q.bias"), k + W(p + "attn_k.bias"), v + W(p + "attn_v.bias")
            q = q.reshape(T, n_heads, hd).transpose(1, 0, 2)
            k = k.reshape(T, n_kv, hd).transpose(1, 0, 2)
            v = v.reshape(T, n_kv, hd).transpose(1, 0, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            rep = n_heads // n_kv
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            att = nn.causal_attention(q, k, v, dt, window=c.sliding_window)
            x = x + att @ W(p + "attn_output.weight").T
            h = nn.rms_norm(x, W(p + "ffn_norm.weight"), c.norm_eps, dt)
            gate, up = h @ W(p + "ffn_gate.weight").T, h @ W(p + "ffn_up.weight").T
            act = nn.silu(gate) if self.activation == "silu" else nn.gelu_tanh(gate, dt)
            x = x + (act * up) @ W(p + "ffn_down.weight").T
        x = nn.rms_norm(x, W("output_norm.weight"), c.norm_eps, dt)
        cls = "output.weight" if model.get("output.weight") is not None else "token_embd.weight"
        return x @ W(cls).T


def llama3_from_factors(inv: np.ndarray, factors: np.ndarray, rtol: float = 1e-5) -> dict | None:
    """The llama3 rope_scaling whose per-frequency divisors (at inverse frequencies `inv`) are
    `factors` - a GGUF rope_freqs table as llama.cpp's converter computes it - or None.

    The divisors depend on factor and on two wavelength thresholds only, original/low and
    original/high, so any parameters with the same ratios give the same model: common settings
    are tried first, then the thresholds are solved from the interpolated (medium) band.
    """
    f = np.asarray(factors, dtype=np.float64)
    big = float(f.max())
    if not big > 1:
        return None

    def fits(c):
        return np.allclose(nn.rope_factors(inv, c), f, rtol=rtol, atol=0)

    for old, low, high in _LLAMA3_SETTINGS:
        c = {"type": "llama3", "factor": f32(big), "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": old}
        if fits(c):
            return c
    # medium band: s = (1/f - 1/F) / (1 - 1/F) = (L/wavelen - 1) / (L/H - 1) with L = original/low,
    # H = original/high; linear in (L, L/H), so two medium frequencies determine it.
    wavelen = 2 * math.pi / inv
    medium = (f > 1 + rtol) & (f < big * (1 - rtol))
    if medium.sum() < 2:
        return None
    s = (1 / f[medium] - 1 / big) / (1 - 1 / big)
    (L, ratio), *_ = np.linalg.lstsq(np.stack([1 / wavelen[medium], -s], axis=1), 1 - s, rcond=None)
    if not (L > 0 and ratio > 1):
        return None
    old = max(1, int(round(L)))
    c = {"type": "llama3", "factor": f32(big), "low_freq_factor": old / L, "high_freq_factor": old * ratio / L,
         "original_max_position_embeddings": old}
    return c if fits(c) else None


def f32(v) -> float:
    """A float32 value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


# HF's Llama conversion reorders each head's q/k rows for its rotate_half rotary: Meta's
# interleaved pairs (2i, 2i+1) become half-split rows (evens, then odds). k uses n_kv_heads.
def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows -> HF's half-split rows (per head: evens then odds)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of hf_permute: HF's half-split rows -> Meta's interleaved rows."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))

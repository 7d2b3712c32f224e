"""What llama.cpp expects of GGUF metadata keys, as data (used by `wconv edit`).

Read from the llama.cpp that llama-cpp-python 0.3.36 builds: llama-arch.cpp (key names),
llama-model-loader.cpp (`get_key<T>` throws "key ... has wrong type" unless the stored
type is exactly T's; `get_key_or_arr` takes a scalar or an INT32/UINT32 array),
llama-model.cpp and models/{llama,gpt2}.cpp (which keys are read, into which C++ types,
which are required), llama-vocab.cpp (tokenizer keys, their array element types and the
pre-tokenizer names it knows), ggml/src/gguf.cpp (general.alignment), and gguf-py's
constants.py. `{arch}` stands for the value of general.architecture.

Types are gguf-py's GGUFValueType names; an array is ("ARRAY", element types).
"""
from __future__ import annotations

U8, I8, U16, I32, U32, F32, BOOL, STR = "UINT8", "INT8", "UINT16", "INT32", "UINT32", "FLOAT32", "BOOL", "STRING"


def _scalar(*types):
    return tuple((t, None) for t in types)


def _array(*elements):
    return tuple(("ARRAY", e) for e in elements)


_PER_LAYER = _scalar(U32) + _array(I32, U32)  # get_key_or_arr: one value, or one per layer

# key (template) -> accepted (type, element type) pairs
KEY_TYPES = {
    "general.architecture": _scalar(STR),
    "general.name": _scalar(STR),
    "general.file_type": _scalar(U32),
    "general.quantization_version": _scalar(U32),
    "general.alignment": _scalar(U32),
    "split.no": _scalar(U16),
    "split.count": _scalar(U16),
    "split.tensors.count": _scalar(I32),
    "{arch}.vocab_size": _scalar(U32),
    "{arch}.context_length": _scalar(U32),
    "{arch}.embedding_length": _scalar(U32),
    "{arch}.block_count": _scalar(U32),
    "{arch}.feed_forward_length": _PER_LAYER,
    "{arch}.expert_count": _scalar(U32),
    "{arch}.expert_used_count": _PER_LAYER,
    "{arch}.pooling_type": _scalar(U32),
    "{arch}.attention.head_count": _PER_LAYER,
    "{arch}.attention.head_count_kv": _PER_LAYER,
    "{arch}.attention.key_length": _scalar(U32),
    "{arch}.attention.value_length": _scalar(U32),
    "{arch}.attention.layer_norm_epsilon": _scalar(F32),
    "{arch}.attention.layer_norm_rms_epsilon": _scalar(F32),
    "{arch}.attention.causal": _scalar(BOOL),
    "{arch}.rope.dimension_count": _scalar(U32),
    "{arch}.rope.freq_base": _scalar(F32),
    "{arch}.rope.scale_linear": _scalar(F32),
    "{arch}.rope.scaling.type": _scalar(STR),
    "{arch}.rope.scaling.factor": _scalar(F32),
    "{arch}.rope.scaling.attn_factor": _scalar(F32),
    "{arch}.rope.scaling.original_context_length": _scalar(U32),
    "{arch}.rope.scaling.finetuned": _scalar(BOOL),
    "tokenizer.ggml.model": _scalar(STR),
    "tokenizer.ggml.pre": _scalar(STR),
    "tokenizer.ggml.tokens": _array(STR),
    "tokenizer.ggml.scores": _array(F32, I32),
    "tokenizer.ggml.token_type": _array(I32),
    "tokenizer.ggml.token_type_count": _scalar(U32),
    "tokenizer.ggml.merges": _array(STR),
    "tokenizer.ggml.precompiled_charsmap": _array(U8, I8),
    "tokenizer.ggml.suppress_tokens": _array(I32),
    "tokenizer.ggml.add_bos_token": _scalar(BOOL),
    "tokenizer.ggml.add_eos_token": _scalar(BOOL),
    "tokenizer.ggml.add_sep_token": _scalar(BOOL),
    "tokenizer.ggml.add_space_prefix": _scalar(BOOL),
    "tokenizer.ggml.remove_extra_whitespaces": _scalar(BOOL),
    "tokenizer.ggml.normalizer.lowercase": _scalar(BOOL),
    "tokenizer.ggml.normalizer.strip_accents": _scalar(BOOL),
    "tokenizer.chat_template": _scalar(STR),
}
# Special token ids: read as uint32; an id outside the vocabulary is ignored with a warning.
TOKEN_ID_KEYS = tuple(f"tokenizer.ggml.{n}_token_id" for n in (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask", "fim_pre", "fim_suf",
    "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle"))
KEY_TYPES.update({k: _scalar(U32) for k in TOKEN_ID_KEYS})

# Keys whose value the tensors' shapes (or the file layout) depend on: a different value, or
# the default llama.cpp assumes when the key is gone, makes loading fail.
STRUCTURAL = {"{arch}.vocab_size", "{arch}.embedding_length", "{arch}.block_count", "{arch}.feed_forward_length",
              "{arch}.expert_count", "{arch}.expert_used_count", "{arch}.attention.head_count",
              "{arch}.attention.head_count_kv", "{arch}.attention.key_length", "{arch}.attention.value_length",
              "{arch}.rope.dimension_count"}
STRUCTURAL_BY_ARCH = {"gpt2": {"{arch}.context_length"}}  # GPT-2's position_embd has n_ctx rows
# Keys an edit may not change at all: what the file *is* rather than what it says about itself.
LOCKED = {
    "general.architecture": "the tensors and keys are those of this architecture",
    "general.alignment": "the tensor data is laid out with this alignment",
    "split.no": "it describes this file's place in its split set",
    "split.count": "it describes the split set",
    "split.tensors.count": "it describes the split set",
    "tokenizer.ggml.model": "the vocabulary arrays are in this tokenizer's format",
}
# Keys llama.cpp refuses to load without (besides the structural ones).
REQUIRED = {"general.architecture", "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
            "tokenizer.ggml.model"}
REQUIRED_BY_ARCH = {"llama": {"{arch}.attention.layer_norm_rms_epsilon", "{arch}.attention.head_count",
                              "{arch}.feed_forward_length"},
                    "gpt2": {"{arch}.attention.layer_norm_epsilon", "{arch}.attention.head_count",
                             "{arch}.feed_forward_length"}}

ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
NO_VOCAB = ("no_vocab", "none")
BPE_MODELS = ("gpt2", "hybriddna", "whitespace")  # the tokenizer types whose tokenizer.ggml.pre is read
# The pre-tokenizer names llama-vocab.cpp accepts for BPE vocabularies (any other is refused).
PRE_TOKENIZERS = frozenset((
    "default", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
    "lfm2", "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "falcon",
    "mpt", "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
    "a.x-4.0", "mellum", "modern-bert", "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe",
    "jina-v1-en", "jina-v2-code", "roberta-bpe", "whitespace", "refact", "command-r", "qwen2",
    "deepseek-r1-qwen", "kormo", "f2llmv2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat",
    "chatglm-bpe", "glm4", "glm5", "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish",
    "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4", "kanana2",
    "talkie", "granite-embed-multi-97m", "tiny_aya", "cohere2moe", "superbpe", "trillion", "granite-docling",
    "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm",
    "kimi-k2", "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2", "solar-open", "mellum2",
))


def template(key: str, arch: str) -> str:
    """The table form of `key` for a file of architecture `arch` ("llama.context_length" -> "{arch}....")."""
    if arch and key.startswith(arch + "."):
        return "{arch}" + key[len(arch):]
    return key


def expected_types(key: str, arch: str):
    """The (type, element type) pairs llama.cpp accepts for `key`, or None if it reads no such key."""
    return KEY_TYPES.get(template(key, arch))


def is_structural(key: str, arch: str) -> bool:
    t = template(key, arch)
    return t in STRUCTURAL or t in STRUCTURAL_BY_ARCH.get(arch, ())


def is_required(key: str, arch: str) -> bool:
    t = template(key, arch)
    return t in REQUIRED or t in REQUIRED_BY_ARCH.get(arch, ())

"""The internal representation every reader produces and every writer consumes.

Tensor names are canonical and follow GGUF's naming (gguf-py constants):
`token_embd.weight`, `blk.{i}.attn_q.weight`, ... (names per source layout: wconv/arch/).
Shapes are row-major [out, in] like torch's nn.Linear. Llama q/k weights are in
Meta's interleaved rotary order (what llama2.c and llama.cpp both expect); readers
of HF checkpoints undo HF's permutation. A tied classifier is represented by
`config.tie_embeddings = True` and no `output.weight` tensor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

from .tensor import LazyTensor

@dataclass
class Config:
    """Hyperparameters, in the same terms for every family (wconv/arch/ says which apply)."""

    arch: str = "llama"  # a family name from wconv.arch (or "unknown" for inspect)
    dim: int = 0  # embedding width (n_embd)
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0  # == n_heads without GQA
    vocab_size: int = 0
    hidden_dim: int = 0  # feed-forward width
    max_seq_len: int = 0  # context length
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # rotary families only
    tie_embeddings: bool = False
    bias: bool = False  # gpt2: linear layers and norms have biases
    gelu: str = "tanh"  # gpt2: "tanh" (GPT-2, HF gelu_new, llama.cpp) or "erf" (nanoGPT's nn.GELU())
    head_width: int = 0  # per-head width when it is not dim / n_heads (Gemma, some Mistral/Llama 3)
    # RoPE frequency scaling: None, {"type": "linear", "factor": f}, or {"type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    sliding_window: int = 0  # Mistral: attention window of transformers (llama.cpp attends to all)

    @property
    def head_dim(self) -> int:
        if self.head_width:
            return self.head_width
        return self.dim // self.n_heads if self.n_heads else 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tokenizer:
    """A vocabulary as GGUF describes it (tokenizer.ggml.*), whatever file it was read from.

    Tokens are bytes exactly as GGUF stores them: sentencepiece pieces with '▁' for spaces
    (model "llama"), or GPT-2's byte-to-unicode alphabet for byte-level BPE (model "gpt2");
    added/special tokens keep their raw text. Token types are gguf.TokenType values
    (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE).
    """

    model: str  # "llama" (sentencepiece-style: scores) | "gpt2" (byte-level BPE: merges)
    tokens: list  # list[bytes]
    scores: list | None = None  # list[float]
    token_types: list | None = None  # list[int], gguf.TokenType values
    merges: list | None = None  # list[str] "left right", BPE only, in rank order
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    sep_id: int | None = None
    eot_id: int | None = None  # end of turn (e.g. <|eot_id|>, <|im_end|>)
    eom_id: int | None = None  # end of message (Llama 3.1 <|eom_id|>)
    eog_ids: list | None = None  # every id that ends generation (generation_config.json eos_token_id list)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None  # sentencepiece add_dummy_prefix / HF Prepend('▁')
    pre: str | None = None  # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), BPE
    chat_template: str | None = None
    kind: str = ""  # what it was read from: sentencepiece, llama2c-tokenizer, tiktoken, hf-tokenizer-json, gpt2-vocab, gguf
    source: str = ""  # the main file
    files: list = field(default_factory=list)  # every file read (main file, tokenizer_config.json, ...)
    found_beside: bool = False  # picked up from beside the model, not given (convert announces it)


@dataclass
class Stored:
    """One tensor as the file stores it: its own name, dtype and shape (the file view)."""

    file: str  # the file it is in
    name: str  # its name there (a training checkpoint: the key inside its model dict)
    tensor: LazyTensor  # raw stored data: stored dtype and shape
    canonical: str | None = None  # the model-view tensor it becomes, None if the model drops it
    note: str = ""  # why it is dropped or where it went (e.g. "recomputed buffer", "RoPE scaling")


@dataclass
class Model:
    config: Config
    tensors: dict = field(default_factory=dict)  # canonical name -> LazyTensor, in file order
    tokenizer: Tokenizer | None = None
    metadata: dict = field(default_factory=dict)  # free-form: source format, iter_num, ...
    source_format: str = ""  # e.g. "torch-zip", "llama2c-v0", "gguf"
    source_layout: str = ""  # e.g. "meta", "llama2c-ckpt", "nanogpt", "hf"
    path: str = ""
    stored: list = field(default_factory=list)  # Stored entries in file order: what inspect shows

    def __iter__(self) -> Iterator[LazyTensor]:
        return iter(self.tensors.values())

    def __getitem__(self, name: str) -> LazyTensor:
        return self.tensors[name]

    def get(self, name: str):
        return self.tensors.get(name)

    def add(self, t: LazyTensor) -> None:
        self.tensors[t.name] = t

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    def classifier(self) -> LazyTensor:
        """The output projection (the token embedding when tied)."""
        return self.tensors.get("output.weight") or self.tensors["token_embd.weight"]

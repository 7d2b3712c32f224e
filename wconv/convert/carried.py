"""What each output format holds of a source's vocabulary and metadata, and the warnings for the rest.

Lossless or loud: at convert time every property of the source that the chosen output cannot
represent is named once, with what the reader of the output will see instead. The knowledge is
data (OUTPUTS, one row per output format); `losses` compares a model against a row.

Hyperparameters the output cannot record (GGJT's norm eps and context length, run.c's hard-coded
values) are the writers' own `cannot_hold` warnings; this module covers the vocabulary, the
tokenizer's special ids and chat template, and the source's GGUF metadata keys.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import arch

# Tokenizer fields -> (the words for them, the GGUF key they come from / go to).
TOKENIZER_FIELDS = {
    "tokens": ("tokens", "tokenizer.ggml.tokens"),
    "model": ("tokenizer model", "tokenizer.ggml.model"),
    "scores": ("scores", "tokenizer.ggml.scores"),
    "token_types": ("token types", "tokenizer.ggml.token_type"),
    "merges": ("merges", "tokenizer.ggml.merges"),
    "pre": ("pre-tokenizer", "tokenizer.ggml.pre"),
    "bos_id": ("bos id", "tokenizer.ggml.bos_token_id"),
    "eos_id": ("eos id", "tokenizer.ggml.eos_token_id"),
    "unk_id": ("unk id", "tokenizer.ggml.unknown_token_id"),
    "pad_id": ("pad id", "tokenizer.ggml.padding_token_id"),
    "sep_id": ("sep id", "tokenizer.ggml.seperator_token_id"),  # (llama.cpp's spelling)
    "eot_id": ("eot id", "tokenizer.ggml.eot_token_id"),
    "eom_id": ("eom id", "tokenizer.ggml.eom_token_id"),
    "eog_ids": ("end-of-generation ids", None),
    "add_bos": ("add_bos", "tokenizer.ggml.add_bos_token"),
    "add_eos": ("add_eos", "tokenizer.ggml.add_eos_token"),
    "add_space_prefix": ("add_space_prefix", "tokenizer.ggml.add_space_prefix"),
    "chat_template": ("chat template", "tokenizer.chat_template"),
}
# GGUF keys that describe the file, not the model: every output has its own form of them.
FILE_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


@dataclass(frozen=True)
class Holds:
    """What one output format keeps of a model besides its weights and hyperparameters."""

    vocabulary: str | None  # where the vocabulary goes (None: nowhere)
    fields: frozenset  # Tokenizer fields kept with it
    general: frozenset = frozenset()  # GGUF general.* keys carried (besides FILE_KEYS)
    gguf: bool = False  # a GGUF output: the source's arch keys are rewritten, so compared by name
    assumed_ids: tuple = ()  # (field, id) a reader assumes because the file has no field for it
    without_vocabulary: str = ""  # what to do to keep a vocabulary the output does not hold
    needs_tokenizer_option: bool = False  # the vocabulary is written only when --tokenizer is given
    instead: str = ""  # what a reader sees in place of the fields it does not keep


_ALL = frozenset(TOKENIZER_FIELDS) - {"eog_ids"}
OUTPUTS = {
    "gguf": Holds("the GGUF's tokenizer.* keys", _ALL, frozenset({"general.name"}), gguf=True),
    "hf": Holds("tokenizer.json + tokenizer_config.json",
                frozenset({"tokens", "model", "scores", "token_types", "merges", "pre", "bos_id", "eos_id",
                           "unk_id", "pad_id", "sep_id", "add_bos", "add_eos", "add_space_prefix",
                           "chat_template"}),
                instead=" (transformers stops generation at eos only)"),
    "ggjt": Holds("the ggjt vocabulary (token texts and scores)", frozenset({"tokens", "model", "scores"}),
                  assumed_ids=(("unk_id", 0), ("bos_id", 1), ("eos_id", 2)),
                  instead=" (readers infer token types from the texts and use llama.cpp's defaults for the rest)"),
    "llama2c": Holds("tokenizer.bin beside the model (token texts and scores)",
                     frozenset({"tokens", "model", "scores", "bos_id", "eos_id"}),
                     assumed_ids=(("unk_id", 0), ("bos_id", 1), ("eos_id", 2)),
                     without_vocabulary="pass --tokenizer FILE (a tokenizer file or the GGUF itself) to write "
                                        "tokenizer.bin, or run `wconv tokenizer-to-bin`", needs_tokenizer_option=True,
                     instead=" (run.c has no chat template and uses bos 1, eos 2)"),
    "safetensors": Holds(None, frozenset(), without_vocabulary="use --to hf or a .gguf output to keep it"),
}


def _set(tok, field) -> bool:
    value = getattr(tok, field, None)
    if field == "pre" and tok.model == "llama" and value == "default":
        return False  # what every reader of a sentencepiece-style vocabulary uses anyway
    return value is not None and value != [] and value != ""


def _gguf_keys(model) -> list:
    """The source's GGUF metadata keys (a GGUF input only), in file order."""
    if not (model.source_format or "").startswith("gguf"):
        return []
    return [k for k in model.metadata if "." in k and not k.startswith(("GGUF.", "_"))]


def _written_arch_keys(model) -> set:
    fam = arch.get(model.config.arch)
    if fam is None or not getattr(fam, "gguf_arch", None):
        return set()
    emb = model.get("token_embd.weight")
    n_vocab = emb.shape[0] if emb is not None else model.config.vocab_size
    try:
        return {f"{fam.gguf_arch}.{key}" for key, _, _ in
                fam.gguf_metadata(model.config, model.config.max_seq_len or 1, n_vocab)}
    except Exception:  # a family that cannot describe this config refuses later, naming why
        return set()


def carries_vocabulary(fmt: str, *, tokenizer_given: bool = False) -> bool:
    holds = OUTPUTS[fmt]
    return holds.vocabulary is not None and (tokenizer_given or not holds.needs_tokenizer_option)


def losses(model, fmt: str, *, tokenizer_given: bool = False) -> list:
    """One warning per kind of loss converting `model` to `fmt`: what is dropped, what a reader sees."""
    holds = OUTPUTS[fmt]
    out = []
    tok = model.tokenizer
    vocab_from_source = tok is not None and tok.kind == "gguf" and not tokenizer_given
    carried_vocab = tok is not None and carries_vocabulary(fmt, tokenizer_given=tokenizer_given)
    if tok is not None and not carried_vocab:
        where = "the source's" if vocab_from_source else f"the tokenizer ({tok.source})"
        out.append(f"{where} vocabulary ({len(tok.tokens)} tokens) is not carried: {fmt} output "
                   f"{'holds none' if holds.vocabulary is None else 'gets ' + holds.vocabulary + ' only with --tokenizer'}"
                   f", so readers of it have no tokenizer; {holds.without_vocabulary}")
    elif tok is not None:
        assumed = dict(holds.assumed_ids)
        dropped = [TOKENIZER_FIELDS[f][0] for f in TOKENIZER_FIELDS
                   if _set(tok, f) and f not in holds.fields and not (f in assumed and getattr(tok, f) == assumed[f])]
        wrong = [f"{TOKENIZER_FIELDS[f][0]} {getattr(tok, f)} (readers assume {i})"
                 for f, i in holds.assumed_ids if _set(tok, f) and getattr(tok, f) != i]
        if dropped:
            out.append(f"{fmt} output keeps {holds.vocabulary}; not carried from the tokenizer: "
                       f"{', '.join(dropped)}{holds.instead}")
        if wrong:
            out.append(f"{fmt} output has no field for special token ids: {', '.join(wrong)}")
    keys = _gguf_keys(model)
    if keys:
        kept = set(FILE_KEYS) | set(holds.general)
        if holds.gguf:
            kept |= _written_arch_keys(model)
        field_keys = {key for _, key in TOKENIZER_FIELDS.values() if key}
        # tokenizer.* keys standing for Tokenizer fields are reported above (or replaced by --tokenizer)
        lost = [k for k in keys if k not in kept and k not in field_keys
                and (holds.gguf or k.startswith(("general.", "tokenizer.")))
                and not (tokenizer_given and k.startswith("tokenizer."))]
        if lost:
            out.append(f"{fmt} output does not carry the source's GGUF metadata {', '.join(lost)}")
    return out


def dropped_tokenizer(model) -> str | None:
    """Why a tokenizer found beside the input was not used (load_model records it), for a warning."""
    return model.metadata.get("_dropped_tokenizer")

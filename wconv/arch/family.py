"""What every architecture module provides: the Family base class.

A family is data first: its canonical tensor templates (GGUF names, `{i}` for the block
index, in llama.cpp's order), the names each source layout uses for them, the keys each
source uses for hyperparameters, and its GGUF and Hugging Face identities. Behaviour that
cannot be data (shapes from a Config, fix-ups between layouts, the reference forward pass,
GGUF metadata) are methods that subclasses override.

Canonical form = what GGUF stores for that architecture: its tensor names, [out, in]
matrices, and its q/k row order (Meta's interleaved rotary pairs for llama, HF's half-split
order for the NEOX-rotary families). Readers convert into it, writers out of it.
"""
from __future__ import annotations

import math
import numbers
import re

from ..errors import FormatError, UnsupportedError
from ..model import Config

_BLK = re.compile(r"^blk\.(\d+)\.")


def template_of(canonical: str) -> tuple[str, int | None]:
    """('blk.{i}.attn_q.weight', 3) for 'blk.3.attn_q.weight'."""
    m = _BLK.match(canonical)
    if not m:
        return canonical, None
    return "blk.{i}." + canonical[m.end():], int(m.group(1))


def fill(template: str, i, e=None) -> str:
    """Template with its block index `{i}` (and expert index `{e}`, for per-expert source names) filled."""
    out = template.replace("{i}", str(i)) if i is not None else template
    return out.replace("{e}", str(e)) if e is not None else out


_INDEX = re.compile(r"(\{[ie]\})")


def _pattern(template: str) -> re.Pattern:
    """Regex of a layout template: `{i}` (block) and `{e}` (expert) become named digit groups."""
    parts = _INDEX.split(template)
    return re.compile("^" + "".join(f"(?P<{p[1]}>\\d+)" if _INDEX.fullmatch(p) else re.escape(p) for p in parts)
                      + "$")


def short_list(items, n: int = 4) -> str:
    items = [str(i) for i in items]
    text = ", ".join(items[:n])
    return text + (f" (and {len(items) - n} more)" if len(items) > n else "")


class Problems:
    """Problems found while building a model: raised at once when strict, else kept.

    strict=False (inspect) never refuses a readable file: layout problems make the model
    arch "unknown" and every problem is listed in metadata["warnings"].
    """

    def __init__(self, path, strict: bool):
        self.path, self.strict = path, strict
        self.layout = []  # tensors that do not fit -> arch unknown when not strict
        self.other = []  # hyperparameter gaps: the model is still usable for inspect
        self.notes = []

    def tensor_problem(self, exc_type, message):
        if self.strict:
            raise exc_type(self.path, message)
        self.layout.append(message)

    def hparam_problem(self, exc_type, message):
        if self.strict:
            raise exc_type(self.path, message)
        self.other.append(message)


class Family:
    """Base class; one subclass instance per architecture, registered in wconv.arch."""

    name = ""  # Config.arch
    title = ""  # for messages
    long_title = ""  # for the list of supported architectures (versions included); title when empty
    other_sources: tuple = ()  # non-HF layouts it is read from, for that list
    gguf_arch = ""  # general.architecture
    hf_classes: tuple = ()  # config.json "architectures" this family converts
    hf_model_types: tuple = ()  # config.json "model_type"
    templates: tuple = ()  # canonical tensor templates in llama.cpp's order
    names: dict = {}  # source layout -> {canonical template: the layout's template}
    # source layout -> {Config field: the keys it is stated under, first found wins}
    hparam_keys: dict = {}
    llama2c = False  # llama2.c .bin / GGJT can hold it
    hf_tie_default = False  # config.json's tie_word_embeddings when it does not say
    hf_special_ids = (None, None)  # transformers' bos/eos defaults for the config class

    # --- names ---------------------------------------------------------------------------
    def _reverse(self, layout: str):
        cache = self.__dict__.setdefault("_reverse_cache", {})
        if layout not in cache:
            cache[layout] = [(_pattern(theirs), canon) for canon, theirs in self.names[layout].items()]
        return cache[layout]

    def to_canonical(self, name: str, layout: str) -> str | None:
        if layout == "canonical":
            template, _ = template_of(name)
            return name if template in self.templates else None
        for pat, canon in self._reverse(layout):
            m = pat.match(name)
            if m:
                index = m.groupdict()
                return fill(canon, index.get("i"), index.get("e"))
        return None

    def from_canonical(self, name: str, layout: str) -> str | None:
        if layout == "canonical":
            return name
        template, idx = template_of(name)
        theirs = self.names[layout].get(template)
        return fill(theirs, idx) if theirs is not None else None

    def expected_names(self, cfg: Config) -> list[str]:
        """Canonical names of a complete model of `cfg`, in llama.cpp's order."""
        head = [t for t in self.templates if "{i}" not in t and not t.startswith("output")]
        block = [t for t in self.templates if "{i}" in t]
        tail = [t for t in self.templates if t.startswith("output")]
        names = list(head)
        for i in range(cfg.n_layers):
            names += [fill(t, i) for t in block]
        return [n for n in names + tail if self.present(n, cfg)]

    def present(self, name: str, cfg: Config) -> bool:
        """Whether canonical tensor `name` belongs to a model of `cfg` (tied: no output.weight)."""
        return not (name == "output.weight" and cfg.tie_embeddings)

    def shape(self, name: str, cfg: Config) -> tuple | None:
        """The shape of canonical tensor `name` in a model of `cfg` (the only shape table)."""
        raise NotImplementedError

    def shapes(self, cfg: Config) -> dict:
        return {n: self.shape(n, cfg) for n in self.expected_names(cfg)}

    def check_complete(self, canon: dict, cfg: Config, problems: "Problems") -> None:
        """Every tensor the family needs for `cfg` is there with its shape, and nothing else."""
        expected = self.expected_names(cfg)
        missing = [n for n in expected if n not in canon]
        extra = [n for n in canon if n not in set(expected)]
        if missing:
            problems.tensor_problem(FormatError, f"{self.title} checkpoint is missing tensors {short_list(missing)}")
        if extra:
            problems.tensor_problem(UnsupportedError, f"unexpected tensors for {self.title}: {short_list(extra)}")
        for name in expected:
            t = canon.get(name)
            want = self.shape(name, cfg)
            if t is not None and want is not None and tuple(t.shape) != tuple(want):
                problems.tensor_problem(FormatError, f"{name} has shape {list(t.shape)}, expected {list(want)}")

    # --- hyperparameters -------------------------------------------------------------------
    def declared(self, layout: str, side: dict, problems: Problems, where: str) -> dict:
        """Config fields stated by a side file (params.json, model_args, config.json)."""
        out = {}
        for field, keys in self.hparam_keys.get(layout, {}).items():
            for key in keys:
                if side.get(key) is not None:
                    out[field] = side[key]
                    break
        return checked_types(out, problems, where)

    def refusals(self, layout: str, side: dict) -> list[str]:
        """Reasons the math of this checkpoint is not what wconv implements (empty: fine)."""
        return []

    def build_config(self, canon: dict, declared: dict, layout: str, problems: Problems) -> Config:
        raise NotImplementedError

    def orient(self, canon: dict, layout: str) -> None:
        """Lazily turn tensors stored in another orientation (HF Conv1D [in, out]) into [out, in],
        in place; runs before the shapes are read for the config."""

    def from_layout(self, canon: dict, cfg: Config, layout: str, problems: Problems) -> None:
        """Lazily turn tensors stored in `layout`'s form into canonical form, in place."""

    def to_layout(self, name: str, t, cfg: Config, layout: str):
        """Tensor `t` (canonical `name`) in `layout`'s form (lazy)."""
        return t

    # --- GGUF ----------------------------------------------------------------------------
    gguf_keys: tuple = ()  # "{arch}.*" keys this family reads (anything else is refused)

    def gguf_config(self, kv: dict, tensors: dict, problems: Problems) -> Config:
        raise NotImplementedError

    def gguf_metadata(self, cfg: Config, n_ctx: int, n_vocab: int) -> list:
        """[(key without the arch prefix, value, gguf value type name)] llama.cpp reads."""
        raise NotImplementedError

    def gguf_absorb(self, cfg: Config, tensors: dict, problems: Problems) -> Config:
        """Fold GGUF-only tensors that describe hyperparameters (e.g. rope_freqs) into cfg."""
        return cfg

    def gguf_extra_tensors(self, cfg: Config) -> dict:
        """Tensors GGUF needs that the checkpoint does not hold (canonical name -> LazyTensor)."""
        return {}

    def gguf_cannot_hold(self, cfg: Config, runtime: str = "llama.cpp") -> list[str]:
        """Properties `runtime` (llama.cpp for GGUF / GGJT, llama2.c's run.c for .bin) will not
        apply, each with what it does instead: warnings, the file itself carries what it can."""
        return []

    def gguf_refusal(self, cfg: Config) -> str | None:
        """Why llama.cpp's loader for this family cannot hold a model of `cfg` at all (None: it can)."""
        return None

    # --- Hugging Face ----------------------------------------------------------------------
    def hf_config(self, cfg: Config) -> dict:
        raise NotImplementedError

    # --- reference -----------------------------------------------------------------------
    def forward(self, model, toks, dt):
        raise NotImplementedError

    def math_key(self) -> tuple:
        """Families with equal keys compute the same function of the same Config (Mistral and
        Llama), so a model of one may be compared with its conversion read back as the other."""
        return (self.name,)

    def check_reference(self, cfg: Config, where) -> None:
        """Refuse configs whose math the reference does not implement."""


_INT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len",
               "head_width", "sliding_window")
_FLOAT_FIELDS = ("norm_eps", "rope_theta")


def checked_types(declared: dict, problems: Problems, where: str) -> dict:
    """Drop (and report) declared values of the wrong JSON type: they would crash int()/float() later."""
    out = {}
    for key, v in declared.items():
        number = isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars from pickles too
        if key in _INT_FIELDS and not (number and isinstance(v, numbers.Integral)):
            problems.hparam_problem(FormatError, f"{where} gives {key}={v!r:.60}; expected an integer")
            continue
        if key in _FLOAT_FIELDS and not (number and math.isfinite(v) and v > 0):
            problems.hparam_problem(FormatError, f"{where} gives {key}={v!r:.60}; expected a positive finite number")
            continue
        out[key] = int(v) if key in _INT_FIELDS else v
    if isinstance(out.get("vocab_size"), int) and out["vocab_size"] <= 0:
        del out["vocab_size"]  # Meta writes -1: "take it from the tokenizer / embedding"
    return out


def agree(declared: dict, key: str, actual, what: str, problems: Problems):
    if key in declared and declared[key] != actual:
        problems.hparam_problem(FormatError, f"declared {key}={declared[key]!r} but {what} gives {actual}")


def layer_count(canon: dict) -> int:
    idx = [template_of(n)[1] for n in canon]
    return max((i for i in idx if i is not None), default=-1) + 1


def refuse(problems: Problems, message: str) -> None:
    problems.tensor_problem(UnsupportedError, message)

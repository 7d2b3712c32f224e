"""wconv: read, inspect, convert and verify LLM weight files without torch."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (FormatError, OutputError, ParityError, UnsafeFileError,  # noqa: E402
                     UnsupportedError, UsageError, WconvError)
from .model import Config, Model, Tokenizer  # noqa: E402
from .tensor import LazyTensor  # noqa: E402


def load(path, **options) -> Model:
    """Open any supported model file or directory as a lazy Model."""
    from .convert.load import load_model

    return load_model(path, **options)


# `wconv.inspect(path)` and `wconv.parity(a, b)` are modules made callable (see their
# docstrings): importing a submodule rebinds the package attribute of the same name, so a
# plain function here would be replaced by the module on first use.
from . import inspect, parity  # noqa: E402


__all__ = ["load", "inspect", "parity", "Model", "Config", "Tokenizer", "LazyTensor", "WconvError",
           "FormatError", "UnsupportedError", "UnsafeFileError", "OutputError", "UsageError",
           "ParityError", "__version__"]

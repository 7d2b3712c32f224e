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


def inspect(path, **options) -> dict:
    """The `wconv inspect --json` report for `path`, as a Python dict."""
    from .inspect.report import inspect_path

    return inspect_path(path, **options)


def parity(a, b, **options) -> dict:
    """Run the numpy reference on two models and compare their logits."""
    from .parity import compare

    return compare(a, b, **options)


__all__ = ["load", "inspect", "parity", "Model", "Config", "Tokenizer", "LazyTensor", "WconvError",
           "FormatError", "UnsupportedError", "UnsafeFileError", "OutputError", "UsageError",
           "ParityError", "__version__"]

"""Shared test helpers: where the committed fixtures and the real third-party files are."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
REALDATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "realdata"))


def fixture_path(*parts) -> str:
    """A file or directory under fixtures/ (committed: always present)."""
    return os.path.join(FIXTURES, *parts)


def realdata_path(*parts) -> str:
    """A file under ../shared/realdata, or skip the test when it is not there."""
    path = os.path.join(REALDATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real-data file {path} not available")
    return path


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES


@pytest.fixture
def realdata():
    """The realdata_path function: realdata("torch", "x.pt") -> path, or skip."""
    return realdata_path


def pytest_collection_modifyitems(config, items):
    # @pytest.mark.slow runs only with `-m slow` (or any -m naming it) or WCONV_SLOW=1.
    if os.environ.get("WCONV_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or WCONV_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def import_llama_cpp():
    """llama_cpp (llama-cpp-python), the GGUF consumer: skips without it, fails under CI=true."""
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but llama_cpp cannot be imported ({e}); install the llama-cpp-python wheel")
        pytest.skip("llama-cpp-python is not installed")
    return llama_cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return import_llama_cpp()

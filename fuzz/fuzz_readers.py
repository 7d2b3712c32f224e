"""Coverage-guided fuzzing of wconv's readers with atheris (libFuzzer), for long runs by hand.

    pip install atheris
    python fuzz/fuzz_readers.py FORMAT [libFuzzer options] [CORPUS_DIR ...]

FORMAT is one of the seed kinds below (gguf, safetensors, llama2c_v0, llama2c_v1, llama2c_v2,
ggjt, tokenizer, sentencepiece, torch_zip, torch_legacy, torch_model_zip,
torch_model_legacy) or `pickle`: the input is a data.pkl, wrapped in a torch zip with a
correct CRC so that mutations reach the pickle interpreter. The input bytes are written
to a file of that format's extension and opened every public way (wconv.load and reading
every tensor, inspect with and without placeholders, scan, the tokenizer readers). Any
exception other than WconvError is a finding: libFuzzer saves the input as crash-*.

Seeds (small valid files written by wconv's writers and tests/hostile.py) go to
fuzz/corpus/FORMAT/ on the first run. See fuzz/README.md.
"""
from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

EXTENSIONS = {"gguf": ".gguf", "safetensors": ".safetensors", "llama2c_v0": ".bin", "llama2c_v1": ".bin",
              "llama2c_v2": ".bin", "ggjt": ".ggjt", "tokenizer": ".bin", "sentencepiece": ".model",
              "torch_zip": ".pt", "torch_legacy": ".pt", "torch_model_zip": ".pth", "torch_model_legacy": ".pth",
              "pickle": ".pt"}
MAX_READ_BYTES = 64 << 20


def write_seeds(fmt: str, directory: str) -> None:
    import hostile

    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return
    if fmt == "pickle":
        seeds = [hostile.llama2c_ckpt()[0], hostile.small_tree()[0]]
        seeds += [p[1] for p in hostile.payloads(os.path.join(tempfile.gettempdir(), "never")) if len(p[1]) < 4096]
    elif fmt.startswith("torch_model"):
        pkl, blobs = hostile.llama2c_ckpt(legacy=fmt.endswith("legacy"))
        seeds = [hostile.torch_zip(pkl, blobs) if fmt.endswith("zip") else
                 hostile.torch_legacy(pkl, [(k, 4, v) for k, v in blobs.items()])]
    else:
        valid = hostile.write_valid_files(tempfile.mkdtemp(prefix="wconv-seeds-"))
        seeds = [open(valid[fmt], "rb").read()]
    for i, seed in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(seed)


def make_target(fmt: str):
    import wconv
    from wconv.convert.load import load_tokenizer
    from wconv.errors import WconvError
    from wconv.formats import sentencepiece
    from wconv.formats.torch_file import open_torch_file, walk_tensors
    from wconv.inspect.scan import scan_path

    path = os.path.join(tempfile.mkdtemp(prefix="wconv-fuzz-"), "input" + EXTENSIONS[fmt])
    blobs = {}
    if fmt == "pickle":
        import hostile

        blobs = hostile.llama2c_ckpt()[1]

    def read_all(tensors):
        for t in tensors:
            if t.nbytes <= MAX_READ_BYTES:
                t.raw()
                if not t.dtype.name.startswith("C"):
                    t.float32()

    def attempt(fn):
        try:
            fn()
        except WconvError as e:
            if "\n" in str(e):
                raise AssertionError(f"multi-line error message: {e!r}") from None

    def one_input(data: bytes):
        if fmt == "pickle":
            import hostile

            data = hostile.torch_zip(data, blobs)
        with open(path, "wb") as f:
            f.write(data)
        if fmt in ("tokenizer", "sentencepiece"):
            attempt(lambda: load_tokenizer(path))
            attempt(lambda: sentencepiece.read(path))
        else:
            attempt(lambda: read_all(wconv.load(path).tensors.values()))
            attempt(lambda: wconv.inspect(path))
            attempt(lambda: wconv.inspect(path, allow_unknown_globals=True))
        if fmt.startswith("torch") or fmt == "pickle":
            attempt(lambda: read_all(t for _, t in walk_tensors(open_torch_file(path).root)))
        attempt(lambda: scan_path(path))

    return one_input


def main(argv):
    if len(argv) < 2 or argv[1] not in EXTENSIONS:
        sys.exit(f"usage: {argv[0]} FORMAT [libFuzzer options] [CORPUS_DIR ...]\nFORMAT: {' '.join(EXTENSIONS)}")
    fmt = argv.pop(1)
    import atheris

    corpus = os.path.join(HERE, "corpus", fmt)
    write_seeds(fmt, corpus)
    with atheris.instrument_imports():
        import wconv  # noqa: F401
        import wconv.convert.load  # noqa: F401
        import wconv.convert.sources  # noqa: F401
        import wconv.convert.state_dict  # noqa: F401
        import wconv.formats.ggml_legacy  # noqa: F401
        import wconv.formats.gguf_io  # noqa: F401
        import wconv.formats.llama2c  # noqa: F401
        import wconv.formats.llama2c_tokenizer  # noqa: F401
        import wconv.formats.pickle_globals  # noqa: F401
        import wconv.formats.pickle_opcodes  # noqa: F401
        import wconv.formats.pickle_records  # noqa: F401
        import wconv.formats.pickle_vm  # noqa: F401
        import wconv.formats.safetensors_io  # noqa: F401
        import wconv.formats.sentencepiece  # noqa: F401
        import wconv.formats.torch_file  # noqa: F401
        import wconv.formats.torch_legacy  # noqa: F401
        import wconv.formats.torch_tensors  # noqa: F401
        import wconv.formats.torch_zip  # noqa: F401
        import wconv.inspect.report  # noqa: F401
        import wconv.inspect.scan  # noqa: F401
    target = make_target(fmt)
    if not any(a for a in argv[1:] if not a.startswith("-")):
        argv.append(corpus)
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

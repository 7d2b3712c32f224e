"""The `wconv` command line. Every subcommand is a thin layer over the library."""
from __future__ import annotations

import inspect as _inspect_doc
import json
import os
import signal
import sys

import click

from . import __version__, arch, atomic, codecs, quant_mix
from .errors import WconvError


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP as a KeyboardInterrupt, so `finally` blocks remove temporary outputs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupt(signum, frame):
    raise Interrupted(signum)


class _Group(click.Group):
    def invoke(self, ctx):
        atomic.forget_finished()
        try:
            return super().invoke(ctx)
        except WconvError as e:
            click.echo(f"wconv: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            # The shell convention: 128 + the signal number (SIGINT 130, SIGTERM 143, SIGHUP 129).
            done = atomic.finished_outputs()  # (an interruption right after an output was complete)
            click.echo(f"wconv: interrupted after writing {', '.join(done)}" if done
                       else "wconv: interrupted; no output written", err=True)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        except MemoryError:
            click.echo("wconv: error: out of memory", err=True)
            sys.exit(3)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug in wconv: still one line, details on request
            if os.environ.get("WCONV_DEBUG"):
                raise
            click.echo(f"wconv: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                       "(set WCONV_DEBUG=1 for a traceback)", err=True)
            sys.exit(70)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wconv")
def main():
    """Read, inspect, convert and verify LLM weight files without torch.

    Inputs: torch checkpoints (.pth/.pt/.bin, zip or legacy), Meta model
    directories (consolidated.NN.pth + params.json), llama2.c and nanoGPT
    ckpt.pt, Hugging Face directories (pytorch_model.bin / model.safetensors,
    sharded or not, + config.json), llama2.c .bin, GGUF, GGML/GGJT, safetensors.
    Nothing in an input is ever executed.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: keep ignoring
        signal.signal(signal.SIGHUP, _raise_interrupt)
    if hasattr(signal, "SIGXFSZ"):  # file-size limit: get EFBIG instead of dying mid-write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


main.help = f"{_inspect_doc.cleandoc(main.help)}\n\nArchitectures: {arch.summary()}."  # from the registry, wconv/arch/


# --dtype: llama.cpp's file type names (wconv.quant_mix), of the types wconv can write.
DTYPE_CHOICES = tuple(f for f in ("f32", "f16", "bf16", *quant_mix.LEGACY, *quant_mix.K_MIXES)
                      if f in quant_mix.FTYPES and codecs.by_option(quant_mix.FTYPES[f][1]) is not None)
MIX_TYPES = tuple(t.lower() for t in quant_mix.BLOCK)  # --output-tensor-type / --token-embedding-type


def _llama2c_options(fn):
    """--version / --group-size / --max-seq-len, shared by convert and pth-to-bin."""
    for opt in reversed((
        click.option("--version", "bin_version", type=click.IntRange(0, 2),
                     help="llama2.c .bin version: 0 (default) legacy fp32 layout run.c reads; 1 'ak42' fp32; "
                          "2 int8 Q8_0 for runq.c."),
        click.option("--group-size", type=int,
                     help="v2 group size (default 64, halved until it divides dim and hidden_dim)."),
        click.option("--max-seq-len", type=click.IntRange(min=1),
                     help="Override the context length written to the header."),
    )):
        fn = opt(fn)
    return fn


def _split_options(fn):
    """--split-max-size / --split-max-tensors, shared by convert and split (llama.cpp's spellings)."""
    fn = click.option("--split-max-tensors", type=click.IntRange(min=1),
                      help="GGUF: at most N tensors per part of a split set.")(fn)
    return click.option("--split-max-size", metavar="N[K|M|G]",
                        help="GGUF: write a llama.cpp split set NAME-00001-of-0000N.gguf ... with at most this "
                             "many tensor bytes per part (decimal units: 5G = 5*10^9).")(fn)


_force = click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
_verbose = click.option("--verbose", "-v", is_flag=True, help="List every tensor behind a summary warning "
                                                               "(e.g. each of 61 re-quantised tensors).")
_threads = click.option("--threads", type=click.IntRange(min=1),
                        help="Threads encoding tensor data (default: the machine's cores). Output is "
                             "byte-identical whatever the count.")
_tok = click.option("--tokenizer", type=click.Path(dir_okay=False),
                    help="Tokenizer to embed / write, recognised by content: sentencepiece or Meta tiktoken "
                         "tokenizer.model, HF tokenizer.json (+ tokenizer_config.json beside it), vocab.json or "
                         "encoder.json (+ merges beside it), llama2.c tokenizer.bin, or a GGUF's vocabulary. "
                         "Default: one found beside SRC.")
_unknown = click.option("--allow-unknown-globals", is_flag=True,
                        help="Show unknown pickle globals as inert placeholders instead of refusing "
                             "(inspection only; nothing is ever called).")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable; see README).")
@click.option("--stats", is_flag=True, help="Also per-tensor min, max, mean, std and NaN/Inf/zero counts "
                                            "(reads every tensor, in bounded pieces).")
@_quiet
@_unknown
def inspect(path, as_json, stats, quiet, allow_unknown_globals):
    """Show format, architecture, hyperparameters and tensors of PATH (reads no tensor data unless --stats)."""
    from .inspect.report import format_text, inspect_path

    report = inspect_path(path, allow_unknown_globals=allow_unknown_globals, stats=stats, quiet=quiet)
    click.echo(json.dumps(report, indent=1) if as_json else format_text(report))


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--to", "to", type=click.Choice(["gguf", "safetensors", "llama2c", "ggjt", "hf"]),
              help="Output format (default: from OUT's extension: .gguf, .safetensors, .bin, .ggjt). "
                   "hf: a Hugging Face model directory OUT (config.json + safetensors) transformers loads.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
              help="Output element type, llama.cpp's names (gguf/ggjt/safetensors/hf; hf and safetensors: "
                   "f32/f16/bf16; ggjt: no bf16 and no k-quants). GGUF: a quantised type gives each tensor "
                   "the type llama-quantize gives it (q4_k_m: mostly Q4_K, output Q6_K, ...); 1-D tensors "
                   "stay f32.")
@click.option("--output-tensor-type", type=click.Choice(MIX_TYPES, case_sensitive=False),
              help="GGUF with a quantised --dtype: output.weight (or the tied embedding) as this type "
                   "(llama-quantize's option).")
@click.option("--token-embedding-type", type=click.Choice(MIX_TYPES, case_sensitive=False),
              help="GGUF with a quantised --dtype: token_embd.weight as this type (llama-quantize's option).")
@click.option("--pure", is_flag=True, help="GGUF with a quantised --dtype: every quantisable tensor as the "
                                           "mix's base type, no per-tensor rules (llama-quantize --pure).")
@click.option("--names", type=click.Choice(["stored", "canonical"]),
              help="safetensors output: 'stored' (the default for a torch file) mirrors its state dict exactly "
                   "(names, dtypes, shapes, values; a training checkpoint's other entries summarised in "
                   "__metadata__), for any model; 'canonical' (the default otherwise) writes wconv's model view: "
                   "GGUF-style names, hyperparameters in __metadata__.")
@click.option("--max-shard-size", help="--to hf: split the weights into shards of at most this size "
                                       "(e.g. 5GB, the default, or 500MB) with model.safetensors.index.json.")
@_split_options
@click.option("--vocab-only", is_flag=True, help="GGUF: vocabulary and hyperparameters only, no tensors "
                                                 "(llama.cpp loads it with vocab_only to tokenise).")
@click.option("--dry-run", is_flag=True, help="GGUF: print the plan (output files, per-tensor types and sizes, "
                                              "warnings) and write nothing.")
@click.option("--name", help="GGUF: general.name (default: the source's name, else the file name).")
@click.option("--metadata", type=click.Path(dir_okay=False),
              help="GGUF: JSON file of general.* keys, as llama.cpp's convert_hf_to_gguf.py --metadata takes "
                   "(author, version, license.name, tags, base_models, ...).")
@_llama2c_options
@_tok
@_force
@_quiet
@_threads
@_verbose
def convert(src, out, to, dtype, output_tensor_type, token_embedding_type, pure, names, max_shard_size, split_max_size,
            split_max_tensors, vocab_only, dry_run, name,
            metadata, bin_version, group_size, max_seq_len, tokenizer, force, quiet, verbose,
            threads):
    """Convert SRC (any readable format) to OUT.

    SRC may be the first part of a GGUF split set (NAME-00001-of-0000N.gguf): the set is read as
    one model, so a GGUF OUT merges it. In a GGUF OUT's file name, {ftype} becomes the output
    type (e.g. q8_0, f16) and {name} the model name.
    """
    from .convert.save import convert as do_convert

    do_convert(src, out, to=to, dtype=dtype and dtype.lower(), output_tensor_type=output_tensor_type,
               token_embedding_type=token_embedding_type, pure=pure, names=names, version=bin_version,
               group_size=group_size,
               max_seq_len=max_seq_len, max_shard_size=max_shard_size, split_max_size=split_max_size,
               split_max_tensors=split_max_tensors, vocab_only=vocab_only, dry_run=dry_run, name=name,
               metadata=metadata, tokenizer=tokenizer, force=force, quiet=quiet,
               verbose=verbose, threads=threads)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("prefix", type=click.Path())
@_split_options
@click.option("--no-tensor-first-split", is_flag=True, help="Put no tensors in the first part (metadata only).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@_force
@_quiet
def split(src, prefix, split_max_size, split_max_tensors, no_tensor_first_split, dry_run, force, quiet):
    """Split the GGUF SRC into PREFIX-00001-of-0000N.gguf ... as llama.cpp's gguf-split does.

    Metadata goes to the first part; split.no, split.count and split.tensors.count to every
    part; tensor data is copied by the kernel. llama.cpp loads the set from its first part.
    """
    from .gguf_split import parse_size, split as do_split

    if split_max_size is None and split_max_tensors is None:
        raise click.UsageError("give --split-max-size or --split-max-tensors")
    paths = do_split(src, prefix, max_bytes=parse_size(split_max_size) if split_max_size else None,
                     max_tensors=split_max_tensors, no_tensor_first_split=no_tensor_first_split, force=force,
                     quiet=quiet, dry_run=dry_run)
    if not dry_run:
        click.echo(f"wrote {len(paths)} parts: {paths[0]} ... {os.path.basename(paths[-1])}")


@main.command()
@click.argument("first", type=click.Path())
@click.argument("out", type=click.Path())
@_force
@_quiet
def merge(first, out, force, quiet):
    """Merge the GGUF split set whose first part is FIRST into one GGUF OUT (kernel copies).

    The metadata is the first part's without the split keys; a set split from a llama.cpp-style
    GGUF merges back to the same bytes.
    """
    from .gguf_split import merge as do_merge

    click.echo(f"wrote {do_merge(first, out, force=force, quiet=quiet)}")


@main.command("pth-to-bin")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@_llama2c_options
@_tok
@_force
@_quiet
@_verbose
@_threads
def pth_to_bin(src, out, bin_version, group_size, max_seq_len, tokenizer, force, quiet, verbose, threads):
    """Export a Llama checkpoint (Meta dir, .pth, ckpt.pt, HF dir) to a llama2.c .bin."""
    from .convert.save import convert as do_convert

    do_convert(src, out, to="llama2c", version=bin_version, group_size=group_size,
               max_seq_len=max_seq_len, tokenizer=tokenizer, force=force, quiet=quiet, verbose=verbose,
               threads=threads)


@main.command("tokenizer-to-bin")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@_force
def tokenizer_to_bin(src, out, force):
    """Write a sentencepiece-style vocabulary as llama2.c's tokenizer.bin.

    SRC: a sentencepiece tokenizer.model, a sentencepiece-style HF tokenizer.json (Llama 2,
    Mistral, TinyLlama), a GGUF with such a vocabulary, or a tokenizer.bin. Byte-level BPE
    vocabularies (GPT-2, Llama 3, Qwen) are refused: run.c implements only score-based merges.
    """
    from .convert.save import write_tokenizer_bin

    write_tokenizer_bin(src, out, force=force)


def _tokens(s):
    if not s:
        return None
    try:
        return [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 1,2,3")


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--prompt-tokens", help="Comma-separated token ids, e.g. 1,2,3.")
@click.option("--random-tokens", type=int, help="Use N random token ids (seeded) as the prompt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--atol", type=float, help="Max |Δlogit| allowed (default depends on the dtypes; see README).")
@click.option("--float64", is_flag=True, help="Compute the reference in float64.")
@click.option("--json", "as_json", is_flag=True)
def parity(a, b, prompt_tokens, random_tokens, seed, atol, float64, as_json):
    """Run the numpy reference on models A and B and compare their logits."""
    from .parity import compare, format_result

    result = compare(a, b, tokens=_tokens(prompt_tokens), random_tokens=random_tokens, seed=seed,
                     atol=atol, float64=float64)
    click.echo(json.dumps(result, indent=1) if as_json else format_result(result))
    if not result["ok"]:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--tokens", required=True, help="Comma-separated prompt token ids.")
@click.option("-n", "steps", type=int, default=16, show_default=True, help="Tokens to generate (greedy).")
def generate(model, tokens, steps):
    """Greedy generation with the numpy reference (to eyeball a model)."""
    from .reference import generate as do_generate

    out = do_generate(model, _tokens(tokens), steps)
    click.echo(",".join(str(t) for t in out))


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def scan(path, as_json):
    """List the globals and risky opcodes a pickle-based file uses, without running it.

    Exit code 0: safe (only tensor rebuilding); 1: unsafe; 2: unreadable. PATH may be a
    directory: every .bin/.pth/.pt/.pkl/.ckpt and weight file under it is scanned.
    """
    from .inspect.scan import format_scan, scan_path, scan_report

    # --json: one JSON object for every input, an unreadable one included (exit 2).
    result = scan_report(path) if as_json else scan_path(path)
    click.echo(json.dumps(result, indent=1) if as_json else format_scan(result))
    if not result["safe"]:
        sys.exit(2 if result["verdict"] == "unreadable" else 1)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--checksums", type=click.Path(dir_okay=False),
              help="md5sum/sha256sum-style list to check against (default: PATH/checklist.chk for a directory).")
@click.option("--crc", is_flag=True, help="Also check the CRC-32 of every torch zip member.")
@click.option("--deep", is_flag=True, help="Also scan every tensor for NaN/Inf (reads all tensor data).")
@click.option("--json", "as_json", is_flag=True)
@_quiet
def verify(path, checksums, crc, deep, as_json, quiet):
    """Check a download directory against its checksum list, or a model file's structure.

    A directory with checklist.chk (Meta's downloads) or --checksums: every listed file is
    hashed; missing, mismatching, HTML-instead-of-data and unlisted files are problems. A model
    file (torch, safetensors, GGUF incl. split sets, llama2.c, GGML/GGJT): every tensor's bytes
    in bounds, sized by dtype and shape, no overlaps, nothing truncated, laid out as the consumer
    needs. Exit code 0: no problem; 1: problems found; 2: unusable arguments.
    """
    from .verify import format_result, verify_path

    result = verify_path(path, checksums=checksums, crc=crc, deep=deep, quiet=quiet)
    click.echo(json.dumps(result, indent=1) if as_json else format_result(result))
    if not result["ok"]:
        sys.exit(1)


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Tolerance relative to |B| per element.")
@click.option("--strict", is_flag=True, help="Also fail on tensors only in one model and on hyperparameter or "
                                             "tokenizer differences.")
@click.option("--json", "as_json", is_flag=True)
@_quiet
def diff(a, b, atol, rtol, strict, as_json, quiet):
    """Compare two models tensor by tensor (any formats; quantised ones dequantised).

    Exit code 0: every common tensor matches within --atol/--rtol (exact by default);
    1: some differ; 2: error.
    """
    from .diff import diff_models, format_diff

    result = diff_models(a, b, atol=atol, rtol=rtol, strict=strict, quiet=quiet)
    click.echo(json.dumps(result, indent=1) if as_json else format_diff(result))
    if not result["ok"]:
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--set", "assignments", multiple=True, metavar="KEY[:TYPE]=VALUE",
              help="Set a metadata key (repeatable). An existing key keeps its type; TYPE is one of u8 i8 u16 "
                   "i16 u32 i32 u64 i64 f32 f64 bool str, or TYPE[] for a JSON array.")
@click.option("--delete", "deletions", multiple=True, metavar="KEY", help="Remove a metadata key (repeatable).")
@click.option("--chat-template", type=click.Path(dir_okay=False), help="File whose text becomes "
                                                                       "tokenizer.chat_template.")
@click.option("--in-place", is_flag=True, help="Rewrite SRC itself (atomically; needs room for one copy).")
@_force
def edit(src, out, assignments, deletions, chat_template, in_place, force):
    """Edit the metadata of a GGUF file; tensor data is copied unchanged (about the cost of cp).

    Edits that would keep llama.cpp from loading the file (a type it does not read a key as,
    a changed shape-determining key, a deleted required key, ...) are refused.
    """
    from .gguf_edit import edit_gguf, format_edit

    result = edit_gguf(src, out, set=assignments, delete=deletions, chat_template=chat_template,
                       in_place=in_place, force=force)
    click.echo(format_edit(result))


if __name__ == "__main__":
    main()

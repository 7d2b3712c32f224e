"""The safe mirror: `wconv convert ANY.pt OUT.safetensors` keeps a torch state dict exactly.

Every expectation comes from torch (torch.load(weights_only=True) of the same file) and the
output is read by the safetensors library and by transformers, never by wconv itself.
"""
from __future__ import annotations

import glob
import json
import subprocess
import os
import shutil

import numpy as np
import pytest

from helpers import WCONV
import torch
from safetensors import safe_open

from clirun import wconv
from conftest import FIXTURES, REALDATA, realdata_path
from torchfiles import make_big_endian, write_legacy_with_storage_view

TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")


def _is_torch_file(path) -> bool:  # a zip archive, or the legacy stream's magic-number pickle
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head == b"\x80\x02\x8a\x0a"


FIXTURE_FILES = sorted(p for p in glob.glob(os.path.join(FIXTURES, "**", "*"), recursive=True)
                       if p.endswith(TORCH_EXTS) and _is_torch_file(p))
REALDATA_FILES = ["candle_fortran_tensor_3d.pth", "nanogpt_style_small-gpt_ckpt.pt",
                  "picklescan_hf_tiny-random-distilbert_pytorch_model_LEGACY.bin",
                  "torchtune_tiny_fair_checkpoint_meta_format.pt"]


def torch_state_dict(path) -> dict:
    """The tensors a mirror must hold, by torch: the model dict of a training checkpoint, or
    the top-level tensors."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj.get(key), dict):
            return dict(obj[key])
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def bits(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def mirror(src, out, *extra):
    r = wconv("convert", "-q", src, out, *extra)
    assert r.returncode == 0, r.stderr
    return r


def read_mirror(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def stored_order(path) -> list:
    """Tensor names in the order of their data in a safetensors file."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"])


def assert_mirrors(src, out) -> dict:
    """`out` holds torch's tensors of `src` bitwise; aliases dropped only with their note."""
    want = torch_state_dict(src)
    got, meta = read_mirror(out)
    dropped = json.loads(meta.get("shared_tensors", "{}"))
    assert set(got) | set(dropped) == set(want) and not set(got) & set(dropped)
    for name, t in want.items():
        kept = dropped.get(name, name)
        if kept != name:  # torch says they are the same stored data
            assert t.untyped_storage().data_ptr() == want[kept].untyped_storage().data_ptr()
        g = got[kept]
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), name
        assert bits(g) == bits(t), name
    assert meta["format"] == "pt"
    return meta


@pytest.mark.parametrize("name", REALDATA_FILES)
def test_realdata_torch_files_mirror_exactly(name, tmp_path):
    src = realdata_path("torch", name)
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    assert_mirrors(src, out)


def test_every_realdata_torch_file_is_listed():
    if not os.path.isdir(os.path.join(REALDATA, "torch")):
        pytest.skip("real data not available")
    assert sorted(os.listdir(os.path.join(REALDATA, "torch"))) == sorted(REALDATA_FILES)


@pytest.mark.parametrize("src", FIXTURE_FILES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_fixture_torch_files_mirror_exactly(src, tmp_path):
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    assert_mirrors(src, out)


def test_fortran_ordered_tensor_written_in_c_order(tmp_path):
    src = realdata_path("torch", "candle_fortran_tensor_3d.pth")
    t = torch.load(src, weights_only=True)["tensor_fortran"]
    assert t.stride() == (1, 2, 6)  # the point of this file
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    got, _ = read_mirror(out)
    assert torch.equal(got["tensor_fortran"], t) and got["tensor_fortran"].dtype == torch.int64


def test_training_checkpoint_extras_summarised_in_metadata(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(32, 2))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(1, 3, 6, 4)).sum().backward()
    opt.step()
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "iter_num": 7, "best_val_loss": torch.tensor(1.5),
            "config": {"lr": 3e-4, "name": "cnn", "sched": {"warmup": 10, "steps": [1, 2]}}}
    src = tmp_path / "ckpt.pt"
    torch.save(ckpt, src)
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    meta = assert_mirrors(src, out)
    got, _ = read_mirror(out)
    assert stored_order(out) == list(net.state_dict())  # BatchNorm's running stats and num_batches_tracked too
    assert json.loads(meta["checkpoint.iter_num"]) == 7
    assert json.loads(meta["checkpoint.config"]) == ckpt["config"]
    assert json.loads(meta["checkpoint.best_val_loss"]) == {"tensor": {"dtype": "F32", "shape": []}}
    optimizer = json.loads(meta["checkpoint.optimizer"])["optimizer"]
    assert optimizer["n_param_states"] == len(opt.state_dict()["state"]) and optimizer["n_tensors"] > 0
    assert sum(len(v) for v in meta.values()) < 4096  # a summary, not the optimizer's values


def test_non_tensor_values_in_the_state_dict_are_named_and_kept_as_json(tmp_path):
    ckpt = {"model": {"w": torch.randn(2, 3), "version": 3, "blocks": [{"b": torch.ones(2)}, "relu"]}, "step": 1}
    src = tmp_path / "ckpt.pt"
    torch.save(ckpt, src)
    res = subprocess.run([WCONV, "convert", "-q", str(src), str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "not tensors" in line]
    assert len(warnings) == 1 and "(version, blocks.1)" in warnings[0]
    got, meta = read_mirror(tmp_path / "m.safetensors")
    assert sorted(got) == ["blocks.0.b", "w"]  # named as in the state dict, and so are the values
    assert json.loads(meta["state_dict_values"]) == {"version": 3, "blocks.1": "relu"}
    assert json.loads(meta["checkpoint.step"]) == 1


def _views_and_dtypes() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(10, dtype=torch.float64)
    return {
        "bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f64": torch.randn(2, 2).double(),
        "f8_e4m3": torch.randn(4, 4).to(torch.float8_e4m3fn), "f8_e5m2": torch.randn(9).to(torch.float8_e5m2),
        "f8_fnuz": torch.randn(3).to(torch.float8_e4m3fnuz), "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([0, 65535, 7], dtype=torch.uint16), "u32": torch.tensor([2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([2**63 + 5], dtype=torch.uint64), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "c64": torch.randn(3, dtype=torch.complex64), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3),
        "transposed": base.t(), "offset_view": base.clone()[1:3, 2:], "expanded": torch.randn(3, 1).expand(3, 4),
        "neg": torch._neg_view(torch.randn(4)), "conj": torch.randn(2, dtype=torch.complex64).conj(),
        "nan_and_negzero": torch.tensor([float("nan"), -0.0, float("inf")]),
        "first_half": shared[:5], "second_half": shared[5:],  # one storage, no overlap: both kept
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dtypes_and_views_mirror_exactly(legacy, tmp_path):
    tensors = _views_and_dtypes()
    if legacy:  # torch's own legacy reader cannot load these back (UntypedStorage), so no oracle
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("f8", "u16", "u32", "u64"))}
    src = tmp_path / "x.pt"
    torch.save(tensors, src, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    meta = assert_mirrors(src, out)
    assert "shared_tensors" not in meta


def test_big_endian_archive_mirrors_little_endian(tmp_path):
    le = tmp_path / "le.pt"
    torch.save({"w": torch.randn(5, 3), "t": torch.randn(3, 4).t()}, le)
    be = tmp_path / "be.pt"
    make_big_endian(le, be, 4)
    out = tmp_path / "m.safetensors"
    mirror(be, out)
    assert_mirrors(le, out)


def test_legacy_storage_view_mirrors(tmp_path):
    src = tmp_path / "view.pt"
    write_legacy_with_storage_view(src, whole=False)
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    assert_mirrors(src, out)


def test_legacy_storage_view_shares_bytes_with_its_root(tmp_path):
    src = tmp_path / "view.pt"
    write_legacy_with_storage_view(src)  # "view" lies inside "whole": two storages, the same bytes
    r = wconv("convert", "-q", src, tmp_path / "m.safetensors")
    assert r.returncode != 0 and "'whole' and 'view' share part of their data" in r.stderr


def test_exact_aliases_stored_once_with_one_note(tmp_path):
    w = torch.randn(4, 3)
    src = tmp_path / "tied.pt"
    torch.save({"emb.weight": w, "head.weight": w, "other": w.view(4, 3), "bias": torch.zeros(3)}, src)
    out = tmp_path / "m.safetensors"
    r = mirror(src, out)
    meta = assert_mirrors(src, out)
    assert json.loads(meta["shared_tensors"]) == {"head.weight": "emb.weight", "other": "emb.weight"}
    assert r.stderr.count("\n") == 1 and "kept emb.weight, dropped head.weight, other" in r.stderr


@pytest.mark.parametrize("overlap", ["row_of_matrix", "shifted", "transposed"])
def test_partial_overlap_refused_in_one_line(overlap, tmp_path):
    base = torch.randn(4, 4)
    other = {"row_of_matrix": base[1], "shifted": base.reshape(-1)[2:10], "transposed": base.t()}[overlap]
    src = tmp_path / "views.pt"
    torch.save({"w": base, "v": other}, src)
    out = tmp_path / "m.safetensors"
    r = wconv("convert", "-q", src, out)
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.count("\n") == 1 and "share part of their data" in r.stderr and "views.pt" in r.stderr


def test_unstorable_dtype_refused(tmp_path):
    src = tmp_path / "c128.pt"
    torch.save({"z": torch.randn(2, dtype=torch.complex128)}, src)
    r = wconv("convert", "-q", src, tmp_path / "m.safetensors")
    assert r.returncode != 0 and "C128" in r.stderr and r.stderr.count("\n") == 1


def test_unsafe_pickle_is_not_mirrored(tmp_path):
    from torchfiles import pickle_with_canary

    canary = tmp_path / "canary"
    src = tmp_path / "evil.pt"
    src.write_bytes(pickle_with_canary(canary))
    r = wconv("convert", "-q", src, tmp_path / "m.safetensors")
    assert r.returncode != 0 and not canary.exists() and not (tmp_path / "m.safetensors").exists()


def test_names_canonical_keeps_the_model_view(tmp_path):
    src = os.path.join(FIXTURES, "meta-tiny", "consolidated.00.pth")
    stored, canonical = tmp_path / "s.safetensors", tmp_path / "c.safetensors"
    mirror(src, stored)
    mirror(src, canonical, "--names", "canonical")
    s_names = set(read_mirror(stored)[0])
    c_names, c_meta = read_mirror(canonical)
    assert "tok_embeddings.weight" in s_names and "token_embd.weight" in c_names
    assert json.loads(c_meta["wconv.arch"]) == "llama"


def test_names_option_misuse_is_a_usage_error(tmp_path):
    src = os.path.join(FIXTURES, "meta-tiny", "consolidated.00.pth")
    r = wconv("convert", "-q", src, tmp_path / "m.gguf", "--names", "stored")
    assert r.returncode != 0 and "--names does not apply to gguf" in r.stderr
    r = wconv("convert", "-q", src, tmp_path / "m.safetensors", "--dtype", "bf16")
    assert r.returncode != 0 and "--names canonical" in r.stderr
    mirror(src, tmp_path / "c.safetensors", "--names", "canonical")
    r = wconv("convert", "-q", tmp_path / "c.safetensors", tmp_path / "again.safetensors", "--names", "stored")
    assert r.returncode != 0 and "torch checkpoint" in r.stderr
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "again.safetensors").exists()


def test_pieces_are_bounded_and_in_c_order():
    from wconv.convert.mirror import _c_order_pieces

    arr = np.asfortranarray(np.arange(2 * 5 * 7, dtype=np.int32).reshape(2, 5, 7))
    for limit in (4, 28, 60, 1000):
        pieces = list(_c_order_pieces(arr, limit))
        assert all(p.flags.c_contiguous and p.nbytes <= max(limit, 4) for p in pieces)
        assert np.concatenate([p.reshape(-1) for p in pieces]).tobytes() == np.ascontiguousarray(arr).tobytes()


def test_strided_tensor_streams_in_pieces(tmp_path, monkeypatch):
    import wconv.convert.mirror as m

    monkeypatch.setattr(m, "PIECE_BYTES", 64)
    seen = []
    original = m._c_order_pieces

    def spy(arr, max_bytes):  # the outermost call of each tensor: the pieces written
        pieces = list(original(arr, max_bytes))
        if arr.base is not None and arr.ndim == 2:
            seen.extend(p.nbytes for p in pieces)
        yield from pieces

    monkeypatch.setattr(m, "_c_order_pieces", lambda arr, max_bytes=64: spy(arr, max_bytes))
    src = tmp_path / "t.pt"
    torch.save({"t": torch.randn(40, 30).t(), "plain": torch.randn(50, 50)}, src)
    out = tmp_path / "m.safetensors"
    mirror(src, out)
    assert_mirrors(src, out)
    assert seen and max(seen) <= 64 and sum(seen) == 40 * 30 * 4  # the contiguous one went by kernel copy


# --- transformers loads the mirror of an HF pytorch_model.bin ------------------------------------

def _hf_bin_dir(model, directory) -> str:
    """An HF directory as save_pretrained(safe_serialization=False) wrote it: config.json and
    torch.save(state_dict) as pytorch_model.bin (shared tensors kept shared)."""
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    return str(directory)


def _tiny(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32)
        return transformers.BertForMaskedLM(cfg)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=99, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                            max_position_embeddings=32)
        return transformers.DistilBertModel(cfg)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2"])
def test_transformers_loads_the_mirror_with_identical_outputs(kind, tmp_path):
    import transformers

    model = _tiny(kind).eval()
    for p in model.parameters():  # random weights everywhere, not the init's zeros and ones
        p.data.normal_()
    src_dir = _hf_bin_dir(model, tmp_path / "bin")
    dst_dir = tmp_path / "st"
    shutil.copytree(src_dir, dst_dir)
    os.remove(dst_dir / "pytorch_model.bin")
    mirror(os.path.join(src_dir, "pytorch_model.bin"), dst_dir / "model.safetensors")
    assert_mirrors(os.path.join(src_dir, "pytorch_model.bin"), dst_dir / "model.safetensors")

    loaded = getattr(transformers, type(model).__name__).from_pretrained(dst_dir).eval()
    ids = torch.tensor([[1, 5, 7, 2, 98, 0, 3]])
    assert torch.equal(_outputs(loaded, ids), _outputs(model, ids))
    if kind in ("bert", "gpt2"):  # tied classifier: stored once, re-tied by transformers
        _, meta = read_mirror(dst_dir / "model.safetensors")
        assert json.loads(meta["shared_tensors"])

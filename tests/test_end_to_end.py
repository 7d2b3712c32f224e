"""End to end: committed fixtures -> `wconv pth-to-bin` / `wconv convert` -> read back -> logits.

Checked three ways: wconv.parity between source and output, torch on the ORIGINAL
checkpoint (loaded with torch.load, names mapped by this file's own table), and
transformers on the HF fixtures. Only the numpy reference is shared with wconv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import wconv
from conftest import fixture_path
from wconv.convert.save import convert
from wconv.errors import UsageError
from torch_reference import logits as torch_logits

WCONV = [sys.executable, "-m", "wconv.cli"]
PROMPT = [1, 5, 17, 42, 9, 3, 77, 11]

# Meta name -> canonical name, written out independently of wconv.layouts.
META_TO_CANON = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
PER_LAYER = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def run(*args):
    proc = subprocess.run(WCONV + [str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


class _Arr:
    def __init__(self, t):
        self.t = t

    def float32(self):
        return self.t.float().numpy()


def canonical_tensors(state_dict) -> dict:
    """Meta-named torch tensors under canonical names (the table above), as float32()-able objects."""
    tensors = {}
    for k, v in state_dict.items():
        if k in META_TO_CANON:
            tensors[META_TO_CANON[k]] = _Arr(v)
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            tensors[f"blk.{i}.{PER_LAYER[rest]}"] = _Arr(v)
    tensors.setdefault("output.weight", tensors["token_embd.weight"])  # tied
    return tensors


class _Model(SimpleNamespace):
    def __getitem__(self, k):
        return self.tensors[k]

    def get(self, k):
        return self.tensors.get(k)


def meta_original(directory):
    """torch on the original Meta checkpoint: shards concatenated along Meta's split axes."""
    p = json.load(open(os.path.join(directory, "params.json")))
    shards = [torch.load(os.path.join(directory, f), weights_only=True)
              for f in sorted(os.listdir(directory)) if f.startswith("consolidated.")]
    split1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    sd = {}
    for k, v in shards[0].items():
        if k == "rope.freqs":
            continue
        if v.dim() == 1 or len(shards) == 1:
            sd[k] = v
        else:
            sd[k] = torch.cat([s[k] for s in shards], dim=1 if k.endswith(split1) else 0)
    vocab = sd["tok_embeddings.weight"].shape[0]
    cfg = SimpleNamespace(arch="llama", dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                          n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=vocab,
                          hidden_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
                          norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
                          tie_embeddings=False, max_seq_len=2048)
    return _Model(config=cfg, tensors=canonical_tensors(sd))


META_FIXTURES = ["meta-tiny", "meta-tiny-2shard", "meta-tiny-f16"]


@pytest.mark.parametrize("name", META_FIXTURES)
@pytest.mark.parametrize("version", [0, 1])
def test_meta_pth_to_bin_matches_torch_on_original(tmp_path, name, version):
    src = fixture_path(name)
    out = tmp_path / "model.bin"
    run("pth-to-bin", src, out, "--version", version, "--quiet")
    ref = torch_logits(meta_original(src), PROMPT)
    ours = wconv.reference.forward(wconv.load(out), PROMPT)
    scale = np.abs(ref).max()
    # bf16/f16 weights widen exactly to f32; what remains is float32 arithmetic order.
    assert np.abs(ours - ref).max() <= 1e-4 * max(scale, 1.0)
    r = wconv.parity(src, str(out), tokens=PROMPT)
    # Same weights in float32; only BLAS summation order may differ between the two loads.
    assert r["ok"] and r["max_abs_diff"] <= 1e-5 * max(r["logit_scale"], 1.0)


@pytest.mark.parametrize("name", META_FIXTURES + ["hf-llama-tiny", "hf-llama-tiny-bin", "llama2c-ckpt.pt"])
def test_pth_to_bin_v2_parity(tmp_path, name):
    src = fixture_path(name)
    out = tmp_path / "model_q80.bin"
    run("pth-to-bin", src, out, "--version", 2, "--quiet")
    r = wconv.parity(src, str(out), tokens=PROMPT)
    assert r["ok"], r
    assert r["judged_by"] == "simulated"


def test_sharded_and_single_give_identical_bins(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    run("pth-to-bin", fixture_path("meta-tiny"), a, "--quiet")
    run("pth-to-bin", fixture_path("meta-tiny-2shard"), b, "--quiet")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("name", ["hf-llama-tiny", "hf-llama-tiny-bin"])
def test_hf_dir_to_bin_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    src = fixture_path(name)
    out = tmp_path / "hf.bin"
    run("pth-to-bin", src, out, "--quiet")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].numpy()
    ours = wconv.reference.forward(wconv.load(out), PROMPT)
    assert np.abs(ours - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)
    # Same weights as meta-tiny: HF's q/k permutation was undone, GQA k with n_kv_heads.
    meta = tmp_path / "meta.bin"
    run("pth-to-bin", fixture_path("meta-tiny"), meta, "--quiet")
    assert out.read_bytes() == meta.read_bytes()


def test_llama2c_ckpt_tied_classifier(tmp_path):
    src = fixture_path("llama2c-ckpt.pt")
    out = tmp_path / "ckpt.bin"
    run("pth-to-bin", src, out, "--quiet")
    header = np.fromfile(out, dtype=np.int32, count=7)
    ck = torch.load(src, weights_only=True)
    args = ck["model_args"]
    assert header[5] == args["vocab_size"] > 0  # positive vocab: shared classifier
    assert header[6] == args["max_seq_len"]
    sd = ck["model"]
    cfg = SimpleNamespace(arch="llama", dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
                          n_kv_heads=args["n_kv_heads"], vocab_size=args["vocab_size"],
                          hidden_dim=sd["layers.0.feed_forward.w1.weight"].shape[0], norm_eps=1e-5,
                          rope_theta=10000.0, tie_embeddings=True, max_seq_len=args["max_seq_len"])
    orig = _Model(config=cfg, tensors=canonical_tensors(sd))
    ref = torch_logits(orig, PROMPT)
    ours = wconv.reference.forward(wconv.load(out), PROMPT)
    assert np.abs(ours - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


def test_max_seq_len_override_and_source(tmp_path):
    out = tmp_path / "m.bin"
    run("pth-to-bin", fixture_path("meta-tiny"), out, "--max-seq-len", 128, "--quiet")
    assert np.fromfile(out, dtype=np.int32, count=7)[6] == 128


@pytest.mark.parametrize("name,dtype", [("meta-tiny-2shard", "f16"), ("llama2c-ckpt.pt", "q8_0"),
                                        ("hf-llama-tiny", "bf16"), ("nanogpt-ckpt.pt", "f32")])
def test_convert_to_gguf_and_back_parity(tmp_path, name, dtype):
    src = fixture_path(name)
    out = tmp_path / "m.gguf"
    run("convert", src, out, "--dtype", dtype, "--quiet")
    r = wconv.parity(src, str(out), tokens=PROMPT)
    assert r["ok"], r
    st = tmp_path / "back.safetensors"
    run("convert", out, st, "--quiet")
    assert wconv.parity(str(out), str(st), tokens=PROMPT)["ok"]


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(open(fixture_path("llama2c-ckpt.pt"), "rb").read()[:5000])
    for args in (["inspect", bad], ["pth-to-bin", bad, tmp_path / "o.bin"], ["convert", bad, tmp_path / "o.gguf"]):
        proc = subprocess.run(WCONV + [str(a) for a in args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wconv: error: ") and str(bad) in lines[0], proc.stderr
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.pth"]


def test_nanogpt_matches_torch_on_original(tmp_path):
    """nanoGPT ckpt (torch.compile prefixes, tied lm_head, exact GELU) vs torch on the original."""
    ck = torch.load(fixture_path("nanogpt-ckpt.pt"), weights_only=True)
    a = ck["model_args"]
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    per_layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    tensors = {}
    for k, v in sd.items():
        if k in names:
            tensors[names[k]] = _Arr(v)
        elif k.startswith("transformer.h."):
            i, rest = k[len("transformer.h."):].split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            tensors[f"blk.{i}.{per_layer[mod]}.{kind}"] = _Arr(v)
    cfg = SimpleNamespace(arch="gpt2", dim=a["n_embd"], n_layers=a["n_layer"], n_heads=a["n_head"],
                          norm_eps=1e-5, gelu="erf")
    ref = torch_logits(_Model(config=cfg, tensors=tensors), PROMPT)
    ours = wconv.reference.forward(wconv.load(fixture_path("nanogpt-ckpt.pt")), PROMPT)
    assert np.abs(ours - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)
    out = tmp_path / "n.safetensors"
    run("convert", fixture_path("nanogpt-ckpt.pt"), out, "--quiet", "--names", "canonical")
    assert np.abs(wconv.reference.forward(wconv.load(out), PROMPT) - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


# --- options a format does not take are refused, not dropped or crashed on --------------------

@pytest.mark.parametrize("out,options,message", [
    ("m.safetensors", {"max_seq_len": 5}, "--max-seq-len does not apply to safetensors"),
    ("m.ggjt", {"max_seq_len": 5}, "--max-seq-len does not apply to ggjt"),
    ("m.gguf", {"version": 2}, "--version does not apply to gguf"),
    ("m.gguf", {"group_size": 32}, "--group-size does not apply to gguf"),
    ("m.bin", {"dtype": "f16"}, "use --version 2"),
    ("m.gguf", {"max_seq_len": 0}, "at least 1"),
    ("m.gguf", {"max_seq_len": 1 << 32}, "too large .GGUF's context length is a uint32"),
    ("m.bin", {"max_seq_len": 1 << 31}, "too large .llama2.c's header holds an int32"),
])
def test_inapplicable_options_refused(tmp_path, out, options, message):
    with pytest.raises(UsageError, match=message):
        convert(fixture_path("meta-tiny"), str(tmp_path / out), quiet=True, **options)
    assert list(tmp_path.iterdir()) == []


def test_cli_max_seq_len_must_be_positive(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wconv.cli", "pth-to-bin", fixture_path("meta-tiny"),
                           str(tmp_path / "m.bin"), "--max-seq-len", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "max-seq-len" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []

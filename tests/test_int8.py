"""Weight-only int8 (quantize.py): the rule, the modules, both ways in (a loaded model; a stream of checkpoint tensors,
as convert.py --int8 and loading with int8 use), int8 checkpoints on disk, and the toy's answers.

The int8 model is checked against the float model whose matrices are the dequantized ones (q * scale): the same
function, so any wrong scale axis, missed module or mismatched row split shows as a difference far above fp32 noise.
"""
import copy
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import checkpoint
import convert
import quantize
import sample
import train
from emu3 import Emu3
from test_convert import tiny_hf_dir
from test_emu3 import randomize_, small_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_quantize_rows_rule(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    # rows of very different sizes: a scale per column or per tensor would break the bound below
    w = torch.randn(rows, cols, generator=g) * 10 ** (torch.rand(rows, 1, generator=g) * 6 - 3)
    w[0] = 0  # an all-zero row
    q, scale = quantize.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (rows,) and scale.dtype == torch.float32
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] * (0.5 + 1e-4)).all()  # at most half a step, row by row (+ fp32 rounding)
    assert (q[1:].int().abs().amax(1) >= 127).all()  # the largest |w| of each row uses the whole range
    assert (q[0] == 0).all()


def dequantized(model):
    """A float copy of an int8 model whose matrices are q * scale: what the int8 model must compute."""
    out = Emu3(model.cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".scale"):
            continue
        scale = model.state_dict().get(k.removesuffix("weight") + "scale")
        sd[k] = v.float() * scale.float()[:, None] if v.dtype == torch.int8 else v
    out.load_state_dict(sd)
    return out


def test_int8_model_is_the_dequantized_model():
    cfg = small_cfg(vocab_size=300)
    model = randomize_(Emu3(cfg).eval(), 0, 0.2)
    q = quantize.int8(copy.deepcopy(model))
    assert quantize.is_int8(q) and not quantize.is_int8(model)
    assert all(t.dtype == torch.int8 for k, t in q.state_dict().items() if k.endswith(".weight") and t.ndim == 2)
    ref = dequantized(q)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        a, b, f = q(tokens), ref(tokens), model(tokens)
        assert (a - b).abs().max() < 1e-4 * b.abs().max()  # the same function, up to fp32 rounding
        assert (a - f).abs().max() > 1e-3 * f.abs().max()  # ... and not the float model's
        # the grid window: only lm_head rows 100..199, with their own scales
        rows = slice(100, 200)
        assert (q(tokens, vocab=rows) - b[..., rows]).abs().max() < 1e-4 * b.abs().max()
        # cached decoding (prefill, then a step) through the same modules
        q.setup_cache(2, 32)
        q(tokens[:, :10], input_pos=torch.arange(10))
        step = q(tokens[:, 10:], input_pos=torch.tensor([10]))
        assert (step - b[:, 10:]).abs().max() < 1e-4 * b.abs().max()
        assert q.layers[0].attn.cache.k.dtype == torch.float32  # the cache keeps the activations' dtype


@pytest.mark.parametrize("n_rows", [2, quantize.PACK_ROWS + 1])
def test_int8_linear_cpu_paths(n_rows):
    # bf16 on a CPU: up to PACK_ROWS rows through _weight_int8pack_mm, more through the dequantising F.linear
    g = torch.Generator().manual_seed(n_rows)
    q, scale = quantize.quantize_rows(torch.randn(48, 64, generator=g))
    lin = quantize.Int8Linear(q, scale.bfloat16())
    x = torch.randn(n_rows, 64, generator=g).bfloat16()
    exact = F.linear(x.float(), q.float() * scale.bfloat16().float()[:, None])
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (n_rows, 48)
    assert (out.float() - exact).abs().max() < 0.02 * exact.abs().max()
    assert (lin(x, rows=slice(8, 20)).float() - exact[:, 8:20]).abs().max() < 0.02 * exact.abs().max()


def test_stream_equals_quantizing_the_loaded_model():
    # checkpoint.build_emu3(int8) quantizes tensor by tensor as they are read; quantize.int8 a loaded model: the same
    cfg = small_cfg(vocab_size=300)
    model = randomize_(Emu3(cfg).eval(), 1, 0.2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    streamed = checkpoint.build_emu3(cfg, sd.items(), "cpu", torch.float32, int8=True)
    direct = quantize.int8(model).state_dict()
    assert streamed.state_dict().keys() == direct.keys()
    assert all(torch.equal(streamed.state_dict()[k], v) for k, v in direct.items())
    # an int8 stream passes through unchanged
    again = checkpoint.build_emu3(cfg, direct.items(), "cpu", torch.float32, int8=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in direct.items())


def test_convert_int8(tmp_path):
    src = tiny_hf_dir(tmp_path / "hf")
    convert.convert(src, str(tmp_path / "int8"), dtype="bfloat16", int8=True)
    convert.convert(src, str(tmp_path / "bf16"), dtype="bfloat16")
    conf = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert conf["quantization"] == "int8"
    files = lambda d: [d / f for f in sorted(os.listdir(d)) if f.startswith("model-")]
    tensors = {k: v for f in files(tmp_path / "int8") for k, v in load_file(f).items()}
    assert all(v.dtype == (torch.int8 if v.ndim == 2 else torch.float32 if k.endswith(".scale") else torch.bfloat16)
               for k, v in tensors.items())
    ratio = sum(map(os.path.getsize, files(tmp_path / "int8"))) / sum(map(os.path.getsize, files(tmp_path / "bf16")))
    assert ratio <= 0.6, ratio
    # an int8 directory loads as int8 whatever is asked, and equals quantizing the fp32 release as it loads
    loaded, _ = checkpoint.load_emu3(str(tmp_path / "int8"), "cpu", torch.float32)
    in_memory, _ = convert.load_emu3(src, "cpu", torch.float32, int8=True)
    assert quantize.is_int8(loaded)
    quantized = [k for k, v in tensors.items() if v.ndim == 2 or k.endswith(".scale")]  # norms: bf16 on disk
    assert len(quantized) == 2 * sum(v.ndim == 2 for v in tensors.values())
    assert all(torch.equal(in_memory.state_dict()[k], tensors[k]) for k in quantized)
    assert all(torch.equal(loaded.state_dict()[k], tensors[k]) for k in quantized)


def test_toy_answers_unchanged_by_int8():
    # the README's image and questions, the toy in bf16 and in int8 (and the Python API's int8 flag)
    m, q = sample.load(TOY, "cpu", "bfloat16"), sample.load(TOY, "cpu", "bfloat16", int8=True)
    assert quantize.is_int8(q.model) and not quantize.is_int8(m.model)
    [circle] = sample.images(m, ["a large red circle in the center"], seed=0)
    pictures = [circle] + [train.draw(s, rng=random.Random(k)) for k, s in enumerate(
        [("square", "blue", "small", "on the left"), ("triangle", "green", "large", "at the top")])]
    questions = ["Describe the image.", "What shape is this?", "What colour is the shape?", "Where is the shape?",
                 "Is the shape big or small?"]
    asked = [(question, picture) for question in questions for picture in pictures]  # one batch of 15
    a = sample.chat(m, *zip(*asked), max_new_tokens=16)
    assert a == sample.chat(q, *zip(*asked), max_new_tokens=16)
    assert a[:3] == [" A large red circle in the center.", " A small blue square on the left.",
                     " A large green triangle at the top."]  # the answers depend on the image

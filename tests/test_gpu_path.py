"""The GPU path, emulated on the CPU: what a GPU does differently from a CPU must not change any result. CI has no
GPU, so each difference a test can reproduce is reproduced here, and every job must give the unpatched run's
output exactly.

1. Kernel output layout. CUDA's flash and memory-efficient attention kernels return their output as (B, T, H, D)
   memory behind a (B, H, T, D) view (torch's meta registration of _scaled_dot_product_efficient_attention:
   `empty(B, M, H, K).transpose(1, 2)`); CPU kernels return contiguous output. `cuda_sdpa` returns every
   scaled_dot_product_attention output in that layout, values unchanged. (A `.view` of the output, as emu3.py
   had, raises "view size is not compatible with input tensor's size and stride" under it.)
2. Fully masked query rows. Kernels disagree about a softmax over no key (NaN, zeros, or garbage); `cuda_sdpa`
   turns every such row into NaN, so a job that used one would fail. Our masks never build one (a padding query
   sees itself), and this proves it for every call the jobs make.
3. Compiled steps. A GPU records a CUDA graph per shape but must compile the step once: one image costs one
   inductor compile whatever its size, later images of other sizes, batches or --parallel windows none, and
   nothing hits dynamo's recompile limit (where it would silently fall back to eager: here that raises).
Checked by reading, with no change needed (the tests above run through each): q, k, v are `.view`s of the fused
projection's output (a split along the last dim, stride 1: a view is valid for any batch and length); the cache
is written with index_copy_ into a view of its first B rows (index_copy_ accepts a non-contiguous source, the
transposed k and v); fold_heads/unfold_heads and the output projection's input use reshape, which copies when the
layout requires it; the VQ-VAE's attention is two bmm calls whose outputs are contiguous on every device.
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

import generate
import prompts
import sample
from emu3 import Emu3, Emu3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SDPA = F.scaled_dot_product_attention


def cuda_like(q, k, v, attn_mask=None, **kw):
    """F.scaled_dot_product_attention as a CUDA fused kernel answers: (B, T, H, D) memory behind the (B, H, T, D)
    view, and NaN in every query row whose mask allows no key."""
    if isinstance(attn_mask, CausalBias):  # (torch dispatches a CausalBias by F's identity, which the patch hides)
        attn_mask = attn_mask._materialize(q.device)
    out = REAL_SDPA(q, k, v, attn_mask=attn_mask, **kw)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        empty = ~attn_mask.any(-1, keepdim=True)  # (B or 1, 1 or H, T, 1)
        out = out.masked_fill(empty, float("nan"))
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@contextlib.contextmanager
def cuda_sdpa():
    F.scaled_dot_product_attention = cuda_like
    try:
        yield
    finally:
        F.scaled_dot_product_attention = REAL_SDPA


def test_the_emulated_layout_is_cudas():
    q = torch.randn(2, 4, 3, 8)
    out = cuda_like(q, q, q)
    assert out.shape == (2, 4, 3, 8) and not out.is_contiguous() and out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, REAL_SDPA(q, q, q))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        out.view(2, 2, 6, 8)  # what a folded call's output cannot do on a GPU


@pytest.fixture(scope="module")
def toy():
    m = sample.load(os.path.join(ROOT, "toy", "ckpt"), "cpu", "float32")
    pictures = sample.images(m, ["a large red circle in the center", "a small blue square on the left"], seed=0)
    return m, pictures


def jobs(m, pictures):
    """Every job of the chat and image paths, through the Python API: their outputs."""
    out = {}
    out["chat"] = sample.chat(m, ["Describe the image."], pictures[:1], max_new_tokens=12)
    # a left-padded batch (a text-only question is shorter than one with an image), sampled
    out["chat batch"] = sample.chat(m, ["What colour is the shape?", "Where is the shape?"], pictures,
                                    max_new_tokens=12, temperature=1.0, top_k=5, seed=3)
    out["text only"] = sample.chat(m, ["What shape is this?"], max_new_tokens=6)
    out["images"] = [p.tobytes() for p in sample.images(m, ["a small green triangle at the top"], seed=1)]
    out["parallel"] = [p.tobytes() for p in sample.images(m, ["a small green triangle at the top"], seed=1,
                                                          parallel=8)]
    out["ratios"] = [p.tobytes() for p in sample.images(m, ["a large purple square", "a small red circle"],
                                                        ratios=["1:1", "2:1"], seed=2)]
    return out


def test_every_job_gives_the_same_output_under_cuda_layouts(toy, monkeypatch):
    m, pictures = toy
    expected = jobs(m, pictures)
    # and with prompts several prefill chunks long (unpadded: causal chunks aligned to their end; padded: masked)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    with cuda_sdpa():
        assert jobs(m, pictures) == expected


def tiny_model(seed=0):
    cfg = Emu3Config(vocab_size=60, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=1024,
                     pad_id=0, eol_id=1, eof_id=2, bos_id=3, eos_id=4, wrapper_id=5, boi_id=6, eoi_id=7,
                     visual_offset=10, codebook_size=40)
    torch.manual_seed(seed)
    model = Emu3(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # wide logits: greedy margins far above float noise
            p.mul_(8.0) if p.ndim > 1 else None
    return model


@contextlib.contextmanager
def counted_compiles():
    """Counts inductor compiles (dynamo's unique graphs); a recompile-limit hit raises instead of falling back."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    counts = {}
    try:
        yield counts
    finally:
        counts["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        torch._dynamo.config.fail_on_recompile_limit_hit = old
        torch._dynamo.reset()


def test_compiled_image_step_compiles_once_and_matches_eager(monkeypatch):
    # buckets of 8 columns: a 5x6 grid after a 7-token prompt reads the cache at 6 lengths (a 720x720 image: ~33)
    monkeypatch.setattr(generate, "BUCKET", 8)
    model = tiny_model()
    cfg = model.cfg
    cond = [[cfg.bos_id, 50, 51, cfg.boi_id, 52, cfg.wrapper_id], [cfg.bos_id, 53, cfg.boi_id, 52, cfg.wrapper_id]]
    neg = [[cfg.bos_id, 54, 55, 56, cfg.boi_id, 52, cfg.wrapper_id]] * 2
    run = lambda grid, parallel, c: generate.generate_image_tokens(
        model, cond, neg, [grid] * 2, 3.0, top_k=3, temperature=1.0, seed=5, compile_step=c, parallel=parallel)[0]
    runs = [((5, 6), 0), ((3, 4), 0), ((5, 6), 4)]  # a grid, another, then --parallel 4
    eager = [run(*r, False) for r in runs]
    graphs = []
    with cuda_sdpa(), counted_compiles() as counts:
        for r, e in zip(runs, eager):
            assert torch.equal(run(*r, True), e), r
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # one compile for the first image, none for every cache length and another size; the Jacobi window (N tokens
    # per pass instead of 1, which torch specialises) one more
    assert graphs == [1, 1, 2], graphs


def test_compiled_chat_step_compiles_once_and_matches_eager(monkeypatch):
    monkeypatch.setattr(generate, "BUCKET", 8)
    model = tiny_model(1)
    cfg = model.cfg
    rows = [[cfg.bos_id, 50, 51, 52, 53], [cfg.bos_id, 54]]  # a left-padded batch
    run = lambda c, n: generate.generate_text(model, rows, n, cfg.eos_id, cfg.pad_id, temperature=1.0, top_k=5,
                                              seed=2, compile_step=c)
    eager = [run(False, 30), run(False, 9)]
    with cuda_sdpa(), counted_compiles() as counts:
        assert [run(True, 30), run(True, 9)] == eager
    assert counts["graphs"] == 1, counts  # whatever the lengths


def test_gpu_check_smoke_runs_on_the_cpu():
    # bench/gpu_check.py must survive its first run on a GPU: here its smoke section runs end to end on the CPU
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--smoke"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout.split("== summary")[1]
    assert "FAILED" not in r.stdout and summary.count("True") == 4 and "False" not in summary, r.stdout[-3000:]

"""int8 weights (quantize.py) against the unquantized decoder, in the same run: quality, decode speed, and the two
int8 GEMMs (the dequantising F.linear that torch.compile fuses, and torch._weight_int8pack_mm).

    python bench/bench_int8.py --threads 1          # CPU: everything below
    python bench/bench_int8.py --device cuda        # a GPU: the GEMM table and the 8.5B decode step, bf16 vs int8

1. Quality at a mid-size random config (dim 1024 x 4 layers, 8 / 2 heads, full 184622 vocabulary; bench_chat's
   ~1K-token image prompt): next-token distributions at every prompt position of bf16, int8 with bf16 activations
   and int8 with fp32 activations, against fp32: top-1 agreement, mean and largest KL(fp32 || other), and the
   widest top-2 gap of fp32 among the positions whose top-1 changed. Two weight draws: the 0.02-std init and
   fan-in-scaled weights; random weights give nearly flat distributions over 184622 ids (near-ties at every
   position, a hard case for top-1 that a trained model, with a clear favourite, rarely meets).
   Random Gaussian weights have no outlier channels; trained weights do, which per-row scales feel more.
2. Decode steps on this device, fp32 / bf16 / int8 (bf16 activations): a chat step (1 row, every logit), an image
   step (CFG's 2 rows, the grid window of lm_head) and a --parallel 16 window (2 x 16 rows), over a ~1K-token cache.
3. One matrix at the 8.5B shapes (q|k|v, gate|up, down, lm_head's grid window) times 1 to 32 rows: F.linear in
   fp32 and bf16, the dequantising F.linear(x, q.to(bf16)) * scale, and torch._weight_int8pack_mm (on CUDA also the
   dequantising product compiled: what a --compile decode step runs).
4. (CUDA) the 8.5B Emu3-Gen decoder, random bf16 weights, a 16x16-grid image with --compile: ms per pass and peak
   memory, bf16 then int8 (quantized in place).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
import quantize  # noqa: E402
from bench_chat import chat_prompt  # noqa: E402  the same ~1K-token image prompt
from emu3 import Emu3, Emu3Config  # noqa: E402

MID = Emu3Config(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=2816, max_seq_len=4096)
SHAPES = {"q|k|v (6144 x 4096)": (6144, 4096), "gate|up (28672 x 4096)": (28672, 4096),
          "down (4096 x 14336)": (4096, 14336), "lm_head window (32776 x 4096)": (32776, 4096)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best(fn, device, n=5):
    fn()
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def random_model(cfg, seed, fan_in, device="cpu"):
    """fp32 Emu3 with random weights: N(0, 0.02) (the init), or N(0, 1/fan_in) with norms U(0.5, 1.5)."""
    torch.manual_seed(seed)
    model = Emu3(cfg).to(device).eval()
    if fan_in:
        g = torch.Generator(device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.copy_(torch.rand(p.shape, generator=g, device=device) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device) / p.shape[1] ** 0.5)
    return model


@torch.no_grad()
def quality(seed):
    ids = chat_prompt(MID)
    tokens = torch.tensor([ids])
    T, chunk = len(ids), 256
    print(f"1. quality: dim {MID.dim} x {MID.n_layers} layers, vocab {MID.vocab_size}, prompt {T} tokens: every "
          f"position's next-token distribution against fp32")
    draws = {"N(0, 0.02) (the init)": False, "N(0, 1/fan_in), norms U(0.5, 1.5)": True}
    for draw, fan_in in draws.items():
        ref = random_model(MID, seed, fan_in)
        variants = {"bf16": copy.deepcopy(ref).bfloat16(),
                    "int8, bf16 activations": quantize.int8(copy.deepcopy(ref)).bfloat16(),
                    "int8, fp32 activations": quantize.int8(copy.deepcopy(ref))}
        for m in [ref, *variants.values()]:
            m.setup_cache(1, 256 * math.ceil(T / 256))
        stats = {name: [] for name in variants}
        top, gaps = [], []
        for a in range(0, T, chunk):
            pos = torch.arange(a, min(T, a + chunk))
            p = ref(tokens[:, pos], input_pos=pos)[0].log_softmax(-1)  # (t, V) fp32
            top2 = p.topk(2, dim=-1).values
            top.append(top2[:, 0].exp())
            gaps.append(top2[:, 0] - top2[:, 1])  # fp32's top-2 gap: how near a tie each position is
            for name, m in variants.items():
                q = m(tokens[:, pos], input_pos=pos)[0].log_softmax(-1)
                kl = (p.exp() * (p - q)).sum(-1)
                stats[name].append((p.argmax(-1) == q.argmax(-1), kl))
        top, gaps = torch.cat(top), torch.cat(gaps)
        print(f"   weights {draw}: fp32 top-1 probability median {top.median():.3g}, top-2 gap median "
              f"{gaps.median():.3g} nats")
        for name, s in stats.items():
            agree, kl = torch.cat([x for x, _ in s]), torch.cat([k for _, k in s])
            flips = gaps[~agree]
            print(f"     {name:24s} top-1 agreement {agree.float().mean() * 100:6.2f}%   KL mean {kl.mean():.2e}  "
                  f"max {kl.max():.2e} nats; the widest fp32 gap it flips {flips.max() if len(flips) else 0:.3g} "
                  f"nats", flush=True)


@torch.no_grad()
def decode_steps(device, seed):
    print(f"2. decode steps, dim {MID.dim} x {MID.n_layers} layers, full vocabulary, cache of 1040 tokens, {device}, "
          f"threads {torch.get_num_threads()}:")
    ref = random_model(MID, seed, True, device)
    models = {"fp32": ref, "bf16": copy.deepcopy(ref).bfloat16(), "int8": quantize.int8(copy.deepcopy(ref)).bfloat16()}
    window = generate.grid_window(MID)
    L, size = 1040, 1280
    steps = {"chat step (1 row, all logits)": (1, 1, None), "image step (2 rows, grid window)": (2, 1, window),
             "--parallel 16 window (2 x 16)": (2, 16, window)}
    print(f"   {'':34s}" + "".join(f"{k:>10s}" for k in models) + "   int8 vs bf16   int8 vs fp32")
    for name, (rows, n, vocab) in steps.items():
        ms = {}
        for k, m in models.items():
            m.setup_cache(rows, size)
            x = torch.full((rows, n), MID.visual_offset + 7, device=device)
            pos = torch.arange(L, L + n, device=device)
            ms[k] = best(lambda: m(x, input_pos=pos, vocab=vocab, kv_len=size), device) * 1e3
        print(f"   {name:34s}" + "".join(f"{v:8.1f}ms" for v in ms.values())
              + f"   {ms['bf16'] / ms['int8']:8.2f}x   {ms['fp32'] / ms['int8']:8.2f}x", flush=True)


@torch.no_grad()
def gemms(device):
    print(f"3. one matrix x rows, ms ({device}):")
    compiled = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s) if device.type == "cuda" else None
    heads = ["fp32", "bf16", "int8 deq", "int8pack"] + (["deq compiled"] if compiled else [])
    print(f"   {'':30s} {'rows':>4s}" + "".join(f"{h:>13s}" for h in heads))
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=device) / k ** 0.5
        q, s = quantize.quantize_rows(w)
        wb, sb = w.bfloat16(), s.bfloat16()
        for rows in (1, 2, 8, 32):
            x = torch.randn(rows, k, device=device)
            xb = x.bfloat16()
            fns = [lambda: F.linear(x, w), lambda: F.linear(xb, wb), lambda: F.linear(xb, q.to(xb.dtype)) * sb,
                   lambda: torch._weight_int8pack_mm(xb, q, sb)] + ([lambda: compiled(xb, q, sb)] if compiled else [])
            out = []
            for fn in fns:
                try:
                    out.append(f"{best(fn, device) * 1e3:13.3f}")
                except RuntimeError as e:  # a kernel this build lacks
                    out.append(f"{'n/a':>13s}")
                    print(f"   ({str(e).splitlines()[0][:100]})")
            print(f"   {name:30s} {rows:4d}" + "".join(out), flush=True)
        del w, q, wb


@torch.no_grad()
def bf16_then_int8(model, cond, neg, grid, seed):
    """One image with --compile on a bf16 CUDA model, then the same with the model quantized in place (quantize.int8):
    ms per token and peak memory. gpu_check.py calls it on its 8.5B model."""
    h, w = map(int, grid.split("x"))
    n_new = h * (w + 1) + 3
    for name in ("bf16", "int8"):
        if name == "int8":
            model.clear_cache()
            quantize.int8(model)
            torch.cuda.empty_cache()
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        run = lambda: generate.generate_image_tokens(model, [cond], [neg], [(h, w)], 3.0, 2048, 1.0, seed, True)
        t = time.perf_counter()
        run()  # compiles, records the CUDA graphs
        first = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
        dt = best(run, torch.device("cuda"), n=2)
        print(f"   {name}: weights {weights / 1e9:.2f} GB, first run {first:.0f}s (compiling), then "
              f"{dt / n_new * 1e3:.2f} ms/token over {n_new} tokens, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} "
              f"GiB", flush=True)


def full_size_gpu(device, seed, grid):
    """The 8.5B Emu3-Gen decoder (random bf16 weights, the 0.02-std init) built on the device."""
    cfg = Emu3Config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = Emu3(cfg).bfloat16().eval()
    cond = [cfg.bos_id] + list(range(1000, 1020)) + [cfg.boi_id, 17, 22, 9, 17, 22, cfg.wrapper_id]
    neg = [cfg.bos_id] + list(range(2000, 2045)) + [cfg.boi_id, 17, 22, 9, 17, 22, cfg.wrapper_id]
    print(f"4. the 8.5B decoder on {torch.cuda.get_device_name(device)}, a {grid} grid, --compile:")
    bf16_then_int8(model, cond, neg, grid, seed)


def main(device, seed, threads, skip_quality, grid):
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        if not skip_quality:
            quality(seed)
        decode_steps(device, seed)
        gemms(device)
    else:
        gemms(device)
        full_size_gpu(device, seed, grid)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu: quality, decode steps, GEMMs; cuda: GEMMs, the 8.5B step")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    ap.add_argument("--skip-quality", action="store_true", help="speed only")
    ap.add_argument("--grid", default="16x16", help="with cuda: the image grid HxW for the 8.5B decode step")
    main(**vars(ap.parse_args()))

"""One short GPU check (about 5 minutes on an H100/H200): the 8.5B configuration with random bf16 weights.

    python bench/gpu_check.py                      # everything below
    python bench/gpu_check.py --hf-steps 0         # ours only

Prints, in this order:
1. the SDPA backend PyTorch picks (torch._fused_sdp_choice) for our decode step (GQA folded into the query axis,
   a mask), a --parallel 16 window, an unpadded prefill (causal, no mask) and a padded prefill chunk; and, for
   comparison, for the call we no longer make (a mask together with enable_gqa=True).
2. one 720x720 image (90x90 grid, 8193 tokens, CFG over 2 rows) with --compile: seconds, ms per step, peak memory;
   then a second image in the same process (the kept KV cache: no new CUDA graphs to record), then --parallel 16.
3. a 16K-token chat prefill: seconds and peak memory, ours and transformers'.
4. transformers' recipe (generate with guidance_scale=3, the negative prompt, prefix_allowed_tokens_fn, top-k 2048)
   for --hf-steps tokens, as ms per step and the projected time of a whole image.
5. --int8: one --int8-grid image with --compile in bf16, then with the decoder quantized in place (quantize.int8):
   ms per token and peak memory of each (bench_int8.bf16_then_int8; about 3 minutes, mostly compiling).
Random weights say nothing about how many tokens --parallel accepts on a trained model (a nearly flat distribution
makes the noise decide); they do measure the cost of a pass.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
from bench_generate import build, prompts  # noqa: E402
from bench_int8 import bf16_then_int8  # noqa: E402
from emu3 import Emu3Config  # noqa: E402
from generate import reference_grid_rule  # noqa: E402

BACKENDS = {0: "math", 1: "flash", 2: "memory-efficient", 3: "cudnn", 4: "overrideable"}


def choice(q, k, v, mask=None, causal=False, gqa=False):
    try:
        return BACKENDS.get(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=gqa), "?")
    except Exception as e:  # noqa: BLE001 (a private API: say what it said)
        return f"error: {str(e).splitlines()[0]}"


def sdpa_choices(cfg, dev, dt):
    hd, kv, group, S = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, 4352
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt)
    k, v = r(2, kv, S, hd), r(2, kv, S, hd)
    rows = [("decode step (2 rows, GQA folded, mask)", r(2, kv, group, hd), k, v,
             torch.ones(2, 1, group, S, dtype=torch.bool, device=dev), False, False),
            ("--parallel 16 window (folded, mask)", r(2, kv, group * 16, hd), k, v,
             torch.ones(2, 1, group * 16, S, dtype=torch.bool, device=dev), False, False),
            ("unpadded prefill 2048 (causal, no mask, GQA)", r(1, cfg.n_heads, 2048, hd), r(1, kv, 2048, hd),
             r(1, kv, 2048, hd), None, True, True),
            ("padded prefill chunk 2048 (folded, mask)", r(2, kv, group * 2048, hd), k, v,
             torch.ones(2, 1, group * 2048, S, dtype=torch.bool, device=dev), False, False),
            ("NOT USED: decode with mask + enable_gqa", r(2, cfg.n_heads, 1, hd), k, v,
             torch.ones(2, 1, 1, S, dtype=torch.bool, device=dev), False, True)]
    for name, q, kk, vv, mask, causal, gqa in rows:
        print(f"  {name:48s} -> {choice(q, kk, vv, mask, causal, gqa)}", flush=True)


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out, torch.cuda.max_memory_allocated() / 2**30


def main(grid, hf_steps, prefill, seed, int8_grid):
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    cfg = Emu3Config(max_seq_len=max(9216, prefill + 64))
    print("1. SDPA backends (bf16):")
    sdpa_choices(cfg, dev, dt)
    t0 = time.perf_counter()
    hf, ours = build(cfg, dev, dt, seed)  # one set of weights, ours aliasing transformers'
    print(f"built the 8.5B model in {time.perf_counter() - t0:.0f}s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB",
          flush=True)
    h, w = map(int, grid.split("x"))
    n_new = h * (w + 1) + 3
    cond, neg = prompts(cfg, h, w)
    image = lambda parallel=0: generate.generate_image_tokens(ours, [cond], [neg], [(h, w)], 3.0, 2048, 1.0, seed,
                                                             True, parallel)
    print(f"2. one {8 * w}x{8 * h} image ({n_new} tokens), --compile:")
    for name, parallel in (("first (compiles, records graphs)", 0), ("second, same process", 0),
                           ("--parallel 16", 16)):
        dt_s, (tokens, passes), peak = timed(lambda: image(parallel))
        print(f"  {name:34s} {dt_s:6.1f}s  {dt_s / passes * 1e3:6.2f} ms/pass  {passes} passes  peak {peak:.1f} GiB",
              flush=True)
    print(f"3. chat prefill of {prefill} tokens:")
    ids = [cfg.bos_id] + [1000 + i % 5000 for i in range(prefill - 1)]
    dt_s, _, peak = timed(lambda: generate.generate_text(ours, [ids], 1, -1, cfg.pad_id))
    print(f"  ours          {dt_s:6.1f}s  peak {peak:.1f} GiB", flush=True)
    x = torch.tensor([ids], device=dev)
    try:
        dt_s, _, peak = timed(lambda: hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                                  max_new_tokens=1, pad_token_id=cfg.pad_id))
        print(f"  transformers  {dt_s:6.1f}s  peak {peak:.1f} GiB", flush=True)
    except torch.OutOfMemoryError:
        print("  transformers  out of memory", flush=True)
    if hf_steps:
        print(f"4. transformers' recipe, {hf_steps} tokens:")
        c, n = torch.tensor([cond], device=dev), torch.tensor([neg], device=dev)
        with torch.no_grad():
            dt_s, _, peak = timed(lambda: hf.generate(
                input_ids=c, attention_mask=torch.ones_like(c), do_sample=True, top_k=2048, guidance_scale=3.0,
                negative_prompt_ids=n, prefix_allowed_tokens_fn=reference_grid_rule(h, w, cfg),
                max_new_tokens=hf_steps, min_new_tokens=hf_steps, pad_token_id=cfg.pad_id))
        print(f"  {dt_s / hf_steps * 1e3:.1f} ms/token -> ~{dt_s / hf_steps * n_new:.0f}s per image; peak {peak:.1f} GiB")
    if int8_grid:
        print(f"5. --int8, a {int8_grid} grid, --compile (the decoder above, quantized in place after bf16):")
        del hf  # its bf16 tensors are ours' until quantize.int8 replaces them
        bf16_then_int8(ours, *prompts(cfg, *map(int, int8_grid.split("x"))), int8_grid, seed)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="90x90", help="token grid HxW")
    ap.add_argument("--hf-steps", type=int, default=256, help="tokens of transformers' recipe to time (0: skip)")
    ap.add_argument("--prefill", type=int, default=16384, help="chat prompt length for the prefill check")
    ap.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    ap.add_argument("--int8-grid", default="32x32", help="token grid HxW of the bf16 vs int8 check (empty: skip)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: this check runs on a GPU")
    main(**vars(args))

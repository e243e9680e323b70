"""Time chat decoding and measure a long prefill's memory: ours (generate.generate_text) against transformers'
greedy generate, in the same run, on the same random weights.

python bench/bench_chat.py --threads 1                # dim 1024 x 4 layers, full vocabulary, ~1K-token image prompt
python bench/bench_chat.py --prefill 16384            # peak memory of a 16K-token prefill, each side in a subprocess
python bench/bench_chat.py --device cuda --dtype bfloat16 --full --compile   # the 8.5B config on a GPU

Decode: the prompt is bos + the chat template + an image block of visual-token ids (30x32 grid: 990 tokens) + a
question; both sides generate --new tokens greedily (EOS never stops them), timed twice: a prefill-only run (1 new
token) and the whole run; tokens/s = (new - 1) / (whole - prefill). Ours reads tokens back every 8 steps.
Prefill: one process per side builds the model, then runs the prompt with 1 new token; its peak RSS (VmHWM) above
the resident size after building is printed with ours' bound: one chunk of attention scores (fp32,
heads x chunk x prompt length) at most, plus the activations of one chunk.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
from bench_generate import build, timed  # noqa: E402  the same random models (ours aliasing transformers')
from emu3 import Emu3Config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat_prompt(cfg, n_image_rows=30, n_image_cols=32, n_text=40):
    """bos, ~20 text ids, an image block of visual ids (rows of n_image_cols + EOL), ~20 text ids: ~1K tokens."""
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(cfg.visual_offset, cfg.visual_offset + cfg.codebook_size, (n_image_rows, n_image_cols),
                         generator=g)
    grid = torch.cat([grid, torch.full((n_image_rows, 1), cfg.eol_id)], 1).flatten().tolist()
    text = torch.randint(1000, 100000, (n_text,), generator=g).tolist()
    return [cfg.bos_id] + text[:20] + [cfg.boi_id, 18, 15, 9, 18, 17, cfg.wrapper_id] + grid + \
        [cfg.eof_id, cfg.eoi_id] + text[20:]


def decode_bench(cfg, device, dtype, n_new, compile_step, skip_hf, seed):
    hf, ours = build(cfg, device, dtype, seed)
    ids = chat_prompt(cfg)
    never = -1  # an EOS id no token has: both run the whole length
    runs = {"ours": lambda n: generate.generate_text(ours, [ids], n, never, cfg.pad_id, compile_step=compile_step)}
    if not skip_hf:
        x = torch.tensor([ids], device=device)
        runs["transformers"] = lambda n: hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                                     max_new_tokens=n, min_new_tokens=n, pad_token_id=cfg.pad_id)
    print(f"config dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size}, {dtype}, {device}; prompt "
          f"{len(ids)} tokens, {n_new} new; threads {torch.get_num_threads()}", flush=True)
    results = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn(8)  # warm-up (with --compile: the compile)
            prefill = min(timed(lambda: fn(1), device)[0] for _ in range(2))
            whole = min(timed(lambda: fn(n_new), device)[0] for _ in range(2))
            results[name] = (n_new - 1) / (whole - prefill)
            print(f"{name:14s} prefill {prefill:.2f}s, {n_new} tokens {whole:.2f}s, decode {results[name]:.1f} tokens/s",
                  flush=True)
    if len(results) == 2:
        print(f"decode speed-up ours vs transformers: {results['ours'] / results['transformers']:.2f}x")


CHILD = """
import os, re, sys, torch
sys.path[:0] = [{root!r}, {bench!r}]
import generate
from bench_generate import build
from emu3 import Emu3Config
torch.set_num_threads({threads})
cfg = Emu3Config(**{cfg!r})
hf, ours = build(cfg, torch.device("cpu"), torch.float32, 0)
ids = [cfg.bos_id] + [1000 + i % 5000 for i in range({n} - 1)]
rss = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024
base = rss('VmRSS')
with torch.no_grad():
    if {side!r} == "ours":
        generate.generate_text(ours, [ids], 1, -1, cfg.pad_id)
    else:
        x = torch.tensor([ids])
        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=1,
                    pad_token_id=cfg.pad_id)
print("PEAK", rss('VmHWM') - base, file=sys.stderr)
"""


def prefill_bench(cfg, n, threads, skip_hf):
    fields = {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")}
    fields["max_seq_len"] = n + 64
    mask = generate.PREFILL_CHUNK * n  # the CPU kernel's materialised causal mask of one chunk, in bools
    print(f"config dim {cfg.dim} x {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, fp32, cpu; "
          f"prompt {n} tokens; prefill chunk {generate.PREFILL_CHUNK}", flush=True)
    print(f"ours: unpadded chunks are causal aligned to their end, no mask built (on a CPU torch materialises one "
          f"chunk's {generate.PREFILL_CHUNK} x {n} boolean mask, {mask / 2**30:.2f} GiB, shared by every head)")
    for side in ["ours"] + ([] if skip_hf else ["transformers"]):
        code = CHILD.format(root=ROOT, bench=os.path.join(ROOT, "bench"), threads=threads, cfg=fields, n=n, side=side)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {side} failed:\n{r.stderr[-2000:]}")
        peak = int(r.stderr.split("PEAK ")[-1].split()[0])
        print(f"{side:14s} prefill of {n} tokens: peak RSS above the built model {peak / 2**30:.2f} GiB "
              f"({time.perf_counter() - t:.0f}s with start-up)", flush=True)


def main(full, device, dtype, dim, n_layers, new, prefill, compile_step, skip_hf, seed, threads):
    device, dtype = torch.device(device), getattr(torch, dtype)
    if threads:
        torch.set_num_threads(threads)
    if full:
        cfg = Emu3Config(max_seq_len=131072)  # Emu3-Chat: 8.5B
    else:
        cfg = Emu3Config(dim=dim, n_layers=n_layers, n_heads=dim // 128, n_kv_heads=max(1, dim // 512),
                         ffn_dim=dim * 11 // 4, max_seq_len=max(4096, prefill + 64))
    if prefill:
        prefill_bench(cfg, prefill, threads or torch.get_num_threads(), skip_hf)
    else:
        decode_bench(cfg, device, dtype, new, compile_step, skip_hf, seed)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the released 8.5B Emu3-Chat config")
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--dtype", default="float32", help="decoder dtype: float32 or bfloat16")
    ap.add_argument("--dim", type=int, default=1024, help="model width without --full")
    ap.add_argument("--n-layers", type=int, default=4, help="layers without --full")
    ap.add_argument("--new", type=int, default=64, help="tokens to generate")
    ap.add_argument("--prefill", type=int, default=0, help="instead: peak memory of a prefill of this many tokens")
    ap.add_argument("--compile", dest="compile_step", action="store_true", help="torch.compile our decode step")
    ap.add_argument("--skip-hf", action="store_true", help="ours only")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    main(**vars(ap.parse_args()))

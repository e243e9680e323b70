"""Time image generation: ours (generate.generate_image_tokens) against transformers' recipe, in the same run.

python bench/bench_generate.py --threads 1                       # CPU fp32, dim 1024 x 4 layers, full vocab, 16x16 grid
python bench/bench_generate.py --full --device cuda --dtype bfloat16   # Emu3-Gen 8.5B config, 90x90 grid, on a GPU
python bench/bench_generate.py --full --device cuda --dtype bfloat16 --compile   # + compiled decode step
python bench/bench_generate.py --full --device cuda --dtype bfloat16 --compile --parallel 16   # + Jacobi windows

Random weights, one set shared by both: ours aliases transformers' tensors (convert.llm_from_hf, assign=True).
Ours: cond + uncond prompts as one 2-row batch, static KV cache, CFG / grid mask / top-k on the device.
transformers: generate(do_sample=True, top_k=2048, guidance_scale=3.0, negative_prompt_ids (with the image
prefix), prefix_allowed_tokens_fn = the Emu3 docs' grid rule) -- a second model pass for the
unconditional branch and a Python prefix function each step.
With --parallel N, ours also runs Jacobi decoding with windows of N (the same tokens, fewer forward passes). Random
weights give a nearly flat next-token distribution, so the noise decides most tokens and guesses made from the
noise alone are often right: how many tokens a pass accepts here says little about a trained model (see the
README's toy figures); what this measures is the cost of a wider pass.
Prints per implementation: forward passes, ms per token (generation time / h*(w+1)+3 tokens, prefill included), seconds per image
(token generation; the VQ decode is left out, it is the same work for both) and the achieved weight bandwidth:
decoder weight bytes one step of the reference must read (embedding excluded) / step time. transformers' two
passes read them twice, and ours reads only the grid window's rows of lm_head (generate.grid_window: 32776 of
184622), so this is a speed figure on a common scale, not what either one's hardware moved. On CUDA: peak memory too.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convert  # noqa: E402
import generate  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402


def build(cfg, device, dtype, seed):
    """transformers Emu3ForConditionalGeneration (random, tiny unused VQ) and our Emu3 sharing its weights."""
    from transformers import Emu3Config as HFConfig, Emu3ForConditionalGeneration
    vocab = {f"<|visual token {k:06d}|>": cfg.visual_offset + k for k in range(cfg.codebook_size)}
    vocab |= {"<|extra_200|>": cfg.eol_id, "<image>": 151646}
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id)
    vq = dict(base_channels=32, channel_multiplier=[1, 1, 1, 2], num_res_blocks=1, attn_resolutions=[3],
              hidden_size=64)  # generation never touches the VQ
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Emu3ForConditionalGeneration._from_config(
            HFConfig(text_config=text, vq_config=vq, vocabulary_map=vocab, image_token_id=151646), dtype=dtype)
    hf.eval()
    sd = {k: v for k, v in hf.state_dict().items() if not convert.HF_VQ_PREFIX.match(k)}
    with torch.device("meta"):
        ours = Emu3(cfg)
    ours.load_state_dict(convert.llm_from_hf(sd, cfg), strict=True, assign=True)  # the same tensors, no copy
    return hf, ours.eval()


def docs_grid_rule(h, w, cfg):
    """transformers' recipe's prefix_allowed_tokens_fn, as the Emu3 docs write it (transformers
    `docs/source/en/model_doc/emu3.md`): one Python branch per token, the cost the reference pays each step. (The
    tests keep their own copy, tests/hf_tiny.py: bench/ runs without tests/.)"""
    visual = list(range(cfg.visual_offset, cfg.visual_offset + cfg.codebook_size))

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == cfg.wrapper_id, as_tuple=True)[0][0]
        if offset % (w + 1) == 0:
            return (cfg.eol_id,)
        elif offset == (w + 1) * h + 1:
            return (cfg.eof_id,)
        elif offset == (w + 1) * h + 2:
            return (cfg.eoi_id,)
        elif offset == (w + 1) * h + 3:
            return (cfg.eos_id,)
        elif offset > (w + 1) * h + 3:
            return (cfg.pad_id,)
        return visual
    return allowed


def prompts(cfg, h, w):
    # bos + ~20 text tokens + boi + "h*w" (digits and '*' as id stand-ins) + img; the negative prompt ~45 tokens
    size = [16 + int(c) for c in str(h)] + [9] + [16 + int(c) for c in str(w)]
    cond = [cfg.bos_id] + list(range(1000, 1020)) + [cfg.boi_id] + size + [cfg.wrapper_id]
    neg = [cfg.bos_id] + list(range(2000, 2045)) + [cfg.boi_id] + size + [cfg.wrapper_id]
    return cond, neg


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(full, device, dtype, grid, dim, n_layers, repeat, compile, skip_hf, seed, threads, parallel):
    device, dtype = torch.device(device), getattr(torch, dtype)
    if threads:
        torch.set_num_threads(threads)
    if full:
        cfg = Emu3Config()  # Emu3-Gen: 8.5B
        grid = grid or "90x90"
    else:
        cfg = Emu3Config(dim=dim, n_layers=n_layers, n_heads=dim // 128, n_kv_heads=max(1, dim // 512),
                         ffn_dim=dim * 11 // 4)
        grid = grid or "16x16"
    h, w = map(int, grid.split("x"))
    n_new = h * (w + 1) + 3
    hf, ours = build(cfg, device, dtype, seed)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if n != "embed.weight")
    cond, neg = prompts(cfg, h, w)
    print(f"config dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size}, {weight_bytes / 1e9:.2f} GB "
          f"decoder weights read per step ({dtype}, {device}); grid {h}x{w} = {n_new} tokens, prompt {len(cond)}, "
          f"negative {len(neg)}; threads {torch.get_num_threads()}", flush=True)

    def run_ours(hh, ww, s, window=0):
        c, n = prompts(cfg, hh, ww)
        return generate.generate_image_tokens(ours, [c], [n], [(hh, ww)], 3.0, 2048, 1.0, s, compile, window)

    def run_hf(hh, ww, s):
        c, n = prompts(cfg, hh, ww)
        torch.manual_seed(s)
        with torch.no_grad():
            ids = torch.tensor([c], device=device)
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=2048,
                              guidance_scale=3.0, negative_prompt_ids=torch.tensor([n], device=device),
                              prefix_allowed_tokens_fn=docs_grid_rule(hh, ww, cfg), max_new_tokens=hh * (ww + 1) + 3,
                              pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id)
        return out[:, len(c):], n_new

    # warm-up (allocator, kernels; with --compile the same grid, since the compiled step is shape-specialised)
    run_ours(*((h, w) if compile else (2, 2)), seed)
    if parallel:
        run_ours(*((h, w) if compile else (2, 2)), seed, parallel)
    if not skip_hf:
        run_hf(2, 2, seed)
    runs = [("ours", run_ours)] + ([(f"ours --parallel {parallel}", lambda *a: run_ours(*a, parallel))]
                                   if parallel else []) + ([] if skip_hf else [("transformers", run_hf)])
    results = {name: [] for name, _ in runs}
    tokens = {}
    for r in range(repeat):  # interleaved, so all see the same machine load
        for name, fn in runs:
            dt, (out, passes) = timed(lambda: fn(h, w, seed + r), device)
            assert out.shape == (1, n_new) and out[0, -1].item() == cfg.eos_id, f"{name}: malformed image tokens"
            tokens.setdefault((name.startswith("ours"), r), []).append(out)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            results[name].append((dt, mem, passes))
            print(f"  run {r} {name}: {dt:.2f}s, {passes} forward passes", flush=True)
    if parallel:  # the same seed, the same image (fp32; bf16 may round a batched window differently)
        same = all(torch.equal(*outs) for (mine, _), outs in tokens.items() if mine)
        print(f"--parallel {parallel} tokens identical to the sequential ones: {same}")
    print(f"{'':22s} {'passes':>7s} {'ms/token':>9s} {'s/image':>9s} {'GB/s':>8s}"
          + ("  peak GiB" if device.type == "cuda" else ""))
    best = {}
    for name, res in results.items():
        dt, mem, passes = min(res)
        best[name] = dt
        print(f"{name:22s} {passes:7d} {dt / n_new * 1e3:9.1f} {dt:9.2f} {weight_bytes / (dt / n_new) / 1e9:8.2f}"
              + (f"  {mem:8.2f}" if mem is not None else ""))
    if "transformers" in best:
        for name in best:
            if name != "transformers":
                print(f"speed-up {name} vs transformers: {best['transformers'] / best[name]:.2f}x")
    if parallel:
        name = f"ours --parallel {parallel}"
        print(f"--parallel {parallel} vs sequential: {min(results['ours'])[2] / min(results[name])[2]:.2f}x fewer "
              f"passes, {best['ours'] / best[name]:.2f}x the speed")
    # where a decode step goes: our decoder alone, the 2-row CFG batch against two 1-row passes (as transformers)
    with torch.no_grad():
        for rows in (2, 1):
            ours.setup_cache(rows, 64)
            x, pos = torch.full((rows, 1), cfg.visual_offset, device=device), torch.tensor([10], device=device)
            ours(x, input_pos=pos, last_only=True, kv_len=64)
            dt = min(timed(lambda: ours(x, input_pos=pos, last_only=True, kv_len=64), device)[0] for _ in range(3))
            print(f"decoder forward alone, {rows} row(s): {dt * 1e3:.1f} ms" + (" (x2 for two passes)" if rows == 1 else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the released 8.5B Emu3-Gen config (default grid 90x90)")
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--dtype", default="float32", help="decoder dtype: float32 or bfloat16")
    ap.add_argument("--grid", default=None, help="token grid HxW (default 16x16; 90x90 with --full)")
    ap.add_argument("--dim", type=int, default=1024, help="model width without --full")
    ap.add_argument("--n-layers", type=int, default=4, help="layers without --full")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per implementation (best is reported)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step (GPU fast path)")
    ap.add_argument("--skip-hf", action="store_true", help="time ours only")
    ap.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    ap.add_argument("--parallel", type=int, default=0, help="also time ours with Jacobi windows of N tokens")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine: with busy cores, "
                                                               "every multi-threaded GEMM waits for a descheduled thread)")
    main(**vars(ap.parse_args()))

"""One short GPU check, ready for the first GPU a session is lent: a smoke test on the toy, then the 8.5B figures.

    python bench/gpu_check.py                        # everything (about 5 minutes on an H100/H200)
    python bench/gpu_check.py --budget 300           # sections that would not fit in 300 s are skipped, said so
    python bench/gpu_check.py --device cpu --smoke   # the smoke section alone, on the CPU (a test runs this)

Sections, each independent (a failure prints one line and the next section runs), then a summary table:
  smoke     the shipped toy on the device against the same job on the CPU: chat, an image, --parallel 8, --compile
  sdpa      the attention kernel PyTorch picks for each call shape we make, at the 8.5B shape (bf16)
  image     one 720x720 image (90x90 grid, 8193 tokens, CFG over 2 rows) with --compile on the 8.5B shape with random
            bf16 weights: the first step (compiling), ms per step after it, seconds for the image without the compile,
            peak memory, inductor compiles and recompiles
  profile   the CUDA kernels of 16 compiled decode steps at half the cache, by time
  int8      one layer's GEMMs at 2 rows: bf16, int8 weight-only (dequantising F.linear compiled; _weight_int8pack_mm)
  attention decode attention alone, six ways (today's folded call on the default kernel, memory-efficient, math
            compiled folded or GQA-unfolded, an explicit multiply-sum, flex_attention): added after the first run
  second    a second image (48x48 grid) in the same process: no new compile expected
  prefill   a 16K-token chat prefill: seconds and peak memory, ours and transformers' (sdpa)
  hf        transformers' recipe (guidance 3, the negative prompt, the docs' prefix_allowed_tokens_fn, top-k 2048)
            for --hf-steps tokens: ms per token and the projected time of a 720x720 image
  parallel  --parallel 16 on a 32x32 grid: compile, ms per pass (random weights accept few guesses: this measures
            the cost of a wider pass, not the speed-up on a trained model)
  int8 step the decoder quantized in place (quantize.int8, --int8), then the 48x48 image of `second` again: ms per
            pass and peak memory against second's bf16 figures
Goals (issue 16): 720x720 in at most 45 s sequentially on an H100/H200, a fused kernel in decode and prefill, peak at
most 22 GB.
"""
import argparse
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
import quantize  # noqa: E402
import sample  # noqa: E402
from bench_generate import docs_grid_rule, prompts  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = {0: "math", 1: "flash", 2: "memory-efficient", 3: "cudnn", 4: "overrideable"}
SUMMARY = []  # (section, figure, value)


def note(section, figure, value):
    SUMMARY.append((section, figure, value))
    print(f"  {figure}: {value}", flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ---- smoke: the toy, device against CPU ----

def smoke(dev):
    picture = None
    results = {}
    for d in [torch.device("cpu")] + ([dev] if dev.type != "cpu" else []):
        m = sample.load(os.path.join(ROOT, "toy", "ckpt"), d, "float32")
        texts = ["a large red circle in the center", "a small blue square on the left"]
        pictures = sample.images(m, texts, seed=0)
        picture = picture or pictures[0]
        par, passes = sample.images(m, texts, seed=0, parallel=8, return_passes=True)
        answers = sample.chat(m, ["Describe the image.", "What shape is this?"], [picture, pictures[1]],
                              max_new_tokens=16)
        results[d.type] = ([p.tobytes() for p in pictures], [p.tobytes() for p in par], answers, passes)
        if d.type == dev.type:
            torch._dynamo.reset()
            t = time.perf_counter()
            compiled = sample.images(m, texts, seed=0, compile_step=True)
            note("smoke", "compiled toy image (s, compile included)", f"{time.perf_counter() - t:.1f}")
            note("smoke", "compiled == eager on the device", [p.tobytes() for p in compiled] == results[d.type][0])
            torch._dynamo.reset()
    cpu, on = results["cpu"], results[dev.type]
    note("smoke", "images: device == cpu", on[0] == cpu[0])
    note("smoke", "--parallel 8 == sequential on the device", on[1] == on[0])
    note("smoke", "chat answers: device == cpu", on[2] == cpu[2])
    print(f"  answers on the device: {on[2]}", flush=True)


# ---- the 8.5B shape ----

def sdpa(cfg, dev, dt):
    from torch.backends.cuda import SDPAParams, can_use_flash_attention
    hd, kv, group, S = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, 4352
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt)
    k, v = r(2, kv, S, hd), r(2, kv, S, hd)
    mask = lambda B, T: torch.ones(B, 1, group * T, S, dtype=torch.bool, device=dev)
    rows = [("decode step (2 rows, folded, mask)", r(2, kv, group, hd), k, v, mask(2, 1), False, False),
            ("--parallel 16 window (folded, mask)", r(2, kv, group * 16, hd), k, v, mask(2, 16), False, False),
            ("padded prefill chunk 2048 (folded, mask)", r(2, kv, group * 2048, hd), k, v, mask(2, 2048), False, False),
            ("unpadded first chunk 2048 (causal, GQA)", r(1, cfg.n_heads, 2048, hd), r(1, kv, 2048, hd),
             r(1, kv, 2048, hd), None, True, True)]
    for name, q, kk, vv, m, causal, gqa in rows:
        choice = torch._fused_sdp_choice(q, kk, vv, m, 0.0, causal, enable_gqa=gqa)
        note("sdpa", name, BACKENDS.get(choice, str(choice)))
    # a later unpadded chunk: causal aligned to its end (torch.nn.attention.bias.causal_lower_right), which torch
    # sends to flash when flash accepts the call, and materialises a mask for otherwise
    q = r(1, cfg.n_heads, 2048, hd)
    flash = can_use_flash_attention(SDPAParams(q, k[:1], v[:1], None, 0.0, True, True))
    note("sdpa", "later unpadded chunk 2048 (lower-right causal, GQA)", "flash" if flash else "a materialised mask")


def build(cfg, dev, dt, seed=0):
    """Our Emu3 with random weights, on the device (no CPU copy)."""
    with torch.device("meta"):
        model = Emu3(cfg)
    model.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.ndim > 1 else p.fill_(1.0)
    return model.to(dt).eval()


def hf_from_ours(model, cfg):
    """transformers' Emu3ForCausalLM over our weights (views of them: no copy)."""
    import convert
    from transformers.models.emu3 import Emu3ForCausalLM, Emu3TextConfig
    text = Emu3TextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                          num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                          rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                          pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id)
    ours = model.state_dict()
    sd = {}
    for k, v in convert.LLM_TABLE.items():
        for i in range(cfg.n_layers) if "{i}" in k else [None]:
            sd[v.format(i=i)] = ours[k.format(i=i)]
    with torch.device("meta"):
        hf = Emu3ForCausalLM._from_config(text, attn_implementation="sdpa", dtype=model.embed.weight.dtype)
    hf.load_state_dict(sd, strict=True, assign=True)
    rotary = hf.model.rotary_emb
    rotary.to_empty(device=model.embed.weight.device)
    rotary.inv_freq = rotary.compute_default_rope_parameters(hf.config)[0].to(model.embed.weight.device)
    return hf.eval()


def image(model, cfg, dev, grid, seed, label, parallel=0):
    h, w = grid
    cond, neg = prompts(cfg, h, w)
    times = []
    progress = lambda done, total, passes, dt: times.append((passes, dt))
    before = graphs()
    reset_peak(dev)
    sync(dev)
    t = time.perf_counter()
    _, passes = generate.generate_image_tokens(model, [cond], [neg], [(h, w)], 3.0, 2048, 1.0, seed, True, parallel,
                                               progress)
    sync(dev)
    total = time.perf_counter() - t
    first_passes, first_t = times[0]  # the first report: 64 passes in, the compile behind it
    steady = (times[-1][1] - first_t) / max(times[-1][0] - first_passes, 1)
    note(label, "seconds (compile included)", f"{total:.1f}")
    note(label, "ms per pass after the first report", f"{steady * 1e3:.2f}")
    note(label, f"seconds for the {passes} passes without the compile (projected)", f"{steady * passes:.1f}")
    note(label, "peak GiB", f"{peak_gib(dev):.1f}")
    note(label, "new inductor graphs", graphs() - before)
    return steady


@torch.no_grad()
def profile(model, cfg, dev, grid):
    """The kernels of 16 compiled decode steps at half the cache."""
    from torch.profiler import ProfilerActivity, profile as prof
    h, w = grid
    cond, neg = prompts(cfg, h, w)
    r = generate.start_image(model, [cond], [neg], [(h, w)], 3.0, 0, 1)
    step = generate.compiled(generate.image_step)
    args = (r.h, r.w, r.seeds, 3.0, 2048, 1.0)
    i = r.n_new // 2
    call = lambda: step(model, r.seq[:, i:i + 1], r.cols[i:i + 1], r.pad, r.positions[i:i + 1], *args,
                        generate.cache_len(r.L + i, r.size))
    for _ in range(3):
        call()
    sync(dev)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(16):
            call()
        sync(dev)
    table = p.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total", row_limit=12,
                                   max_name_column_width=60)
    print(table, flush=True)


def prefill(model, hf, cfg, dev, n):
    ids = [cfg.bos_id] + [1000 + i % 5000 for i in range(n - 1)]
    model.clear_cache()
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    base = torch.cuda.memory_allocated() / 2**30 if dev.type == "cuda" else 0
    reset_peak(dev)
    t = time.perf_counter()
    generate.generate_text(model, [ids], 1, -1, cfg.pad_id)
    sync(dev)
    note("prefill", f"ours: seconds for {n} tokens", f"{time.perf_counter() - t:.1f}")
    note("prefill", "ours: peak GiB above the weights (cache included)", f"{peak_gib(dev) - base:.2f}")
    model.clear_cache()
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    if hf is None:
        return
    x = torch.tensor([ids], device=dev)
    reset_peak(dev)
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=1,
                    pad_token_id=cfg.pad_id)
    sync(dev)
    note("prefill", f"transformers: seconds for {n} tokens", f"{time.perf_counter() - t:.1f}")
    note("prefill", "transformers: peak GiB above the weights (cache included)", f"{peak_gib(dev) - base:.2f}")


def hf_recipe(hf, cfg, dev, grid, steps):
    h, w = grid
    cond, neg = prompts(cfg, h, w)
    c, n = torch.tensor([cond], device=dev), torch.tensor([neg], device=dev)
    run = lambda k: hf.generate(input_ids=c, attention_mask=torch.ones_like(c), do_sample=True, top_k=2048,
                                guidance_scale=3.0, negative_prompt_ids=n, prefix_allowed_tokens_fn=docs_grid_rule(h, w, cfg),
                                max_new_tokens=k, min_new_tokens=k, pad_token_id=cfg.pad_id)
    with torch.no_grad():
        run(2)
        sync(dev)
        t = time.perf_counter()
        run(steps)
        sync(dev)
    per = (time.perf_counter() - t) / steps
    note("hf", "ms per token", f"{per * 1e3:.1f}")
    note("hf", "projected seconds per 720x720 image", f"{per * (h * (w + 1) + 3):.0f}")


@torch.no_grad()
def int8(cfg, dev):
    """Weight-only int8 against bf16 for one decoder layer's GEMMs at 2 rows (CFG's batch): bf16 F.linear, the
    dequantising expression F.linear(x, w.to(bf16)) * scale compiled (inductor fuses it into one GEMM), and
    torch._weight_int8pack_mm where this torch has it."""
    shapes = {"wqkv": (cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim, cfg.dim), "wo": (cfg.dim, cfg.dim),
              "w13": (2 * cfg.ffn_dim, cfg.dim), "w_down": (cfg.dim, cfg.ffn_dim)}
    x = {n: torch.randn(2, k, device=dev, dtype=torch.bfloat16) for n, (_, k) in shapes.items()}
    w = {n: torch.randn(o, k, device=dev, dtype=torch.bfloat16) for n, (o, k) in shapes.items()}
    q = {n: torch.randint(-127, 128, w[n].shape, device=dev, dtype=torch.int8) for n in shapes}
    s = {n: torch.rand(w[n].shape[0], device=dev, dtype=torch.bfloat16) for n in shapes}
    dq = torch.compile(lambda x, q, s: torch.nn.functional.linear(x, q.to(x.dtype)) * s)
    ways = {"bf16": lambda n: torch.nn.functional.linear(x[n], w[n]), "int8 dequant, compiled": lambda n: dq(x[n], q[n], s[n])}
    if hasattr(torch, "_weight_int8pack_mm"):
        ways["int8 _weight_int8pack_mm"] = lambda n: torch._weight_int8pack_mm(x[n], q[n], s[n])
    for way, fn in ways.items():
        try:
            for n in shapes:
                fn(n)
            sync(dev)
            t = time.perf_counter()
            for _ in range(50):
                for n in shapes:
                    fn(n)
            sync(dev)
            per_layer = (time.perf_counter() - t) / 50
            note("int8", f"{way}: us per layer (x{cfg.n_layers} = ms per step)",
                 f"{per_layer * 1e6:.0f} ({per_layer * cfg.n_layers * 1e3:.2f})")
        except Exception as e:  # noqa: BLE001
            note("int8", f"{way}", f"unavailable: {str(e).splitlines()[0][:120]}")


@torch.no_grad()
def attention(cfg, dev, S=4352):
    """Decode-step attention alone (2 rows, one token, the cache's first S columns readable), six ways, so that the
    next GPU session can pick the fastest: the profile above shows cuDNN's kernel at ~95 us a layer where reading
    K and V (2 x 8 x S x 128 bf16 each) takes ~9 us at 4 TB/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dt, kv, group, hd = torch.bfloat16, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=dt)
    q, k, v = r(2, cfg.n_heads, 1, hd), r(2, kv, S, hd), r(2, kv, S, hd)
    valid = torch.arange(S, device=dev) < S - 100  # the bucket's last columns not written yet
    folded = q.reshape(2, kv, group, hd)
    mask_f = valid.expand(2, 1, group, S)
    mask_g = valid.expand(2, 1, 1, S)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def explicit(q, k, v, mask):  # fp32 scores as a fused multiply-and-sum (no GEMM), for inductor to tile
        s = (q.float()[:, :, :, None, :] * k.float()[:, :, None]).sum(-1) / hd**0.5  # (2, kv, group, S)
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        return (p[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)  # (2, kv, group, hd)

    ways = {"folded, default kernel (today)": lambda: sdpa(folded, k, v, attn_mask=mask_f),
            "folded, memory-efficient": lambda: _with(SDPBackend.EFFICIENT_ATTENTION, sdpa, folded, k, v, mask_f),
            "folded, math, compiled": torch.compile(lambda: _with(SDPBackend.MATH, sdpa, folded, k, v, mask_f)),
            "GQA unfolded, math, compiled": torch.compile(
                lambda: _with(SDPBackend.MATH, sdpa, q, k, v, mask_g, enable_gqa=True)),
            "explicit multiply-sum, compiled": torch.compile(lambda: explicit(folded, k, v, mask_f))}
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
        keep = lambda score, b, h, q_idx, kv_idx: torch.where(valid[kv_idx], score, float("-inf"))
        ways["flex_attention (GQA), compiled"] = lambda: flex(q, k, v, score_mod=keep, enable_gqa=True)
    except ImportError:
        pass
    ref = sdpa(folded.float(), k.float(), v.float(), attn_mask=mask_f)
    for name, fn in ways.items():
        try:
            out = fn().reshape(ref.shape).float()
            err = (out - ref).abs().max().item()
            for _ in range(3):
                fn()
            sync(dev)
            t = time.perf_counter()
            for _ in range(100):
                fn()
            sync(dev)
            us = (time.perf_counter() - t) / 100 * 1e6
            note("attention", f"{name} at S={S}: us (x{cfg.n_layers} layers = ms per step; max err)",
                 f"{us:.0f} ({us * cfg.n_layers / 1e3:.2f}; {err:.1e})")
        except Exception as e:  # noqa: BLE001
            note("attention", name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")


def _with(backend, sdpa, q, k, v, mask, **kw):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return sdpa(q, k, v, attn_mask=mask, **kw)


def int8_step(model, cfg, dev, grid):
    """--int8 on the 8.5B shape: the model quantized in place (quantize.int8), then the same compiled image as
    `second` (compare its ms per pass and peak with second's bf16 ones)."""
    model.clear_cache()
    quantize.int8(model)
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    note("int8 step", "decoder GB in int8", f"{sum(t.nbytes for t in model.state_dict().values()) / 1e9:.2f}")
    return image(model, cfg, dev, grid, 1, "int8 step")


def section(name, budget, t0, need, fn, *args):
    left = budget - (time.perf_counter() - t0)
    if left < need:
        note(name, "skipped", f"needs ~{need:.0f}s, {left:.0f}s of the budget left")
        return None
    print(f"== {name}", flush=True)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (one line, then the next section)
        note(name, "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return None


def main(device, smoke_only, budget, grid, prefill_tokens, hf_steps, small):
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run on a GPU, or give --device cpu --smoke")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {name}; budget {budget}s", flush=True)
    section("smoke", budget, t0, 20, smoke, dev)
    if not smoke_only:
        dt = torch.bfloat16
        h, w = map(int, grid.split("x"))
        cfg = Emu3Config(max_seq_len=max(9216, prefill_tokens + 64)) if not small else Emu3Config(
            dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=max(9216, prefill_tokens + 64))
        section("sdpa", budget, t0, 5, sdpa, cfg, dev, dt)
        model = section("build", budget, t0, 30, build, cfg, dev, dt)
        if model is not None:
            torch._dynamo.reset()
            section("image", budget, t0, 150, image, model, cfg, dev, (h, w), 0, "image")
            section("profile", budget, t0, 15, profile, model, cfg, dev, (h, w))
            section("int8", budget, t0, 20, int8, cfg, dev)
            section("attention", budget, t0, 60, attention, cfg, dev)
            section("second", budget, t0, 15, image, model, cfg, dev, (6, 6) if small else (48, 48), 1, "second")
            hf = section("transformers build", budget, t0, 20, hf_from_ours, model, cfg)
            section("prefill", budget, t0, 30, prefill, model, hf, cfg, dev, prefill_tokens)
            if hf is not None:
                section("hf", budget, t0, 20, hf_recipe, hf, cfg, dev, (h, w), hf_steps)
            section("parallel", budget, t0, 90, image, model, cfg, dev, (6, 6) if small else (32, 32), 2, "parallel", 16)
            section("int8 step", budget, t0, 90, int8_step, model, cfg, dev, (6, 6) if small else (48, 48))
    print(f"\n== summary ({time.perf_counter() - t0:.0f}s)")
    width = max(len(f"{s}: {f}") for s, f, _ in SUMMARY)
    for s, f, v in SUMMARY:
        print(f"{s + ': ' + f:{width}s}  {v}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (all sections) or cpu (with --smoke)")
    ap.add_argument("--smoke", dest="smoke_only", action="store_true", help="the smoke section alone")
    ap.add_argument("--budget", type=float, default=480, help="seconds; sections that would not fit are skipped")
    ap.add_argument("--grid", default="90x90", help="token grid HxW of the first image")
    ap.add_argument("--prefill", dest="prefill_tokens", type=int, default=16384, help="chat prompt length to prefill")
    ap.add_argument("--hf-steps", type=int, default=64, help="tokens of transformers' recipe to time")
    ap.add_argument("--small", action="store_true", help="a small model instead of the 8.5B shape (a dry run)")
    main(**vars(ap.parse_args()))

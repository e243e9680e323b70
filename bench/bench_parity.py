"""The noise under parity.py's tolerance: NMSE between two correct runs of the same random weights, per trace entry.

python bench/bench_parity.py --threads 2                        # CPU: dim 1024 x 4 layers, VQ-VAE full size at 64x64
python bench/bench_parity.py --device cuda --full               # on a GPU: the 8.5B config (32 layers), VQ at 256x256

Pairs, each printed as the largest NMSE over its entries (and where it is), in units of the unit roundoff u of the
coarser dtype, against parity.py's bound (k u)^2:
1. decoder bf16 against fp32 on --device (bf16: a rounded copy of the same weights), with the NMSE of every
   layer's output, to show how it grows with depth;
2. the full-size VQ-VAE, fp32: ours against transformers' Emu3VQVAE with the same weights, on the CPU (skipped
   without transformers, or with --skip-hf);
3. --device against the CPU (only when --device is not cpu), fp32: decoder with --cpu-layers layers and the VQ-VAE;
4. the same VQ-VAE on --device with cuDNN's TF32 on (its default, which BAAI's scripts ran with), against the CPU.
Weights are drawn as tests/hf_tiny.py draws them (linear std 1/sqrt(fan_in), RMSNorm weights in [0.5, 1.5),
embeddings std 1, random GroupNorm/BatchNorm affine parameters and statistics): random, not trained, so no outlier
features; what it measures is depth and kernels.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convert  # noqa: E402
import parity  # noqa: E402
import sample  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402
from vqvae import VQVAE, VQConfig  # noqa: E402


def randomise_(model, seed):
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)  # drawn where the model is: 8.5B draws on a CPU take minutes
    r = lambda shape: torch.randn(shape, generator=g, device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("quantize.", "embed.")):
                p.copy_(r(p.shape))  # embeddings std 1; a codebook spread wide
            elif p.ndim == 1:  # norm weights in [0.5, 1.5), biases std 0.2
                p.copy_(torch.rand(p.shape, generator=g, device=dev) + 0.5 if name.endswith("weight")
                        else 0.2 * r(p.shape))
            else:  # Linear / conv: std 1/sqrt(fan_in), so activations stay O(1) through depth
                p.copy_(r(p.shape) / math.sqrt(p[0].numel()))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * r(b.shape))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, device=dev) + 0.5)
    return model


def worst(a, b, dtype, names=None):
    """(largest NMSE, its name, that NMSE in units of u^2 of dtype) over the float entries both recorders hold."""
    u = parity.ROUNDOFF[dtype]
    best = (-1.0, "")
    for n in names or a:
        if n in b and a[n].is_floating_point():
            nmse = parity.compare_entry(a[n], b[n], math.inf)[2]
            best = max(best, (nmse, n))
    return best[0], best[1], math.sqrt(best[0]) / u


def report(label, a, b, dtype):
    nmse, name, ku = worst(a, b, dtype)
    tol = parity.tolerance(dtype, dtype)
    print(f"{label:58s} max NMSE {nmse:.2e} = ({ku:.1f} u)^2 at {name}; bound {tol:.1e} = ({parity.K[dtype]} u)^2",
          flush=True)


def trace_llm(model, tokens):
    rec = parity.Recorder()
    parity.trace_llm(rec, model, tokens)
    return rec.tensors


def trace_vq(vq, x, tf32=False):
    """The encoder, quantizer and decoder stages; tf32: cuDNN's TF32 on (parity's trace_* turn it off)."""
    if not tf32:
        rec = parity.Recorder()
        parity.trace_vq_decode(rec, vq, parity.trace_vq_encode(rec, vq, x))
        return rec.tensors
    rec = parity.Recorder()
    cudnn = torch.backends.cudnn
    with torch.no_grad(), cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=True):
        parity.hooked(rec, parity.vq_encoder_stages(vq))
        codes = vq.encode(x)
        rec.remove()
        parity.hooked(rec, parity.vq_decoder_stages(vq))
        vq.decode(codes)
        rec.remove()
    return rec.tensors


def trace_hf_vq(vq, x):
    """transformers' Emu3VQVAE on the same stages (parity.vq_*_stages(hf=True)), TF32 off as parity.py runs it."""
    rec = parity.Recorder()
    rec.add("vq.input", x)
    parity.hooked(rec, parity.vq_encoder_stages(vq, hf=True))
    rec.hook(vq.quantize, "vq.codes", lambda codes: codes[:, 0])
    with torch.no_grad(), sample.vq_precision():
        vq.encode(x, torch.tensor([x.shape[-2:]]))
        rec.remove()
        parity.hooked(rec, parity.vq_decoder_stages(vq, hf=True))
        vq.decode(rec.tensors["vq.codes"])
        rec.remove()
    return rec.tensors


def main(device, full, dim, n_layers, tokens, cpu_layers, vq_size, seed, threads, skip_hf):
    torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = Emu3Config() if full else Emu3Config(dim=dim, n_layers=n_layers, n_heads=dim // 128, n_kv_heads=dim // 512,
                                               ffn_dim=int(dim * 3.5))
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    print(f"decoder dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size}, {tokens} tokens; "
          f"VQ-VAE full size, {vq_size}x{vq_size}; {dev}", flush=True)

    # 1. bf16 against fp32, the same weights
    t = time.perf_counter()
    with torch.device(dev):
        model = Emu3(cfg)
    randomise_(model, seed).eval()
    fp32 = trace_llm(model, ids.to(dev))
    bf16 = trace_llm(copy.deepcopy(model).to(torch.bfloat16), ids.to(dev))
    del model
    report("decoder bf16 vs fp32", fp32, bf16, torch.bfloat16)
    u = parity.ROUNDOFF[torch.bfloat16]
    depth = [f"{i}:{math.sqrt(worst(fp32, bf16, torch.bfloat16, [f'llm.layers.{i}.out'])[0]) / u:.1f}"
             for i in range(cfg.n_layers)]
    print(f"  each layer's output, sqrt(NMSE) in u: {' '.join(depth)}; logits "
          f"{worst(fp32, bf16, torch.bfloat16, ['llm.logits'])[2]:.1f} ({time.perf_counter() - t:.0f}s)", flush=True)
    del fp32, bf16

    # 2. ours against transformers, the same VQ-VAE weights (transformers' module tree, renamed by convert.py)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, vq_size, vq_size, generator=g) * 2 - 1
    if skip_hf:
        vq = randomise_(VQVAE(VQConfig()), seed).eval()
    else:
        import transformers
        hf_vq = randomise_(transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig()), seed).eval()
        vq = VQVAE(VQConfig())
        vq.load_state_dict(convert.vq_from_hf(hf_vq.state_dict()), strict=True)
        vq.eval()
    t = time.perf_counter()
    cpu_vq = trace_vq(vq, x)
    print(f"  (VQ on the CPU: {time.perf_counter() - t:.0f}s)", flush=True)
    if not skip_hf:
        hf = trace_hf_vq(hf_vq, x)
        assert torch.equal(hf["vq.codes"], cpu_vq["vq.codes"]), "codes differ: a near-tie, try another --seed"
        report("VQ-VAE fp32, full size: ours vs transformers (cpu)", cpu_vq, hf, torch.float32)
    # 3. the device against the CPU, fp32
    if dev.type != "cpu":
        small = randomise_(Emu3(Emu3Config(**{**cfg.__dict__, "n_layers": cpu_layers})), seed).eval()
        cpu_llm = trace_llm(small, ids)
        report(f"decoder fp32, {cpu_layers} layers: {dev} vs cpu", cpu_llm, trace_llm(small.to(dev), ids.to(dev)),
               torch.float32)
        vq = vq.to(dev)
        report(f"VQ-VAE fp32, TF32 off: {dev} vs cpu", cpu_vq, trace_vq(vq, x.to(dev)), torch.float32)
        report(f"VQ-VAE, cuDNN TF32 on: {dev} vs cpu", cpu_vq, trace_vq(vq, x.to(dev), tf32=True), torch.float32)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--full", action="store_true", help="the 8.5B decoder config (else --dim x --n-layers)")
    ap.add_argument("--dim", type=int, default=1024, help="decoder width without --full")
    ap.add_argument("--n-layers", type=int, default=4, help="decoder layers without --full")
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    ap.add_argument("--cpu-layers", type=int, default=4, help="decoder layers of the device-vs-CPU comparison")
    ap.add_argument("--vq-size", type=int, default=64, help="image side for the VQ-VAE")
    ap.add_argument("--seed", type=int, default=0, help="weights, tokens and image")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the comparison with transformers' VQ-VAE")
    main(**vars(ap.parse_args()))

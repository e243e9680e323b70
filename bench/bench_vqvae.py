"""Time our VQ-VAE encode/decode against transformers' Emu3VQVAE in the same run (full-size config, random weights).

python bench/bench_vqvae.py                         # 720x720 image -> 90x90 codes, CPU fp32
python bench/bench_vqvae.py --size 256              # smaller run
python bench/bench_vqvae.py --device cuda --dtype bfloat16

Both models share the same weights (converted with convert.vq_from_hf). Prints the times, our speed-up, whether the
codes agree, and the max abs pixel difference of the two decoders on transformers' codes. An image is the
reference's 4 equal frames: we run the 2-D encoder once and the 2-D decoder on the returned frame only.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig  # noqa: E402
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE  # noqa: E402

from convert import vq_from_hf  # noqa: E402
from vqvae import VQVAE, VQConfig  # noqa: E402


def randomize_(model, g):
    # kaiming-like random weights, random norm params and BatchNorm statistics, a unit-normal codebook
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            m.weight.data = torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
            m.weight.data = 1 + 0.1 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.data = 0.1 * torch.randn(m.running_mean.shape, generator=g)
                m.running_var.data = 0.5 + torch.rand(m.running_var.shape, generator=g)
                m.num_batches_tracked.data = torch.tensor(1000)
        elif isinstance(m, torch.nn.Embedding):
            m.weight.data = torch.randn(m.weight.shape, generator=g)


def timed(fn, device, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(size, device, dtype, repeat, attn, seed):
    device, dtype = torch.device(device), getattr(torch, dtype)
    cfg = VQConfig()
    hc = Emu3VQVAEConfig()  # defaults = the released tokenizer
    hc._attn_implementation = attn
    with torch.device("meta"):
        hf, ours = Emu3VQVAE(hc).eval(), VQVAE(cfg).eval()
    hf.to_empty(device="cpu")
    randomize_(hf, torch.Generator().manual_seed(seed))
    ours.load_state_dict(vq_from_hf(hf.state_dict(), cfg), strict=True, assign=True)
    ours = ours.to(device, dtype)
    ours.load_state_dict({k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in
                          ours.state_dict().items()})  # own copies: not sharing storage with hf
    hf = hf.to(device, dtype)
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(device, dtype)
    sf = ours.spatial_factor
    print(f"device {device} dtype {dtype} threads {torch.get_num_threads()} image {size}x{size} "
          f"-> grid {size // sf}x{size // sf}, hf attention {attn}")

    with torch.no_grad():
        t_hf_enc, ref = timed(lambda: torch.stack(hf.encode(x, image_sizes=[[size, size]]).image_tokens), device, repeat)
        t_enc, codes = timed(lambda: ours.encode(x), device, repeat)
        t_hf_dec, ref_x = timed(lambda: hf.decode(ref), device, repeat)
        t_dec, our_x = timed(lambda: ours.decode(ref), device, repeat)
    same = (codes == ref).float().mean().item()
    diff = (our_x.float() - ref_x.float()).abs().max().item()
    print(f"encode  transformers {t_hf_enc:8.2f} s   ours {t_enc:8.2f} s   speed-up {t_hf_enc / t_enc:5.2f}x   "
          f"codes equal {same * 100:.2f}%")
    print(f"decode  transformers {t_hf_dec:8.2f} s   ours {t_dec:8.2f} s   speed-up {t_hf_dec / t_dec:5.2f}x   "
          f"pixels max abs diff {diff:.3g} (range {ref_x.float().abs().max().item():.3g})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmark our VQ-VAE against transformers' Emu3VQVAE.")
    p.add_argument("--size", type=int, default=720, help="square image side in pixels (multiple of 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both models)")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best time is kept")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation: sdpa (default) or eager")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and image")
    main(**vars(p.parse_args()))

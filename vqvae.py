"""Emu3's vision tokenizer: a MoVQGAN-style VQ-VAE with causal temporal layers, plus image pre/post-processing.

Tracks the original BAAI code (emu3/tokenizer/modeling_emu3visionvq.py) and keeps its taming-style module names,
so an original Emu3-VisionTokenizer state dict loads with no renames (transformers' port is converted in convert.py).

encode: x (B,T,3,H,W) in [-1,1], T % 4 == 0 (an image (B,3,H,W) counts as 4 equal frames)
  -> per frame: conv_in -> down levels [ResnetBlock (+AttnBlock) ... Downsample] -> mid -> norm/swish/conv_out
     (B*T, 4, H/8, W/8)
  -> time: 2 x TemporalDownsample (T -> T/4) -> 2 x TemporalResnetBlock        (B, 4, T/4, H/8, W/8)
  -> quant_conv -> nearest codebook entry                                       codes (B, T/4, H/8, W/8)
decode: codes -> codebook (zq) and post_quant_conv(zq) (z), both (B, 4, T/4, h, w)
  -> time (z and zq stacked on batch): 2 x TemporalResnetBlock -> 2 x TemporalUpsample   (2B, 4, T, h, w)
  -> per frame: conv_in -> mid -> up levels [ResnetBlock (+AttnBlock) ... Upsample] -> norm/swish/conv_out,
     every norm a SpatialNorm conditioned on zq                                 x (B, T, 3, 8h, 8w)
An image runs the 2-D encoder once and the 2-D decoder on frame 0 only: a quarter of the reference's work, and the
same result (frames never mix in the 2-D layers) up to the last-bit rounding of batch-size-dependent conv kernels.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


@dataclass
class VQConfig:  # defaults = released BAAI/Emu3-VisionTokenizer; field names as in the original config.json
    codebook_size: int = 32768
    embed_dim: int = 4                  # code vector width
    z_channels: int = 4                 # latent width between the 2-D and the temporal layers
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 256
    ch_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (3,)      # level indices (not pixel sizes) that get attention after each res block
    temporal_downsample_factor: int = 4
    dropout: float = 0.0


VQ_TINY = VQConfig(codebook_size=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(1,))


def swish(x):
    return x * torch.sigmoid(x)  # written out (not F.silu) as in both references, for bitwise parity


def group_norm(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


# ---- temporal (3-D) layers, acting on (B, C, T, H, W) ----

class CausalConv3d(nn.Module):
    def __init__(self, cin, cout, kernel=(3, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        # spatial pad k - s per dim, split (more before, less after); F.pad order is (w, h, t)
        pad = ()
        for k, s in reversed(list(zip(kernel[1:], stride[1:]))):
            pad += ((k - s) // 2 + (k - s) % 2, (k - s) // 2)
        self.padding = pad + (2, 0)  # the reference pads time by 2 frames in front, whatever the kernel
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.padding))


class TemporalResnetBlock(nn.Module):
    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(c)  # eval mode: running statistics
        self.conv1 = CausalConv3d(c, c, (3, 3, 3))
        self.norm2 = nn.BatchNorm3d(c)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(c, c, (3, 3, 3))

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return x + h


class TemporalDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = CausalConv3d(c, c, (4, 3, 3), (2, 1, 1))  # T -> T/2 (front pad 2, kernel 4, stride 2)

    def forward(self, x):
        return self.conv(x)


class TemporalUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = CausalConv3d(c, c, (3, 3, 3))

    def forward(self, x):
        # nearest x2 in time, frames [f0, f0, f1, f1, ...]: the reference's 1-D interpolate copies exactly this
        return self.conv(x.repeat_interleave(2, dim=2))


# ---- 2-D layers, acting on (N, C, H, W) with N = batch * frames ----

class SpatialNorm(nn.Module):
    """MoVQ's norm: GroupNorm(x) * conv_y(zq) + conv_b(zq), zq nearest-resized to x's size."""

    def __init__(self, c, zq_ch):
        super().__init__()
        self.norm_layer = group_norm(c)
        self.conv_y = nn.Conv2d(zq_ch, c, 1)
        self.conv_b = nn.Conv2d(zq_ch, c, 1)

    def forward(self, x, zq):
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, zq_ch=None, dropout=0.0):
        super().__init__()
        # encoder: GroupNorm; decoder: SpatialNorm conditioned on the code vectors zq
        self.norm1 = group_norm(cin) if zq_ch is None else SpatialNorm(cin, zq_ch)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout) if zq_ch is None else SpatialNorm(cout, zq_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, zq=None):
        zq = () if zq is None else (zq,)
        h = self.conv1(swish(self.norm1(x, *zq)))
        h = self.conv2(self.dropout(swish(self.norm2(h, *zq))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as in the original."""

    def __init__(self, c, zq_ch=None):
        super().__init__()
        self.norm = group_norm(c) if zq_ch is None else SpatialNorm(c, zq_ch)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x, zq=None):
        n = self.norm(x, *(() if zq is None else (zq,)))
        b, c, h, w = x.shape
        q, k, v = (f(n).reshape(b, c, h * w) for f in (self.q, self.k, self.v))  # (B, C, HW)
        att = F.softmax(torch.bmm(q.transpose(1, 2), k) / c**0.5, dim=2)         # (B, HW queries, HW keys)
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(blocks, attn, resample_name=None, resample=None):
    # one resolution level, as a bare module so the keys read down.{l}.block.{j} / .attn.{j} / .downsample
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(m, resample_name, resample)
    return m


def middle(c, zq_ch, dropout):
    m = nn.Module()
    m.block_1 = ResnetBlock(c, c, zq_ch, dropout)
    m.attn_1 = AttnBlock(c, zq_ch)
    m.block_2 = ResnetBlock(c, c, zq_ch, dropout)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        n_levels, z = len(chs), cfg.z_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, c in enumerate(chs):
            blocks = [ResnetBlock(cin if j == 0 else c, c, None, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c) for _ in blocks] if i in cfg.attn_resolutions else []
            last = i == n_levels - 1
            self.down.append(level(blocks, attn, "downsample", None if last else Downsample(c)))
            cin = c
        self.mid = middle(cin, None, cfg.dropout)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, z, 3, padding=1)
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TemporalDownsample(z) for _ in range(n_time))
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(z, cfg.dropout) for _ in range(cfg.num_res_blocks)))

    def forward_2d(self, x):  # (N, 3, H, W) -> (N, z, H/8, W/8), every frame on its own
        h = self.conv_in(x)
        for lv in self.down:
            for j, block in enumerate(lv.block):
                h = block(h)
                if len(lv.attn):
                    h = lv.attn[j](h)
            if hasattr(lv, "downsample"):
                h = lv.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))

    def forward_time(self, h):  # (B, z, T, h, w) -> (B, z, T/4, h, w)
        for conv in self.time_conv:
            h = swish(conv(h))
        return self.time_res_stack(h)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        z, zq_ch = cfg.z_channels, cfg.embed_dim
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(z, cfg.dropout) for _ in range(cfg.num_res_blocks)))
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TemporalUpsample(z) for _ in range(n_time))
        cin = chs[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = middle(cin, zq_ch, cfg.dropout)
        # up[i] is level i (up[-1] runs first), as in taming's reversed build with insert(0, ...)
        up = []
        for i in reversed(range(len(chs))):
            c = chs[i]
            blocks = [ResnetBlock(cin if j == 0 else c, c, zq_ch, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c, zq_ch) for _ in blocks] if i in cfg.attn_resolutions else []
            up.insert(0, level(blocks, attn, "upsample", Upsample(c) if i != 0 else None))
            cin = c
        self.up = nn.ModuleList(up)
        self.norm_out = SpatialNorm(cin, zq_ch)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward_time(self, z_zq):  # (2B, z, T', h, w) -> (2B, z, 4T', h, w)
        # z and zq go through the same temporal layers stacked on the batch dim (safe: BatchNorm in eval mode)
        h = self.time_res_stack(z_zq)
        for conv in self.time_conv:
            h = swish(conv(h))
        return h

    def forward_2d(self, h, zq):  # (N, z, h, w), zq (N, embed_dim, h, w) -> (N, 3, 8h, 8w)
        h = self.conv_in(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, zq), zq), zq)
        for lv in reversed(self.up):
            for j, block in enumerate(lv.block):
                h = block(h, zq)
                if len(lv.attn):
                    h = lv.attn[j](h, zq)
            if hasattr(lv, "upsample"):
                h = lv.upsample(h)
        return self.conv_out(swish(self.norm_out(h, zq)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)

    def forward(self, z):  # (N, embed_dim) -> (N,) index of the nearest code
        z, e = z.float(), self.embedding.weight.float()  # fp32 search, as the reference
        # squared L2 by expansion, in the reference's operation order (cdist could flip near-ties)
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (z @ e.t())  # (N, codebook_size)
        return d.argmin(1)  # first index on ties


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_factor = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = CausalConv3d(cfg.z_channels, cfg.embed_dim)       # kernel (3,1,1) over time
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.z_channels)

    def encode(self, x):
        cfg, tf = self.cfg, self.cfg.temporal_downsample_factor
        if x.ndim not in (4, 5):
            raise ValueError(f"expected images (B,3,H,W) or video (B,T,3,H,W), got shape {tuple(x.shape)}")
        if x.shape[-3] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channels, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.spatial_factor:
            raise ValueError(f"image sides must be >= {self.spatial_factor} px, got {tuple(x.shape[-2:])}")
        if x.ndim == 5 and (x.shape[1] == 0 or x.shape[1] % tf):
            raise ValueError(f"number of frames must be a positive multiple of {tf}, got {x.shape[1]}")
        x = x.to(self.quant_conv.conv.weight.dtype)
        if x.ndim == 4:
            # an image is 4 equal frames: encode it once and repeat the latent (frames never mix in 2-D)
            h = self.encoder.forward_2d(x)                                # (B, z, h, w)
            h = h.unsqueeze(2).repeat(1, 1, tf, 1, 1)                     # (B, z, 4, h, w)
        else:
            b, t = x.shape[:2]
            h = self.encoder.forward_2d(x.flatten(0, 1))                  # (B*T, z, h, w)
            h = h.unflatten(0, (b, t)).transpose(1, 2)                    # (B, z, T, h, w)
        h = self.quant_conv(self.encoder.forward_time(h))                 # (B, embed_dim, T/4, h, w)
        b, c, t, hh, ww = h.shape
        codes = self.quantize(h.permute(0, 2, 3, 4, 1).reshape(-1, c)).view(b, t, hh, ww)
        return codes[:, 0] if x.ndim == 4 else codes

    def decode(self, codes):
        cfg = self.cfg
        if codes.ndim not in (3, 4) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes (B,h,w) or (B,T',h,w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {cfg.codebook_size}), got [{codes.min()}, {codes.max()}]")
        image = codes.ndim == 3
        c4 = codes.unsqueeze(1) if image else codes                       # (B, T', h, w)
        b, t, hh, ww = c4.shape
        zq = self.quantize.embedding(c4).permute(0, 1, 4, 2, 3)           # (B, T', embed_dim, h, w)
        z = self.post_quant_conv(zq.transpose(1, 2)).transpose(1, 2)      # (B, T', z, h, w)
        # stack on batch in (B, T', C, h, w) memory order, then view as (2B, C, T', h, w): the reference's layout,
        # which its BatchNorm kernel rounds differently from a contiguous tensor
        h, zq = self.decoder.forward_time(torch.cat([z, zq]).transpose(1, 2)).chunk(2)  # each (B, z, 4T', h, w)
        if image:
            h, zq = h[:, :, :1], zq[:, :, :1]  # the reference returns frame 0 of 4: decode only that one
        t = h.shape[2]
        h, zq = (a.transpose(1, 2).flatten(0, 1) for a in (h, zq))        # (B*T, z, h, w)
        x = self.decoder.forward_2d(h, zq).unflatten(0, (b, t))           # (B, T, 3, H, W)
        return x[:, 0] if image else x


# ---- image <-> tensor, matching transformers' Emu3ImageProcessor (mean = std = 0.5) ----

def smart_resize(height, width, factor=8, min_pixels=512 * 512, max_pixels=1024 * 1024):
    # the original's limits (transformers allows aspect ratios up to 200)
    if height < factor or width < factor:
        raise ValueError(f"image is {width}x{height}: both sides must be at least {factor} px")
    if max(height, width) / min(height, width) > 5:
        raise ValueError(f"image is {width}x{height}: aspect ratio must be at most 5")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python round: half to even
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image):
    # as transformers' convert_to_rgb: composite transparency onto white, else PIL's own conversion
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess(image, min_pixels=512 * 512, max_pixels=1024 * 1024, factor=8):
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    x = np.asarray(image.resize((w, h), Image.BICUBIC))                  # (H, W, 3) uint8, bicubic on uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)            # rescale in float64, then float32
    return (torch.from_numpy(x).permute(2, 0, 1) - 0.5) / 0.5            # (3, H, W) in [-1, 1]


def postprocess(x):
    x = (x.detach().float().cpu() + 1) / 2                               # (3, H, W) in ~[0, 1], float32
    x = (x.permute(1, 2, 0).double() * 255.0).float().numpy()            # the reference rescales in float64
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))              # clip, then truncate (not round)


def open_image(path):
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return image


# ---- command line: reconstruct an image or a video through the tokenizer ----

def main(ckpt, image, frames, out, device, min_pixels, max_pixels):
    from convert import load_vqvae
    if (image is None) == (not frames):
        raise ValueError("give exactly one of --image or --frames")
    # read the inputs first: a bad file fails before the model loads
    paths = [image] if image is not None else frames
    if frames and Path(frames[0]).is_dir():
        paths = sorted(p for p in Path(frames[0]).iterdir() if p.is_file())
    imgs = [open_image(p) for p in paths]
    for p, im in zip(paths, imgs):
        if im.size != imgs[0].size:
            raise ValueError(f"frame {p} is {im.width}x{im.height}, the first is {imgs[0].width}x{imgs[0].height}")
    model = load_vqvae(ckpt, device)
    tf = model.cfg.temporal_downsample_factor
    if frames and (not imgs or len(imgs) % tf):
        raise ValueError(f"got {len(imgs)} frames: need a positive multiple of {tf}")
    x = torch.stack([preprocess(im, min_pixels, max_pixels, model.spatial_factor) for im in imgs])  # (T, 3, H, W)
    x = x if image is not None else x[None]                               # image (1,3,H,W) or video (1,T,3,H,W)
    with torch.no_grad():
        codes = model.encode(x.to(device))
        recon = model.decode(codes)
    grid = "x".join(map(str, codes.shape[1:]))
    print(f"grid {grid} (frames x h x w)" if codes.ndim == 4 else f"grid {grid} (h x w)", f"tokens {codes.numel()}")
    if image is not None:
        postprocess(recon[0]).save(out)
        print(f"wrote {out}")
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(recon[0]):
            postprocess(frame).save(Path(out) / f"frame_{i:04d}.png")
        print(f"wrote {recon.shape[1]} frames to {out}/")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Tokenize an image or video with the Emu3 VQ-VAE and reconstruct it.")
    p.add_argument("--ckpt", required=True, help="our checkpoint dir, an Emu3-VisionTokenizer dir, or an -hf dir")
    p.add_argument("--image", default=None, help="input image file")
    p.add_argument("--frames", nargs="+", default=None, help="video: frame files (a multiple of 4) or one folder of them")
    p.add_argument("--out", default="recon.png", help="output image (image mode) or folder of frames (video mode)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--min-pixels", type=int, default=512 * 512, help="resize so H*W >= this")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="resize so H*W <= this")
    args = p.parse_args()
    try:
        main(**vars(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

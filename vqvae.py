"""Emu3's vision tokenizer: a MoVQGAN-style VQ-VAE with causal temporal layers, plus image pre/post-processing.

Tracks the original BAAI code (emu3/tokenizer/modeling_emu3visionvq.py) and keeps its taming-style module names,
so an original Emu3-VisionTokenizer state dict loads with no renames (transformers' port is converted in convert.py).

encode = quantize_latents(encode_latents(x)), as taming splits it:
  x (B,T,3,H,W) in [-1,1], T % 4 == 0 (an image (B,3,H,W) counts as 4 equal frames)
  -> per frame: conv_in -> down levels [ResnetBlock (+AttnBlock) ... Downsample] -> mid -> norm/swish/conv_out
     (B*T, 4, H/8, W/8)
  -> time: 2 x TemporalDownsample (T -> T/4) -> 2 x TemporalResnetBlock        (B, 4, T/4, H/8, W/8)
  -> quant_conv: latents z                                                      (B, 4, T/4, h, w)
  -> nearest codebook entry                                                     codes (B, T/4, h, w)
decode = decode_latents(code_vectors(codes)):
  codes -> codebook vectors zq, and post_quant_conv(zq), both (B, 4, T/4, h, w)
  -> time (both stacked on batch): 2 x TemporalResnetBlock -> 2 x TemporalUpsample   (2B, 4, T, h, w)
  -> per frame: conv_in -> mid -> up levels [ResnetBlock (+AttnBlock) ... Upsample] -> norm/swish/conv_out,
     every norm a SpatialNorm conditioned on zq                                 x (B, T, 3, 8h, 8w)
An image runs the 2-D encoder once and the 2-D decoder on frame 0 only: a quarter of the reference's work, and the
same result (frames never mix in the 2-D layers) up to the last-bit rounding of batch-size-dependent conv kernels.
Training (train.py) uses the same three steps, with a straight-through estimate between quantize and decode.

Images in and out (transformers' `models/emu3/image_processing_emu3.py`: Emu3ImageProcessor with the released
settings, which BAAI's `emu3/tokenizer/image_processing_emu3visionvq.py` matches):
  PIL image -> RGB -> smart_resize (multiples of 8, area within [min_pixels, max_pixels]) -> bicubic on uint8
  -> /255 in float64 -> (x - 0.5) / 0.5 -> (3, H, W) float32;  and back: (x + 1) / 2 * 255, clip, truncate.
"""
import math
from dataclasses import dataclass

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


@dataclass
class ImageConfig:  # how input images are prepared; defaults = the released preprocessor_config.json
    min_pixels: int = 512 * 512         # smart_resize keeps the area within [min_pixels, max_pixels]
    max_pixels: int = 1024 * 1024
    # transparent pixels: "drop" keeps the colour under the alpha (the original processor, whose transformers 4.44
    # convert_to_rgb was a plain convert("RGB"): the released weights were trained so), "white" composites onto
    # white (transformers 5). A converted checkpoint records its own reference's choice (configs.image_config).
    transparency: str = "drop"


def swish(x):
    return x * torch.sigmoid(x)  # written out (not F.silu) as in both references, for bitwise parity


class GroupNorm(nn.GroupNorm):
    """The encoder's norm. It takes (and ignores) the decoder's conditioning zq, so every block calls its norm
    as norm(x, zq) whether it is this or a SpatialNorm."""

    def __init__(self, c):
        super().__init__(num_groups=32, num_channels=c, eps=1e-6, affine=True)

    def forward(self, x, zq=None):
        return super().forward(x)


# ---- temporal (3-D) layers, acting on (B, C, T, H, W) ----

class CausalConv3d(nn.Module):
    def __init__(self, cin, cout, kernel=(3, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        _, kh, kw = kernel  # every spatial kernel is 1 or 3 with stride 1: "same" padding, kh // 2 on each side
        # F.pad order is (w_left, w_right, h_top, h_bottom, t_front, t_back); the reference pads time by 2 frames
        # in front, whatever the kernel
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, 2, 0)
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
        self.norm_layer = GroupNorm(c)
        self.conv_y = nn.Conv2d(zq_ch, c, 1)
        self.conv_b = nn.Conv2d(zq_ch, c, 1)

    def forward(self, x, zq):
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, zq_ch=None, dropout=0.0):
        super().__init__()
        # encoder: GroupNorm; decoder: SpatialNorm conditioned on the code vectors zq
        self.norm1 = GroupNorm(cin) if zq_ch is None else SpatialNorm(cin, zq_ch)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(cout) if zq_ch is None else SpatialNorm(cout, zq_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, zq=None):
        h = self.conv1(swish(self.norm1(x, zq)))
        h = self.conv2(self.dropout(swish(self.norm2(h, zq))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as in the original."""

    def __init__(self, c, zq_ch=None):
        super().__init__()
        self.norm = GroupNorm(c) if zq_ch is None else SpatialNorm(c, zq_ch)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x, zq=None):
        n = self.norm(x, zq)
        b, c, height, width = x.shape
        q, k, v = (f(n).reshape(b, c, height * width) for f in (self.q, self.k, self.v))  # (B, C, HW)
        att = F.softmax(torch.bmm(q.transpose(1, 2), k) / c**0.5, dim=2)                  # (B, HW queries, HW keys)
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, height, width)
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
        self.norm_out = GroupNorm(cin)
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

    def encode_latents(self, x):
        """x: images (B,3,H,W) or video (B,T,3,H,W) in [-1, 1] -> latents z (B, embed_dim, T/4, H/8, W/8), T = 4 for
        an image: what the quantizer rounds to the nearest code."""
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
        return self.quant_conv(self.encoder.forward_time(h))              # (B, embed_dim, T/4, h, w)

    def quantize_latents(self, z):
        """z (B, C, T', h, w) -> codes (B, T', h, w): the index of each position's nearest codebook vector."""
        b, c, t, height, width = z.shape
        return self.quantize(z.permute(0, 2, 3, 4, 1).reshape(-1, c)).view(b, t, height, width)

    def code_vectors(self, codes):
        """codes (B, T', h, w) -> their codebook vectors zq (B, embed_dim, T', h, w)."""
        return self.quantize.embedding(codes).permute(0, 4, 1, 2, 3)

    def decode_latents(self, zq, first_frame=False):
        """zq (B, embed_dim, T', h, w) -> pixels (B, 4T', 3, 8h, 8w); first_frame: only frame 0, (B, 1, 3, 8h, 8w)."""
        b = zq.shape[0]
        z = self.post_quant_conv(zq)                                      # (B, z, T', h, w)
        # z and zq go through the temporal layers stacked on batch in (B, T', C, h, w) memory order, viewed as
        # (2B, C, T', h, w): the reference's layout, which its BatchNorm kernel rounds differently from a contiguous one
        both = torch.cat([z.transpose(1, 2), zq.transpose(1, 2)]).transpose(1, 2)  # (2B, C, T', h, w)
        h, zq = self.decoder.forward_time(both).chunk(2)                  # each (B, z, 4T', h, w)
        if first_frame:
            h, zq = h[:, :, :1], zq[:, :, :1]
        t = h.shape[2]
        h, zq = (a.transpose(1, 2).flatten(0, 1) for a in (h, zq))        # (B*T, z, h, w)
        return self.decoder.forward_2d(h, zq).unflatten(0, (b, t))        # (B, T, 3, H, W)

    def encode(self, x):
        """images (B,3,H,W) -> codes (B, H/8, W/8); video (B,T,3,H,W) -> codes (B, T/4, H/8, W/8)."""
        codes = self.quantize_latents(self.encode_latents(x))
        return codes[:, 0] if x.ndim == 4 else codes

    def decode(self, codes):
        """codes (B,h,w) -> images (B,3,8h,8w); codes (B,T',h,w) -> video (B,4T',3,8h,8w)."""
        if codes.ndim not in (3, 4) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes (B,h,w) or (B,T',h,w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size}), got [{codes.min()}, {codes.max()}]")
        image = codes.ndim == 3
        # the reference decodes an image's 4 frames and returns frame 0: decode only that one
        x = self.decode_latents(self.code_vectors(codes.unsqueeze(1) if image else codes), first_frame=image)
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


def to_rgb(image, transparency="drop"):
    """Any PIL image -> RGB. A transparent one (an alpha band, or a palette or grey image with a transparent index):
    "white" composites it onto white, as transformers 5's convert_to_rgb does; "drop" keeps the colour under the
    alpha, as PIL's plain convert("RGB") does."""
    if transparency not in ("white", "drop"):
        raise ValueError(f"transparency must be 'white' or 'drop', got {transparency!r}")
    if transparency == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess(image, min_pixels=512 * 512, max_pixels=1024 * 1024, factor=8, transparency="drop"):
    """PIL image -> (3, H, W) float32 in [-1, 1], H and W multiples of factor (Emu3ImageProcessor.preprocess)."""
    image = to_rgb(image, transparency)
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    x = np.asarray(image.resize((width, height), Image.BICUBIC))         # (H, W, 3) uint8, bicubic on uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)            # rescale in float64, then float32
    return (torch.from_numpy(x).permute(2, 0, 1) - 0.5) / 0.5            # (3, H, W) in [-1, 1]


def postprocess(x):
    x = (x.detach().float().cpu() + 1) / 2                               # (3, H, W) in ~[0, 1], float32
    x = (x.permute(1, 2, 0).double() * 255.0).float().numpy()            # the reference rescales in float64
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))              # clip, then truncate (not round)

"""Emu3 text decoder: a Llama-style GQA transformer over one shared text + visual-token vocabulary.

Tracks the original BAAI `emu3/mllm/modeling_emu3.py` and transformers' `Emu3ForCausalLM` (reference §3, §4).
Images enter as ordinary token ids (VQ code k -> visual_offset + k), so this file knows nothing about pixels.

    tokens (B,T) -> embed (B,T,4096)
      -> 32 x [RMSNorm -> GQA attention (32 q / 8 kv heads of 128, RoPE, static KV cache) -> +residual
               RMSNorm -> SwiGLU MLP (4096 -> 14336 -> 4096)                                   -> +residual]
      -> RMSNorm -> lm_head -> logits (B,T,184622), returned in fp32

Numerics follow the references on purpose: RMSNorm computes in fp32 and casts back before the weight multiply,
RoPE tables are computed in fp32 from positions and cast to the activation dtype just before use, attention
softmax runs in fp32 (scaled_dot_product_attention), logits are upcast to fp32 like the original's `.float()`.
Dropout (p=0.1 in the reference config, active only in training) is left out.

One `forward(tokens, input_pos, pad)` serves training, prefill, chunked prefill and decode:
`input_pos` (T,) are the cache columns the tokens occupy, `pad` (B,) the left-padding columns of each row.
Row b sees key column j from query column c iff pad[b] <= j <= c, and its RoPE position for column c is c - pad[b].
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Emu3Config:
    # defaults = released Emu3-Gen (Emu3-Chat: max_seq_len 131072, image_area 262144)
    vocab_size: int = 184622  # 151643 BPE + 211 specials + 32768 visual tokens
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 9216
    image_area: int = 518400  # target pixel area of generated images (Gen 720*720)
    # special token ids (reference §4.1)
    pad_id: int = 151643  # <|endoftext|>
    eol_id: int = 151846  # <|extra_200|>, ends a row of visual tokens
    eof_id: int = 151847  # <|extra_201|>, ends a frame
    bos_id: int = 151849  # <|extra_203|>
    eos_id: int = 151850  # <|extra_204|>
    img_id: int = 151851  # <|image token|>, between the "h*w" size string and the grid
    boi_id: int = 151852  # <|image start|>
    eoi_id: int = 151853  # <|image end|>
    visual_offset: int = 151854  # code k <-> token visual_offset + k
    codebook_size: int = 32768

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# small model for tests and toy training; keeps the real vocabulary so token ids mean the same thing
EMU3_TINY = Emu3Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=4096)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # cast back BEFORE the weight multiply (Llama / Emu3 order; matters in bf16)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(pos, head_dim: int, theta: float, dtype):
    """pos (B,T) long -> cos, sin (B,1,T,head_dim) in `dtype`; tables computed in fp32 whatever the model dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim), half-split layout
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """x (B,H,T,hd): x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Static per-layer cache: k, v (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos (T,), k/v (B, n_kv_heads, T, head_dim) -> whole cache (B, n_kv_heads, max_len, head_dim)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache = None  # KVCache after Emu3.setup_cache

    def forward(self, x, cos, sin, mask, input_pos, kv_len=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, n_kv_heads, max_len, hd)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, n_kv_heads, S, hd) views: columns < kv_len only
        # GQA: query head h reads kv head h // (n_heads / n_kv_heads), as the references' repeat_kv does, but
        # enable_gqa does it without copying the cache 4x every step
        # mask (B,1,T,S) bool, True = attend; scale 1/sqrt(head_dim); softmax accumulates in fp32
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, n_heads, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos, kv_len=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.mlp(self.mlp_norm(x))


class Emu3(nn.Module):
    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from embed
        self.apply(self._init_weights)  # a no-op (and instant) when built on the meta device

    @staticmethod
    def _init_weights(m):
        # Llama-style init for training from scratch; loading a checkpoint overwrites it
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Give every layer a zeroed static KV cache (B, n_kv_heads, max_len, head_dim) on the model's device/dtype."""
        w = self.embed.weight
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, w.device, w.dtype)

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        """tokens (B,T) long -> fp32 logits (B,T,V), or (B,1,V) with last_only.

        input_pos (T,) long: cache columns of these tokens (default arange(T)).
        pad (B,) long: left-padding columns per row (default 0).
        kv_len: an int above every input_pos; attention reads only cache columns < kv_len (default: the whole
        cache). Columns past the last token are masked out anyway, so this changes no result, only how much of the
        cache each step reads; decode loops pass the position rounded up to a bucket (see sample.cache_len).
        vocab: a slice of token ids; logits only for those (a view of lm_head's rows, no copy). Image generation
        asks only for the ids its grid rule can allow, which skips most of lm_head.
        """
        B, T = tokens.shape
        dev = tokens.device
        if input_pos is None:
            input_pos = torch.arange(T, device=dev)
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=dev)
        cache = self.layers[0].attn.cache
        # key columns: the whole cache, or just these tokens when running uncached
        key_pos = torch.arange(kv_len or cache.k.shape[2], device=dev) if cache is not None else input_pos  # (S,)
        # row b, query column c sees key column j iff lo <= j <= c, lo = pad[b]; a padding query (c < pad[b])
        # sees only itself, so no softmax row is empty (its output is never used)
        lo = torch.minimum(pad[:, None], input_pos[None, :])  # (B, T)
        mask = (key_pos[None, None, :] <= input_pos[None, :, None]) & (key_pos[None, None, :] >= lo[:, :, None])
        mask = mask[:, None]  # (B, 1, T, S)

        x = self.embed(tokens)  # (B, T, dim)
        # RoPE position of column c in row b is c - pad[b]: every row starts at 0 at its first real token
        cos, sin = rope_cos_sin(input_pos[None, :] - pad[:, None], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, kv_len)
        if last_only:
            x = x[:, -1:]  # (B, 1, dim)
        head = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]  # (V or V', dim)
        return F.linear(self.norm(x), head).float()  # the original upcasts logits with .float()

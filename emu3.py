"""Emu3 text decoder: a Llama-style GQA transformer over one shared text + visual-token vocabulary.

Tracks the original BAAI code (baaivision/Emu3, `emu3/mllm/modeling_emu3.py`: Emu3Model, Emu3DecoderLayer) and
transformers' port (`models/emu3/modeling_emu3.py`: Emu3ForCausalLM), which compute the same thing.
Images enter as ordinary token ids (VQ code k -> visual_offset + k), so this file knows nothing about pixels.

    tokens (B,T) -> embed (B,T,4096)
      -> 32 x [RMSNorm -> GQA attention (32 q / 8 kv heads of 128, RoPE, static KV cache) -> +residual
               RMSNorm -> SwiGLU MLP (4096 -> 14336 -> 4096)                                   -> +residual]
      -> RMSNorm -> lm_head -> logits (B,T,184622), returned in fp32

Numerics follow the references on purpose: RMSNorm computes in fp32 and casts back before the weight multiply,
RoPE tables are computed once in fp32 on the CPU (as the original's cos/sin cache) and cast to the activation dtype
just before use, attention softmax runs in fp32 (scaled_dot_product_attention), logits are upcast to fp32 like the
original's `.float()`. Dropout (p=0.1 in the reference config, active only in training) is left out.

One `forward(tokens, input_pos, pad)` serves training, prefill, chunked prefill and decode, in two regimes: the
whole sequence (training; no cache), or tokens at cache columns `input_pos` (T,) (prefill chunks and decode steps).
`pad` (B,) gives the left-padding columns of each row: row b sees key column j from query column c iff
pad[b] <= j <= c (`attention_mask`), and its RoPE position for column c is c - pad[b]. Unpadded prompts need no
mask at all (causal attention aligned to the last token, which flash attention takes as is). A masked call never
passes enable_gqa, so that a fused kernel takes it on any GPU: it folds each kv head's query heads into the query
axis (`fold_heads`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


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
    # special token ids (the released tokenizer's: BAAI `emu3/mllm/tokenization_emu3.py`)
    pad_id: int = 151643  # <|endoftext|>
    eol_id: int = 151846  # <|extra_200|>, ends a row of visual tokens
    eof_id: int = 151847  # <|extra_201|>, ends a frame
    bos_id: int = 151849  # <|extra_203|>
    eos_id: int = 151850  # <|extra_204|>
    wrapper_id: int = 151851  # <|image token|> (transformers' image_wrapper_token): ends the "h*w" size string
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


def rope_table(n_positions: int, head_dim: int, theta: float):
    """cos, sin (n_positions, head_dim) in fp32, computed on the CPU: positions 0..n-1, half-split layout.

    Computed once (per cache size) and indexed by position, so eager and compiled steps, and every device, read
    the same values; the error of a recomputed cos grows with the position."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq  # (n, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B,H,T,hd): x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(input_pos, pad, keys):
    """(B, 1, T, S) bool, True = attend: row b's query at cache column c sees key column j iff pad[b] <= j <= c.
    input_pos (T,) query columns, pad (B,), keys (S,) key columns.

    For a row with pad = 2 and queries at columns 3, 4, 5 (x = attend):
        key column  0 1 2 3 4 5
        query 3     . . x x . .
        query 4     . . x x x .
        query 5     . . x x x x
    A padding query (c < pad[b]) sees only itself, so no softmax row is empty (its output is never used).
    """
    first = torch.minimum(pad[:, None], input_pos[None, :])                # (B, T): the first key each query sees
    mask = (keys <= input_pos[:, None]) & (keys >= first[:, :, None])      # (B, T, S)
    return mask[:, None]


class KVCache(nn.Module):
    """Static per-layer cache: k, v (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos (T,), k/v (B, n_kv_heads, T, head_dim) -> this batch's rows (B, n_kv_heads, max_len, head_dim);
        # views of the first B rows, so a cache kept from a larger batch serves a smaller one. index_copy_ writes
        # through the view whatever k's memory layout (k and v arrive as transposed views of the projections)
        ck, cv = self.k[: k.shape[0]], self.v[: k.shape[0]]
        ck.index_copy_(2, input_pos, k)
        cv.index_copy_(2, input_pos, v)
        return ck, cv


def fold_heads(q, n_kv_heads):
    """(B, n_heads, T, hd) -> (B, n_kv_heads, group*T, hd): the query heads that share a kv head, as one longer
    query axis (row g*T + t is head g of that group at token t).

    Why: a masked attention call with GQA (enable_gqa=True) is refused by both fused GPU kernels (flash takes no
    mask, memory-efficient no GQA) and falls to the math kernel, which copies K and V per query head in fp32.
    Folded, it is a plain multi-head call over the cache as it is, which every kernel takes. The mask is folded
    the same way (Emu3.forward)."""
    B, H, T, hd = q.shape
    return q.reshape(B, n_kv_heads, H // n_kv_heads * T, hd)


def unfold_heads(y, n_heads):
    """(B, n_kv_heads, group*T, hd) -> (B, n_heads, T, hd). reshape, not view: CUDA's fused kernels return their
    output as (B, T, H, hd) memory behind a (B, H, T, hd) view, which no view can regroup."""
    B, _, GT, hd = y.shape
    return y.reshape(B, n_heads, -1, hd)


class Attention(nn.Module):
    """GQA self-attention with RoPE. q, k and v come from one fused projection (wqkv: one GEMM); checkpoints keep
    the references' three matrices, and the two state-dict hooks below join and split them on the way in and out."""

    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        self.wqkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=False)  # rows: wq | wk | wv
        self.wo = nn.Linear(q_dim, cfg.dim, bias=False)
        self.cache = None  # KVCache after Emu3.setup_cache
        self.register_load_state_dict_pre_hook(join_weights("wqkv", ("wq", "wk", "wv")))
        self.register_state_dict_post_hook(split_weights("wqkv", ("wq", "wk", "wv")))

    def forward(self, x, cos, sin, mask, input_pos, kv_len=None):
        """x (B,T,dim) -> (B,T,dim). Without input_pos the tokens are the whole sequence and the cache is not
        touched; with it they are written at cache columns input_pos and attention reads the columns < kv_len.
        mask (B,1,group*T,S) bool, folded as the queries; None: causal, the last query seeing the last key."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, n_kv_heads, max_len, hd)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, n_kv_heads, S, hd) views: columns < kv_len only
        # scale 1/sqrt(head_dim), softmax accumulated in fp32; query head h reads kv head h // group, as the
        # references' repeat_kv does, without copying the cache
        if mask is None:  # query t sees keys <= S - T + t: flash takes it with GQA, and no mask is materialised
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, k.shape[2]), enable_gqa=True)
        else:
            y = unfold_heads(F.scaled_dot_product_attention(fold_heads(q, self.n_kv_heads), k, v, attn_mask=mask),
                             self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, n_heads * hd)


class MLP(nn.Module):
    """SwiGLU: w_down(silu(gate) * up), gate and up from one fused projection (w13, rows gate | up)."""

    def __init__(self, cfg: Emu3Config):
        super().__init__()
        self.split = [cfg.ffn_dim, cfg.ffn_dim]
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # rows: w_gate | w_up
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.register_load_state_dict_pre_hook(join_weights("w13", ("w_gate", "w_up")))
        self.register_state_dict_post_hook(split_weights("w13", ("w_gate", "w_up")))

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


def join_weights(fused, parts):
    """A load_state_dict pre-hook: the checkpoint's separate matrices (prefix + part + ".weight", and any other
    per-row tensor stored beside them under the same suffix) concatenated by rows under prefix + fused, as
    gpt-fast's load hook does. A state dict already fused passes as is."""
    def hook(module, state_dict, prefix, *args):
        first = f"{prefix}{parts[0]}."
        for suffix in [k[len(first):] for k in list(state_dict) if k.startswith(first)]:
            names = [f"{prefix}{p}.{suffix}" for p in parts]
            if all(n in state_dict for n in names):
                state_dict[f"{prefix}{fused}.{suffix}"] = torch.cat([state_dict.pop(n) for n in names])
    return hook


def split_weights(fused, parts):
    """A state_dict post-hook: the fused tensors back under the checkpoint's names (row slices by the module's
    `split`, read when it saves; no copy), so that a loaded model saves, converts and trains under the names of its
    checkpoint."""
    def hook(module, state_dict, prefix, local_metadata):
        first = f"{prefix}{fused}."
        for name in [k for k in list(state_dict) if k.startswith(first)]:
            for part, t in zip(parts, state_dict.pop(name).split(module.split)):
                state_dict[f"{prefix}{part}.{name[len(first):]}"] = t
    return hook


class Head(nn.Linear):
    """lm_head: logits for every id, or only for the ids of `rows` (a slice of the weight's rows: a view, no copy)."""

    def forward(self, x, rows=None):
        return F.linear(x, self.weight if rows is None else self.weight[rows])


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
        self.lm_head = Head(cfg.dim, cfg.vocab_size, bias=False)  # untied from embed
        self.rope = None  # (cos, sin) fp32 tables, see rope_for
        self.apply(self._init_weights)  # a no-op (and instant) when built on the meta device

    @staticmethod
    def _init_weights(m):
        # Llama-style init for training from scratch; loading a checkpoint overwrites it
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Static KV caches (batch_size, n_kv_heads, max_len, head_dim), zeroed, on the model's device and dtype, and
        the RoPE table for max_len positions. Kept between calls: a call that needs no more rows or columns than
        the present cache reuses it (its storage, and so any CUDA graph recorded over it); columns left from an
        earlier call are finite and masked out."""
        w, cache = self.norm.weight, self.layers[0].attn.cache  # the activations' device and dtype
        if (cache is not None and cache.k.shape[0] >= batch_size and cache.k.shape[2] >= max_len
                and cache.k.device == w.device and cache.k.dtype == w.dtype):
            return
        for layer in self.layers:
            layer.attn.cache = None  # free the old cache before the new one is allocated
        for layer in self.layers:
            a = layer.attn  # the layer's own kv heads and head size, which need not be the config's
            a.cache = KVCache(batch_size, max_len, a.n_kv_heads, a.head_dim, w.device, w.dtype)
        self.rope_for(max_len, w.device)

    def clear_cache(self) -> None:
        """Free the KV caches and the RoPE table; the next setup_cache allocates them again."""
        for layer in self.layers:
            layer.attn.cache = None
        self.rope = None

    def rope_for(self, n_positions, device):
        """The fp32 RoPE table (cos, sin), each (>= n_positions, head_dim) on device, built on the CPU when missing
        or too short. A plain attribute, not a buffer, so that model.to(bf16) cannot round it."""
        if self.rope is None or self.rope[0].shape[0] < n_positions or self.rope[0].device != device:
            n = max(n_positions, 0 if self.rope is None else self.rope[0].shape[0])
            self.rope = tuple(t.to(device) for t in rope_table(n, self.cfg.head_dim, self.cfg.rope_theta))
        return self.rope

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        """tokens (B,T) long -> fp32 logits (B,T,V), or (B,1,V) with last_only. Two regimes:

        whole sequence (input_pos None): the tokens are columns 0..T-1 of each row, attended causally. The KV
            cache, if one is set up, is neither read nor written (training, probes, parity tests).
        cache (input_pos (T,) long: the cache columns these tokens occupy): their keys and values are written into
            the cache, and attention reads its columns < kv_len (an int above every input_pos; default: all).
        pad (B,) long: left-padding columns per row. With pad, a mask (attention_mask) hides the padding and the
        columns not yet written, and kv_len (default: all) only bounds how much of the cache a step reads (decode
        loops pass the position rounded up to a bucket, generate.cache_len). Without pad, no mask is built:
        attention is causal aligned to the end, the last query seeing column kv_len - 1 (default: the last
        input_pos, read back from the device), which fused kernels take as is (unpadded prefill chunks).
        vocab: a slice of token ids; logits only for those (a view of lm_head's rows, no copy). Image generation
        asks only for the ids its grid rule can allow, which skips most of lm_head.
        """
        B, T = tokens.shape
        dev = tokens.device
        cached = input_pos is not None
        cols = input_pos if cached else torch.arange(T, device=dev)  # (T,) the columns of these tokens
        if pad is None:
            mask = None
            if cached and kv_len is None:  # keys: every column up to the last input_pos (a host read)
                kv_len = int(input_pos[-1]) + 1
        else:
            S = (kv_len or self.layers[0].attn.cache.k.shape[2]) if cached else T
            group = self.cfg.n_heads // self.cfg.n_kv_heads
            # one mask row per query head of a kv head, as Attention folds the queries (fold_heads): (B,1,group*T,S)
            mask = attention_mask(cols, pad, torch.arange(S, device=dev)).repeat(1, 1, group, 1)
        # RoPE position of column c in row b is c - pad[b]: every row starts at 0 at its first real token
        pos = cols[None] if pad is None else (cols[None, :] - pad[:, None]).clamp(min=0)  # (1 or B, T)
        cos, sin = self.rope_for(self.layers[0].attn.cache.k.shape[2] if cached else T, dev)  # (n, head_dim) fp32

        x = self.embed(tokens)  # (B, T, dim)
        cos, sin = cos[pos].to(x.dtype)[:, None], sin[pos].to(x.dtype)[:, None]  # (1 or B, 1, T, head_dim)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, kv_len)
        if last_only:
            x = x[:, -1:]  # (B, 1, dim)
        return self.lm_head(self.norm(x), vocab).float()  # (B, T, V or V'); the original upcasts with .float()

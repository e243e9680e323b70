"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the decoder's projections, for fine-tuning on one GPU.

Each nn.Linear of a decoder block (attention wqkv and wo, MLP w13 and w_down) is wrapped: its weight W (out, in) is
frozen and a trainable product B A is added beside it, A (r, in) drawn as nn.Linear draws its weights, B (out, r)
zero, so training starts from the checkpoint's own function:

    x (..., in) -> W x + scale * B (A x)       scale = alpha / r
    merged:        (W + scale * B A) x         one plain nn.Linear again: the checkpoint format has no adapters

Embeddings, norms and lm_head stay frozen. Everything trainable is in A and B: r (in + out) numbers per projection,
about 0.3% of the 8.5B's weights at r = 16. The model files know nothing of this: `add` swaps modules in place, and `merge_state`
folds the adapters of the gathered parameters into plain weights, which checkpoint.save writes as usual.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("wqkv", "wo", "w13", "w_down")  # every projection of a block (emu3.Attention and emu3.MLP)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        w = base.weight
        # adapters in fp32 whatever the base's dtype: a bf16 base on a GPU, fp32 updates
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as peft does

    def forward(self, x):
        # (..., in) -> (..., out); the adapter path computes in fp32 and joins in x's dtype
        delta = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return self.base(x) + delta.to(x.dtype)


def add(model, rank, alpha):
    """Freeze every weight of `model` (an emu3.Emu3), wrap each block projection in a LoRALinear, in place;
    returns the model, whose trainable parameters are now the adapters only."""
    if rank < 1:
        raise ValueError(f"--lora must be at least 1, got {rank}")
    model.requires_grad_(False)
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name in TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_state(params, scale):
    """{parameter name: tensor} of an adapted model -> the same with each "P.base.weight", "P.lora_a", "P.lora_b"
    folded into "P.weight" (W + scale * B A, computed in fp32, stored in W's dtype): a plain Emu3's parameters."""
    out = {}
    for name, t in params.items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        if name.endswith(".base.weight"):
            p = name[: -len("base.weight")]
            t = (t.float() + (params[p + "lora_b"].float() @ params[p + "lora_a"].float()) * scale).to(t.dtype)
            name = p + "weight"
        out[name] = t
    return out

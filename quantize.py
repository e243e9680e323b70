"""Weight-only int8 for the decoder: every matrix stored as int8 with one fp scale per output row, run in the
activation dtype. Tracks gpt-fast (pytorch-labs/gpt-fast, `quantize.py`: `dynamically_quantize_per_channel`,
`WeightOnlyInt8Linear`) and torchao's `Int8WeightOnlyConfig`, which compute the same thing; unlike gpt-fast, the
embedding is quantized too (at the 8.5B shape the embedding and lm_head are 1.5B of the 8.5B parameters).

    w (out, in) float -> scale (out,) = max |w[r]| / 127.5, q (out, in) int8 = clamp(round(w / scale), -128, 127)
    Int8Linear:    x (..., in) -> F.linear(x, q.to(x.dtype)) * scale -> (..., out)
    Int8Embedding: tokens (...) -> q[tokens].to(dtype) * scale[tokens, None] -> (..., dim)

On a GPU, torch.compile fuses `F.linear(x, q.to(x.dtype)) * scale` into one GEMM that reads the int8 weight (half
the bytes of bf16, which is what a decode step waits for); run eagerly, `.to()` first writes a bf16 copy of each
weight, so the eager path is for correctness, --compile for speed. On a CPU in bf16, decode-sized inputs (at most
PACK_ROWS rows) go through torch._weight_int8pack_mm instead, measured faster there (bench/bench_int8.py).

Two ways in, one rule (`quantize_rows`): `int8(model)` replaces the modules of a loaded model; `int8_tensors`
quantizes a stream of checkpoint tensors (convert.py --int8, and loading a float checkpoint with --int8), so that
no float copy of the whole decoder is ever held. A quantized matrix saves as NAME.weight (int8) + NAME.scale (fp32
on disk, the model's dtype once loaded). RMSNorm weights, the KV cache and the logits stay in the model's dtype;
the VQ-VAE is never quantized.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_ROWS = 16  # CPU bf16: _weight_int8pack_mm costs per row; up to 16 rows it beats dequantising (bench_int8.py)
CHUNK = 4096  # rows quantized at a time: temporaries stay a few MB even for the 184622-row lm_head


@torch.no_grad()
def quantize_rows(w):
    """w (out, in) float -> (q (out, in) int8, scale (out,) fp32): symmetric, one scale per output row, computed in
    fp32 (gpt-fast's rule: the largest |w| of the row maps to 127.5, so -128 is reachable and +127 clamps)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for a in range(0, w.shape[0], CHUNK):
        rows = w[a:a + CHUNK].float()  # (chunk, in)
        s = (rows.abs().amax(1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)  # an all-zero row: scale eps
        q[a:a + CHUNK] = (rows / s[:, None]).round().clamp(-128, 127).to(torch.int8)
        scale[a:a + CHUNK] = s
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free nn.Linear stored as int8 rows and their scales. `rows` (a slice) computes only those outputs,
    as emu3.Head does for lm_head's grid window."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,), cast with the model (.to(dtype))

    def forward(self, x, rows=None):
        q, s = (self.weight, self.scale) if rows is None else (self.weight[rows], self.scale[rows])
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= PACK_ROWS * x.shape[-1]:
            return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, s).view(*x.shape[:-1], -1)
        return F.linear(x, q.to(x.dtype)) * s  # (..., out): the product torch.compile fuses into one GEMM


class Int8Embedding(nn.Module):
    """nn.Embedding stored as int8 rows (one per token) and their scales; looked-up rows come out in the scale's
    dtype, the model's."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("weight", q)  # (vocab, dim) int8
        self.register_buffer("scale", scale)  # (vocab,)

    def forward(self, tokens):
        return F.embedding(tokens, self.weight).to(self.scale.dtype) * self.scale[tokens][..., None]  # (..., dim)


@torch.no_grad()
def int8(model):
    """Quantize a loaded decoder in place: every nn.Linear (emu3.Head included) and nn.Embedding becomes its int8
    twin, one module at a time (the float matrix is freed as its replacement arrives). On the meta device this
    gives the int8 model's structure, which checkpoint.py loads an int8 checkpoint into. Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, nn.Embedding)):
                q, scale = quantize_rows(child.weight)
                kind = Int8Embedding if isinstance(child, nn.Embedding) else Int8Linear
                setattr(module, name, kind(q, scale.to(child.weight.dtype)))
    return model


def is_int8(model):
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def int8_tensors(tensors):
    """(name, tensor) pairs of a decoder checkpoint -> the same with every float matrix quantized: "X.weight" (out,
    in) becomes "X.weight" int8 and "X.scale" (out,) fp32. 1-D tensors (norms) and int8 ones pass as they are, so
    an int8 stream passes unchanged. One tensor at a time: the stream never holds two float matrices."""
    for name, t in tensors:
        if t.ndim == 2 and t.is_floating_point():
            if not name.endswith(".weight"):
                raise ValueError(f"cannot quantize {name!r}: a matrix that is not a .weight")
            q, scale = quantize_rows(t)
            del t  # a float matrix read from disk is freed before the next one is read
            yield name, q
            yield name.removesuffix("weight") + "scale", scale
        else:
            yield name, t

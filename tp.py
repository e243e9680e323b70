"""Several processes under torchrun: tensor parallel (one decoder split over N processes, --tp) and data parallel
(N whole decoders, the prompts shared out). Tracks gpt-fast (pytorch-labs/gpt-fast, `tp.py`: `_apply_tp_linear`,
`_apply_tp_attn`, `_apply_tp_ffn`), with the all-reduce over the whole output (gpt-fast's attention hook reduces
`output[0]`, right only at batch 1; CFG runs 2B rows) and the embedding and lm_head split too.

Tensor parallel, process r of N (NCCL on CUDA, gloo on a CPU), every block:
    x (B,T,dim), the same on every process
    attn: wqkv rows [q_r | k_r | v_r] (n_heads/N query heads, n_kv_heads/N kv heads: GQA groups stay whole)
          -> attention over its heads (B,T,dim/N) -> wo columns r -> partial (B,T,dim) -> all-reduce (sum)
    mlp:  w13 rows [gate_r | up_r] -> silu(gate) * up (B,T,ffn/N) -> w_down columns r -> partial -> all-reduce
    embed:   columns r of every row -> (B,T,dim/N), placed in its columns of zeros -> all-reduce = the embedding
    lm_head: x[..., columns r] @ columns r of every row -> partial logits (B,T,V') -> all-reduce
The embedding and lm_head are split by the hidden dimension, not by vocabulary: 184622 = 2 x 92311 splits evenly
over 2 processes only, the grid window (a slice of lm_head's rows) is the same slice on every process, and each
holds 1/N of the two 1.5 GB (bf16) matrices instead of both whole. Every collective is an all-reduce from
torch.distributed._functional_collectives, which torch.compile traces into the graph. Int8 matrices (quantize.py)
split the same way: a row split takes its rows' scales, a column split keeps every scale (they are per row).

Two ways in, one rule (`ROWS`, `COLS`): `shard(model, ...)` splits a loaded model; `shard_tensors` splits a stream
of checkpoint tensors as it is read, so that no process holds the whole decoder (checkpoint.build_emu3).

Data parallel: process r takes the prompts share(n, r, N) (a contiguous block, so image k keeps seed + k) and
writes its own files; `gather` brings the answers to every process in prompt order, and the first one prints.
"""
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

# checkpoint names: split by output rows (weight and scale), or by input columns (weight; its scale stays whole)
ROWS = re.compile(r"layers\.\d+\.(attn\.w[qkv]|mlp\.w_(gate|up))\.(weight|scale)")
COLS = re.compile(r"(layers\.\d+\.(attn\.wo|mlp\.w_down)|embed|lm_head)\.weight")


# ---- processes ----

def launched():
    """True in a process started by torchrun (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_world():
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if launched() else (0, 1)


def first():
    """Whether this process prints and writes what one process would (rank 0, or not under torchrun)."""
    return rank_world()[0] == 0


def device_for(device):
    """The device (name) of this process: under torchrun, "cuda" is cuda:LOCAL_RANK (one GPU per process); anything
    else passes as it is, to be checked by checkpoint.parse_device."""
    if not launched() or not str(device).startswith("cuda"):
        return device
    local = os.environ["LOCAL_RANK"]
    if str(device) not in ("cuda", f"cuda:{local}"):
        raise ValueError(f"under torchrun give --device cuda, not {device}: process k takes cuda:LOCAL_RANK")
    return f"cuda:{local}"


def start(device):
    """Join torchrun's process group (NCCL for CUDA, gloo for a CPU), once; device: this process's (device_for)."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)


def finish():
    """Leave the process group, if this process joined one. Every torchrun process calls it before exiting: gloo's
    worker threads still alive at interpreter exit abort the process ("terminate called without an active
    exception", SIGABRT, now and then), and NCCL asks for it too (torch.distributed's "Shutdown" docs)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(device, cfg, tensor_parallel):
    """Before a decoder loads on `device`: a one-line error for --tp outside torchrun or a model that does not split,
    then torchrun's process group joined (tensor and data parallel both need it). Returns shard = (rank, world) for
    tensor parallel, None otherwise. Calling it again changes nothing."""
    if tensor_parallel and not launched():
        raise ValueError("--tp needs torchrun: torchrun --nproc-per-node N sample.py ... --tp")
    if tensor_parallel and cfg is not None:
        check(cfg, rank_world()[1])
    if launched():
        start(torch.device(device))
    return rank_world() if tensor_parallel else None


def check(cfg, world):
    """A one-line error unless the model splits evenly over `world` processes (before anything loads)."""
    for name, n in (("kv heads", cfg.n_kv_heads), ("query heads", cfg.n_heads), ("MLP width", cfg.ffn_dim),
                    ("width", cfg.dim)):
        if n % world:
            raise ValueError(f"--tp over {world} processes: the model's {n} {name} do not split into {world} "
                             f"equal parts")


# ---- tensor parallel: the split ----

def rows_of(t, sizes, rank, world):
    """t (out, ...) whose rows are blocks of `sizes` (q | k | v, or gate | up) -> this rank's 1/world of every
    block, concatenated (a copy): each block splits alone, so q head j stays with its kv head."""
    return torch.cat([b.chunk(world)[rank] for b in t.split(sizes)])


def cols_of(t, rank, world):
    """t (out, in) -> this rank's in/world columns (a contiguous copy)."""
    return t.chunk(world, 1)[rank].contiguous()


def shard_tensors(tensors, rank, world):
    """(name, tensor) pairs of a decoder checkpoint -> this rank's part of each (ROWS, COLS; the rest whole)."""
    for name, t in tensors:
        if ROWS.fullmatch(name):
            t = rows_of(t, [t.shape[0]], rank, world)
        elif COLS.fullmatch(name):
            t = cols_of(t, rank, world)
        yield name, t


def replace(module, name, t):
    """module.<name> = t, a parameter staying a parameter (frozen), a buffer a buffer."""
    if isinstance(getattr(module, name), nn.Parameter):
        t = nn.Parameter(t, requires_grad=False)
    setattr(module, name, t)


def split_rows(m, sizes, rank, world):
    for name in ("weight", "scale"):  # an int8 matrix's scales are per output row: they go with their rows
        if hasattr(m, name):
            replace(m, name, rows_of(getattr(m, name), sizes, rank, world))


def split_cols(m, rank, world):
    replace(m, "weight", cols_of(m.weight, rank, world))  # per-row scales, if any, stay whole


def all_reduce(t, group):
    """The sum over processes, waited for: the result is a plain tensor even where nothing reads it (the logits)."""
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def all_reduce_output(group):
    return lambda module, args, out: all_reduce(out, group)


def shard(model, rank, world, group=None):
    """Split a loaded emu3.Emu3 (float or int8) in place into process `rank`'s part of `world`, with the all-reduces
    as forward hooks (group None: the default process group). On the meta device this gives the structure that
    checkpoint.build_emu3 loads a stream of shard_tensors into. Returns the model."""
    check(model.cfg, world)
    group = group or dist.group.WORLD
    for layer in model.layers:
        a, mlp = layer.attn, layer.mlp
        split_rows(a.wqkv, a.split, rank, world)
        a.split = [n // world for n in a.split]  # rows of q | k | v here (the state-dict hook splits by it)
        a.n_heads, a.n_kv_heads = a.n_heads // world, a.n_kv_heads // world
        split_rows(mlp.w13, mlp.split, rank, world)
        mlp.split = [n // world for n in mlp.split]
        for m in (a.wo, mlp.w_down):  # partial sums over this rank's heads / MLP columns
            split_cols(m, rank, world)
            m.register_forward_hook(all_reduce_output(group))
    width = model.cfg.dim // world
    split_cols(model.embed, rank, world)
    # (B,T,width) in columns rank*width.. of zeros: the sum over ranks is the whole embedding, exactly
    model.embed.register_forward_hook(lambda module, args, out: all_reduce(
        F.pad(out, (rank * width, (world - 1 - rank) * width)), group))
    split_cols(model.lm_head, rank, world)
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0].narrow(-1, rank * width, width),) + args[1:])
    model.lm_head.register_forward_hook(all_reduce_output(group))
    return model


# ---- data parallel ----

def share(n, rank, world):
    """(lo, hi): the block of n prompts that process `rank` of `world` takes; the first n % world take one more."""
    lo = rank * (n // world) + min(rank, n % world)
    return lo, lo + n // world + (rank < n % world)


def gather(items):
    """Every process's list -> their concatenation in rank order, on every process (one list when not launched)."""
    if not launched():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]

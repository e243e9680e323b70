"""What fine-tuning adds to the toy's training (train.py, `python train.py finetune`): the examples, read from a JSONL
file and checked line by line, and the processes: FSDP2 over torchrun's processes, and training state gathered
into one file and restored from it.

    FILE.jsonl, one example a line, image paths relative to the file:
      {"prompt": TEXT, "image": PATH}                      generation: the image tokens are learnt
      {"image": PATH, "question": TEXT, "answer": TEXT}    chat, the original template ("image" may be left out)
      {"messages": [...]}                                  chat, transformers' format (`sample.py chat --messages`),
                                                           ending with the assistant's answer

    read_examples -> [Example]     every line parsed and checked, every image file found, before a model loads
    start -> Processes             torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on a CPU, NCCL on GPUs
    shard(model)                   fully_shard on each block, then the root (torchtitan's pattern); bf16 compute
                                   with fp32 gradient reduction on GPUs (MixedPrecisionPolicy), fp32 on a CPU
    gather / save_state / restore  full tensors from the shards (rank 0 keeps them), and back
"""
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import prompts

# the keys of each kind of line (chat's "image" is optional: a question about no image)
KEYS = {"generation": ("prompt", "image"), "chat": ("image", "question", "answer"), "messages": ("messages",)}


@dataclass
class Example:
    line: int                 # 1-based line number in the file, for messages
    kind: str                 # "generation" | "chat" | "messages"
    text: str = ""            # the caption (generation) or the question (chat)
    answer: str = ""          # chat and messages: what the model learns to say
    images: list = field(default_factory=list)    # absolute image paths, in prompt order
    messages: list = None     # messages: the conversation before the answer, image parts holding absolute paths


def read_examples(path):
    """FILE.jsonl -> [Example]; a one-line ValueError naming FILE:LINE for the first bad line, or for an empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path}")
    folder = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():  # blank lines are allowed (a trailing newline, a separator)
                examples.append(parse_example(line, n, f"{path}:{n}", folder))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def parse_example(line, n, where, folder):
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    kind = "messages" if "messages" in ex else "generation" if "prompt" in ex else "chat"
    unknown = [k for k in ex if k not in KEYS[kind]]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} in a {kind} example (its keys: "
                         f"{', '.join(KEYS[kind])})")
    if kind == "messages":
        return messages_example(ex["messages"], n, where, folder)
    needed = ("prompt", "image") if kind == "generation" else ("question", "answer")
    for k in needed:
        if k not in ex:
            raise ValueError(f"{where}: a {kind} example needs {' and '.join(needed)}; {k!r} is missing "
                             f"(a line is one of {{\"prompt\", \"image\"}}, {{\"image\", \"question\", \"answer\"}}, "
                             f"{{\"messages\"}})")
    for k, v in ex.items():
        if not isinstance(v, str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"{where}: empty {k}")
    images = [image_path(ex["image"], where, folder)] if "image" in ex else []
    text = ex["prompt"] if kind == "generation" else ex["question"]
    return Example(n, kind, text, ex.get("answer", ""), images)


def messages_example(conv, n, where, folder):
    """A conversation whose last message is the assistant's answer (text only): the rest is the prompt."""
    conv = prompts.check_messages(conv, where)
    *before, last = conv
    if last["role"] != "assistant" or not before:
        raise ValueError(f"{where}: the last message must be the assistant's answer, after the conversation")
    if any(p["type"] != "text" for p in last["content"]):
        raise ValueError(f"{where}: the assistant's answer must be text only")
    answer = " ".join(p["text"] for p in last["content"])  # the -hf template joins text parts with spaces
    if not answer.strip():
        raise ValueError(f"{where}: empty answer")
    images = []
    for msg in before:
        for part in msg["content"]:
            if part["type"] == "image":
                if set(part) != {"type", "path"} or not isinstance(part["path"], str):
                    raise ValueError(f'{where}: an image part is {{"type": "image", "path": PATH}}, got {part!r}')
                part["path"] = image_path(part["path"], where, folder)
                images.append(part["path"])
    return Example(n, "messages", answer=answer, images=images, messages=before)


def image_path(path, where, folder):
    full = os.path.join(folder, path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{where}: no image file {full}")
    return full


# ---- processes ----

@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def sharded(self):
        return dist.is_initialized()


def start(device):
    """Under torchrun (WORLD_SIZE set): join the process group (NCCL for cuda, gloo for cpu), one GPU per process
    (cuda:LOCAL_RANK). Otherwise one process on `device`."""
    if "WORLD_SIZE" not in os.environ:
        return Processes(0, 1, torch.device(device))
    if device.startswith("cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def stop(procs):
    if procs.sharded:
        dist.destroy_process_group()


def shard(model, procs):
    """FSDP2: each block's parameters (and then the rest: embed, norm, lm_head) split across the processes, gathered
    block by block for each forward and backward. On GPUs the blocks compute in bf16 and gradients are reduced in
    fp32; the sharded fp32 parameters stay the master weights."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if procs.device.type == "cuda" else MixedPrecisionPolicy())
    mesh = init_device_mesh(procs.device.type, (procs.world,))  # named: a CPU run on a GPU machine stays on the CPU
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def reshard(model):
    """After forwards without a backward (an evaluation): FSDP2 leaves the root's parameters (embed, norm, lm_head)
    gathered after a forward, since a backward usually follows at once; put them back into shards, or the next
    training step starts from that gathered copy and its gradients are not reduced as they should be."""
    if isinstance(model, FSDPModule):
        model.reshard()


def mean_over_processes(x):
    """A scalar tensor's mean over the processes (the loss each one computed on its rows of the batch)."""
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)  # a sum: gloo has no average
        x /= dist.get_world_size()
    return x


def full(t):
    """A parameter or optimizer tensor -> the whole tensor on the CPU (a sharded one gathered: every process calls)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t.detach()).cpu()


def like(t, p):
    """A whole tensor -> shaped as parameter p is held here (this process's shard of it, on its device)."""
    if isinstance(p, DTensor):
        return distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return t.to(p.device)


def gather(model, trainable_only=False):
    """{parameter name: whole tensor on the CPU}, our fused names (wqkv, w13); every process must call it."""
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


def save_state(path, model, opt, step, record):
    """The trainable parameters, AdamW's moments (keyed by parameter name) and the step, gathered into one file by
    rank 0 (written beside it, then renamed: a kill mid-write leaves the previous state)."""
    names = {p: n for n, p in model.named_parameters()}
    moments = {names[p]: {k: full(v) for k, v in s.items()} for p, s in opt.state.items()}
    state = {"params": gather(model, trainable_only=True), "moments": moments, "step": step, "record": record}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()


def restore(path, model, opt, record):
    """Load save_state's file into the model and its optimizer (each process its shards) -> the step it reached.
    A state written by a run with other settings is refused, naming the first difference."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    for k, v in (record or {}).items():
        if state["record"].get(k) != v:
            raise ValueError(f"{path} was written by a run with {k} = {state['record'].get(k)!r}, not {v!r}: "
                             f"resume with the same settings, or delete it")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if state["params"].keys() != named.keys():
        raise ValueError(f"{path} holds other parameters than this model trains")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(like(state["params"][n].to(p.dtype), p))
            # AdamW's step count is a plain scalar tensor; the moments are shaped like the parameter
            opt.state[p] = {k: v if v.ndim == 0 else like(v, p) for k, v in state["moments"][n].items()}
    return state["step"]

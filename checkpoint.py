"""Our checkpoint directory: written in one place (`save`, used by convert.py and train.py), read strictly.

    DIR/config.json                       {"emu3": Emu3Config fields, "vqvae": VQConfig fields,
                                           "image": ImageConfig fields (input images: pixel limits, transparency),
                                           "source": what it was converted from and which fields were checked,
                                           "training": what a toy was trained on (its image grid),
                                           "quantization": "int8" when the matrices are stored as int8}
    DIR/model-0000k-of-0000N.safetensors  decoder weights, our names (emu3.py's state dict), any float dtype; int8:
                                          every matrix NAME.weight int8 + NAME.scale fp32 (quantize.py)
    DIR/vqvae.safetensors                 VQ-VAE weights, the original taming-style names, fp32
    DIR/tokenizer.json                    a `tokenizers` file, every special and visual token at its reference id

Loading builds the model on the meta device, memory-maps the safetensors and loads strictly (`assign=True`, then
one `.to(device, dtype)`): a missing, extra, misshapen or repeated tensor, an unknown config field, or a broken file
is a one-line ValueError naming it. Reading the released formats (original BAAI, transformers "-hf") is convert.py's
job; it reuses the helpers here.
"""
import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import quantize
import tp
from emu3 import Emu3, Emu3Config
from tokenizer import load_tokenizer
from vqvae import VQVAE, ImageConfig, VQConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SECTIONS = {"emu3": Emu3Config, "vqvae": VQConfig, "image": ImageConfig}
OTHER_SECTIONS = ("source", "training")  # records, read by people and logs, not by the models
QUANTIZATIONS = ("int8",)  # the "quantization" entry: how the decoder's matrices are stored (quantize.py)
RENAMED = {"img_id": "wrapper_id"}  # fields of directories written by earlier versions


# ---- small checks shared by every loader ----

def parse_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def parse_device(device):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    try:
        torch.empty(0, device=device)  # e.g. "cuda" or "mps" on a machine without one
    except (RuntimeError, AssertionError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {str(device)!r} is not available here: {first_line}") from None
    return device


def read_json(file):
    """A JSON file -> its value; a missing file is FileNotFoundError, a malformed one a ValueError naming it."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {os.path.basename(file)} in {os.path.dirname(file) or '.'}")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def checkpoint_dir(path):
    """Check that `path` is a directory; the same message from every command."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    return path


def shapes_of(model_cls, cfg):
    """{key: shape} of model_cls(cfg)'s state dict, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_cls(cfg).state_dict().items()}


def check_tensors(sd, want, what, names=None, complete=True):
    """Strict: every tensor of sd expected with its shape (want: {key: shape}) and, if complete, none missing.
    An offender is a ValueError naming it; names maps our key back to the source's name for the message."""
    names = names or {}
    for k, v in sd.items():
        if k not in want:
            raise ValueError(f"unexpected {what} key {names.get(k, k)!r}")
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{what} key {names.get(k, k)!r} has shape {tuple(v.shape)}, expected {want[k]}")
    missing = [k for k in want if k not in sd]
    if complete and missing:
        raise ValueError(f"missing {what} key {missing[0]!r} ({len(missing)} missing)")
    return sd


def read_tensors(file, keep=lambda k: True, device="cpu"):
    """Yield (name, tensor) for the tensors of one safetensors file whose names pass keep, memory-mapped, one at a
    time. A missing, truncated or corrupt file is a ValueError naming it."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"missing weight file {file}")
    try:
        with safe_open(file, "pt", device=str(device)) as f:
            for k in f.keys():
                if keep(k):
                    yield k, f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"cannot read {file}: {str(e).strip().splitlines()[0]}") from None


def build(model_cls, cfg, tensors, what, device="cpu", dtype=torch.float32):
    """(key, tensor) pairs -> model_cls(cfg) in eval mode on device/dtype, loaded strictly without a second copy."""
    sd = {}
    for k, t in tensors:
        if k in sd:
            raise ValueError(f"{what} key {k!r} appears twice")
        sd[k] = t
    check_tensors(sd, shapes_of(model_cls, cfg), what)
    with torch.device("meta"):
        model = model_cls(cfg)  # no memory until the checkpoint tensors are assigned
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device, dtype).eval()


# ---- our config.json ----

def is_ours(path):
    """True when DIR/config.json is ours (it has an "emu3" or a "vqvae" section)."""
    file = os.path.join(checkpoint_dir(path), "config.json")
    conf = read_json(file)
    return isinstance(conf, dict) and ("emu3" in conf or "vqvae" in conf)


def read_config(path):
    """DIR/config.json of ours -> {section: config object or record}; unknown sections or fields are errors."""
    file = os.path.join(checkpoint_dir(path), "config.json")
    conf = read_json(file)
    out = {}
    for name, value in conf.items():
        if name in OTHER_SECTIONS:
            out[name] = value
            continue
        if name == "quantization":
            if value not in QUANTIZATIONS:
                raise ValueError(f"{file}: unknown quantization {value!r} (known: {', '.join(QUANTIZATIONS)})")
            out[name] = value
            continue
        if name not in SECTIONS:
            raise ValueError(f"{file}: unknown section {name!r}")
        value = {RENAMED.get(k, k): v for k, v in value.items()}
        fields = {f.name for f in dataclasses.fields(SECTIONS[name])}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"{file}: unknown {name} field {unknown[0]!r}")
        out[name] = SECTIONS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    out.setdefault("image", ImageConfig())
    return out


def config_dict(obj):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


# ---- load ours ----

def weight_files(path):
    """Our decoder shards, in order."""
    files = sorted(f for f in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f))
    if not files:
        raise FileNotFoundError(f"no decoder weights (model-*-of-*.safetensors) in {path}")
    return [os.path.join(path, f) for f in files]


def emu3_structure(int8=False, shard=None):
    """A model_cls for build and shapes_of: cfg -> Emu3(cfg), int8 (quantize.int8) and/or one process's part of it
    (shard = (rank, world): tp.shard), in that order (scales come from whole rows)."""
    def structure(cfg):
        model = Emu3(cfg)
        if int8:
            quantize.int8(model)
        return model if shard is None else tp.shard(model, *shard)
    return structure


def build_emu3(cfg, tensors, device, dtype, int8=False, shard=None):
    """Decoder (name, tensor) pairs (our names) -> Emu3 in eval mode on device/dtype, strict. int8: float matrices
    are quantized as they stream (int8 ones pass); shard (rank, world): only that process's part of each tensor is
    kept. One tensor at a time, cast as it is read: the peak is about the final size, never a whole float model."""
    if int8:
        tensors = quantize.int8_tensors(tensors)
    if shard is not None:
        tensors = tp.shard_tensors(tensors, *shard)
    tensors = ((k, t.to(dtype) if t.is_floating_point() else t) for k, t in tensors)
    return build(emu3_structure(int8, shard), cfg, tensors, "LLM", device, dtype)


def load_emu3(path, device="cpu", dtype=torch.bfloat16, int8=False, shard=None):
    """Our checkpoint dir -> (Emu3 in eval mode on device/dtype, Emu3Config). Strict. int8: quantized as it loads
    (an int8 checkpoint always loads as int8); shard (rank, world): one tensor-parallel part (tp.py).

    On the CPU with the stored dtype the weights stay memory-mapped (no copy, pages read on demand): do not
    overwrite the checkpoint files while the model is alive; save elsewhere and rename (as `save` does).
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    conf = read_config(path)
    if "emu3" not in conf:
        raise ValueError(f"{path}/config.json has no 'emu3' section")
    cfg = conf["emu3"]
    tensors = ((k, t) for file in weight_files(path) for k, t in read_tensors(file, device=device))
    return build_emu3(cfg, tensors, device, dtype, int8 or conf.get("quantization") == "int8", shard), cfg


def load_vqvae(path, device="cpu"):
    """Our checkpoint dir -> VQVAE in eval mode, fp32."""
    device = parse_device(device)
    conf = read_config(path)
    if "vqvae" not in conf:
        raise ValueError(f"{path} has no VQ-VAE (vision tokenizer): convert it with `convert.py --vq VQ_DIR`")
    tensors = read_tensors(os.path.join(path, "vqvae.safetensors"))
    return build(VQVAE, conf["vqvae"], tensors, "VQ", device, torch.float32)


# ---- write ours ----

def check_out_dir(out, overwrite=False):
    """A checkpoint directory we may write: its parent exists; it does not exist yet (or is empty), or overwrite."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {out}: no folder {parent}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"cannot write {out}: it is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty: choose a new folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {out}: {parent} is not writable")
    return out


def save(out, cfg=None, shards=(), vq=None, tokenizer=None, image=None, overwrite=False, int8=False, **records):
    """Write our checkpoint directory `out`: config, decoder shards (an iterable of {key: tensor}, written one at a
    time, so the caller can stream them; int8: their matrices quantized, quantize.int8_tensors), the VQ-VAE (fp32)
    and the tokenizer. Everything goes into a temporary folder beside `out`, renamed at the end: an error half-way
    leaves nothing behind. Returns the config written.

    records: extra config sections (source=..., training=...); every tensor is checked against the models first.
    """
    check_out_dir(out, overwrite)
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        conf = {}
        if cfg is not None:
            conf["emu3"] = config_dict(cfg)
            if int8:
                conf["quantization"] = "int8"
            want, seen, n = shapes_of(emu3_structure(int8), cfg), set(), 0
            for shard in shards:  # (not enumerate: its reused result tuple would keep the last shard alive)
                n += 1
                check_tensors(shard, want, "LLM", complete=False)  # extra / misshapen keys, named
                if seen & shard.keys():
                    raise ValueError(f"LLM key {sorted(seen & shard.keys())[0]!r} appears twice")
                seen |= shard.keys()
                save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(tmp, f"part-{n:05d}"),
                          {"format": "pt"})
                del shard  # before the next one is read
            missing = [k for k in want if k not in seen]
            if missing:
                raise ValueError(f"missing LLM key {missing[0]!r} ({len(missing)} missing)")
            for i in range(1, n + 1):  # the final names, now that the count is known
                os.rename(os.path.join(tmp, f"part-{i:05d}"),
                          os.path.join(tmp, f"model-{i:05d}-of-{n:05d}.safetensors"))
        if vq is not None:
            conf["vqvae"] = config_dict(vq.cfg)
            save_file({k: v.float().contiguous() for k, v in vq.state_dict().items()},
                      os.path.join(tmp, "vqvae.safetensors"), {"format": "pt"})
        if image is not None:
            conf["image"] = config_dict(image)
        conf.update({k: v for k, v in records.items() if v is not None})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(conf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        if os.path.isdir(out):  # an empty folder, or an old checkpoint we were told to replace
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return conf


__all__ = ["DTYPES", "build", "build_emu3", "check_out_dir", "check_tensors", "is_ours", "load_emu3", "load_tokenizer",
           "load_vqvae", "parse_device", "parse_dtype", "read_config", "read_json", "read_tensors", "save",
           "shapes_of"]

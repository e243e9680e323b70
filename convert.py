"""Convert the released Emu3 checkpoints into our directory format (checkpoint.py), refusing what we do not implement.

    source directory                      rename table               strict checks                     ours
    original Emu3-Gen / -Chat / -Stage1   LLM_TABLE (Llama names)    configs.ORIGINAL_LLM; every       config.json "emu3"
      config.json, model-*.safetensors                               tensor: name, shape, once         model-*.safetensors
      emu3.tiktoken, emu3_vision_tokens   (ranks: build_tokenizer)   the vision-token lines            tokenizer.json
    + original Emu3-VisionTokenizer       none: our VQ keeps its     configs.ORIGINAL_VQ,              vqvae.safetensors,
      (--vq): config.json, model.safe-    names                      configs.PREPROCESSOR              "vqvae", "image"
      tensors, preprocessor_config.json
    transformers "-hf" (one directory):   HF prefixes + LLM_TABLE;   configs.HF_TOP / HF_TEXT / HF_VQ, all of the above
      config.json (text_config,           VQ_FROM_HF for the VQ      vocabulary_map ids; the tokenizer
      vq_config, vocabulary_map),                                    splits text the Qwen way (or is
      model-*.safetensors + index,                                   rebuilt)
      tokenizer.json, processor config

Every field of a source config is used, or checked against the one value we implement, or on a list of fields that
do not change inference (configs.py); anything else is a one-line error naming the field and its value. Our
config.json records the source and what was checked. Weights are streamed one shard at a time into a temporary
folder renamed at the end (checkpoint.save). `load_emu3` and friends read a released directory the same way, in
memory, so `sample.py --ckpt` takes one as it is.

    python convert.py /path/to/Emu3-Gen-hf ckpt/gen --dtype bfloat16
    python convert.py /path/to/Emu3-Chat ckpt/chat --vq /path/to/Emu3-VisionTokenizer
"""
import argparse
import os
import re
import sys

import torch

import checkpoint
import quantize
from checkpoint import build, check_tensors, parse_dtype, read_json, read_tensors, shapes_of
from configs import emu3_config, image_config, source_dtype, source_format, vq_config_from_hf, vq_config_from_original
from emu3 import Emu3, Emu3Config
from tokenizer import check_special_ids, tokenizer_from_hf, tokenizer_from_original
from vqvae import VQVAE, VQConfig

# ---- weights: renames ----

# our name <- original BAAI name (also transformers' Emu3ForCausalLM name); "{i}" is the layer index
LLM_TABLE = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.w_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLM_FROM_ORIGINAL = {v: k for k, v in LLM_TABLE.items()}
# transformers "-hf": on disk text_model.model.* / text_model.lm_head.weight;
# in memory model.text_model.* / lm_head.weight
HF_LLM_PREFIXES = {"text_model.model.": "model.", "text_model.lm_head.": "lm_head.", "model.text_model.": "model."}
HF_VQ_PREFIX = re.compile(r"^(model\.)?vqmodel\.")
# Our VQ keys are the original BAAI taming-style names, so an original checkpoint only needs checking; an -hf one
# is renamed by this table (first matching rule wins; the reverse of transformers' module tree).
VQ_FROM_HF = [
    (r"^(encoder|decoder)\.middle_block\.attn_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.middle_block\.", r"\1.mid."),
    (r"^encoder\.down_block\.down\.(\d+)\.attn_norms\.(\d+)\.", r"encoder.down.\1.attn.\2.norm."),
    (r"^decoder\.up_block\.up\.(\d+)\.attn_norms\.(\d+)\.", r"decoder.up.\1.attn.\2.norm."),
    (r"^encoder\.down_block\.down\.", "encoder.down."),
    (r"^decoder\.up_block\.up\.", "decoder.up."),
]
VQ_ATTN_FROM_HF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "proj_out"}  # Linear -> 1x1 conv


def llm_key_from_original(key):
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attn.wq.weight'; ValueError if unmapped."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    pattern = f"model.layers.{{i}}.{m[2]}" if m else key
    if pattern not in LLM_FROM_ORIGINAL:
        raise ValueError(f"unmapped LLM key {key!r}")
    return LLM_FROM_ORIGINAL[pattern].format(i=m[1] if m else "")


def llm_key_from_hf(key):
    for src, dst in HF_LLM_PREFIXES.items():
        if key.startswith(src):
            return llm_key_from_original(dst + key[len(src):])
    return llm_key_from_original(key)  # Emu3ForCausalLM names are the original names


def vq_key_from_hf(key, t):
    """(-hf VQ key, tensor) -> (our key, tensor): the rename table, and Linear attention weights as 1x1 convs."""
    k = HF_VQ_PREFIX.sub("", key)
    for pat, rep in VQ_FROM_HF:
        k, n = re.subn(pat, rep, k)
        if n:
            break
    m = re.search(r"\.attn(?:_1|\.\d+)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$", k)
    if m:
        k = k[: m.start(1)] + VQ_ATTN_FROM_HF[m.group(1)] + "." + m.group(2)
        if m.group(2) == "weight" and t.ndim == 2:
            t = t[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
    return k, t


def renamed(sd, key_fn, what):
    """{source key: tensor} -> ({our key: tensor}, {our key: source key}); two keys onto one name is an error."""
    out, names = {}, {}
    for key, t in sd.items():
        k, t = key_fn(key, t)
        if k in out:
            raise ValueError(f"{what} tensors {names[k]!r} and {key!r} map to the same name {k!r}")
        out[k], names[k] = t, key
    return out, names


def llm_from_original(sd, cfg=None):
    """Original BAAI Emu3 state dict -> ours. Strict against Emu3(cfg), default the released config."""
    out, _ = renamed(sd, lambda k, t: (llm_key_from_original(k), t), "LLM")
    return check_tensors(out, shapes_of(Emu3, cfg or Emu3Config()), "LLM")


def llm_from_hf(sd, cfg=None):
    """transformers Emu3 text-model state dict (disk or in-memory prefixes, no vqmodel keys) -> ours. Strict."""
    out, _ = renamed(sd, lambda k, t: (llm_key_from_hf(k), t), "LLM")
    return check_tensors(out, shapes_of(Emu3, cfg or Emu3Config()), "LLM")


def vq_from_original(sd, cfg=None):
    """Original Emu3-VisionTokenizer state dict -> ours: the same names, checked strictly against cfg."""
    return check_tensors(dict(sd), shapes_of(VQVAE, cfg or VQConfig()), "VQ")


def vq_from_hf(sd, cfg=None):
    """transformers Emu3VQVAE state dict (bare, "vqmodel." on disk or "model.vqmodel." in memory) -> ours."""
    out, names = renamed(sd, vq_key_from_hf, "VQ")
    return check_tensors(out, shapes_of(VQVAE, cfg or VQConfig()), "VQ", names)


# ---- weights: files ----

def weight_files(path):
    """The safetensors files of a release, in order: those its index names (each must exist), or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"missing weight file {f}" + (" (named in the index)" if len(files) > 1 else ""))
    return files


def llm_tensors(file, fmt, dtype=None, device="cpu"):
    """Yield (our key, tensor) of the decoder tensors of one release file (an -hf file's VQ tensors are skipped)."""
    key_fn = llm_key_from_hf if fmt == "hf" else llm_key_from_original
    for k, t in read_tensors(file, lambda k: not HF_VQ_PREFIX.match(k), device):
        yield key_fn(k), (t if dtype is None else t.to(dtype))


# ---- loading a release in memory (the same five functions as checkpoint.py) ----

def load_emu3(path, device="cpu", dtype=torch.bfloat16, image_area=None, int8=False, shard=None):
    """A released directory -> (Emu3 in eval mode, Emu3Config), converted in memory with every check of `convert`;
    int8 and shard as in checkpoint.load_emu3 (quantized from the release's own precision)."""
    device, dtype = checkpoint.parse_device(device), parse_dtype(dtype)
    cfg, _ = emu3_config(path, image_area)
    fmt = source_format(path)
    tensors = (kt for file in weight_files(path) for kt in llm_tensors(file, fmt, None, device))
    return checkpoint.build_emu3(cfg, tensors, device, dtype, int8, shard), cfg


def load_vqvae(path, device="cpu"):
    """An original Emu3-VisionTokenizer directory, or an -hf one (its vqmodel.* tensors) -> VQVAE, fp32, eval."""
    device = checkpoint.parse_device(device)
    fmt, file = source_format(path), os.path.join(path, "config.json")
    conf = read_json(file)
    if fmt == "hf":
        cfg, _ = vq_config_from_hf(conf, file)
        sd = {k: t for f in weight_files(path) for k, t in read_tensors(f, lambda k: HF_VQ_PREFIX.match(k))}
        sd = vq_from_hf(sd, cfg)
    elif fmt == "original-vq":
        cfg, _ = vq_config_from_original(conf, file)
        sd = vq_from_original(dict(read_tensors(os.path.join(path, "model.safetensors"))), cfg)
    else:
        raise ValueError(f"{path} has no VQ-VAE (vision tokenizer): convert it with `convert.py --vq VQ_DIR`")
    return build(VQVAE, cfg, sd.items(), "VQ", device, torch.float32)


def load_tokenizer(path, log=lambda *a: print(*a, file=sys.stderr)):
    """A release's tokenizer files -> our tokenizer, checked against the config's special ids; notes on stderr."""
    cfg, _ = emu3_config(path)
    hf = source_format(path) == "hf"
    tokenizer = tokenizer_from_hf(path, cfg, log) if hf else tokenizer_from_original(path, cfg)
    check_special_ids(tokenizer, cfg, os.path.join(path, "config.json"))
    return tokenizer


# ---- the command line: a release -> our directory ----

def convert(src, out, vq=None, dtype=None, image_area=None, int8=False, log=lambda *a: print(*a, file=sys.stderr)):
    """Stream a release into our format, one output shard per input shard (peak ~ one shard), into a temporary
    folder renamed to `out` at the end. dtype None keeps the release's own (as transformers' dtype="auto"). int8:
    every matrix stored as int8 + per-row fp32 scales, quantized from the release's precision (quantize.py); dtype
    then sets the norms'."""
    checkpoint.check_out_dir(out)
    if image_area is not None and image_area <= 0:
        raise ValueError(f"--image-area must be positive, got {image_area}")
    if checkpoint.is_ours(src):
        raise ValueError(f"{src} is already in our format (sample.py and train.py take it as it is): convert.py "
                         f"reads the released checkpoints")
    fmt = source_format(src)
    if fmt == "original-vq":
        raise ValueError(f"{src} is a vision tokenizer: give the LLM directory, with --vq {src}")
    cfg, checked = emu3_config(src, image_area)
    files = weight_files(src)
    dtype = parse_dtype(dtype) if dtype is not None else source_dtype(src, files)
    # everything cheap is read and checked before the first weight is: tokenizer, VQ config, preprocessor config
    tokenizer = load_tokenizer(src, log=log)
    vq_src = vq or (src if fmt == "hf" else None)
    if vq_src is not None and fmt == "original" and source_format(vq_src) != "original-vq":
        raise ValueError(f"--vq {vq_src} is not an original Emu3-VisionTokenizer directory")
    image = image_config(vq_src or src)
    vq_model = load_vqvae(vq_src) if vq_src is not None else None
    if vq_model is not None and vq_model.cfg.codebook_size > cfg.codebook_size:
        raise ValueError(f"the VQ-VAE has {vq_model.cfg.codebook_size} codes, the decoder only "
                         f"{cfg.codebook_size} visual tokens")

    def shards():  # one at a time: each is dropped before the next is read
        for file in files:
            tensors = llm_tensors(file, fmt)
            if int8:  # from the source's own precision; the norms then take dtype
                tensors = ((k, t if t.dtype == torch.int8 or k.endswith(".scale") else t.to(dtype))
                           for k, t in quantize.int8_tensors(tensors))
            else:
                tensors = ((k, t.to(dtype)) for k, t in tensors)
            shard = dict(tensors)
            if shard:  # an -hf shard of only vqmodel.* tensors gives none
                log(f"{os.path.basename(file)}: {len(shard)} tensors")
                yield shard
            del shard
    record = {"format": fmt, "path": os.path.abspath(src), "vq": vq_src and os.path.abspath(vq_src),
              "dtype": str(dtype).removeprefix("torch."), "checked": checked}
    checkpoint.save(out, cfg, shards(), vq_model, tokenizer, image, int8=int8, source=record)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert an Emu3 checkpoint (transformers -hf or original BAAI) "
                                                 "into this project's format.")
    parser.add_argument("src", help="-hf dir, or original Emu3-Gen / Emu3-Chat dir")
    parser.add_argument("out", help="output dir (must not exist yet, or be empty)")
    parser.add_argument("--vq", default=None, help="Emu3-VisionTokenizer dir (needed for an original src)")
    parser.add_argument("--dtype", default=None, choices=list(checkpoint.DTYPES),
                        help="decoder weight dtype (default: the source's own, e.g. float32 for the releases)")
    parser.add_argument("--int8", action="store_true",
                        help="store every decoder matrix as int8 with one scale per row (about half of bf16; "
                             "loads as int8, never as a float copy)")
    parser.add_argument("--image-area", type=int, default=None,
                        help="pixel area of generated images (default: the source's image_area; 518400 = 720x720 "
                             "for -hf sources, which record none)")
    args = parser.parse_args()
    try:
        convert(**vars(args))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

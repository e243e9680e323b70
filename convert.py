"""Convert reference Emu3 checkpoints (original BAAI / transformers "-hf") into our format, and load it.

Tokenizer: the original `emu3.tiktoken` (Qwen byte-level BPE ranks) + 211 specials + 32768 visual tokens
  -> one `tokenizers.Tokenizer` (NFC -> Qwen regex split -> bytes->unicode -> BPE), ids 0..184621, saved as
  DIR/tokenizer.json.
"""
import argparse
import base64
import dataclasses
import json
import os
import re
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from emu3 import Emu3, Emu3Config


# ---- tokenizer ----

# Qwen's pre-tokenizer regex, verbatim from the original tokenization_emu3.py: one digit per piece,
# and one non-letter may lead a run of letters ("(world" stays one piece).
QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def special_tokens(n_visual=32768):
    # in id order from 151643: the original enumerates these three, 205 extras, then emu3_vision_tokens.txt
    # (the three image specials, then the visual tokens)
    return (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
            + ["<|image token|>", "<|image start|>", "<|image end|>"]
            + [f"<|visual token {k:06d}|>" for k in range(n_visual)])


def bytes_to_unicode():
    # GPT-2's reversible byte -> printable-char map used by byte-level BPE vocabularies
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the other bytes get chars 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(tiktoken_path, n_visual=32768):
    """The original tiktoken tokenizer as a tokenizers.Tokenizer with identical ids (0..151853 + n_visual)."""
    with open(tiktoken_path, "rb") as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{tiktoken_path}: ranks are not 0..{len(ranks) - 1}")
    byte_char = bytes_to_unicode()
    to_str = lambda b: "".join(byte_char[x] for x in b)
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; BPE merges the pair listed first.
    # So list every split (l, r) of every token t (both halves tokens) ordered by rank(t): same choices as tiktoken.
    # (The old HF script kept one split per token, which misses pairs tiktoken would merge in some contexts.)
    merges = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            l, r = tok[:i], tok[i:]
            if l in ranks and r in ranks:
                merges.append((rank, ranks[l], ranks[r], l, r))
    merges.sort()
    bpe = models.BPE({to_str(t): r for t, r in ranks.items()}, [(to_str(l), to_str(r)) for *_, l, r in merges],
                     ignore_merges=True)  # like tiktoken: a piece that is itself a token is taken whole
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # normalized=True: specials are matched after NFC, as the original normalizes the whole text before encoding
    n = tok.add_special_tokens([AddedToken(s, special=True, normalized=True) for s in special_tokens(n_visual)])
    if tok.get_vocab_size() != len(ranks) + n:
        raise ValueError("special tokens collide with BPE tokens")
    return tok


def load_tokenizer(path):
    """DIR/tokenizer.json (or a path to the file itself) -> tokenizers.Tokenizer."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return Tokenizer.from_file(file)


# ---- VQ-VAE (vision tokenizer) ----
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


def shapes_of(model_cls, cfg):
    """{our key: shape} of model_cls(cfg)'s state dict, built on the meta device (no memory, no init)."""
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


def vq_check(sd, cfg, names=None):
    from vqvae import VQVAE
    return check_tensors(sd, shapes_of(VQVAE, cfg), "VQ", names)


def vq_from_original(sd, cfg=None):
    """Original Emu3-VisionTokenizer state dict -> ours: the same names, checked strictly against cfg."""
    from vqvae import VQConfig
    return vq_check(dict(sd), cfg or VQConfig())


def vq_from_hf(sd, cfg=None):
    """transformers Emu3VQVAE state dict (bare, "vqmodel." on disk or "model.vqmodel." in memory) -> ours."""
    from vqvae import VQConfig
    out, names = {}, {}
    for key, t in sd.items():
        k = re.sub(r"^(model\.)?vqmodel\.", "", key)
        for pat, rep in VQ_FROM_HF:
            k, n = re.subn(pat, rep, k)
            if n:
                break
        m = re.search(r"\.attn(?:_1|\.\d+)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$", k)
        if m:
            k = k[: m.start(1)] + VQ_ATTN_FROM_HF[m.group(1)] + "." + m.group(2)
            if m.group(2) == "weight" and t.ndim == 2:
                t = t[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        if k in out:
            raise ValueError(f"VQ tensors {names[k]} and {key} map to the same name {k}")
        out[k], names[k] = t, key
    return vq_check(out, cfg or VQConfig(), names)


def vq_config_from_original(d):
    """Original Emu3-VisionTokenizer config.json dict -> VQConfig."""
    from vqvae import VQConfig
    if d.get("double_z", False):
        raise ValueError("VQ config: double_z=True is not supported (Emu3 uses False)")
    keys = ["codebook_size", "embed_dim", "z_channels", "in_channels", "out_channels", "ch", "num_res_blocks",
            "temporal_downsample_factor", "dropout"]
    kw = {k: d[k] for k in keys if k in d}
    kw.update({k: tuple(d[k]) for k in ("ch_mult", "attn_resolutions") if k in d})
    return VQConfig(**kw)


def vq_config_from_hf(d):
    """transformers Emu3VQVAEConfig dict (or a whole Emu3Config dict holding "vq_config") -> VQConfig."""
    from vqvae import VQConfig
    d = d.get("vq_config", d)
    if d.get("double_latent", False):
        raise ValueError("VQ config: double_latent=True is not supported (Emu3 uses False)")
    ren = {"base_channels": "ch", "latent_channels": "z_channels", "channel_multiplier": "ch_mult"}
    keys = ["codebook_size", "embed_dim", "in_channels", "out_channels", "num_res_blocks",
            "temporal_downsample_factor", *ren]
    kw = {ren.get(k, k): d[k] for k in keys if k in d}
    kw.update({k: tuple(kw[k]) for k in ("ch_mult",) if k in kw})
    if "attn_resolutions" in d:
        kw["attn_resolutions"] = tuple(d["attn_resolutions"])
    cfg = VQConfig(**kw)
    # transformers sizes every VQ attention by hidden_size, single head: it must be the last level's width
    if d.get("hidden_size", cfg.ch * cfg.ch_mult[-1]) != cfg.ch * cfg.ch_mult[-1] or d.get("num_attention_heads", 1) != 1:
        raise ValueError(f"VQ config: hidden_size {d.get('hidden_size')} / num_attention_heads "
                         f"{d.get('num_attention_heads')} must be ch*ch_mult[-1] = {cfg.ch * cfg.ch_mult[-1]} / 1")
    return cfg


def read_safetensors(path, keep=lambda k: True):
    # memory-mapped read of the tensors whose names pass keep
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep(k)}


def load_vqvae(path, device="cpu"):
    """Load the VQ-VAE (fp32, eval) from our dir (vqvae.safetensors), an original Emu3-VisionTokenizer dir, or an -hf dir."""
    from vqvae import VQConfig, VQVAE
    conf_path = os.path.join(path, "config.json")
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(conf_path) as f:
        conf = json.load(f)
    if "vqvae" in conf:  # ours: original names, fp32
        unknown = set(conf["vqvae"]) - {f.name for f in dataclasses.fields(VQConfig)}
        if unknown:
            raise ValueError(f"{conf_path}: unknown vqvae field {sorted(unknown)[0]}")
        cfg = VQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["vqvae"].items()})
        sd = vq_from_original(read_safetensors(os.path.join(path, "vqvae.safetensors")), cfg)
    elif "vq_config" in conf:  # transformers -hf: the VQ tensors are the "vqmodel." keys of the shards
        cfg = vq_config_from_hf(conf)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        sd = {}
        for name in files:
            sd.update(read_safetensors(os.path.join(path, name), lambda k: re.match(r"^(model\.)?vqmodel\.", k)))
        sd = vq_from_hf(sd, cfg)
    elif "ch_mult" in conf:  # original Emu3-VisionTokenizer
        cfg = vq_config_from_original(conf)
        sd = vq_from_original(read_safetensors(os.path.join(path, "model.safetensors")), cfg)
    else:
        raise ValueError(f"{conf_path} is neither ours (has vqvae), -hf (has vq_config) nor an original VQ config")
    with torch.device("meta"):
        model = VQVAE(cfg)  # no memory until the checkpoint tensors are assigned
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device, torch.float32).eval()


# ---- LLM (decoder) weights and config ----

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
# transformers "-hf": on disk text_model.model.* / text_model.lm_head.weight; in memory model.text_model.* / lm_head.weight
HF_LLM_PREFIXES = {"text_model.model.": "model.", "text_model.lm_head.": "lm_head.", "model.text_model.": "model."}
HF_VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


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


def llm_shapes(cfg):
    return shapes_of(Emu3, cfg)


def check_llm(sd, cfg, complete=True):
    """Strict check of our-format decoder weights against Emu3(cfg): extra, misshapen, (missing) -> ValueError."""
    check_tensors(sd, llm_shapes(cfg), "LLM", complete=complete)


def _rename_llm(sd, key_fn, cfg):
    out = {}
    for k, v in sd.items():
        new = key_fn(k)
        if new in out:
            raise ValueError(f"LLM key {k!r} maps onto {new!r} twice")
        out[new] = v
    check_llm(out, cfg or Emu3Config())
    return out


def llm_from_original(sd, cfg=None):
    """Original BAAI Emu3 state dict -> ours. Strict against Emu3(cfg), default the released config."""
    return _rename_llm(sd, llm_key_from_original, cfg)


def llm_from_hf(sd, cfg=None):
    """transformers Emu3 text-model state dict (disk or in-memory prefixes, no vqmodel keys) -> ours. Strict."""
    return _rename_llm(sd, llm_key_from_hf, cfg)


def _image_area(max_pos):
    # Gen (9216 positions) generates 720x720; Chat (131072) uses 512x512 (reference §3.1, §12 item 25)
    return 518400 if max_pos == 9216 else 262144


def emu3_config_from_original(c):
    """Original config.json (dict) -> Emu3Config."""
    try:
        return Emu3Config(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            ffn_dim=c["intermediate_size"], rope_theta=float(c.get("rope_theta", 1e6)),
            norm_eps=c.get("rms_norm_eps", 1e-5), max_seq_len=c["max_position_embeddings"],
            image_area=c.get("image_area", _image_area(c["max_position_embeddings"])),
            pad_id=c["pad_token_id"], eol_id=c["eol_token_id"], eof_id=c["eof_token_id"], bos_id=c["bos_token_id"],
            eos_id=c["eos_token_id"], img_id=c["img_token_id"], boi_id=c["boi_token_id"], eoi_id=c["eoi_token_id"],
            visual_offset=c["eoi_token_id"] + 1, codebook_size=c["vocab_size"] - c["eoi_token_id"] - 1)
    except KeyError as e:
        raise ValueError(f"original Emu3 config.json lacks {e}") from None


def emu3_config_from_hf(c):
    """transformers config.json (dict; Emu3ForConditionalGeneration or a bare text config) -> Emu3Config."""
    t = c.get("text_config", c)
    vocab = c.get("vocabulary_map", {})
    visual = [i for name, i in vocab.items() if name.startswith("<|visual token")]
    rope = t.get("rope_parameters") or {}
    named = {"eol_id": "<|extra_200|>", "eof_id": "<|extra_201|>", "img_id": "<|image token|>",
             "boi_id": "<|image start|>", "eoi_id": "<|image end|>"}  # HF keeps these only in the vocabulary
    ids = {f: vocab[name] for f, name in named.items() if name in vocab}
    if visual:
        ids |= dict(visual_offset=min(visual), codebook_size=len(visual))
    try:
        return Emu3Config(
            vocab_size=t["vocab_size"], dim=t["hidden_size"], n_layers=t["num_hidden_layers"],
            n_heads=t["num_attention_heads"], n_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            ffn_dim=t["intermediate_size"], rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
            norm_eps=t.get("rms_norm_eps", 1e-5), max_seq_len=t["max_position_embeddings"],
            image_area=_image_area(t["max_position_embeddings"]),
            pad_id=t["pad_token_id"], bos_id=t["bos_token_id"], eos_id=t["eos_token_id"], **ids)
    except KeyError as e:
        raise ValueError(f"transformers Emu3 config.json lacks {e}") from None


def read_config(path):
    """DIR/config.json -> (format, dict) with format 'ours', 'hf' or 'original'."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(file) as f:
        c = json.load(f)
    if "emu3" in c or "vqvae" in c:
        return "ours", c
    if "text_config" in c or c.get("model_type") == "emu3_text_model":
        return "hf", c
    if "img_token_id" in c:
        return "original", c
    raise ValueError(f"{file}: not an Emu3 config (ours, transformers or original BAAI)")


def emu3_config(path):
    """Emu3Config of any checkpoint directory (ours, -hf, original)."""
    fmt, c = read_config(path)
    if fmt == "hf":
        return emu3_config_from_hf(c)
    if fmt == "original":
        return emu3_config_from_original(c)
    if "emu3" not in c:
        raise ValueError(f"{path}/config.json has no 'emu3' section")
    try:
        return Emu3Config(**c["emu3"])
    except TypeError as e:
        raise ValueError(f"{path}/config.json 'emu3': {e}") from None


def weight_files(path, fmt):
    """The safetensors files holding a checkpoint's decoder weights, in order."""
    if fmt == "ours":
        files = sorted(f for f in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f))
    elif os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    files = [os.path.join(path, f) for f in files]
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no decoder weights (model*.safetensors) in {path}")
    return files


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
        torch.empty(0, device=device)  # e.g. "cuda" on a machine without one
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {str(device)!r} is not available: {e}") from None
    return device


def llm_tensors(file, fmt, device="cpu", dtype=None):
    """Yield (our key, tensor) from one safetensors file of a checkpoint; VQ keys of an -hf file are skipped."""
    key_fn = {"ours": lambda k: k, "hf": llm_key_from_hf, "original": llm_key_from_original}[fmt]
    with safe_open(file, "pt", device=str(device)) as f:  # memory-mapped: one tensor read at a time
        for k in f.keys():
            if fmt == "hf" and k.startswith(HF_VQ_PREFIXES):
                continue
            t = f.get_tensor(k)
            yield key_fn(k), (t if dtype is None else t.to(dtype))


def load_emu3(path, device="cpu", dtype=torch.bfloat16):
    """Any checkpoint dir (ours, -hf, original) -> (Emu3 in eval mode on device/dtype, Emu3Config). Strict.

    On the CPU with the stored dtype the weights stay memory-mapped (no copy, pages read on demand): do not
    overwrite the checkpoint files while the model is alive; save elsewhere and rename.
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory {path}")
    fmt, _ = read_config(path)
    cfg = emu3_config(path)
    sd = {}
    for file in weight_files(path, fmt):
        for k, t in llm_tensors(file, fmt, device, dtype):  # cast tensor by tensor: peak ~ final size
            if k in sd:
                raise ValueError(f"LLM key {k!r} appears twice in {path}")
            sd[k] = t
    check_llm(sd, cfg)
    with torch.device("meta"):
        model = Emu3(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    return model.to(device, dtype).eval(), cfg


# ---- CLI: reference checkpoint dir -> our dir ----

def convert(src, out, vq=None, dtype="bfloat16"):
    """Stream an -hf or original checkpoint into our format, one output shard per input shard (peak ~ one shard)."""
    dtype = parse_dtype(dtype)
    fmt, c = read_config(src)
    if fmt == "ours":
        raise ValueError(f"{src} is already in our format")
    cfg = emu3_config(src)
    shapes = llm_shapes(cfg)
    files = weight_files(src, fmt)
    # tokenizer: -hf ships tokenizer.json; the original ships emu3.tiktoken, rebuilt with every special at its id
    tok_src = os.path.join(src, "tokenizer.json" if fmt == "hf" else "emu3.tiktoken")
    if not os.path.isfile(tok_src):
        raise FileNotFoundError(f"no {os.path.basename(tok_src)} in {src}")
    if fmt == "hf":  # shards holding only vqmodel.* keys produce no decoder shard
        files = [f for f in files if any(not k.startswith(HF_VQ_PREFIXES) for k in safe_open(f, "pt").keys())]
    os.makedirs(out, exist_ok=True)
    seen = set()
    for n, file in enumerate(files, 1):
        shard = {}
        for k, t in llm_tensors(file, fmt, "cpu", dtype):
            if k in seen:
                raise ValueError(f"LLM key {k!r} appears twice in {src}")
            seen.add(k)
            shard[k] = t
        check_llm(shard, cfg, complete=False)  # extra / misshapen keys, named
        save_file(shard, os.path.join(out, f"model-{n:05d}-of-{len(files):05d}.safetensors"), {"format": "pt"})
        print(f"{os.path.basename(file)}: {len(shard)} tensors", file=sys.stderr)
        del shard
    missing = [k for k in shapes if k not in seen]
    if missing:
        raise ValueError(f"missing LLM key {missing[0]!r} in {src} ({len(missing)} missing)")
    config = {"emu3": dataclasses.asdict(cfg)}
    # VQ: the -hf dir holds it (vqmodel.*), an original Gen/Chat dir needs --vq Emu3-VisionTokenizer
    vq_src = vq or (src if "vq_config" in c else None)
    if vq_src is not None:
        vqvae = load_vqvae(vq_src)
        save_file({k: v.float().contiguous() for k, v in vqvae.state_dict().items()},
                  os.path.join(out, "vqvae.safetensors"), {"format": "pt"})
        config["vqvae"] = dataclasses.asdict(vqvae.cfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if fmt == "hf":
        shutil.copyfile(tok_src, os.path.join(out, "tokenizer.json"))
    else:
        build_tokenizer(tok_src).save(os.path.join(out, "tokenizer.json"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert an Emu3 checkpoint (transformers -hf or original BAAI) "
                                                 "into this project's format.")
    parser.add_argument("src", help="-hf dir, or original Emu3-Gen / Emu3-Chat dir")
    parser.add_argument("out", help="output dir (created)")
    parser.add_argument("--vq", default=None, help="Emu3-VisionTokenizer dir (needed for an original src)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="decoder weight dtype")
    args = parser.parse_args()
    try:
        convert(**vars(args))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

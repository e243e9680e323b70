"""The configs of the released Emu3 checkpoints, read strictly: every field used, checked against the one value we
implement, or known not to change inference; any other value is a one-line error naming the field and its value.

    original Emu3-Gen / -Chat config.json      ORIGINAL_LLM  -> Emu3Config  (image_area read from it)
    original Emu3-VisionTokenizer config.json  ORIGINAL_VQ   -> VQConfig
    transformers -hf config.json               HF_TOP, HF_TEXT (text_config), HF_VQ (vq_config), vocabulary_map ->
                                               Emu3Config (special ids by their strings) and VQConfig
    preprocessor_config.json (either release)  PREPROCESSOR  -> ImageConfig (pixel limits; mean, std, resample checked)

Conversion (convert.py) and a direct load of a release (sample.py --ckpt) run the same checks; our config.json
records what was checked. Which release a directory holds is read from config.json's model_type, not guessed.
"""
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

import checkpoint
from checkpoint import parse_dtype, read_json
from emu3 import Emu3Config
from vqvae import ImageConfig, VQConfig

# transformers' bookkeeping, written into every config (4.x writes it all into nested configs too): none of it changes
# a forward pass. Its generation defaults (do_sample, top_k, ...) are not read either: sampling is chosen on our
# command line, following the official recipes.
BOOKKEEPING = {
    "_name_or_path", "add_cross_attention", "architectures", "auto_map", "bad_words_ids", "begin_suppress_tokens",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty",
    "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder",
    "label2id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type",
    "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate",
    "sep_token_id", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torchscript", "transformers_version", "typical_p", "use_bfloat16",
    "_attn_implementation_autoset", "torch_dtype", "dtype",  # dtype: read separately, as --dtype's default
}
INERT = {"attention_dropout", "dropout", "initializer_range", "use_cache", "model_type"}  # no effect in eval
DEFAULT_ROPE = (None, {"rope_type": "default"}, {"type": "default"})


@dataclass
class Fields:
    """How each field of one source config is treated: used (source name -> our name), fixed (the values we
    implement), inert (known not to change inference). A field in none of them is refused."""
    used: dict
    fixed: dict = field(default_factory=dict)
    inert: set = field(default_factory=set)

    def check(self, conf, where):
        """conf (a config dict) -> {field: value} of the fixed fields it sets; ValueError naming any other value."""
        checked = {}
        for k, v in conf.items():
            if k in self.fixed:
                if v not in self.fixed[k]:
                    allowed = " or ".join(json.dumps(a) for a in self.fixed[k])
                    raise ValueError(f"{where}: {k} = {json.dumps(v)} is not implemented here (only {allowed})")
                checked[k] = v
            elif k not in self.used and k not in self.inert and k not in BOOKKEEPING:
                raise ValueError(f"{where}: unknown config field {k} = {json.dumps(v)[:80]}")
        return checked


IDS = {"pad_token_id": "pad_id", "bos_token_id": "bos_id", "eos_token_id": "eos_id"}
LLM_FIXED = {"hidden_act": ("silu",), "rope_scaling": DEFAULT_ROPE, "tie_word_embeddings": (False,),
             "pretraining_tp": (1,), "attention_bias": (False,), "mlp_bias": (False,)}  # both releases' decoders
ORIGINAL_LLM = Fields(
    used={"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
          "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
          "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len",
          "image_area": "image_area", **IDS, "eol_token_id": "eol_id", "eof_token_id": "eof_id",
          "img_token_id": "wrapper_id", "boi_token_id": "boi_id", "eoi_token_id": "eoi_id"},
    fixed=LLM_FIXED, inert=INERT)
HF_TEXT = Fields(
    used={"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
          "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
          "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len", **IDS,
          "rope_parameters": None, "head_dim": None},  # checked by hand below
    fixed=LLM_FIXED, inert=INERT)
HF_TOP = Fields(used={"text_config": None, "vq_config": None, "vocabulary_map": None},
                fixed={"tie_word_embeddings": (False,)}, inert=INERT | {"image_token_id"})
VQ_FIXED = {"in_channels": (3,), "out_channels": (3,)}
ORIGINAL_VQ = Fields(
    used={"codebook_size": "codebook_size", "embed_dim": "embed_dim", "z_channels": "z_channels", "ch": "ch",
          "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
          "temporal_downsample_factor": "temporal_downsample_factor"},
    fixed={"double_z": (False,), **VQ_FIXED}, inert=INERT)
HF_VQ = Fields(
    used={"codebook_size": "codebook_size", "embed_dim": "embed_dim", "latent_channels": "z_channels",
          "base_channels": "ch", "channel_multiplier": "ch_mult", "num_res_blocks": "num_res_blocks",
          "attn_resolutions": "attn_resolutions", "temporal_downsample_factor": "temporal_downsample_factor",
          "hidden_size": None},  # checked by hand below
    fixed={"double_latent": (False,), "num_attention_heads": (1,), **VQ_FIXED}, inert=INERT)
# preprocessor_config.json: the released values (the same in both releases), checked; the pixel limits are stored
PREPROCESSOR = Fields(
    used={"min_pixels": "min_pixels", "max_pixels": "max_pixels", "size": None, "spatial_factor": None},
    fixed={"do_convert_rgb": (True,), "do_resize": (True,), "do_rescale": (True,), "do_normalize": (True,),
           "image_mean": ([0.5, 0.5, 0.5],), "image_std": ([0.5, 0.5, 0.5],), "resample": (3,),
           "rescale_factor": (1 / 255,)},
    # do_pad: transformers pads a batch's images to the largest; we encode each image alone, as the original does
    inert={"image_processor_type", "processor_class", "do_pad", "auto_map"})


def translate(conf, fields, where):
    """Used fields of conf -> {our name: value}, and {name: value} of the fixed ones checked."""
    checked = fields.check(conf, where)
    ours = {fields.used[k]: v for k, v in conf.items() if fields.used.get(k)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()}, checked


REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "pad_id", "bos_id", "eos_id",
            "eol_id", "eof_id", "wrapper_id", "boi_id", "eoi_id")  # no default would be right for these


def model_cfg(kw, where, fields):
    missing = [k for k in REQUIRED if k not in kw]
    if missing:
        source_name = {ours: src for src, ours in fields.used.items() if ours}.get(missing[0], missing[0])
        raise ValueError(f"{where} lacks {source_name!r}")
    if kw.get("n_kv_heads") is None:  # transformers' convention: no GQA
        kw["n_kv_heads"] = kw["n_heads"]
    kw["rope_theta"] = float(kw.get("rope_theta", 1e6))
    try:
        cfg = Emu3Config(**kw)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{where}: {cfg.n_heads} heads, {cfg.n_kv_heads} kv heads and width {cfg.dim} do not divide")
    return cfg


def vq_cfg(kw, where):
    cfg = VQConfig(**kw)
    if cfg.z_channels != cfg.embed_dim:  # the decoder runs z and the code vectors through the same temporal layers
        raise ValueError(f"{where}: z_channels {cfg.z_channels} != embed_dim {cfg.embed_dim} is not implemented here")
    return cfg


def emu3_config_from_original(c, where="config.json"):
    """Original config.json (dict) -> (Emu3Config, checked fields). The visual tokens follow <|image end|>."""
    kw, checked = translate(c, ORIGINAL_LLM, where)
    if "eoi_id" in kw and "vocab_size" in kw:
        kw |= dict(visual_offset=kw["eoi_id"] + 1, codebook_size=kw["vocab_size"] - kw["eoi_id"] - 1)
    return model_cfg(kw, where, ORIGINAL_LLM), checked


def emu3_config_from_hf(c, image_area=518400, where="config.json", vocabulary=None):
    """transformers config.json (Emu3ForConditionalGeneration or a bare text config) -> (Emu3Config, checked).

    The special ids come from vocabulary_map by their strings (transformers keeps only pad/bos/eos in text_config;
    a bare text model's come from its tokenizer: `vocabulary`); there is no image_area in an -hf config: generated
    images default to transformers' processor's 518400 (720x720).
    """
    checked = HF_TOP.check(c, where) if "text_config" in c else {}
    t = c.get("text_config", c)
    kw, checked_text = translate(t, HF_TEXT, f"{where} text_config" if t is not c else where)
    checked |= {f"text_config.{k}": v for k, v in checked_text.items()}
    rope = t.get("rope_parameters") or {}
    if set(rope) - {"rope_type", "rope_theta"} or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: text_config.rope_parameters = {json.dumps(rope)} is not implemented here "
                         f"(only the default RoPE)")
    kw["rope_theta"] = float(rope.get("rope_theta", t.get("rope_theta", 1e6)))
    vocab = vocabulary or c.get("vocabulary_map", {})
    visual = [i for name, i in vocab.items() if name.startswith("<|visual token")]
    named = {"eol_id": "<|extra_200|>", "eof_id": "<|extra_201|>", "wrapper_id": "<|image token|>",
             "boi_id": "<|image start|>", "eoi_id": "<|image end|>"}
    kw |= {f: vocab[name] for f, name in named.items() if name in vocab}
    if visual:
        kw |= dict(visual_offset=min(visual), codebook_size=len(visual))
        if sorted(visual) != list(range(min(visual), min(visual) + len(visual))):
            raise ValueError(f"{where}: the visual tokens of vocabulary_map are not contiguous ids")
    cfg = model_cfg(kw | {"image_area": image_area}, where, HF_TEXT)
    if t.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"{where}: text_config.head_dim = {t['head_dim']} is not implemented here (only "
                         f"hidden_size / num_attention_heads = {cfg.head_dim})")
    return cfg, checked


def vq_config_from_original(d, where="config.json"):
    kw, checked = translate(d, ORIGINAL_VQ, where)
    return vq_cfg(kw, where), checked


def vq_config_from_hf(d, where="config.json"):
    """transformers Emu3VQVAEConfig dict (or a whole Emu3Config dict holding "vq_config") -> (VQConfig, checked)."""
    d = d.get("vq_config", d)
    kw, checked = translate(d, HF_VQ, f"{where} vq_config")
    cfg = vq_cfg(kw, where)
    # transformers sizes every VQ attention by hidden_size: it must be the last level's width
    if d.get("hidden_size", cfg.ch * cfg.ch_mult[-1]) != cfg.ch * cfg.ch_mult[-1]:
        raise ValueError(f"{where}: vq_config.hidden_size = {d['hidden_size']} is not implemented here (only "
                         f"base_channels * channel_multiplier[-1] = {cfg.ch * cfg.ch_mult[-1]})")
    return cfg, {f"vq_config.{k}": v for k, v in checked.items()}


def image_config(path, transparency=None):
    """ImageConfig of a released directory: its image processor's settings (preprocessor_config.json, or the
    "image_processor" of processor_config.json as transformers 5 saves it) read and checked; the released values
    when there are none. Transparency follows the directory's own reference: an original release was processed by
    transformers 4.44, whose convert_to_rgb drops the alpha; an -hf release by transformers 5, which composites onto
    white (tests/fixtures/make_rgba_fixture.py ran the original to find out)."""
    if transparency is None:
        transparency = "white" if source_format(path) == "hf" else "drop"
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        p = read_json(file)
    elif os.path.isfile(os.path.join(path, "processor_config.json")):
        file = os.path.join(path, "processor_config.json")
        p = read_json(file).get("image_processor", {})
    else:
        return ImageConfig(transparency=transparency)
    kw, _ = translate(p, PREPROCESSOR, file)
    if p.get("spatial_factor", 8) != 8:
        raise ValueError(f"{file}: spatial_factor = {p['spatial_factor']} is not implemented here (only 8)")
    if "size" in p and p["size"] != {"min_pixels": kw.get("min_pixels"), "max_pixels": kw.get("max_pixels")}:
        raise ValueError(f"{file}: size = {json.dumps(p['size'])} disagrees with min_pixels / max_pixels")
    return ImageConfig(**kw, transparency=transparency)


# ---- which release a directory holds ----

def source_format(path):
    """'hf' (transformers), 'original' (BAAI LLM) or 'original-vq' (BAAI vision tokenizer): config.json's model_type."""
    conf = read_json(os.path.join(checkpoint.checkpoint_dir(path), "config.json"))
    kind = {"emu3": "hf", "emu3_text_model": "hf", "Emu3": "original", "Emu3VisionVQ": "original-vq"}
    if not isinstance(conf, dict) or conf.get("model_type") not in kind:
        raise ValueError(f"{path}/config.json is not a released Emu3 config (model_type "
                         f"{conf.get('model_type') if isinstance(conf, dict) else None!r}; expected one of "
                         f"{', '.join(kind)}) nor ours")
    return kind[conf["model_type"]]


def emu3_config(path, image_area=None):
    """(Emu3Config, checked fields) of a released LLM directory."""
    fmt, file = source_format(path), os.path.join(path, "config.json")
    conf = read_json(file)
    if fmt == "hf":
        vocabulary = None
        if "vocabulary_map" not in conf:  # a bare text model: the ids of the specials are in its tokenizer
            tokenizer_file = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(tokenizer_file):
                raise ValueError(f"{file} has no vocabulary_map and {path} no tokenizer.json: nothing says which ids "
                                 f"the image tokens have")
            vocabulary = checkpoint.load_tokenizer(tokenizer_file).get_vocab()
        return emu3_config_from_hf(conf, image_area or 518400, file, vocabulary)
    if fmt == "original-vq":
        raise ValueError(f"{path} holds only a vision tokenizer (Emu3-VisionTokenizer), no decoder")
    cfg, checked = emu3_config_from_original(conf, file)
    if image_area is not None:
        cfg.image_area = image_area
    return cfg, checked


def check_release(path, decoder=True):
    """Read and check every config of a released directory before any weight: -> (Emu3Config, or None for a
    vision tokenizer or with decoder=False; ImageConfig; whether it holds a VQ-VAE)."""
    fmt, file = source_format(path), os.path.join(path, "config.json")
    cfg = emu3_config(path)[0] if decoder and fmt != "original-vq" else None
    conf = read_json(file)
    has_vq = fmt == "original-vq" or (fmt == "hf" and "vq_config" in conf)
    if has_vq:
        (vq_config_from_hf if fmt == "hf" else vq_config_from_original)(conf, file)
    return cfg, image_config(path), has_vq


def source_dtype(path, files):
    """The dtype a release says it holds (config torch_dtype / dtype), else the first stored tensor's."""
    conf = read_json(os.path.join(path, "config.json"))
    name = conf.get("dtype") or conf.get("torch_dtype") or conf.get("text_config", {}).get("dtype")
    if name:
        return parse_dtype(name)
    with safe_open(files[0], "pt") as f:
        stored = f.get_slice(f.keys()[0]).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[stored]

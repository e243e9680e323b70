"""Run Emu3: chat about an image (or plain text), and generate images. The only file that knows prompts.

Tracks the original BAAI `emu3/mllm/processing_emu3.py` + `multimodal_understanding.py` (reference §4.3, §6.1, §8);
the end-to-end parity target is transformers' Emu3Processor + greedy `generate` (tests/test_chat.py).

chat:
    image (H,W,3) -> preprocess (3,H',W') in [-1,1] -> VQ encode -> codes (h,w), h = H'/8
    prompt string = bos + "You are a helpful assistant. USER: " + image block + question + ". ASSISTANT:"
      image block = <|image start|> "h*w" <|image token|> [visual tokens of a row, EOL] x h  EOF <|image end|>
    -> tokenizer -> ids (L,) ; B prompts left-padded to (B,L) with pad; emu3's `pad` (B,) masks the padding
    -> prefill once (static KV cache) -> one token per step: greedy, or temperature / top-k / top-p sampling
    -> stop per row at EOS -> decode (special tokens skipped), streamed to stdout
image: see the "image generation" section.

    python sample.py chat --ckpt DIR --image photo.jpg --prompt "Describe the image"
"""
import argparse
import sys
import time

import torch

# ---- prompts ----

SYSTEM = "You are a helpful assistant."
BOS, BOI, IMG, EOI = "<|extra_203|>", "<|image start|>", "<|image token|>", "<|image end|>"
EOL, EOF = "<|extra_200|>", "<|extra_201|>"


def visual_token(k):
    return f"<|visual token {k:06d}|>"


def image_prompt(codes):
    """codes (h, w) -> the image block string, as the original processor writes it."""
    h, w = codes.shape
    rows = ("".join(visual_token(k) for k in row) for row in codes.tolist())
    # every row, the last included, ends with EOL; then end of frame and end of image
    return f"{BOI}{h}*{w}{IMG}" + EOL.join(rows) + EOL + EOF + EOI


def chat_prompt(question, codes=None):
    """The original chat template; it always puts the image first and appends '.' to the question."""
    image = "" if codes is None else image_prompt(codes)
    return f"{BOS}{SYSTEM} USER: {image}{question}. ASSISTANT:"


# ---- sampling: small pure functions on last-position logits (B, V) ----

def top_k_filter(logits, k):
    # keep scores >= the k-th largest (ties at the threshold kept, as transformers' TopKLogitsWarper)
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    # keep the smallest set of top tokens whose probability reaches p (the most likely one always stays)
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


def next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) fp32 -> (B,) ids. temperature 0 = greedy; else temperature, top-k, top-p, then sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ---- decoding loop ----

def cache_len(n, size, bucket=256):
    """Cache columns a step reads when n are filled: n rounded up to a bucket, at most the cache's size.

    Attention then reads about n columns instead of all `size` (for a 720x720 image, half the cache on average);
    rounding keeps the shapes few, since a compiled step is specialised (a CUDA graph recorded) per shape.
    """
    return min(size, -(-n // bucket) * bucket)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, pick=lambda logits: logits.argmax(-1), on_token=None):
    """prompts: B lists of ids -> B lists of new ids (EOS excluded). on_token(b, id) is called as ids arrive."""
    B, L = len(prompts), max(map(len, prompts))
    dev = model.embed.weight.device
    pad = torch.tensor([L - len(p) for p in prompts], device=dev)  # (B,) left padding per row
    tokens = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=dev)  # (B, L)
    size = L + max_new_tokens
    model.setup_cache(B, size)
    logits = model(tokens, input_pos=torch.arange(L, device=dev), pad=pad, last_only=True,
                   kv_len=cache_len(L, size))[:, -1]  # (B, V)
    out, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=dev)
    for i in range(max_new_tokens):
        tok = torch.where(done, pad_id, pick(logits))  # (B,): finished rows keep feeding pad
        for b in (~done & (tok != eos_id)).nonzero()[:, 0].tolist():
            out[b].append(tok[b].item())
            if on_token:
                on_token(b, out[b][-1])
        done |= tok == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        # one token per row at cache column L + i
        logits = model(tok[:, None], input_pos=torch.tensor([L + i], device=dev), pad=pad,
                       kv_len=cache_len(L + i + 1, size))[:, -1]
    return out


class TextStream:
    """Decode a growing id list incrementally; hold back text while it ends inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def push(self, i):
        self.ids.append(i)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # maybe a character cut between tokens: wait for the next token
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        new, self.text = text[len(self.text):], text
        return new


# ---- chat ----

def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load(ckpt, device, dtype, with_vq):
    from convert import load_emu3, load_tokenizer, load_vqvae, parse_device
    device = parse_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    model, cfg = load_emu3(ckpt, device, dtype)
    vq = load_vqvae(ckpt, device) if with_vq else None
    return model, cfg, vq, load_tokenizer(ckpt)


def chat(ckpt, prompt, image, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, min_pixels, max_pixels):
    from vqvae import open_image, preprocess
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1")
    if max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    prompts, images = prompt, image or []
    # pair questions and images: equal counts, or one of either shared by all
    if images and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
        raise ValueError(f"got {len(prompts)} prompts and {len(images)} images: give equal numbers, or one of either")
    n = max(len(prompts), len(images))
    prompts = prompts * n if len(prompts) == 1 else prompts
    pictures = [open_image(p) for p in images]  # read every file before loading the model
    pictures = pictures * n if len(pictures) == 1 else pictures

    t0 = time.perf_counter()
    model, cfg, vq, tok = load(ckpt, device, dtype, with_vq=bool(pictures))
    log(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s")
    codes = [None] * n
    if pictures:
        t0 = time.perf_counter()
        dev = next(vq.parameters()).device
        with torch.no_grad():  # one image at a time, like the original processor (padding_image=False)
            codes = [vq.encode(preprocess(im, min_pixels, max_pixels, vq.spatial_factor)[None].to(dev))[0].cpu()
                     for im in pictures]  # each (h, w)
        log(f"image grids {[tuple(c.shape) for c in codes]} in {time.perf_counter() - t0:.1f}s")
    # the whole prompt as one string, specials included, tokenized like the original (NFC, specials matched)
    ids = [tok.encode(chat_prompt(q, c), add_special_tokens=False).ids for q, c in zip(prompts, codes)]
    longest = max(map(len, ids))
    if longest >= cfg.max_seq_len:
        raise ValueError(f"prompt is {longest} tokens; the model has {cfg.max_seq_len} positions")
    if longest + max_new_tokens > cfg.max_seq_len:
        max_new_tokens = cfg.max_seq_len - longest
        log(f"max-new-tokens cut to {max_new_tokens} to fit {cfg.max_seq_len} positions")

    gen = torch.Generator(model.embed.weight.device).manual_seed(seed) if seed is not None else None
    pick = lambda logits: next_token(logits, temperature, top_k, top_p, gen)
    streams = [TextStream(tok) for _ in range(n)]

    first = []  # time of the first new token = end of prefill

    def on_token(b, i):
        first.append(first[0] if first else time.perf_counter())
        text = streams[b].push(i)
        if n == 1 and text:  # a single answer streams; a batch prints its answers at the end, in order
            print(text, end="", flush=True)

    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, cfg.eos_id, cfg.pad_id, pick, on_token)
    t1 = time.perf_counter()
    for s in streams:
        text = s.flush()
        print(s.text if n > 1 else text, flush=True)
    steps = max(map(len, out))
    if steps:
        log(f"prompt {longest} tokens x {n}: prefill {first[0] - t0:.2f}s, {steps} steps in {t1 - first[0]:.2f}s "
            f"({(steps - 1) / max(t1 - first[0], 1e-9):.1f} steps/s after the first)")


# ---- image generation ----
# Text -> image, the official Emu3-Gen recipe (reference §6.2, §6.3, §7):
#   cond   = bos + text + POSITIVE_PROMPT + boi + "h*w" + img      (h, w: token grid from --ratio W:H and --area)
#   uncond = bos + NEGATIVE_PROMPT      + boi + "h*w" + img      (the official negative prompt keeps the image prefix)
#   ONE left-padded batch of 2B rows (B cond, then B uncond; emu3's `pad` gives each row its own positions)
#   -> prefill once -> h*(w+1)+3 steps: logits (2B,V') over the grid window (the ids the grid rule can allow)
#      -> CFG in log-softmax space (B,V') -> grid mask -> top-k
#      -> sample (B,) -> fed to both halves. The grid mask forces an EOL after each row of w visual tokens and
#      EOF, EOI, EOS at the end, so every image has exactly the layout of reference §4.3.
#   tokens (B, h*(w+1)+3) -> drop EOL column and tail -> codes (B,h,w) -> VQVAE.decode (fp32) -> (B,3,8h,8w) -> PNG
#
#     python sample.py image --ckpt DIR --prompt "a red fox in the snow" --ratio 16:9 --seed 0 --out fox.png
POSITIVE_PROMPT = " masterpiece, film grained, best quality."  # leading space on purpose (official scripts)
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


def generate_size(ratio, image_area, factor=8):
    """"W:H" and a target pixel area -> token grid (h, w), as the processors' calculate_generate_size."""
    width, sep, height = ratio.strip().partition(":")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"ratio must be W:H with positive integers (e.g. 16:9), got {ratio!r}")
    if image_area <= 0:
        raise ValueError(f"image area must be positive, got {image_area}")
    width, height = int(width), int(height)
    t = (image_area / (width * height)) ** 0.5
    h, w = int(round(height * t / factor)), int(round(width * t / factor))  # Python round: half to even
    if h < 1 or w < 1:
        raise ValueError(f"image area {image_area} is too small for ratio {ratio}: the token grid would be {h}x{w}")
    return h, w


def gen_prompt_ids(tok, text, h, w, cfg):
    """bos + text + boi + "h*w" + img as ids (the caller appends POSITIVE_PROMPT to cond texts)."""
    # encoded piecewise: the same ids as encoding the joined string, since special tokens split the text anyway
    text_ids = tok.encode(text, add_special_tokens=False).ids
    size_ids = tok.encode(f"{h}*{w}", add_special_tokens=False).ids
    return [cfg.bos_id] + text_ids + [cfg.boi_id] + size_ids + [cfg.img_id]


def cfg_scores(cond_logits, uncond_logits, scale):
    """Classifier-free guidance in log-softmax space, fp32 (B,V): scale * (log p_c - log p_u) + log p_u."""
    c = torch.log_softmax(cond_logits.float(), dim=-1)
    u = torch.log_softmax(uncond_logits.float(), dim=-1)
    return scale * (c - u) + u


def grid_window(cfg):
    """slice(lo, hi): the contiguous ids holding every token the grid rule allows up to EOS (visual tokens, EOL,
    EOF, EOI, EOS; 151846..184621 for the released vocabulary, 32776 of 184622 ids).

    Logits outside it are masked to -inf anyway, and log_softmax over the window differs from log_softmax over the
    whole vocabulary by one constant per row, which CFG, top-k, argmax and softmax sampling all ignore: the tokens
    and their probabilities are the reference's, and lm_head does 5.6x less work.
    """
    ids = (cfg.eol_id, cfg.eof_id, cfg.eoi_id, cfg.eos_id, cfg.visual_offset, cfg.visual_offset + cfg.codebook_size - 1)
    return slice(min(ids), max(ids) + 1)


def grid_mask(off, h, w, cfg, vocab_size, first=0):
    """Additive mask (..., V) over ids first..first+V-1: 0 where the image grid allows a token, -inf elsewhere.

    off (...) long tensor: offset of the token being generated from <|image token|> (1 = first grid token).
    Emu3's prefix_allowed_tokens_fn (reference §7.3): EOL whenever off % (w+1) == 0, checked first; then EOF, EOI,
    EOS at n+1, n+2, n+3 (n = h*(w+1)); PAD after that; otherwise any of the visual tokens. One deliberate
    difference: the EOL rule stops at the grid's end (off <= n). The reference's unbounded rule also fires at EOI's
    slot when w == 1 and at EOS's when w == 2, so those grids never end; for w >= 3 both rules are the same up to EOS.
    """
    n = h * (w + 1)
    ids = torch.arange(first, first + vocab_size, device=off.device)  # (V,)
    single = torch.full_like(off, cfg.pad_id)  # the one allowed token where it is not a visual position
    for at, tok in ((n + 3, cfg.eos_id), (n + 2, cfg.eoi_id), (n + 1, cfg.eof_id)):
        single = torch.where(off == at, tok, single)
    row_end = (off % (w + 1) == 0) & (off <= n)
    single = torch.where(row_end, cfg.eol_id, single)  # (...)
    visual = (ids >= cfg.visual_offset) & (ids < cfg.visual_offset + cfg.codebook_size)  # (V,)
    allowed = torch.where((~row_end & (off < n))[..., None], visual, ids == single[..., None])  # (..., V)
    return torch.zeros(allowed.shape, device=off.device).masked_fill(~allowed, float("-inf"))


def constrain(scores, mask):
    """scores (B,V) + grid mask (V,) -> scores whose finite (or max-float) entries are all allowed tokens.

    Only -inf/inf logits make NaN in CFG (-inf - -inf); they count as -inf. Where no allowed token is left with a
    score, all allowed tokens get 0, the fallback of transformers' PrefixConstrainedLogitsProcessor.
    """
    scores = scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max) + mask
    return torch.where(scores.amax(-1, keepdim=True) == float("-inf"), mask, scores)


def sample_token(scores, greedy, generator=None):
    """scores (B,V), already guided, masked and top-k filtered -> token ids (B,); argmax when greedy.

    Sampling is softmax + multinomial, written out as torch.multinomial's own one-sample path (argmax of p / Exp(1)
    noise): the same draws from the same generator, minus multinomial's host-synchronising validity check.
    """
    if greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def image_scores(model, tokens, input_pos, pad, off, h, w, guidance, top_k, temperature, kv_len=None):
    """One step up to sampling: tokens (2B,T) -> scores (B,V') over grid_window ids for the next token.
    Device-only, no Python state:
    this is the function --compile compiles (static shapes in decode: tokens (2B,1), input_pos (1,), off ();
    kv_len, the cache columns attention reads, takes one value per cache_len bucket).

    Order as transformers' generate: CFG -> grid mask -> temperature -> top-k (the mask adds only 0 or -inf, so
    dividing by the temperature before it is the same thing).
    """
    window = grid_window(model.cfg)
    logits = model(tokens, input_pos=input_pos, pad=pad, last_only=True, vocab=window, kv_len=kv_len)[:, -1]
    # logits (2B, V') fp32
    B = logits.shape[0] // 2
    scores = cfg_scores(logits[:B], logits[B:], guidance) / temperature  # (B, V'): cond rows first, then uncond
    scores = constrain(scores, grid_mask(off, h, w, model.cfg, scores.shape[-1], first=window.start))
    return scores if top_k == 1 else top_k_filter(scores, top_k)  # greedy: argmax needs no top-k


@torch.no_grad()
def generate_image_tokens(model, cond_ids, neg_ids, h, w, guidance=3.0, top_k=2048, temperature=1.0,
                          generator=None, compile=False, progress=None):
    """B prompts and B negative prompts (id lists ending in <|image token|>) -> tokens (B, h*(w+1)+3), on device.

    cond and uncond rows run as ONE batch of 2B rows with one static KV cache; every step both halves are fed
    the token sampled from the guided scores (reference §7.2). The loop never reads a value back to the host.
    """
    cfg, dev = model.cfg, model.embed.weight.device
    rows = list(cond_ids) + list(neg_ids)
    B, L, n_new = len(cond_ids), max(map(len, rows)), h * (w + 1) + 3
    if L + n_new > cfg.max_seq_len:
        raise ValueError(f"a {h}x{w} token image needs {n_new} tokens after the {L}-token prompt, more than the "
                         f"model's {cfg.max_seq_len} positions: use a smaller --area")
    tokens = torch.tensor([[cfg.pad_id] * (L - len(r)) + r for r in rows], device=dev)  # (2B, L) left padded
    pad = torch.tensor([L - len(r) for r in rows], device=dev)  # (2B,)
    model.setup_cache(2 * B, L + n_new)
    step = torch.compile(image_scores, mode="reduce-overhead", fullgraph=True) if compile else image_scores
    args = (h, w, guidance, top_k, temperature)

    # prefill the prompts eagerly (prompt-length shapes, run once); off = 1: the first grid token comes next
    off = torch.ones((), dtype=torch.long, device=dev)
    size = L + n_new
    scores = image_scores(model, tokens, torch.arange(L, device=dev), pad, off, *args, kv_len=cache_len(L, size))
    out = torch.empty(B, n_new, dtype=torch.long, device=dev)
    first = grid_window(cfg).start  # scores index the grid window: index + first = token id
    t0 = time.perf_counter()
    for i in range(n_new):
        nxt = sample_token(scores, top_k == 1, generator) + first  # (B,)
        out[:, i] = nxt
        if i + 1 == n_new:  # the grid mask made this EOS: done
            break
        # both halves get the conditionally sampled token, in cache column L+i; the token after it has offset i+2
        input_pos, off = torch.full((1,), L + i, device=dev), off + 1
        scores = step(model, nxt.repeat(2)[:, None], input_pos, pad, off, *args, kv_len=cache_len(L + i + 1, size))
        if progress is not None and (i + 1) % (w + 1) == 0:  # a row done (host-side count: no sync)
            progress((i + 1) // (w + 1), h, B * (i + 1), time.perf_counter() - t0)
    return out


def tokens_to_codes(tokens, h, w, cfg):
    """(B, h*(w+1)+3) -> codes (B,h,w): drop EOF/EOI/EOS, view rows with their EOL, drop EOL, subtract the offset."""
    return tokens[:, : h * (w + 1)].view(-1, h, w + 1)[:, :, :w] - cfg.visual_offset


def image(ckpt, prompt, negative_prompt, ratio, area, guidance, top_k, temperature, batch, out, seed, device, dtype,
          compile):
    from pathlib import Path
    from convert import emu3_config, read_config
    from vqvae import postprocess
    prompts = [p for p in prompt for _ in range(batch)]  # each prompt `batch` times
    if any(not p.strip() for p in prompts) or batch < 1:
        raise ValueError("empty prompt" if batch >= 1 else f"--batch must be >= 1, got {batch}")
    if top_k < 1 or temperature <= 0:
        raise ValueError(f"need --top-k >= 1 and --temperature > 0, got {top_k} and {temperature}")
    # fail fast, before the slow load: a checkpoint with no VQ-VAE cannot draw the image; bad ratio or area
    fmt, conf = read_config(ckpt)
    if fmt == "original" or (fmt == "ours" and "vqvae" not in conf):
        raise ValueError(f"{ckpt} has no VQ-VAE (vision tokenizer): convert it with `convert.py --vq VQ_DIR`")
    cfg = emu3_config(ckpt)
    h, w = generate_size(ratio, area or cfg.image_area)
    if h * (w + 1) + 3 >= cfg.max_seq_len:  # the exact check, prompt included, comes after tokenizing
        raise ValueError(f"a {h}x{w} token image needs {h * (w + 1) + 3} tokens, more than the model's "
                         f"{cfg.max_seq_len} positions: use a smaller --area")

    t0 = time.perf_counter()
    model, cfg, vq, tok = load(ckpt, device, dtype, with_vq=True)
    log(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s; {len(prompts)} image(s) of {h}x{w} tokens "
        f"({h * vq.spatial_factor}x{w * vq.spatial_factor} px), {h * (w + 1) + 3} steps")
    cond = [gen_prompt_ids(tok, p + POSITIVE_PROMPT, h, w, cfg) for p in prompts]
    neg = [gen_prompt_ids(tok, negative_prompt, h, w, cfg)] * len(prompts)
    seed = torch.seed() % 2**63 if seed is None else seed
    gen = torch.Generator(model.embed.weight.device).manual_seed(seed)
    log(f"seed {seed}")

    def progress(rows, h, n_tokens, dt):
        left = dt / rows * (h - rows)
        log(f"row {rows}/{h}  {n_tokens / dt:.1f} tokens/s  {left:.0f}s left")

    t0 = time.perf_counter()
    tokens = generate_image_tokens(model, cond, neg, h, w, guidance, top_k, temperature, gen, compile, progress)
    codes = tokens_to_codes(tokens, h, w, cfg).to(vq.quant_conv.conv.weight.device)
    log(f"{tokens.numel()} tokens in {time.perf_counter() - t0:.1f}s")
    del model  # free the decoder before the VQ decode
    out = Path(out)
    paths = [out] if len(prompts) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(prompts))]
    with torch.no_grad():
        for c, path in zip(codes, paths):  # one image at a time: the full-size VQ decoder is memory hungry
            postprocess(vq.decode(c[None])[0]).save(path)
            print(path, flush=True)


def add_image_parser(sub, common):
    p = sub.add_parser("image", parents=[common], help="generate an image from a text prompt")
    p.add_argument("--prompt", action="append", required=True, help="what to draw; repeat for several images")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="unconditional prompt of CFG (official default)")
    p.add_argument("--ratio", default="1:1", help="aspect ratio W:H")
    p.add_argument("--area", type=int, default=None, help="target pixel area (default: the checkpoint's image_area, "
                                                          "518400 = 720x720 for Emu3-Gen)")
    p.add_argument("--cfg", dest="guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--top-k", type=int, default=2048, help="sample among the k best tokens; 1 = greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="image.png", help="output PNG; several images: stem_0.png, stem_1.png, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU fast path)")
    p.set_defaults(run=image)


# ---- command line ----

def parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="checkpoint dir written by convert.py")
    common.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    common.add_argument("--dtype", default="bfloat16", help="decoder dtype: bfloat16, float32 or float16 (VQ stays fp32)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", parents=[common], help="answer a question about an image (or plain text)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="question; repeat for a batch")
    p.add_argument("--image", action="append", default=None, help="image file; repeat for a batch (pairs with --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the reference default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--min-pixels", type=int, default=512 * 512, help="input images are resized to at least this area")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="... and at most this area")
    p.set_defaults(run=chat)
    add_image_parser(sub, common)
    return ap


if __name__ == "__main__":
    args = vars(parser().parse_args())
    run = args.pop("run")
    args.pop("command")
    try:
        run(**args)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

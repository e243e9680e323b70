"""The jobs: chat about images (Emu3-Chat), generate images (Emu3-Gen), and a VQ-VAE round trip; command line and API.

    python sample.py chat  --ckpt DIR --image photo.jpg --prompt "Describe the image."
    python sample.py chat  --ckpt DIR --raw --prompt "Compare <image> with <image>." --image a.jpg --image b.jpg
    python sample.py chat  --ckpt DIR --messages conversation.json
    python sample.py image --ckpt DIR --prompt "a red fox in the snow" --ratio 16:9 --seed 0 --out fox.png
    python sample.py recon --ckpt DIR --image photo.jpg --out recon.png

From Python (strings and PIL images in, strings and PIL images out; run from the repository's folder):
    import sample
    m = sample.load("toy/ckpt")
    [circle] = sample.images(m, ["a large red circle in the center"], seed=0)
    [answer] = sample.chat(m, ["Describe the image."], [circle])

chat:  images -> preprocess -> VQ encode, each image alone -> codes (h, w) -> prompt string (prompts.py)
       -> ids, B prompts left padded -> generate.generate_text (prefill, then one token per step) -> text
image: prompt strings for the cond and the negative prompt -> ids -> generate.generate_image_tokens
       (CFG over 2B rows, grid rule, keyed sampling; sequential or --parallel N) -> codes -> VQ decode -> PNG
Any checkpoint directory works: ours (checkpoint.py), or a released one converted in memory (convert.py).
"""
import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import checkpoint
import configs
import convert
import generate
import prompts
import tp
from emu3 import Emu3
from vqvae import ImageConfig, postprocess, preprocess, smart_resize

MAX_SEED = 2**63  # seeds are 0 .. 2^63 - 1


def log(*args):
    if tp.first():  # under torchrun, the first process speaks for all
        print(*args, file=sys.stderr, flush=True)


# ---- loading ----

@dataclass
class Loaded:
    """A checkpoint ready to run: decoder (None for recon), its config, VQ-VAE, tokenizer, input-image settings."""
    model: object
    cfg: object
    vq: object
    tokenizer: object
    image: ImageConfig
    training: dict = None  # what a toy was trained on, if the config records it


def settings(ckpt, decoder=True):
    """What a checkpoint directory says, read before any weight: (format module, Emu3Config (None without a
    decoder, or when decoder=False), ImageConfig, whether it holds a VQ-VAE, training record). The same message for
    a missing folder from every command."""
    checkpoint.checkpoint_dir(ckpt)
    if checkpoint.is_ours(ckpt):
        conf = checkpoint.read_config(ckpt)
        return checkpoint, conf.get("emu3"), conf["image"], "vqvae" in conf, conf.get("training")
    cfg, image_cfg, has_vq = configs.check_release(ckpt, decoder)
    return convert, cfg, image_cfg, has_vq, None


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """bf16 on a GPU; fp32 on a CPU, where bf16 is slower (1.8 s against 0.9 s for ten toy images here) and
    --parallel gives the sequential image only up to bf16 rounding."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def image_factor(ckpt):
    """Pixels per code of the checkpoint's VQ-VAE, from its config (every released one: 8)."""
    vq_cfg = checkpoint.read_config(ckpt).get("vqvae") if checkpoint.is_ours(ckpt) else None
    return 8 if vq_cfg is None else 2 ** (len(vq_cfg.ch_mult) - 1)


def load(ckpt, device=None, dtype=None, vq=True, decoder=True, int8=False, tensor_parallel=False):
    """Any checkpoint directory -> Loaded. device None: cuda when there is one, else cpu; dtype None: bfloat16 on
    cuda, float32 on a CPU (default_dtype). The VQ-VAE stays fp32. The decoder's state_dict keeps the checkpoint's
    names (a loaded model saves, converts and trains as it is). int8: the decoder's matrices in int8 (quantize.py;
    an int8 checkpoint always is). tensor_parallel: this process's part of the decoder, under torchrun (tp.py);
    every process then runs every call together."""
    device = checkpoint.parse_device(tp.device_for(device or default_device()))
    dtype = dtype or default_dtype(device)
    source, cfg, image_cfg, has_vq, training = settings(ckpt, decoder)
    if vq and not has_vq:
        raise ValueError(f"{ckpt} has no VQ-VAE (vision tokenizer): convert it with `convert.py --vq VQ_DIR`")
    shard = tp.setup(device, cfg, tensor_parallel) if decoder else None
    model = source.load_emu3(ckpt, device, dtype, int8=int8, shard=shard)[0] if decoder else None
    tokenizer = source.load_tokenizer(ckpt) if decoder else None
    return Loaded(model, cfg, source.load_vqvae(ckpt, device) if vq else None, tokenizer, image_cfg, training)


def vq_precision():
    """The VQ-VAE runs in full fp32 on every device, as the tests run it: no TF32 in its convolutions (cuDNN allows
    it by default; BAAI's scripts ran with it), which would move codes at near-ties."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def open_image(path):
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return image


@torch.no_grad()
def encode_images(m, pictures, min_pixels=None, max_pixels=None):
    """PIL images -> code grids (h, w), one image at a time, like the original processor (padding_image=False)."""
    lo, hi = min_pixels or m.image.min_pixels, max_pixels or m.image.max_pixels
    dev = m.vq.quant_conv.conv.weight.device
    for p in pictures:
        check_vq_memory(m.vq.cfg, *smart_resize(p.height, p.width, m.vq.spatial_factor, lo, hi), 1, dev)
    with vq_precision():
        return [m.vq.encode(preprocess(p, lo, hi, m.vq.spatial_factor, m.image.transparency)[None].to(dev))[0].cpu()
                for p in pictures]


# ---- chat ----

def check_seed(seed):
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise ValueError(f"--seed must lie in [0, 2^63), got {seed}")


def check_finite(**values):
    """nan and inf are refused by name (argparse's float() accepts them)."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def check_list(name, value, of=str):
    """A list (or tuple) where one is expected: a lone string would otherwise run as one prompt per character."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of {of.__name__}s, got {type(value).__name__} {value!r:.60}")


def check_sampling(temperature, top_k, top_p, seed):
    check_finite(temperature=temperature, top_p=top_p)
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1")
    check_seed(seed)


def check_questions(questions):
    if any(not q.strip() for q in questions):
        raise ValueError("empty --prompt: ask a question")


@torch.no_grad()
def chat(m, questions=(), pictures=(), *, raw=False, messages=None, system=prompts.SYSTEM, max_new_tokens=None,
         temperature=0.0, top_k=None, top_p=None, seed=0, min_pixels=None, max_pixels=None, compile_step=False,
         on_tokens=None):
    """Answers (strings) to B prompts with their images (PIL). Three forms:
    default   the original template, one image before each question (or one question for all images, or text only)
    raw       each prompt used verbatim, "<image>" replaced by the next image's block (transformers' processor)
    messages  a list of conversations in transformers' format (image parts hold "image": a PIL image or a file
              path, or "path": a file path).
    max_new_tokens None: as many as fit in the model's positions, at most 1024; a larger number asked for is cut
    to fit, with a note. Sampling (temperature > 0) keeps the 50 most likely tokens unless top_k says otherwise, as
    transformers' generate does by default."""
    check_list("questions", questions)
    check_list("pictures", pictures, Image.Image)
    if messages is not None:
        check_list("messages", messages, list)
    check_sampling(temperature, top_k, top_p, seed)
    check_questions(questions)
    messages = [prompts.check_messages(c) for c in messages] if messages else None
    prompts.images_needed(list(questions), len(pictures), raw, messages)  # counts checked before any image is read
    if messages:
        pictures = [p["image"] if isinstance(p.get("image"), Image.Image) else open_image(p.get("image") or p["path"])
                    for c in messages for msg in c for p in msg["content"] if p["type"] == "image"]
    codes = encode_images(m, pictures, min_pixels, max_pixels) if pictures else []
    texts = prompts.chat_texts(list(questions), codes, raw, messages, system)
    ids = [prompts.encode(m.tokenizer, t) for t in texts]
    longest = max(map(len, ids))
    if longest >= m.cfg.max_seq_len:
        raise ValueError(f"prompt is {longest} tokens; the model has {m.cfg.max_seq_len} positions")
    if max_new_tokens is None:
        max_new_tokens = min(1024, m.cfg.max_seq_len - longest)
    elif longest + max_new_tokens > m.cfg.max_seq_len:
        max_new_tokens = m.cfg.max_seq_len - longest
        log(f"max-new-tokens cut to {max_new_tokens} to fit {m.cfg.max_seq_len} positions")
    if temperature > 0 and top_k is None:
        top_k = 50  # transformers' GenerationConfig default, which both references sample with
    out = generate.generate_text(m.model, ids, max_new_tokens, m.cfg.eos_id, m.cfg.pad_id, temperature, top_k, top_p,
                                 seed or 0, on_tokens, compile_step)  # row b samples with seed + b
    return [m.tokenizer.decode(o, skip_special_tokens=True) for o in out]


def run_chat(ckpt, prompt, image, raw, messages, system, max_new_tokens, temperature, top_k, top_p, seed, device,
             dtype, min_pixels, max_pixels, threads, compile_step, int8=False, tensor_parallel=False):
    """`python sample.py chat`: every input is read and checked before the model loads. Under torchrun: --tp splits
    the decoder over the processes; without it, each process answers its share of the prompts (data parallel)."""
    check_sampling(temperature, top_k, top_p, seed)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    check_pixels(min_pixels, max_pixels)
    if messages and (prompt or raw):
        raise ValueError("--messages takes the whole conversation: give it without --prompt and --raw")
    if not messages and not prompt:
        raise ValueError("give --prompt (or --messages)")
    check_questions(prompt or [])
    convs = [read_messages(f) for f in messages or []]
    need = prompts.images_needed(prompt or [], len(image or []), raw, convs)
    pictures = [open_image(p) for p in image or []]  # read every file before loading the model
    device = checkpoint.parse_device(tp.device_for(device))
    _, cfg, image_cfg, _, _ = settings(ckpt)
    set_threads(threads, cfg)
    for path, picture in zip(image or [], pictures):  # sizes the VQ-VAE cannot take, before it loads
        try:
            smart_resize(picture.height, picture.width, image_factor(ckpt), min_pixels or image_cfg.min_pixels,
                         max_pixels or image_cfg.max_pixels)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    tp.setup(device, cfg, tensor_parallel)  # --tp's checks, then torchrun's processes joined
    if temperature > 0 and seed is None:
        seed = tp.gather([random.randrange(MAX_SEED)])[0]  # the first process's draw, so that all agree
    if temperature > 0:
        log(f"seed {seed}")
    n = len(need)
    lo, hi = (0, n) if tensor_parallel else tp.share(n, *tp.rank_world())  # this process's prompts
    prompt, pictures, convs = chat_share(prompt or [], pictures, raw, convs, need, lo, hi)
    t0 = time.perf_counter()
    m = load(ckpt, device, dtype, vq=any(need), int8=int8, tensor_parallel=tensor_parallel)
    log(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s")
    streams = [generate.TextStream(m.tokenizer) for _ in range(hi - lo)]

    def on_tokens(b, ids):
        text = streams[b].push(ids)
        if n == 1 and text and tp.first():  # a single answer streams; a batch prints its answers at the end
            print(text, end="", flush=True)

    if compile_step:
        log("--compile: the first step compiles the decode step (seconds for the toy, about a minute for the 8.5B)")
    t0 = time.perf_counter()
    if hi > lo:
        chat(m, prompt, pictures, raw=raw, messages=convs, system=system, max_new_tokens=max_new_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, seed=None if seed is None else seed + lo,
             min_pixels=min_pixels, max_pixels=max_pixels, compile_step=compile_step, on_tokens=on_tokens)
    tails = [s.flush() for s in streams]
    answers = [s.text for s in streams] if tensor_parallel else tp.gather([s.text for s in streams])  # in order
    if tp.first():
        for text in answers if n > 1 else tails:
            print(text, flush=True)
    steps = max((len(s.ids) for s in streams), default=0)
    log(f"{n} answer(s), {steps} tokens at most, in {time.perf_counter() - t0:.2f}s")


def chat_share(questions, pictures, raw, convs, need, lo, hi):
    """The inputs of prompts lo..hi-1 of a chat batch (need: each prompt's image count, prompts.images_needed):
    (questions, pictures, conversations) in the same form. One question or one image shared by all stays shared."""
    if convs:
        return questions, pictures, convs[lo:hi]
    if not raw and len(questions) == 1:
        return questions, pictures[lo:hi] if len(pictures) > 1 else pictures, convs
    if not raw and len(pictures) == 1:
        return questions[lo:hi], pictures, convs
    return questions[lo:hi], pictures[sum(need[:lo]):sum(need[:hi])], convs


def read_messages(path):
    """A conversation file (JSON, transformers' format); image paths are relative to the file's folder."""
    conv = prompts.check_messages(checkpoint.read_json(path), path)
    for msg in conv:
        for part in msg["content"]:
            if part["type"] == "image":
                if not isinstance(part.get("path"), str):
                    raise ValueError(f"{path}: an image part needs a \"path\"")
                part["image"] = open_image(os.path.join(os.path.dirname(os.path.abspath(path)), part["path"]))
    return conv


# ---- images ----

@torch.no_grad()
def images(m, texts, ratios=("1:1",), *, negative_prompt=prompts.NEGATIVE_PROMPT, area=None, guidance=3.0,
           top_k=2048, temperature=1.0, seed=0, parallel=0, compile_step=False, quality_suffix=True, progress=None,
           preview=None, preview_rows=8, return_passes=False):
    """Text prompts -> PIL images, one per prompt. ratios: one "W:H" for all, or one per prompt; image b is drawn
    with seed + b (so it equals generating it alone with that seed). quality_suffix: append the official
    scripts' " masterpiece, film grained, best quality." to each prompt (prompts.POSITIVE_PROMPT).
    preview(pictures): called every preview_rows grid rows with the images so far (rows not drawn yet grey).
    return_passes: return (images, decoder forward passes) instead."""
    check_list("texts", texts)
    check_list("ratios", ratios)
    check_image_args(texts, ratios, area, guidance, top_k, temperature, seed, parallel)
    if m.vq is None:
        raise ValueError("this model was loaded without its VQ-VAE (sample.load(..., vq=False)): images need it")
    if m.vq.cfg.codebook_size != m.cfg.codebook_size:
        raise ValueError(f"the VQ-VAE has {m.vq.cfg.codebook_size} codes and the decoder {m.cfg.codebook_size} "
                         f"visual tokens: its images could not be decoded")
    ratios = list(ratios) * len(texts) if len(ratios) == 1 else list(ratios)
    grids = [prompts.generate_size(r, m.cfg.image_area if area is None else area) for r in ratios]
    cond, neg = image_prompts(m.tokenizer, texts, grids, negative_prompt, quality_suffix)
    check_image_length(m.cfg, cond + neg, grids, parallel)
    show = None
    if preview is not None:
        show = lambda tokens, n: preview(decode(m, tokens, grids, partial=True))
    tokens, passes = generate.generate_image_tokens(m.model, cond, neg, grids, guidance, top_k, temperature, seed,
                                                    compile_step, parallel, progress, show, preview_rows)
    pictures = decode(m, tokens, grids)
    return (pictures, passes) if return_passes else pictures


def image_prompts(tokenizer, texts, grids, negative_prompt=prompts.NEGATIVE_PROMPT, quality_suffix=True):
    """The ids of the conditional and the negative prompts, one of each per image."""
    suffix = prompts.POSITIVE_PROMPT if quality_suffix else ""
    cond = [prompts.encode(tokenizer, prompts.gen_prompt(t + suffix, h, w)) for t, (h, w) in zip(texts, grids)]
    neg = [prompts.encode(tokenizer, prompts.gen_prompt(negative_prompt, h, w)) for h, w in grids]
    return cond, neg


def check_image_length(cfg, rows, grids, parallel):
    """Every image fits in the model's positions after its prompt, the --parallel window's overhang included: a
    one-line error naming what is too long, before any generation."""
    longest, n_new = max(map(len, rows)), max(h * (w + 1) + 3 for h, w in grids)
    window = max(1, parallel) - 1
    if longest + n_new + window <= cfg.max_seq_len:
        return
    if longest > cfg.max_seq_len // 2:
        raise ValueError(f"the prompt is {longest} tokens: too long for a {n_new}-token image in the model's "
                         f"{cfg.max_seq_len} positions; shorten --prompt (or --negative-prompt)")
    if window and longest + n_new <= cfg.max_seq_len:
        raise ValueError(f"--parallel {parallel} reaches {window} positions past the image, beyond the model's "
                         f"{cfg.max_seq_len}: use at most --parallel {cfg.max_seq_len - longest - n_new + 1}")
    raise ValueError(f"a {n_new}-token image after the {longest}-token prompt needs more than the model's "
                     f"{cfg.max_seq_len} positions: use a smaller --area")


def decode(m, tokens, grids, partial=False):
    """Token rows (B, >= n) -> PIL images through the VQ-VAE, one at a time (the full-size decoder is memory
    hungry). partial: tokens of an image still being drawn; its complete grid rows are shown, the rest grey. (The
    whole grid is decoded with the last complete row repeated below it: the decoder's GroupNorms see the whole
    image, and a grid cut short would shift its colours.)"""
    pictures = []
    with vq_precision():
        for row, (h, w) in zip(tokens, grids):
            rows = min(h, row.shape[0] // (w + 1)) if partial else h
            picture = Image.new("RGB", (8 * w, 8 * h), (128, 128, 128))
            if rows:
                codes = grid_codes(row, rows, h, w, m.cfg)
                decoded = postprocess(m.vq.decode(codes.to(m.vq.quant_conv.conv.weight.device))[0])
                picture.paste(decoded.crop((0, 0, 8 * w, 8 * rows)), (0, 0))
            pictures.append(picture)
    return pictures


def grid_codes(tokens, rows, h, w, cfg):
    """(1, h, w) codes from an image's first rows (< h: the last of them repeated down to h)."""
    codes = tokens[: rows * (w + 1)].reshape(rows, w + 1)[:, :w] - cfg.visual_offset  # (rows, w)
    return torch.cat([codes, codes[-1:].expand(h - rows, w)])[None]


def check_image_args(texts, ratios, area, guidance, top_k, temperature, seed, parallel):
    check_finite(cfg=guidance, temperature=temperature)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("empty prompt")
    if len(ratios) not in (1, len(texts)):
        raise ValueError(f"got {len(ratios)} ratios for {len(texts)} prompts: give one, or one per prompt")
    if area is not None and area <= 0:
        raise ValueError(f"--area must be positive, got {area}")
    if guidance < 0:
        raise ValueError(f"--cfg must be >= 0, got {guidance}")
    if top_k < 1 or temperature <= 0:
        raise ValueError(f"need --top-k >= 1 and --temperature > 0, got {top_k} and {temperature}")
    check_seed(seed)
    if parallel < 0:
        raise ValueError(f"--parallel must be >= 0, got {parallel}")


def image_paths(out, n):
    """The PNG paths of n images, checked before anything runs: one image -> out, several -> stem_0.png, ..."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name such as {out / 'image.png'}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out} has no image extension (.png, .jpg, ...)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: no folder {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write in {out.parent}")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def save_image(picture, path):
    """Write through a temporary file beside it and rename: never a half-written image at `path`."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        picture.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_image(ckpt, prompt, negative_prompt, ratio, area, guidance, top_k, temperature, batch, parallel, out, seed,
              device, dtype, threads, compile_step, quality_suffix, preview, preview_rows, int8=False,
              tensor_parallel=False):
    """`python sample.py image`: arguments, output paths, the checkpoint's config and the prompts' lengths are
    checked before the model loads. Under torchrun: --tp splits the decoder over the processes (the first writes);
    without it, each process draws and writes its share of the images (data parallel), image k with seed + k."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    texts = [p for p in prompt for _ in range(batch)]  # each prompt `batch` times
    ratios = ratio or ["1:1"]
    if len(ratios) not in (1, len(prompt)):
        raise ValueError(f"got {len(ratios)} --ratio for {len(prompt)} --prompt: give one, or one per prompt")
    ratios = [r for r in (ratios * len(prompt) if len(ratios) == 1 else ratios) for _ in range(batch)]
    check_image_args(texts, ratios, area, guidance, top_k, temperature, seed, parallel)
    if preview_rows < 1:
        raise ValueError(f"--preview-rows must be >= 1, got {preview_rows}")
    paths = image_paths(out, len(texts))
    [preview_path] = image_paths(preview, 1) if preview else [None]
    device = checkpoint.parse_device(tp.device_for(device))
    source, cfg, _, has_vq, training = settings(ckpt)
    if cfg is None or not has_vq:
        raise ValueError(f"{ckpt} has no {'decoder' if cfg is None else 'VQ-VAE'}: image generation needs both "
                         f"(convert an original release with `convert.py --vq VQ_DIR`)")
    tp.setup(device, cfg, tensor_parallel)  # --tp's checks, then torchrun's processes joined
    set_threads(threads, cfg)
    grids = [prompts.generate_size(r, cfg.image_area if area is None else area) for r in ratios]
    cond, neg = image_prompts(source.load_tokenizer(ckpt), texts, grids, negative_prompt, quality_suffix)
    check_image_length(cfg, cond + neg, grids, parallel)  # exact, prompts included, before the weights load
    for h, w in dict.fromkeys(grids):  # each grid once, in prompt order
        log(f"grid {h} rows x {w} columns of tokens = {8 * w}x{8 * h} px (width x height), {h * (w + 1) + 3} tokens")
        if training and training.get("image_grid") and [h, w] != training["image_grid"]:
            gh, gw = training["image_grid"]
            log(f"note: this checkpoint was trained on {gh}x{gw} grids ({8 * gw}x{8 * gh} px) only: "
                f"{h}x{w} is outside what it learned")
    seed = tp.gather([random.randrange(MAX_SEED)])[0] if seed is None else seed  # the first process's draw
    log(f"seed {seed}")
    lo, hi = (0, len(texts)) if tensor_parallel else tp.share(len(texts), *tp.rank_world())  # this process's images
    t0 = time.perf_counter()
    m = load(ckpt, device, dtype, int8=int8, tensor_parallel=tensor_parallel)
    log(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s")
    if compile_step:
        log("--compile: the first step compiles the decode step (seconds for the toy, about a minute for the 8.5B)")
    eta = {}

    def progress(done, total, passes, dt):
        if "first" not in eta and compile_step:
            log(f"first step (compiled) in {dt:.1f}s")
        first = eta.setdefault("first", (done, dt))  # rates from the first report on: compiling is not counted
        rate = (done - first[0]) / max(dt - first[1], 1e-9)
        left = f", {(total - done) / rate:.0f}s left" if done > first[0] else ""
        log(f"token {done}/{total}, {passes} forward passes, {done / max(dt, 1e-9):.1f} tokens/s{left}")

    def show(pictures):  # the batch side by side, rewritten in place
        strip = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)), (128, 128, 128))
        for i, p in enumerate(pictures):
            strip.paste(p, (sum(q.width for q in pictures[:i]), 0))
        save_image(strip, preview_path)

    t0 = time.perf_counter()
    pictures, passes = images(m, texts[lo:hi], ratios[lo:hi], negative_prompt=negative_prompt, area=area,
                              guidance=guidance, top_k=top_k, temperature=temperature, seed=seed + lo,
                              parallel=parallel, compile_step=compile_step, quality_suffix=quality_suffix,
                              progress=progress, preview=show if preview and tp.first() else None,
                              preview_rows=preview_rows, return_passes=True) if hi > lo else ([], 0)
    n_tokens = sum(h * (w + 1) + 3 for h, w in grids[lo:hi])
    log(f"{hi - lo} image(s), {n_tokens} tokens in {time.perf_counter() - t0:.1f}s, {passes} forward passes")
    if tensor_parallel and not tp.first():
        return  # every process drew the same images; the first one writes them
    for picture, path in zip(pictures, paths[lo:hi]):
        save_image(picture, path)
    written = paths if tensor_parallel else tp.gather(paths[lo:hi])  # once every process has written its own
    if tp.first():
        for path in written:
            print(path, flush=True)


# ---- recon: an image or a video through the VQ-VAE and back ----

@torch.no_grad()
def run_recon(ckpt, image, frames, out, device, min_pixels, max_pixels, threads):
    """`python sample.py recon`: tokenize an image (or a video's frames) and reconstruct it."""
    set_threads(threads)
    check_pixels(min_pixels, max_pixels)
    if (image is None) == (not frames):
        raise ValueError("give exactly one of --image or --frames")
    if image is not None:
        [out_path] = image_paths(out, 1)
    elif Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file: video frames go into a folder")
    paths = [image] if image is not None else frames
    if frames and Path(frames[0]).is_dir():
        paths = sorted(p for p in Path(frames[0]).iterdir() if p.is_file())
        if not paths:
            raise ValueError(f"--frames {frames[0]}: the folder holds no files")
    pictures = [open_image(p) for p in paths]  # read the inputs first: a bad file fails before the model loads
    for p, im in zip(paths, pictures):
        if im.size != pictures[0].size:
            first = pictures[0]
            raise ValueError(f"frame {p} is {im.width}x{im.height}, the first is {first.width}x{first.height}")
    m = load(ckpt, device, decoder=False)
    tf = m.vq.cfg.temporal_downsample_factor
    if frames and len(pictures) % tf:
        raise ValueError(f"got {len(pictures)} frames: need a positive multiple of {tf}")
    lo, hi = min_pixels or m.image.min_pixels, max_pixels or m.image.max_pixels
    height, width = smart_resize(pictures[0].height, pictures[0].width, m.vq.spatial_factor, lo, hi)
    check_vq_memory(m.vq.cfg, height, width, len(pictures), m.vq.quant_conv.conv.weight.device)
    x = torch.stack([preprocess(p, lo, hi, m.vq.spatial_factor, m.image.transparency) for p in pictures])
    x = (x if image is not None else x[None]).to(m.vq.quant_conv.conv.weight.device)  # (1,3,H,W) or (1,T,3,H,W)
    t0 = time.perf_counter()
    log(f"encoding {len(pictures)} frame(s) of {width}x{height} ...")
    with vq_precision():
        codes = m.vq.encode(x)
        log(f"encoded in {time.perf_counter() - t0:.1f}s; decoding ...")
        t0 = time.perf_counter()
        recon = m.vq.decode(codes)
    log(f"decoded in {time.perf_counter() - t0:.1f}s")
    grid = "x".join(map(str, codes.shape[1:]))
    print(f"grid {grid} (frames x h x w)" if codes.ndim == 4 else f"grid {grid} (h x w)", f"tokens {codes.numel()}")
    if image is not None:
        save_image(postprocess(recon[0]), out_path)
        print(f"wrote {out_path}")
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(recon[0]):
            save_image(postprocess(frame), Path(out) / f"frame_{i:04d}.png")
        print(f"wrote {recon.shape[1]} frames to {out}/")


def vq_memory(cfg, height, width, frames=1):
    """Bytes the VQ-VAE's largest step holds for `frames` frames of height x width, roughly: an attention's fp32
    scores and their softmax (2 n^2 x 4 bytes per frame, n the positions at the finest level with attention), or
    four activations of ch channels at full resolution, whichever is larger."""
    level = min(list(cfg.attn_resolutions) + [len(cfg.ch_mult) - 1])
    n = (height >> level) * (width >> level)
    return max(2 * n * n * 4 * frames, 4 * cfg.ch * height * width * 4 * frames)


def available_memory(device):
    """Free bytes on the device (CUDA: the driver's count; a CPU: /proc/meminfo's MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_vq_memory(cfg, height, width, frames, device):
    """Refuse, before any work, an input the VQ-VAE cannot hold in memory (a 5000x5000 image with a large
    --max-pixels needs some 600 GB for one attention)."""
    need, free = vq_memory(cfg, height, width, frames), available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{frames} frame(s) of {width}x{height} need about {need / 2**30:.0f} GiB in the VQ-VAE, "
                         f"{free / 2**30:.0f} GiB are free: use a smaller --max-pixels")


# ---- command line ----

def auto_threads(cfg):
    """CPU threads when --threads is not given: one per 50M decoder parameters, at most torch's default (every
    core). A small model's steps are too short to share among threads, and collapse when a core is busy: the
    toy took 9.1 s for 45 tokens with torch's default on a busy 2-core machine, 0.2 s with one thread."""
    params = sum(math.prod(shape) for shape in checkpoint.shapes_of(Emu3, cfg).values())
    return max(1, min(torch.get_num_threads(), round(params / 50e6)))


def set_threads(threads, cfg=None):
    """--threads, or auto_threads for the checkpoint's decoder."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif cfg is not None:
        torch.set_num_threads(auto_threads(cfg))


def check_pixels(min_pixels, max_pixels):
    if (min_pixels is not None and min_pixels < 1) or (max_pixels is not None and max_pixels < 1):
        raise ValueError("--min-pixels and --max-pixels must be positive")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (required flags, None, off switches)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="checkpoint dir: ours (convert.py) or a released one")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    common.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: one per 50M decoder parameters, at most every core: 1 for the "
                             "toy; on a busy machine fewer can be much faster)")
    decoder = argparse.ArgumentParser(add_help=False)
    decoder.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one, printed)")
    decoder.add_argument("--dtype", default=None, choices=list(checkpoint.DTYPES),
                         help="decoder dtype (the VQ-VAE stays fp32) (default: bfloat16 on cuda, float32 on a CPU)")
    decoder.add_argument("--compile", dest="compile_step", action="store_true",
                         help="torch.compile the decode step (the GPU fast path)")
    decoder.add_argument("--int8", action="store_true",
                         help="decoder matrices in int8, one scale per row (about half the memory of bf16)")
    decoder.add_argument("--tp", dest="tensor_parallel", action="store_true",
                         help="under torchrun: split the decoder over the processes (tensor parallel); without "
                              "it, torchrun's processes share the prompts (data parallel)")
    pixels = argparse.ArgumentParser(add_help=False)
    pixels.add_argument("--min-pixels", type=int, default=None,
                        help="input images are resized to at least this area (default: the checkpoint's, 512*512)")
    pixels.add_argument("--max-pixels", type=int, default=None, help="... and at most this area (default: 1024*1024)")

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", parents=[common, decoder, pixels], formatter_class=Help,
                       help="answer a question about images (or plain text)")
    p.add_argument("--prompt", action="append", help="question; repeat for a batch")
    p.add_argument("--image", action="append", help="image file; repeat (pairs with --prompt, or fills <image>s)")
    p.add_argument("--raw", action="store_true", help="use each prompt verbatim: no template, <image> marks images")
    p.add_argument("--messages", action="append", help="a conversation as JSON, transformers' format; repeat for "
                                                        "a batch")
    p.add_argument("--system", default=prompts.SYSTEM, help="the system sentence of the default template")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default: 1024, or as many as fit in the model's positions)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the reference default)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default when sampling: 50, as transformers)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.set_defaults(run=run_chat)

    p = sub.add_parser("image", parents=[common, decoder], formatter_class=Help, help="generate images from text")
    p.add_argument("--prompt", action="append", required=True, help="what to draw; repeat for several images")
    p.add_argument("--negative-prompt", default=prompts.NEGATIVE_PROMPT, help="CFG's unconditional prompt")
    p.add_argument("--ratio", action="append", help="aspect ratio W:H; once for all prompts, or once per --prompt "
                                                    "(default: 1:1)")
    p.add_argument("--area", type=int, default=None,
                   help="target pixel area (default: the checkpoint's, 518400 = 720x720 for Emu3-Gen)")
    p.add_argument("--cfg", dest="guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--top-k", type=int, default=2048, help="sample among the k best tokens; 1 = greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--parallel", type=int, default=0,
                   help="decode N tokens per forward pass by Jacobi iteration (the same image, fewer passes)")
    p.add_argument("--out", default="image.png", help="output image; several: stem_0.png, stem_1.png, ...")
    p.add_argument("--no-quality-suffix", dest="quality_suffix", action="store_false",
                   help=f"do not append the official scripts' {prompts.POSITIVE_PROMPT.strip()!r} to each prompt")
    p.add_argument("--preview", default=None, help="rewrite this PNG with the images so far (grey: not drawn yet)")
    p.add_argument("--preview-rows", type=int, default=8, help="grid rows between two previews")
    p.set_defaults(run=run_image)

    p = sub.add_parser("recon", parents=[common, pixels], formatter_class=Help,
                       help="tokenize an image or a video with the VQ-VAE and reconstruct it")
    p.add_argument("--image", default=None, help="input image file")
    p.add_argument("--frames", nargs="+", default=None, help="video: frame files (a multiple of 4) or a folder")
    p.add_argument("--out", default="recon.png", help="output image, or folder of frames for a video")
    p.set_defaults(run=run_recon)
    return ap


def main(argv=None):
    args = vars(parser().parse_args(argv))
    run = args.pop("run")
    args.pop("command")
    try:
        run(**args)
        tp.finish()
    except (ValueError, OSError) as e:
        tp.finish()  # a ValueError is found by every process alike, outside any collective
        sys.exit(f"error: {e}" if tp.first() else 1)  # every process finds it; the first one says it
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

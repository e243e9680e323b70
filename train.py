"""Train a toy Emu3 on CPU (a synthetic shapes world, a small VQ-VAE and a small decoder), or fine-tune any checkpoint
of ours on examples from a JSONL file; both write our checkpoint format.

Everything here goes through the real code: `vqvae.VQVAE` (its encode_latents / quantize_latents / decode_latents
steps), `emu3.Emu3`, `tokenizer.build_tokenizer`, prompts.py's prompt builders and
`checkpoint.save`, so `python sample.py image|chat --ckpt toy/ckpt ...` runs the toy exactly as it runs the released
checkpoints; only config.json (sizes, special-token ids) and tokenizer.json differ.

    draw(scene) -> PIL 48x48 --vqvae.preprocess--> x (B,3,48,48) in [-1,1]
      VQ stage:  x -> VQVAE.encode_latents -> z (B,4,1,6,6) -> nearest code e (quantize_latents),
                   straight-through z + sg(e - z) -> VQVAE.decode_latents (frame 0) -> x' (B,3,48,48)
                 loss = L1 + L2 (shape pixels x5) + |sg(z) - e|^2 + 0.25 |z - sg(e)|^2; a plain autoencoder
                 warm-up, then k-means codebook init and dead-code restarts
      LM stage:  VQVAE.encode -> codes (6,6) -> ids; next-token cross-entropy on the answer part only, averaged
                 per sequence; 60% gen, 40% chat sequences
        gen:  bos caption+POSITIVE <|image start|> 6*6 <|image token|> [6 visual, eol] x 6 eof eoi eos
              (loss on the image block; some captions are the negative prompt or empty: the CFG branch)
        chat: bos "You are a helpful assistant. USER: " <image block> question ". ASSISTANT:" " answer" eos
    -> checkpoint.save -> DIR/{config.json, model-00001-of-00001.safetensors, vqvae.safetensors, tokenizer.json}

The toy has its own tiny byte-level BPE (ranks learnt here from the toy's text, written as a tiktoken file) built by
`convert.build_tokenizer`, so its specials and visual tokens keep the real layout at smaller ids
(pad = n_ranks, bos = n_ranks + 206, visual token k = n_ranks + 211 + k); Emu3Config carries those ids.

Fine-tuning reuses the decoder stage: the same sequence layouts, loss and loop (`fit`), on the examples of a JSONL
file (finetune.py reads and checks them) instead of the toy's pool:

    FILE.jsonl -> examples -> the checkpoint's VQ-VAE (frozen) codes each image -> sequences as sample.py builds
    its prompts (gen_sequence / answer_sequence) -> fit: AdamW, per-step seeded batches, OUT.state.pt every
    --save-every steps -> held-out loss -> checkpoint.save(OUT): the source's configs, VQ-VAE and tokenizer, the
    new weights (LoRA adapters merged), and a record of the fine-tune in config.json's "training"
    one process: CPU or one GPU (bf16 autocast; --lora R: adapters, frozen bf16 weights);
    torchrun: FSDP2 over the processes (finetune.shard)

    python train.py                      # train VQ, then the decoder, into a new folder toy/trained (re-run to resume)
    python train.py --eval --out toy/ckpt --samples grid.png   # score a checkpoint through sample.py, draw a grid
    python train.py finetune --ckpt toy/ckpt --data lesson.jsonl --out toy/ckpt-es      # (--resume after a kill)
    torchrun --nproc-per-node 8 train.py finetune --ckpt ckpt/gen --data data.jsonl --out ckpt/gen-ft --lr 1e-5
The shipped toy/ckpt is never written unless named with --out and --overwrite.
"""
import argparse
import base64
import hashlib
import math
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Regex, pre_tokenizers

import checkpoint
import finetune
import lora
import prompts
import sample
from emu3 import Emu3, Emu3Config
from prompts import NEGATIVE_PROMPT, POSITIVE_PROMPT, SYSTEM
from tokenizer import QWEN_PAT, build_tokenizer
from vqvae import VQVAE, ImageConfig, VQConfig, postprocess, preprocess, to_rgb

# ---- synthetic data: one coloured shape on a light background ----

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 210, 30),
           "green": (40, 170, 60), "blue": (40, 80, 230), "purple": (150, 50, 200)}
SIZES = {"small": 0.50, "large": 0.70}  # side / diameter as a fraction of the image
POSITIONS = {"in the top left": (0, 0), "at the top": (0, 1), "in the top right": (0, 2),
             "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
             "in the bottom left": (2, 0), "at the bottom": (2, 1), "in the bottom right": (2, 2)}
BACKGROUND = (240, 240, 240)
BG = torch.tensor(BACKGROUND).view(1, 3, 1, 1) / 127.5 - 1  # the background in the model's [-1, 1] range
ALL_SCENES = [(sh, co, si, po) for sh in SHAPES for co in COLOURS for si in SIZES for po in POSITIONS]  # 324
# 1 scene in 9 is never trained on: those whose attribute indices sum to 4 mod 9 (one position per shape, colour
# and size). Every attribute value and every pair of values still occurs in training, so a held-out caption asks
# for a new combination of words and looks the model has seen; eval prompts come from these
INDEX = [{v: i for i, v in enumerate(values)} for values in (SHAPES, COLOURS, SIZES, POSITIONS)]
HELD_OUT = [s for s in ALL_SCENES if sum(ix[v] for ix, v in zip(INDEX, s)) % 9 == 4]
TRAIN_SCENES = [s for s in ALL_SCENES if s not in HELD_OUT]


def caption(scene):
    shape, colour, size, pos = scene
    return f"a {size} {colour} {shape} {pos}"


def draw(scene, px=48, rng=random):
    """scene (shape, colour, size, position) -> RGB PIL image px*px, with jittered size, place and colour."""
    shape, colour, size, pos = scene
    img = Image.new("RGB", (px, px), BACKGROUND)
    d = ImageDraw.Draw(img)
    s = SIZES[size] * px * rng.uniform(0.9, 1.1)
    row, col = POSITIONS[pos]
    m = 0.04 * px  # margin
    cx = m + s / 2 + col / 2 * (px - 2 * m - s) + rng.uniform(-1.5, 1.5)
    cy = m + s / 2 + row / 2 * (px - 2 * m - s) + rng.uniform(-1.5, 1.5)
    c = tuple(int(min(255, max(0, v + rng.randint(-15, 15)))) for v in COLOURS[colour])
    x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=c)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=c)
    else:  # upright triangle
        d.polygon(((cx, y0), (x1, y1), (x0, y1)), fill=c)
    return img


def check(img):
    """Colour and shape of the one shape in `img`, from pixel statistics alone -> (colour, shape), None if unsure.

    Foreground = pixels far from the background; colour = nearest palette entry to their mean;
    shape = triangle if the upper half of its bounding box holds little of it, else square or circle by how
    much of the box it fills (1 vs pi/4).
    """
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    mask = np.sqrt(((a - np.array(BACKGROUND, np.float32)) ** 2).sum(-1)) > 80  # (H, W)
    if mask.sum() < 8:
        return None, None
    mean = a[mask].mean(0)
    colour = min(COLOURS, key=lambda n: ((mean - np.array(COLOURS[n])) ** 2).sum())
    rows, cols = np.where(mask.sum(1) >= 2)[0], np.where(mask.sum(0) >= 2)[0]  # ignore stray pixels
    if len(rows) == 0 or len(cols) == 0:
        return colour, None
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    top = box[:len(box) // 2].sum() / max(1, box[:len(box) // 2].sum() + box[(len(box) + 1) // 2:].sum())
    if top < 0.4:  # an upright triangle keeps about 1/4 of its mass in the upper half, circle and square 1/2
        return colour, "triangle"
    return colour, "square" if box.mean() > 0.88 else "circle"


# chat questions -> answer templates
QUESTIONS = {"What shape is this?": "It is a {shape}.",
             "What colour is the shape?": "It is {colour}.",
             "What color is the shape?": "It is {colour}.",
             "Where is the shape?": "It is {pos}.",
             "Is the shape big or small?": "It is {size}.",
             "Describe the image.": "A {size} {colour} {shape} {pos}."}


def answer(question, scene):
    shape, colour, size, pos = scene
    return QUESTIONS[question].format(shape=shape, colour=colour, size=size, pos=pos)


# ---- tokenizer: a tiny byte-level BPE learnt on the toy's own text, then the real build_tokenizer ----

def corpus():
    # the fixed prompt texts are part of the toy's world: image generation appends the positive prompt to every
    # caption and uses the negative prompt as CFG's unconditional text by default
    texts = [caption(s) for s in ALL_SCENES] + [caption(s) + POSITIVE_PROMPT for s in ALL_SCENES]
    texts += [f"{SYSTEM} USER: {q}. ASSISTANT: {answer(q, s)}" for q in QUESTIONS for s in ALL_SCENES]
    return texts + [NEGATIVE_PROMPT] * 20 + ["0123456789*"]  # repeated so the negative prompt gets whole words


def train_bpe(texts, vocab_size):
    """Byte-level BPE ranks {token bytes: rank} on Qwen-regex pieces: 256 bytes, then merges by frequency."""
    split = pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated")
    words = Counter(p.encode() for t in texts for p, _ in split.pre_tokenize_str(t))
    seqs = {w: [bytes([b]) for b in w] for w in words}  # current segmentation of each piece
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(seqs[w], seqs[w][1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # most frequent, ties broken by bytes
        if n < 2:
            break
        ranks[a + b] = len(ranks)
        for w, s in seqs.items():  # apply the new merge left to right
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return ranks


def make_tokenizer(path, n_visual):
    """Learn the toy ranks, write them as a tiktoken file at `path`, build the tokenizer like the real one."""
    ranks = train_bpe(corpus(), 512)
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    return build_tokenizer(path, n_visual=n_visual)


def special_ids(tok):
    """Emu3Config's special-token fields, read off the tokenizer by their strings in the released tokenizer."""
    names = dict(pad_id="<|endoftext|>", eol_id="<|extra_200|>", eof_id="<|extra_201|>", bos_id="<|extra_203|>",
                 eos_id="<|extra_204|>", wrapper_id="<|image token|>", boi_id="<|image start|>", eoi_id="<|image end|>",
                 visual_offset="<|visual token 000000|>")
    return {k: tok.token_to_id(s) for k, s in names.items()}


# ---- VQ-VAE training: the real VQVAE modules, with a straight-through quantizer ----

def flat_latents(vq, x):
    """x (B,3,H,W) -> the latents VQVAE.encode rounds to codes, one row per grid position: (B*h*w, embed_dim)."""
    z = vq.encode_latents(x)  # (B, embed_dim, 1, h, w)
    return z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])


def vq_train_forward(vq, x, quantize=True):
    """x (B,3,H,W) in [-1,1] -> (reconstruction (B,3,H,W), codebook + commitment loss, codes (B,h,w)).

    VQVAE.encode and decode's own steps for an image (2-D encoder once, repeated to 4 frames; 2-D decoder on frame
    0), except that the decoder gets z + sg(e - z) instead of e, so the reconstruction loss reaches the encoder.
    quantize=False (warm-up) feeds z itself: a plain autoencoder whose latents then seed the codebook.
    """
    z = vq.encode_latents(x)                                           # (B, embed_dim, 1, h, w)
    codes = vq.quantize_latents(z.detach())                            # (B, 1, h, w) nearest codes
    if quantize:
        e = vq.code_vectors(codes)                                     # (B, embed_dim, 1, h, w)
        vq_loss = F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())  # codebook + commitment
        z = z + (e - z).detach()                                       # straight-through
    else:
        vq_loss = torch.zeros(())
    recon = vq.decode_latents(z, first_frame=True)[:, 0]              # (B, 3, H, W)
    return recon, vq_loss, codes[:, 0]


def random_scene(rng, scenes=ALL_SCENES):
    return scenes[rng.randrange(len(scenes))]


def image_batch(rng, n, px, scenes=ALL_SCENES):
    """n random scenes -> (x (n,3,px,px) in [-1,1] through vqvae.preprocess, list of scenes)."""
    scenes = [random_scene(rng, scenes) for _ in range(n)]
    x = torch.stack([preprocess(draw(s, px, rng), px * px, px * px) for s in scenes])
    return x, scenes


def psnr(a, b):
    """PSNR in dB between two batches of images in [-1,1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4 / mse.clamp_min(1e-10))).mean().item()


def lr_at(step, steps, lr, warmup=50):
    # linear warmup, then cosine down to lr/10
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def kmeans_init(vq, rng, px, n_images=512, iters=20):
    """Set the codebook to k-means centroids of the current latents of n_images fresh images."""
    with torch.no_grad():
        z = torch.cat([flat_latents(vq, image_batch(rng, 64, px)[0]) for _ in range(n_images // 64)])  # (N, c)
        k = vq.cfg.codebook_size
        cent = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:k]].clone()
        for _ in range(iters):  # Lloyd: assign, then move each centroid to its members' mean (empty ones stay)
            a = torch.cdist(z, cent).argmin(1)
            sums = torch.zeros_like(cent).index_add_(0, a, z)
            cnt = torch.bincount(a, minlength=k)
            cent = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], cent)
        vq.quantize.embedding.weight.copy_(cent)


def train_vq(vq, state_path, steps, batch, lr, px, seed, log_every=100, warmup=300):
    """Train `vq` in place (autoencoder warm-up, then VQ); resumes from / saves to `state_path` every 100 steps."""
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    step, usage = 0, torch.zeros(vq.cfg.codebook_size)
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        vq.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, usage = st["step"], st["usage"]
        print(f"vq: resumed at step {step}")
    vq.train()
    for m in vq.modules():  # BatchNorm stays in eval mode: running stats (0, 1), affine learnt (see decoder note)
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eval()
    t0, t_step = time.time(), step
    while step < steps:
        rng = random.Random(seed * 1_000_003 + step)  # per-step seed: a resumed run draws the same data
        x, _ = image_batch(rng, batch, px)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        if step == warmup:  # end of the autoencoder warm-up: codebook = k-means of the latents
            kmeans_init(vq, rng, px)
            usage.zero_()
        recon, vq_loss, codes = vq_train_forward(vq, x, quantize=step >= warmup)
        # L1 + L2, shape pixels weighted 5x: they are a small part of each image but carry all of its content
        fg = (x - BG).abs().amax(1, keepdim=True) > 0.1  # (B,1,H,W) pixels that are not background
        weight = 1 + 4 * fg.float()
        err = (recon - x).abs()
        rec_loss = ((err + err.pow(2)) * weight).mean() / weight.mean()
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=vq.cfg.codebook_size)
        step += 1
        if step > warmup and step % 100 == 0:
            # restart codes unused for 100 steps at latents of the current batch (fights codebook collapse)
            dead = (usage == 0).nonzero().flatten() if step < steps * 0.7 else []
            if len(dead):
                with torch.no_grad():
                    z = flat_latents(vq, x)
                    err = torch.cdist(z, vq.quantize.embedding.weight).min(1).values  # (N,) distance to nearest code
                    # prefer badly fitted latents (shape edges), else every restart lands on the background
                    pick = torch.multinomial(err + 1e-6, len(dead), replacement=True,
                                             generator=torch.Generator().manual_seed(step))
                    vq.quantize.embedding.weight[dead] = z[pick] + 0.01 * torch.randn(len(dead), z.shape[1])
            n_used = int((usage > 0).sum())
            usage.zero_()
        else:
            n_used = None
        if step % log_every == 0 or step == steps:
            print(f"vq step {step}/{steps}  loss {loss.item():.4f}  rec {rec_loss.item():.4f}  vq {vq_loss.item():.4f}"
                  f"  psnr {psnr(recon.detach(), x):.2f}  lr {lr_at(step - 1, steps, lr):.2e}"
                  + (f"  codes used {n_used}" if n_used is not None else "")
                  + f"  {(time.time() - t0) / (step - t_step):.2f}s/step", flush=True)
            t0, t_step = time.time(), step
        if step % 100 == 0 or step == steps:
            torch.save({"model": vq.state_dict(), "opt": opt.state_dict(), "step": step, "usage": usage},
                       state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    vq.eval()
    return vq


# ---- decoder training: sequences in the exact layouts sample.py builds ----

def encode_pool(vq, n, px, seed, scenes):
    """n images of random training scenes -> (codes (n,h,w) through VQVAE.encode, scene indices (n,))."""
    rng = random.Random(seed)
    codes, idx = [], []
    with torch.no_grad():
        for i in range(0, n, 64):
            x, sc = image_batch(rng, min(64, n - i), px, scenes)
            codes.append(vq.encode(x))
            idx += [ALL_SCENES.index(s) for s in sc]
    return torch.cat(codes).short(), torch.tensor(idx)


def gen_sequence(tok, cfg, text, codes):
    """(ids, loss mask): bos text boi "h*w" img [row eol]*h eof eoi eos, loss on everything after img."""
    h, w = codes.shape
    prompt = prompts.encode(tok, prompts.gen_prompt(text, h, w))
    rows = torch.cat([codes.long() + cfg.visual_offset, torch.full((h, 1), cfg.eol_id)], 1)  # (h, w+1)
    image = rows.flatten().tolist() + [cfg.eof_id, cfg.eoi_id, cfg.eos_id]
    return prompt + image, [0] * len(prompt) + [1] * len(image)


def chat_sequence(tok, cfg, question, ans, codes):
    """(ids, loss mask): prompts.chat_prompt(question, codes) then " answer" eos, loss on the answer and eos."""
    return answer_sequence(tok, cfg, prompts.chat_prompt(question, codes), ans)


def answer_sequence(tok, cfg, prompt, ans):
    """(ids, loss mask) of a chat prompt string followed by " answer" eos: loss on the answer and eos only."""
    ids = prompts.encode(tok, prompt)
    reply = tok.encode(" " + ans, add_special_tokens=False).ids + [cfg.eos_id]
    return ids + reply, [0] * len(ids) + [1] * len(reply)


def gen_text(rng, text, p_uncond):
    """A generation sequence's text: the caption with the positive prompt (sample.py appends it to every caption),
    or with probability p_uncond the negative prompt or an empty one: "no caption", so that the CFG branch is a
    trained unconditional model."""
    if rng.random() < p_uncond:
        return rng.choice([NEGATIVE_PROMPT, ""])
    return text + POSITIVE_PROMPT


def make_lm_batch(rng, tok, cfg, codes, scene_idx, n, p_gen, p_uncond):
    """n sequences drawn from the encoded pool -> tokens (n,T), targets (n,T) with -100 outside the loss."""
    seqs = []
    for _ in range(n):
        j = rng.randrange(len(codes))
        scene = ALL_SCENES[scene_idx[j]]
        if rng.random() < p_gen:
            seqs.append(gen_sequence(tok, cfg, gen_text(rng, caption(scene), p_uncond), codes[j]))
        else:
            q = rng.choice(list(QUESTIONS))
            seqs.append(chat_sequence(tok, cfg, q, answer(q, scene), codes[j]))
    return pad_batch(seqs, cfg.pad_id)


def pad_batch(seqs, pad_id, device="cpu"):
    """[(ids, loss mask)] -> tokens (n,T), targets (n,T): the ids where the mask is 1, else -100."""
    T = max(len(s) for s, _ in seqs)
    tokens = torch.full((len(seqs), T), pad_id)  # right padding: causal attention never looks at it
    targets = torch.full((len(seqs), T), -100)
    for i, (s, m) in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
        targets[i, :len(s)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(s), -100)
    return tokens.to(device), targets.to(device)


def sequence_losses(logits, targets):
    """logits (B,T,V), targets (B,T) -> (B,) each sequence's next-token cross-entropy, averaged over its own loss
    tokens: a chat answer (~6 tokens) weighs as much as an image (~40), else the images drown the answers."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none")  # (B, T-1)
    return ce.sum(1) / (targets[:, 1:] != -100).sum(1).clamp_min(1)


def fit(model, next_batch, steps, lr, state_path, save_every=100, log_every=25, record=None, amp=nullcontext):
    """AdamW on the mean of sequence_losses over next_batch(step) -> (tokens, targets), the learning rate of lr_at,
    gradients clipped at norm 1. Resumes from state_path (finetune.save_state's file), saves it every save_every
    steps and at the end. Only the parameters that require gradients train (LoRA: the adapters). Under torchrun
    each process passes its slice of the batch; the loss logged is their mean. amp: the forward's autocast."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim == 2]
    other = [p for p in trainable if p.ndim < 2]  # norm weights: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    step = 0
    if os.path.exists(state_path):
        step = finetune.restore(state_path, model, opt, record)
        say(f"resumed at step {step}")
    model.train()
    t0, step0, avg = time.time(), step, None
    while step < steps:
        tokens, targets = next_batch(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        with amp():
            loss = sequence_losses(model(tokens), targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        shown = finetune.mean_over_processes(loss).item()
        avg = shown if avg is None else 0.95 * avg + 0.05 * shown
        if step % log_every == 0 or step == steps:
            rate = (step - step0) / (time.time() - t0)
            say(f"step {step}/{steps}  loss {shown:.5f}  avg {avg:.4f}  lr {lr_at(step - 1, steps, lr):.2e}  "
                f"{rate:.2f} steps/s  {clock((steps - step) / rate)} left")
        if step % save_every == 0 or step == steps:
            finetune.save_state(state_path, model, opt, step, record)
    model.eval()
    return model


def clock(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def say(*args):
    """print, from one process only under torchrun"""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def train_lm(model, tok, codes, scene_idx, state_path, steps, batch, lr, seed, p_gen, p_uncond, log_every=25,
             save_every=100):
    """The toy's decoder training: fit on batches drawn from the encoded pool by a per-step seed (a resumed run
    draws the same data)."""
    batches = lambda step: make_lm_batch(random.Random(seed * 1_000_003 + 7 + step), tok, model.cfg, codes,
                                         scene_idx, batch, p_gen, p_uncond)
    return fit(model, batches, steps, lr, state_path, save_every, log_every)


# ---- evaluation: everything through sample.py's own entry points, scored by the pixel checker ----

def run_images(m, captions, seed):
    """sample.images (what `python sample.py image` runs) with its defaults -> PIL images; caption b uses seed + b."""
    return sample.images(m, captions, seed=seed)


def run_chat(m, questions, pictures, px):
    """sample.chat (what `python sample.py chat` runs), greedy, one batch, images read at px x px -> answers."""
    return sample.chat(m, questions, pictures, max_new_tokens=24, min_pixels=px * px, max_pixels=px * px)


def eval_sets(rng, n):
    """[("held-out", every held-out scene in turn, n of them), ("trained", n random trained scenes)]."""
    return [("held-out", [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]),
            ("trained", [random_scene(rng, TRAIN_SCENES) for _ in range(n)])]


def evaluate(m, px, seed, n_eval):
    """Print VQ reconstruction PSNR, colour/shape scores of generated images and of chat answers (m: sample.load)."""
    rng = random.Random(seed + 12345)
    # 1. VQ-VAE: reconstruction PSNR, and does the checker still read colour and shape after a round trip
    x, scenes = image_batch(rng, n_eval, px)
    with torch.no_grad():
        recon = m.vq.decode(m.vq.encode(x))
    got = [check(postprocess(r)) for r in recon]
    print(f"vq: PSNR {psnr(recon, x):.2f} dB on {n_eval} images; checker on reconstructions: colour "
          f"{pct(g[0] == s[1] for g, s in zip(got, scenes))}, shape {pct(g[1] == s[0] for g, s in zip(got, scenes))}")
    # 2. text -> image on captions never trained on (and on trained ones, for comparison), default settings
    for name, scenes in eval_sets(rng, n_eval):
        t0 = time.time()
        got = [check(im) for im in run_images(m, [caption(s) for s in scenes], seed)]
        print(f"image ({name} captions, {n_eval} images, {time.time() - t0:.0f}s): colour "
              f"{pct(g[0] == s[1] for g, s in zip(got, scenes))}, shape "
              f"{pct(g[1] == s[0] for g, s in zip(got, scenes))}", flush=True)
    # 3. chat about new images of held-out scenes (and of trained ones, for comparison), greedy
    for name, scenes in eval_sets(rng, n_eval):
        imgs = [draw(s, px, rng) for s in scenes]
        for q, keys in (("What colour is the shape?", (1,)), ("What shape is this?", (0,)),
                        ("Describe the image.", (0, 1))):
            answers = run_chat(m, [q], imgs, px)
            ok = [all(re.search(rf"\b{s[k]}\b", a) for k in keys) for a, s in zip(answers, scenes)]
            print(f"chat ({name} scenes) {q!r}: {pct(ok)} name the right "
                  f"{' and '.join(('shape', 'colour')[k] for k in keys)}"
                  f"  (e.g. {answers[0].strip()!r} for {caption(scenes[0])!r})", flush=True)


def pct(oks):
    oks = list(oks)
    return f"{100 * sum(oks) / max(1, len(oks)):.0f}%"


def sample_grid(m, path, px, seed, scale=3):
    """A labelled grid for the README, each cell drawn by sample.images: rows = shapes, columns = colours,
    first large shapes in the center, then small ones in the places named under them."""
    places = list(POSITIONS)
    cells = [("large", sh, co, "in the center") for sh in SHAPES for co in COLOURS]
    cells += [("small", sh, co, places[(i * 5 + 1) % len(places)]) for i, (sh, co) in
              enumerate((sh, co) for sh in SHAPES for co in COLOURS)]
    imgs = run_images(m, [f"a {si} {co} {sh} {po}" for si, sh, co, po in cells], seed)
    s, label, n = px * scale, 14, len(COLOURS)
    rows = len(cells) // n
    grid = Image.new("RGB", (n * (s + 4) + 4, rows * (s + label + 4) + 4), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, ((si, sh, co, po), im) in enumerate(zip(cells, imgs)):
        x, y = 4 + (i % n) * (s + 4), 4 + (i // n) * (s + label + 4)
        d.text((x, y), f"{co} {sh}" if si == "large" else po.split(" ", 2)[2], fill=(0, 0, 0), font=font)
        grid.paste(im.resize((s, s), Image.NEAREST), (x, y + label))
    sample.save_image(grid, Path(path))
    print(f"wrote {path}")


# ---- fine-tuning any checkpoint of ours on examples from a JSONL file (finetune.py reads and checks them) ----

def example_codes(m, ex):
    """An example's images -> VQ code grids (h, w). Chat images as `sample.py chat` tokenizes them (the checkpoint's
    pixel limits); a generation image resized to the grid `sample.py image` draws for its aspect ratio at the
    model's image area (prompts.generate_size), so the prompt's "h*w" is the one generation will write."""
    pictures = [sample.open_image(p) for p in ex.images]
    if ex.kind != "generation":
        return sample.encode_images(m, pictures)
    [picture] = pictures
    h, w = prompts.generate_size(f"{picture.width}:{picture.height}", m.cfg.image_area)
    f = m.vq.spatial_factor
    picture = to_rgb(picture, m.image.transparency).resize((w * f, h * f), Image.BICUBIC)
    return sample.encode_images(m, [picture], h * w * f * f, h * w * f * f)


def example_sequence(tok, cfg, ex, codes, text=None):
    """(ids, loss mask) of an example, the prompt built as sample.py builds it: generation
    prompts.gen_prompt(text), text defaulting to the caption with the positive prompt, then the image's tokens;
    chat prompts.chat_texts (the original template, or a conversation rendered as the -hf template), then
    " answer" eos."""
    if ex.kind == "generation":
        return gen_sequence(tok, cfg, ex.text + POSITIVE_PROMPT if text is None else text, codes[0])
    convs = [ex.messages] if ex.kind == "messages" else None
    [prompt] = prompts.chat_texts([] if convs else [ex.text], codes, conversations=convs)
    return answer_sequence(tok, cfg, prompt, ex.answer)


def prepare(m, examples, where):
    """Every example's codes, every sequence it can become checked against the model's positions: a one-line
    error naming FILE:LINE, before any training."""
    codes = []
    for ex in examples:
        try:
            codes.append(example_codes(m, ex))
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}:{ex.line}: {e}") from None
        texts = [None, NEGATIVE_PROMPT, ""] if ex.kind == "generation" else [None]  # and the CFG branch's
        longest = max(len(example_sequence(m.tokenizer, m.cfg, ex, codes[-1], t)[0]) for t in texts)
        if longest > m.cfg.max_seq_len:
            raise ValueError(f"{where}:{ex.line}: the example is {longest} tokens, more than the model's "
                             f"{m.cfg.max_seq_len} positions")
    return codes


def finetune_batch(rng, m, examples, codes, n, p_uncond):
    """n examples drawn at random -> [(ids, loss mask)]; a generation example's caption becomes the negative or an
    empty prompt with probability p_uncond, as in the toy's training, so that guidance keeps working."""
    seqs = []
    for _ in range(n):
        j = rng.randrange(len(examples))
        text = gen_text(rng, examples[j].text, p_uncond) if examples[j].kind == "generation" else None
        seqs.append(example_sequence(m.tokenizer, m.cfg, examples[j], codes[j], text))
    return seqs


@torch.no_grad()
def mean_loss(model, seqs, batch, pad_id, device, amp):
    """The mean of sequence_losses over seqs (every process computes all of them: the same forwards everywhere)."""
    model.eval()
    total = 0.0
    for i in range(0, len(seqs), batch):
        tokens, targets = pad_batch(seqs[i:i + batch], pad_id, device)
        with amp():
            total += sequence_losses(model(tokens), targets).sum().item()
    finetune.reshard(model)
    return total / len(seqs)


def plain_weights(cfg, params, dtype):
    """{our parameter name: tensor} -> the checkpoint's state dict (wq, wk, wv, w_gate, w_up) in dtype."""
    with torch.device("meta"):
        plain = Emu3(cfg)
    plain.load_state_dict(params, strict=True, assign=True)
    return {k: v.to(dtype) for k, v in plain.state_dict().items()}


def check_finetune_args(steps, batch, lr, save_every, log_every, held_out, p_uncond, lora_rank, world):
    if min(steps, batch, save_every, log_every) < 1:
        raise ValueError("--steps, --batch, --save-every and --log-every must be at least 1")
    if lr <= 0 or not 0 <= held_out < 1 or not 0 <= p_uncond <= 1:
        raise ValueError(f"need --lr > 0, 0 <= --held-out < 1, 0 <= --p-uncond <= 1; got {lr}, {held_out}, "
                         f"{p_uncond}")
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"--lora must be at least 1, got {lora_rank}")
    if batch % world:
        raise ValueError(f"--batch {batch} does not split over {world} processes: give a multiple of {world}")


def run_finetune(ckpt, data, out, overwrite, resume, steps, batch, lr, save_every, log_every, held_out, p_uncond,
                 lora_rank, lora_alpha, seed, device, threads, save_dtype):
    """`python train.py finetune`: everything checked (arguments, folders, every line of the data) before training;
    then train, print the held-out loss before and after, and write OUT through checkpoint.save."""
    procs = finetune.start(device)
    try:
        finetune_job(procs, ckpt, data, out, overwrite, resume, steps, batch, lr, save_every, log_every, held_out,
                     p_uncond, lora_rank, lora_alpha, seed, threads, save_dtype)
    finally:
        finetune.stop(procs)


def finetune_job(procs, ckpt, data, out, overwrite, resume, steps, batch, lr, save_every, log_every, held_out,
                 p_uncond, lora_rank, lora_alpha, seed, threads, save_dtype):
    sample.set_threads(threads)
    check_finetune_args(steps, batch, lr, save_every, log_every, held_out, p_uncond, lora_rank, procs.world)
    checkpoint.check_out_dir(out, overwrite)
    if not checkpoint.is_ours(ckpt):
        raise ValueError(f"{ckpt} is not a checkpoint of ours: convert it first (python convert.py {ckpt} NEW_DIR)")
    state_path = os.path.abspath(out) + ".state.pt"  # beside OUT: a run killed half-way resumes from it
    if os.path.exists(state_path) and not resume:
        raise ValueError(f"{state_path} exists (an interrupted run): give --resume to continue it, or delete it")
    if resume and not os.path.exists(state_path):
        raise ValueError(f"--resume: no {state_path} to resume from")
    examples = finetune.read_examples(data)  # every line checked before the model loads
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    n_held = round(len(examples) * held_out)
    if n_held == len(examples):
        raise ValueError(f"{data}: {len(examples)} examples leave none to train on with --held-out {held_out}")
    held = [examples[i] for i in sorted(order[:n_held])]
    train_set = [examples[i] for i in sorted(order[n_held:])]
    conf = checkpoint.read_config(ckpt)
    stored = next(checkpoint.read_tensors(checkpoint.weight_files(ckpt)[0]))[1].dtype
    dev = procs.device
    # fp32 master weights; a LoRA fine-tune keeps the frozen weights in bf16 on a GPU (half the memory)
    m = sample.load(ckpt, dev, "bfloat16" if lora_rank and dev.type == "cuda" else "float32")
    t0 = time.time()
    codes = prepare(m, train_set, data)
    held_seqs = [example_sequence(m.tokenizer, m.cfg, ex, c) for ex, c in zip(held, prepare(m, held, data))]
    kinds = Counter(ex.kind for ex in train_set)
    say(f"{len(train_set)} examples ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), {len(held)} held "
        f"out; images tokenized in {time.time() - t0:.0f}s")
    m.vq.cpu()  # frozen, and done with
    model = m.model
    lora_alpha = lora_alpha or 2 * (lora_rank or 0)
    if lora_rank:
        torch.manual_seed(seed)  # the adapters' init: the same in every process, every run, and a resumed run
        lora.add(model, lora_rank, lora_alpha)
    if procs.sharded:
        finetune.shard(model, procs)
    # one GPU computes in bf16 under autocast; FSDP casts by its MixedPrecisionPolicy; a CPU runs fp32
    amp = partial(torch.autocast, "cuda", torch.bfloat16) if dev.type == "cuda" and not procs.sharded else nullcontext
    say(f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters"
        f"{f', LoRA rank {lora_rank}' if lora_rank else ''}, {procs.world} process(es) on {dev.type}")
    before = mean_loss(model, held_seqs, batch, m.cfg.pad_id, dev, amp) if held_seqs else None
    if before is not None:
        say(f"held-out loss before: {before:.4f}")
    with open(data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {"ckpt": os.path.abspath(ckpt), "data": os.path.abspath(data), "data_sha256": digest,
              "examples": len(examples),
              "steps": steps, "batch": batch, "lr": lr, "held_out": held_out, "p_uncond": p_uncond,
              "seed": seed, "lora": lora_rank, "lora_alpha": lora_alpha if lora_rank else None}

    def batches(step):  # the global batch drawn by a per-step seed; this process trains on its rows of it
        seqs = finetune_batch(random.Random(seed * 1_000_003 + step), m, train_set, codes, batch, p_uncond)
        tokens, targets = pad_batch(seqs, m.cfg.pad_id, dev)  # padded as one: the same shapes as one process's
        return tokens[procs.rank::procs.world], targets[procs.rank::procs.world]
    fit(model, batches, steps, lr, state_path, save_every, log_every, record, amp)
    after = mean_loss(model, held_seqs, batch, m.cfg.pad_id, dev, amp) if held_seqs else None
    if after is not None:
        say(f"held-out loss after: {after:.4f} (before: {before:.4f}), {len(held_seqs)} examples")
    params = finetune.gather(model)  # every process takes part; rank 0 writes
    if procs.rank == 0:
        if lora_rank:
            params = lora.merge_state(params, lora_alpha / lora_rank)
        training = dict(conf.get("training") or {})
        training["fine_tuned"] = training.get("fine_tuned", []) + [
            {**record, "kinds": dict(kinds), "held_out_examples": len(held), "processes": procs.world,
             "held_out_loss": [before, after]}]
        checkpoint.save(out, m.cfg, [plain_weights(m.cfg, params, checkpoint.parse_dtype(save_dtype or stored))],
                        m.vq, m.tokenizer, m.image, overwrite=overwrite, source=conf.get("source"),
                        training=training)
        os.remove(state_path)
        say(f"wrote {out}")
    if procs.sharded:
        dist.barrier()


DEFAULT_OUT = "toy/trained"  # a new folder: the shipped toy/ckpt is written only when named, with --overwrite

# toy sizes: a factor-8 VQ like the real one (4 levels), narrow and with one res block per level
TOY_VQ = dict(codebook_size=512, embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
              attn_resolutions=(3,))
# decoder: 4 layers of width 128 (GQA 4 q / 2 kv heads); the special ids and vocab size come from the tokenizer
TOY_LM = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, rope_theta=1e4, max_seq_len=512)


def main(out, state, overwrite, px, seed, threads, vq_steps, vq_batch, vq_lr, pool, lm_steps, lm_batch, lm_lr,
         run_eval, n_eval, samples, p_gen, p_uncond, dtype, int8):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if run_eval:
        if samples and os.path.exists(samples) and not overwrite:
            raise ValueError(f"{samples} exists: give another --samples path, or --overwrite")
        if samples:
            sample.image_paths(samples, 1)  # an image path in an existing folder, checked before the long eval
        m = sample.load(out, "cpu", dtype, int8=int8)
        evaluate(m, px, seed, n_eval)
        if samples:
            sample_grid(m, samples, px, seed)
        return
    checkpoint.check_out_dir(out, overwrite)  # before hours of work: never into a checkpoint without --overwrite
    os.makedirs(state, exist_ok=True)
    vq_cfg = VQConfig(**TOY_VQ)
    t_start = time.time()
    # stage 1: VQ-VAE
    vq = VQVAE(vq_cfg)
    train_vq(vq, os.path.join(state, "vq.pt"), vq_steps, vq_batch, vq_lr, px, seed)
    print(f"vq done, {time.time() - t_start:.0f}s so far", flush=True)
    # stage 2: tokenizer (toy BPE + the real specials and visual tokens), encoded image pool, decoder
    tok = make_tokenizer(os.path.join(state, "toy.tiktoken"), vq_cfg.codebook_size)
    lm_cfg = Emu3Config(vocab_size=tok.get_vocab_size(), codebook_size=vq_cfg.codebook_size, image_area=px * px,
                        **special_ids(tok), **TOY_LM)
    pool_path = os.path.join(state, "pool.pt")
    if os.path.exists(pool_path):
        codes, scene_idx = torch.load(pool_path, weights_only=True)
    else:
        codes, scene_idx = encode_pool(vq, pool, px, seed + 1, TRAIN_SCENES)
        torch.save((codes, scene_idx), pool_path)
    print(f"pool: {len(codes)} images, {codes.unique().numel()} distinct codes, {time.time() - t_start:.0f}s so far",
          flush=True)
    torch.manual_seed(seed + 1)  # the same init whether or not this process trained the VQ
    model = Emu3(lm_cfg)
    print(f"decoder: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {lm_cfg.vocab_size}")
    train_lm(model, tok, codes, scene_idx, os.path.join(state, "lm.pt"), lm_steps, lm_batch, lm_lr, seed, p_gen,
             p_uncond)
    # images go in at exactly px x px, the size the toy learned; its grid is recorded for sample.py's log
    checkpoint.save(out, lm_cfg, [model.state_dict()], vq, tok, ImageConfig(px * px, px * px),
                    overwrite=overwrite, training={"image_grid": [px // 8, px // 8]})
    print(f"done in {time.time() - t_start:.0f}s: wrote {out}", flush=True)


def toy_parser():
    p = argparse.ArgumentParser(description="Train (or evaluate) the toy Emu3 on synthetic shapes, on CPU. "
                                            "`train.py finetune --help`: fine-tune a checkpoint.",
                                formatter_class=sample.Help)
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="checkpoint dir to write (a new folder), or with --eval the one to score (e.g. toy/ckpt)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out (or --samples)")
    p.add_argument("--state", default="toy/state", help="dir for resumable training state and the encoded data")
    p.add_argument("--px", type=int, default=48, help="image side in pixels (grid = px/8)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores; 1 is much faster on a busy machine)")
    p.add_argument("--vq-steps", type=int, default=2000, help="VQ-VAE training steps")
    p.add_argument("--vq-batch", type=int, default=8, help="VQ-VAE batch size")
    p.add_argument("--vq-lr", type=float, default=2e-3, help="VQ-VAE peak learning rate")
    p.add_argument("--pool", type=int, default=12000, help="training images encoded once for the decoder stage")
    p.add_argument("--lm-steps", type=int, default=4000, help="decoder training steps")
    p.add_argument("--lm-batch", type=int, default=24, help="decoder batch size (sequences)")
    p.add_argument("--p-gen", type=float, default=0.6,
                   help="share of decoder sequences that are text->image (the rest are chat)")
    p.add_argument("--p-uncond", type=float, default=0.4,
                   help="share of text->image sequences whose caption is the negative or an empty prompt (CFG)")
    p.add_argument("--lm-lr", type=float, default=3e-3, help="decoder peak learning rate")
    p.add_argument("--eval", dest="run_eval", action="store_true",
                   help="score the checkpoint in --out through sample.py instead of training")
    p.add_argument("--n-eval", type=int, default=72, help="images / questions per eval score")
    p.add_argument("--samples", default=None, help="with --eval: also draw the README's sample grid to this PNG")
    p.add_argument("--dtype", default=None, choices=list(checkpoint.DTYPES),
                   help="with --eval: decoder dtype (default: sample.py's, float32 on a CPU)")
    p.add_argument("--int8", action="store_true", help="with --eval: score the decoder with int8 weights (quantize.py)")
    return p


def finetune_parser():
    p = argparse.ArgumentParser(prog="train.py finetune", formatter_class=sample.Help,
                                description="Fine-tune a checkpoint of ours on the examples of a JSONL file, into a "
                                            "new checkpoint. Under torchrun: FSDP2 over the processes.")
    p.add_argument("--ckpt", required=True, help="the checkpoint to start from (ours: convert.py writes it)")
    p.add_argument("--data", required=True, help='JSONL, one example a line: {"prompt", "image"} (generation), '
                                                 '{"image", "question", "answer"} or {"messages"} (chat); image '
                                                 'paths relative to the file')
    p.add_argument("--out", required=True, help="the new checkpoint dir (training state goes beside it, OUT.state.pt)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run whose OUT.state.pt is there")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step, over all processes")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (50 warm-up steps, cosine to a tenth); the 8.5B wants ~1e-5 in full, "
                        "~1e-4 with --lora")
    p.add_argument("--save-every", type=int, default=100, help="write the resumable state every N steps")
    p.add_argument("--log-every", type=int, default=25, help="print the progress line every N steps")
    p.add_argument("--held-out", type=float, default=0.1, help="share of the examples never trained on, whose loss "
                                                               "is printed before and after")
    p.add_argument("--p-uncond", type=float, default=0.4,
                   help="share of generation examples whose caption is replaced by the negative or an empty prompt, "
                        "as in the toy's training (keeps classifier-free guidance working)")
    p.add_argument("--lora", dest="lora_rank", type=int, default=None,
                   help="train rank-R adapters on the decoder's projections instead of every weight (merged on save)")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / R (default: alpha = 2R)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (under torchrun: cuda means one GPU per process)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--save-dtype", default=None, choices=list(checkpoint.DTYPES),
                   help="dtype of the written weights (default: the source checkpoint's)")
    return p


if __name__ == "__main__":
    if sys.argv[1:2] == ["finetune"]:
        args, run = finetune_parser().parse_args(sys.argv[2:]), run_finetune
    else:
        args, run = toy_parser().parse_args(), main
    try:
        run(**vars(args))
    except (ValueError, OSError) as e:
        # under torchrun every process finds the same problem: one of them says it
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)

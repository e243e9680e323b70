"""Decoding: the sampling recipe, keyed noise, and the two loops over the static KV cache (chat, images).

The recipe is the one the references run (transformers' `generation/logits_process.py` processors, in the order
its `generate` applies them; BAAI's `image_generation.py` passes the same ones):
    images  CFG in log-softmax space against the negative prompt (UnbatchedClassifierFreeGuidanceLogitsProcessor)
            -> the image-grid rule (PrefixConstrainedLogitsProcessor with BAAI's Emu3PrefixConstrainedLogitsHelper)
            -> temperature -> top-k -> a sample
    chat    temperature -> top-k -> top-p -> a sample (or greedy)
The model knows nothing of this; these are small pure functions on scores, read first.

A sample is Gumbel-max with noise keyed by position: token i of row b is argmax(scores_i + g(seed + b, i, id)), with
g computed on the device from an integer hash of (seed, position, token id). That is an exact sample of
softmax(scores) (up to the 2^-23 grain of the uniforms), needs no generator state (so a whole step, sampling
included, is one compiled graph that reads nothing back), and makes token i a pure function of the tokens before
it: image k of a batch with seed s is the image of seed s + k alone, and --parallel gives the sequential tokens.

text:   prompts (B, L) left padded -> prefill L - 1 columns -> text_step per token (the model, the recipe, the
        sample, finished rows fed pad); the host reads tokens once every CHECK_EVERY steps
image:  cond + uncond prompts as ONE batch of 2B rows -> prefill L - 1 columns -> image_step per token (logits
        over the grid window -> CFG -> grid mask -> temperature -> top-k -> sample -> PAD past the image), its
        token fed to both halves, nothing read back. jacobi_image_tokens: the same step over windows of N tokens.
"""
import math
import time
from dataclasses import dataclass

import torch

# read when a call runs (not bound as default arguments), so that a test or a script can change them
PREFILL_CHUNK = 2048  # prompt tokens per prefill call: attention never holds more than one chunk's scores
CHECK_EVERY = 8  # text decoding reads tokens back to the host once per this many steps
BUCKET = 256  # cache columns are read in multiples of this (see cache_len)


# ---- the sampling recipe: small pure functions on scores (..., V) ----

def guidance_scores(cond_logits, uncond_logits, scale):
    """Classifier-free guidance in log-softmax space, fp32: scale * (log p_c - log p_u) + log p_u."""
    c = torch.log_softmax(cond_logits.float(), dim=-1)
    u = torch.log_softmax(uncond_logits.float(), dim=-1)
    return scale * (c - u) + u


def grid_window(cfg):
    """slice(lo, hi): the contiguous ids holding every token the grid rule allows up to EOS (visual tokens, EOL,
    EOF, EOI, EOS; 151846..184621 for the released vocabulary, 32776 of 184622 ids). Logits outside it are masked
    anyway, and log_softmax over the window differs from the full one by a constant per row, which CFG, top-k and
    sampling ignore: the same distribution, up to the rounding of a GEMM of another width."""
    ids = (cfg.eol_id, cfg.eof_id, cfg.eoi_id, cfg.eos_id, cfg.visual_offset, cfg.visual_offset + cfg.codebook_size - 1)
    return slice(min(ids), max(ids) + 1)


def grid_mask(off, h, w, cfg, first, n_ids):
    """Additive mask over ids first..first+n_ids-1: 0 where the image grid allows a token, -inf elsewhere.

    off: the offset of the token being generated from <|image token|> (1 = the first grid token); off, h, w are
    broadcastable long tensors (e.g. off (1, T), h and w (B, 1): a grid per row) -> mask (..., n_ids).
    BAAI's rule (baaivision/Emu3, `emu3/mllm/utils_emu3.py`: Emu3PrefixConstrainedLogitsHelper), with n = h * (w + 1):
        if   off % (w + 1) == 0: EOL        elif off == n + 1: EOF       elif off == n + 2: EOI
        elif off == n + 3:       EOS        elif off >  n + 3: PAD       else: any visual token
    written as tensor selects, so that a step needs no Python branch or host read and compiles into one graph.
    One deliberate difference: EOL stops at the grid's end (off <= n). The reference's unbounded rule also fires
    at EOI's slot when w == 1 (EOL replaces EOI) and at EOS's when w == 2 (that grid never ends); neither happens at
    the released areas (it takes an aspect ratio near 1:1000); tests/test_sampling_refs.py pins both down against
    the original code. PAD lies outside the grid window, so a row past its EOS has no allowed token here: the
    image step writes pad there itself.
    """
    n = h * (w + 1)
    ids = torch.arange(first, first + n_ids, device=off.device)  # (V,)
    row_end = (off % (w + 1) == 0) & (off <= n)
    one = torch.where(row_end, cfg.eol_id, torch.where(off == n + 1, cfg.eof_id, torch.where(
        off == n + 2, cfg.eoi_id, torch.where(off == n + 3, cfg.eos_id, cfg.pad_id))))  # the single allowed token
    visual = (ids >= cfg.visual_offset) & (ids < cfg.visual_offset + cfg.codebook_size)  # (V,)
    allowed = torch.where((~row_end & (off <= n))[..., None], visual, ids == one[..., None])  # (..., V)
    return torch.zeros(allowed.shape, device=off.device).masked_fill(~allowed, float("-inf"))


def constrain(scores, mask):
    """scores + grid mask. NaN (from inf - inf in CFG) is treated as -inf; if no allowed token is left with a
    finite score, fall back to the bare mask (transformers 5.23's PrefixConstrainedLogitsProcessor)."""
    scores = scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max) + mask
    return torch.where(scores.amax(-1, keepdim=True) == float("-inf"), mask, scores)


def top_k_filter(logits, k):
    # keep scores >= the k-th largest (ties at the threshold kept, as transformers' TopKLogitsWarper)
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    # keep the smallest set of top tokens whose probability reaches p (the most likely one always stays)
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


def image_scores(logits, off, h, w, cfg, guidance, temperature, top_k):
    """Image generation's scores before sampling: logits (R, T, V') fp32 over the grid window (ids
    grid_window(cfg).start ..), R = 2B rows (cond, then uncond) with guidance, B rows at guidance 1 (transformers
    adds no guidance processor there: the conditional rows alone); off (T,) offsets of the predicted tokens; h, w
    (B, 1) grids -> scores (B, T, V'), -inf where a token cannot be drawn.
    CFG -> grid mask -> temperature -> top-k (the mask adds only 0 or -inf, so dividing after it changes nothing)."""
    if guidance == 1:
        scores = logits
    else:
        B = logits.shape[0] // 2
        scores = guidance_scores(logits[:B], logits[B:], guidance)  # (B, T, V')
    scores = constrain(scores, grid_mask(off[None, :], h, w, cfg, grid_window(cfg).start, scores.shape[-1]))
    scores = scores / temperature
    return scores if top_k == 1 else top_k_filter(scores, top_k)


def text_scores(logits, temperature, top_k, top_p):
    """Chat's scores before sampling (temperature > 0): logits (B, V) -> temperature -> top-k -> top-p."""
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return logits


# ---- keyed noise ----

MASK32 = 0xFFFFFFFF


def mul32(x, c):
    """(x * c) mod 2^32 for x < 2^32 in int64 lanes, in two 16-bit halves of c so that nothing overflows: the same
    integers on every device."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x):
    """A 32-bit integer hash (lowbias32, C. Wellons): a bijection of [0, 2^32) that scatters nearby inputs."""
    x = mul32(x ^ (x >> 16), 0x7FEB352D)
    x = mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def gumbel(seeds, positions, ids):
    """Gumbel(0, 1) noise g(seed, position, id), a pure function of its three integer arguments.

    seeds (B,), positions (T,), ids (V,) long tensors on one device -> (B, T, V) float32. A key per (seed,
    position), then hash(hash(id) ^ key): the id is scrambled before the key is mixed in. (Mixing the key first,
    hash(key ^ id), would make position q's noise over ids position p's under id -> id ^ (key_p ^ key_q): a
    permutation that keeps most visual ids visual when the keys share their high bits.) Each 32-bit hash gives a
    uniform u on the odd multiples of 2^-24 in (0, 1) (2^23 values, exact in fp32); g = -log(-log(u)).
    """
    s = hash32((seeds & MASK32) ^ hash32(seeds >> 32))  # (B,): 64-bit seeds folded to 32 bits
    key = hash32(s[:, None] ^ hash32(positions[None, :] ^ 0x5BD1E995))  # (B, T)
    x = hash32(hash32(ids)[None, None, :] ^ key[:, :, None])  # (B, T, V)
    u = ((x >> 9) * 2 + 1).float() * 2.0**-24
    return -torch.log(-torch.log(u))


def sample_gumbel(scores, seeds, positions, first_id=0):
    """scores (B, T, V) over ids first_id.., guided, masked and filtered -> ids (B, T) (indices + first_id).

    argmax(scores + Gumbel noise) is a sample of softmax(scores): tokens outside the filters (-inf) never win."""
    ids = torch.arange(first_id, first_id + scores.shape[-1], device=scores.device)
    return (scores + gumbel(seeds, positions, ids)).argmax(-1) + first_id


def pick_text(logits, temperature, top_k, top_p, seeds, position):
    """Chat's next token: logits (B, V) fp32 -> ids (B,). temperature 0 = greedy; else text_scores, then a keyed
    sample at this position (a 0-d long tensor: the index of the token being picked)."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample_gumbel(text_scores(logits, temperature, top_k, top_p)[:, None], seeds, position.view(1))[:, 0]


# ---- the static cache ----

def cache_len(n, size, bucket=None):
    """Cache columns a step reads when n are filled: n rounded up to a bucket (ceil(n / bucket) * bucket), at most
    the cache's size. Attention then reads about n columns instead of all `size` (for a 720x720 image, half the
    cache on average); rounding keeps the shapes few, since a compiled step records a CUDA graph per shape."""
    bucket = bucket or BUCKET
    return min(size, math.ceil(n / bucket) * bucket)


def cache_size(n):
    """The cache's columns for n positions: whole buckets (few sizes, kept between calls, every bounded read a
    multiple of BUCKET columns) and one spare column that no read reaches, so that a read is never the whole
    cache: that slice would be contiguous, and a compiled step would specialise on it (a second compile)."""
    return BUCKET * math.ceil(n / BUCKET) + 1


def left_pad(rows, pad_id, device):
    """B lists of ids -> tokens (B, L) left padded with pad_id, pad (B,) the padding columns of each row, and
    whether any row is padded (known on the host)."""
    L = max(map(len, rows))
    tokens = torch.tensor([[pad_id] * (L - len(r)) + list(r) for r in rows], device=device)
    return tokens, torch.tensor([L - len(r) for r in rows], device=device), any(len(r) < L for r in rows)


def prefill(model, tokens, pad, padded, size):
    """Write the prompt (B, L) into the cache, PREFILL_CHUNK columns per call. Unpadded prompts run with no mask
    (causal attention aligned to each chunk's last column, b - 1, which fused kernels take); padded ones see the
    cache through a mask. The decode loops prefill all but the last prompt token, which their first step feeds."""
    for a in range(0, tokens.shape[1], PREFILL_CHUNK):
        b = min(tokens.shape[1], a + PREFILL_CHUNK)
        p, kv_len = (pad, cache_len(b, size)) if padded else (None, b)
        model(tokens[:, a:b], input_pos=torch.arange(a, b, device=tokens.device), pad=p, last_only=True, kv_len=kv_len)


def compiled(step):
    """torch.compile of a decode step: one graph (fullgraph), CUDA graphs on a GPU (reduce-overhead), and every
    shape symbolic from the first compile (dynamic), so that the ~33 cache lengths of a 720x720 image, a batch of
    another size or a window of another width reuse one compiled graph instead of recompiling."""
    return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=True)


# ---- text ----

def text_step(model, tokens, input_pos, pad, kv_len, done, seeds, position, temperature, top_k, top_p, eos_id,
              pad_id):
    """One chat step: tokens (B, 1) at cache column input_pos (1,) -> (next ids (B,), done (B,)): the model, the
    recipe and the keyed sample; rows already done are fed pad. Device-only: what --compile compiles."""
    logits = model(tokens, input_pos=input_pos, pad=pad, kv_len=kv_len)[:, -1]  # (B, V)
    nxt = torch.where(done, pad_id, pick_text(logits, temperature, top_k, top_p, seeds, position))
    return nxt, done | (nxt == eos_id)


@torch.no_grad()
def generate_text(model, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, top_k=None, top_p=None, seed=0,
                  on_tokens=None, compile_step=False, check_every=None):
    """prompts: B lists of ids -> B lists of new ids (EOS excluded). temperature 0: greedy; row b samples with
    seed + b. on_tokens(b, ids) is called with each row's new ids as they are read back, once every check_every
    steps (default CHECK_EVERY): the loop itself never waits for the device."""
    dev = model.embed.weight.device
    check_every = check_every or CHECK_EVERY
    tokens, pad, padded = left_pad(prompts, pad_id, dev)
    B, L = tokens.shape
    size = cache_size(L + max_new_tokens)
    model.setup_cache(B, size)
    step = compiled(text_step) if compile_step else text_step
    prefill(model, tokens[:, :-1], pad, padded, size)
    cols = torch.arange(L - 1, L - 1 + max_new_tokens, device=dev)  # the cache column fed at each step
    picked = torch.arange(max_new_tokens, device=dev)  # ... and the index of the token it picks (the noise key)
    seeds = seed + torch.arange(B, device=dev)
    out = torch.empty(B, max_new_tokens + 1, dtype=torch.long, device=dev)  # the last prompt token, then the answer
    out[:, 0] = tokens[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    answers, ended, read = [[] for _ in range(B)], [False] * B, 0
    for i in range(max_new_tokens):
        nxt, done = step(model, out[:, i:i + 1], cols[i:i + 1], pad, cache_len(L + i, size), done, seeds,
                         picked[i], temperature, top_k, top_p, eos_id, pad_id)
        out[:, i + 1] = nxt
        if (i + 1) % check_every == 0 or i + 1 == max_new_tokens:
            chunk = out[:, read + 1:i + 2].tolist()  # the one host read of these steps
            read = i + 1
            for b, ids in enumerate(chunk):
                if ended[b]:
                    continue
                if eos_id in ids:
                    ids, ended[b] = ids[:ids.index(eos_id)], True
                answers[b] += ids
                if on_tokens and ids:
                    on_tokens(b, ids)
            if all(ended):
                break
    return answers


class TextStream:
    """Decode a growing id list incrementally; hold back text while it ends inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, ids):
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # maybe a character cut between tokens: wait for the next token
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.text = text[len(self.text):], text
        return new


# ---- images ----

def image_step(model, window, input_pos, pad, positions, h, w, seeds, guidance, top_k, temperature, kv_len):
    """One pass: window (B, N) tokens at cache columns input_pos (N,) -> ids (B, N), the token after each, at
    positions (N,) of the image (0 = the first token after <|image token|>). The model (2B rows: the window fed
    to the cond and the uncond halves; B at guidance 1) over the grid window's ids, image_scores, the keyed sample
    (argmax at top-k 1), and PAD past each row's image. Device-only, no host read: what --compile compiles."""
    cfg, first = model.cfg, grid_window(model.cfg).start
    fed = window if guidance == 1 else torch.cat([window, window])
    logits = model(fed, input_pos=input_pos, pad=pad, vocab=grid_window(cfg), kv_len=kv_len)  # (R, N, V')
    scores = image_scores(logits, positions + 1, h, w, cfg, guidance, temperature, top_k)  # (B, N, V')
    ids = pick_image(scores, top_k == 1, seeds, positions, first)
    return torch.where(positions[None, :] >= h * (w + 1) + 3, cfg.pad_id, ids)  # (B, N): PAD past the image


def pick_image(scores, greedy, seeds, positions, first_id):
    """scores (B, T, V') over ids first_id.. -> token ids (B, T): argmax when greedy, else the keyed sample."""
    return scores.argmax(-1) + first_id if greedy else sample_gumbel(scores, seeds, positions, first_id)


@dataclass
class ImageRun:
    """What a generation's loop works on, set up by start_image."""
    L: int  # prompt columns (left padded)
    size: int  # cache columns
    n_new: int  # tokens of the largest image: h * (w + 1) + 3
    seq: torch.Tensor  # (B, 1 + n_new + N) long: the last prompt token, then image position j at 1 + j
    pad: torch.Tensor  # (2B or B,) left padding per row
    h: torch.Tensor  # (B, 1) grid rows per image
    w: torch.Tensor  # (B, 1) grid columns
    seeds: torch.Tensor  # (B,) image b's seed
    cols: torch.Tensor  # (n_new + N,) the cache column fed at each position: L - 1 + j
    positions: torch.Tensor  # (n_new + N,) 0, 1, ...: slices of it are the positions a pass predicts


def start_image(model, cond_ids, neg_ids, grids, guidance, seed, N):
    """Check the lengths, set up the cache for windows of N tokens, prefill all but the last prompt token."""
    cfg, dev = model.cfg, model.embed.weight.device
    B = len(cond_ids)
    rows = list(cond_ids) + ([] if guidance == 1 else list(neg_ids))
    if any(not r or r[-1] != cfg.wrapper_id for r in rows):
        raise ValueError("an image prompt must end in <|image token|> (prompts.gen_prompt): the grid starts there")
    tokens, pad, padded = left_pad(rows, cfg.pad_id, dev)
    L = tokens.shape[1]
    n_new, (gh, gw) = max((gh * (gw + 1) + 3, (gh, gw)) for gh, gw in grids)  # the largest image sets the length
    if L + n_new + N - 1 > cfg.max_seq_len:
        raise ValueError(f"a {gh}x{gw} token image needs {n_new} tokens after the {L}-token prompt"
                         + (f" (and {N - 1} more for --parallel {N}'s window)" if N > 1 else "")
                         + f", more than the model's {cfg.max_seq_len} positions: use a smaller --area"
                         + (" or --parallel" if N > 1 else "") + " or a shorter prompt")
    size = cache_size(L + n_new + N - 1)  # a window reaches N - 1 columns past the last token
    model.setup_cache(len(rows), size)
    prefill(model, tokens[:, :-1], pad, padded, size)
    seq = torch.full((B, 1 + n_new + N), cfg.pad_id, dtype=torch.long, device=dev)
    seq[:, 0] = cfg.wrapper_id  # every prompt's last token: the first step feeds it to cond and uncond rows
    grid = torch.tensor(grids, device=dev)  # (B, 2)
    return ImageRun(L, size, n_new, seq, pad, grid[:, :1], grid[:, 1:], seed + torch.arange(B, device=dev),
                    torch.arange(L - 1, L - 1 + n_new + N, device=dev), torch.arange(n_new + N, device=dev))


@torch.no_grad()
def generate_image_tokens(model, cond_ids, neg_ids, grids, guidance=3.0, top_k=2048, temperature=1.0, seed=0,
                          compile_step=False, parallel=0, progress=None, preview=None, preview_rows=8):
    """B prompts and B negative prompts (id lists ending in <|image token|>), B grids (h, w) -> (tokens (B, n_max),
    forward passes). Row b's image is its first h*(w+1)+3 tokens, then PAD (rows with smaller grids wait).

    cond and uncond rows run as ONE batch of 2B rows with one static KV cache (B rows when guidance is 1); every
    step both halves are fed the token sampled from the guided scores (as BAAI's and transformers' CFG feed the
    unconditional branch the conditional branch's token). parallel=N > 1: jacobi_image_tokens, the same tokens.
    progress(done, total, passes, seconds) is called after the first pass (with --compile: the compile) and every
    64 passes, with host-side counts; preview(tokens (B, n), n) every preview_rows rows of the widest grid with the
    tokens so far (a host read, so only when asked for).
    """
    if parallel > 1:
        return jacobi_image_tokens(model, cond_ids, neg_ids, grids, guidance, top_k, temperature, seed, parallel,
                                   compile_step, progress, preview, preview_rows)
    r = start_image(model, cond_ids, neg_ids, grids, guidance, seed, 1)
    step = compiled(image_step) if compile_step else image_step
    args = (r.h, r.w, r.seeds, guidance, top_k, temperature)
    t0, every = time.perf_counter(), preview_rows * (max(w for _, w in grids) + 1)
    for i in range(r.n_new):  # the token at position i, from the one before it at cache column L - 1 + i
        r.seq[:, i + 1:i + 2] = step(model, r.seq[:, i:i + 1], r.cols[i:i + 1], r.pad, r.positions[i:i + 1], *args,
                                     cache_len(r.L + i, r.size))
        if progress is not None and (i == 0 or (i + 1) % 64 == 0 or i + 1 == r.n_new):
            progress(i + 1, r.n_new, i + 1, time.perf_counter() - t0)
        if preview is not None and ((i + 1) % every == 0 or i + 1 == r.n_new):
            preview(r.seq[:, 1:i + 2], i + 1)
    return r.seq[:, 1:1 + r.n_new], r.n_new


def jacobi_image_tokens(model, cond_ids, neg_ids, grids, guidance, top_k, temperature, seed, N, compile_step=False,
                        progress=None, preview=None, preview_rows=8):
    """Parallel (Jacobi) decoding: the same tokens as generate_image_tokens, in fewer passes.

    Each pass feeds the last accepted token and N - 1 guesses (first_guess: the row above, or the noise alone) to
    image_step, which predicts all N positions at once with the same keyed noise the sequential loop would use,
    and accepts the longest run of right guesses + 1 (the first new token's context was all accepted tokens). A
    wrong guess only costs passes: every accepted token was computed from accepted tokens. Returns (tokens,
    passes)."""
    r = start_image(model, cond_ids, neg_ids, grids, guidance, seed, N)
    step = compiled(image_step) if compile_step else image_step
    args = (r.h, r.w, r.seeds, guidance, top_k, temperature)
    t0, every, shown = time.perf_counter(), preview_rows * (max(w for _, w in grids) + 1), 0
    a, guessed, passes = 0, 0, 0  # a: tokens accepted; positions < guessed hold a token or a guess
    while a < r.n_new:
        if guessed < a + N - 1:  # positions no pass has predicted yet get first guesses
            positions = r.positions[guessed:a + N - 1]
            r.seq[:, 1 + guessed:a + N] = first_guess(r.seq, positions, flat_guess(positions, r, model.cfg, top_k == 1),
                                                      r.h, r.w)
            guessed = a + N - 1
        window = r.seq[:, a:a + N]  # the last accepted token (or the prompt's), then N - 1 guesses
        new = step(model, window, r.cols[a:a + N], r.pad, r.positions[a:a + N], *args, cache_len(r.L + a + N - 1, r.size))
        # guess j was right iff it equals the token now computed at its position (in every row)
        right = (window[:, 1:] == new[:, :-1]).all(0).int()  # (N - 1,)
        accepted = int(right.cumprod(0).sum()) + 1  # the one host read of a pass
        r.seq[:, 1 + a:1 + a + N] = new  # accepted tokens, then the next pass's guesses
        a, guessed, passes = a + accepted, a + N, passes + 1
        if progress is not None and (passes == 1 or passes % 64 == 0 or a >= r.n_new):
            progress(min(a, r.n_new), r.n_new, passes, time.perf_counter() - t0)
        if preview is not None and (a // every > shown or a >= r.n_new):
            shown = a // every
            preview(r.seq[:, 1:1 + min(a, r.n_new)], min(a, r.n_new))
    return r.seq[:, 1:1 + r.n_new], passes


def flat_guess(positions, r, cfg, greedy):
    """What image_step picks at these positions from flat scores: the keyed noise alone under the grid rule (the
    first allowed id when greedy), PAD past each image. (B, T)"""
    window = grid_window(cfg)
    mask = grid_mask(positions[None, :] + 1, r.h, r.w, cfg, window.start, window.stop - window.start)  # (B, T, V')
    ids = pick_image(mask, greedy, r.seeds, positions, window.start)
    return torch.where(positions[None, :] >= r.h * (r.w + 1) + 3, cfg.pad_id, ids)


def first_guess(seq, positions, noise, h, w):
    """Guesses (B, T) for positions no pass has predicted yet: the token one row up where seq holds a visual token
    there (images repeat themselves vertically), else `noise` (what a sample of flat scores would be).
    bench/bench_parallel.py measured both on the toy: 2.68x fewer passes at --parallel 16 with the row above, 2.62x
    with the noise alone. seq holds image position j at 1 + j."""
    up = positions[None, :] - (w + 1)  # (B, T): the same column, one row up
    in_grid = (positions[None, :] % (w + 1) != w) & (positions[None, :] < h * (w + 1))  # a visual position
    visual = in_grid & (up >= 0) & (up < positions[0])  # ... whose row above is already in seq
    return torch.where(visual, seq.gather(1, 1 + up.clamp(min=0).expand(seq.shape[0], -1)), noise)


def tokens_to_codes(tokens, h, w, cfg):
    """(B, >= h*(w+1)+3) -> codes (B,h,w): drop EOF/EOI/EOS, view rows with their EOL, drop EOL, subtract the offset."""
    return tokens[:, : h * (w + 1)].reshape(-1, h, w + 1)[:, :, :w] - cfg.visual_offset

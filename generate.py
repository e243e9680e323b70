"""Decoding loops over the static KV cache: text (chat) and images (Emu3-Gen, sequential or parallel).

Tracks transformers' generate with the processors the original scripts pass (reference §7): CFG in log-softmax
space, then the image-grid rule, then temperature and top-k, then a sample. The model knows nothing of this.

Sampling is Gumbel-max with noise keyed by position: token i of row b is argmax(scores_i + g(seed + b, i, id)), where
g is Gumbel noise computed on the device from an integer hash of (seed, position, token id). That is an exact sample
of softmax(scores) (up to the 2^-23 grain of the uniforms), needs no generator state (so it fits a CUDA graph and
reads nothing back), and makes token i a pure function of the tokens before it. Image k of a batch with seed s is the
image of seed s + k alone.

text:   prompts (B, L) left padded -> prefill in chunks -> one token per row per step; finished rows feed pad;
        the host reads tokens (and whether every row has ended) once every CHECK_EVERY steps
image:  cond + uncond prompts as ONE batch of 2B rows -> prefill -> per step: logits (2B, V') over the grid window
        -> CFG (B, V') -> grid mask -> temperature -> top-k -> sample -> fed to both halves, nothing read back
        parallel=N (Jacobi): each pass feeds the last accepted token + N-1 guesses (first_guess: the row above, or
        the noise alone), samples all N positions at once,
        and accepts the longest run of right guesses + 1: with keyed noise the result is the sequential one, token
        for token (tests/test_parallel.py)
"""
import math
import time

import torch

PREFILL_CHUNK = 2048  # prompt tokens per prefill call: attention never holds more than one chunk's scores
CHECK_EVERY = 8  # text decoding reads tokens back to the host once per this many steps
BUCKET = 256  # cache columns are read in multiples of this (see cache_len)


# ---- sampling: small pure functions on scores (..., V) ----

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


MASK32 = 0xFFFFFFFF


def mul32(x, c):
    """(x * c) mod 2^32 for x < 2^32 in int64 lanes, in two 16-bit halves of c so that nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x):
    """A 32-bit integer hash (lowbias32, C. Wellons): a bijection of [0, 2^32) that scatters nearby inputs."""
    x = mul32(x ^ (x >> 16), 0x7FEB352D)
    x = mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def gumbel(seeds, positions, ids):
    """Gumbel(0, 1) noise g(seed, position, id), a pure function of its three integer arguments.

    seeds (B,), positions (T,), ids (V,) long tensors on one device -> (B, T, V) float32. Each 32-bit hash gives a
    uniform u on the odd multiples of 2^-24 in (0, 1) (2^23 values, exact in fp32); g = -log(-log(u)).
    """
    s = hash32((seeds & MASK32) ^ hash32(seeds >> 32))[:, None, None]
    x = hash32(hash32(s ^ positions[None, :, None]) ^ ids)  # (B, T, V)
    u = ((x >> 9) * 2 + 1).float() * 2.0**-24
    return -torch.log(-torch.log(u))


def sample_gumbel(scores, seeds, positions, first_id=0):
    """scores (B, T, V) over ids first_id.., guided, masked and filtered -> ids (B, T) (indices + first_id).

    argmax(scores + Gumbel noise) is a sample of softmax(scores): tokens outside the filters (-inf) never win."""
    ids = torch.arange(first_id, first_id + scores.shape[-1], device=scores.device)
    return (scores + gumbel(seeds, positions, ids)).argmax(-1) + first_id


def pick_text(logits, temperature, top_k, top_p, seeds, position):
    """Chat's next token: logits (B, V) fp32 -> ids (B,). temperature 0 = greedy; else temperature, top-k, top-p,
    then a keyed sample at this position."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return sample_gumbel(logits[:, None], seeds, position.view(1))[:, 0]


# ---- the static cache ----

def cache_len(n, size, bucket=BUCKET):
    """Cache columns a step reads when n are filled: n rounded up to a bucket (ceil(n / bucket) * bucket), at most
    the cache's size. Attention then reads about n columns instead of all `size` (for a 720x720 image, half the
    cache on average); rounding keeps the shapes few, since a compiled step is specialised (a CUDA graph recorded)
    per shape."""
    return min(size, math.ceil(n / bucket) * bucket)


def left_pad(rows, pad_id, device):
    """B lists of ids -> tokens (B, L) left padded with pad_id, pad (B,) the padding columns, and whether any."""
    L = max(map(len, rows))
    tokens = torch.tensor([[pad_id] * (L - len(r)) + list(r) for r in rows], device=device)
    pad = torch.tensor([L - len(r) for r in rows], device=device)
    return tokens, pad, any(len(r) < L for r in rows)


def prefill(model, tokens, pad, padded, size, last, chunk=None):
    """Run the prompt (B, L) into the cache chunk by chunk; last(tokens, input_pos, pad, kv_len) runs the final
    chunk and its result is returned. Unpadded prompts run with no mask (pad and kv_len None: causal attention
    aligned to each chunk's last column, which fused kernels take); padded ones see the cache through a mask."""
    L, chunk = tokens.shape[1], chunk or PREFILL_CHUNK
    for a in range(0, L, chunk):
        b = min(L, a + chunk)
        pos = torch.arange(a, b, device=tokens.device)
        p, kv_len = (pad, cache_len(b, size)) if padded else (None, None)
        if b == L:
            return last(tokens[:, a:b], pos, p, kv_len)
        model(tokens[:, a:b], input_pos=pos, pad=p, last_only=True, kv_len=kv_len)


# ---- text ----

def text_step(model, tokens, input_pos, pad, kv_len):
    """One chat decode step: tokens (B, 1) at cache column input_pos (1,) -> next-token logits (B, V)."""
    return model(tokens, input_pos=input_pos, pad=pad, kv_len=kv_len)[:, -1]


@torch.no_grad()
def generate_text(model, prompts, max_new_tokens, eos_id, pad_id, pick=None, on_tokens=None, compile_step=False,
                  check_every=CHECK_EVERY):
    """prompts: B lists of ids -> B lists of new ids (EOS excluded).

    pick(logits (B, V), position () long tensor) -> ids (B,); default greedy. on_tokens(b, ids) is called with each
    row's new ids as they are read back, once every check_every steps: the loop itself never waits for the device.
    """
    pick = pick or (lambda logits, position: logits.argmax(-1))
    dev = model.embed.weight.device
    tokens, pad, padded = left_pad(prompts, pad_id, dev)
    B, L = tokens.shape
    # the cache, kept between calls, in whole buckets: few sizes, and every read a multiple of BUCKET columns
    size = BUCKET * math.ceil((L + max_new_tokens) / BUCKET)
    model.setup_cache(B, size)
    step = torch.compile(text_step, mode="reduce-overhead", fullgraph=True) if compile_step else text_step
    logits = prefill(model, tokens, pad, padded, size,
                     lambda t, pos, p, kv_len: model(t, input_pos=pos, pad=p, last_only=True, kv_len=kv_len)[:, -1])
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)  # new tokens stay here until read
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    position = torch.zeros((), dtype=torch.long, device=dev)  # the index of the token being picked
    answers, ended, read = [[] for _ in range(B)], [False] * B, 0
    for i in range(max_new_tokens):
        nxt = torch.where(done, pad_id, pick(logits, position))  # (B,): finished rows keep feeding pad
        out[:, i] = nxt
        done |= nxt == eos_id
        if (i + 1) % check_every == 0 or i + 1 == max_new_tokens:
            chunk = out[:, read:i + 1].tolist()  # the one host read of these steps
            read = i + 1
            for b, ids in enumerate(chunk):
                if ended[b]:
                    continue
                if eos_id in ids:
                    ids, ended[b] = ids[:ids.index(eos_id)], True
                answers[b] += ids
                if on_tokens and ids:
                    on_tokens(b, ids)
            if all(ended) or i + 1 == max_new_tokens:
                break
        # one token per row at cache column L + i
        input_pos, position = torch.full((1,), L + i, device=dev), position + 1
        logits = step(model, nxt[:, None], input_pos, pad, cache_len(L + i + 1, size))
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
    The reference's rule (Emu3PrefixConstrainedLogitsHelper, reference §7.3), with n = h * (w + 1):
        if   off % (w + 1) == 0: EOL        elif off == n + 1: EOF       elif off == n + 2: EOI
        elif off == n + 3:       EOS        elif off >  n + 3: PAD       else: any visual token
    written as tensor selects, so that a step needs no Python branch or host read and compiles into one graph.
    One deliberate difference: EOL stops at the grid's end (off <= n). The reference's unbounded rule also fires
    at EOI's slot when w == 1 (EOL replaces EOI) and at EOS's when w == 2 (that grid never ends); neither happens at
    the released areas (it takes an aspect ratio near 1:1000). PAD lies outside the grid window, so a row past its
    EOS has no allowed token here: the image loop feeds it pad directly.
    """
    n = h * (w + 1)
    ids = torch.arange(first, first + n_ids, device=off.device)  # (V,)
    row_end = (off % (w + 1) == 0) & (off <= n)
    one = torch.where(row_end, cfg.eol_id, torch.where(off == n + 1, cfg.eof_id, torch.where(
        off == n + 2, cfg.eoi_id, torch.where(off == n + 3, cfg.eos_id, cfg.pad_id))))  # the single allowed token
    visual = (ids >= cfg.visual_offset) & (ids < cfg.visual_offset + cfg.codebook_size)  # (V,)
    allowed = torch.where((~row_end & (off <= n))[..., None], visual, ids == one[..., None])  # (..., V)
    return torch.zeros(allowed.shape, device=off.device).masked_fill(~allowed, float("-inf"))


def reference_grid_rule(h, w, cfg):
    """The same rule as the reference writes it, for transformers' generate(prefix_allowed_tokens_fn=...): the
    Emu3 docs' function, one Python branch per token. grid_mask computes its sets for every position at once;
    the tests and bench/ drive transformers with this one."""
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


def constrain(scores, mask):
    """scores + grid mask. A NaN from inf - inf in CFG counts as -inf; if no allowed token is left with a score,
    every allowed token gets 0 (the fallback of transformers 5.23's PrefixConstrainedLogitsProcessor)."""
    scores = scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max) + mask
    return torch.where(scores.amax(-1, keepdim=True) == float("-inf"), mask, scores)


def image_scores(model, tokens, input_pos, pad, off, h, w, guidance, top_k, temperature, kv_len=None,
                 last_only=False):
    """What one step computes up to sampling: tokens (R, T) -> scores (B, T, V') over the grid window for the token
    after each position (T = 1 with last_only). R = 2B rows (cond, then uncond) with guidance, B rows without it.
    off (T,) offsets of the predicted tokens; h, w (B, 1) grids. Device-only: this is what --compile compiles.

    Order as transformers' generate: CFG -> grid mask -> temperature -> top-k (the mask adds only 0 or -inf, so
    dividing by the temperature before it is the same thing).
    """
    window = grid_window(model.cfg)
    logits = model(tokens, input_pos=input_pos, pad=pad, last_only=last_only, vocab=window, kv_len=kv_len)
    if guidance == 1:  # transformers adds no guidance at 1: the conditional rows alone
        scores = logits / temperature
    else:
        B = logits.shape[0] // 2
        scores = guidance_scores(logits[:B], logits[B:], guidance) / temperature  # (B, T, V'): cond rows first
    scores = constrain(scores, grid_mask(off[None, :], h, w, model.cfg, window.start, scores.shape[-1]))
    return scores if top_k == 1 else top_k_filter(scores, top_k)


def pick_image(scores, greedy, seeds, positions, first_id):
    """scores (B, T, V') -> token ids (B, T): argmax when greedy, else the keyed sample."""
    return scores.argmax(-1) + first_id if greedy else sample_gumbel(scores, seeds, positions, first_id)


@torch.no_grad()
def generate_image_tokens(model, cond_ids, neg_ids, grids, guidance=3.0, top_k=2048, temperature=1.0, seed=0,
                          compile_step=False, parallel=0, progress=None):
    """B prompts and B negative prompts (id lists ending in <|image token|>), B grids (h, w) -> (tokens (B, n_max),
    forward passes). Row b's image is its first h*(w+1)+3 tokens, then PAD (rows with smaller grids wait).

    cond and uncond rows run as ONE batch of 2B rows with one static KV cache (B rows when guidance is 1); every
    step both halves are fed the token sampled from the guided scores (reference §7.2). parallel=N > 1 decodes by
    Jacobi iteration over windows of N positions (see the module docstring); 0 or 1 one token per pass.
    progress(done, total, passes, seconds) is called now and then with host-side counts.
    """
    cfg, dev = model.cfg, model.embed.weight.device
    B = len(cond_ids)
    rows = list(cond_ids) + ([] if guidance == 1 else list(neg_ids))
    tokens, pad, padded = left_pad(rows, cfg.pad_id, dev)
    L = tokens.shape[1]
    h = torch.tensor([g[0] for g in grids], device=dev)[:, None]  # (B, 1)
    w = torch.tensor([g[1] for g in grids], device=dev)[:, None]
    n_new, (gh, gw) = max((gh * (gw + 1) + 3, (gh, gw)) for gh, gw in grids)  # the largest image sets the length
    N = max(1, parallel)
    if L + n_new + N - 1 > cfg.max_seq_len:
        raise ValueError(f"a {gh}x{gw} token image needs {n_new} tokens after the {L}-token prompt, more than the "
                         f"model's {cfg.max_seq_len} positions: use a smaller --area")
    size = BUCKET * math.ceil((L + n_new + N - 1) / BUCKET)  # whole buckets, as in generate_text
    model.setup_cache(len(rows), size)
    step = torch.compile(image_scores, mode="reduce-overhead", fullgraph=True) if compile_step else image_scores
    args = (h, w, guidance, top_k, temperature)
    first = grid_window(cfg).start  # scores index the grid window: index + first = token id
    seeds = seed + torch.arange(B, device=dev)
    greedy, image_len = top_k == 1, h * (w + 1) + 3  # (B, 1): each row's image; PAD after it

    def pick(scores, positions):  # positions (T,) long: indices of the tokens being picked
        ids = pick_image(scores, greedy, seeds, positions, first)
        return torch.where(positions[None, :] >= image_len, cfg.pad_id, ids)  # (B, T)

    # prefill the prompts (prompt-length shapes, run once): the scores for token 0, whose offset is 1
    off0 = torch.ones(1, dtype=torch.long, device=dev)
    scores = prefill(model, tokens, pad, padded, size,
                     lambda t, pos, p, kv_len: image_scores(model, t, pos, p, off0, *args, kv_len, last_only=True))
    out = torch.full((B, n_new + N), cfg.pad_id, dtype=torch.long, device=dev)
    out[:, :1] = pick(scores, torch.zeros(1, dtype=torch.long, device=dev))
    t0, passes, a, guessed = time.perf_counter(), 1, 1, 1  # a: tokens accepted; out[:, :guessed] holds a token
    while a < n_new:
        if N > 1 and guessed < a + N - 1:  # positions no pass has predicted yet get first guesses
            positions = torch.arange(guessed, a + N - 1, device=dev)
            out[:, guessed:a + N - 1] = first_guess(out, positions, pick, h, w, cfg, first, scores.shape[-1])
            guessed = a + N - 1
        # feed the last accepted token and N-1 guesses, at cache columns L+a-1 .. L+a+N-2
        window = out[:, a - 1:a - 1 + N]  # (B, N)
        input_pos = torch.arange(L + a - 1, L + a - 1 + N, device=dev)
        positions = torch.arange(a, a + N, device=dev)  # the tokens predicted: offsets positions + 1
        fed = window if guidance == 1 else window.repeat(2, 1)
        scores = step(model, fed, input_pos, pad, positions + 1, *args, cache_len(L + a - 1 + N, size))
        new = pick(scores, positions)  # (B, N)
        if N == 1:
            out[:, a:a + 1] = new
            a += 1
        else:
            # guess j was right iff it equals the token now computed at its position; accept the longest run of
            # right guesses (over every row) + 1: the first new token's context was all accepted tokens
            right = (window[:, 1:] == new[:, :-1]).all(0).int()  # (N-1,)
            accepted = int(right.cumprod(0).sum()) + 1  # the one host read of a pass
            out[:, a:a + N] = new  # accepted tokens, then the next pass's guesses
            a, guessed = a + accepted, a + N
        passes += 1
        if progress is not None and (passes % 64 == 0 or a >= n_new):
            progress(min(a, n_new), n_new, passes, time.perf_counter() - t0)
    return out[:, :n_new], passes


def first_guess(out, positions, pick, h, w, cfg, first, n_ids):
    """Guesses (B, T) for positions no pass has predicted yet: the token one row up where out holds a visual token
    there (images repeat themselves vertically), else the noise alone under the grid rule (what a sample of flat
    scores would be). bench/bench_parallel.py measured both on the toy: 2.64x fewer passes at --parallel 16 with
    the row above, 2.59x with the noise alone."""
    noise = pick(grid_mask(positions[None, :] + 1, h, w, cfg, first, n_ids), positions)  # (B, T)
    up = positions[None, :] - (w + 1)  # (B, T): the same column, one row up
    in_grid = (positions[None, :] % (w + 1) != w) & (positions[None, :] < h * (w + 1))  # a visual position
    visual = in_grid & (up >= 0) & (up < positions[0])  # ... whose row above is already in out
    return torch.where(visual, out.gather(1, up.clamp(min=0).expand(out.shape[0], -1)), noise)


def tokens_to_codes(tokens, h, w, cfg):
    """(B, >= h*(w+1)+3) -> codes (B,h,w): drop EOF/EOI/EOS, view rows with their EOL, drop EOL, subtract the offset."""
    return tokens[:, : h * (w + 1)].reshape(-1, h, w + 1)[:, :, :w] - cfg.visual_offset

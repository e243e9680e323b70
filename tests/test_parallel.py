"""Keyed sampling and exact parallel (Jacobi) image decoding (generate.py).

1. The sampler is an exact sample of the guided, grid-masked, temperature-scaled, top-k-filtered distribution: the
   first grid token's frequency over 20000 seeds matches that softmax within a bound whose false-alarm probability
   is below 1e-6, and the same check fails on biased noise.
2. --parallel N gives the sequential tokens exactly (fp32), for grids, seeds, windows, guidance, top-k and
   temperatures drawn by hypothesis on tiny random models, batches with a grid per row included; and on the
   shipped toy, in fewer forward passes.
"""
import math
import os

import torch
from hypothesis import assume, given, settings, strategies as st

import generate
import sample
from emu3 import Emu3, Emu3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Emu3Config(vocab_size=60, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=1024,
                  pad_id=0, eol_id=1, eof_id=2, bos_id=3, eos_id=4, wrapper_id=5, boi_id=6, eoi_id=7,
                  visual_offset=10, codebook_size=40)  # ids 50..59: text


def tiny_model(seed, std):
    torch.manual_seed(seed)
    m = Emu3(TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # std relative to fan-in; std sets how peaked the next-token distributions are
                p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[1] ** 0.5)
    return m


def prompt_rows(B, seed):
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(50, 60, (n,), generator=g).tolist()
    cond = [[TINY.bos_id] + text(2 + 3 * b) + [TINY.boi_id, 50, TINY.wrapper_id] for b in range(B)]
    return cond, [[TINY.bos_id] + text(4) + [TINY.boi_id, 50, TINY.wrapper_id]] * B


# ---- 1. the sampler samples the reference distribution ----

class FixedLogits(torch.nn.Module):
    """A model whose next-token logits are fixed: cond rows cond_logits, uncond rows uncond_logits."""

    def __init__(self, cond_logits, uncond_logits):
        super().__init__()
        self.cfg, self.embed = TINY, torch.nn.Embedding(1, 1)
        self.c, self.u = cond_logits, uncond_logits

    def setup_cache(self, batch_size, max_len):
        pass

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        B, T = tokens.shape[0] // 2, 1 if last_only else tokens.shape[1]
        x = torch.cat([self.c.expand(B, T, -1), self.u.expand(B, T, -1)])  # (2B, T, V)
        return x if vocab is None else x[..., vocab]


def bernstein_bound(n, p, delta):
    """t such that P(|observed frequency - p| >= t) <= delta for n independent draws (Bernstein's inequality:
    P <= 2 exp(-n t^2 / (2 p (1 - p) + 2 t / 3))), solved for t."""
    a, b = n, -(2 / 3) * math.log(2 / delta)  # n t^2 + b t - 2 p (1-p) ln(2/delta) = 0
    c = -2 * p * (1 - p) * math.log(2 / delta)
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def sample_check(n_seeds=20000, false_alarm=1e-6):
    """(max |frequency - probability| / its bound over tokens, probabilities) of the first grid token over n_seeds."""
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(1, 1, TINY.vocab_size, generator=g) * 0.5, torch.randn(1, 1, TINY.vocab_size, generator=g) * 0.5
    model = FixedLogits(c, u)
    h, w, guidance, top_k, temperature = 2, 3, 3.0, 12, 1.5
    hw = torch.tensor([[h]]), torch.tensor([[w]])
    window = generate.grid_window(TINY)
    scores = generate.image_scores(torch.cat([c, u])[..., window], torch.ones(1, dtype=torch.long), *hw, TINY,
                                   guidance, temperature, top_k)  # (1, 1, V')
    # the reference's processors by hand, over the whole vocabulary and without the project's helpers: CFG in
    # log-softmax space, the first grid token's rule (visual tokens only), temperature, top-k by sorting, softmax
    ref = (3.0 * (c.log_softmax(-1) - u.log_softmax(-1)) + u.log_softmax(-1))[0, 0] / temperature  # (V,)
    ids = torch.arange(TINY.vocab_size)
    ref[(ids < TINY.visual_offset) | (ids >= TINY.visual_offset + TINY.codebook_size)] = float("-inf")
    ref[ref < ref.sort(descending=True).values[top_k - 1]] = float("-inf")
    probs = ref.double().softmax(-1)[window]
    assert probs.sum() > 1 - 1e-9  # nothing allowed outside the window
    assert torch.allclose(scores[0, 0].softmax(-1).double(), probs, atol=1e-6)
    assert (probs > 0).sum() == top_k and probs.max() < 0.5  # a spread distribution over the top-k
    ids = generate.pick_image(scores.expand(n_seeds, 1, -1), False, torch.arange(n_seeds), torch.zeros(1, dtype=torch.long),
                              window.start)[:, 0] - window.start
    freq = torch.bincount(ids, minlength=len(probs)).double() / n_seeds
    support = probs > 0
    assert (freq[~support] == 0).all()  # never a token outside the filters
    # a bound per token of the support, union over them: false alarm below false_alarm in all
    bound = torch.tensor([bernstein_bound(n_seeds, p.item(), false_alarm / int(support.sum())) for p in probs[support]])
    return ((freq[support] - probs[support]).abs() / bound).max().item(), probs


def test_keyed_sampling_is_exact():
    worst, probs = sample_check()
    # every token's frequency within its bound (false-alarm probability < 1e-6 for the whole test)
    assert worst < 1, worst


def test_the_check_catches_biased_noise(monkeypatch):
    # uniform noise instead of Gumbel: a biased sampler, which the same check must reject
    monkeypatch.setattr(generate, "gumbel", lambda seeds, positions, ids: torch.rand(
        len(seeds), len(positions), len(ids), generator=torch.Generator().manual_seed(1)))
    worst, _ = sample_check()
    assert worst > 1, worst


def test_noise_is_a_pure_function_of_its_keys():
    seeds, positions, ids = torch.tensor([0, 1, 2**40 + 3]), torch.arange(5), torch.arange(100, 140)
    g = generate.gumbel(seeds, positions, ids)
    assert g.shape == (3, 5, 40) and torch.isfinite(g).all()
    assert torch.equal(g[1:2, 2:3, 7:9], generate.gumbel(seeds[1:2], positions[2:3], ids[7:9]))  # keyed, not streamed
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[:, 0], g[:, 1])
    # its moments are Gumbel(0, 1)'s: mean = Euler's constant, variance pi^2 / 6 (4000 values: loose bounds)
    many = generate.gumbel(torch.arange(100), torch.arange(4), torch.arange(10)).flatten().double()
    assert abs(many.mean() - 0.5772) < 0.06 and abs(many.var() - math.pi ** 2 / 6) < 0.15


def test_positions_are_independent_streams():
    # The noise over ids at one position must not be a rearrangement of another position's. The earlier
    # construction hash(hash(s ^ p) ^ id) made position q's noise position p's under id -> id ^ D, with
    # D = hash(s ^ p) ^ hash(s ^ q): where D < 2^15 most visual ids map onto visual ids, and under flat scores
    # token_q == token_p ^ D held in 23 of 60 such pairs of one 90x90 image (chance: 1 in 32768). Over every pair
    # of positions of a 90x90 grid (8193 tokens) with such a D, the relation must hold no more often than chance.
    from emu3 import Emu3Config
    cfg = Emu3Config()
    seed, n = 0, 90 * 91 + 3
    s = generate.hash32(torch.tensor([seed]) ^ generate.hash32(torch.tensor([seed]) >> 32))
    keys = generate.hash32(s ^ torch.arange(n))  # (n,)
    pairs = []
    for a in range(0, n, 1024):  # all pairs p < q, a block of rows at a time
        d = keys[a:a + 1024, None] ^ keys[None, :]
        p, q = torch.nonzero((d < 2**15) & (torch.arange(a, min(a + 1024, n))[:, None] < torch.arange(n)), as_tuple=True)
        pairs.append(torch.stack([p + a, q, d[p, q]], 1))
    pairs = torch.cat(pairs)
    assert len(pairs) > 150  # the pairs the old construction related
    window = generate.grid_window(cfg)
    visual = torch.arange(cfg.visual_offset, cfg.visual_offset + cfg.codebook_size)
    positions = pairs[:, :2].unique()
    flat = torch.zeros(1, len(positions), window.stop - window.start)
    flat[..., :cfg.visual_offset - window.start] = float("-inf")  # the grid rule's visual tokens, all equal
    tokens = torch.cat([generate.sample_gumbel(flat[:, i:i + 64], torch.tensor([seed]), positions[i:i + 64],
                                               window.start) for i in range(0, len(positions), 64)], 1)[0]
    token = dict(zip(positions.tolist(), tokens.tolist()))
    assert all(t in range(visual[0], visual[-1] + 1) for t in token.values())
    related = sum(token[q] == token[p] ^ d for p, q, d in pairs.tolist())
    assert related <= 1, f"{related} of {len(pairs)} position pairs follow token_q == token_p ^ D"


def test_no_two_positions_share_their_noise():
    # The test above builds its pairs from the old construction's keys; this one assumes no construction. Any
    # hash(id ^ key_p), whatever the key, gives positions whose keys differ by D < 2^12 the same noise values over
    # an aligned block of 2^12 ids, rearranged (id -> id ^ D maps the block onto itself): the same 8 largest values.
    # Independent streams (4096 draws each from 2^23 values) share all 8 with a negligible chance. Over a 90x90
    # grid's 8193 positions: 0 shared here; 36 with hash(id ^ key) on the current hashed-position key, which the
    # test above misses.
    n, ids = 90 * 91 + 3, torch.arange(2**17, 2**17 + 2**12)
    tops = torch.cat([generate.gumbel(torch.tensor([0]), torch.arange(a, min(a + 256, n)), ids)[0].topk(8, -1).values
                      for a in range(0, n, 256)])
    shared = n - len(torch.unique(tops, dim=0))
    assert shared == 0, f"{shared} of {n} positions repeat another position's noise, rearranged"


class FixedChat(torch.nn.Module):
    """A chat model whose next-token logits are fixed (every row, every step): EOS at a given step if asked."""

    def __init__(self, logits, eos_at=None):
        super().__init__()
        self.cfg, self.embed, self.logits, self.eos_at, self.steps = TINY, torch.nn.Embedding(1, 1), logits, eos_at, 0

    def setup_cache(self, batch_size, max_len):
        pass

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        x = self.logits.expand(tokens.shape[0], tokens.shape[1], -1).clone()
        if not last_only:  # a decode step (the prefill asks for the last column only)
            if self.steps == self.eos_at:
                x[..., TINY.eos_id] = 1e4
            self.steps += 1
        return x


def test_sampled_chat_steps_follow_the_exact_distribution():
    # several sampled steps of the chat loop (temperature 0.7, top-k 8, top-p 0.9), one row per seed: every
    # step's tokens follow the reference distribution (softmax of the logits / T, top-k by sorting, top-p by
    # cumulative mass, written out here), and two steps are independent: P(token_0 == token_1) is sum p^2 (a
    # noise key that never advanced would make it 1)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(TINY.vocab_size, generator=g) * 1.5
    logits[TINY.eos_id] = -30.0  # never ends
    T, k, top_p, n_rows, steps = 0.7, 8, 0.9, 6000, 3
    out = generate.generate_text(FixedChat(logits), [[TINY.bos_id, 50]] * n_rows, steps, TINY.eos_id, TINY.pad_id,
                                 temperature=T, top_k=k, top_p=top_p, seed=11)
    ref = (logits.double() / T)
    ref[ref < ref.sort(descending=True).values[k - 1]] = float("-inf")
    p = ref.softmax(-1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]  # mass of the tokens above each one
    p[order[before >= top_p]] = 0
    p = p / p.sum()
    support = p > 0
    assert 2 < int(support.sum()) < k and (p[support] - p[support].max()).abs().max() > 0.05
    tokens = torch.tensor(out)  # (n_rows, steps)
    for i in range(steps):
        freq = torch.bincount(tokens[:, i], minlength=TINY.vocab_size).double() / n_rows
        assert (freq[~support] == 0).all()
        bound = torch.tensor([bernstein_bound(n_rows, q.item(), 1e-6 / int(support.sum())) for q in p[support]])
        assert ((freq[support] - p[support]).abs() / bound).max() < 1, i
    same, expected = (tokens[:, 0] == tokens[:, 1]).double().mean().item(), (p ** 2).sum().item()
    assert abs(same - expected) < bernstein_bound(n_rows, expected, 1e-6), (same, expected)


def test_chat_answers_stop_before_eos():
    # the answer is the ids before EOS: EOS itself, and the pad fed after it, are never part of it
    logits = torch.zeros(TINY.vocab_size)
    logits[50] = 5.0
    out = generate.generate_text(FixedChat(logits, eos_at=3), [[TINY.bos_id, 50]], 10, TINY.eos_id, TINY.pad_id)
    assert out == [[50, 50, 50]]


def test_first_guesses_are_the_row_above_or_the_flat_pick():
    # first_guess: where the row above holds a token, that token; elsewhere (the first row, EOL, the end
    # tokens) exactly what image_step would pick from flat scores at that position (flat_guess)
    h, w = 3, 4
    model = FixedLogits(torch.zeros(1, 1, TINY.vocab_size), torch.zeros(1, 1, TINY.vocab_size))
    r = generate.start_image(model, [[TINY.bos_id, TINY.wrapper_id]], [[TINY.bos_id, TINY.wrapper_id]], [(h, w)], 3.0,
                             7, 1)
    n = h * (w + 1) + 3
    seq = r.seq.clone()
    seq[0, 1:1 + n] = TINY.visual_offset + torch.arange(n) % TINY.codebook_size  # a made-up image, known tokens
    for a, b in [(0, 6), (5, 12), (7, 16), (12, n)]:  # positions a..b-1 guessed with a accepted
        positions = r.positions[a:b]
        flat = generate.flat_guess(positions, r, TINY, False)
        step = generate.image_step(model, seq[:, a:b], r.cols[a:b], r.pad, positions, r.h, r.w, r.seeds, 3.0, 2048,
                                   1.0, None)
        assert torch.equal(flat, step)  # flat scores: the keyed noise under the grid rule
        guess = generate.first_guess(seq, positions, flat, r.h, r.w)
        for j, pos in enumerate(positions.tolist()):
            above = pos - (w + 1)
            if pos < h * (w + 1) and pos % (w + 1) != w and 0 <= above < a:
                assert guess[0, j] == seq[0, 1 + above], (a, pos)
            else:
                assert guess[0, j] == flat[0, j], (a, pos)


# ---- 2. parallel decoding gives the sequential tokens ----

def run(model, cond, neg, grids, **kw):
    return generate.generate_image_tokens(model, cond, neg, grids, **kw)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), B=st.integers(1, 2), guidance=st.sampled_from([1.0, 3.0]),
       top_k=st.sampled_from([1, 3, 40]), temperature=st.sampled_from([0.7, 1.0, 2.0]), std=st.sampled_from([1.0, 4.0]))
def test_parallel_equals_sequential(data, seed, B, guidance, top_k, temperature, std):
    grids = [(data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))) for _ in range(B)]
    N = data.draw(st.integers(1, max(w for _, w in grids) + 3))
    model = tiny_model(seed, std)
    cond, neg = prompt_rows(B, seed)
    kw = dict(guidance=guidance, top_k=top_k, temperature=temperature, seed=seed)
    gaps, real = [], generate.pick_image

    def recording(scores, greedy, seeds, positions, first_id):  # the sequential run's margins (noise included)
        noisy = scores if greedy else scores + generate.gumbel(seeds, positions, torch.arange(
            first_id, first_id + scores.shape[-1]))
        top2 = noisy.topk(2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]).min().item())
        return real(scores, greedy, seeds, positions, first_id)
    generate.pick_image = recording
    try:
        seq, seq_passes = run(model, cond, neg, grids, **kw)
    finally:
        generate.pick_image = real
    assume(min(gaps) > 1e-4)  # a near-tie that fp32 noise between a window and a single token could flip
    bucket = generate.BUCKET
    generate.BUCKET = 1  # a cache of exactly the columns asked for: a window reaching past it would fail
    model.clear_cache()  # (not the sequential run's, which is larger)
    try:
        par, passes = run(model, cond, neg, grids, parallel=N, **kw)
    finally:
        generate.BUCKET = bucket
    assert torch.equal(par, seq)
    n_new = max(h * (w + 1) + 3 for h, w in grids)
    assert seq_passes == n_new and passes <= n_new  # one token per pass at least
    for b, (h, w) in enumerate(grids):  # each row its own grid, then PAD
        assert seq[b, h * (w + 1) + 2] == TINY.eos_id and (seq[b, h * (w + 1) + 3:] == TINY.pad_id).all()


def test_parallel_on_the_toy_is_the_same_image_in_fewer_passes():
    m = sample.load(os.path.join(ROOT, "toy", "ckpt"), "cpu", "float32")
    texts = ["a small red circle in the top left", "a large blue triangle at the bottom", "a small green square"]
    seq, seq_passes = sample.images(m, texts, seed=3, return_passes=True)
    par, passes = sample.images(m, texts, seed=3, parallel=16, return_passes=True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(seq, par))
    assert seq_passes == 45 and passes < seq_passes / 2, passes

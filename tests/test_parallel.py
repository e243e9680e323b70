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

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        B = tokens.shape[0] // 2
        x = torch.cat([self.c.expand(B, 1, -1), self.u.expand(B, 1, -1)])  # (2B, 1, V)
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
    par, passes = run(model, cond, neg, grids, parallel=N, **kw)
    assert torch.equal(par, seq)
    n_new = max(h * (w + 1) + 3 for h, w in grids)
    assert seq_passes == n_new and passes <= n_new  # one token per pass at least
    for b, (h, w) in enumerate(grids):  # each row its own grid, then PAD
        assert seq[b, h * (w + 1) + 2] == TINY.eos_id and (seq[b, h * (w + 1) + 3:] == TINY.pad_id).all()


def test_parallel_on_the_toy_is_the_same_image_in_fewer_passes():
    m = sample.load(os.path.join(ROOT, "toy", "ckpt"), "cpu", "float32")
    texts = ["a small red circle in the top left", "a large blue triangle at the bottom", "a small green square"]
    seq, seq_passes = sample.images(m, texts, seed=3)
    par, passes = sample.images(m, texts, seed=3, parallel=16)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(seq, par))
    assert seq_passes == 45 and passes < seq_passes / 2, passes

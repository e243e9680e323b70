"""Sampling proven against the references themselves, not against our own transcriptions of them.

1. The image-grid rule. tests/fixtures/grid_original.json is what the ORIGINAL BAAI code allows at every offset of
   16 grids, 1x1 to 120x68 (baaivision/Emu3 at f6ea9aa, emu3/mllm/utils_emu3.py Emu3PrefixConstrainedLogitsHelper as
   its processor builds it; written by tests/fixtures/make_grid_fixture.py). grid_mask must allow the same set
   everywhere except where it departs on purpose, and grid_window must span exactly the ids it ever allows.
2. One sampling step. transformers 5.23's own processors, chained by its own GenerationMixin._get_logits_processor as
   generate chains them: for Emu3 image generation CFG against the negative prompt's logits
   (UnbatchedClassifierFreeGuidanceLogitsProcessor; none at guidance 1), the prefix constraint (fed the original's
   answers from the fixture), temperature, top-k; for chat temperature, top-k, top-p. On fixed random logits their
   scores must equal generate.image_scores' and generate.text_scores'.
"""
import json
import os

import pytest
import torch

import generate
from emu3 import Emu3Config

pytest.importorskip("transformers", reason="transformers is the reference these tests compare against")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "grid_original.json")
CFG = Emu3Config()  # the released vocabulary: the fixture's ids are the original tokenizer's
WINDOW = generate.grid_window(CFG)
MIN_GAP = 1e-4  # margin required at every top-k / top-p boundary; float noise between the two sides is <= 1.4e-5


@pytest.fixture(scope="module")
def original():
    """The fixture, and per grid (h, w) the original's answer at offsets 1, 2, ...: "visual" or a list of ids."""
    with open(FIXTURE) as f:
        fx = json.load(f)
    grids = {(g["h"], g["w"]): [v for count, v in g["runs"] for _ in range(count)] for g in fx["grids"]}
    return fx, grids


def allowed_ids(answer, fx):
    """One answer of the original as a list of ids."""
    lo, hi = fx["visual"]
    return list(range(lo, hi + 1)) if answer == "visual" else answer


# ---- 1. the grid rule against the original's ----

def test_fixture_ids_are_the_released_config(original):
    fx, grids = original
    assert fx["commit"].startswith("f6ea9aa")
    assert fx["ids"] == dict(img_token=CFG.wrapper_id, eol_token=CFG.eol_id, eof_token=CFG.eof_id,
                             eoi_token=CFG.eoi_id, eos_token=CFG.eos_id, pad_token=CFG.pad_id)
    assert fx["visual"] == [CFG.visual_offset, CFG.visual_offset + CFG.codebook_size - 1]
    assert list(grids) == [(1, 1), (1, 2), (2, 1), (1, 5), (5, 1), (2, 2), (2, 3), (3, 2), (3, 7), (7, 3), (4, 4),
                           (9, 16), (16, 9), (90, 90), (68, 120), (120, 68)]


def documented_difference(h, w, off):
    """Where grid_mask departs from the original on purpose: (what the original allows, what we allow), else None.

    The original tests `off % (w + 1) == 0` (EOL) first and without bound, so EOL fires past the grid too: at EOI's
    slot when w == 1 (EOL replaces EOI), at EOS's when w == 2 (that image never ends), and every w + 1 tokens past
    EOS, where the row is finished and transformers' generate (like our loop) feeds pad whatever is allowed."""
    n = h * (w + 1)
    if off > n and off % (w + 1) == 0:
        return [CFG.eol_id], [{n + 2: CFG.eoi_id, n + 3: CFG.eos_id}.get(off, CFG.pad_id)]
    return None


def allowed_table(answers, fx, first, n_ids):
    """The original's answers as a bool table (offsets, ids first..first+n_ids-1)."""
    lo, hi = fx["visual"]
    ids = torch.arange(first, first + n_ids)
    visual = (ids >= lo) & (ids <= hi)
    table = torch.zeros(len(answers), n_ids, dtype=torch.bool)
    table[[a == "visual" for a in answers]] = visual
    for i, answer in enumerate(answers):
        if answer != "visual":
            table[i, [a - first for a in answer if first <= a < first + n_ids]] = True
    return table


def test_grid_mask_equals_the_original(original):
    """At every offset of every grid (from the first token after <|image token|> to a full row past EOS), grid_mask
    allows exactly what the original allows, except at the offsets documented_difference names, where each side
    allows what it says. Compared over the whole vocabulary, except for the three released-area grids (90x90, 68x120,
    120x68: 24,000 offsets), compared over PAD .. the first visual token and the last visual token."""
    fx, grids = original
    V = CFG.vocab_size
    for (h, w), answers in grids.items():
        ranges = [(0, V)] if h * w <= 256 else [(CFG.pad_id, CFG.visual_offset + 1), (V - 1, V)]
        offs = torch.arange(1, len(answers) + 1)
        differs = []
        for a in range(0, len(offs), 128):
            chunk = offs[a:a + 128]
            ours = torch.cat([generate.grid_mask(chunk, torch.tensor(h), torch.tensor(w), CFG, lo, hi - lo)
                              for lo, hi in ranges], -1)
            assert (ours.isneginf() | (ours == 0)).all()
            theirs = torch.cat([allowed_table(answers[a:a + 128], fx, lo, hi - lo) for lo, hi in ranges], -1)
            differs += chunk[((ours == 0) != theirs).any(-1)].tolist()
        expected = [off for off in offs.tolist() if documented_difference(h, w, off)]
        assert differs == expected, f"{h}x{w}: ours and the original differ at offsets {differs}, expected {expected}"
        for off in differs:
            theirs_ids, ours_ids = documented_difference(h, w, off)
            mask = generate.grid_mask(torch.tensor(off), torch.tensor(h), torch.tensor(w), CFG, 0, CFG.vocab_size)
            assert answers[off - 1] == theirs_ids and torch.nonzero(mask == 0)[:, 0].tolist() == ours_ids
        n = h * (w + 1)
        # the departure inside the image, spelled out: at w == 1 the original puts EOL in EOI's place, at w == 2 in
        # EOS's (and never allows EOS at all)
        ends = {1: [CFG.eof_id, CFG.eol_id, CFG.eos_id], 2: [CFG.eof_id, CFG.eoi_id, CFG.eol_id]}
        assert answers[n:n + 3] == [[i] for i in ends.get(w, [CFG.eof_id, CFG.eoi_id, CFG.eos_id])]  # n+1 .. n+3
        assert (w == 2) == all(a != [CFG.eos_id] for a in answers)


def test_grid_window_spans_what_the_original_allows(original):
    """The window holds every id the original ever allows up to EOS, and nothing past the first and last of them."""
    fx, grids = original
    answers = [a for (h, w), ans in grids.items() for a in ans[:h * (w + 1) + 3]]  # offsets 1 .. EOS
    allowed = {i for a in answers if a != "visual" for i in a} | set(allowed_ids("visual", fx))
    assert generate.grid_window(CFG) == slice(min(allowed), max(allowed) + 1) == slice(151846, 184622)


# ---- 2. one sampling step against transformers' processors ----

class Generator(GenerationMixin):
    """What transformers' generate needs of a model to build its processors; called, it is the unconditional
    forward that UnbatchedClassifierFreeGuidanceLogitsProcessor runs: it returns the fixed unconditional logits of
    the step and records the ids it was fed."""

    def __init__(self, uncond):
        self.generation_config, self.uncond, self.fed = GenerationConfig(), uncond, []

    def __call__(self, input_ids, **kwargs):
        self.fed.append(input_ids)
        return CausalLMOutputWithPast(logits=self.uncond[:, None])  # (B, 1, V): the last position's

    def processors(self, prefix_fn=None, negative=None, **sampling):
        """transformers' chain, as generate(**sampling, do_sample=True, ...) builds it: the same config preparation
        (the model's and the global defaults under the caller's values), then _get_logits_processor."""
        config, _ = self._prepare_generation_config(GenerationConfig(do_sample=True, **sampling))
        return self._get_logits_processor(config, prefix_allowed_tokens_fn=prefix_fn, negative_prompt_ids=negative,
                                          negative_prompt_attention_mask=None if negative is None
                                          else (negative != CFG.pad_id).long(), device="cpu")


def assert_same_scores(ours, theirs, atol=1e-6):
    """-inf at the same ids; finite scores within atol."""
    assert not ours.isnan().any() and not theirs.isnan().any()
    differ = ours.isneginf() != theirs.isneginf()
    assert not differ.any(), (f"kept ids differ at {differ.sum().item()} places, first (row, index) "
                              f"{torch.nonzero(differ)[0].tolist()}: ours keeps {(~ours.isneginf()).sum(-1).tolist()}, "
                              f"theirs {(~theirs.isneginf()).sum(-1).tolist()}")
    finite = ~ours.isneginf()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=atol)


def spaced(g, shape, n, ks=(5, 2048), gap=0.05):
    """Random scores (*shape, n), N(0, 1) but for a gap >= `gap` after the k largest of each row, for each k in ks."""
    s = torch.randn(*shape, n, generator=g).sort(-1, descending=True).values
    for k in ks:
        s[..., :k] += gap
    return s.gather(-1, torch.rand(*shape, n, generator=g).argsort(-1))  # shuffled over the ids of each row


def boundary_gap(scores, k):
    """The gap between the k-th and (k+1)-th largest score of each row (inf where fewer than k + 1 are finite)."""
    top = scores.topk(min(k + 1, scores.shape[-1]), -1).values
    if top.shape[-1] <= k:
        return torch.full(scores.shape[:-1], float("inf"))
    return torch.where(top[..., k].isneginf(), float("inf"), top[..., k - 1] - top[..., k])


GRIDS = [(3, 7), (4, 4)]  # one per row: n = 24 and 20
PROMPTS = [[CFG.bos_id, 64, 65, CFG.boi_id, 18, 9, 22, CFG.wrapper_id],  # "3*7", "4*4", left padded
           [CFG.pad_id, CFG.bos_id, 66, 67, CFG.boi_id, 19, 9, CFG.wrapper_id]]
NEGATIVE = [[CFG.bos_id, 70, CFG.boi_id, 18, 9, 22, CFG.wrapper_id], [CFG.pad_id, CFG.bos_id, 70, CFG.boi_id, 19, 9,
                                                                      CFG.wrapper_id]]
# offsets of the predicted token: visual, row ends (EOL), the last row's end, EOF, EOI, EOS (row 1 ends at 23)
OFFSETS = [1, 2, 7, 8, 10, 15, 20, 21, 22, 23, 24, 25, 26, 27]


def original_rule(grids, fx, first=0):
    """prefix_allowed_tokens_fn replaying the original's answers (the fixture) for row b's grid: ids - first, as a
    tensor (the processor indexes its mask with it, as with the original's list, without a conversion per call)."""
    visual = torch.tensor(allowed_ids("visual", fx)) - first

    def allowed(batch_id, ids):
        off = ids.shape[0] - int(torch.nonzero(ids == CFG.wrapper_id)[0, 0])
        answer = grids[GRIDS[batch_id]][off - 1]
        return visual if answer == "visual" else torch.tensor(answer) - first
    return allowed


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_image_scores_match_transformers(original, guidance):
    """transformers' chain over the full vocabulary and ours over the grid window: the same kept ids (none outside
    the window), and the same scores: exactly at guidance 1 (no log_softmax on either side); at guidance 3 up to a
    constant per row (log_softmax over the window differs from the full one by the mass outside it), so the
    normalised scores, the sampled distribution, agree to 5e-5 (measured 1.4e-5: the fp32 rounding of log_softmax
    over another width, ~1e-6 at |log p| ~ 12, times the guidance). Run over the window alone, the chain gives ours
    to 1e-6 (measured: exactly)."""
    fx, grids = original
    g = torch.Generator().manual_seed(0)
    B, T, V = len(GRIDS), len(OFFSETS), CFG.vocab_size
    cond, uncond = (torch.randn(B, T, V, generator=g) * 2 for _ in range(2))  # (B, T, V) fp32, the model's logits
    # the visual ids' conditional logits are chosen so that the guided scores are spaced(): no near-tie at top-k
    visual = slice(CFG.visual_offset, CFG.visual_offset + CFG.codebook_size)
    cond[..., visual] = (spaced(g, (B, T), CFG.codebook_size) * 2 + (guidance - 1) * uncond[..., visual]) / guidance
    h, w = (torch.tensor([[grid[i]] for grid in GRIDS]) for i in (0, 1))  # (B, 1)
    ends = torch.tensor([hh * (ww + 1) + 3 for hh, ww in GRIDS])  # rows past their EOS are not compared
    off = torch.tensor(OFFSETS)
    logits = cond if guidance == 1 else torch.cat([cond, uncond])  # (R, T, V): cond rows, then uncond
    seqs = [torch.tensor(p + [CFG.visual_offset] * (OFFSETS[-1] - 1)) for p in PROMPTS]  # filler: only lengths count
    rules = {first: original_rule(grids, fx, first) for first in (0, WINDOW.start)}
    for temperature in (0.7, 1.0, 1.3):
        for top_k in (1, 5, 2048):
            ours = generate.image_scores(logits[..., WINDOW], off, h, w, CFG, guidance, temperature, top_k)  # (B,T,V')
            before_top_k = generate.image_scores(logits[..., WINDOW], off, h, w, CFG, guidance, temperature, V)
            assert (boundary_gap(before_top_k, top_k) > MIN_GAP).all(), "near-tie at the top-k boundary"
            if top_k == 1:  # greedy: ours leaves the scores unfiltered and the loop draws the argmax, what
                ours = ours.masked_fill(ours < ours.amax(-1, keepdim=True), float("-inf"))  # TopK(1) keeps alone
            for t, o in enumerate(OFFSETS):
                rows = ends >= o
                input_ids = torch.stack([s[:len(p) + o - 1] for s, p in zip(seqs, PROMPTS)])  # (B, L + o - 1)
                for first, n_ids in [(0, V), (WINDOW.start, ours.shape[-1])]:  # the full vocabulary, the window
                    model = Generator(uncond[:, t, first:first + n_ids])
                    chain = model.processors(rules[first], torch.tensor(NEGATIVE),
                                             guidance_scale=guidance, temperature=temperature, top_k=top_k)
                    assert [type(p).__name__ for p in chain] == (
                        ["UnbatchedClassifierFreeGuidanceLogitsProcessor"] * (guidance != 1)
                        + ["PrefixConstrainedLogitsProcessor"] + ["TemperatureLogitsWarper"] * (temperature != 1)
                        + ["TopKLogitsWarper"])
                    theirs = chain(input_ids, cond[:, t, first:first + n_ids].clone())[rows]
                    assert len(model.fed) == (guidance != 1) and all(torch.equal(f, torch.tensor(NEGATIVE))
                                                                     for f in model.fed)
                    if n_ids == V:  # nothing outside the window is ever kept
                        assert theirs[:, :WINDOW.start].isneginf().all() and theirs[:, WINDOW.stop:].isneginf().all()
                        theirs = theirs[:, WINDOW]
                        if guidance != 1:
                            normalised = lambda s: s.double() - s.double().logsumexp(-1, keepdim=True)
                            assert_same_scores(normalised(ours[rows, t]), normalised(theirs), atol=5e-5)
                            continue
                    assert_same_scores(ours[rows, t], theirs)


def top_p_margin(scores, p):
    """How far from p the mass before each kept-or-dropped token lies, at the closest (top-p's decision margin)."""
    probs = scores.double().softmax(-1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) - p).abs().min(-1).values


def test_text_scores_match_transformers():
    """Chat's step against transformers' warpers as generate(do_sample=True, temperature, top_k, top_p) chains them:
    temperature, then top-k, then top-p. top_k 0 and top_p 1 switch transformers' off (unset, its top_k would be
    50); ours takes None."""
    g = torch.Generator().manual_seed(0)
    B, V = 3, CFG.vocab_size
    # a long tail, and a head of 40 likely tokens per row that holds most of the mass even at temperature 1.5 (top-p
    # through a tail of 10^5 tokens of ~1e-6 each would have no margin)
    logits = torch.randn(B, V, generator=g)
    head = torch.rand(B, V, generator=g).argsort(-1)[:, :40]
    logits.scatter_add_(1, head, 16 + 1.5 * torch.randn(B, 40, generator=g))
    for temperature in (0.6, 1.5):
        for top_k in (None, 5, 50):
            for top_p in (None, 0.5, 0.9):
                ours = generate.text_scores(logits, temperature, top_k, top_p)
                chain = Generator(None).processors(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
                assert [type(p).__name__ for p in chain] == (["TemperatureLogitsWarper"] + ["TopKLogitsWarper"] * bool(
                    top_k) + ["TopPLogitsWarper"] * (top_p is not None))
                before_top_p = generate.text_scores(logits, temperature, top_k, None)
                if top_k:
                    assert (boundary_gap(logits / temperature, top_k) > MIN_GAP).all(), "near-tie at the top-k boundary"
                if top_p:
                    assert (top_p_margin(before_top_p, top_p) > MIN_GAP).all(), "near-tie at the top-p boundary"
                theirs = chain(torch.zeros(B, 1, dtype=torch.long), logits.clone())
                assert_same_scores(ours, theirs)
                kept = (~ours.isneginf()).sum(-1)
                assert (kept > 1).any() and ((kept < V).all() or not (top_k or top_p))  # a choice; filters filter

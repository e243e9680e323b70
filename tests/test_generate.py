"""Image generation (generate.py, sample.images) against transformers' generate, plus invariants.

Parity: a tiny random "-hf" checkpoint (tests/hf_tiny.py: full 184622 vocabulary, Qwen-BPE tokenizer, 8x VQ) runs
transformers' recipe (generate with guidance_scale=3.0, negative_prompt_ids built WITH the image prefix,
prefix_allowed_tokens_fn = the Emu3 docs' grid rule, greedy) and ours (one 2B-row batch, static cache, device mask).
Greedy tokens must be identical, every greedy step having a top-2 margin far above float noise, and the decoded
PNGs within 1 per channel of transformers' decode_image_tokens + processor postprocess.
Properties (hypothesis, fake logits, no model): whatever the logits, the output is h rows of w visual tokens + EOL,
then EOF, EOI, EOS.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint
import convert
import generate
import prompts
import sample
from emu3 import Emu3Config
from hf_tiny import reference_grid_rule as prefix_fn, write_hf_tiny
from vqvae import postprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_MARGIN = 1e-3  # greedy top-2 gap we require; fp32 CPU noise between the implementations is ~1e-5


def gen_ids(tok, text, h, w):
    """The ids of an Emu3-Gen prompt (prompts.gen_prompt) for an h x w grid."""
    return prompts.encode(tok, prompts.gen_prompt(text, h, w))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(hf dir, our converted dir) of one tiny random checkpoint."""
    hf_dir = str(tmp_path_factory.mktemp("hf_tiny"))
    write_hf_tiny(hf_dir, seed=0)
    ours = str(tmp_path_factory.mktemp("ours_tiny"))
    convert.convert(hf_dir, ours, dtype="float32")
    return hf_dir, ours


@pytest.fixture(scope="module")
def models(ckpt):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor
    hf_dir, ours_dir = ckpt
    hf = Emu3ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = Emu3Processor.from_pretrained(hf_dir)
    model, cfg = checkpoint.load_emu3(ours_dir, "cpu", torch.float32)
    return dict(hf=hf, processor=processor, model=model, cfg=cfg, vq=checkpoint.load_vqvae(ours_dir),
                tok=checkpoint.load_tokenizer(ours_dir))


def ours_greedy(monkeypatch, model, cond, neg, h, w, grids=None, **kw):
    """Our greedy generation, also returning the smallest top-2 gap of the scores it took an argmax of."""
    gaps, real = [], generate.pick_image

    def recording(scores, greedy, seeds, positions, first_id):
        top2 = scores.topk(2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]).min().item())  # forced steps: 0 - (-inf) = inf
        return real(scores, greedy, seeds, positions, first_id)
    monkeypatch.setattr(generate, "pick_image", recording)
    kw = dict(guidance=3.0) | kw
    out, _ = generate.generate_image_tokens(model, cond, neg, grids or [(h, w)] * len(cond), top_k=1, **kw)
    monkeypatch.setattr(generate, "pick_image", real)
    return out, min(gaps)


def hf_generate(m, texts, ratio, area, h, w, guidance=3.0):
    """transformers' recipe, greedy. Returns (prompt ids, negative ids, new tokens, PIL images)."""
    hf, processor, cfg = m["hf"], m["processor"], m["cfg"]
    pos = processor(text=[t + prompts.POSITIVE_PROMPT for t in texts], return_for_image_generation=True,
                    ratio=ratio, image_area=area, padding=True, return_tensors="pt")
    neg = processor(text=[prompts.NEGATIVE_PROMPT] * len(texts), return_for_image_generation=True,
                    ratio=ratio, image_area=area, padding=True, return_tensors="pt")
    assert pos["image_sizes"][0] == [h, w]
    n_new = h * (w + 1) + 3
    with torch.no_grad():
        out = hf.generate(input_ids=pos["input_ids"], attention_mask=pos["attention_mask"], do_sample=False,
                          guidance_scale=guidance, negative_prompt_ids=neg["input_ids"],
                          negative_prompt_attention_mask=neg["attention_mask"],
                          prefix_allowed_tokens_fn=prefix_fn(h, w, cfg), max_new_tokens=n_new,
                          pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id)
        new = out[:, pos["input_ids"].shape[1]:]
        img = hf.decode_image_tokens(image_tokens=new, height=h, width=w)  # VQ in fp32 (model loaded in fp32)
    pils = processor.postprocess(list(img.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    unpad = lambda ids, mask: [i for i, k in zip(ids.tolist(), mask.tolist()) if k]
    return ([unpad(*r) for r in zip(pos["input_ids"], pos["attention_mask"])],
            [unpad(*r) for r in zip(neg["input_ids"], neg["attention_mask"])], new, pils)


def ours_images(m, tokens, h, w):
    codes = generate.tokens_to_codes(tokens, h, w, m["cfg"])
    with torch.no_grad():
        return [np.asarray(postprocess(x)) for x in m["vq"].decode(codes)]


@pytest.mark.parametrize("ratio,area,texts", [
    ("1:1", 1024, ["a red fox in the snow"]),
    ("16:9", 1024, ["a lighthouse at dusk"]),
    ("9:16", 1024, ["portrait of an old sailor"]),
    ("1:1", 1024, ["a cat", "a very long prompt about a small dog running on a sunny beach"]),  # batch, padded
])
def test_greedy_parity_with_transformers(models, monkeypatch, ratio, area, texts):
    m = models
    h, w = prompts.generate_size(ratio, area)
    hf_pos, hf_neg, hf_new, hf_pils = hf_generate(m, texts, ratio, area, h, w)
    # our prompt building gives transformers' processor's ids, negative prompt included
    cond = [gen_ids(m["tok"], t + prompts.POSITIVE_PROMPT, h, w) for t in texts]
    neg = [gen_ids(m["tok"], prompts.NEGATIVE_PROMPT, h, w)] * len(texts)
    assert cond == hf_pos and neg == hf_neg

    out, margin = ours_greedy(monkeypatch, m["model"], cond, neg, h, w)
    assert margin > MIN_MARGIN, f"greedy near-tie ({margin:.2e}): pick another prompt or seed"
    assert out.shape == hf_new.shape == (len(texts), h * (w + 1) + 3)
    assert torch.equal(out, hf_new)
    # the same through a prefill of many small chunks (prompts of ~50 and ~60 tokens, padded rows included)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 7)
    assert torch.equal(ours_greedy(monkeypatch, m["model"], cond, neg, h, w)[0], hf_new)
    for ours, theirs in zip(ours_images(m, out, h, w), hf_pils):
        theirs = np.asarray(theirs)
        assert ours.shape == theirs.shape == (8 * h, 8 * w, 3)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    if len(texts) == 2:  # the answer depends on the prompt: different prompts, different grids
        assert not torch.equal(out[0], out[1])


def test_guidance_one_is_the_conditional_model(models, monkeypatch):
    # transformers adds no guidance at scale 1 (no CFG processor, no negative pass): ours runs the cond rows alone
    m, texts = models, ["a red fox in the snow", "a lighthouse at dusk"]
    h, w = prompts.generate_size("1:1", 1024)
    hf_pos, _, hf_new, _ = hf_generate(m, texts, "1:1", 1024, h, w, guidance=1.0)
    fed, real = [], m["model"].forward
    monkeypatch.setattr(m["model"], "forward", lambda tokens, *a, **k: (fed.append(tokens.shape[0]), real(tokens, *a, **k))[1])
    out, margin = ours_greedy(monkeypatch, m["model"], hf_pos, hf_pos, h, w, guidance=1.0)
    assert margin > MIN_MARGIN and torch.equal(out, hf_new)
    assert set(fed) == {2}  # B rows, never 2B


def test_one_batch_equals_two_passes(models, monkeypatch):
    """2B rows in one forward == the reference's two-pass formulation (uncond: its own cache, positions from 0)."""
    m, cfg = models, models["cfg"]
    h, w = 3, 4
    tok = m["tok"]
    cond = [gen_ids(tok, t + prompts.POSITIVE_PROMPT, h, w) for t in ["a cat", "a long winding road through autumn hills"]]
    neg = [gen_ids(tok, "blurry", h, w)] * 2  # shorter than cond: its rows are padded too
    out, margin = ours_greedy(monkeypatch, m["model"], cond, neg, h, w)
    assert margin > MIN_MARGIN

    # two passes: two model copies, each with its own cache; cond left padded, uncond unpadded from position 0
    mc, mu = copy.deepcopy(m["model"]), copy.deepcopy(m["model"])
    Lc, Ln, n_new = max(map(len, cond)), len(neg[0]), h * (w + 1) + 3
    pad_c = torch.tensor([Lc - len(r) for r in cond])
    mc.setup_cache(2, Lc + n_new)
    mu.setup_cache(2, Ln + n_new)
    with torch.no_grad():
        lc = mc(torch.tensor([[cfg.pad_id] * (Lc - len(r)) + r for r in cond]), torch.arange(Lc), pad=pad_c,
                last_only=True)[:, -1]
        lu = mu(torch.tensor(neg), torch.arange(Ln), last_only=True)[:, -1]
        ref = []
        for i in range(n_new):
            scores = generate.guidance_scores(lc, lu, 3.0)
            scores = scores + generate.grid_mask(torch.tensor(i + 1), h, w, cfg, 0, scores.shape[-1])
            t = scores.argmax(-1)
            ref.append(t)
            lc = mc(t[:, None], input_pos=torch.tensor([Lc + i]), pad=pad_c)[:, -1]
            lu = mu(t[:, None], input_pos=torch.tensor([Ln + i]))[:, -1]
    assert torch.equal(out, torch.stack(ref, 1))


def test_seed_reproducible_and_seed_dependent(models):
    m = models
    h, w = 3, 3
    cond = [gen_ids(m["tok"], "a red fox" + prompts.POSITIVE_PROMPT, h, w)]
    neg = [gen_ids(m["tok"], prompts.NEGATIVE_PROMPT, h, w)]
    # a hot temperature: the tiny model's logits are spread wide on purpose (greedy margins), which leaves
    # plain sampling almost deterministic
    run = lambda seed: generate.generate_image_tokens(m["model"], cond, neg, [(h, w)], top_k=2048, temperature=100.0,
                                                      seed=seed)[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cli_same_seed_same_image(ckpt, tmp_path):
    _, ours = ckpt
    kw = dict(ckpt=ours, prompt=["a red fox"], negative_prompt=prompts.NEGATIVE_PROMPT, ratio=["4:3"], area=1024,
              guidance=3.0, top_k=2048, temperature=100.0, batch=2, parallel=0, seed=7, device="cpu",
              dtype="float32", threads=None, compile_step=False, quality_suffix=True, preview=None, preview_rows=8)
    sample.run_image(out=str(tmp_path / "a.png"), **kw)
    sample.run_image(out=str(tmp_path / "b.png"), **kw)
    from PIL import Image
    img = lambda name: np.asarray(Image.open(tmp_path / name))
    h, w = prompts.generate_size("4:3", 1024)
    assert img("a_0.png").shape == (8 * h, 8 * w, 3)
    assert np.array_equal(img("a_0.png"), img("b_0.png")) and np.array_equal(img("a_1.png"), img("b_1.png"))
    assert not np.array_equal(img("a_0.png"), img("a_1.png"))  # the batch's two samples differ


# ---- pure functions ----

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(64, 2_000_000))
def test_generate_size_matches_processor(width, height, area):
    from transformers import Emu3Processor
    expected = Emu3Processor.calculate_generate_size(None, f"{width}:{height}", area, 8)
    if min(expected) < 1:
        with pytest.raises(ValueError, match="too small"):
            prompts.generate_size(f"{width}:{height}", area)
    else:
        assert prompts.generate_size(f"{width}:{height}", area) == expected


def test_generate_size_table():
    from transformers import Emu3Processor
    for ratio in ["1:1", "4:3", "16:9", "9:16", "3:2"]:
        for area in [518400, 262144]:
            assert prompts.generate_size(ratio, area) == Emu3Processor.calculate_generate_size(None, ratio, area, 8)
    assert prompts.generate_size("1:1", 518400) == (90, 90)


@pytest.mark.parametrize("ratio", ["16x9", "0:1", "1:0", "-1:2", "a:b", "1:2:3", "", "1.5:1"])
def test_generate_size_bad_ratio(ratio):
    with pytest.raises(ValueError, match="W:H"):
        prompts.generate_size(ratio, 518400)


def test_generate_size_area_too_small():
    with pytest.raises(ValueError, match="too small"):
        prompts.generate_size("16:9", 10)


def test_area_too_large_for_positions():
    cfg = Emu3Config(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, max_seq_len=9216)
    fake = FakeModel(cfg, "normal", 0)
    h, w = prompts.generate_size("1:1", 1024 * 1024)  # 128x128 grid: 16515 tokens > 9216 positions
    with pytest.raises(ValueError, match="positions"):
        generate.generate_image_tokens(fake, [[cfg.bos_id, cfg.wrapper_id]], [[cfg.bos_id, cfg.wrapper_id]], [(h, w)])


def test_cfg_formula():
    c, u = torch.randn(2, 50), torch.randn(2, 50)
    lc, lu = torch.log_softmax(c, -1), torch.log_softmax(u, -1)
    torch.testing.assert_close(generate.guidance_scores(c, u, 3.0), 3.0 * (lc - lu) + lu)
    torch.testing.assert_close(generate.guidance_scores(c, u, 1.0), lc)
    assert generate.guidance_scores(c.bfloat16(), u.bfloat16(), 3.0).dtype == torch.float32


SMALL = Emu3Config(vocab_size=60, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, max_seq_len=4096,
                   pad_id=0, eol_id=1, eof_id=2, bos_id=3, eos_id=4, wrapper_id=5, boi_id=6, eoi_id=7,
                   visual_offset=10, codebook_size=40)  # ids 50..59 lie past the codebook: not visual


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_grid_mask_matches_prefix_fn(h, w, data):
    """The device mask allows exactly the set Emu3's prefix_allowed_tokens_fn returns, at every offset up to EOS.

    Except where the reference contradicts itself: its EOL rule also fires at EOI's slot (w == 1) or EOS's (w == 2).
    """
    cfg, n = SMALL, h * (w + 1)
    fn = prefix_fn(h, w, cfg)
    offs = list(range(1, n + 3 * (w + 1) + 2))
    mask = generate.grid_mask(torch.tensor(offs), h, w, cfg, 0, cfg.vocab_size)  # (n_offs, V)
    prompt = data.draw(st.lists(st.sampled_from([8, 9, 50]), max_size=3))  # tokens before <|image token|>
    for off, row in zip(offs, mask):
        ids = torch.tensor(prompt + [cfg.wrapper_id] + [cfg.visual_offset] * (off - 1))  # len(ids) - p == off
        ours = set(torch.nonzero(row == 0)[:, 0].tolist())
        assert torch.isneginf(row[row != 0]).all()
        if off > n + 3:
            assert ours == {cfg.pad_id}
        elif (w, off) in ((1, n + 2), (2, n + 3)):
            assert set(fn(0, ids)) == {cfg.eol_id} and ours == {cfg.eoi_id if w == 1 else cfg.eos_id}
        else:
            assert ours == set(fn(0, ids))


class FakeModel(torch.nn.Module):
    """Stands in for Emu3: adversarial random logits, records what the loop feeds it."""

    def __init__(self, cfg, mode, seed):
        super().__init__()
        self.cfg, self.mode, self.g = cfg, mode, torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(1, 1)
        self.fed = []

    def setup_cache(self, batch_size, max_len):
        pass

    def forward(self, tokens, input_pos=None, pad=None, last_only=False, vocab=None, kv_len=None):
        input_pos = torch.arange(tokens.shape[1]) if input_pos is None else input_pos  # unpadded prefill: from 0
        self.fed.append((tokens.clone(), input_pos.clone()))
        assert kv_len is None or kv_len > input_pos.max()  # attention must read every filled column
        B, T, V = *tokens.shape, self.cfg.vocab_size
        x = torch.randn(B, 1 if last_only else T, V, generator=self.g)
        if self.mode == "huge":
            x = x * 1e37
        elif self.mode == "tiny":
            x = x * 1e-38
        elif self.mode == "constant":
            x = torch.zeros_like(x)
        elif self.mode == "one":  # every token but one (random, usually not allowed) at -inf
            keep = torch.randint(V, (*x.shape[:2], 1), generator=self.g)
            x = torch.full_like(x, float("-inf")).scatter(-1, keep, 0.0)
        elif self.mode == "wants_text":  # specials and text tokens far more likely than any visual token
            x[..., : self.cfg.visual_offset] += 1e4
            x[..., self.cfg.visual_offset + self.cfg.codebook_size:] += 1e4
        return x if vocab is None else x[..., vocab]


def assert_grid(out, h, w, cfg):
    n = h * (w + 1)
    assert out.shape[1] == n + 3
    grid = out[:, :n].view(-1, h, w + 1)
    assert (grid[:, :, w] == cfg.eol_id).all()
    vis = grid[:, :, :w]
    assert ((vis >= cfg.visual_offset) & (vis < cfg.visual_offset + cfg.codebook_size)).all()
    assert (out[:, n:] == torch.tensor([cfg.eof_id, cfg.eoi_id, cfg.eos_id])).all()


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), B=st.integers(1, 2),
       mode=st.sampled_from(["normal", "huge", "tiny", "constant", "one", "wants_text"]),
       guidance=st.sampled_from([0.0, 1.0, 3.0, 7.5]), top_k=st.sampled_from([1, 2, 5, 2048]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**31))
def test_grid_property_any_logits(h, w, B, mode, guidance, top_k, temperature, seed):
    cfg = SMALL
    fake = FakeModel(cfg, mode, seed)
    cond = [[cfg.bos_id] + [8] * (b + 1) + [cfg.boi_id, 9, cfg.wrapper_id] for b in range(B)]
    neg = [[cfg.bos_id, 9, cfg.boi_id, 9, cfg.wrapper_id]] * B
    out, passes = generate.generate_image_tokens(fake, cond, neg, [(h, w)] * B, guidance, top_k, temperature, seed)
    assert_grid(out, h, w, cfg)
    # the loop fed both halves the sampled token (the conditional rows alone at guidance 1: transformers adds no
    # guidance there), one cache column after another, after one prefill
    halves = 1 if guidance == 1 else 2
    L = max(map(len, cond + (neg if halves == 2 else [])))
    # (the prefill writes all but the prompt's last token, <|image token|>, which the first step feeds)
    assert torch.equal(fake.fed[0][1], torch.arange(L - 1)) and fake.fed[0][0].shape[0] == halves * B
    fed = torch.cat([torch.full((B, 1), cfg.wrapper_id), out], 1)
    for i, (tokens, input_pos) in enumerate(fake.fed[1:]):
        assert torch.equal(tokens[:, 0], fed[:, i].repeat(halves)) and input_pos.tolist() == [L - 1 + i]
    assert len(fake.fed) - 1 == passes == h * (w + 1) + 3


def test_grid_property_full_vocab():
    cfg = Emu3Config(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8)  # real ids, 184622 tokens
    for mode in ["normal", "wants_text", "one"]:
        fake = FakeModel(cfg, mode, 0)
        out, _ = generate.generate_image_tokens(fake, [[cfg.bos_id, cfg.wrapper_id]], [[cfg.bos_id, cfg.wrapper_id]], [(2, 3)])
        assert_grid(out, 2, 3, cfg)


def test_tokens_to_codes():
    cfg = SMALL
    h, w = 2, 3
    codes = torch.randint(cfg.codebook_size, (2, h, w))
    rows = torch.cat([codes + cfg.visual_offset, torch.full((2, h, 1), cfg.eol_id)], -1).flatten(1)
    tokens = torch.cat([rows, torch.tensor([[cfg.eof_id, cfg.eoi_id, cfg.eos_id]] * 2)], 1)
    assert torch.equal(generate.tokens_to_codes(tokens, h, w, cfg), codes)


# ---- command line errors ----

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "image", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_bad_inputs(ckpt, tmp_path):
    _, ours = ckpt
    cases = [
        (["--ckpt", ours, "--prompt", "a cat", "--ratio", "16x9"], "ratio must be W:H"),
        (["--ckpt", ours, "--prompt", "a cat", "--area", "10"], "too small"),
        (["--ckpt", ours, "--prompt", "   "], "empty prompt"),
        (["--ckpt", ours, "--prompt", "a cat", "--area", str(2048 * 2048)], "positions"),  # tiny model: 2048
        (["--ckpt", str(tmp_path / "missing"), "--prompt", "a cat"], "no checkpoint directory"),
    ]
    no_vq = tmp_path / "no_vq"
    no_vq.mkdir()
    (no_vq / "config.json").write_text('{"emu3": {}}')
    cases.append((["--ckpt", str(no_vq), "--prompt", "a cat"], "no VQ-VAE"))
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0, r.stderr  # one line, no traceback


def test_second_image_reuses_the_cache(models):
    # the static KV cache is kept between calls (its storage, and so any CUDA graph recorded over it) and
    # reallocated only when a call needs more rows or columns
    m = models
    model = copy.deepcopy(m["model"])
    for layer in model.layers:  # no cache left from other tests
        layer.attn.cache = None
    prompt = lambda t, h, w: gen_ids(m["tok"], t, h, w)
    run = lambda texts, h, w: generate.generate_image_tokens(
        model, [prompt(t, h, w) for t in texts], [prompt(prompts.NEGATIVE_PROMPT, h, w)] * len(texts), [(h, w)] * len(texts))
    first = run(["a red fox"], 4, 5)[0]
    storage = [layer.attn.cache.k.data_ptr() for layer in model.layers]
    assert torch.equal(run(["a red fox"], 4, 5)[0], first)  # stale columns change nothing
    run(["a cat on a mat"], 3, 3)  # a smaller image
    assert [layer.attn.cache.k.data_ptr() for layer in model.layers] == storage
    run(["a cat", "a dog"], 4, 5)  # more rows: a new cache
    assert [layer.attn.cache.k.data_ptr() for layer in model.layers] != storage
    assert model.layers[0].attn.cache.k.shape[2] % generate.BUCKET == 1  # whole buckets and the spare column


def test_a_ratio_per_prompt(models, monkeypatch):
    # one batch, a grid per prompt (as the original's batched generation allows): each row is what that prompt
    # gives alone (greedy, fp32); rows with smaller grids finish earlier and wait with PAD
    m = models
    ratios, texts = ["1:1", "16:9", "9:16"], ["a red fox in the snow", "a lighthouse at dusk", "an old sailor"]
    grids = [prompts.generate_size(r, 1024) for r in ratios]
    assert len(set(grids)) == 3
    cond = [gen_ids(m["tok"], t + prompts.POSITIVE_PROMPT, h, w) for t, (h, w) in zip(texts, grids)]
    neg = [gen_ids(m["tok"], prompts.NEGATIVE_PROMPT, h, w) for h, w in grids]
    batch, margin = ours_greedy(monkeypatch, m["model"], cond, neg, None, None, grids=grids)
    assert margin > MIN_MARGIN
    for b, (h, w) in enumerate(grids):
        alone, margin = ours_greedy(monkeypatch, m["model"], cond[b:b + 1], neg[b:b + 1], h, w)
        assert margin > MIN_MARGIN
        n = h * (w + 1) + 3
        assert torch.equal(batch[b, :n], alone[0]) and (batch[b, n:] == m["cfg"].pad_id).all()
    # through the Python API: one PIL image per prompt, each of its own size
    loaded = sample.Loaded(m["model"], m["cfg"], m["vq"], m["tok"], sample.ImageConfig())
    pictures = sample.images(loaded, texts, ratios, area=1024, top_k=1)
    assert [p.size for p in pictures] == [(8 * w, 8 * h) for h, w in grids]

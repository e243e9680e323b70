"""Several processes on a CPU (gloo): tensor parallel (tp.py) gives the single process's tokens, data parallel the
single process's files and answers, and bad combinations are one line.

1. Two processes split one tiny random model (float and int8; CFG's 2B rows, left padding, --parallel): greedy chat
   and image tokens equal to the whole model's in one process, whose every greedy step wins by a margin asserted
   far above the noise of summing partial products in another order. A negative control removes one all-reduce in
   the same processes: the logits must then change, so the comparison cannot pass with the split not happening.
2. The split of a loaded model (tp.shard) equals the split of a checkpoint stream (checkpoint.build_emu3), rank by
   rank, float and int8, and takes the rows a GQA split must take.
3. The command line under torchrun on the shipped toy: --tp (with --int8 and --parallel) prints and writes once,
   the single process's answers and images; without --tp every process takes its share of the prompts and the
   files and answers are the single process's, in order.
"""
import copy
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import checkpoint
import generate
import quantize
import sample
import tp
import train
from test_cli import assert_one_line
from test_parallel import TINY, prompt_rows, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")
SEED, STD = 0, 4.0  # the tiny model's weights: std 4 spreads the logits, so greedy steps win by clear margins
MIN_MARGIN = 1e-3  # greedy top-2 gap required; the order of partial sums moves fp32 logits by ~1e-6
GRIDS = [(2, 3), (3, 2)]
CHAT = [[TINY.bos_id, 51, 52, 53], [TINY.bos_id, 57, 50, 55, 56, 58, 59]]  # left padded as one batch


def tiny(int8=False):
    model = tiny_model(SEED, STD)
    return quantize.int8(model) if int8 else model


def jobs(model, pick_image=None):
    """What the processes compute: whole-sequence logits, greedy chat, greedy image with CFG (2 prompts = 4 rows,
    a grid each), and the same image by --parallel 4."""
    cond, neg = prompt_rows(2, SEED)
    logits = model(torch.tensor([CHAT[1]]))
    chat = generate.generate_text(model, CHAT, 8, TINY.eos_id, TINY.pad_id)
    image = generate.generate_image_tokens(model, cond, neg, GRIDS, 3.0, top_k=1)[0]
    parallel = generate.generate_image_tokens(model, cond, neg, GRIDS, 3.0, top_k=1, parallel=4)[0]
    return dict(logits=logits, chat=chat, image=image, parallel=parallel,
                kv_heads=model.layers[0].attn.cache.k.shape[1])


def worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with torch.no_grad():
        results = {int8: jobs(tp.shard(tiny(int8), rank, world)) for int8 in (False, True)}
        broken = tp.shard(tiny(), rank, world)
        broken.layers[1].attn.wo._forward_hooks.clear()  # one all-reduce gone
        results["no_reduce"] = broken(torch.tensor([CHAT[1]]))
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    mp.spawn(worker, args=(2, str(d / "init"), str(d / "out.pt")), nprocs=2)
    return torch.load(d / "out.pt")


def one_process(int8):
    """The whole model in this process: the jobs' results, and the smallest top-2 gap of the scores of every
    greedy step of the sequential image and of chat (recorded where generate.py picks a token)."""
    model = tiny(int8)
    gaps, real_image, real_text = [], generate.pick_image, generate.pick_text
    gap = lambda scores: (lambda top2: (top2[..., 0] - top2[..., 1]).nan_to_num(nan=float("inf")).min().item())(
        scores.topk(2, dim=-1).values)  # forced grid steps: inf; rows past their image (all -inf): ignored

    def image(scores, *args):
        gaps.append(gap(scores))
        return real_image(scores, *args)

    def text(logits, *args):
        gaps.append(gap(logits))
        return real_text(logits, *args)
    generate.pick_image, generate.pick_text = image, text
    try:
        generate.generate_image_tokens(model, *prompt_rows(2, SEED), GRIDS, 3.0, top_k=1)
        generate.generate_text(model, CHAT, 8, TINY.eos_id, TINY.pad_id)
    finally:
        generate.pick_image, generate.pick_text = real_image, real_text
    assert len(gaps) > 8  # both loops were recorded
    with torch.no_grad():
        return jobs(model), min(gaps)


@pytest.mark.parametrize("int8", [False, True])
def test_tensor_parallel_gives_the_single_process_tokens(split, int8):
    ref, margin = one_process(int8)
    got = split[int8]
    assert margin > MIN_MARGIN, margin
    assert got["kv_heads"] == TINY.n_kv_heads // 2  # each process caches its own kv heads
    assert (got["logits"] - ref["logits"]).abs().max() < 1e-5 * ref["logits"].abs().max()
    assert got["chat"] == ref["chat"] and len(set(map(tuple, ref["chat"]))) == 2
    assert torch.equal(got["image"], ref["image"]) and torch.equal(got["parallel"], ref["image"])
    assert not torch.equal(ref["image"][0], ref["image"][1])  # two different images: rows are not mixed up


def test_negative_control_one_all_reduce_removed(split):
    ref, _ = one_process(False)
    assert (split["no_reduce"] - ref["logits"]).abs().max() > 0.1 * ref["logits"].abs().max()


@pytest.mark.parametrize("int8", [False, True])
def test_streamed_split_equals_splitting_the_loaded_model(int8):
    model = tiny(int8)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    q_rows, kv_rows = TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim
    for rank in (0, 1):
        streamed = checkpoint.build_emu3(TINY, sd.items(), "cpu", torch.float32, int8, (rank, 2)).state_dict()
        direct = tp.shard(copy.deepcopy(model), rank, 2).state_dict()
        assert streamed.keys() == direct.keys() == sd.keys()
        assert all(torch.equal(streamed[k], direct[k]) for k in sd)
        # GQA: query heads 2r, 2r+1 and kv head r on rank r; o and down by input columns; norms whole
        half = lambda n: slice(rank * n // 2, (rank + 1) * n // 2)
        assert torch.equal(direct["layers.0.attn.wq.weight"], sd["layers.0.attn.wq.weight"][half(q_rows)])
        assert torch.equal(direct["layers.0.attn.wk.weight"], sd["layers.0.attn.wk.weight"][half(kv_rows)])
        assert torch.equal(direct["layers.0.mlp.w_down.weight"], sd["layers.0.mlp.w_down.weight"][:, half(TINY.ffn_dim)])
        assert torch.equal(direct["lm_head.weight"], sd["lm_head.weight"][:, half(TINY.dim)])
        if int8:  # row splits take their rows' scales; column splits keep every scale
            assert torch.equal(direct["layers.0.attn.wv.scale"], sd["layers.0.attn.wv.scale"][half(kv_rows)])
            assert torch.equal(direct["layers.0.attn.wo.scale"], sd["layers.0.attn.wo.scale"])


def test_share_covers_every_prompt_once_in_order():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            blocks = [tp.share(n, r, world) for r in range(world)]
            assert [i for lo, hi in blocks for i in range(lo, hi)] == list(range(n))
            assert max(hi - lo for lo, hi in blocks) - min(hi - lo for lo, hi in blocks) <= 1


# ---- 3. the command line under torchrun ----

def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "sample.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def pixels(path):
    return np.asarray(Image.open(path))


TEXTS = ["a small blue square on the left", "a large red circle in the center", "a small green triangle at the top"]


def test_data_parallel_images_are_the_single_process_files(tmp_path):
    r = torchrun("image", "--ckpt", TOY, *[a for t in TEXTS for a in ("--prompt", t)], "--seed", 3,
                 "--out", tmp_path / "x.png")
    assert r.returncode == 0, r.stderr
    paths = [tmp_path / f"x_{i}.png" for i in range(3)]
    assert r.stdout.split() == list(map(str, paths))  # once, in prompt order
    alone = sample.images(sample.load(TOY, "cpu"), TEXTS, seed=3)
    assert all(np.array_equal(pixels(p), np.asarray(a)) for p, a in zip(paths, alone))
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    d = tmp_path_factory.mktemp("drawings")
    scenes = [("square", "blue", "small", "on the left"), ("circle", "red", "large", "in the center"),
              ("triangle", "green", "large", "at the top")]
    paths = [d / f"{i}.png" for i in range(3)]
    for k, (scene, path) in enumerate(zip(scenes, paths)):
        train.draw(scene, rng=random.Random(k)).save(path)
    return paths


def test_data_parallel_chat_prints_the_single_process_answers(drawings):
    questions = ["Describe the image.", "What shape is this?", "What colour is the shape?"]
    r = torchrun("chat", "--ckpt", TOY, *[a for q, p in zip(questions, drawings) for a in ("--prompt", q, "--image", p)])
    assert r.returncode == 0, r.stderr
    alone = sample.chat(sample.load(TOY, "cpu"), questions, [Image.open(p) for p in drawings])
    assert r.stdout.splitlines() == alone and len(set(alone)) == 3


def test_tensor_parallel_chat_int8_prints_once(drawings):
    r = torchrun("chat", "--ckpt", TOY, "--tp", "--int8", "--dtype", "float32", "--prompt", "Describe the image.",
                 "--image", drawings[0], "--prompt", "Describe the image.", "--image", drawings[2])
    assert r.returncode == 0, r.stderr
    alone = sample.chat(sample.load(TOY, "cpu", "float32", int8=True), ["Describe the image."] * 2,
                        [Image.open(drawings[0]), Image.open(drawings[2])])
    assert r.stdout.splitlines() == alone and alone[0] != alone[1]
    assert sum(line.startswith("loaded ") for line in r.stderr.splitlines()) == 1  # the first process logs for all


def test_tensor_parallel_image_written_once(tmp_path):
    r = torchrun("image", "--ckpt", TOY, "--tp", "--dtype", "float32", "--parallel", 4, "--prompt", TEXTS[0],
                 "--prompt", TEXTS[1], "--seed", 3, "--out", tmp_path / "x.png")
    assert r.returncode == 0, r.stderr
    paths = [tmp_path / f"x_{i}.png" for i in range(2)]
    assert r.stdout.split() == list(map(str, paths)) and sorted(os.listdir(tmp_path)) == ["x_0.png", "x_1.png"]
    alone = sample.images(sample.load(TOY, "cpu", "float32"), TEXTS[:2], seed=3)
    assert all(np.array_equal(pixels(p), np.asarray(a)) for p, a in zip(paths, alone))


def cli(*args, **env):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ | env)


def test_bad_combinations_are_one_line(tmp_path, monkeypatch):
    out = ("--out", tmp_path / "x.png")
    assert_one_line(cli("image", "--ckpt", TOY, "--prompt", "a", "--tp", *out), "--tp needs torchrun")
    # as torchrun starts process 0 of 3: the toy's 2 kv heads do not split in 3, found before any process meets
    three = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert_one_line(cli("chat", "--ckpt", TOY, "--prompt", "Hi", "--tp", **three),
                    "--tp over 3 processes: the model's 2 kv heads do not split into 3 equal parts")
    assert os.listdir(tmp_path) == []
    for k, v in three.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="under torchrun give --device cuda, not cuda:1"):
        tp.device_for("cuda:1")

"""Fine-tuning (`python train.py finetune`, finetune.py, lora.py) on the shipped toy checkpoint.

Checks what a fine-tune rests on: every bad line of the data is one error naming its line, before any training;
the sequences' prompts are the very ids `sample.py chat` and `sample.py image` feed the model; a LoRA checkpoint
merged computes what the adapters computed; two FSDP2 processes (gloo, CPU) train as one process does; a killed run
resumes to the same weights.
"""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import finetune
import generate
import lora
import prompts
import sample
import train
from emu3 import Emu3, Emu3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")
SCENE = ("circle", "blue", "small", "on the left")


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return sample.load(TOY, "cpu", "float32")


def write_data(folder, lines, n_images=2):
    """lines (dicts or raw strings) -> folder/data.jsonl, with n_images drawings in folder/img/."""
    (folder / "img").mkdir(exist_ok=True)
    rng = random.Random(0)
    for i in range(n_images):
        train.draw(train.TRAIN_SCENES[i * 37 % len(train.TRAIN_SCENES)], 48, rng).save(folder / "img" / f"{i}.png")
    path = folder / "data.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def small_lesson(folder, n=8):
    lines = []
    for i in range(n):
        scene = train.TRAIN_SCENES[i * 37 % len(train.TRAIN_SCENES)]
        if i % 2:
            lines.append({"prompt": train.caption(scene), "image": f"img/{i}.png"})
        else:
            lines.append({"image": f"img/{i}.png", "question": "What shape is this?", "answer": f"It is a {scene[0]}."})
    return write_data(folder, lines, n)


GOOD = {"prompt": "a small blue circle on the left", "image": "img/0.png"}
CONV = [{"role": "user", "content": [{"type": "image", "path": "img/1.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]}]


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a red circle", "image": "img/0.png"', ["data.jsonl:2:", "not valid JSON"]),
    ({"prompt": "a red circle", "image": "img/nope.png"}, ["data.jsonl:2:", "no image file", "nope.png"]),
    ({"prompt": "a red circle", "image": "img/0.png", "caption": "a circle"}, ["data.jsonl:2:", "unknown key 'caption'"]),
    ({"image": "img/0.png", "question": "What shape is this?", "answer": " "}, ["data.jsonl:2:", "empty answer"]),
    ({"image": "img/0.png", "question": "What shape is this?"}, ["data.jsonl:2:", "'answer' is missing"]),
    ({"prompt": ["a", "list"], "image": "img/0.png"}, ["data.jsonl:2:", "'prompt' must be a string"]),
    ("[1, 2]", ["data.jsonl:2:", "expected a JSON object"]),
    ({"messages": CONV[:1]}, ["data.jsonl:2:", "last message must be the assistant's answer"]),
    ({"messages": [CONV[0], {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
     ["data.jsonl:2:", "empty answer"]),
    ({"messages": [{"role": "user", "content": [{"type": "image", "path": "img/9.png"}]}, CONV[1]]},
     ["data.jsonl:2:", "no image file"]),
    ({"messages": [{"role": "user", "content": "Describe."}, CONV[1]]}, ["data.jsonl:2:", "string content"]),
])
def test_bad_lines_are_named(tmp_path, line, words):
    path = write_data(tmp_path, [GOOD, line, GOOD])
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        finetune.read_examples(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "\n" not in str(e.value)


def test_empty_file_and_good_lines(tmp_path):
    path = write_data(tmp_path, [])
    with pytest.raises(ValueError, match="data.jsonl: no examples"):
        finetune.read_examples(path)
    path = write_data(tmp_path, [GOOD, "", {"image": "img/1.png", "question": "Q?", "answer": "A."},
                                 {"question": "Hi?", "answer": "Hello."}, {"messages": CONV}])
    kinds = [(e.line, e.kind, len(e.images)) for e in finetune.read_examples(path)]
    assert kinds == [(1, "generation", 1), (3, "chat", 1), (4, "chat", 0), (5, "messages", 1)]


def test_too_long_for_the_model_names_the_line(tmp_path):
    path = write_data(tmp_path, [GOOD, {"image": "img/0.png", "question": "Why? " * 300, "answer": "Because."}])
    args = train.finetune_parser().parse_args(["--ckpt", TOY, "--data", path, "--out", str(tmp_path / "out"),
                                               "--steps", "1", "--held-out", "0"])
    with pytest.raises(ValueError, match=r"data.jsonl:2: the example is \d+ tokens, more than the model's 512 "):
        train.run_finetune(**vars(args))
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    path = write_data(tmp_path, [GOOD, GOOD, {"image": "img/0.png", "question": "Q?", "answer": ""}])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "finetune", "--ckpt", TOY, "--data", path,
                        "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {path}:3: empty answer"], r.stderr
    assert r.stdout == "" and sorted(os.listdir(tmp_path)) == ["data.jsonl", "img"]
    with pytest.raises(ValueError, match="already exists and is not empty"):  # never into a checkpoint
        train.run_finetune(**vars(train.finetune_parser().parse_args(["--ckpt", TOY, "--data", path, "--out", TOY])))


def fed_to_model(monkeypatch, call):
    """The prompt ids a sample.py job hands to the decoding loop (generate.generate_text / generate_image_tokens)."""
    seen = {}

    def text(model, ids, *a, **k):
        seen["ids"] = ids
        return [[] for _ in ids]

    def image(model, cond, neg, grids, *a, **k):
        seen["ids"], seen["grids"] = cond, grids
        raise StopIteration  # the prompt is all we need
    monkeypatch.setattr(generate, "generate_text", text)
    monkeypatch.setattr(generate, "generate_image_tokens", image)
    try:
        call()
    except StopIteration:
        pass
    return seen


def prompt_part(seq):
    ids, mask = seq
    return ids[:mask.index(1)]


def test_chat_prompts_are_what_sample_chat_feeds(toy, tmp_path, monkeypatch):
    path = write_data(tmp_path, [{"image": "img/0.png", "question": "Where is the shape?", "answer": "It is."},
                                 {"question": "What is a circle?", "answer": "A shape."}, {"messages": CONV}])
    examples = finetune.read_examples(path)
    codes = train.prepare(toy, examples, path)
    ours = [prompt_part(train.example_sequence(toy.tokenizer, toy.cfg, e, c)) for e, c in zip(examples, codes)]
    pictures = [sample.open_image(tmp_path / "img" / f"{i}.png") for i in range(2)]
    (tmp_path / "conv.json").write_text(json.dumps(CONV[:1]))  # `sample.py chat --messages conv.json`
    conv = sample.read_messages(str(tmp_path / "conv.json"))
    fed = [fed_to_model(monkeypatch, lambda: sample.chat(toy, ["Where is the shape?"], pictures[:1]))["ids"][0],
           fed_to_model(monkeypatch, lambda: sample.chat(toy, ["What is a circle?"]))["ids"][0],
           fed_to_model(monkeypatch, lambda: sample.chat(toy, messages=[conv]))["ids"][0]]
    assert ours == fed
    # and they are different prompts, with the image in them: the comparison can tell them apart
    assert len({tuple(x) for x in fed}) == 3 and sum(t >= toy.cfg.visual_offset for t in fed[0]) == 36
    ids, mask = train.example_sequence(toy.tokenizer, toy.cfg, examples[0], codes[0])
    assert toy.tokenizer.decode([t for t, k in zip(ids, mask) if k]) == " It is." and ids[-1] == toy.cfg.eos_id


@pytest.mark.parametrize("size, ratio, grid", [((48, 48), "1:1", (6, 6)), ((64, 48), "4:3", (5, 7))])
def test_generation_prompt_and_grid_are_what_sample_image_feeds(toy, tmp_path, monkeypatch, size, ratio, grid):
    # a 4:3 picture trains the grid `sample.py image --ratio 4:3` draws (5x7 at the toy's area), not the 5x6 that
    # chat's resizing would give it
    write_data(tmp_path, [])
    train.draw(SCENE, 48, random.Random(0)).resize(size).save(tmp_path / "img" / "0.png")
    path = write_data(tmp_path, [GOOD], n_images=0)
    [ex] = finetune.read_examples(path)
    [codes] = train.prepare(toy, [ex], path)
    seq = train.example_sequence(toy.tokenizer, toy.cfg, ex, codes)
    fed = fed_to_model(monkeypatch, lambda: sample.images(toy, [GOOD["prompt"]], [ratio]))
    assert prompt_part(seq) == fed["ids"][0] and [tuple(codes[0].shape)] == fed["grids"] == [grid]
    image = torch.tensor(seq[0][len(fed["ids"][0]):])[None]  # the learnt part: the picture's codes, in the grid
    assert generate.tokens_to_codes(image, *grid, toy.cfg).equal(codes[0][None]) and seq[1].count(1) == image.shape[1]


def test_lora_checkpoint_merged_computes_what_the_adapters_did(tmp_path, toy):
    # a random decoder with trained-looking adapters (B nonzero), saved through the fine-tune's own path
    cfg = Emu3Config(**{**toy.cfg.__dict__, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96})
    torch.manual_seed(0)
    model = lora.add(Emu3(cfg), 4, 8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(tokens)
    merged = lora.merge_state(finetune.gather(model), 8.0 / 4)
    checkpoint.save(str(tmp_path / "m"), cfg, [train.plain_weights(cfg, merged, torch.float32)])
    loaded, _ = checkpoint.load_emu3(str(tmp_path / "m"), "cpu", torch.float32)
    with torch.no_grad():
        got = loaded(tokens)
        plain = Emu3(cfg)
        plain.load_state_dict(lora.merge_state(finetune.gather(model), 0.0))  # the adapters left out
        without = plain(tokens)
    torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-5)
    assert (without - adapted).abs().max() > 1e-2  # the adapters matter: leaving them out would be seen


def losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+/\d+  loss ([\d.]+)", stdout, re.M)]


def test_fsdp_two_processes_follow_one(tmp_path, capsys):
    # the same run as one process and as two FSDP2 processes (gloo): each process trains on half of each batch,
    # gradients averaged by FSDP's reduce-scatter, a held-out evaluation before and after. Tolerance: what fp32
    # sums taken in another order leave (measured: losses equal to the 5 printed decimals, weights within 6e-7 of
    # an update of ~6e-4); a gradient not reduced, or a process on the wrong rows, moves them by ~1e-3 or more
    data = small_lesson(tmp_path)
    args = ["--ckpt", TOY, "--data", data, "--steps", "4", "--batch", "4", "--log-every", "1", "--held-out", "0.25",
            "--threads", "1", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        os.path.join(ROOT, "train.py"), "finetune", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stdout and r.stdout.count("held-out loss after") == 1  # rank 0 speaks
    train.run_finetune(**vars(train.finetune_parser().parse_args([*args, "--out", str(tmp_path / "one")])))
    one, two = losses(capsys.readouterr().out), losses(r.stdout)
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 2e-5, (one, two)
    a, _ = checkpoint.load_emu3(str(tmp_path / "one"), "cpu", torch.float32)
    b, _ = checkpoint.load_emu3(str(tmp_path / "two"), "cpu", torch.float32)
    src, _ = checkpoint.load_emu3(TOY, "cpu", torch.float32)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), src.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(x, z), name  # every tensor trained
    record = checkpoint.read_config(str(tmp_path / "two"))["training"]
    assert record["image_grid"] == [6, 6] and record["fine_tuned"][0]["processes"] == 2


def test_lora_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    # 4 LoRA steps straight == a run killed during step 4 (state saved every 2 steps), then resumed with --resume
    data = small_lesson(tmp_path)
    run = lambda out, *extra: train.run_finetune(**vars(train.finetune_parser().parse_args(
        ["--ckpt", TOY, "--data", data, "--out", str(tmp_path / out), "--steps", "4", "--batch", "2", "--lora", "2",
         "--save-every", "2", "--threads", "1", "--held-out", "0", *extra])))
    run("straight")
    real, calls = train.finetune_batch, []

    def dies_in_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "finetune_batch", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    monkeypatch.setattr(train, "finetune_batch", real)
    state = tmp_path / "killed.state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2 and not (tmp_path / "killed").exists()
    with pytest.raises(ValueError, match="give --resume"):
        run("killed")
    with pytest.raises(ValueError, match="with steps = 4, not 5"):
        run("killed", "--resume", "--steps", "5")
    run("killed", "--resume")
    assert "resumed at step 2" in capsys.readouterr().out and not state.exists()
    a, _ = checkpoint.load_emu3(str(tmp_path / "straight"), "cpu", torch.float32)
    b, _ = checkpoint.load_emu3(str(tmp_path / "killed"), "cpu", torch.float32)
    src, _ = checkpoint.load_emu3(TOY, "cpu", torch.float32)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), src.state_dict().values()):
        assert torch.equal(x, y), name
        # LoRA touches the block projections only; embeddings, norms and lm_head are the source's
        assert torch.equal(x, z) == (not re.search(r"\.(wq|wk|wv|wo|w_gate|w_up|w_down)\.", name)), name


def test_spanish_lesson_is_good_data_of_trained_scenes_only(tmp_path):
    # the worked example's lesson: every line reads as fine-tuning data, the kinds in the asked numbers, and no
    # held-out scene in it (the evaluation's captions must be combinations the lesson never showed)
    import spanish
    spanish.lesson(str(tmp_path / "l"), n_gen=60, n_chat=6, n_english=5, seed=3)
    examples = finetune.read_examples(str(tmp_path / "l" / "lesson.jsonl"))
    assert [sum(e.kind == k for e in examples) for k in ("generation", "chat")] == [60 + 2, 6 + 3]
    held = {spanish.caption(s) for s in train.HELD_OUT} | {train.caption(s) for s in train.HELD_OUT}
    assert not held & {e.text for e in examples if e.kind == "generation"}
    assert sum(e.text in spanish.QUESTIONS for e in examples) == 6
    with pytest.raises(ValueError, match="not empty"):
        spanish.lesson(str(tmp_path / "l"), n_gen=1, n_chat=1, n_english=0, seed=3)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "spanish.py"), "eval", "--ckpt", TOY, "--picture",
                        str(tmp_path / "p.png"), "--n-eval", "4"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --picture needs --before") and not r.stdout

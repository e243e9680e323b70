"""The command lines as a new user meets them (`sample.py chat|image|recon`, `convert.py`, `train.py`), on the shipped
toy checkpoint: bad input is one line on stderr, exit code 1 and nothing written, found before the model loads;
--help shows the defaults; train.py never writes over a checkpoint it was not told to replace.
"""
import hashlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")
IMAGE = ["image", "--ckpt", TOY, "--prompt", "a small blue square on the left"]


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(r, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "loaded" not in r.stderr  # found before the model loaded


def files_in(folder):
    return sorted(os.listdir(folder))


def test_output_paths_checked_first(tmp_path):
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "no" / "such" / "out.png", "no folder"),
             (tmp_path / "folder", "is a folder"),
             (tmp_path / "out.txt", "no image extension"),
             (tmp_path / "out", "no image extension")]
    for out, words in cases:
        assert_one_line(run("sample.py", *IMAGE, "--out", out), words)
        assert_one_line(run("sample.py", "recon", "--ckpt", TOY, "--image", os.path.join(ROOT, "toy", "samples.png"),
                            "--out", out), words)
    assert files_in(tmp_path) == ["folder"] and files_in(tmp_path / "folder") == []


@pytest.mark.parametrize("args, words", [
    (["--device", "mps"], ["device 'mps' is not available"]),
    (["--device", "cuda:7"], ["device 'cuda:7' is not available"]),
    (["--seed", str(2**64)], ["--seed must lie in [0, 2^63)"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2^63)"]),
    (["--cfg", "-1"], ["--cfg must be >= 0"]),
    (["--area", "0"], ["--area must be positive"]),
    (["--ratio", "1:1", "--ratio", "16:9"], ["2 --ratio for 1 --prompt"]),
    (["--parallel", "-2"], ["--parallel must be >= 0"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
])
def test_image_bad_arguments(tmp_path, args, words):
    assert_one_line(run("sample.py", *IMAGE, "--out", tmp_path / "x.png", *args), *words)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("args, words", [
    (["--min-pixels", "5000", "--max-pixels", "4000"], ["--min-pixels 5000 is above --max-pixels 4000"]),
    (["--device", "mps"], ["device 'mps' is not available"]),
    (["--seed", str(2**63), "--temperature", "1"], ["--seed must lie in [0, 2^63)"]),
    (["--raw", "--image", os.path.join(ROOT, "toy", "samples.png")], ["0 <image> and 1 images"]),
])
def test_chat_bad_arguments(args, words):
    assert_one_line(run("sample.py", "chat", "--ckpt", TOY, "--prompt", "What shape is this?", *args), *words)


def test_missing_checkpoint_same_message_everywhere(tmp_path):
    missing = tmp_path / "nope"
    want = f"error: no checkpoint directory {missing}"
    for r in [run("sample.py", "chat", "--ckpt", missing, "--prompt", "hi"),
              run("sample.py", "image", "--ckpt", missing, "--prompt", "hi", "--out", tmp_path / "a.png"),
              run("sample.py", "recon", "--ckpt", missing, "--image", os.path.join(ROOT, "toy", "samples.png"),
                  "--out", tmp_path / "b.png"),
              run("convert.py", missing, tmp_path / "out")]:
        assert r.returncode == 1 and r.stderr.strip() == want, r.stderr
    assert files_in(tmp_path) == []


def test_logs_threads_and_seeds(tmp_path):
    r = run("sample.py", *IMAGE, "--out", tmp_path / "a.png", "--threads", "1", "--ratio", "1:1")
    assert r.returncode == 0, r.stderr
    assert "6 rows x 6 columns of tokens = 48x48 px (width x height)" in r.stderr
    assert "seed " in r.stderr and "forward passes" in r.stderr.splitlines()[-1]
    # a grid the toy never learned is named as such
    r = run("sample.py", *IMAGE, "--out", tmp_path / "b.png", "--ratio", "2:1", "--area", 4608)
    assert r.returncode == 0, r.stderr
    assert "trained on 6x6 grids (48x48 px) only: 6x12 is outside what it learned" in r.stderr
    # chat prints the seed it drew when it samples; the checkpoint's input size is used without flags
    r = run("sample.py", "chat", "--ckpt", TOY, "--image", tmp_path / "a.png", "--prompt", "What shape is this?",
            "--temperature", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("seed ") for line in r.stderr.splitlines())


def test_progress_gives_no_estimate_before_a_rate_is_measured(capsys, monkeypatch):
    # the first report comes after the first steps (which compile with --compile): no "left" until a second one
    import sample
    seen = []
    monkeypatch.setattr(sample, "log", lambda *a: seen.append(" ".join(map(str, a))))
    reports = [(64, 1000, 64, 30.0), (128, 1000, 128, 31.0)]  # 30 s of compiling, then 64 tokens/s

    def fake_images(m, texts, ratios, progress=None, **kw):
        for r in reports:
            progress(*r)
        return [], 1000
    monkeypatch.setattr(sample, "images", fake_images)
    monkeypatch.setattr(sample, "load", lambda *a, **k: None)
    sample.run_image(TOY, ["a red circle"], sample.prompts.NEGATIVE_PROMPT, None, None, 3.0, 2048, 1.0, 1, 0,
                     "/tmp/never_written.png", 0, "cpu", "bfloat16", None, False, True, None, 8)
    progress = [s for s in seen if s.startswith("token ")]
    assert "left" not in progress[0] and progress[1].endswith("14s left")  # 872 tokens at 64 tokens/s


def test_help_shows_defaults():
    r = run("sample.py", "image", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for words in ["(default: 3.0)", "(default: 2048)", "(default: 1.0)", "(default: image.png)",
                  "(default: bfloat16 on cuda, float32 on a CPU)", "(default: lowres, bad anatomy", "(default: 0)"]:
        assert words in text, words
    assert "(default: None)" not in text
    r = run("train.py", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: toy/trained)" in text and "(default: None)" not in text


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def test_train_never_overwrites_a_checkpoint(tmp_path):
    before = digest(TOY)
    r = run("train.py", "--out", TOY, "--state", tmp_path / "state")
    assert_one_line(r, "already exists", "choose a new folder")
    assert digest(TOY) == before and not (tmp_path / "state").exists()
    samples = tmp_path / "samples.png"
    samples.write_bytes(b"keep")
    assert_one_line(run("train.py", "--eval", "--out", TOY, "--samples", samples), "exists", "--overwrite")
    assert samples.read_bytes() == b"keep"
    import train
    assert os.path.abspath(train.DEFAULT_OUT) != os.path.abspath(TOY)

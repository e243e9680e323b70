"""The Python API and the command line as a new user meets them: every example in the README and in sample.py's
docstring runs as written, and each papercut of the first reads (issue 18) is a test: types, the KV cache, names
in state_dict, image paths in messages, defaults that fit the device, and one-line errors for bad input."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import generate
import prompts
import sample
from emu3 import Emu3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy", "ckpt")


@pytest.fixture(scope="module")
def toy():
    return sample.load(TOY, "cpu")


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_snippet(code, tmp_path):
    """Run a snippet as a user would, from a folder that holds the repository's toy/ (the README says to run
    from the repository's folder): its files land in tmp_path."""
    os.symlink(os.path.join(ROOT, "toy"), tmp_path / "toy")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_readme_python_example_runs(tmp_path):
    [code] = python_blocks(open(os.path.join(ROOT, "README.md")).read())
    out = run_snippet(code, tmp_path)
    printed = re.search(r"It prints (`.*?`), (`.*?`) and (`.*?`)\.", open(os.path.join(ROOT, "README.md")).read())
    assert out.splitlines() == [p.strip("`") for p in printed.groups()]  # what the README says it prints
    assert (tmp_path / "square.png").exists()


def test_sample_docstring_example_runs(tmp_path):
    doc = sample.__doc__.split("From Python")[1].split("\n\n")[0]
    code = "\n".join(line[4:] for line in doc.splitlines()[1:])
    out = run_snippet(code + "\nprint(answer)", tmp_path)
    assert "circle" in out


def test_images_returns_one_picture_per_prompt(toy):
    [picture] = sample.images(toy, ["a large red circle in the center"], seed=0)
    assert isinstance(picture, Image.Image) and picture.size == (48, 48)
    pictures, passes = sample.images(toy, ["a large red circle in the center"], seed=0, return_passes=True)
    assert pictures[0].tobytes() == picture.tobytes() and passes == 45


def test_a_string_where_a_list_belongs_is_a_type_error(toy):
    with pytest.raises(TypeError, match="questions must be a list"):
        sample.chat(toy, "Describe the image.")
    with pytest.raises(TypeError, match="texts must be a list"):
        sample.images(toy, "a red circle")
    with pytest.raises(TypeError, match="ratios must be a list"):
        sample.images(toy, ["a red circle"], ratios="16:9")
    with pytest.raises(TypeError, match="pictures must be a list"):
        sample.chat(toy, ["Describe the image."], Image.new("RGB", (48, 48)))


def test_the_kv_cache_does_not_leak_into_plain_calls():
    m = sample.load(TOY, "cpu")
    ids = torch.tensor([[m.cfg.bos_id] + list(range(300, 340))])
    with torch.no_grad():
        fresh = m.model(ids)
        sample.images(m, ["a small green triangle at the top"], seed=1)  # sets up and fills a cache
        k = m.model.layers[0].attn.cache.k.clone()
        assert torch.equal(m.model(ids), fresh)  # a plain call reads no cache...
        assert torch.equal(m.model.layers[0].attn.cache.k, k)  # ...and writes none
        long = torch.randint(300, 340, (1, m.model.layers[0].attn.cache.k.shape[2] + 50))
        assert m.model(long).shape[1] == long.shape[1]  # longer than the cache: whole-sequence calls don't mind
    m.model.clear_cache()
    assert m.model.layers[0].attn.cache is None and m.model.rope is None
    assert sample.images(m, ["a small green triangle at the top"], seed=1)  # and it comes back when needed


def test_a_loaded_model_saves_under_the_checkpoints_names(toy, tmp_path):
    sd = toy.model.state_dict()
    stored = checkpoint.shapes_of(Emu3, toy.cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v) for k, v in stored.items()}
    checkpoint.save(tmp_path / "copy", toy.cfg, [sd], toy.vq, toy.tokenizer, toy.image)
    again = sample.load(tmp_path / "copy", "cpu")
    ids = torch.tensor([[toy.cfg.bos_id] + list(range(300, 320))])
    with torch.no_grad():
        assert torch.equal(again.model(ids), toy.model(ids))


def test_message_image_parts_take_a_path(toy, tmp_path):
    picture = sample.images(toy, ["a large blue square on the right"], seed=2)[0]
    picture.save(tmp_path / "a.png")
    conversation = lambda image: [{"role": "user", "content": [{"type": "image", "image": image},
                                                               {"type": "text", "text": "Describe the image."}]}]
    by_pil = sample.chat(toy, messages=[conversation(picture)], max_new_tokens=12)
    assert sample.chat(toy, messages=[conversation(str(tmp_path / "a.png"))], max_new_tokens=12) == by_pil


def test_images_without_a_vq_vae_is_a_clear_error():
    m = sample.load(TOY, "cpu", vq=False)
    with pytest.raises(ValueError, match="without its VQ-VAE"):
        sample.images(m, ["a red circle"])


def test_quality_suffix_can_be_turned_off(toy):
    grids = [(6, 6)]
    with_suffix, _ = sample.image_prompts(toy.tokenizer, ["a red circle"], grids)
    without, _ = sample.image_prompts(toy.tokenizer, ["a red circle"], grids, quality_suffix=False)
    assert with_suffix == [prompts.encode(toy.tokenizer, prompts.gen_prompt("a red circle" + prompts.POSITIVE_PROMPT,
                                                                            6, 6))]
    assert without == [prompts.encode(toy.tokenizer, prompts.gen_prompt("a red circle", 6, 6))]


def test_preview_shows_the_rows_so_far(toy):
    seen = []
    final = sample.images(toy, ["a large red circle in the center"], seed=0, preview=seen.append, preview_rows=2)
    assert len(seen) == 4  # rows 2, 4 and 6 (the whole grid), and the end
    grey = lambda p, rows: p.crop((0, 8 * rows, 48, 48)).getcolors() == [(48 * (48 - 8 * rows), (128, 128, 128))]
    assert grey(seen[0][0], 2) and not grey(seen[0][0], 0)  # the first 2 rows drawn, the rest grey
    assert seen[-1][0].tobytes() == final[0].tobytes()


def test_defaults_fit_the_device(toy):
    assert toy.model.embed.weight.dtype == torch.float32  # a CPU: fp32
    assert sample.default_dtype("cuda") == "bfloat16" and sample.default_dtype("cpu") == "float32"
    assert sample.auto_threads(toy.cfg) == 1  # a small model: one thread
    big = sample.configs.Emu3Config()
    assert sample.auto_threads(big) == torch.get_num_threads()


def main(capsys, *argv):
    """sample.py's main in-process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        sample.main(list(map(str, argv)))
        raise SystemExit(0)
    out, code = capsys.readouterr(), e.value.code
    if isinstance(code, str):  # sys.exit("error: ..."): the interpreter would print it to stderr and exit 1
        return 1, out.out, out.err + code + "\n"
    return code, out.out, out.err


@pytest.mark.parametrize("args,words", [
    (["image", "--prompt", "x", "--cfg", "nan"], "--cfg must be a finite number"),
    (["image", "--prompt", "x", "--cfg", "inf"], "--cfg must be a finite number"),
    (["image", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["chat", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["image", "--prompt", "x", "--parallel", "10000"], "use at most --parallel"),
    (["image", "--prompt", "word " * 1000], "the prompt is"),
    (["chat", "--prompt", ""], "empty --prompt"),
])
def test_bad_arguments_are_one_line_before_loading(capsys, args, words):
    code, out, err = main(capsys, args[0], "--ckpt", TOY, *args[1:])
    assert code != 0 and words in err and err.count("\n") <= 1, err
    assert "loaded" not in err


def test_bad_images_are_one_line_before_loading(capsys, tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    code, _, err = main(capsys, "chat", "--ckpt", TOY, "--prompt", "hi", "--image", tmp_path / "dot.png")
    assert code != 0 and "dot.png" in err and "at least 8 px" in err and "loaded" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = main(capsys, "recon", "--ckpt", TOY, "--frames", tmp_path / "empty")
    assert code != 0 and "holds no files" in err and err.count("\n") == 1
    Image.new("RGB", (5000, 5000)).save(tmp_path / "big.png")
    t = time.perf_counter()
    code, _, err = main(capsys, "recon", "--ckpt", TOY, "--image", tmp_path / "big.png", "--max-pixels", 10**8,
                        "--out", tmp_path / "r.png")
    assert code != 0 and "GiB in the VQ-VAE" in err and "--max-pixels" in err and time.perf_counter() - t < 30
    assert not (tmp_path / "r.png").exists()


def test_messages_say_only_what_matters(capsys, tmp_path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(picture)
    _, _, err = main(capsys, "chat", "--ckpt", TOY, "--image", picture, "--prompt", "What colour is the shape?")
    assert "cut" not in err  # the default fits itself silently
    _, _, err = main(capsys, "chat", "--ckpt", TOY, "--image", picture, "--prompt", "What colour is the shape?",
                     "--max-new-tokens", 5000)
    assert "max-new-tokens cut to" in err  # asked for more than fits: said
    _, _, err = main(capsys, "image", "--ckpt", TOY, "--prompt", "a", "--ratio", "2:1", "--prompt", "b", "--ratio",
                     "1:1", "--prompt", "c", "--ratio", "1:2", "--out", tmp_path / "x.png")
    grids = [line for line in err.splitlines() if line.startswith("grid")]
    assert [g.split(" = ")[0] for g in grids] == ["grid 4 rows x 8 columns of tokens", "grid 6 rows x 6 columns of "
                                                  "tokens", "grid 8 rows x 4 columns of tokens"]  # prompt order
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), TOY, str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "already in our format" in r.stderr and r.stderr.count("\n") == 1


def test_ctrl_c_is_one_line(tmp_path):
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "image", "--ckpt", TOY, "--prompt", "a",
                          "--batch", "64", "--out", str(tmp_path / "x.png")], stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    for line in p.stderr:  # interrupt once it is generating
        if line.startswith("loaded"):
            break
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait(timeout=60) == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written

"""The parity kit (parity.py) on a tiny random -hf checkpoint (3 decoder layers, a 4-level VQ-VAE, 256 byte tokens):
ours against transformers in fp32 within tolerance; a changed weight of decoder layer k diverges first at layer k; a
changed VQ decoder weight first in vq.decoder.; bf16 against fp32 within the bf16 bound (and a changed weight still
caught there); transformers' old chat bug (image embeddings dropped) caught at llm.embed; the original BAAI code's
fixtures against our traces; bad input as one line.

tiny -hf dir (save_pretrained) --convert.convert--> ours; `parity.py trace` on each; `parity.py compare`.
"""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import convert
import generate
import parity
import sample
from hf_tiny import byte_ranks, hf_tokenizer, write_hf_tiny

pytest.importorskip("transformers", reason="transformers is the reference these tests compare against")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
N_VISUAL, N_LAYERS = 64, 3
PIXELS = ["--min-pixels", str(32 * 32), "--max-pixels", str(96 * 96)]
QUESTION = "Describe the image"


def trace(out, *source, dtype="float32", extra=()):
    parity.main(["trace", *source, "--image", KIT["image"], "--prompt", QUESTION, "--out", str(out), "--dtype", dtype,
                 "--threads", "1", *PIXELS, *extra])
    return str(out)


def compare(a, b):
    lines = []
    first = parity.compare(a, b, out=lines.append)
    return first, lines


def rows(lines):
    """name -> the table's row for it."""
    return {line.split()[0]: line for line in lines if line.startswith(("vq.", "llm."))}


KIT = {}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    hf = write_hf_tiny(str(d / "hf"), tokenizer=hf_tokenizer(byte_ranks(), N_VISUAL), codebook_size=N_VISUAL,
                       n_layers=N_LAYERS, min_pixels=32 * 32, max_pixels=96 * 96, head_std=4.0)
    # a 4x4 token grid for generated images (23 tokens), so that the sampler's loop is quick
    convert.convert(hf, str(d / "ours"), dtype="float32", image_area=32 * 32, log=lambda *a: None)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / "a.png")
    KIT.update(dir=d, hf=hf, ours=str(d / "ours"), image=str(d / "a.png"))
    KIT["trace_ours"] = trace(d / "ours.safetensors", "--ckpt", KIT["ours"])
    KIT["trace_hf"] = trace(d / "hf.safetensors", "--transformers", hf)
    return KIT


def changed_copy(kit, name, file_pattern):
    """A copy of our checkpoint with one tensor changed (x1.5 plus a shift): what a porter's wrong load looks like."""
    out = kit["dir"] / f"changed-{name}"
    if out.exists():
        return str(out)
    shutil.copytree(kit["ours"], out)
    for f in os.listdir(out):
        if f.startswith(file_pattern):
            sd = load_file(out / f)
            if name in sd:
                sd[name] = sd[name] * 1.5 + 0.05
                save_file(sd, out / f)
                return str(out)
    raise AssertionError(f"no tensor {name}")


def test_trace_names_follow_the_scheme(kit):
    ours, meta = parity.load_trace(kit["trace_ours"])
    hf, meta_hf = parity.load_trace(kit["trace_hf"])
    names = list(ours)
    assert names == list(hf) == meta["order"]  # the same names from both implementations, in execution order
    layers = [f"llm.layers.{i}.{p}" for i in range(N_LAYERS) for p in ("attn", "mlp", "out")]
    llm = ["llm.tokens", "llm.embed", *layers, "llm.norm", "llm.logits"]
    i = names.index("vq.codes")
    assert names[0] == "vq.input" and names[i - 1] == "vq.latents" and names[i + 1:i + 1 + len(llm)] == llm
    assert all(n.startswith("vq.encoder.") for n in names[1:i - 1])
    assert all(n.startswith("vq.decoder.") for n in names[i + 1 + len(llm):]) and names[-1] == "vq.decoder.pixels"
    h, w = ours["vq.codes"].shape[1:]
    assert ours["vq.decoder.pixels"].shape == ours["vq.input"].shape == (1, 3, 8 * h, 8 * w)
    assert ours["llm.logits"].shape[:2] == ours["llm.tokens"].shape and ours["llm.logits"].dtype == torch.float32
    assert meta["dtypes"] == {"vq": "float32", "llm": "float32"}
    assert meta_hf["implementation"].startswith("transformers")
    assert len(meta["inputs"]["image"]["sha256"]) == 64 and meta["inputs"]["prompt"]["text"] == QUESTION
    assert meta["config"]["emu3"]["n_layers"] == N_LAYERS and meta_hf["versions"]["transformers"]


def test_ours_matches_transformers_fp32(kit):
    first, lines = compare(kit["trace_ours"], kit["trace_hf"])
    n = len(parity.load_trace(kit["trace_ours"])[0])
    assert first is None and lines[-1] == f"all {n} entries within tolerance", "\n".join(lines)
    table = rows(lines)
    assert len(table) == n and "exact" in table["vq.codes"] and "exact" in table["llm.tokens"]
    assert not any("only in" in line for line in lines)


def test_changed_decoder_layer_diverges_first_at_that_layer(kit, tmp_path):
    # a weight of layer 1 (of 0, 1, 2): every entry before layer 1 agrees, and the first divergence names layer 1
    for weight, entry in (("layers.1.attn.wq.weight", "llm.layers.1.attn"), ("layers.1.mlp.w_up.weight",
                                                                              "llm.layers.1.mlp")):
        changed = trace(tmp_path / f"{entry}.safetensors", "--ckpt", changed_copy(kit, weight, "model-"))
        first, lines = compare(kit["trace_hf"], changed)
        assert first == entry, "\n".join(lines)
        assert lines[-1].startswith(f"first divergence: {entry} ")
        table = list(rows(lines))
        assert all("DIVERGES" not in rows(lines)[n] for n in table[:table.index(entry)])


def test_changed_vq_decoder_weight_diverges_in_the_decoder(kit, tmp_path):
    for weight, entry in (("decoder.up.2.block.0.conv1.weight", "vq.decoder.up.2.block.0"),
                          ("decoder.conv_out.weight", "vq.decoder.pixels")):
        changed = trace(tmp_path / f"{entry}.safetensors", "--ckpt", changed_copy(kit, weight, "vqvae"))
        first, lines = compare(kit["trace_hf"], changed)
        assert first == entry, "\n".join(lines)
        table = rows(lines)
        assert all("DIVERGES" not in row for n, row in table.items() if not n.startswith("vq.decoder."))


def test_bf16_within_the_bf16_tolerance(kit, tmp_path):
    bf16 = trace(tmp_path / "bf16.safetensors", "--ckpt", kit["ours"], dtype="bfloat16")
    first, lines = compare(kit["trace_hf"], bf16)
    assert first is None, "\n".join(lines)
    # the bound applied to the decoder's entries is bf16's, (32 * 2^-8)^2, and the fp32 bound would have failed them
    fp32_tol, bf16_tol = parity.tolerance(torch.float32, torch.float32), parity.tolerance(torch.bfloat16, torch.float32)
    assert bf16_tol == (32 * 2.0**-8) ** 2 and fp32_tol == (512 * 2.0**-24) ** 2
    a, _ = parity.load_trace(kit["trace_hf"])
    b, _ = parity.load_trace(bf16)
    for name in ("llm.layers.2.out", "llm.logits"):
        assert f"{bf16_tol:9.1e}" in rows(lines)[name]
        _, _, nmse, _ = parity.compare_entry(a[name], b[name], bf16_tol)
        assert fp32_tol < nmse < bf16_tol / 10
    # and a changed weight is still caught at bf16's bound
    changed = trace(tmp_path / "bf16-changed.safetensors", "--ckpt",
                    changed_copy(kit, "layers.1.attn.wq.weight", "model-"), dtype="bfloat16")
    assert compare(kit["trace_hf"], changed)[0] == "llm.layers.1.attn"


def test_transformers_old_chat_bug_is_caught_at_the_embeddings(kit, monkeypatch):
    # transformers before its PR #47948 ran Emu3 chat without the image: the placeholders' own embeddings reached the
    # layers. Reproduced by a placeholder mask that selects nothing: tokens and VQ agree, llm.embed is the first to part
    from transformers import Emu3Model
    monkeypatch.setattr(Emu3Model, "get_placeholder_mask", lambda self, ids, inputs_embeds, image_features:
                        torch.zeros_like(inputs_embeds, dtype=torch.bool))
    buggy = trace(kit["dir"] / "hf-buggy.safetensors", "--transformers", kit["hf"])
    first, lines = compare(kit["trace_ours"], buggy)
    assert first == "llm.embed", "\n".join(lines)


def test_last_positions(kit, tmp_path):
    short = trace(tmp_path / "last.safetensors", "--ckpt", kit["ours"], extra=["--last", "4"])
    full, _ = parity.load_trace(kit["trace_ours"])
    part, meta = parity.load_trace(short)
    assert meta["last"] == 4 and torch.equal(part["llm.tokens"], full["llm.tokens"])
    for name in ("llm.embed", "llm.layers.0.attn", "llm.logits"):
        assert torch.equal(part[name], full[name][:, -4:])
    first, lines = compare(kit["trace_ours"], short)
    assert first == "llm.embed" and "shape 1x" in lines[-1]  # shapes differ: a divergence, not a crash


def test_original_code_fixtures(tmp_path):
    # the LLM fixture (logits of the original Emu3ForCausalLM) and the VQ fixture (codes and pixels of the original
    # Emu3VisionVQModel), written as traces, against ours: all shared entries within fp32's bound
    model, _ = convert.load_emu3(os.path.join(FIXTURES, "llm_tiny_original"), "cpu", torch.float32)
    vq = convert.load_vqvae(os.path.join(FIXTURES, "vq_tiny_original"))
    llm = load_file(os.path.join(FIXTURES, "llm_tiny_original", "logits.safetensors"))
    vq_fix = load_file(os.path.join(FIXTURES, "vq_tiny_expected.safetensors"))
    original = {"vq.input": vq_fix["image"], "vq.codes": vq_fix["image_codes"], "llm.tokens": llm["input_ids"],
                "llm.logits": llm["logits"], "vq.decoder.pixels": vq_fix["image_decoded"]}
    rec = parity.Recorder()
    codes = parity.trace_vq_encode(rec, vq, vq_fix["image"])
    parity.trace_llm(rec, model, llm["input_ids"])
    parity.trace_vq_decode(rec, vq, codes)
    paths = [str(tmp_path / "original.safetensors"), str(tmp_path / "ours.safetensors")]
    parity.save_trace(original, paths[0], implementation="original BAAI code (tests/fixtures/make_*_fixture.py)")
    parity.save_trace(rec.tensors, paths[1], implementation="emu3-from-scratch",
                      dtypes={"llm": "float32", "vq": "float32"})
    first, lines = compare(*paths)
    assert first is None and lines[-1] == "all 5 entries within tolerance", "\n".join(lines)
    assert any(line.startswith("only in B (") and "llm.layers.0.attn" in line for line in lines)
    assert llm["logits"].std() > 0.5 and vq_fix["image_codes"].unique().numel() > 8  # not a trivially flat comparison


def test_image_step_is_the_samplers_first_token(kit, tmp_path):
    # gen.token from the traced scores and noise is the first token generate.generate_image_tokens draws (the padded,
    # cached loop) for each seed, with a clear margin; the seeds draw different tokens (temperature 10 flattens the
    # tiny model's peaked first step), so the noise is traced
    m = sample.load(kit["ours"], "cpu", "float32")
    drawn = set()
    for seed in range(4):
        rec = parity.Recorder()
        meta = parity.trace_image_step(rec, m, "a red fox in the snow", "1:1", seed, temperature=10.0)
        t = rec.tensors
        out, _ = generate.generate_image_tokens(m.model, [t["gen.tokens.cond"][0].tolist()],
                                                [t["gen.tokens.uncond"][0].tolist()], [tuple(meta["grid"])], seed=seed,
                                                temperature=10.0)
        assert t["gen.token"].item() == out[0, 0].item(), seed
        best = (t["gen.scores"] + t["gen.noise"]).flatten().topk(2).values
        assert best[0] - best[1] > 1e-3
        drawn.add(t["gen.token"].item())
    assert len(drawn) > 1 and meta["grid"] == [4, 4]
    # from the command line: the gen.* entries come after the VQ decoder; transformers' trace has none (listed only)
    path = trace(tmp_path / "gen.safetensors", "--ckpt", kit["ours"],
                 extra=["--gen-prompt", "a red fox", "--seed", "3"])
    names, meta = list(parity.load_trace(path)[0]), parity.load_trace(path)[1]
    gen = ["gen.tokens.cond", "gen.tokens.uncond", "gen.logits", "gen.scores", "gen.noise", "gen.token"]
    assert names[-len(gen):] == gen and meta["inputs"]["gen"]["seed"] == 3 and meta["dtypes"]["gen"] == "float32"
    first, lines = compare(path, kit["trace_hf"])
    assert first is None and f"only in A (6, not compared): {', '.join(gen)}" in lines


# ---- compare on hand-made files ----

def test_compare_rules(tmp_path):
    a = {"vq.codes": torch.tensor([[1, 2, 3]]), "llm.embed": torch.randn(1, 5, 8), "llm.only_a": torch.zeros(2)}
    b = {"vq.codes": torch.tensor([[1, 2, 3]]), "llm.embed": a["llm.embed"] * (1 + 1e-6),
         "llm.only_b": torch.zeros(2)}
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    parity.save_trace(a, pa, dtypes={"llm": "float32"})
    parity.save_trace(b, pb)  # no dtypes: each tensor's own (fp32)
    first, lines = compare(pa, pb)
    assert first is None and lines[-1] == "all 2 entries within tolerance"
    assert "only in A (1, not compared): llm.only_a" in lines and "only in B (1, not compared): llm.only_b" in lines
    b["vq.codes"] = torch.tensor([[1, 2, 4]])
    parity.save_trace(b, pb)
    first, lines = compare(pa, pb)
    assert first == "vq.codes" and "1 of 3 differ" in lines[-1]
    b["vq.codes"], b["llm.embed"] = a["vq.codes"], a["llm.embed"] + 1e-3 * torch.randn(1, 5, 8)
    parity.save_trace(b, pb)
    assert compare(pa, pb)[0] == "llm.embed"  # NMSE ~1e-6: beyond fp32's bound
    parity.save_trace(b, pb, dtypes={"llm": "bfloat16"})
    assert compare(pa, pb)[0] is None  # ... within bf16's
    # -inf (masked scores) must stand in the same places; NMSE over the rest
    a["llm.embed"][0, 0, :3], b["llm.embed"][0, 0, :3] = -math.inf, -math.inf
    parity.save_trace(a, pa, dtypes={"llm": "bfloat16"})
    parity.save_trace(b, pb)
    assert compare(pa, pb)[0] is None
    b["llm.embed"][0, 0, 3] = -math.inf
    parity.save_trace(b, pb)
    first, lines = compare(pa, pb)
    assert first == "llm.embed" and "inf or nan in different places" in lines[-1]
    assert parity.tolerance(torch.float32, torch.bfloat16) == parity.tolerance(torch.bfloat16, torch.bfloat16)


def test_compare_command_exit_codes(kit, tmp_path):
    parity.main(["compare", kit["trace_ours"], kit["trace_hf"]])  # returns: exit code 0
    changed = trace(tmp_path / "changed.safetensors", "--ckpt",
                    changed_copy(kit, "layers.0.mlp.w_down.weight", "model-"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "parity.py"), "compare", kit["trace_ours"], changed],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("first divergence: llm.layers.0.mlp ("), r.stdout


@pytest.mark.parametrize("args, words", [
    (["--out", "{d}/t.pt"], "the trace is a .safetensors file"),
    (["--out", "{d}/no/t.safetensors"], "no folder"),
    (["--ckpt", "{d}", "--transformers", "{d}"], "exactly one of --ckpt"),
    (["--image", "{d}/missing.png"], "no image file"),
    (["--last", "-1"], "--last must be >= 0"),
    (["--prompt", " "], "empty --prompt"),
    (["--device", "cuda:7"], "not available"),
    (["--ckpt", None, "--transformers", "{ours}"], "not a transformers Emu3 -hf directory"),
    (["--gen-prompt", "a fox", "--ratio", "wide"], "ratio"),
    (["--gen-prompt", "a fox", "--seed", "-1"], "--seed must lie in [0, 2^63)"),
])
def test_trace_bad_input(kit, tmp_path, capsys, args, words):
    base = {"--ckpt": KIT["ours"], "--image": KIT["image"], "--prompt": QUESTION,
            "--out": str(tmp_path / "t.safetensors")}
    given = dict(zip(args[::2], (a and a.format(d=tmp_path, ours=KIT["ours"]) for a in args[1::2])))
    argv = ["trace"] + [x for k, v in (base | given).items() if v is not None for x in (k, v)]
    with pytest.raises(SystemExit) as e:
        parity.main(argv)
    assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing written


def test_compare_bad_input(tmp_path):
    (tmp_path / "x.safetensors").write_text("not a safetensors file")
    for a, words in ((tmp_path / "missing.safetensors", "no trace file"), (tmp_path / "x.safetensors", "is not a")):
        with pytest.raises(SystemExit) as e:
            parity.main(["compare", str(a), str(a)])
        assert str(e.value).startswith("error: ") and words in str(e.value)


def test_transformers_missing_is_one_line(kit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(SystemExit) as e:
        trace(tmp_path / "t.safetensors", "--transformers", kit["hf"])
    assert str(e.value) == "error: --transformers needs transformers (pip install transformers), which is not installed"

"""convert.py and checkpoint.py: strict key mapping (original / -hf), config fields (every one used, checked or known
inert), our format's loader, the CLI, and what conversion must refuse.

The end-to-end tests convert tiny checkpoints written by transformers' own save_pretrained (sharded, legacy on-disk
prefixes text_model.* / vqmodel.*) and by the original BAAI code (the fixture), and compare the loaded model's logits
with the reference's. Every refusal is a one-line error naming the field, file or key, exit code 1, and nothing
left in OUT.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import configs
import convert
from emu3 import Emu3, Emu3Config
from hf_tiny import byte_ranks, hf_tokenizer, write_hf_tiny
from test_emu3 import FIXTURE, FP32_TOL, max_diff, randomize_, small_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VISUAL = 16  # tiny -hf checkpoints: 256 byte tokens, 211 specials, 16 visual tokens (the VQ's codes)


def to_original(sd):
    """our names -> original names, by the same literal table read the other way (layer index substituted)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers":
            out[convert.LLM_TABLE[".".join(["layers", "{i}"] + parts[2:])].format(i=parts[1])] = v
        else:
            out[convert.LLM_TABLE[k]] = v
    return out


def random_sd(cfg, seed=0):
    return {k: v.detach().clone() for k, v in randomize_(Emu3(cfg), seed, 0.1).state_dict().items()}


def run(*args):
    return subprocess.run([sys.executable, "convert.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def assert_refused(r, *words, out=None):
    """A CLI run that failed the way bad input must: exit 1, one line naming the problem, nothing in OUT."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    if out is not None:
        assert not os.path.exists(out)
        leftovers = [f for f in os.listdir(os.path.dirname(out)) if f.startswith("." + os.path.basename(out))]
        assert leftovers == [], leftovers


# ---- pure mapping functions ----

@settings(max_examples=15, deadline=None)
@given(n_layers=st.integers(1, 12), prefix=st.sampled_from(["", "text_model.", "model.text_model."]))
def test_round_trip(n_layers, prefix):
    cfg = small_cfg(dim=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=40)
    sd = random_sd(cfg)
    orig = to_original(sd)
    assert len(orig) == 9 * n_layers + 3 and all(k.startswith(("model.", "lm_head.")) for k in orig)
    back = convert.llm_from_original(orig, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # -hf: on disk text_model.model.* + text_model.lm_head.weight; in memory model.text_model.* + lm_head.weight
    if prefix == "text_model.":
        hf = {prefix + k: v for k, v in orig.items()}
    elif prefix:
        hf = {(prefix + k[len("model."):]) if k.startswith("model.") else k: v for k, v in orig.items()}
    else:
        hf = orig  # Emu3ForCausalLM
    back = convert.llm_from_hf(hf, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("fn", ["original", "hf"])
def test_mapping_is_strict(fn):
    cfg = small_cfg(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=40)
    orig = to_original(random_sd(cfg))
    if fn == "hf":
        orig = {"text_model." + k: v for k, v in orig.items()}
    p = "text_model." if fn == "hf" else ""
    f = convert.llm_from_hf if fn == "hf" else convert.llm_from_original
    k_attn = p + "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match="missing LLM key 'layers.1.attn.wk.weight'"):
        f({k: v for k, v in orig.items() if k != k_attn}, cfg)
    with pytest.raises(ValueError, match=r"unmapped LLM key '.*rotary_emb.inv_freq'"):
        f(orig | {p + "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}, cfg)
    with pytest.raises(ValueError, match="unexpected LLM key 'layers.2.mlp_norm.weight'"):
        f(orig | {p + "model.layers.2.post_attention_layernorm.weight": torch.ones(16)}, cfg)
    with pytest.raises(ValueError, match=r"'layers.1.attn.wk.weight' has shape \(16, 16\), expected \(8, 16\)"):
        f(orig | {k_attn: torch.zeros(16, 16)}, cfg)
    with pytest.raises(ValueError, match="unmapped LLM key 'vqmodel.quantize.embedding.weight'"):
        f(orig | {"vqmodel.quantize.embedding.weight": torch.zeros(16, 4)}, cfg)


def test_configs():
    # the fixture's original config.json, and a released-shaped -hf config.json
    with open(os.path.join(FIXTURE, "config.json")) as f:
        c, checked = configs.emu3_config_from_original(json.load(f))
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.rope_theta) == (64, 3, 8, 2, 160, 5e5)
    assert (c.bos_id, c.eol_id, c.wrapper_id, c.visual_offset, c.codebook_size) == (462, 459, 464, 467, 36)
    assert checked == {"hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False, "pretraining_tp": 1}
    names = {"<|extra_200|>": 151846, "<|extra_201|>": 151847, "<|image token|>": 151851, "<|image start|>": 151852,
             "<|image end|>": 151853} | {f"<|visual token {k:06d}|>": 151854 + k for k in range(32768)}
    text = dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}, pad_token_id=151643,
                bos_token_id=151849, eos_token_id=151850)
    chat, _ = configs.emu3_config_from_hf({"text_config": text, "vocabulary_map": names})
    # Chat; the image area is not guessed from max_position_embeddings: -hf configs record none, so 720x720
    assert chat == Emu3Config(max_seq_len=131072, image_area=518400)
    gen, _ = configs.emu3_config_from_hf({"text_config": text | {"max_position_embeddings": 9216},
                                          "vocabulary_map": names})
    assert gen == Emu3Config()  # Gen = the released defaults
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        configs.emu3_config_from_hf({"text_config": {k: v for k, v in text.items() if k != "hidden_size"}})


# ---- load_emu3 on our directory format ----

def write_ours(path, cfg, sd, n_shards=2):
    os.makedirs(path, exist_ok=True)
    keys = list(sd)
    for i in range(n_shards):
        part = {k: sd[k] for k in keys[i::n_shards]}
        save_file(part, os.path.join(path, f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"emu3": cfg.__dict__}, f)


def test_load_emu3_round_trip_and_errors(tmp_path):
    cfg = small_cfg()
    sd = random_sd(cfg, seed=1)
    write_ours(tmp_path / "ok", cfg, sd)
    model, cfg2 = checkpoint.load_emu3(str(tmp_path / "ok"), "cpu", torch.float32)
    assert cfg2 == cfg and not model.training
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    model16, _ = checkpoint.load_emu3(str(tmp_path / "ok"), "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())

    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint.load_emu3(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load_emu3(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown dtype 'int7'"):
        checkpoint.load_emu3(str(tmp_path / "ok"), dtype="int7")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        checkpoint.load_emu3(str(tmp_path / "ok"), device="gpu0")
    bad = {"missing LLM key 'norm.weight'": {k: v for k, v in sd.items() if k != "norm.weight"},
           "unexpected LLM key 'layers.0.attn.bias'": sd | {"layers.0.attn.bias": torch.zeros(3)},
           r"'lm_head.weight' has shape \(300, 32\)": sd | {"lm_head.weight": torch.zeros(300, 32)}}
    for i, (msg, bad_sd) in enumerate(bad.items()):
        write_ours(tmp_path / f"bad{i}", cfg, bad_sd)
        with pytest.raises(ValueError, match=msg):
            checkpoint.load_emu3(str(tmp_path / f"bad{i}"), "cpu", torch.float32)
    with open(tmp_path / "ok" / "config.json", "w") as f:
        json.dump({"emu3": cfg.__dict__ | {"n_experts": 8}}, f)
    with pytest.raises(ValueError, match="n_experts"):
        checkpoint.load_emu3(str(tmp_path / "ok"))


# ---- end to end: a tiny -hf checkpoint from transformers' save_pretrained -> convert CLI -> load ----

def small_tokenizer():
    return hf_tokenizer(byte_ranks(), N_VISUAL)


def tiny_hf_dir(path, **kw):
    """A tiny Emu3ForConditionalGeneration with the released token layout over 256 byte tokens, weights drawn well
    above 0.02 std, saved sharded by save_pretrained (with its processor: tokenizer, preprocessor config)."""
    kw = dict(tokenizer=small_tokenizer(), codebook_size=N_VISUAL, max_shard_size="300KB", head_std=4.0) | kw
    return write_hf_tiny(str(path), **kw)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    from transformers import Emu3ForConditionalGeneration
    path = tiny_hf_dir(tmp_path_factory.mktemp("hf") / "emu3-tiny-hf")
    hf = Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.config.text_config._attn_implementation = "eager"
    cfg, _ = configs.emu3_config(path)
    return hf, cfg, path


def test_convert_hf_checkpoint(hf_tiny, tmp_path):
    hf, cfg, src = hf_tiny
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    keys = {s: list(safe_open(os.path.join(src, s), "pt").keys()) for s in shards}
    assert any(k.startswith("text_model.model.") for ks in keys.values() for k in ks)  # legacy on-disk prefixes
    assert len(shards) > 2
    out = tmp_path / "ours"
    convert.convert(str(src), str(out), dtype="float32")
    # one output shard per input shard that holds decoder tensors; VQ in vqvae.safetensors (fp32)
    n_llm = sum(any(not k.startswith("vqmodel.") for k in ks) for ks in keys.values())
    ours_files = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    assert ours_files == [f"model-{i:05d}-of-{n_llm:05d}.safetensors" for i in range(1, n_llm + 1)]
    with open(out / "config.json") as f:
        conf = json.load(f)
    assert conf["emu3"]["dim"] == 64 and conf["emu3"]["eol_id"] == 459 and conf["emu3"]["visual_offset"] == 467
    assert "vqvae" in conf and os.path.isfile(out / "vqvae.safetensors") and os.path.isfile(out / "tokenizer.json")
    # the record of what was checked, and the image settings read from preprocessor_config.json
    assert conf["source"]["format"] == "hf" and conf["source"]["checked"]["text_config.hidden_act"] == "silu"
    assert conf["image"] == {"min_pixels": 32 * 32, "max_pixels": 96 * 96, "transparency": "white"}
    assert conf["emu3"]["image_area"] == 518400

    model, c = checkpoint.load_emu3(str(out), "cpu", torch.float32)
    ids = torch.tensor([[462, 5, 6, 467, 470, 459, 472, 475, 459, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out_logits = model(ids)
    assert ref.abs().max() > 1.0 and max_diff(out_logits, ref) <= FP32_TOL
    # loading the -hf dir directly gives the same model; the VQ converts too
    direct, _ = convert.load_emu3(str(src), "cpu", torch.float32)
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in model.state_dict().items())
    vq = checkpoint.load_vqvae(str(out))
    assert vq.cfg.codebook_size == N_VISUAL
    assert all(v.dtype == torch.float32 for v in load_file(out / "vqvae.safetensors").values())

    # bf16 conversion: stored bf16, logits within bf16 noise of fp32
    out16 = tmp_path / "ours16"
    convert.convert(str(src), str(out16), dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for f in ours_files for t in load_file(out16 / f).values())
    m16, _ = checkpoint.load_emu3(str(out16), "cpu", torch.bfloat16)
    assert max_diff(m16(ids), ref) <= 0.05 * ref.abs().max()


def test_convert_keeps_the_source_dtype(hf_tiny, tmp_path):
    # no --dtype: the release's own (float32 here, as the released checkpoints), not a silent bf16 rounding
    _, _, src = hf_tiny
    r = run(src, tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    files = [f for f in os.listdir(tmp_path / "ours") if f.startswith("model-")]
    assert files and all(t.dtype == torch.float32 for f in files for t in load_file(tmp_path / "ours" / f).values())
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["source"]["dtype"] == "float32"
    # the image area is a flag, stored
    r = run(src, tmp_path / "area", "--image-area", 512 * 512)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "area" / "config.json").read_text())["emu3"]["image_area"] == 512 * 512
    assert_refused(run(src, tmp_path / "zero", "--image-area", 0), "--image-area must be positive",
                   out=str(tmp_path / "zero"))


def test_convert_original_checkpoint(tmp_path):
    # the original-format fixture (with its 256-byte emu3.tiktoken and vision-token file) -> our format
    src = tmp_path / "orig"
    shutil.copytree(FIXTURE, src)
    convert.convert(str(src), str(tmp_path / "ours"), dtype="float32")
    model, _ = checkpoint.load_emu3(str(tmp_path / "ours"), "cpu", torch.float32)
    expected = load_file(os.path.join(FIXTURE, "logits.safetensors"))
    with torch.no_grad():
        assert max_diff(model(expected["input_ids"]), expected["logits"]) <= FP32_TOL
    assert os.listdir(tmp_path / "ours").count("tokenizer.json") == 1
    conf = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert conf["emu3"]["image_area"] == 518400 and conf["source"]["format"] == "original"


def test_cli_errors(tmp_path):
    assert_refused(run(tmp_path / "nope", tmp_path / "out"), f"no checkpoint directory {tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert_refused(run(tmp_path / "empty", tmp_path / "out"), "no config.json")
    shutil.copytree(FIXTURE, tmp_path / "orig")
    os.remove(tmp_path / "orig" / "emu3.tiktoken")  # original format without emu3.tiktoken
    r = run(tmp_path / "orig", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.strip() == f"error: no emu3.tiktoken in {tmp_path / 'orig'}"
    r = run(tmp_path / "orig", tmp_path / "out", "--dtype", "int7")
    assert r.returncode != 0 and "invalid choice: 'int7'" in r.stderr
    # OUT is checked first: a missing parent folder, a file, a non-empty folder
    assert_refused(run(FIXTURE, tmp_path / "no" / "out"), "no folder")
    (tmp_path / "file").write_text("x")
    assert_refused(run(FIXTURE, tmp_path / "file"), "is a file")
    assert_refused(run(FIXTURE, tmp_path / "orig"), "already exists")


# ---- what conversion refuses: config fields, vision tokens, tokenizer, broken files ----

REFUSED = [  # (what to change in the tiny -hf checkpoint, the words the one-line error must hold)
    (dict(text_extra={"hidden_act": "gelu"}), ["hidden_act", '"gelu"']),
    (dict(text_extra={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
     ["rope_parameters", "linear"]),
    (dict(text_extra={"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}),
     ["rope_parameters", "dynamic"]),
    (dict(text_extra={"tie_word_embeddings": True}), ["tie_word_embeddings", "true"]),
    (dict(top_extra={"tie_word_embeddings": True}), ["tie_word_embeddings", "true"]),
    (dict(text_extra={"sliding_window": 4096}), ["sliding_window", "4096"]),
    (dict(vq_extra={"double_latent": True}), ["double_latent", "true"]),
]


@pytest.mark.parametrize("change, words", REFUSED, ids=[str(w[0]) for _, w in REFUSED])
def test_refuses_config_fields(tmp_path, change, words):
    # each variant written by transformers' own save_pretrained; conversion and a direct load both refuse it
    src = tiny_hf_dir(tmp_path / "hf", **change)
    assert words[0] in (tmp_path / "hf" / "config.json").read_text()  # transformers really wrote the field
    assert_refused(run(src, tmp_path / "out"), *words, out=str(tmp_path / "out"))
    r = subprocess.run([sys.executable, "sample.py", "chat", "--ckpt", src, "--prompt", "hi"], cwd=ROOT,
                       capture_output=True, text=True)
    assert_refused(r, *words)


def test_refuses_attention_bias_and_head_dim(tmp_path):
    # fields transformers' Emu3 does not write itself, as a fine-tune's config might carry them (edited in)
    src = tiny_hf_dir(tmp_path / "hf")
    conf_path = tmp_path / "hf" / "config.json"
    conf = json.loads(conf_path.read_text())
    for field, value, words in [("attention_bias", True, ["attention_bias", "true"]),
                                ("mlp_bias", True, ["mlp_bias", "true"]),
                                ("head_dim", 32, ["head_dim", "32"]),
                                ("pretraining_tp", 2, ["pretraining_tp", "2"])]:
        conf_path.write_text(json.dumps(conf | {"text_config": conf["text_config"] | {field: value}}))
        assert_refused(run(src, tmp_path / "out"), *words, out=str(tmp_path / "out"))
    conf_path.write_text(json.dumps(conf | {"vq_config": conf["vq_config"] | {"num_attention_heads": 2}}))
    assert_refused(run(src, tmp_path / "out"), "num_attention_heads", out=str(tmp_path / "out"))


def test_refuses_preprocessor_settings(tmp_path):
    # transformers 5 saves the image processor inside processor_config.json; the releases have preprocessor_config.json
    src = tiny_hf_dir(tmp_path / "hf")
    pre = json.loads((tmp_path / "hf" / "processor_config.json").read_text())["image_processor"]
    assert configs.image_config(src).max_pixels == pre["max_pixels"] == 96 * 96  # read, not assumed
    path = tmp_path / "hf" / "preprocessor_config.json"
    for field, value in [("image_mean", [0.48145466, 0.4578275, 0.40821073]), ("resample", 2), ("spatial_factor", 16),
                         ("do_normalize", False), ("rescale_factor", 1 / 256)]:
        path.write_text(json.dumps(pre | {field: value}))
        assert_refused(run(src, tmp_path / "out"), field, out=str(tmp_path / "out"))
    path.write_text(json.dumps(pre | {"min_pixels": 64 * 64, "size": {"min_pixels": 64 * 64, "max_pixels": 96 * 96}}))
    assert configs.image_config(src) == configs.ImageConfig(64 * 64, 96 * 96, "white")


def test_vision_tokens_file_is_checked(tmp_path):
    src = tmp_path / "orig"
    shutil.copytree(FIXTURE, src)
    lines = (src / "emu3_vision_tokens.txt").read_text().splitlines()
    (src / "emu3_vision_tokens.txt").write_text("\n".join(lines[:5] + ["<|visual token 000099|>"] + lines[6:]) + "\n")
    assert_refused(run(src, tmp_path / "out"), "emu3_vision_tokens.txt line 6", "000099", out=str(tmp_path / "out"))
    (src / "emu3_vision_tokens.txt").write_text("\n".join(lines[:-1]) + "\n")
    assert_refused(run(src, tmp_path / "out"), "emu3_vision_tokens.txt", out=str(tmp_path / "out"))


def test_config_ids_must_match_the_tokenizer(tmp_path):
    src = tmp_path / "orig"
    shutil.copytree(FIXTURE, src)
    conf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(conf | {"eol_token_id": conf["eol_token_id"] + 1}))
    assert_refused(run(src, tmp_path / "out"), "eol_id", out=str(tmp_path / "out"))


def test_hf_tokenizer_with_the_gpt2_regex_is_rebuilt(tmp_path):
    # the old conversion script wrote a plain ByteLevel pre-tokenizer (the GPT-2 regex): "90*90" would split as
    # 90,*,90 where the model was trained on 9,0,*,9,0. Conversion rebuilds it from its vocabulary, and says so.
    ranks = byte_ranks() | {b"90": 256}  # one merge, which only the GPT-2 split can use here
    src = tiny_hf_dir(tmp_path / "hf", tokenizer=hf_tokenizer(ranks, N_VISUAL))
    path = tmp_path / "hf" / "tokenizer.json"
    j = json.loads(path.read_text())
    assert len(checkpoint.load_tokenizer(str(path)).encode("90*90").ids) == 5  # as written: the Qwen split
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(j))
    assert checkpoint.load_tokenizer(str(path)).encode("90*90").ids == [256, ord("*"), 256]  # really the GPT-2 way
    r = run(src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "rebuilt from its vocabulary" in r.stderr
    tok = checkpoint.load_tokenizer(str(tmp_path / "out"))
    assert tok.encode("90*90").ids == [ord(c) for c in "90*90"]  # one byte token per character: the Qwen split
    assert tok.encode("a<|image start|>").ids == [ord("a"), 257 + 209]
    # a tokenizer whose specials are not where the model's ids say is refused
    j["added_tokens"] = [t | {"content": "<|extra_999|>"} if t["id"] == 257 + 203 else t for t in j["added_tokens"]]
    path.write_text(json.dumps(j))
    assert_refused(run(src, tmp_path / "out2"), "tokenizer.json", str(257 + 203), out=str(tmp_path / "out2"))


def test_broken_files(tmp_path):
    src = tiny_hf_dir(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "hf" / sorted(set(index["weight_map"].values()))[1]
    good = shard.read_bytes()
    out = str(tmp_path / "out")
    shard.write_bytes(good[: len(good) // 2])  # truncated
    assert_refused(run(src, out), "cannot read", shard.name, out=out)
    shard.write_bytes(b"\x00" * 8 + b"not safetensors at all")  # corrupt
    assert_refused(run(src, out), "cannot read", shard.name, out=out)
    shard.unlink()  # named in the index, missing
    assert_refused(run(src, out), "missing weight file", shard.name, out=out)
    shard.write_bytes(good)
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "emu3",')  # not JSON
    assert_refused(run(src, out), "config.json", "not valid JSON", out=out)

"""convert.py, decoder part: strict key mapping (original / -hf), config reading, load_emu3 and the CLI.

The end-to-end test converts a tiny "-hf" checkpoint written by transformers' own save_pretrained (sharded,
legacy on-disk prefixes text_model.* / vqmodel.*) and compares our loaded model's logits with transformers'.
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

import convert
from emu3 import Emu3, Emu3Config
from test_emu3 import FIXTURE, FP32_TOL, max_diff, randomize_, small_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        c = convert.emu3_config_from_original(json.load(f))
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.rope_theta) == (64, 3, 8, 2, 160, 5e5)
    assert (c.bos_id, c.eol_id, c.img_id, c.visual_offset, c.codebook_size) == (259, 257, 261, 264, 36)
    names = {"<|extra_200|>": 151846, "<|extra_201|>": 151847, "<|image token|>": 151851, "<|image start|>": 151852,
             "<|image end|>": 151853} | {f"<|visual token {k:06d}|>": 151854 + k for k in range(32768)}
    text = dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}, pad_token_id=151643,
                bos_token_id=151849, eos_token_id=151850)
    chat = convert.emu3_config_from_hf({"text_config": text, "vocabulary_map": names})
    assert chat == Emu3Config(max_seq_len=131072, image_area=262144)  # Chat
    gen = convert.emu3_config_from_hf({"text_config": text | {"max_position_embeddings": 9216}, "vocabulary_map": names})
    assert gen == Emu3Config()  # Gen = the released defaults
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        convert.emu3_config_from_hf({"text_config": {k: v for k, v in text.items() if k != "hidden_size"}})


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
    model, cfg2 = convert.load_emu3(str(tmp_path / "ok"), "cpu", torch.float32)
    assert cfg2 == cfg and not model.training
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    model16, _ = convert.load_emu3(str(tmp_path / "ok"), "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())

    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.load_emu3(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        convert.load_emu3(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown dtype 'int7'"):
        convert.load_emu3(str(tmp_path / "ok"), dtype="int7")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        convert.load_emu3(str(tmp_path / "ok"), device="gpu0")
    bad = {"missing LLM key 'norm.weight'": {k: v for k, v in sd.items() if k != "norm.weight"},
           "unexpected LLM key 'layers.0.attn.bias'": sd | {"layers.0.attn.bias": torch.zeros(3)},
           r"'lm_head.weight' has shape \(300, 32\)": sd | {"lm_head.weight": torch.zeros(300, 32)}}
    for i, (msg, bad_sd) in enumerate(bad.items()):
        write_ours(tmp_path / f"bad{i}", cfg, bad_sd)
        with pytest.raises(ValueError, match=msg):
            convert.load_emu3(str(tmp_path / f"bad{i}"), "cpu", torch.float32)
    with open(tmp_path / "ok" / "config.json", "w") as f:
        json.dump({"emu3": cfg.__dict__ | {"n_experts": 8}}, f)
    with pytest.raises(ValueError, match="n_experts"):
        convert.load_emu3(str(tmp_path / "ok"))


# ---- end to end: a tiny -hf checkpoint from transformers' save_pretrained -> convert CLI -> load_emu3 ----

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """Tiny Emu3ForConditionalGeneration (reference §13), random weights well above 0.02 std, saved sharded."""
    from tokenizers import Tokenizer, models
    from transformers import Emu3Config as HFEmu3Config, Emu3ForConditionalGeneration
    from test_emu3 import hf_text_config
    CB = 16
    vocab_map = ({f"t{i}": i for i in range(64)} | {"<image>": 64, "<|extra_200|>": 65}
                 | {f"<|visual token {k:06d}|>": 66 + k for k in range(CB)})
    cfg = small_cfg(vocab_size=82, ffn_dim=128)
    vq_cfg = dict(codebook_size=CB, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                  num_res_blocks=1, attn_resolutions=[1], temporal_downsample_factor=4, hidden_size=64,
                  num_attention_heads=1)
    torch.manual_seed(0)
    hf = Emu3ForConditionalGeneration(HFEmu3Config(text_config=hf_text_config(cfg).to_dict(), vq_config=vq_cfg,
                                                   vocabulary_map=vocab_map)).eval()
    randomize_(hf.model.text_model, 0, 0.1)
    randomize_(hf.lm_head, 1, 0.1)
    path = tmp_path_factory.mktemp("hf") / "emu3-tiny-hf"
    hf.save_pretrained(path, max_shard_size="300KB")
    Tokenizer(models.WordLevel(vocab_map, unk_token="t0")).save(str(path / "tokenizer.json"))
    hf.config.text_config._attn_implementation = "eager"
    return hf, cfg, path


def test_convert_hf_checkpoint(hf_tiny, tmp_path):
    hf, cfg, src = hf_tiny
    with open(src / "model.safetensors.index.json") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    keys = {s: list(safe_open(src / s, "pt").keys()) for s in shards}
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
    assert conf["emu3"]["dim"] == 64 and conf["emu3"]["eol_id"] == 65 and conf["emu3"]["visual_offset"] == 66
    assert "vqvae" in conf and os.path.isfile(out / "vqvae.safetensors") and os.path.isfile(out / "tokenizer.json")

    model, c = convert.load_emu3(str(out), "cpu", torch.float32)
    ids = torch.tensor([[1, 5, 6, 66, 70, 65, 72, 75, 65, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out_logits = model(ids)
    assert ref.abs().max() > 1.0 and max_diff(out_logits, ref) <= FP32_TOL
    # loading the -hf dir directly gives the same model; the VQ converts too
    direct, _ = convert.load_emu3(str(src), "cpu", torch.float32)
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in model.state_dict().items())
    vq = convert.load_vqvae(str(out))
    assert vq.cfg.codebook_size == 16 and all(v.dtype == torch.float32 for v in load_file(out / "vqvae.safetensors").values())

    # bf16 conversion: stored bf16, logits within bf16 noise of fp32
    out16 = tmp_path / "ours16"
    convert.convert(str(src), str(out16), dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for f in ours_files for t in load_file(out16 / f).values())
    m16, _ = convert.load_emu3(str(out16), "cpu", torch.bfloat16)
    assert max_diff(m16(ids), ref) <= 0.05 * ref.abs().max()


def test_convert_original_checkpoint(tmp_path):
    # the original-format fixture + a tiny emu3.tiktoken (the 256 single bytes) -> our format -> same logits
    src = tmp_path / "orig"
    shutil.copytree(FIXTURE, src)
    import base64
    with open(src / "emu3.tiktoken", "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    convert.convert(str(src), str(tmp_path / "ours"), dtype="float32")
    model, _ = convert.load_emu3(str(tmp_path / "ours"), "cpu", torch.float32)
    expected = load_file(os.path.join(FIXTURE, "logits.safetensors"))
    with torch.no_grad():
        assert max_diff(model(expected["input_ids"]), expected["logits"]) <= FP32_TOL
    assert os.listdir(tmp_path / "ours").count("tokenizer.json") == 1


def test_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "convert.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    r = run(tmp_path / "nope", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: no config.json")
    shutil.copytree(FIXTURE, tmp_path / "orig")  # original format without emu3.tiktoken
    r = run(tmp_path / "orig", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.strip() == f"error: no emu3.tiktoken in {tmp_path / 'orig'}"
    r = run(tmp_path / "orig", tmp_path / "out", "--dtype", "int7")
    assert r.returncode != 0 and "invalid choice: 'int7'" in r.stderr

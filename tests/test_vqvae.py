"""VQ-VAE tests: parity with transformers' Emu3VQVAE (random small configs and the full-size config), with the
original BAAI code (fixture written by tests/fixtures/make_vq_fixture.py), image processor parity with
transformers' Emu3ImageProcessor and with the original processor on transparent images (fixture written by
tests/fixtures/make_rgba_fixture.py), checkpoint conversion/loading, `sample.py recon`, and bad inputs."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor
from transformers.models.emu3.image_processing_emu3 import smart_resize as hf_smart_resize
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

import configs
import sample
from convert import vq_config_from_hf, vq_config_from_original, vq_from_hf, vq_from_original
from vqvae import VQ_TINY, VQVAE, VQConfig, postprocess, preprocess, smart_resize


def load_vqvae(path):
    """The VQ-VAE of any checkpoint directory, as sample.py loads it."""
    return sample.load(str(path), "cpu", vq=True, decoder=False).vq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MIN_MARGIN = 1e-3  # best vs second-best squared code distance; implementation noise is ~1e-6


def hf_config(cfg):
    return Emu3VQVAEConfig(codebook_size=cfg.codebook_size, embed_dim=cfg.embed_dim, latent_channels=cfg.z_channels,
                           base_channels=cfg.ch, channel_multiplier=list(cfg.ch_mult),
                           num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions),
                           temporal_downsample_factor=cfg.temporal_downsample_factor,
                           hidden_size=cfg.ch * cfg.ch_mult[-1], num_attention_heads=1)


def hf_model(cfg, seed):
    # transformers' VQ-VAE with random weights (built on meta: its own init is slow and overwritten anyway)
    hc = hf_config(cfg)
    hc._attn_implementation = "eager"  # fp32 eager attention, the reference numerics
    with torch.device("meta"):
        hf = Emu3VQVAE(hc).eval()
    hf.to_empty(device="cpu")
    randomize_(hf, torch.Generator().manual_seed(seed))
    return hf


def ours_from_hf(hf, cfg):
    with torch.device("meta"):
        ours = VQVAE(cfg).eval()
    ours.load_state_dict(vq_from_hf(hf.state_dict(), cfg), strict=True, assign=True)
    return ours


def randomize_(model, g):
    # weights larger than the default init, random norm affine params and BatchNorm running statistics
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.weight.data = torch.randn(m.weight.shape, generator=g)  # replaced by shape_codebook_
        if isinstance(m, torch.nn.BatchNorm3d):
            m.num_batches_tracked.data = torch.tensor(1000)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 1.5 / m.weight[0].numel() ** 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g)
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.data = 0.5 * torch.randn(m.running_mean.shape, generator=g)
                m.running_var.data = 0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g)


def hf_latents(hf, x):
    # transformers' encoder + quant_conv called directly (its encode() crops video codes wrongly): (N, embed_dim)
    if x.ndim == 4:
        x = x.unsqueeze(1).repeat(1, hf.config.temporal_downsample_factor, 1, 1, 1)
    h = hf.quant_conv(hf.encoder(x).permute(0, 2, 1, 3, 4))  # (B, C, T', h, w)
    return h.permute(0, 2, 3, 4, 1).reshape(-1, h.shape[1])


def hf_codes(hf, x):
    if x.ndim == 4:
        sizes = [list(x.shape[-2:])] * len(x)
        return torch.stack(hf.encode(x, image_sizes=sizes).image_tokens)
    h = hf.quant_conv(hf.encoder(x).permute(0, 2, 1, 3, 4))
    return hf.quantize(h.permute(0, 2, 1, 3, 4))


def code_margin(z, codebook):  # min over positions of (2nd best - best) squared distance
    d = torch.cdist(z.double(), codebook.double()) ** 2
    return d.topk(2, dim=1, largest=False).values.diff(dim=1).min().item()


def shape_codebook_(hf, z, g):
    # a codebook spread like the latents, widened so that ~16 codes fall inside their cloud whatever the codebook
    # size, redrawn until every position's code wins by MIN_MARGIN
    k, dim = hf.config.codebook_size, z.shape[1]
    spread = max(1.0, k / 16) ** (1 / dim)
    for _ in range(50):
        cb = z.mean(0) + spread * z.std(0) * torch.randn(k, dim, generator=g)
        if code_margin(z, cb) > MIN_MARGIN:
            hf.quantize.embedding.weight.data = cb
            return code_margin(z, cb)
    return None  # no codebook with a clear margin: the caller rejects the draw


def assert_close(ours, ref, tol=1e-5):
    # fp32 pixels: absolute tolerance, relative for outputs larger than 1
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err
    return err


# ---- parity with transformers' Emu3VQVAE ----

@st.composite
def vq_cases(draw):
    mult = tuple(draw(st.lists(st.sampled_from([1, 2]), min_size=1, max_size=3)))
    ch = draw(st.sampled_from([32, 64] if len(mult) < 3 else [32]))  # keep the deep ones cheap
    # transformers sizes every attention block by hidden_size = ch * mult[-1]: attention only at levels that wide
    wide = [i for i, m in enumerate(mult) if m == mult[-1]]
    attn = tuple(sorted(draw(st.sets(st.sampled_from(wide)))))
    z = draw(st.sampled_from([4, 8]))
    cfg = VQConfig(codebook_size=draw(st.sampled_from([32, 64])), embed_dim=z, z_channels=z, ch=ch, ch_mult=mult,
                   num_res_blocks=draw(st.integers(1, 2)), attn_resolutions=attn)
    sf = 2 ** (len(mult) - 1)
    gh, gw = draw(st.integers(2, 4)), draw(st.integers(2, 4))
    frames = draw(st.sampled_from([0, 4, 8]))  # 0: a batch of images
    shape = (draw(st.integers(1, 2)), 3, gh * sf, gw * sf) if frames == 0 else (1, frames, 3, gh * sf, gw * sf)
    return cfg, shape, draw(st.integers(0, 2**31))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vq_cases())
def test_parity_hf(case):
    cfg, shape, seed = case
    g = torch.Generator().manual_seed(seed)
    hf = hf_model(cfg, seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    with torch.no_grad():
        margin = shape_codebook_(hf, hf_latents(hf, x), g)
        assume(margin is not None)  # codes too close to call in fp32: not a fair parity case
        ours = ours_from_hf(hf, cfg)
        ref = hf_codes(hf, x)
        codes = ours.encode(x)
        assert codes.shape == ref.shape and torch.equal(codes, ref)
        assert ref.unique().numel() > 1  # not a degenerate model
        # pixels: in fp64 the two agree to ~1e-15 whatever the draw (transformers with sdpa attention: its eager
        # path takes the softmax in fp32 even for fp64 inputs). In fp32 ours must be within 1e-5 (relative) of the
        # fp64 result or, for an ill-conditioned draw (random weights can amplify rounding a thousandfold), about as
        # close to it as transformers' own fp32 result is (within 4x)
        hf64 = copy.deepcopy(hf).double()
        hf64.config._attn_implementation = "sdpa"
        ref64 = hf64.decode(ref)
        assert_close(copy.deepcopy(ours).double().decode(ref), ref64, tol=1e-10)
        err_hf32 = (hf.decode(ref).double() - ref64).abs().max().item()
        assert_close(ours.decode(ref).double(), ref64, tol=1e-5 + 4 * err_hf32 / max(1.0, ref64.abs().max().item()))


def test_parity_hf_full_size():
    # the released architecture (random weights) on one 32x32 image: codes equal, pixels within fp32 noise
    cfg = VQConfig()
    g = torch.Generator().manual_seed(0)
    hf = hf_model(cfg, 0)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        margin = shape_codebook_(hf, hf_latents(hf, x), g)
        assert margin is not None, "no codebook with a clear margin"
        ours = ours_from_hf(hf, cfg)
        assert len(ours.state_dict()) == 495
        ref = hf_codes(hf, x)
        codes = ours.encode(x)
        assert margin > MIN_MARGIN and codes.shape == (1, 4, 4) and ref.unique().numel() > 1
        assert torch.equal(codes, ref)
        assert_close(ours.decode(ref), hf.decode(ref))


# ---- parity with the original BAAI code (fixture) ----

def test_parity_original_fixture():
    model = load_vqvae(os.path.join(FIXTURES, "vq_tiny_original"))
    exp = load_file(os.path.join(FIXTURES, "vq_tiny_expected.safetensors"))
    assert exp["margin"].item() > MIN_MARGIN
    with torch.no_grad():
        for k in ("image", "video"):
            codes = model.encode(exp[k])
            assert torch.equal(codes, exp[f"{k}_codes"])
            assert exp[f"{k}_codes"].unique().numel() > 1
            assert_close(model.decode(codes), exp[f"{k}_decoded"])


# ---- image processing parity with transformers' Emu3ImageProcessor ----

def make_image(rng, h, w, mode):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)]), "RGBA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "P+transparency":
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 3
        return im
    return Image.fromarray(rgb).convert(mode)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 160), ratio=st.floats(0.2, 5.0), mode=st.sampled_from(["RGB", "RGBA", "L", "P", "I;16",
       "P+transparency", "LA"]), pixels=st.sampled_from([(32 * 32, 64 * 64), (24 * 24, 96 * 96)]), seed=st.integers(0, 99))
def test_preprocess_matches_transformers(h, ratio, mode, pixels, seed):
    w = min(max(8, -(-h // 5), round(h * ratio)), h * 5)  # aspect ratio within the original's limit of 5
    image = make_image(np.random.default_rng(seed), h, w, mode)
    proc = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=pixels[0], max_pixels=pixels[1])
    ref = proc(image, return_tensors="pt")["pixel_values"][0]
    # transformers 5 composites transparent images onto white ("white"); the original drops the alpha (see below)
    ours = preprocess(image, min_pixels=pixels[0], max_pixels=pixels[1], transparency="white")
    assert ours.dtype == torch.float32 and ours.shape == ref.shape and torch.equal(ours, ref)
    # and back: the same uint8 image
    x = ours * 1.1 + 0.05 * torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed))  # some out of range
    ref_img = proc.postprocess(x[None].numpy())["pixel_values"][0]
    assert np.array_equal(np.asarray(postprocess(x)), np.asarray(ref_img))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(8, 4000), w=st.integers(8, 4000))
@example(h=740, w=740)  # 92.5 rounds half to even: 736, not 744
@example(h=540, w=1000)  # 67.5 -> 68
def test_smart_resize_matches_transformers(h, w):
    assume(max(h, w) / min(h, w) <= 5)
    assert smart_resize(h, w, 8, 512 * 512, 1024 * 1024) == hf_smart_resize(h, w, 8, 512 * 512, 1024 * 1024)


def test_smart_resize_examples():
    # the reference's examples (emu3-reference.md 2.6), at the released min/max pixels
    for (h, w), out in {(300, 500): (400, 664), (50, 50): (512, 512), (2000, 3000): (832, 1248),
                        (333, 777): (336, 784), (720, 1280): (720, 1280), (740, 740): (736, 736)}.items():
        assert smart_resize(h, w) == out


# ---- conversion and loading ----

def tiny_hf(seed=0):
    return hf_model(VQ_TINY, seed)


def test_vq_from_hf_strict():
    sd = {"vqmodel." + k: v for k, v in tiny_hf().state_dict().items()}
    assert len(vq_from_hf(sd, VQ_TINY)) == len(sd)
    assert len(vq_from_hf({"model." + k: v for k, v in sd.items()}, VQ_TINY)) == len(sd)
    with pytest.raises(ValueError, match="vqmodel.extra.weight"):
        vq_from_hf({**sd, "vqmodel.extra.weight": torch.zeros(1)}, VQ_TINY)
    bad = dict(sd)
    del bad["vqmodel.decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        vq_from_hf(bad, VQ_TINY)
    bad = {**sd, "vqmodel.encoder.conv_in.weight": torch.zeros(1, 2, 3)}
    with pytest.raises(ValueError, match="vqmodel.encoder.conv_in.weight"):
        vq_from_hf(bad, VQ_TINY)
    with pytest.raises(ValueError, match="missing"):
        vq_from_original({}, VQ_TINY)


def test_vq_configs():
    hf = hf_config(VQ_TINY).to_dict()
    assert vq_config_from_hf(hf)[0] == VQ_TINY and vq_config_from_hf({"vq_config": hf})[0] == VQ_TINY
    assert vq_config_from_hf(Emu3VQVAEConfig().to_dict())[0] == VQConfig()
    with open(os.path.join(FIXTURES, "vq_tiny_original", "config.json")) as f:
        orig = json.load(f)
    assert vq_config_from_original(orig)[0] == VQConfig(codebook_size=64, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                                        attn_resolutions=(1,))
    with pytest.raises(ValueError, match="hidden_size"):
        vq_config_from_hf({**hf, "hidden_size": 32})


def test_load_vqvae_formats(tmp_path):
    hf = tiny_hf(1)
    sd = {"vqmodel." + k: v.contiguous() for k, v in hf.state_dict().items()}
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    # -hf: the VQ keys spread over two shards next to a text-model tensor, and an index
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": {**{k: sd[k] for k in keys[::2]}, "text_model.lm_head.weight":
              torch.zeros(2, 2)}, "model-00002-of-00002.safetensors": {k: sd[k] for k in keys[1::2]}}
    for name, part in shards.items():
        save_file(part, hf_dir / name)
    index = {"metadata": {}, "weight_map": {k: n for n, p in shards.items() for k in p}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "emu3", "vq_config": hf_config(VQ_TINY).to_dict()}))
    # ours: original names, config.json["vqvae"]
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    model = load_vqvae(hf_dir)
    save_file(model.state_dict(), ours_dir / "vqvae.safetensors")
    (ours_dir / "config.json").write_text(json.dumps({"vqvae": dataclasses.asdict(VQ_TINY)}))
    with torch.no_grad():
        ref = hf_codes(hf, x)
        for path in (hf_dir, ours_dir):
            m = load_vqvae(path)
            assert not m.training and m.quant_conv.conv.weight.dtype == torch.float32
            assert torch.equal(m.encode(x), ref)
    with pytest.raises(FileNotFoundError):
        load_vqvae(tmp_path / "nowhere")


# ---- bad inputs ----

def test_bad_inputs(tmp_path):
    model = load_vqvae(os.path.join(FIXTURES, "vq_tiny_original"))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(torch.zeros(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="integer codes"):
        model.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="at least 8"):
        preprocess(Image.new("RGB", (100, 7)))
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess(Image.new("RGB", (510, 100)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "recon", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli(tmp_path):
    ckpt = os.path.join(FIXTURES, "vq_tiny_original")
    rng = np.random.default_rng(0)
    good = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)).save(good)
    r = run_cli("--ckpt", ckpt, "--image", good, "--out", tmp_path / "out.png", "--min-pixels", 256, "--max-pixels", 1024)
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stdout and Image.open(tmp_path / "out.png").size == (36, 20)  # factor 2 here
    # unreadable and truncated files: one line naming the file, non-zero exit
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    for bad in (garbage, truncated):
        r = run_cli("--ckpt", ckpt, "--image", bad)
        assert r.returncode != 0 and r.stderr.startswith("error:") and str(bad) in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # video: 3 frames is not a multiple of 4
    r = run_cli("--ckpt", ckpt, "--frames", good, good, good)
    assert r.returncode != 0 and "multiple of 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- transparent images: the original processor (transformers 4.44) drops the alpha ----

def fixture_image(fx, name):
    """Rebuild the exact PIL image of a case of tests/fixtures/rgba_original.safetensors."""
    x = fx[f"{name}.input"].numpy()
    if f"{name}.palette" not in fx:
        return Image.fromarray(x)  # (H,W,4) RGBA, (H,W,2) LA, (H,W,3) RGB
    image = Image.frombytes("P", (x.shape[1], x.shape[0]), x.tobytes())
    image.putpalette(bytes(fx[f"{name}.palette"].numpy()))
    image.info["transparency"] = int(fx[f"{name}.transparency"][0])
    return image


def test_transparency_matches_the_original_processor():
    # the fixture is the original Emu3VisionVQImageProcessor's output under transformers 4.44 (its convert_to_rgb is a
    # plain convert("RGB")): "drop" reproduces it exactly; "white" (transformers 5) differs on every transparent case
    fx = load_file(os.path.join(FIXTURES, "rgba_original.safetensors"))
    names = sorted({k.split(".")[0] for k in fx})
    assert names == ["la", "p", "rgb", "rgba", "rgba_up"]
    for name in names:
        image, ref = fixture_image(fx, name), fx[f"{name}.pixel_values"]
        assert torch.equal(preprocess(image, 32 * 32, 64 * 64, transparency="drop"), ref), name
        white = preprocess(image, 32 * 32, 64 * 64, transparency="white")
        assert torch.equal(white, ref) == (name == "rgb"), name
    # the default (ours, the toy) and an original release follow the original; an -hf release follows transformers 5
    assert sample.ImageConfig().transparency == "drop"
    assert configs.image_config(os.path.join(FIXTURES, "vq_tiny_original")).transparency == "drop"

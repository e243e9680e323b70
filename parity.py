"""A parity kit for porters: named intermediate tensors of one chat prefill and one VQ round trip, from this code or
from transformers' Emu3, and the first place two such traces part.

    python parity.py trace --ckpt DIR --image IMG --prompt TEXT --out ours.safetensors
    python parity.py trace --transformers HF_DIR --image IMG --prompt TEXT --out hf.safetensors
    python parity.py compare ours.safetensors hf.safetensors

trace: image -> preprocess -> vq.input (1,3,H,W) -> VQ encoder stages (vq.encoder.*) -> vq.latents (1,C,1,h,w)
       -> vq.codes (1,h,w) -> the chat prompt's ids llm.tokens (1,T) -> llm.embed (1,T,dim)
       -> per layer i: llm.layers.{i}.attn, .mlp (each branch before its residual add), .out (the block's output)
       -> llm.norm -> llm.logits (1,T,V) fp32 -> the VQ decoder's stages for those codes (vq.decoder.*), ending with
       vq.decoder.pixels (1,3,H,W), the decoded image in [-1, 1] before postprocessing.
       With --gen-prompt, one image-generation step after them (this code only): the first grid token's prompts
       (gen.tokens.cond, gen.tokens.uncond), its logits (gen.logits (2,1,V')), the guided, grid-masked, top-k
       scores (gen.scores (1,1,V')), the keyed noise for --seed (gen.noise (1,1,V')) and the token drawn
       (gen.token), V' the ids of generate.grid_window (the metadata's gen.window).
       Every tensor is caught by a forward hook on a loaded model (vq_encoder_stages, vq_decoder_stages, trace_llm
       and trace_transformers name each one's module in both implementations); the model files know nothing of it.
       A 2-D VQ stage keeps frame 0 only (an image is 4 equal frames; this code runs the 2-D layers once,
       transformers four times). Written in execution order, with the order, config, dtypes, device, versions and a
       sha256 of each input in the file's metadata. Both run the VQ-VAE's convolutions without TF32.
compare: per name in A's order: shape, max |a - b|, NMSE = mean (a-b)^2 / var(a), and a bound from the two files'
       dtypes (tolerance); integer tensors must be equal. Prints `first divergence: NAME` and exits 1, or
       `all N entries within tolerance` and exits 0; names in only one file are listed, not failed.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import generate
import prompts
import sample
from vqvae import preprocess

FORMAT = "emu3-parity-trace/1"
# unit roundoff u of each dtype (half the gap between 1 and the next number) and the NMSE bound (k u)^2 an entry
# must meet, taken at the coarser of the two files' dtypes. fp32 differs from fp32 only in summation order, which
# deep convolution stacks amplify (ours against transformers on the full-size VQ-VAE: NMSE 9.7e-13 = (16.5 u)^2,
# bench/bench_parity.py), so k = 512 leaves room for other kernels and trained weights and stays far below a changed
# weight (5e-3 and up); 16-bit types round every activation, a few u per layer growing with depth (bf16 against fp32:
# (6.2 u)^2 after 32 layers, (8.9 u)^2 at the worst entry), so k = 32.
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
K = {torch.float64: 512, torch.float32: 512, torch.float16: 32, torch.bfloat16: 32}


# ---- recording ----

class Recorder:
    """Named tensors in the order they arrive (copied to the CPU at once: hooked modules may change their output in
    place afterwards, as transformers' `h *= sigmoid(h)` does), and the forward hooks that add them."""

    def __init__(self, last=0):
        self.tensors, self.handles, self.last = {}, [], last

    def add(self, name, t):
        if name in self.tensors:
            raise RuntimeError(f"{name} recorded twice: its module ran twice")
        if self.last and name.startswith("llm.") and name != "llm.tokens":
            t = t[:, -self.last:]  # (B, last, ...): the last positions only
        self.tensors[name] = t.detach().to("cpu", copy=True).contiguous()

    def hook(self, module, name, pick=lambda out: out):
        self.handles.append(module.register_forward_hook(lambda m, args, out: self.add(name, pick(out))))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def frame0(t):
    # 2-D VQ stages: rows are frames of the one image (transformers: 4 equal frames; ours: 1); keep frame 0
    return t[:1]


def whole(t):
    return t


def vq_encoder_stages(vq, hf=False):
    """[(name, module, pick)] of the VQ encoder, in execution order. Both implementations keep taming's module tree;
    transformers nests the levels in down_block and calls mid middle_block. Attention blocks are not stages (ours adds
    the residual inside, transformers outside): the next block's output holds them."""
    enc = vq.encoder
    levels, mid = (enc.down_block.down, enc.middle_block) if hf else (enc.down, enc.mid)
    stages = [("vq.encoder.conv_in", enc.conv_in, frame0)]
    for l, lv in enumerate(levels):
        stages += [(f"vq.encoder.down.{l}.block.{j}", b, frame0) for j, b in enumerate(lv.block)]
        if hasattr(lv, "downsample"):
            stages.append((f"vq.encoder.down.{l}.downsample", lv.downsample, frame0))
    stages += [("vq.encoder.mid.block_1", mid.block_1, frame0), ("vq.encoder.mid.block_2", mid.block_2, frame0),
               ("vq.encoder.conv_out", enc.conv_out, frame0)]
    # the time layers see (B, C, T, h, w): 4 frames -> 1; each convolution before its swish
    stages += [(f"vq.encoder.time_conv.{i}", m, whole) for i, m in enumerate(enc.time_conv)]
    stages += [(f"vq.encoder.time_res_stack.{i}", m, whole) for i, m in enumerate(enc.time_res_stack)]
    return stages + [("vq.latents", vq.quant_conv, whole)]  # (B, embed_dim, 1, h, w): what the quantizer rounds


def vq_decoder_stages(vq, hf=False):
    """[(name, module, pick)] of the VQ decoder, in execution order (levels from the top one down)."""
    dec = vq.decoder
    levels, mid = (dec.up_block.up, dec.middle_block) if hf else (dec.up, dec.mid)
    # post_quant_conv(code vectors), then both stacked on batch through the time layers: (2B, C, T, h, w), 1 -> 4 frames
    stages = [("vq.decoder.post_quant", vq.post_quant_conv, whole)]
    stages += [(f"vq.decoder.time_res_stack.{i}", m, whole) for i, m in enumerate(dec.time_res_stack)]
    stages += [(f"vq.decoder.time_conv.{i}", m, whole) for i, m in enumerate(dec.time_conv)]
    stages += [("vq.decoder.conv_in", dec.conv_in, frame0), ("vq.decoder.mid.block_1", mid.block_1, frame0),
               ("vq.decoder.mid.block_2", mid.block_2, frame0)]
    for l in reversed(range(len(levels))):
        stages += [(f"vq.decoder.up.{l}.block.{j}", b, frame0) for j, b in enumerate(levels[l].block)]
        if hasattr(levels[l], "upsample"):
            stages.append((f"vq.decoder.up.{l}.upsample", levels[l].upsample, frame0))
    return stages + [("vq.decoder.pixels", dec.conv_out, frame0)]  # (B, 3, H, W) in [-1, 1], before postprocess


def hooked(rec, stages):
    for name, module, pick in stages:
        rec.hook(module, name, pick)


# ---- this code ----

@torch.no_grad()
def trace_vq_encode(rec, vq, x):
    """x (1, 3, H, W) in [-1, 1] -> codes (1, h, w); records vq.input, the encoder's stages, vq.latents, vq.codes."""
    rec.add("vq.input", x)
    hooked(rec, vq_encoder_stages(vq))
    try:
        with sample.vq_precision():
            codes = vq.encode(x)
    finally:
        rec.remove()
    rec.add("vq.codes", codes)
    return codes


@torch.no_grad()
def trace_llm(rec, model, tokens):
    """tokens (1, T) -> one whole-sequence forward (no cache); records llm.tokens ... llm.logits."""
    rec.add("llm.tokens", tokens)
    rec.hook(model.embed, "llm.embed")
    for i, layer in enumerate(model.layers):
        rec.hook(layer.attn, f"llm.layers.{i}.attn")  # (B, T, dim): each branch before its residual add
        rec.hook(layer.mlp, f"llm.layers.{i}.mlp")
        rec.hook(layer, f"llm.layers.{i}.out")
    rec.hook(model.norm, "llm.norm")
    try:
        logits = model(tokens)  # (1, T, V) fp32
    finally:
        rec.remove()
    rec.add("llm.logits", logits)
    return logits


@torch.no_grad()
def trace_vq_decode(rec, vq, codes):
    """codes (1, h, w) -> the decoder's stages, ending with vq.decoder.pixels."""
    hooked(rec, vq_decoder_stages(vq))
    try:
        with sample.vq_precision():
            vq.decode(codes)
    finally:
        rec.remove()


def trace_ours(m, image, question, min_pixels=None, max_pixels=None, last=0):
    """A loaded checkpoint (sample.load), a PIL image and a question -> Recorder: the VQ encoder, one chat prefill
    with the original template (sample.chat's first step), the VQ decoder on the same codes."""
    rec = Recorder(last)
    dev = m.model.embed.weight.device
    lo, hi = min_pixels or m.image.min_pixels, max_pixels or m.image.max_pixels
    x = preprocess(image, lo, hi, m.vq.spatial_factor, m.image.transparency)[None].to(dev)  # (1, 3, H, W)
    codes = trace_vq_encode(rec, m.vq, x)
    ids = prompts.encode(m.tokenizer, prompts.chat_prompt(question, codes[0].cpu()))
    trace_llm(rec, m.model, torch.tensor([ids], device=dev))
    trace_vq_decode(rec, m.vq, codes)
    return rec


def first_image_step(model, cond, uncond, h, w, seed, guidance, top_k, temperature):
    """The first grid token of an image, as generate.py draws it: prompt ids (lists) -> (logits (2, 1, V') over the
    grid window, scores (1, 1, V'), noise (1, 1, V'), the window's first id). The one place that calls generate.py's
    sampling functions: re-point it here if they move."""
    window = generate.grid_window(model.cfg)
    dev = model.embed.weight.device
    # each prompt alone, whole sequence: the last position's logits (what generate's padded, cached prefill computes)
    logits = torch.cat([model(torch.tensor([ids], device=dev), last_only=True, vocab=window) for ids in (cond, uncond)])
    grid = torch.tensor([[h]], device=dev), torch.tensor([[w]], device=dev)
    one = torch.ones(1, dtype=torch.long, device=dev)  # offset 1 from <|image token|>: the first grid token
    scores = generate.image_scores(logits, one, *grid, model.cfg, guidance, temperature, top_k)
    ids = torch.arange(window.start, window.stop, device=dev)
    noise = generate.gumbel(seed * one, 0 * one, ids)  # image position 0
    return logits, scores, noise, window.start


@torch.no_grad()
def trace_image_step(rec, m, text, ratio, seed, guidance=3.0, top_k=2048, temperature=1.0):
    """One image-generation step (the first grid token of `text` at `ratio`, the official recipe): records gen.*."""
    h, w = prompts.generate_size(ratio, m.cfg.image_area)
    cond = prompts.encode(m.tokenizer, prompts.gen_prompt(text + prompts.POSITIVE_PROMPT, h, w))
    uncond = prompts.encode(m.tokenizer, prompts.gen_prompt(prompts.NEGATIVE_PROMPT, h, w))
    logits, scores, noise, first = first_image_step(m.model, cond, uncond, h, w, seed, guidance, top_k, temperature)
    rec.add("gen.tokens.cond", torch.tensor([cond]))
    rec.add("gen.tokens.uncond", torch.tensor([uncond]))
    rec.add("gen.logits", logits)  # (2, 1, V'): cond row, uncond row
    rec.add("gen.scores", scores)  # (1, 1, V'), -inf where the grid rule or top-k leaves a token out
    rec.add("gen.noise", noise)
    rec.add("gen.token", (scores + noise).argmax(-1) + first)  # (1, 1): the id drawn
    return {"text": text, "ratio": ratio, "grid": [h, w], "seed": seed, "guidance": guidance, "top_k": top_k,
            "temperature": temperature, "position": 0, "window": [first, first + scores.shape[-1]]}


# ---- transformers ----

def load_transformers(path, device, dtype):
    """An -hf directory -> (Emu3ForConditionalGeneration, Emu3Processor, transformers' version): the one place
    outside tests/ and bench/ that imports transformers."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--transformers needs transformers (pip install transformers), which is not "
                         "installed") from None
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--transformers {path}: no config.json (need a transformers Emu3 -hf directory)")
    if checkpoint.read_json(config).get("model_type") != "emu3":
        raise ValueError(f"--transformers {path}: not a transformers Emu3 -hf directory (config.json's model_type is "
                         f"not \"emu3\"); trace ours and converted checkpoints with --ckpt")
    processor = transformers.Emu3Processor.from_pretrained(path)
    model = transformers.Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, processor, transformers.__version__


@torch.no_grad()
def trace_transformers(model, processor, image, question, min_pixels=None, max_pixels=None, last=0):
    """The same names from transformers' Emu3: its processor (the -hf chat template, rendered to the original
    prompt as tests/test_chat.py does), one forward with pixel_values, then its VQ decode of the same codes."""
    ip = processor.image_processor
    ip.min_pixels, ip.max_pixels = min_pixels or ip.min_pixels, max_pixels or ip.max_pixels
    messages = [{"role": "system", "content": [{"type": "text", "text": prompts.SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + "."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(model.device)
    vq, text_model = model.model.vqmodel, model.model.text_model
    rec = Recorder(last)
    rec.add("vq.input", inputs["pixel_values"])
    hooked(rec, vq_encoder_stages(vq, hf=True))
    rec.hook(vq.quantize, "vq.codes", lambda codes: codes[:, 0])  # (B, 1, h, w) -> (B, h, w)

    def prompt_and_embeddings(module, args, kwargs):
        # the ids transformers really runs: its <image> placeholders filled with the visual ids of its codes (+ EOL)
        ids = inputs["input_ids"].clone()
        codes = rec.tensors["vq.codes"][0].to(ids.device)
        ids[ids == model.model.vocabulary_mapping.image_token_id] = \
            model.model.vocabulary_mapping.convert_img2bpe(codes).flatten().to(ids.dtype)
        rec.add("llm.tokens", ids)
        rec.add("llm.embed", kwargs["inputs_embeds"])  # text and image embeddings merged: what the layers see

    rec.handles.append(text_model.register_forward_pre_hook(prompt_and_embeddings, with_kwargs=True))
    for i, layer in enumerate(text_model.layers):
        rec.hook(layer.self_attn, f"llm.layers.{i}.attn", lambda out: out[0])
        rec.hook(layer.mlp, f"llm.layers.{i}.mlp")
        rec.hook(layer, f"llm.layers.{i}.out", lambda out: out[0] if isinstance(out, tuple) else out)
    rec.hook(text_model.norm, "llm.norm")
    rec.hook(model.lm_head, "llm.logits", lambda out: out.float())
    try:
        with sample.vq_precision():  # as ours: no TF32 in the VQ-VAE's convolutions (cuDNN's default on a GPU)
            model(**inputs)
    finally:
        rec.remove()
    hooked(rec, vq_decoder_stages(vq, hf=True))
    try:
        with sample.vq_precision():
            vq.decode(rec.tensors["vq.codes"].to(model.device))
    finally:
        rec.remove()
    return rec


# ---- files ----

def sha256(data):
    return hashlib.sha256(data).hexdigest()


def save_trace(tensors, out, **meta):
    """Write through a temporary file beside out and rename; metadata values are JSON, "order" lists the names in
    execution order (safetensors itself keeps no order)."""
    meta = {"format": FORMAT, "order": list(tensors)} | meta
    tmp = f"{out}.tmp"
    try:
        save_file(tensors, tmp, {k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_or_text(value):
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_trace(path):
    """-> (tensors in execution order, metadata). A file written by another tool may lack any metadata."""
    try:
        with safe_open(path, "pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except FileNotFoundError:
        raise FileNotFoundError(f"no trace file {path}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a safetensors file: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    meta = {k: json_or_text(v) for k, v in meta.items()}
    order = [n for n in meta.get("order", []) if n in tensors]
    return {n: tensors[n] for n in order + [n for n in names if n not in order]}, meta


# ---- compare ----

def part_dtype(meta, name, t):
    """The dtype an entry was computed in: the file's "dtypes" for its part (llm, vq), else the tensor's own."""
    d = (meta.get("dtypes") or {}).get(name.split(".")[0])
    return getattr(torch, d) if isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype) else t.dtype


def tolerance(dtype_a, dtype_b):
    """NMSE bound for two float entries computed in these dtypes: (k u)^2 of the coarser one (ROUNDOFF, K)."""
    coarse = max(dtype_a, dtype_b, key=lambda d: ROUNDOFF.get(d, ROUNDOFF[torch.float32]))
    coarse = coarse if coarse in K else torch.float32  # an integer tensor in a float part: judged as fp32
    return (K[coarse] * ROUNDOFF[coarse]) ** 2


def compare_entry(a, b, tol):
    """-> (ok, max |a - b|, NMSE or None for integers, a short reason when not ok)."""
    if a.shape != b.shape:
        return False, None, None, f"shape {fmt_shape(a)} vs {fmt_shape(b)}"
    if not (a.is_floating_point() or b.is_floating_point()):
        wrong = int((a != b).sum())
        diff = int((a.long() - b.long()).abs().max()) if a.numel() else 0
        return wrong == 0, diff, None, f"{wrong} of {a.numel()} differ"
    a, b = a.double(), b.double()
    finite = a.isfinite()
    if not torch.equal(finite, b.isfinite()) or not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):
        return False, math.inf, math.inf, "inf or nan in different places"  # e.g. masked scores (-inf)
    a, b = a[finite], b[finite]  # NMSE over the finite values
    # NMSE as llama.cpp's model-conversion checks define it: mean squared error over the variance of A
    mse, var = (a - b).pow(2).mean().item() if a.numel() else 0.0, a.var(correction=0).item() if a.numel() else 0.0
    nmse = mse / var if var else (0.0 if mse == 0 else math.inf)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return nmse <= tol, diff, nmse, f"NMSE {nmse:.2e} > {tol:.1e}"


def fmt_shape(t):
    return "x".join(map(str, t.shape)) or "scalar"


def describe(path, meta):
    dtypes = meta.get("dtypes") or {}
    what = ", ".join(f"{k} {v}" for k, v in dtypes.items())
    return f"{path}: {meta.get('implementation', 'unknown implementation')}" + (f", {what}" if what else "") + \
        (f", {meta['device']}" if "device" in meta else "")


def compare(path_a, path_b, out=print):
    """Print the table; -> the first diverging name, or None when every shared entry is within tolerance."""
    a, meta_a = load_trace(path_a)
    b, meta_b = load_trace(path_b)
    out(f"A {describe(path_a, meta_a)}")
    out(f"B {describe(path_b, meta_b)}")
    inputs_a, inputs_b = meta_a.get("inputs") or {}, meta_b.get("inputs") or {}
    for key in sorted(set(inputs_a) & set(inputs_b)):
        if inputs_a[key].get("sha256") != inputs_b[key].get("sha256"):
            out(f"note: the two traces were made from different {key}s (sha256 differs)")
    out("tolerance: integers equal; floats NMSE = mean (a-b)^2 / var a <= (k u)^2 at the coarser dtype: "
        + ", ".join(f"{str(d)[6:]} {tolerance(d, d):.1e}" for d in (torch.float32, torch.float16, torch.bfloat16)))
    # the shared names in execution order: A's, unless only B's file records one (a port's file may not)
    shared = [n for n in (b if "order" in meta_b and "order" not in meta_a else a) if n in a and n in b]
    out(f"{'name':<36} {'shape':<18} {'max|a-b|':>10} {'NMSE':>10} {'bound':>9}")
    first = None
    for name in shared:
        tol = tolerance(part_dtype(meta_a, name, a[name]), part_dtype(meta_b, name, b[name]))
        ok, diff, nmse, why = compare_entry(a[name], b[name], tol)
        exact = not (a[name].is_floating_point() or b[name].is_floating_point())
        shape = fmt_shape(a[name]) if a[name].shape == b[name].shape else "differ"
        out(f"{name:<36} {shape:<18} {'-' if diff is None else f'{diff:.3g}':>10} "
            f"{'-' if nmse is None else f'{nmse:.2e}':>10} {'exact' if exact else f'{tol:.1e}':>9}"
            + ("" if ok else f"  DIVERGES ({why})"))
        first = first or (None if ok else (name, why))
    for label, mine, other in (("A", a, b), ("B", b, a)):
        only = [n for n in mine if n not in other]
        if only:
            out(f"only in {label} ({len(only)}, not compared): {', '.join(only)}")
    if first:
        out(f"first divergence: {first[0]} ({first[1]})")
        return first[0]
    out(f"all {len(shared)} entries within tolerance")
    return None


# ---- command line ----

def check_out(out):
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out}: the trace is a .safetensors file")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {out}: no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write in {folder}")


def run_trace(ckpt, transformers_dir, image, prompt, out, device, dtype, min_pixels, max_pixels, last, gen_prompt,
              ratio, seed, threads):
    """`python parity.py trace`: every argument and input file is checked before a model loads."""
    sample.set_threads(threads)
    if (ckpt is None) == (transformers_dir is None):
        raise ValueError("give exactly one of --ckpt (this code) or --transformers (transformers' Emu3)")
    if not prompt.strip():
        raise ValueError("empty --prompt")
    if last < 0:
        raise ValueError(f"--last must be >= 0, got {last}")
    sample.check_pixels(min_pixels, max_pixels)
    if gen_prompt is not None:
        if transformers_dir is not None:
            raise ValueError("--gen-prompt traces this code's sampler: give it with --ckpt")
        if not gen_prompt.strip():
            raise ValueError("empty --gen-prompt")
        sample.check_seed(seed)
        prompts.generate_size(ratio, 720 * 720)  # the ratio's form, before loading (the checkpoint's area comes later)
    check_out(out)
    picture = sample.open_image(image)
    with open(image, "rb") as f:
        image_hash = sha256(f.read())
    device, torch_dtype = checkpoint.parse_device(device), checkpoint.parse_dtype(dtype)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    inputs = {"image": {"file": os.path.basename(image), "sha256": image_hash},
              "prompt": {"text": prompt, "sha256": sha256(prompt.encode())}}
    if ckpt is not None:
        checkpoint.checkpoint_dir(ckpt)
        m = sample.load(ckpt, device, torch_dtype)
        rec = trace_ours(m, picture, prompt, min_pixels, max_pixels, last)
        impl, dtypes = "emu3-from-scratch", {"vq": "float32", "llm": dtype}
        if gen_prompt is not None:
            inputs["gen"], dtypes["gen"] = trace_image_step(rec, m, gen_prompt, ratio, seed), dtype
        config = {"emu3": checkpoint.config_dict(m.cfg), "vqvae": checkpoint.config_dict(m.vq.cfg),
                  "image": checkpoint.config_dict(m.image)}
    else:
        checkpoint.checkpoint_dir(transformers_dir)
        model, processor, version = load_transformers(transformers_dir, device, torch_dtype)
        rec = trace_transformers(model, processor, picture, prompt, min_pixels, max_pixels, last)
        impl, dtypes = f"transformers {version}", {"vq": dtype, "llm": dtype}
        versions["transformers"] = version
        config = json.loads(model.config.to_json_string())
        config.pop("vocabulary_map", None)  # every token string -> id: large, and the tokenizer's business
        ip = processor.image_processor
        config["image"] = {"min_pixels": ip.min_pixels, "max_pixels": ip.max_pixels}
    save_trace(rec.tensors, out, implementation=impl, dtypes=dtypes, device=str(device), versions=versions,
               config=config, inputs=inputs, last=last)
    print(f"wrote {out}: {len(rec.tensors)} entries, {sum(t.nbytes for t in rec.tensors.values()) / 2**20:.1f} MiB")


def run_compare(a, b):
    """`python parity.py compare A B`: exit 1 at a divergence."""
    if compare(a, b) is not None:
        sys.exit(1)


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", formatter_class=sample.Help,
                       help="record the named intermediates of one chat prefill and one VQ round trip")
    p.add_argument("--ckpt", default=None, help="checkpoint dir (ours or a released one): trace this code")
    p.add_argument("--transformers", dest="transformers_dir", default=None,
                   help="a transformers Emu3 -hf dir: trace transformers' Emu3 instead")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--prompt", required=True, help="the question (the original chat template is put around it)")
    p.add_argument("--out", required=True, help="the trace, a .safetensors file")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=list(checkpoint.DTYPES),
                   help="decoder dtype (this code's VQ-VAE stays fp32; transformers' follows --dtype)")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="input image area at least (default: the checkpoint's or processor's)")
    p.add_argument("--max-pixels", type=int, default=None, help="... and at most (a small image makes a small trace)")
    p.add_argument("--last", type=int, default=0,
                   help="keep the decoder's per-position tensors at the last N positions only (0: all)")
    p.add_argument("--gen-prompt", default=None,
                   help="also trace the first step of generating this image (--ckpt only): scores, noise, token")
    p.add_argument("--ratio", default="1:1", help="the generated image's aspect ratio W:H")
    p.add_argument("--seed", type=int, default=0, help="the keyed noise's seed")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.set_defaults(run=run_trace)
    p = sub.add_parser("compare", formatter_class=sample.Help, help="compare two traces name by name")
    p.add_argument("a", help="trace A (the reference: its order is the table's order)")
    p.add_argument("b", help="trace B")
    p.set_defaults(run=run_compare)
    return ap


def main(argv=None):
    args = vars(parser().parse_args(argv))
    run = args.pop("run")
    args.pop("command")
    try:
        run(**args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

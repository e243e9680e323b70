"""Peak memory of `python convert.py` on a synthetic sharded original-format checkpoint.

    python bench/mem_convert.py [--workdir /tmp/emu3_mem_convert] [--dtype bfloat16]

Writes an original BAAI-format decoder (fp32, 4 shards of ~0.5-0.9 GB, random weights, a 256-byte emu3.tiktoken),
converts it with the real CLI in a subprocess, and prints that process's peak RSS (VmHWM) beside the largest input
shard: streaming shard by shard should keep the peak near one shard (plus Python + torch), not the whole checkpoint.
A bare `import torch, convert` subprocess gives the baseline.
"""
import argparse
import base64
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402

# ~2.6 GB fp32: embed / lm_head 512 MB each, 8 layers of ~180 MB; the release's token layout after 256 byte tokens
N_VISUAL = 65536 - 256 - 211
_IDS = dict(pad_id=256, eol_id=256 + 203, eof_id=256 + 204, bos_id=256 + 206, eos_id=256 + 207, wrapper_id=256 + 208,
            boi_id=256 + 209, eoi_id=256 + 210, visual_offset=256 + 211)
CFG = Emu3Config(vocab_size=65536, dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=5632, max_seq_len=9216,
                 codebook_size=N_VISUAL, **_IDS)
GB = 1024 ** 3


def write_original(path):
    """Original-format checkpoint: config.json, 4 fp32 shards + index, emu3.tiktoken. Shard by shard (low memory)."""
    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Emu3(CFG).state_dict().items()}
    names = {k: convert.LLM_TABLE[k] if not k.startswith("layers.")
             else convert.LLM_TABLE["layers.{i}." + k.split(".", 2)[2]].format(i=k.split(".")[1]) for k in shapes}
    layer = lambda i: [k for k in shapes if k.startswith(f"layers.{i}.")]
    groups = [["embed.weight"] + layer(0) + layer(1), sum((layer(i) for i in range(2, 6)), []),
              sum((layer(i) for i in range(6, 8)), []) + ["norm.weight"], ["lm_head.weight"]]
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for n, keys in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file({names[k]: torch.randn(shapes[k], generator=g) * 0.02 for k in keys}, os.path.join(path, file))
        weight_map |= {names[k]: file for k in keys}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    conf = dict(vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.ffn_dim,
                num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
                max_position_embeddings=9216, rms_norm_eps=1e-5, rope_theta=1e6, image_area=518400,
                pad_token_id=CFG.pad_id, bos_token_id=CFG.bos_id, eos_token_id=CFG.eos_id, img_token_id=CFG.wrapper_id,
                boi_token_id=CFG.boi_id, eoi_token_id=CFG.eoi_id, eol_token_id=CFG.eol_id, eof_token_id=CFG.eof_id,
                model_type="Emu3", architectures=["Emu3ForCausalLM"], torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    with open(os.path.join(path, "emu3.tiktoken"), "w") as f:
        f.writelines(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]


def peak_rss(cmd):
    """Run cmd in a subprocess that reports its own VmHWM (peak RSS) at exit; returns bytes."""
    code = ("import atexit, re, runpy, sys\n"
            "def hwm():\n"
            "    kb = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
            "    print(f'VmHWM_KB {kb}', file=sys.stderr)\n"
            "atexit.register(hwm)\n"
            f"sys.argv = {cmd!r}\n"
            "sys.path.insert(0, '.')\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return int(r.stderr.split("VmHWM_KB ")[-1].split()[0]) * 1024


def main(workdir, dtype):
    src, out = os.path.join(workdir, "orig"), os.path.join(workdir, "ours")
    shutil.rmtree(workdir, ignore_errors=True)
    files = write_original(src)
    sizes = [os.path.getsize(f) for f in files]
    base = os.path.join(workdir, "baseline.py")
    with open(base, "w") as f:
        f.write("import torch, convert, emu3\n")
    baseline = peak_rss([base])
    peak = peak_rss(["convert.py", src, out, "--dtype", dtype])
    print(f"checkpoint: {len(files)} fp32 shards, total {sum(sizes) / GB:.2f} GB, largest {max(sizes) / GB:.2f} GB")
    print(f"baseline (python + import torch, convert): peak RSS {baseline / GB:.2f} GB")
    print(f"convert.py --dtype {dtype}: peak RSS {peak / GB:.2f} GB = baseline + {(peak - baseline) / GB:.2f} GB "
          f"= {(peak - baseline) / max(sizes):.2f} x largest shard, {(peak - baseline) / sum(sizes):.2f} x checkpoint")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/emu3_mem_convert", help="scratch dir (deleted afterwards)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="conversion dtype")
    main(**vars(parser.parse_args()))

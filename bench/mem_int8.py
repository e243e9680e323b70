"""Memory of int8 weights and of the tensor-parallel split: the 8.5B shape counted on the meta device, and a mid-size
checkpoint converted and loaded for real.

    python bench/mem_int8.py [--workdir /tmp/emu3_mem_int8]

1. The 8.5B shape (Emu3Config defaults), no weights allocated: the decoder's bytes per process for one GPU, and for
   2 and 4 processes of --tp (tp.shard on the meta model), bf16 and int8 (the scales in bf16, as they run), beside
   the KV cache of one 720x720 image (CFG: 2 rows) and of a 16K-token chat, and the fp32 VQ-VAE. Activations (a few
   hundred MB at these shapes) and the CUDA context are not counted.
2. A mid-size original-format checkpoint (bench/mem_convert.py's: dim 2048 x 8 layers, vocabulary 65536, 2.6 GB
   fp32, 4 shards) converted by the real CLI to bf16 and to --int8: each conversion's peak RSS and the decoder files'
   sizes; then, each in its own subprocess that reads every tensor afterwards (so memory-mapped pages count), the
   peak RSS of loading the bf16 directory, the int8 directory, and the bf16 directory with int8=True (quantized
   tensor by tensor as it loads).
"""
import argparse
import math
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from emu3 import Emu3Config  # noqa: E402
from mem_convert import peak_rss as peak_rss_of_script, write_original  # noqa: E402
from vqvae import VQVAE, VQConfig  # noqa: E402

GB = 1e9
GIB = 2**30


def decoder_bytes(cfg, int8, world=1):
    """Bytes of process 0's decoder at cfg (meta device): bf16 matrices, or int8 + bf16 scales; norms in bf16."""
    with torch.device("meta"):
        model = checkpoint.emu3_structure(int8, None if world == 1 else (0, world))(cfg)
    return sum(t.numel() * (1 if t.dtype == torch.int8 else 2) for t in model.state_dict().values())


def kv_bytes(cfg, rows, tokens, world=1):
    """A bf16 KV cache of `rows` rows and `tokens` columns, split over `world` processes (kv heads)."""
    return 2 * cfg.n_layers * rows * (cfg.n_kv_heads // world) * cfg.head_dim * tokens * 2


def table():
    cfg = Emu3Config()
    with torch.device("meta"):
        vq = sum(p.numel() * 4 for p in VQVAE(VQConfig()).state_dict().values())
    n = sum(math.prod(s) for s in checkpoint.shapes_of(checkpoint.emu3_structure(), cfg).values())
    image_kv = kv_bytes(cfg, 2, 256 * math.ceil((64 + 90 * 91 + 3) / 256))  # CFG's 2 rows, 90x90 grid + prompt
    chat_kv = kv_bytes(cfg, 1, 16384)
    print(f"1. the 8.5B shape: {n / 1e9:.2f} B decoder parameters ({2 * (cfg.vocab_size * cfg.dim) / 1e9:.2f} B in "
          f"embedding + lm_head); VQ-VAE {vq / GB:.2f} GB fp32; KV cache bf16: 720x720 image (2 rows x 8448) "
          f"{image_kv / GB:.2f} GB, 16K-token chat {chat_kv / GB:.2f} GB (divided by N under --tp)")
    print(f"   {'setup':28s} {'decoder GB':>10s} {'+ image KV + VQ':>16s} {'+ 16K chat KV + VQ':>19s}")
    for name, int8, world in [("1 GPU, bf16", False, 1), ("1 GPU, --int8", True, 1),
                              ("--tp 2 (each), bf16", False, 2), ("--tp 2 (each), --int8", True, 2),
                              ("--tp 4 (each), bf16", False, 4), ("--tp 4 (each), --int8", True, 4)]:
        d = decoder_bytes(cfg, int8, world)
        print(f"   {name:28s} {d / GB:10.2f} {(d + image_kv / world + vq) / GB:16.2f} "
              f"{(d + chat_kv / world + vq) / GB:19.2f}", flush=True)


LOAD = ("import re, sys, torch, checkpoint\n"
        "m, _ = checkpoint.load_emu3({path!r}, 'cpu', torch.bfloat16, int8={int8})\n"
        "[t.max() for t in m.state_dict().values()]\n"  # every page of every tensor resident
        "print('VmHWM_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)\n")


def peak_rss(code):
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: a load failed:\n{r.stderr[-2000:]}")
    return int(r.stderr.split("VmHWM_KB ")[-1].split()[0]) * 1024


def main(workdir):
    table()
    shutil.rmtree(workdir, ignore_errors=True)
    src, bf16, int8 = (os.path.join(workdir, d) for d in ("orig", "bf16", "int8"))
    files = write_original(src)
    base_script = os.path.join(workdir, "baseline.py")
    with open(base_script, "w") as f:
        f.write("import torch, checkpoint, convert\n")
    base = peak_rss_of_script([base_script])
    conv_bf16 = peak_rss_of_script(["convert.py", src, bf16, "--dtype", "bfloat16"])
    conv_int8 = peak_rss_of_script(["convert.py", src, int8, "--dtype", "bfloat16", "--int8"])
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("model-"))
    print(f"2. mid-size checkpoint: {sum(map(os.path.getsize, files)) / GB:.2f} GB fp32 in {len(files)} shards; "
          f"baseline (python + import torch, checkpoint, convert) peak RSS {base / GIB:.2f} GiB")
    print(f"   convert.py --dtype bfloat16:        peak RSS baseline + {(conv_bf16 - base) / GIB:.2f} GiB, "
          f"decoder files {size(bf16) / GB:.3f} GB")
    print(f"   convert.py --dtype bfloat16 --int8: peak RSS baseline + {(conv_int8 - base) / GIB:.2f} GiB, "
          f"decoder files {size(int8) / GB:.3f} GB = {size(int8) / size(bf16):.3f} x bf16")
    rows = [("load the bf16 directory (bf16)", bf16, False), ("load the int8 directory", int8, False),
            ("load the bf16 directory with int8=True", bf16, True)]
    for name, path, q in rows:
        peak = peak_rss(LOAD.format(path=path, int8=q))
        print(f"   {name:40s} peak RSS baseline + {(peak - base) / GIB:.2f} GiB", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/emu3_mem_int8", help="scratch dir (deleted afterwards)")
    main(**vars(parser.parse_args()))

"""Peak memory of loading the decoder: checkpoint.load_emu3 (ours) and convert.load_emu3 (a transformers dir, converted
in memory) vs transformers' from_pretrained, same weights, same run.

    python bench/mem_load.py [--workdir /tmp/emu3_mem_load]

Writes one synthetic decoder twice (random weights): in our format (bf16, 2 shards) and as a transformers
Emu3ForCausalLM checkpoint (fp32, 2 shards + index, config.json of model_type emu3_text_model). Each load runs in
its own subprocess, which then reads every weight (so memory-mapped pages count) and reports its peak RSS
(VmHWM); a bare `import torch, checkpoint, convert` subprocess gives the baseline. Loading should cost about the weights' size
once (meta device, memory-mapped safetensors, assign=True), not twice (random init, then copy).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import convert  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

# ~2.3 GB fp32 / 1.2 GB bf16; the token layout of the release over 256 byte tokens (visual tokens fill the rest)
N_VISUAL = 65536 - 256 - 211
TOKENIZER = build_tokenizer({bytes([b]): b for b in range(256)}, N_VISUAL)
CFG = Emu3Config(vocab_size=65536, dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=5632, max_seq_len=9216,
                 codebook_size=N_VISUAL, **{k: TOKENIZER.token_to_id(s) for k, s in dict(
                     pad_id="<|endoftext|>", eol_id="<|extra_200|>", eof_id="<|extra_201|>", bos_id="<|extra_203|>",
                     eos_id="<|extra_204|>", wrapper_id="<|image token|>", boi_id="<|image start|>",
                     eoi_id="<|image end|>", visual_offset="<|visual token 000000|>").items()})
GB = 1024 ** 3

CHILD = {
    "baseline": "import torch, checkpoint, convert\nm = torch.nn.Linear(1, 1)\n",
    "ours": "import torch, checkpoint\nm, _ = checkpoint.load_emu3({path!r}, 'cpu', torch.bfloat16)\n",
    "ours_from_hf": "import torch, convert\nm, _ = convert.load_emu3({path!r}, 'cpu', torch.bfloat16)\n",
    "hf": "import torch\nfrom transformers.models.emu3 import Emu3ForCausalLM\n"
          "m = Emu3ForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16)\n",
}


def write_checkpoints(workdir):
    """ours (bf16) and transformers Emu3ForCausalLM (fp32) directories holding the same random weights."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Emu3(CFG).state_dict().items()}
    to_hf = lambda k: (convert.LLM_TABLE[k] if not k.startswith("layers.")
                       else convert.LLM_TABLE["layers.{i}." + k.split(".", 2)[2]].format(i=k.split(".")[1]))
    keys = list(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    ours, hf = os.path.join(workdir, "ours"), os.path.join(workdir, "hf")
    os.makedirs(ours), os.makedirs(hf)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for n, part in enumerate(halves, 1):
        sd = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in part}
        save_file({k: v.bfloat16() for k, v in sd.items()}, os.path.join(ours, f"model-{n:05d}-of-00002.safetensors"))
        save_file({to_hf(k): v for k, v in sd.items()}, os.path.join(hf, f"model-{n:05d}-of-00002.safetensors"),
                  {"format": "pt"})
        weight_map |= {to_hf(k): f"model-{n:05d}-of-00002.safetensors" for k in part}
        del sd
    with open(os.path.join(ours, "config.json"), "w") as f:
        json.dump({"emu3": CFG.__dict__}, f)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"format": "pt"}, "weight_map": weight_map}, f)
    from transformers.models.emu3 import Emu3TextConfig
    Emu3TextConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.ffn_dim,
                   num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
                   max_position_embeddings=CFG.max_seq_len, pad_token_id=CFG.pad_id, bos_token_id=CFG.bos_id,
                   eos_token_id=CFG.eos_id, architectures=["Emu3ForCausalLM"]).save_pretrained(hf)
    TOKENIZER.save(os.path.join(hf, "tokenizer.json"))  # a bare text model's image-token ids come from its tokenizer
    return ours, hf


def peak_rss(code):
    """Run code in a subprocess that prints its VmHWM (peak RSS) at the end; returns bytes."""
    code += ("[p.max() for p in m.parameters()]\n"  # read every weight: memory-mapped pages become resident
             "import re, sys\n"
             "print('VmHWM_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: load failed:\n{r.stderr[-2000:]}")
    return int(r.stderr.split("VmHWM_KB ")[-1].split()[0]) * 1024


def main(workdir):
    shutil.rmtree(workdir, ignore_errors=True)
    ours, hf = write_checkpoints(workdir)
    n_params = sum(math.prod(s) for s in checkpoint.shapes_of(Emu3, CFG).values())
    bf16 = 2 * n_params
    base = peak_rss(CHILD["baseline"])
    rows = [("ours: checkpoint.load_emu3(our bf16 dir, bf16)", peak_rss(CHILD["ours"].format(path=ours))),
            ("ours: convert.load_emu3(transformers fp32 dir, bf16)", peak_rss(CHILD["ours_from_hf"].format(path=hf))),
            ("transformers: from_pretrained(fp32 dir, dtype=bf16)", peak_rss(CHILD["hf"].format(path=hf)))]
    print(f"weights: {n_params / 1e9:.2f} B params = {bf16 / GB:.2f} GB in bf16 ({2 * bf16 / GB:.2f} GB fp32 on disk)")
    print(f"baseline (python + import torch, checkpoint, convert): peak RSS {base / GB:.2f} GB")
    for name, peak in rows:
        print(f"{name}: peak RSS {peak / GB:.2f} GB = baseline + {(peak - base) / GB:.2f} GB "
              f"= {(peak - base) / bf16:.2f} x bf16 weights")
    print(f"ratio ours / transformers (same fp32 dir, above baseline): {(rows[1][1] - base) / (rows[2][1] - base):.2f}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/emu3_mem_load", help="scratch dir (deleted afterwards)")
    main(**vars(parser.parse_args()))

"""What one whole image costs the compiler: graphs compiled, recompiles, and anything that falls back to eager.

    python bench/compile_counts.py                 # a dim-64 model at a 90x90 grid (8193 tokens), CPU, inductor
    python bench/compile_counts.py --grid 45x45 --parallel 16

--compile's step (generate.image_step: the model, CFG, the grid mask, top-k, the keyed sample) is compiled once per
process and then replayed; on a GPU each distinct cache length (generate.cache_len: ~33 for a 720x720 image) records
a CUDA graph, which costs milliseconds. What must not grow with the image is the number of inductor compiles
(tens of seconds each at 8.5B on a GPU), and nothing may hit dynamo's recompile limit, where it silently falls back
to running the step eagerly. The counts come from torch._dynamo's own counters and its recompile log.
"""
import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
from emu3 import Emu3, Emu3Config  # noqa: E402


class Recompiles(logging.Handler):
    """Collects dynamo's recompile reasons (torch._logging: recompiles) and its recompile-limit warnings."""

    def __init__(self):
        super().__init__()
        self.reasons, self.limit_hits = [], []

    def emit(self, record):
        text = record.getMessage()
        if "cache_size_limit" in text or "recompile_limit" in text:
            self.limit_hits.append(text.splitlines()[0])
        elif "Recompiling function" in text:
            self.reasons.append(" ".join(text.split()))


def count(model, grids, parallel, seed=0):
    """Generate one batch with --compile from a fresh dynamo state -> (counts dict, seconds)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    handler = Recompiles()
    logging.getLogger("torch._dynamo").addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    cfg = model.cfg
    cond = [[cfg.bos_id] + list(range(1000, 1020)) + [cfg.boi_id, 20, cfg.wrapper_id] for _ in grids]
    neg = [[cfg.bos_id] + list(range(2000, 2040)) + [cfg.boi_id, 20, cfg.wrapper_id] for _ in grids]
    t = time.perf_counter()
    try:
        generate.generate_image_tokens(model, cond, neg, grids, seed=seed, compile_step=True, parallel=parallel)
    finally:
        torch._logging.set_logs()
        logging.getLogger("torch._dynamo").removeHandler(handler)
    seconds = time.perf_counter() - t
    c = torch._dynamo.utils.counters
    counts = dict(graphs=c["stats"]["unique_graphs"], recompiles=len(handler.reasons), limit_hits=len(handler.limit_hits), reasons=handler.reasons,
                  limit=handler.limit_hits)
    return counts, seconds


def main(grid, dim, parallel, threads, bucket):
    torch.set_num_threads(threads)
    if bucket:
        generate.BUCKET = bucket
    h, w = map(int, grid.split("x"))
    cfg = Emu3Config(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=2 * dim)
    torch.manual_seed(0)
    model = Emu3(cfg).eval()
    n_new = h * (w + 1) + 3
    print(f"torch {torch.__version__}; dim {dim} x 2 layers, full vocabulary; grid {grid} = {n_new} tokens; "
          f"--parallel {parallel}; bucket {generate.BUCKET} -> cache lengths "
          f"{len({generate.cache_len(n, 10**9) for n in range(60, 60 + n_new)})}", flush=True)
    counts, seconds = count(model, [(h, w)], parallel)
    print(f"graphs compiled {counts['graphs']}, recompiles {counts['recompiles']}, "
          f"recompile-limit fallbacks {counts['limit_hits']}; {seconds:.0f}s")
    for r in counts["reasons"][:5]:
        print("  recompile:", r[:300])
    for r in counts["limit"][:3]:
        print("  LIMIT:", r[:300])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="90x90", help="token grid HxW")
    ap.add_argument("--dim", type=int, default=64, help="model width (2 layers)")
    ap.add_argument("--parallel", type=int, default=0, help="Jacobi window (0: sequential)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--bucket", type=int, default=None, help="cache-length bucket (default: generate.BUCKET)")
    main(**vars(ap.parse_args()))

"""Parallel (Jacobi) image decoding on the shipped toy: forward passes and CPU time against the sequential path.

    python bench/bench_parallel.py --threads 1                 # windows 4, 8, 16, 32; 36 held-out captions x 3 seeds
    python bench/bench_parallel.py --guess noise --windows 16  # first guesses from the noise alone instead

A trained model (unlike random weights) has peaked next-token distributions, so this is where acceptance means
something. Each image is generated alone (a batch accepts the shortest run of its rows) with the official recipe
(guidance 3, top-k 2048), in fp32, sequentially and with --parallel N; prints forward passes per image, tokens
accepted per pass, wall time, the ratios, and whether every image is identical.
--guess picks the first guesses for positions no pass has predicted yet: "above" (generate.first_guess: the token
one row up where there is one, the noise elsewhere) or "noise" (the noise alone under the grid rule everywhere).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noise_guess(seq, positions, noise, h, w):
    """The noise alone under the grid rule, everywhere (what generate.first_guess falls back to)."""
    return noise


def main(ckpt, windows, seeds, guess, threads):
    if threads:
        torch.set_num_threads(threads)
    if guess == "noise":
        generate.first_guess = noise_guess
    m = sample.load(ckpt, "cpu", "float32")
    captions = [train.caption(s) for s in train.HELD_OUT]
    print(f"{ckpt}: {len(captions)} held-out captions x seeds {seeds}, one image at a time, fp32, "
          f"{torch.get_num_threads()} threads, first guesses: {guess}", flush=True)
    rows, reference = [], {}
    for window in [0] + windows:
        passes, seconds, same = 0, 0.0, True
        for seed in seeds:
            for i, text in enumerate(captions):
                t = time.perf_counter()
                [image], p = sample.images(m, [text], seed=seed, parallel=window, return_passes=True)
                seconds += time.perf_counter() - t
                passes += p
                key = (seed, i)
                if window == 0:
                    reference[key] = image.tobytes()
                else:
                    same &= image.tobytes() == reference[key]
        n = len(seeds) * len(captions)
        rows.append((window, passes / n, seconds / n, same))
    n_new = 45  # the toy's 6x6 grid: 6 * 7 + 3 tokens
    base_passes, base_time = rows[0][1], rows[0][2]
    print(f"{'':14s} {'passes':>7s} {'tokens/pass':>11s} {'ms/image':>9s} {'fewer passes':>13s} {'speed':>6s}  same")
    for window, passes, seconds, same in rows:
        name = "sequential" if window == 0 else f"--parallel {window}"
        per_pass = n_new / passes  # every pass, the first included, picks at least one token
        print(f"{name:14s} {passes:7.1f} {per_pass:11.2f} {seconds * 1e3:9.1f} {base_passes / passes:12.2f}x "
              f"{base_time / seconds:5.2f}x  {same}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "toy", "ckpt"), help="the toy checkpoint")
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32], help="--parallel window sizes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    ap.add_argument("--guess", choices=["above", "noise"], default="above", help="first guesses (see above)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    main(**vars(ap.parse_args()))

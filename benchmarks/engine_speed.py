"""SLiM step time against full backprop, side by side in one process (issue 2; paper section 4).

Model d = 256, 3 layers, d_ff = 1024, 4 heads, sqr features, batch 1, L = 8192 (pass other values as flags).
Every round runs each method once, interleaved, so drifts of a shared machine hit all alike; the table shows
the median of the rounds after one warm-up round. A step is zero_grad + the SLiM step (no optimizer).

    python benchmarks/engine_speed.py [--seq-len 8192] [--chunks 1024 256 64 16] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from _common import PAPER_CPU, report
from slimtune.model import PerformerLM
from slimtune.slim import slim_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 16])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    L = args.seq_len
    torch.manual_seed(0)
    model = PerformerLM(PAPER_CPU)
    windows = torch.randint(0, 256, (1, L + 1))
    methods = [L, *args.chunks]
    times = {c: [] for c in methods}
    for r in range(args.rounds + 1):
        for c in methods:
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            slim_step(model, windows, c)
            if r:  # round 0 is the warm-up
                times[c].append(time.perf_counter() - started)
    full = statistics.median(times[L])
    rows = []
    for c in methods:
        med = statistics.median(times[c])
        rows.append(["full backprop" if c == L else f"SLiM C={c}", f"{med:.3f}", f"{med / full:.2f}x",
                     f"{min(times[c]):.3f}", f"{max(times[c]):.3f}"])
    report("engine_speed", ["method", "median s/step", "vs full", "min", "max"], rows,
           {"seq_len": L, "config": PAPER_CPU.to_dict(), "times": {str(k): v for k, v in times.items()}})


if __name__ == "__main__":
    main()

"""The heap policies and the baseline (issue 15): a training step (SLiM or full backprop, then an adam update) with
the "tight" heap (mmap threshold 4 MB: what `plan` and a budget-bound run use), the "fast" heap (32 MB: what a run
uses when its peak fits that way) and glibc's defaults (plain PyTorch, what a user's own script gets: the
baseline), each in a fresh process, quiet machine, the slimtune thread choice. Rounds alternate the settings; the
table shows the median of the rounds' medians, min-max, and the ratio to plain-PyTorch full backprop.

    python benchmarks/allocator.py [--seq-len 8192] [--chunks 1024 256 64 16] [--steps 2] [--rounds 2]
"""

import argparse
import statistics

from _common import report
from contention import measure

SETTINGS = {"tight heap": "tight", "fast heap": "fast", "glibc defaults": "default"}  # BENCH_HEAP


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 16])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    methods = [("full backprop", args.seq_len)] + [(f"SLiM C={c}", c) for c in args.chunks]
    medians = {(m, s): [] for m, _ in methods for s in SETTINGS}
    for _ in range(args.rounds):
        for label, chunk in methods:
            for name, flag in SETTINGS.items():
                times = measure("auto", chunk, args.seq_len, args.steps, 300.0, flag)["times"]
                medians[(label, name)].append(statistics.median(times))
                print(label, name, times, flush=True)
    baseline = statistics.median(medians[("full backprop", "glibc defaults")])
    rows = []
    for label, _ in methods:
        row = [label]
        for name in SETTINGS:
            m = medians[(label, name)]
            row += [
                f"{statistics.median(m):.3f} ({min(m):.3f}-{max(m):.3f})",
                f"{statistics.median(m) / baseline:.2f}x",
            ]
        rows.append(row)
    report(
        "allocator",
        ["method"] + [h for name in SETTINGS for h in (f"{name} s", "vs plain full")],
        rows,
        {"seq_len": args.seq_len, "medians": {f"{k[0]} | {k[1]}": v for k, v in medians.items()}},
    )


if __name__ == "__main__":
    main()

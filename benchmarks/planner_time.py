"""The plan's time column against measured step times (issue 15): `slimtune plan --json` four times (fresh
processes) for the d 256, 3-layer model at L = 8192, then each C's training step measured in a fresh process
(contention.py's step: SLiM or full backprop and an adam update, the median of --steps after a warm-up).
Goal: predicted relative time within 25 % of the measured one for C in {L, 1024, 256, 64, 16}, and the four
plans agreeing within 10 %.

    python benchmarks/planner_time.py [--seq-len 8192] [--plans 4] [--steps 3] [--mem-budget 20GB]
"""

import argparse
import statistics

from _common import PAPER_CPU, make_checkpoint, report, run_slimtune
from contention import measure


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 16])
    parser.add_argument("--plans", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mem-budget", default="20GB")
    args = parser.parse_args()
    L = args.seq_len
    ckpt = make_checkpoint(PAPER_CPU, "paper-cpu")
    sizes = [L, *args.chunks]
    predicted, heaps, plan_threads = {c: [] for c in sizes}, {}, []
    for _ in range(args.plans):
        plan = run_slimtune(
            "plan", "--checkpoint", ckpt, "--seq-len", L, "--mem-budget", args.mem_budget, "--no-compare"
        )
        by_size = {c["chunk_size"]: c for c in plan["candidates"]}
        plan_threads.append(plan["threads"])  # a plan timed on another thread count predicts other ratios
        for c in sizes:
            predicted[c].append(by_size[c]["relative_time"])
            heaps[c] = by_size[c]["heap"]  # the heap policy `fit` would run this C with
    # Each C measured as `fit` runs it (its heap policy), in a fresh process; the unit is full backprop with the
    # "fast" heap, what the plan's column is relative to.
    seconds = {c: statistics.median(measure("auto", c, L, args.steps, 600, heaps[c])["times"]) for c in sizes}
    unit = (
        seconds[L] if heaps[L] == "fast" else statistics.median(measure("auto", L, L, args.steps, 600, "fast")["times"])
    )
    rows, worst_error, worst_spread = [], 0.0, 0.0
    for c in sizes:
        measured = seconds[c] / unit
        p = statistics.median(predicted[c])
        error = p / measured - 1
        spread = max(predicted[c]) / min(predicted[c]) - 1
        worst_error, worst_spread = max(worst_error, abs(error)), max(worst_spread, spread)
        rows.append(
            [
                f"{c}" + (" (full)" if c == L else "") + (f" [{heaps[c]}]" if heaps[c] == "tight" else ""),
                f"{p:.2f}x",
                f"{min(predicted[c]):.2f}-{max(predicted[c]):.2f}",
                f"{seconds[c]:.3f}",
                f"{measured:.2f}x",
                f"{error:+.0%}",
            ]
        )
    report(
        "planner_time",
        ["C", "predicted (median)", f"{args.plans} plans min-max", "measured s", "measured", "error"],
        rows,
        {
            "seq_len": L,
            "predicted": {str(c): v for c, v in predicted.items()},
            "seconds": seconds,
            "heaps": heaps,
            "plan_threads": plan_threads,
            "mem_budget": args.mem_budget,
            "worst_error": worst_error,
            "worst_spread": worst_spread,
        },
    )
    print(f"worst error {worst_error:.0%} (goal 25 %), worst spread between plans {worst_spread:.0%} (goal 10 %)")


if __name__ == "__main__":
    main()

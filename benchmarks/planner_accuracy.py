"""The planner's predicted peak against the measured peak RSS of `slimtune fit` (issue 4).

Model d = 256, 3 layers, d_ff = 1024, 4 heads, adam, L = 16384, budget 900MB, one step per run, each in a fresh
process. Checks that `plan` and `fit --chunk-size auto` choose the same C, that the measured peak stays within the
budget, that the next larger candidate would not fit, and how close the prediction is for C in 64..4096.

    python benchmarks/planner_accuracy.py
"""

import json

from _common import PAPER_CPU, make_checkpoint, report, run_fit, run_slimtune

L, BUDGET = 16384, "900MB"


def main():
    ckpt = make_checkpoint(PAPER_CPU, "paper-cpu")
    plan = run_slimtune(
        "plan", "--checkpoint", ckpt, "--seq-len", L, "--mem-budget", BUDGET, "--optimizer", "adam", "--no-compare"
    )
    predicted = {c["chunk_size"]: c["predicted_peak_bytes"] for c in plan["candidates"]}
    rows = []
    measured = {}
    for C in (64, 256, 1024, 4096):
        result = run_fit(ckpt, "--seq-len", L, "--chunk-size", C, "--steps", 1, "--optimizer", "adam")
        measured[C] = result["peak_memory_bytes"]
        rows.append(
            [C, f"{predicted[C] / 1e6:.1f}", f"{measured[C] / 1e6:.1f}", f"{predicted[C] / measured[C] - 1:+.1%}"]
        )
    auto = run_fit(ckpt, "--seq-len", L, "--mem-budget", BUDGET, "--steps", 1, "--optimizer", "adam")
    chosen = auto["chunk_size"]
    rows.append(
        [
            f"auto: {chosen}",
            f"{auto['plan']['predicted_peak_bytes'] / 1e6:.1f}",
            f"{auto['peak_memory_bytes'] / 1e6:.1f}",
            f"{auto['plan']['predicted_peak_bytes'] / auto['peak_memory_bytes'] - 1:+.1%}",
        ]
    )
    bigger = [c for c in sorted(predicted) if c > chosen]
    doubled = min(2 * chosen, L)
    over = run_fit(ckpt, "--seq-len", L, "--chunk-size", doubled, "--steps", 1, "--optimizer", "adam")
    rows.append(
        [
            f"2C: {doubled}",
            f"{predicted.get(doubled, float('nan')) / 1e6:.1f}",
            f"{over['peak_memory_bytes'] / 1e6:.1f}",
            "",
        ]
    )
    summary = {
        "budget_bytes": plan["budget_bytes"],
        "plan_chunk_size": plan["chunk_size"],
        "fit_chunk_size": chosen,
        "fit_measured_peak": auto["peak_memory_bytes"],
        "within_budget": auto["peak_memory_bytes"] <= plan["budget_bytes"],
        "next_candidate": bigger[0] if bigger else None,
        "doubled_chunk_measured_peak": over["peak_memory_bytes"],
        "doubled_exceeds_budget": over["peak_memory_bytes"] > plan["budget_bytes"],
    }
    report("planner_accuracy", ["C", "predicted MB", "measured MB", "prediction error"], rows, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

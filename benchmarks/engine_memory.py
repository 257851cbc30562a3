"""Peak memory (RSS) of a `slimtune fit` step, measured in fresh processes (issue 2).

Model d = 256, 3 layers, d_ff = 1024, 4 heads, sqr, batch 1, plain SGD, one step on tinyshakespeare.
SLiM at C = 128 for L = 4096 and L = 32768, and full backprop at L = 32768.

    python benchmarks/engine_memory.py
"""

from _common import PAPER_CPU, make_checkpoint, report, run_fit


def main():
    ckpt = make_checkpoint(PAPER_CPU, "paper-cpu")
    runs = [(4096, 128), (32768, 128), (32768, 32768)]
    peaks = {}
    rows = []
    for L, C in runs:
        result = run_fit(ckpt, "--seq-len", L, "--chunk-size", C, "--steps", 1, "--optimizer", "sgd")
        peaks[(L, C)] = result["peak_memory_bytes"]
        rows.append([L, "full backprop" if C >= L else C, f"{peaks[(L, C)] / 1e6:.1f}", f"{result['seconds']:.2f}"])
    growth = peaks[(32768, 128)] / peaks[(4096, 128)]
    share = peaks[(32768, 128)] / peaks[(32768, 32768)]
    report(
        "engine_memory",
        ["L", "C", "peak RSS MB", "step s"],
        rows,
        {"slim_32768_over_4096": growth, "slim_over_full_at_32768": share, "config": PAPER_CPU.to_dict()},
    )
    print(f"SLiM C=128: peak at L=32768 / at L=4096 = {growth:.3f}; SLiM / full backprop at L=32768 = {share:.1%}")


if __name__ == "__main__":
    main()

"""Threads and a busy neighbour (issue 15): a training step (SLiM or full backprop, then an adam update) on the
2-core CPU, quiet and next to one process spinning `while True: pass`, with 2 CPU threads (what the CLI used
before) and with the thread count slimtune now chooses (slimtune/threads.py: the cores other processes leave
free). Each configuration runs in a fresh process (so its threads are its own): one warm-up step, then the
median of --steps steps; a step slower than --cap seconds ends that configuration ("> cap").

    python benchmarks/contention.py [--seq-len 8192] [--chunks 1024 256 64 16] [--steps 2] [--cap 60]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import report

STEP = r"""
import json, sys, time
sys.path.insert(0, "benchmarks")
import _common  # the CLI's process settings
import torch
from slimtune import threads
from slimtune.pretrained import PerformerLM
from slimtune.slim import slim_step
policy, C, L, steps, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
choice = threads.choose(2 if policy == "2 threads" else None)
threads.apply(choice.count)
torch.manual_seed(0)
model = PerformerLM(_common.PAPER_CPU)
opt = torch.optim.Adam(model.parameters(), lr=1e-6)
windows = torch.randint(0, 256, (1, L + 1), generator=torch.Generator().manual_seed(0))
times = []
for i in range(steps + 1):
    started = time.perf_counter()
    slim_step(model, windows, min(C, L))
    opt.step()
    opt.zero_grad(set_to_none=True)
    took = time.perf_counter() - started
    if i:
        times.append(took)
    if took > cap:
        break
print(json.dumps({"threads": choice.count, "reason": choice.reason, "times": times, "capped": took > cap}))
"""


def measure(policy: str, chunk: int, seq_len: int, steps: int, cap: float, heap: str = "tight") -> dict:
    """One configuration in a fresh process: `policy` "2 threads" or "auto" (slimtune's choice), the heap policy
    `heap` (tight, fast, default: see _common.py)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STEP, policy, str(chunk), str(seq_len), str(steps), str(cap)],
            capture_output=True,
            text=True,
            timeout=3 * cap,  # one step that never ends is what a collapse looks like
            env=os.environ | {"BENCH_HEAP": heap},
        )
    except subprocess.TimeoutExpired:
        return {"threads": 2 if policy == "2 threads" else None, "reason": "", "times": [], "capped": True}
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 16])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap", type=float, default=60.0)
    args = parser.parse_args()
    methods = [("full backprop", args.seq_len)] + [(f"SLiM C={c}", c) for c in args.chunks]
    results, rows = {}, []
    for neighbour in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
        try:
            time.sleep(0.5 if busy else 0)
            for policy in ("2 threads", "auto"):
                for label, chunk in methods:
                    r = measure(policy, chunk, args.seq_len, args.steps, args.cap, "fast")  # fit's heap, no budget
                    results[(label, policy, neighbour)] = r
                    print(label, policy, "busy" if neighbour else "quiet", r, flush=True)
        finally:
            if busy:
                busy.kill()

    def cell(r):
        if r["capped"]:
            return f"> {args.cap:.0f} (1 step {r['times'][-1]:.1f})" if r["times"] else f"> {args.cap:.0f}"
        return f"{statistics.median(r['times']):.2f}"

    for label, _ in methods:
        row = [label]
        for policy in ("2 threads", "auto"):
            quiet, busy = results[(label, policy, False)], results[(label, policy, True)]
            ratio = (
                ""
                if quiet["capped"] or busy["capped"] or not busy["times"]
                else f"{statistics.median(busy['times']) / statistics.median(quiet['times']):.1f}x"
            )
            row += [cell(quiet), f"{cell(busy)} [{busy['threads']}t]", ratio]
        rows.append(row)
    report(
        "contention",
        ["method", "2 threads: quiet s", "busy s", "busy/quiet", "auto: quiet s", "busy s", "busy/quiet"],
        rows,
        {
            "seq_len": args.seq_len,
            "cap_s": args.cap,
            "runs": {f"{k[0]} | {k[1]} | {'busy' if k[2] else 'quiet'}": v for k, v in results.items()},
        },
    )


if __name__ == "__main__":
    main()

"""A neighbour that starts in the middle of a run (issue 15): `slimtune.Trainer` steps at C = 256, L = 8192 (d 256,
3 layers, adam) on the 2-core CPU; a process spinning `while True: pass` starts before step --start and runs to the
end. "chosen" is slimtune's default (the count chosen at start, then followed between steps by threads.LoadWatch);
"fixed 2" is `--threads 2`, what every run did before. Each configuration runs in a fresh process.

    python benchmarks/midrun.py [--chunk 256] [--steps 8] [--start 3]
"""

import argparse
import json
import statistics
import subprocess
import sys

from _common import report

RUN = r"""
import json, subprocess, sys, time
sys.path.insert(0, "benchmarks")
import _common  # the CLI's process settings
import torch
from slimtune import threads
from slimtune.data import read_bytes
from slimtune.pretrained import PerformerLM
from slimtune.train import FitOptions, Trainer
given, C, steps, start = (None if sys.argv[1] == "chosen" else int(sys.argv[1])), *map(int, sys.argv[2:5])
threads.apply(threads.choose(given).count)
torch.manual_seed(0)
model = PerformerLM(_common.PAPER_CPU)
data = read_bytes(_common.DATA / "tinyshakespeare.txt")
options = FitOptions(seq_len=8192, steps=steps, chunk_size=C, device="cpu", threads=given, run_dir=None)
notes = []
trainer = Trainer(model, data, options, chunk_size=C, on_warning=notes.append)
trainer.setup()
times, counts, neighbour = [], [], None
try:
    while not trainer.done:
        if trainer.completed + 1 == start:
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        began = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - began)
        counts.append(torch.get_num_threads())
finally:
    if neighbour:
        neighbour.kill()
print(json.dumps({"times": times, "threads": counts, "notes": notes}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--start", type=int, default=3)
    args = parser.parse_args()
    runs = {}
    for policy in ("fixed 2", "chosen"):
        given = "2" if policy == "fixed 2" else "chosen"
        cmd = [sys.executable, "-c", RUN, given, str(args.chunk), str(args.steps), str(args.start)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        runs[policy] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(policy, runs[policy], flush=True)
    rows = []
    for policy, r in runs.items():
        quiet, busy = r["times"][: args.start - 1], r["times"][args.start - 1 :]
        rows.append(
            [
                policy,
                " ".join(f"{t:.2f}" for t in r["times"]),
                " ".join(map(str, r["threads"])),
                f"{statistics.median(quiet):.2f}",
                f"{statistics.median(busy):.2f}",
                f"{statistics.median(busy) / statistics.median(quiet):.1f}x",
            ]
        )
    report(
        "midrun",
        ["threads", "step times s", "threads per step", "quiet median", "busy median", "busy/quiet"],
        rows,
        {"chunk_size": args.chunk, "seq_len": 8192, "neighbour_from_step": args.start, "runs": runs},
    )


if __name__ == "__main__":
    main()

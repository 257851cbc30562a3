"""How long the command line takes to answer before any work (issue 22): `slimtune --help`, `slimtune recipes`
and `slimtune fit --help`, each in a fresh process, interleaved and repeated; and whether torch was imported
(`python -X importtime` lists every module). With `--against PATH`, the same commands of another checkout of
slimtune (PYTHONPATH=PATH), interleaved with this one's, so that the ratio is measured side by side.

    python benchmarks/startup.py [--rounds 6] [--against /path/to/old/checkout]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import ROOT, report

COMMANDS = (["--help"], ["recipes"], ["fit", "--help"])


def once(checkout, args) -> tuple[float, bool]:
    env = os.environ | {"PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "slimtune", *args], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"slimtune {' '.join(args)} failed in {checkout}: {proc.stderr[-500:]}")
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return seconds, "torch" in modules


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--against", help="another slimtune checkout, measured interleaved with this one")
    args = parser.parse_args()
    checkouts = {"this": ROOT} | ({"against": args.against} if args.against else {})
    times = {(name, " ".join(c)): [] for name in checkouts for c in COMMANDS}
    torch_loaded = {}
    for _ in range(args.rounds):
        for command in COMMANDS:
            for name, path in checkouts.items():
                seconds, loaded = once(path, command)
                times[(name, " ".join(command))].append(seconds)
                torch_loaded[(name, " ".join(command))] = loaded
    rows = []
    for (name, command), values in times.items():
        rows.append(
            [
                name,
                f"slimtune {command}",
                f"{min(values):.3f}",
                f"{statistics.median(values):.3f}",
                f"{max(values):.3f}",
                "yes" if torch_loaded[(name, command)] else "no",
            ]
        )
    report(
        "startup",
        ["checkout", "command", "min s", "median s", "max s", "torch imported"],
        rows,
        {"rounds": args.rounds, "against": args.against, "seconds": {f"{n} {c}": v for (n, c), v in times.items()}},
    )


if __name__ == "__main__":
    main()

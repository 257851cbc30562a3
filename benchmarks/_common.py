"""Shared by the benchmark scripts: process settings like the CLI's, a random-init checkpoint, subprocess runs
of `slimtune fit`, and writing a table plus JSON."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimtune.checkpoint import save_checkpoint
from slimtune.memory import set_heap_policy
from slimtune.pretrained import PerformerConfig, PerformerLM

# The heap policy of the process (slimtune/memory.py): BENCH_HEAP=tight (what fit plans under, the default), fast (what
# a run picks when that fits its budget), or default (glibc's defaults untouched: a plain-PyTorch script).
HEAP = os.environ.get("BENCH_HEAP", "tight")
if HEAP != "default":
    set_heap_policy(HEAP)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"
PAPER_CPU = PerformerConfig(hidden_dim=256, n_layers=3, ffn_dim=1024, n_heads=4, feature_type="sqr")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_checkpoint(config: PerformerConfig, name: str, seed: int = 0) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.safetensors"
    torch.manual_seed(seed)
    model = PerformerLM(config)
    save_checkpoint(path, {k: v.contiguous() for k, v in model.state_dict().items()}, config)
    return path


def run_slimtune(command: str, *args) -> dict:
    """`slimtune COMMAND ... --device cpu --json` in a fresh process (so its peak RSS is its own); its JSON."""
    cmd = [sys.executable, "-m", "slimtune", command, "--device", "cpu", "--json", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_fit(checkpoint: Path, *args) -> dict:
    """`slimtune fit` of `checkpoint` on tinyshakespeare, a new run each call; returns its JSON."""
    out = OUT / "fit-out.safetensors"
    shutil.rmtree(OUT / "fit-out.safetensors.run", ignore_errors=True)  # each call is a new run
    fit = ("fit", "--checkpoint", checkpoint, "--out", out, "--overwrite", "--data", DATA / "tinyshakespeare.txt")
    return run_slimtune(*fit, *args)


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": (f"BENCH_HEAP={HEAP} " if HEAP != "tight" else "") + " ".join(["python", *sys.argv]),
        "heap": {"default": "glibc defaults", "tight": "mmap threshold 4 MB", "fast": "mmap threshold 32 MB"}[HEAP],
    }


def report(name: str, headers: list[str], rows: list[list], extra: dict) -> None:
    """Print a markdown table and write benchmarks/out/NAME.json."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "headers": headers, "rows": rows, **extra}
    name += f"-heap-{HEAP}" if HEAP != "tight" else ""
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {OUT / (name + '.json')}")

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

# The CLI's process settings (see slimtune/memory.py); BENCH_DEFAULT_MALLOC=1 measures glibc's defaults instead.
DEFAULT_MALLOC = os.environ.get("BENCH_DEFAULT_MALLOC") == "1"
if not DEFAULT_MALLOC:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch before its first allocation

import torch  # noqa: E402

from slimtune.checkpoint import save_checkpoint  # noqa: E402
from slimtune.memory import limit_heap_retention  # noqa: E402
from slimtune.model import PerformerConfig, PerformerLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"
PAPER_CPU = PerformerConfig(hidden_dim=256, n_layers=3, ffn_dim=1024, n_heads=4, feature_type="sqr")

if not DEFAULT_MALLOC:
    limit_heap_retention()
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
    return run_slimtune("fit", "--checkpoint", checkpoint, "--out", out, "--data", DATA / "tinyshakespeare.txt", *args)


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": ("BENCH_DEFAULT_MALLOC=1 " if DEFAULT_MALLOC else "") + " ".join(["python", *sys.argv]),
        "malloc": "glibc defaults" if DEFAULT_MALLOC else "CLI settings (mmap threshold 4 MB, THP)",
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
    name += "-default-malloc" if DEFAULT_MALLOC else ""
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {OUT / (name + '.json')}")

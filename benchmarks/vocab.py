"""Large vocabularies at O(C) memory (issue 34): d 192, 3 layers, L 16384 under --mem-budget 1200MB, V = 256 against
V = 32000, with the tiled output map and loss (slim.py `_output_loss`) and without it (every chunk's logits whole, as
before). Four figures:

- plan: the C the planner reaches (`slimtune.plan_fit`, the process's own probes), and the chunk line's bytes per
  token at that C (the plan's `chunk` line / C); goal: at V = 32000 within 2x of V = 256, tiled.
- time: seconds of a SLiM step at one C, tiled against plain, interleaved (plain, tiled, plain, ...) in one process and
  repeated; goal: tiled at most 1.1x plain (median).
- eval: `slimtune eval --mem-budget` of the V = 32000 model in a fresh process, its measured peak (the child's
  ru_maxrss: VmHWM) against its budget.

Each plan runs in a fresh process (its peak and runtime are its own). Nothing else may run meanwhile.

    python benchmarks/vocab.py                 # everything (about 15 minutes on 2 cores)
    python benchmarks/vocab.py --repeats 3     # fewer timing repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from _common import DATA, OUT, make_checkpoint, report

from slimtune.model import PerformerConfig

L, BUDGET, EVAL_BUDGET = 16384, "1200MB", "1GB"
SHAPE = dict(hidden_dim=192, n_layers=3, ffn_dim=768, n_heads=4, feature_type="sqr")
NO_TILES = 2**50  # model.LOGITS_TILE_BYTES that never tiles: the logits of a chunk made whole, as before

PLAN = r"""
import json, sys
import slimtune.model as m
if sys.argv[3] == "plain":
    m.LOGITS_TILE_BYTES = int(sys.argv[4])
from slimtune.strategies import plan_fit
found = plan_fit(sys.argv[1], data=[sys.argv[2]], compare_strategies=False, seq_len=int(sys.argv[5]),
                 mem_budget=sys.argv[6], device="cpu", optimizer="adam")
p = found.plan
print(json.dumps({"chunk_size": p.chunk_size, "chunk_bytes": p.breakdown.chunk, "peak": p.predicted_peak_bytes}))
"""

TIME = r"""
import json, sys, time, torch
import slimtune.model as m
from slimtune.pretrained import PerformerLM
from slimtune.slim import slim_step
torch.set_num_threads(2)
model = PerformerLM.from_pretrained(sys.argv[1])
C, repeats = int(sys.argv[2]), int(sys.argv[3])
windows = torch.randint(0, model.config.vocab_size, (1, C * 4 + 1), generator=torch.Generator().manual_seed(0))
tiled_bytes = m.LOGITS_TILE_BYTES
times = {"plain": [], "tiled": []}
for r in range(repeats + 1):
    for name in ("plain", "tiled"):
        m.LOGITS_TILE_BYTES = int(sys.argv[4]) if name == "plain" else tiled_bytes
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        slim_step(model, windows, C)
        if r:  # the first round warms up
            times[name].append(time.perf_counter() - start)
print(json.dumps(times | {"tile": model.loss_tile(1)}))
"""


def _python(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ids(vocab: int) -> str:
    """Token ids for the plan's data file: a uint16 .bin of random ids (the plan reads it as fit would: mapped)."""
    path = OUT / f"vocab-{vocab}.bin"
    np.random.default_rng(0).integers(0, vocab, 2 * L).astype(np.uint16).tofile(path)
    return str(path)


def _eval(checkpoint, vocab: int) -> dict:
    """`slimtune eval --mem-budget` in a fresh process; its measured peak (its own ru_maxrss, read with os.wait4)."""
    data = OUT / f"vocab-eval-{vocab}.npy"
    np.save(data, np.random.default_rng(1).integers(0, vocab, 4 * L).astype(np.int32))
    cmd = [sys.executable, "-m", "slimtune", "eval", "--checkpoint", str(checkpoint), "--data", str(data), "--seq-len",
           str(L), "--mem-budget", EVAL_BUDGET, "--device", "cpu", "--json"]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(err.read()[-3000:])
        result = json.loads(out.read().strip().splitlines()[-1])
    return result | {"vmhwm": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--time-chunk", type=int, default=512, help="C of the timed steps (4 chunks each)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows, cells = [], {}
    for vocab in (256, 32000):
        checkpoint = make_checkpoint(PerformerConfig(vocab_size=vocab, **SHAPE), f"vocab-{vocab}")
        data = _ids(vocab)
        for mode in ("plain", "tiled"):
            plan = _python(PLAN, checkpoint, data, mode, NO_TILES, L, BUDGET)
            per_token = plan["chunk_bytes"] / plan["chunk_size"]
            cells[vocab, mode] = plan | {"chunk_bytes_per_token": per_token}
            rows.append([vocab, mode, plan["chunk_size"], f"{per_token / 1e3:.1f}", f"{plan['peak'] / 1e6:.0f}"])
    for vocab in (256, 32000):
        cells[vocab, "time"] = timed = _python(
            TIME, OUT / f"vocab-{vocab}.safetensors", args.time_chunk, args.repeats, NO_TILES
        )
        ratios = [t / p for t, p in zip(timed["tiled"], timed["plain"], strict=True)]
        cells[vocab, "ratio"] = ratios
        print(f"V {vocab}: tile {timed['tile']} positions; tiled / plain at C {args.time_chunk}: min "
              f"{min(ratios):.3f}, median {statistics.median(ratios):.3f}, max {max(ratios):.3f}")  # fmt: skip
    evaluated = _eval(OUT / "vocab-32000.safetensors", 32000)
    print(f"eval V 32000 under {EVAL_BUDGET}: C {evaluated['chunk_size']}, batch {evaluated['batch_size']}, predicted "
          f"{evaluated['predicted_peak_bytes'] / 1e6:.0f} MB, VmHWM {evaluated['vmhwm'] / 1e6:.0f} MB")  # fmt: skip
    report(
        "vocab",
        ["V", "loss", "C reached", "chunk kB/token", "predicted peak MB"],
        rows,
        {
            "cells": {f"{k[0]}-{k[1]}": v for k, v in cells.items()},
            "eval": evaluated,
            "seq_len": L,
            "budget": BUDGET,
            "data": str(DATA),
        },
    )


if __name__ == "__main__":
    main()

"""Every phase inside the budget, eval's part (issue 32): `slimtune eval --mem-budget B --json` on model shapes
(d 128-512, 1-4 layers, one with a 32000-token vocabulary) x budgets from just above the runtime to loose, each in a
fresh process, recording the chosen C and batch, the predicted peak, and the process's measured peak: the child's
ru_maxrss (the kernel's high-water mark of its resident memory, VmHWM), read with os.wait4. Goal: none over its
budget.

Besides the grid, the issue's cases: d 512 x 4 at L 16384 under 450MB on the first 300 KB of wikitext2.test.txt and
on the whole file; the 32000-token vocabulary under 1GB; and the whole file in a 750 MB memory cgroup without
--mem-budget (root, cgroup v1), where eval used to be killed (exit 137): now it plans within what the cgroup leaves.

    python benchmarks/eval_sweep.py              # the sweep (about an hour on 2 shared cores)
    python benchmarks/eval_sweep.py --cases 3    # the first cases only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from _common import DATA, OUT, make_checkpoint, report

from slimtune.model import PerformerConfig

MB = 1e6
RUNTIME_FLOOR = 350e6  # about what an eval process holds before its first chunk (Python, torch, kernels)
GRID_BYTES = 300_000  # --max-bytes of the grid's cases: several forwards even at the loosest budget

SHAPES = {  # name: (config, L)
    "d128 x1": (PerformerConfig(hidden_dim=128, n_layers=1, ffn_dim=512, n_heads=4), 4096),
    "d256 x2 elu+1": (PerformerConfig(hidden_dim=256, n_layers=2, ffn_dim=1024, n_heads=4, feature_type="elu+1"), 8192),
    "d384 x3 favor+ pre": (
        PerformerConfig(hidden_dim=384, n_layers=3, ffn_dim=1536, n_heads=6, feature_type="favor+", on_gptln=False),
        1024,
    ),
    "d512 x4": (PerformerConfig(hidden_dim=512, n_layers=4, ffn_dim=2048, n_heads=8), 16384),
    "d256 x2 V32000": (PerformerConfig(vocab_size=32000, hidden_dim=256, n_layers=2, ffn_dim=1024, n_heads=4), 2048),
}
EXTRA_OVER_FLOOR = (30e6, 120e6, 500e6, 2500e6)  # budgets: the runtime floor and the weights, plus these


def weight_bytes(config: PerformerConfig) -> int:
    d, f, v = config.hidden_dim, config.ffn_dim, config.vocab_size
    return 4 * (config.n_layers * (3 * d * d + 2 * d * f + 3 * d + f + 4 * d) + v * d // 2 + v * d + v)


def cases() -> list[dict]:
    found = []
    for name, (config, L) in SHAPES.items():
        floor = RUNTIME_FLOOR + weight_bytes(config)
        for extra in EXTRA_OVER_FLOOR:
            found.append({"shape": name, "seq_len": L, "budget_bytes": int(floor + extra), "max_bytes": GRID_BYTES})
    whole = DATA / "wikitext2.test.txt"
    head = OUT / "wikitext2-test-300k.txt"
    OUT.mkdir(parents=True, exist_ok=True)
    head.write_bytes(whole.read_bytes()[:300_000])
    found += [
        {"shape": "d512 x4", "seq_len": 16384, "budget_bytes": 450_000_000, "data": head, "issue": True},
        {"shape": "d512 x4", "seq_len": 16384, "budget_bytes": 450_000_000, "data": whole, "issue": True},
        {"shape": "d256 x2 V32000", "seq_len": 16384, "budget_bytes": 1_000_000_000, "data": head, "issue": True},
        {"shape": "d512 x4", "seq_len": 16384, "budget_bytes": 750_000_000, "data": whole, "cgroup": True},
    ]
    return found


def _cgroup(limit: int) -> Path:
    folder = Path("/sys/fs/cgroup/memory") / f"slimtune-eval-sweep-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "memory.limit_in_bytes").write_text(str(limit))
    return folder


def run_eval(case: dict, checkpoint: Path) -> tuple[int, dict | None, str, int]:
    """One fresh `slimtune eval` process: (exit code, its JSON or None, stderr's last line, its ru_maxrss in
    bytes). In a cgroup of the budget without --mem-budget where the case says so."""
    data = case.get("data", DATA / "wikitext2.test.txt")
    args = [
        sys.executable, "-m", "slimtune", "eval", "--checkpoint", checkpoint, "--data", data, "--device", "cpu",
        "--json", "--seq-len", case["seq_len"],
    ]  # fmt: skip
    if case.get("max_bytes"):
        args += ["--max-bytes", case["max_bytes"]]
    folder = _cgroup(case["budget_bytes"]) if case.get("cgroup") else None
    if folder:  # join the cgroup, then become slimtune
        args = ["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", *args]
    else:
        args += ["--mem-budget", case["budget_bytes"]]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            child = subprocess.Popen([str(a) for a in args], stdout=out, stderr=err, text=True)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the running max of all
        finally:
            if folder:
                folder.rmdir()
        code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    last = stdout.strip().splitlines()[-1] if code == 0 else None
    return code, json.loads(last) if last else None, (stderr.strip().splitlines() or [""])[-1], usage.ru_maxrss * 1024


def sweep(chosen: list[dict]) -> tuple[list, list]:
    rows, records, checkpoints = [], [], {}
    for i, case in enumerate(chosen, 1):
        config, _ = SHAPES[case["shape"]]
        if case["shape"] not in checkpoints:
            checkpoints[case["shape"]] = make_checkpoint(config, "eval-sweep-" + case["shape"].replace(" ", "-"))
        code, result, error, peak = run_eval(case, checkpoints[case["shape"]])
        budget = case["budget_bytes"]
        record = dict(case, case=i, exit_code=code, measured_peak_bytes=peak, error=error if code else "")
        record["data"] = Path(case.get("data", DATA / "wikitext2.test.txt")).name
        tokens = f"{case['max_bytes'] // 1000} kB" if case.get("max_bytes") else "whole"
        if case.get("data") is not None and not case.get("max_bytes"):
            tokens = f"{Path(case['data']).stat().st_size // 1000} kB"
        where = f"cgroup {budget / MB:.0f}" if case.get("cgroup") else f"{budget / MB:.0f}"
        if code == 0:
            predicted = result["predicted_peak_bytes"]
            record |= {
                "chunk_size": result["chunk_size"],
                "batch_size": result["batch_size"],
                "planned_budget_bytes": result["budget_bytes"],
                "predicted_peak_bytes": predicted,
                "reported_peak_bytes": result["peak_memory_bytes"],
                "heap": result["plan"]["heap"],
                "bpc": result["bpc"],
                "over_budget": peak > budget,
                "prediction_error": predicted / peak - 1,
            }
            cells = [
                result["chunk_size"],
                result["batch_size"],
                f"{result['budget_bytes'] / MB:.0f}",
                f"{predicted / MB:.0f}",
                f"{peak / MB:.0f}",
                f"{peak / budget:.0%}",
                f"{record['prediction_error']:+.1%}",
                "OVER" if record["over_budget"] else "ok",
            ]
        else:
            record["over_budget"] = code in (137, -9) or peak > budget
            cells = ["-", "-", "-", "-", f"{peak / MB:.0f}", f"{peak / budget:.0%}", "-", f"exit {code}: {error[:70]}"]
        rows.append([i, case["shape"], case["seq_len"], record["data"].split(".")[0], tokens, where, *cells])
        records.append(record)
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=None, help="run only the first N cases")
    args = parser.parse_args()
    chosen = cases()[: args.cases]
    if any(c.get("cgroup") for c in chosen) and not Path("/sys/fs/cgroup/memory").is_dir():
        chosen = [c for c in chosen if not c.get("cgroup")]
        print("no cgroup v1 memory controller here: the cgroup case is skipped", file=sys.stderr)
    rows, records = sweep(chosen)
    headers = [
        "#", "shape", "L", "data", "bytes", "budget MB", "C", "batch", "planned MB", "predicted MB", "peak MB",
        "of budget", "pred. err", "verdict",
    ]  # fmt: skip
    print()
    over = sum(r["over_budget"] for r in records)
    summary = {
        "cases": len(records),
        "over_budget": over,
        "failed": sum(r["exit_code"] != 0 for r in records),
        "goal": "no eval process over its budget (measured: the child's ru_maxrss)",
    }
    report("eval_sweep", headers, rows, {"summary": summary, "records": records})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

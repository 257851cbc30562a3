"""The memory budget as a promise (issue 21): `slimtune fit --mem-budget B` on shapes drawn with a fixed seed, each
in a fresh process, its measured peak (VmHWM, the kernel's high-water mark of resident memory) against the budget
and against the plan's prediction.

Drawn across d 64-1024, 1-8 layers, heads, d_ff, feature type, layer norm, batch 1-4, L 1k-64k, sgd/adam/adamw,
fp32/bf16, with and without held-out evaluation, budgets from just above the runtime floor to several GB; the
shapes whose step would take more than about a minute on 2 cores are redrawn. Each case runs 2 steps (the
optimizer's state exists from the first, so the second is the run's steady peak).

Goals: no case over its budget (the whole process's peak, the export included); prediction within 10 % of the
measured peak; not timid: where the largest C that fits is below L, the run measures at least 80 % of the budget,
or the next C on the planner's grid above that largest, forced, measures over the budget. (C auto may take a
smaller C than the largest that fits, where it is predicted faster: "C" below is the one it took.)

    python benchmarks/planner_sweep.py                # the sweep (about 20 minutes on 2 cores)
    python benchmarks/planner_sweep.py --cgroup       # the same cases, each inside a memory cgroup of its budget
                                                      # and without --mem-budget (root, cgroup v1): none killed
    python benchmarks/planner_sweep.py --cases 3      # the first cases only
    python benchmarks/planner_sweep.py --lora 8       # 8 cases with LoRA (rank 4-16, fp32 or bf16 base), drawn
                                                      # from their own seed: the 24 above stay as they were
    python benchmarks/planner_sweep.py --speed 6      # the speed column (issue 32): issue 32's case, then the drawn
                                                      # cases whose step is short, up to 6 in all: C auto's tokens/s
                                                      # against each C of the plan's grid that fits, forced under the
                                                      # same budget, interleaved and repeated; goal >= 0.9x the fastest

The --cgroup mode empties the page cache before each case (as root), so that each starts as a fresh container does,
and also runs the same C outside the cgroup, with the budget the cgroup run took: the time inside over outside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

from _common import DATA, OUT, make_checkpoint, report

from slimtune.model import PerformerConfig
from slimtune.planner import chunk_sizes

SEED = 21
STEPS = 2
SPEED_STEPS = 4  # a speed run's steps; its time is the median of steps 2-4 (the first warms the allocator up)
SPEED_REPEATS = 2  # each C of a case runs this often, interleaved with the others
SPEED_MAX_WORK = 3e10  # about two seconds a step on 2 cores: the speed column's cases
ISSUE_32 = {  # the `small` recipe's shape, the issue's workload: C auto took 8192 at 0.45x of C = 2048's speed
    "hidden_dim": 128, "n_layers": 2, "ffn_dim": 512, "n_heads": 4, "feature_type": "sqr", "layernorm": "post",
    "batch_size": 1, "seq_len": 32768, "optimizer": "adam", "precision": "fp32", "eval": False,
    "budget_bytes": 700_000_000, "params": 2 * (3 * 128 * 128 + 2 * 128 * 512) + 256 * 128,
}  # fmt: skip
ISSUE_32_CGROUP = {  # the issue's case in a 750M cgroup (786 MB): with no budget it took 854 MB and thrashed
    "hidden_dim": 576, "n_layers": 5, "ffn_dim": 2304, "n_heads": 8, "feature_type": "sqr", "layernorm": "post",
    "batch_size": 1, "seq_len": 4096, "optimizer": "adam", "precision": "fp32", "eval": False,
    "budget_bytes": 750 * 2**20, "params": 5 * (3 * 576 * 576 + 2 * 576 * 2304) + 256 * 576,
}  # fmt: skip
RUNTIME_FLOOR = 380e6  # about what the process holds before training (Python, torch, kernels): a budget's base
MAX_WORK = 4e11  # 6 x parameters x tokens of one step, about half a minute on 2 cores: larger shapes are redrawn
MB = 1e6


def draw(rng: random.Random, lora: bool = False) -> dict:
    """One case: a model shape, a workload and a budget above the runtime floor; with `lora`, LoRA adapters of a
    drawn rank on a frozen fp32 or bf16 base."""
    while True:
        d = rng.choice([64, 128, 256, 384, 512, 768, 1024])
        heads = rng.choice([h for h in (1, 2, 4, 8, 16) if d % h == 0 and d // h >= 16])
        case = {
            "hidden_dim": d,
            "n_layers": rng.randint(1, 8),
            "ffn_dim": d * rng.choice([2, 4]),
            "n_heads": heads,
            "feature_type": rng.choice(["sqr", "relu", "elu+1", "favor+"]),
            "layernorm": rng.choice(["post", "pre"]),
            "batch_size": rng.randint(1, 4),
            "seq_len": rng.choice([1024, 2048, 4096, 8192, 16384, 32768, 65536]),
            "optimizer": rng.choice(["sgd", "adam", "adamw"]),
            "precision": rng.choice(["fp32", "bf16"]),
            "eval": rng.random() < 0.4,
        }
        params = case["n_layers"] * (3 * d * d + 2 * d * case["ffn_dim"]) + 256 * d
        if 6 * params * case["batch_size"] * case["seq_len"] > MAX_WORK:
            continue
        fixed = params * 4 * (2 + {"sgd": 0, "adam": 2, "adamw": 2}[case["optimizer"]])  # weights, grads, state
        if lora:
            case |= {"lora_rank": rng.choice([4, 8, 16]), "base_dtype": rng.choice(["fp32", "bf16"])}
            if case["base_dtype"] == "bf16":
                case["precision"] = "bf16"  # what --base-dtype bf16 implies
            fixed = params * (2 if case["base_dtype"] == "bf16" else 4)  # the frozen weights; adapters are small
        floor = RUNTIME_FLOOR + fixed
        case["budget_bytes"] = int(floor * 1.15 * (5000e6 / (floor * 1.15)) ** (rng.random() ** 2))
        case["params"] = params
        return case


def _config(case: dict) -> PerformerConfig:
    return PerformerConfig(
        hidden_dim=case["hidden_dim"],
        n_layers=case["n_layers"],
        ffn_dim=case["ffn_dim"],
        n_heads=case["n_heads"],
        feature_type=case["feature_type"],
        on_gptln=case["layernorm"] == "post",
    )


def _cgroup(limit: int) -> Path:
    root = Path("/sys/fs/cgroup/memory")
    folder = root / f"slimtune-sweep-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "memory.limit_in_bytes").write_text(str(limit))
    return folder


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("1")


def fit(
    case: dict,
    checkpoint: Path,
    *,
    budget: bool | int = True,
    chunk: int | str | None = None,
    cgroup: bool = False,
    steps: int = STEPS,
):
    """One fresh `slimtune fit` process: (exit code, its JSON or None, stderr's last line, cgroup peak or None).
    `budget`: True the case's, an int that one, False none."""
    out = OUT / "sweep-out.safetensors"
    shutil.rmtree(OUT / "sweep-out.safetensors.run", ignore_errors=True)  # each call is a new run
    args = [
        sys.executable, "-m", "slimtune", "fit", "--checkpoint", checkpoint, "--data", DATA / "tinyshakespeare.txt",
        "--out", out, "--device", "cpu", "--json", "--steps", steps, "--seq-len", case["seq_len"],
        "--batch-size", case["batch_size"], "--optimizer", case["optimizer"], "--precision", case["precision"],
    ]  # fmt: skip
    if budget:
        args += ["--mem-budget", case["budget_bytes"] if budget is True else budget]
    if chunk:
        args += ["--chunk-size", chunk]
    if case["eval"]:
        args += ["--eval-data", DATA / "ptb.valid.txt", "--eval-every", 1]
    if case.get("lora_rank"):
        args += ["--lora-rank", case["lora_rank"], "--base-dtype", case["base_dtype"]]
    args = [str(a) for a in args] + ["--overwrite"]
    folder = _cgroup(case["budget_bytes"]) if cgroup else None
    try:
        if folder:  # a cold page cache, as in a container that has just started; join the cgroup, become slimtune
            _drop_page_cache()
            args = ["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", *args]
        proc = subprocess.run(args, capture_output=True, text=True)
        charged = int((folder / "memory.max_usage_in_bytes").read_text()) if folder else None
    finally:
        if folder:
            folder.rmdir()
        out.unlink(missing_ok=True)
    last = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None
    error = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, json.loads(last) if last else None, error, charged


def _next_chunk(chosen: int, seq_len: int) -> int:
    bigger = [c for c in chunk_sizes(seq_len) if c > chosen]
    return bigger[0] if bigger else seq_len


def _shape(case: dict) -> str:
    return (
        f"d{case['hidden_dim']} x{case['n_layers']} f{case['ffn_dim']} h{case['n_heads']} "
        f"{case['feature_type']} {case['layernorm']}"
    )


def _work(case: dict) -> str:
    lora = f" LoRA r{case['lora_rank']} {case['base_dtype']} base" if case.get("lora_rank") else ""
    return f"B{case['batch_size']} L{case['seq_len']} {case['optimizer']} {case['precision']}{lora}" + (
        " eval" if case["eval"] else ""
    )


def sweep(cases: list[dict]) -> tuple[list, list]:
    rows, records = [], []
    for i, case in enumerate(cases, 1):
        ckpt = make_checkpoint(_config(case), f"sweep-{i}")
        code, result, error, _ = fit(case, ckpt)
        record = dict(case, case=i, exit_code=code, error=error if code else "")
        if code == 0:
            plan = result["plan"]
            peak, predicted, C = result["peak_memory_bytes"], plan["predicted_peak_bytes"], result["chunk_size"]
            record |= {
                "chunk_size": C,
                "measured_peak_bytes": peak,
                "predicted_peak_bytes": predicted,
                "heap": plan["heap"],
                "over_budget": peak > case["budget_bytes"],
                "prediction_error": predicted / peak - 1,
                "share_of_budget": peak / case["budget_bytes"],
            }
            next_peak = None
            largest = plan.get("largest_fitting") or C  # C auto may take a smaller, faster C on purpose
            record["largest_fitting"] = largest
            if largest < case["seq_len"] and peak < 0.8 * case["budget_bytes"]:  # is the next C really over budget?
                bigger = _next_chunk(largest, case["seq_len"])
                next_code, next_result, _, _ = fit(case, ckpt, budget=False, chunk=bigger)
                next_peak = next_result["peak_memory_bytes"] if next_code == 0 else None
                record |= {"next_chunk_size": bigger, "next_measured_peak_bytes": next_peak}
            record["timid"] = bool(next_peak is not None and next_peak <= case["budget_bytes"])
            verdict = "OVER" if record["over_budget"] else ("timid" if record["timid"] else "ok")
            cells = [
                f"{C}" + (" (L)" if C >= case["seq_len"] else ""),
                f"{predicted / MB:.0f}",
                f"{peak / MB:.0f}",
                f"{record['prediction_error']:+.1%}",
                f"{record['share_of_budget']:.0%}",
                verdict,
            ]
        else:
            cells = ["-", "-", "-", "-", "-", f"exit {code}: {error[:60]}"]
        rows.append([i, _shape(case), _work(case), f"{case['budget_bytes'] / MB:.0f}", *cells])
        records.append(record)
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows, records


def _step_seconds(result: dict) -> float:
    """A run's step time: the median of its steps after the first."""
    return statistics.median(result["step_seconds"][1:] or result["step_seconds"])


def sweep_in_cgroups(cases: list[dict]) -> tuple[list, list]:
    """Each case without --mem-budget inside a cgroup of its budget, from a cold page cache; then the same C outside
    under the budget the cgroup run took: both runs' step time (median of steps 2-4)."""
    rows, records = [], []
    for i, case in enumerate(cases, 1):
        ckpt = make_checkpoint(_config(case), f"sweep-{i}")
        code, result, error, charged = fit(case, ckpt, budget=False, cgroup=True, steps=SPEED_STEPS)
        killed = code in (137, -9)
        record = dict(case, case=i, exit_code=code, killed=killed, cgroup_peak_bytes=charged)
        cells = ["-"] * 5
        if result:
            plan = result["plan"]
            record |= {
                "chunk_size": result["chunk_size"],
                "measured_peak_bytes": result["peak_memory_bytes"],
                "available_bytes": plan["available_bytes"],
                "budget_bytes_taken": plan["budget_bytes"],
                "budget_within_limit": plan["budget_bytes"] <= case["budget_bytes"],
                "seconds_inside": _step_seconds(result),
            }
            out_code, outside, _, _ = fit(
                case, ckpt, budget=plan["budget_bytes"], chunk=result["chunk_size"], steps=SPEED_STEPS
            )
            if out_code == 0:
                record["seconds_outside"] = _step_seconds(outside)
                record["time_inside_over_outside"] = record["seconds_inside"] / record["seconds_outside"]
            cells = [
                result["chunk_size"],
                f"{plan['budget_bytes'] / MB:.0f}",
                f"{result['peak_memory_bytes'] / MB:.0f}",
                f"{charged / MB:.0f}" if charged else "-",
                f"{record['time_inside_over_outside']:.2f}x" if "time_inside_over_outside" in record else "-",
            ]
        verdict = "KILLED" if killed else ("ok" if code == 0 else f"exit {code}: {error[:60]}")
        if code == 0 and not record["budget_within_limit"]:
            verdict = "BUDGET OVER LIMIT"
        elif code == 0 and record["measured_peak_bytes"] > record["budget_bytes_taken"]:
            verdict = "PEAK OVER BUDGET"
        rows.append([i, _shape(case), _work(case), f"{case['budget_bytes'] / MB:.0f}", *cells, verdict])
        records.append(record)
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows, records


def speed_sweep(cases: list[dict]) -> tuple[list, list]:
    """C auto's tokens/s against each C of the plan's grid that fits, forced under the same budget: all of a case's
    runs interleaved and repeated SPEED_REPEATS times, each a fresh process, its step time the median of steps 2-4;
    a C's figure is the median over its repeats."""
    rows, records = [], []
    for i, case in enumerate(cases, 1):
        ckpt = make_checkpoint(_config(case), f"speed-{i}")
        code, first, error, _ = fit(case, ckpt, steps=SPEED_STEPS)
        if code != 0:
            cells = [i, _shape(case), _work(case), f"{case['budget_bytes'] / MB:.0f}", "-", "-", "-", "-", "-", error]
            rows.append(cells)
            records.append(dict(case, case=i, exit_code=code, error=error))
            continue
        plan = first["plan"]
        grid = sorted({c["chunk_size"] for c in plan["candidates"] if c["fits"] and c["chunk_size"] >= 256})
        runs = {"auto": [first]}
        for _ in range(SPEED_REPEATS):
            for chunk in ["auto", *grid]:
                if chunk == "auto" and len(runs["auto"]) < SPEED_REPEATS:
                    runs["auto"].append(fit(case, ckpt, steps=SPEED_STEPS)[1])
                elif chunk != "auto" and len(runs.setdefault(chunk, [])) < SPEED_REPEATS:
                    runs[chunk].append(fit(case, ckpt, chunk=chunk, steps=SPEED_STEPS)[1])
        tokens = case["batch_size"] * case["seq_len"]
        speed = {c: tokens / statistics.median(_step_seconds(r) for r in rs if r) for c, rs in runs.items() if any(rs)}
        forced = {c: v for c, v in speed.items() if c != "auto"}
        fastest = max(forced, key=forced.get)
        peaks = [r["peak_memory_bytes"] for rs in runs.values() for r in rs if r]
        # The time model's error where the choice uses it: each C's predicted time over the largest's, against
        # the measured ratio.
        predicted = {c["chunk_size"]: c["relative_time"] for c in plan["candidates"]}
        top = max(forced)
        ratio_errors = {
            str(c): (predicted[c] / predicted[top]) / (forced[top] / forced[c]) - 1 for c in forced if c in predicted
        }
        record = dict(
            case, case=i, exit_code=0, chunk_size=first["chunk_size"], reason=plan.get("reason", ""),
            largest_fitting=plan.get("largest_fitting"), tokens_per_s={str(c): v for c, v in speed.items()},
            fastest_chunk_size=fastest, auto_over_fastest=speed["auto"] / forced[fastest],
            largest_over_fastest=forced.get(max(forced), 0) / forced[fastest],
            over_budget=any(p > case["budget_bytes"] for p in peaks), worst_peak_bytes=max(peaks),
            peaks_by_chunk={str(c): [r["peak_memory_bytes"] for r in rs if r] for c, rs in runs.items()},
            predicted_by_chunk={str(c["chunk_size"]): c["predicted_peak_bytes"] for c in plan["candidates"]},
            ratio_errors=ratio_errors, worst_ratio_error=max(map(abs, ratio_errors.values()), default=0.0),
        )  # fmt: skip
        rows.append(
            [
                i, _shape(case), _work(case), f"{case['budget_bytes'] / MB:.0f}", first["chunk_size"],
                f"{fastest} ({forced[fastest]:,.0f} tok/s)", f"{record['auto_over_fastest']:.2f}x",
                f"{max(forced)}: {record['largest_over_fastest']:.2f}x",
                f"{record['worst_ratio_error']:.0%}",
                "OVER" if record["over_budget"] else "ok",
            ]
        )  # fmt: skip
        records.append(record)
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows, records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="how many of the drawn cases to run (default 24)")
    parser.add_argument("--cgroup", action="store_true", help="run each case inside a memory cgroup of its budget")
    parser.add_argument("--lora", type=int, default=0, help="run this many LoRA cases instead (their own draw)")
    parser.add_argument("--speed", type=int, default=0, help="the speed column for this many cases (issue 32's first)")
    parser.add_argument(
        "--speed-cases", default="", help="with --speed: these drawn cases instead (the memory sweep's numbers: 1,2)"
    )
    args = parser.parse_args()
    if args.speed:
        rng = random.Random(SEED)
        drawn = [draw(rng) for _ in range(args.cases)]
        short = [c for c in drawn if 6 * c["params"] * c["batch_size"] * c["seq_len"] <= SPEED_MAX_WORK]
        cases = [ISSUE_32, *short][: args.speed]
        if args.speed_cases:  # cases where the memory sweep's C auto took less than the largest C that fits
            cases = [drawn[int(n) - 1] for n in args.speed_cases.split(",")]
        rows, records = speed_sweep(cases)
        headers = ["#", "model", "workload", "budget MB", "auto C", "fastest forced C", "auto/fastest", "largest"]
        headers += ["time ratio error", ""]
        ran = [r for r in records if r["exit_code"] == 0]
        summary = {
            "cases": len(records),
            "ran": len(ran),
            "worst_auto_over_fastest": min((r["auto_over_fastest"] for r in ran), default=None),
            "at_least_0.9": sum(r["auto_over_fastest"] >= 0.9 for r in ran),
            "over_budget": sum(r["over_budget"] for r in ran),
            "worst_ratio_error": max((r["worst_ratio_error"] for r in ran), default=None),
        }
        report("planner_sweep-speed", headers, rows, summary | {"records": records})
        print(json.dumps(summary, indent=2))
        return
    if args.lora:
        rng = random.Random(SEED + 1)
        cases = [draw(rng, lora=True) for _ in range(args.lora)]
    else:
        rng = random.Random(SEED)
        cases = [draw(rng) for _ in range(args.cases)]
    name = "planner_sweep-lora" if args.lora else "planner_sweep"
    if args.cgroup:
        if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
            sys.exit("--cgroup needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
        rows, records = sweep_in_cgroups([ISSUE_32_CGROUP, *cases])  # "#" 1: the issue's case, then the drawn
        headers = [
            "#",
            "model",
            "workload",
            "limit MB",
            "C",
            "budget MB",
            "peak MB",
            "cgroup peak MB",
            "time in/out",
            "",
        ]
        ratios = [r["time_inside_over_outside"] for r in records if "time_inside_over_outside" in r]
        summary = {
            "cases": len(records),
            "killed": sum(r["killed"] for r in records),
            "budget_over_limit": sum(not r.get("budget_within_limit", True) for r in records),
            "peak_over_budget": sum(
                r.get("measured_peak_bytes", 0) > r.get("budget_bytes_taken", 1e30) for r in records
            ),
            "worst_time_inside_over_outside": max(ratios, default=None),
        }
        report(f"{name}-cgroup", headers, rows, summary | {"records": records})
    else:
        rows, records = sweep(cases)
        headers = ["#", "model", "workload", "budget MB", "C", "predicted MB", "peak MB", "error", "of budget", ""]
        ran = [r for r in records if r["exit_code"] == 0]
        summary = {
            "cases": len(records),
            "ran": len(ran),
            "over_budget": sum(r["over_budget"] for r in ran),
            "timid": sum(r["timid"] for r in ran),
            "worst_prediction_error": max((abs(r["prediction_error"]) for r in ran), default=None),
            "within_10_percent": sum(abs(r["prediction_error"]) <= 0.10 for r in ran),
        }
        report(name, headers, rows, summary | {"records": records})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Everything a GPU must show, in one call (issue 24): `bash benchmarks/gpu.sh OUT` on a bare GPU machine.

Four parts, in order of value, each in a process of its own with a time limit of its own (a slow part is
stopped, its JSON keeps what it finished, and the next part runs):
- tests    `pytest -m cuda`: SLiM's exactness on the card (fp32 and bf16), generation, a real CUDA out-of-memory
           and the fallback to a smaller C, NVML finding the card by UUID, resume, LoRA with a bf16 base.
- planner  the paper's configurations II, III and IV at their L under an emulated 2 GB and 4 GB card
           (`torch.cuda.set_per_process_memory_fraction`): `fit --mem-budget` with two steps, the chosen C, its
           predicted and measured peak (CUDA context + max_memory_reserved), then the next larger C forced; whether
           C auto (the fastest that fits) is the largest that fits, and where not, both step times.
- bench    `slimtune bench` of configuration IV (fp32 and bf16) at C in {4096, 1024, 256, 64} against full
           backprop (C = L = 16384) and layer checkpointing, with `--plot`; and LoRA r8 at C = 1024.
- profile  torch.profiler over SLiM steps of configuration IV at C = 64 and C = 1024: kernels launched and time
           per chunk (the launch-bound floor of small chunks).

OUT holds at most 8 files: gpu.log (every part's output), summary.json (the machine, `nvidia-smi`'s reading, each
part's status and seconds), tests.json, planner.json, bench.json, profile.json, bench-fp32.png and bench-bf16.png
(when matplotlib is there). `check(OUT)` is the schema: CI runs `--device cpu --quick` (every part at toy sizes,
about a minute) and checks it. Nothing here is CUDA-only code: the same calls run on CPU.

    bash benchmarks/gpu.sh OUT                      # on the GPU machine: under 8 minutes
    bash benchmarks/gpu.sh OUT --device cpu --quick # here: the smoke test CI runs
    python benchmarks/gpu.py --plot OUT             # here, after fetching OUT: the PNGs, if the card had no matplotlib
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
PARTS = ("tests", "planner", "bench", "profile")
LIMITS = {"tests": 100, "planner": 170, "bench": 130, "profile": 50}  # seconds on a card: 450 s with start-up
QUICK_LIMIT = 120  # each part on CPU at toy sizes
MAX_FILES = 8
MB = 1e6

# What each JSON file must hold (check() below): top-level keys, and the keys of each item of its list.
SCHEMA = {
    "summary.json": ({"schema", "device", "quick", "command", "machine", "parts", "seconds"}, None, None),
    "tests.json": ({"passed", "failed", "skipped", "errors", "tests"}, "tests", {"name", "outcome", "seconds"}),
    "planner.json": (
        {"device", "cells"},
        "cells",
        {
            "recipe",
            "seq_len",
            "budget_bytes",
            "chunk_size",
            "predicted_peak_bytes",
            "measured_peak_bytes",
            "within_budget",
            "prediction_error",
            "next_chunk_size",
            "next_measured_peak_bytes",
            "next_note",
        },
    ),  # fmt: skip
    "bench.json": ({"runs"}, "runs", {"name", "seq_len", "precision", "device_name", "memory_counts", "rows"}),
    "profile.json": (
        {"device", "chunks"},
        "chunks",
        {"chunk_size", "seq_len", "kernels_per_chunk", "seconds_per_chunk", "counts", "top"},
    ),  # fmt: skip
}
NVIDIA_SMI_FIELDS = ("index", "name", "uuid", "memory.total", "memory.used", "driver_version", "pstate",
                     "clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu")  # fmt: skip


# -- the machine -----------------------------------------------------------------------------------------------------


def parse_nvidia_smi(text: str, fields=NVIDIA_SMI_FIELDS) -> list[dict]:
    """`nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits` as one dict per card: numbers as numbers,
    '[N/A]' and '[Not Supported]' as None. Names may hold commas only at the end of a line's fields, never here."""
    cards = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            raise ValueError(f"nvidia-smi line has {len(values)} fields, expected {len(fields)}: {line!r}")
        card = {}
        for name, value in zip(fields, values, strict=True):
            if value.startswith("[") and value.endswith("]"):  # [N/A], [Not Supported], [Unknown Error]
                card[name] = None
            elif name in ("name", "uuid", "driver_version", "pstate"):
                card[name] = value
            else:
                try:
                    card[name] = int(value)
                except ValueError:
                    card[name] = float(value)
        cards.append(card)
    return cards


def machine() -> dict:
    """What ran: the host, torch and CUDA, `nvidia-smi`'s reading and `slimtune env`'s (NVML, by UUID)."""
    import torch

    # No CUDA call here: this process runs all parts, and a context of its own would sit on the card throughout.
    found = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}  # fmt: skip
    query = ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = parse_nvidia_smi(done.stdout) if done.returncode == 0 else done.stderr.strip()[:300]
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        found["nvidia_smi"] = f"not read: {e}"
    env = _slimtune("env", "--json")
    found["slimtune_env"] = json.loads(env.stdout.strip().splitlines()[-1]) if env.returncode == 0 else env.stderr
    gpus = found["slimtune_env"].get("gpus") if isinstance(found["slimtune_env"], dict) else None
    found["device_name"] = gpus[0]["name"] if gpus else "cpu"
    return found


def _slimtune(*args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def _write(path: Path, payload: dict) -> None:
    """Atomically: a part stopped at its time limit leaves the last complete version."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _log(*parts) -> None:
    print(*parts, flush=True)


# -- part: tests -----------------------------------------------------------------------------------------------------


def part_tests(out: Path, args) -> None:
    """`pytest -m cuda`; on CPU with SLIMTUNE_CUDA_TESTS=cpu, so that the device-independent ones run there."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.device == "cpu":
            env["SLIMTUNE_CUDA_TESTS"] = "cpu"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors",
                   f"--junitxml={junit}"]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        _log(done.stdout[-6000:], done.stderr[-3000:])
        tests = parse_junit(junit.read_text()) if junit.exists() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "errors")}
    _write(out / "tests.json", {**counts, "exit_code": done.returncode, "command": " ".join(command[1:]),
                                "tests": tests})  # fmt: skip
    if done.returncode not in (0, 5):  # 5: nothing collected
        sys.exit(1)


def parse_junit(text: str) -> list[dict]:
    """pytest's --junitxml as [{name, outcome (passed/failed/skipped/errors), seconds, message}]."""
    tests = []
    for case in ET.fromstring(text).iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, ((found.get("message") or "").splitlines() or [""])[0][:300]
                break
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})  # fmt: skip
    return tests


# -- part: planner ---------------------------------------------------------------------------------------------------


def planner_cells(quick: bool) -> list[tuple[str, int | None, str]]:
    """(recipe, L or None for the recipe's, budget) for each cell."""
    if quick:
        return [("small", 16384, "600MB")]  # C < L there, so that the next larger C is measured too
    return [(recipe, None, budget) for recipe in ("config-2", "config-3", "config-4") for budget in ("2GB", "4GB")]


def part_planner(out: Path, args) -> None:
    """Each cell in a fresh process: the emulated card and the allocator's peak are the process's own."""
    cells = []
    for recipe, seq_len, budget in planner_cells(args.quick):
        command = [sys.executable, __file__, "--cell", recipe, str(seq_len or 0), budget, "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        _log(f"planner {recipe} {budget}: exit {done.returncode}", done.stderr[-3000:])
        if done.returncode == 0:
            cells.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            cells.append({"recipe": recipe, "budget": budget, "error": done.stderr.strip()[-500:]})
        _write(out / "planner.json", {"device": args.device, "cells": cells})


def planner_cell(recipe: str, seq_len: int, budget: str, device: str) -> dict:
    """`fit --mem-budget` (two steps) on a random-init checkpoint of `recipe` under an emulated card of `budget`
    (CPU: the budget alone); then, in the same process, `fit --chunk-size NEXT` with the next larger C (the
    fallback to a smaller C after an out-of-memory shows it would not fit)."""
    import torch

    import slimtune
    from slimtune.devices import emulate_card, resolve_device
    from slimtune.planner import chunk_sizes
    from slimtune.recipes import load_recipe
    from slimtune.units import parse_size

    dev = resolve_device(device)
    if dev.type == "cuda":
        emulate_card(budget, dev)
    config = load_recipe(recipe)
    L = seq_len or int(config.train["seq_len"])
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-gpu-"))
    try:
        ckpt, data = _random_checkpoint(config.model, tmp), _made_up_text(tmp, 4 * L + 2)

        def fit(**settings) -> dict:
            if dev.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            out = tmp / f"tuned-{len(os.listdir(tmp))}.safetensors"
            result = slimtune.fit(ckpt, data, out, seq_len=L, steps=2, run_dir=None, device=device, **settings)
            return result.to_json()

        chosen = fit(mem_budget=budget)
        C, budget_bytes = chosen["chunk_size"], parse_size(budget)
        predicted, measured = chosen["plan"]["predicted_peak_bytes"], chosen["peak_memory_bytes"]
        larger = [c for c in chunk_sizes(L) if c > C]
        cell = {"recipe": recipe, "seq_len": L, "budget": budget, "budget_bytes": budget_bytes, "chunk_size": C,
                "predicted_peak_bytes": predicted, "measured_peak_bytes": measured,
                "within_budget": measured <= budget_bytes, "prediction_error": predicted / measured - 1,
                "memory_counts": chosen.get("memory_counts"), "seconds": chosen["seconds"],
                "next_chunk_size": larger[0] if larger else None, "next_measured_peak_bytes": None,
                "next_note": "C = L: nothing larger" if not larger else ""}  # fmt: skip
        # C auto is the fastest that fits; on a card that should be the largest (issue 32): where it is not, the
        # largest is run too, and the two step times say which was right.
        largest = chosen["plan"].get("largest_fitting", C)
        cell |= {"largest_fitting": largest, "auto_is_largest": C == largest, "reason": chosen["plan"].get("reason"),
                 "auto_step_seconds": chosen["step_seconds"][-1]}  # fmt: skip
        if largest != C:
            widest = fit(mem_budget=budget, chunk_size="max")
            cell["largest_step_seconds"] = widest["step_seconds"][-1]
        if larger:
            nxt = fit(chunk_size=larger[0])
            if nxt["chunk_size"] != larger[0]:
                cell["next_note"] = f"out of memory at C = {larger[0]}: fell back to C = {nxt['chunk_size']}"
            else:
                cell["next_measured_peak_bytes"] = nxt["peak_memory_bytes"]
                over = nxt["peak_memory_bytes"] > budget_bytes
                cell["next_note"] = "over the budget" if over else "within the budget: the planner was timid"
        return cell
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _random_checkpoint(config, folder: Path) -> Path:
    import torch

    from slimtune.checkpoint import save_checkpoint
    from slimtune.pretrained import PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(config)
    path = folder / "base.safetensors"
    save_checkpoint(path, {k: v.contiguous() for k, v in model.state_dict().items()}, config)
    return path


def _made_up_text(folder: Path, n_bytes: int) -> Path:
    """The GPU machine has no ../shared/data: seeded words, n_bytes of them at least."""
    import random

    words = "the chunk state of a performer sums its keys and values over every position before it".split()
    rng, text = random.Random(0), []
    while sum(map(len, text)) + len(text) < n_bytes:
        text.append(rng.choice(words) + ("\n" if rng.random() < 0.1 else ""))
    path = folder / "corpus.txt"
    path.write_text(" ".join(text))
    return path


# -- part: bench -----------------------------------------------------------------------------------------------------


def bench_runs(quick: bool) -> list[tuple[str, list[str]]]:
    size = ["--recipe", "small", "--seq-len", "256", "--steps", "1", "--warmup", "0"] if quick else \
        ["--recipe", "config-4", "--steps", "3", "--warmup", "1"]  # fmt: skip
    chunks = "64,16" if quick else "4096,1024,256,64"
    return [
        ("fp32", [*size, "--chunks", chunks, "--precision", "fp32"]),
        ("bf16", [*size, "--chunks", chunks, "--precision", "bf16"]),
        ("lora-r8", [*size, "--chunks", "64" if quick else "1024", "--lora-rank", "8", "--no-checkpointing"]),
        # QLoRA (issue 35): the same LoRA step on a bf16 and on an nf4 base, dequantized tile by tile on the card
        *(
            (
                f"lora-r8-{base}",
                [
                    *size,
                    "--chunks",
                    "64" if quick else "1024",
                    "--lora-rank",
                    "8",
                    "--base-dtype",
                    base,
                    "--no-checkpointing",
                ],
            )
            for base in ("bf16", "nf4")
        ),
    ]


def part_bench(out: Path, args) -> None:
    plots = importlib.util.find_spec("matplotlib") is not None
    runs = []
    for name, flags in bench_runs(args.quick):
        plot = ["--plot", str(out / f"bench-{name}.png")] if plots and not name.startswith("lora") else []
        done = _slimtune("bench", *flags, "--optimizer", "adam", "--device", args.device, *plot, "--json")
        _log(f"bench {name}: exit {done.returncode}", done.stderr[-3000:])
        if done.returncode == 0:
            runs.append({"name": name, "flags": flags, **json.loads(done.stdout.strip().splitlines()[-1])})
        else:
            runs.append({"name": name, "flags": flags, "error": done.stderr.strip()[-500:]})
        _write(out / "bench.json", {"runs": runs})


# -- part: profile ---------------------------------------------------------------------------------------------------


def part_profile(out: Path, args) -> None:
    """One SLiM step (L = 4C) profiled at each C; per chunk = the step over its chunk passes (the forward sweep's
    L/C - 1 and the reverse sweep's L/C)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from slimtune.devices import resolve_device
    from slimtune.pretrained import PerformerLM
    from slimtune.recipes import load_recipe
    from slimtune.slim import slim_step

    dev = resolve_device(args.device)
    config = load_recipe("small" if args.quick else "config-4").model
    torch.manual_seed(0)
    model = PerformerLM(config).to(dev)
    chunks = []
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for C in (16, 64) if args.quick else (64, 1024):
        L = 4 * C
        windows = torch.randint(0, config.vocab_size, (1, L + 1), generator=torch.Generator().manual_seed(0)).to(dev)
        passes = 2 * (L // C) - 1

        def step(windows=windows, C=C):
            model.zero_grad(set_to_none=True)
            slim_step(model, windows, C)
            if cuda:
                torch.cuda.synchronize(dev)

        step()  # warm-up: kernels loaded, allocator filled
        started = time.perf_counter()
        for _ in range(3):
            step()
        seconds = (time.perf_counter() - started) / 3
        with profile(activities=activities) as prof:
            step()
        events = prof.key_averages()
        if cuda:  # kernels: what ran on the device
            kernels = [e for e in events if e.device_type.name == "CUDA"]
            key = lambda e: e.device_time_total  # noqa: E731
        else:  # on CPU the nearest thing: the aten operators that ran
            kernels = [e for e in events if e.key.startswith("aten::")]
            key = lambda e: e.self_cpu_time_total  # noqa: E731
        launched = sum(e.count for e in kernels)
        top = sorted(kernels, key=key, reverse=True)[:8]
        chunks.append({"chunk_size": C, "seq_len": L, "chunk_passes": passes, "step_seconds": seconds,
                       "seconds_per_chunk": seconds / passes, "kernels_per_chunk": launched / passes,
                       "counts": "CUDA kernels" if cuda else "aten operators (CPU)",
                       "top": [{"name": e.key[:120], "count": e.count, "us": key(e)} for e in top]})  # fmt: skip
        _write(out / "profile.json", {"device": str(dev), "model": config.to_dict(), "chunks": chunks})


# -- the whole run ---------------------------------------------------------------------------------------------------


def run_all(out: Path, args) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "gpu.log").open("a")
    started = time.time()
    summary = {"schema": SCHEMA_VERSION, "device": args.device, "quick": args.quick,
               "command": " ".join(["bash benchmarks/gpu.sh", str(out), *sys.argv[2:]]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "parts": {}}  # fmt: skip
    _write(out / "summary.json", summary | {"seconds": 0})
    for part in args.parts:
        limit = args.limits.get(part, QUICK_LIMIT if args.quick else LIMITS[part])
        command = [sys.executable, __file__, "--part", part, str(out), "--device", args.device]
        command += ["--quick"] if args.quick else []
        log.write(f"\n===== {part} (limit {limit} s) =====\n")
        log.flush()
        t0 = time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        try:
            status = "ok" if proc.wait(timeout=limit) == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and whatever it started
            proc.wait()
            status = f"stopped at its limit of {limit} s"
        summary["parts"][part] = {"status": status, "seconds": round(time.time() - t0, 1), "limit_s": limit}
        print(f"{part:8s} {status:32s} {time.time() - t0:6.1f} s", flush=True)
        _write(out / "summary.json", summary | {"seconds": round(time.time() - started, 1)})
    log.close()
    print(summary_table(out))
    return 0 if all(p["status"] == "ok" for p in summary["parts"].values()) else 1


def summary_table(out: Path) -> str:
    """The few lines that matter, for the end of the output (the device tool returns its tail)."""
    lines = []
    if (out / "tests.json").exists():
        t = json.loads((out / "tests.json").read_text())
        failed = [x["name"] for x in t["tests"] if x["outcome"] in ("failed", "errors")]
        lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped {failed[:4]}")
    if (out / "planner.json").exists():
        for c in json.loads((out / "planner.json").read_text())["cells"]:
            if "error" in c:
                lines.append(f"planner {c['recipe']} {c['budget']}: {c['error'][-160:]}")
                continue
            lines.append(f"planner {c['recipe']} L {c['seq_len']} {c['budget']}: C {c['chunk_size']}, predicted "
                         f"{c['predicted_peak_bytes'] / MB:.0f} MB, measured {c['measured_peak_bytes'] / MB:.0f} MB "
                         f"({c['prediction_error']:+.1%}); next C {c['next_chunk_size']}: "
                         f"{_mb(c['next_measured_peak_bytes'])} {c['next_note']}")  # fmt: skip
    if (out / "bench.json").exists():
        for r in json.loads((out / "bench.json").read_text())["runs"]:
            rows = " | ".join(f"{x['method']} {_s(x['median_s'])} {_mb(x['peak_bytes'])}" for x in r.get("rows", []))
            lines.append(f"bench {r['name']}: {rows or r.get('error', '')[-160:]}")
    if (out / "profile.json").exists():
        for c in json.loads((out / "profile.json").read_text())["chunks"]:
            lines.append(f"profile C {c['chunk_size']}: {c['kernels_per_chunk']:.0f} {c['counts']} per chunk, "
                         f"{c['seconds_per_chunk'] * 1e3:.2f} ms per chunk")  # fmt: skip
    return "\n".join(lines)


def _mb(value) -> str:
    return "-" if value is None else f"{value / MB:.0f} MB"


def _s(value) -> str:
    return "oom" if value is None else f"{value:.3f} s"


def check(out: Path) -> list[str]:
    """What is wrong with the files under OUT (empty: nothing): the file count, every schema key, and each part's
    status."""
    problems = []
    files = [p.name for p in out.iterdir()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files under {out}, at most {MAX_FILES}: {sorted(files)}")
    for name, (keys, items, item_keys) in SCHEMA.items():
        path = out / name
        if not path.exists():
            problems.append(f"{name} is missing")
            continue
        doc = json.loads(path.read_text())
        problems += [f"{name}: no {k!r}" for k in sorted(keys - set(doc))]
        for i, item in enumerate(doc.get(items, []) if items else []):
            if "error" in item:
                problems.append(f"{name}: {items}[{i}] failed: {item['error'][-200:]}")
            else:
                problems += [f"{name}: {items}[{i}] has no {k!r}" for k in sorted(item_keys - set(item))]
    if (out / "summary.json").exists():
        for part, p in json.loads((out / "summary.json").read_text()).get("parts", {}).items():
            if p["status"] != "ok":
                problems.append(f"part {part}: {p['status']}")
    return problems


def plot_fetched(out: Path) -> None:
    """Draw bench.json's fp32 and bf16 runs as `slimtune bench --plot` would, next to it."""
    from slimtune.bench import Row, plot

    for run in json.loads((out / "bench.json").read_text())["runs"]:
        if "rows" in run and not run["name"].startswith("lora"):
            fields = set(Row.__dataclass_fields__)
            rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in run["rows"]]
            path = out / f"bench-{run['name']}.png"
            plot(rows, path, f"slimtune bench: {run['model']}, L = {run['seq_len']}, {run['precision']}, "
                             f"{run['device_name']}")  # fmt: skip
            print(f"plot -> {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="the folder for the log and the JSON files")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="toy sizes: every part in about a minute on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list out of {','.join(PARTS)}")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for one part (e.g. --limit bench=60)")  # fmt: skip
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)  # internal: one planner cell
    parser.add_argument("--plot", action="store_true", help="draw the bench PNGs from a fetched OUT")
    parser.add_argument("--check", action="store_true", help="check a finished OUT against the schema")
    args = parser.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}: choose out of {','.join(PARTS)}")
    try:
        args.limits = {part: float(seconds) for part, seconds in (item.split("=") for item in args.limit)}
    except ValueError:
        parser.error(f"--limit takes PART=SECONDS (e.g. bench=60), got {args.limit}")
    if set(args.limits) - set(PARTS):
        parser.error(f"--limit names unknown part(s) {sorted(set(args.limits) - set(PARTS))}")
    if args.cell:
        cell = planner_cell(args.cell[0], int(args.cell[1]), args.cell[2], args.device)
        print(json.dumps(cell))
        return 0
    if args.out is None:
        parser.error("give OUT, the folder for the results")
    if args.part:
        {"tests": part_tests, "planner": part_planner, "bench": part_bench, "profile": part_profile}[args.part](
            args.out, args
        )
        return 0
    if args.plot:
        plot_fetched(args.out)
        return 0
    if args.check:
        problems = check(args.out)
        print("\n".join(problems) or f"{args.out}: complete")
        return 1 if problems else 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # asks the driver; creates no context
            parser.error("no usable CUDA device here: run with --device cpu (and --quick for the smoke test)")
    return run_all(args.out, args)


if __name__ == "__main__":
    sys.exit(main())

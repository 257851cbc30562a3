"""The paper's three claims as figures (issue 25): each part writes NAME.png and NAME.json under docs/figures/.

- tradeoff  time and memory against L for SLiM at C in {16, 64, 256, 1024}, full backprop (= SLiM at C = L) and
            per-layer activation checkpointing: d 256, 3 layers, L 1k to 64k (the paper's Figure 3).
- reach     at 500 MB, 1 GB and 2 GB of resident memory, the longest L (doubling from 1k) each method trains in
            one step, each (method, L) in a fresh process whose peak RSS (VmHWM) is read; SLiM up to 1M tokens.
- compat    backward compatibility (the paper's Figure 4): the small recipe trained on ptb.valid from one
            initialisation with full backprop, with SLiM at two C and in the fine-tuning regime (full backprop,
            then SLiM at a small C); held-out bpc on ptb.test against steps, and the weights' largest difference.
- onestep   the paper's section 4 protocol: one plain-SGD step on each window's first half, the second half's bpc
            before and after, for C in {full, 256, 16}.

    python benchmarks/figures.py tradeoff|reach|compat|onestep|all [--quick]

Timings are taken alone (nothing else running). `--quick` runs every part at toy sizes into
benchmarks/out/figures-quick/ (a smoke test of the plotting and the JSON; CI runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FIGURES = ROOT / "docs" / "figures"
QUICK_OUT = ROOT / "benchmarks" / "out" / "figures-quick"
MB = 1e6
torch.set_num_threads(min(2, os.cpu_count() or 1))

from slimtune.config import PerformerConfig  # noqa: E402
from slimtune.pretrained import PerformerLM  # noqa: E402

PAPER_CPU = PerformerConfig(hidden_dim=256, n_layers=3, ffn_dim=1024, n_heads=4, feature_type="sqr")


def machine() -> str:
    """The CPU's model name (platform.processor() is empty on Linux), threads and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def command(args) -> str:
    return "python benchmarks/figures.py " + " ".join(sys.argv[1:])


def save(out: Path, name: str, fig, payload: dict, caption: str) -> None:
    """NAME.png (with the caption under the plot) and NAME.json."""
    out.mkdir(parents=True, exist_ok=True)
    fig.text(0.01, 0.005, caption, fontsize=7, color="dimgray", ha="left", va="bottom", wrap=True)
    fig.savefig(out / f"{name}.png", dpi=110)
    (out / f"{name}.json").write_text(json.dumps({"caption": caption, **payload}, indent=2) + "\n")
    print(f"wrote {out / name}.png and .json", flush=True)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def random_model(config: PerformerConfig, seed: int = 0) -> PerformerLM:
    torch.manual_seed(seed)
    model = PerformerLM(config)
    model.redraw_features(torch.Generator().manual_seed(seed))
    return model


# -- 1. time and memory against C and L ------------------------------------------------------------------------------


def tradeoff(args) -> None:
    from slimtune.bench import CHECKPOINTED, FULL, Method, run_bench

    lengths = [256, 512, 1024] if args.quick else [1024 * 2**i for i in range(7)]  # 1k .. 64k
    chunks = [16, 64] if args.quick else [16, 64, 256, 1024]
    small_c_cap = 512 if args.quick else 16384  # C = 16 beyond this would take most of the ten minutes alone
    config = PerformerConfig(hidden_dim=32, n_layers=2, ffn_dim=64, n_heads=2) if args.quick else PAPER_CPU
    model = random_model(config)
    results, started = [], time.time()
    for L in lengths:
        methods = [Method(FULL, L), Method(CHECKPOINTED, L)]
        methods += [Method("SLiM", c) for c in chunks if c < L and (c > 16 or L <= small_c_cap)]
        windows = torch.randint(0, 256, (1, L + 1), generator=torch.Generator().manual_seed(L))
        rows = run_bench(model, windows, methods, steps=1, warmup=0)
        for m, r in zip(methods, rows, strict=True):
            results.append({"method": m.label, "chunk_size": m.chunk_size, "seq_len": L, "seconds": r.median_s,
                            "peak_bytes": r.peak_bytes, "error": r.error})  # fmt: skip
        print(f"L {L}: " + ", ".join(f"{r.method} {r.median_s:.2f} s {r.peak_bytes / MB:.0f} MB" for r in rows),
              flush=True)  # fmt: skip
    seconds = time.time() - started
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = [FULL, CHECKPOINTED] + [f"SLiM C={c}" for c in chunks]
    for label in labels:
        points = [r for r in results if r["method"] == label and r["seconds"] is not None]
        style = {"linestyle": "--", "color": "black"} if label == FULL else \
            {"linestyle": ":", "color": "gray"} if label == CHECKPOINTED else {"linestyle": "-"}  # fmt: skip
        for ax, key, scale in ((ax_t, "seconds", 1.0), (ax_m, "peak_bytes", 1 / MB)):
            ax.plot([r["seq_len"] for r in points], [r[key] * scale for r in points], marker="o", label=label, **style)
    for ax, unit in ((ax_t, "step time, s (forward + backward)"), (ax_m, "peak tensor memory, MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"SLiM against full backprop and layer checkpointing, d {config.hidden_dim}, {config.n_layers} layers")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    caption = (f"{command(args)} | model d {config.hidden_dim}, {config.n_layers} layers, ffn {config.ffn_dim}, "
               f"sqr, batch 1, random init, random tokens, no optimizer | {machine()} | {seconds:.0f} s | "
               "memory: peak tensor bytes (weights, gradients, activations); "
               f"C = 16 only up to L = {small_c_cap}")  # fmt: skip
    save(args.out, "tradeoff", fig, {"config": config.to_dict(), "results": results, "seconds": seconds}, caption)


# -- 2. reach under a budget -----------------------------------------------------------------------------------------


def reach_worker(method: str, L: int, C: int) -> dict:
    """One step (+ adam) of `method` at L in this fresh process; its peak RSS and seconds."""
    from slimtune.bench import checkpointed_step
    from slimtune.memory import peak_rss, set_heap_policy
    from slimtune.slim import slim_step

    set_heap_policy("tight")  # every method under the heap `fit` uses when memory is tight (memory.py)

    config = PerformerConfig(**json.loads(os.environ["FIGURES_CONFIG"]))
    model = random_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
    windows = torch.randint(0, 256, (1, L + 1), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    if method == "checkpointing":
        checkpointed_step(model, windows)
    else:
        slim_step(model, windows, L if method == "full" else C)
    optimizer.step()
    return {"peak_rss": peak_rss(), "seconds": time.perf_counter() - started}


def reach(args) -> None:
    budgets = [("500 MB", 500e6), ("1 GB", 1e9), ("2 GB", 2e9)]
    config = PerformerConfig(hidden_dim=32, n_layers=2, ffn_dim=64, n_heads=2) if args.quick else PAPER_CPU
    cap = 4096 if args.quick else 2**20
    C = 64 if args.quick else 256
    env = {**os.environ, "FIGURES_CONFIG": json.dumps(config.to_dict()), "PYTHONPATH": str(ROOT)}
    runs, started = [], time.time()

    def run(method, L):
        done = subprocess.run([sys.executable, __file__, "--reach-worker", method, str(L), str(C)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"reach {method} L {L}: {done.stderr[-800:]}")
        result = {"method": method, "seq_len": L, **json.loads(done.stdout.strip().splitlines()[-1])}
        runs.append(result)
        print(f"{method} L {L}: {result['peak_rss'] / MB:.0f} MB, {result['seconds']:.2f} s", flush=True)
        return result

    for method in ("full", "checkpointing"):  # double until over the largest budget (or the cap)
        L = 1024
        while L <= cap and run(method, L)["peak_rss"] <= budgets[-1][1]:
            L *= 2
    for L in [1024, cap] if args.quick else [1024, 16384, 131072, cap]:  # SLiM's memory is flat in L
        run("slim", L)
    seconds = time.time() - started
    table = []
    for name, budget in budgets:
        for method in ("full", "checkpointing", "slim"):
            fits = [r for r in runs if r["method"] == method and r["peak_rss"] <= budget]
            best = max(fits, key=lambda r: r["seq_len"], default=None)
            table.append({"budget": name, "budget_bytes": budget, "method": method,
                          "longest_seq_len": best["seq_len"] if best else None,
                          "us_per_token": best["seconds"] / best["seq_len"] * 1e6 if best else None,
                          "peak_rss": best["peak_rss"] if best else None})  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    names = {"full": "full backprop", "checkpointing": "layer checkpointing", "slim": f"SLiM C={C}"}
    width = 0.27
    for i, method in enumerate(("full", "checkpointing", "slim")):
        rows = [t for t in table if t["method"] == method]
        xs = [j + (i - 1) * width for j in range(len(budgets))]
        ys = [t["longest_seq_len"] or 0 for t in rows]
        bars = ax.bar(xs, ys, width, label=names[method])
        for bar, t in zip(bars, rows, strict=True):
            if t["longest_seq_len"]:
                label = f"{_tokens(t['longest_seq_len'])}\n{t['us_per_token']:.0f} us/tok"
                ax.text(bar.get_x() + width / 2, bar.get_height() * 1.08, label, ha="center", fontsize=7)
    ax.set_yscale("log", base=2)
    ax.set_ylim(512, cap * 8)
    ax.axhline(cap, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(budgets)), [f"{n} resident" for n, _ in budgets])
    ax.set_ylabel("longest L trained in one step")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Reach under a memory budget (one step + Adam; dotted: the search's cap, {_tokens(cap)})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    slim_lengths = ", ".join(_tokens(r["seq_len"]) for r in runs if r["method"] == "slim")
    caption = (f"{command(args)} | model d {config.hidden_dim}, {config.n_layers} layers, random init, random tokens, "
               f"adam | {machine()} | {seconds:.0f} s | memory: peak RSS (VmHWM) of a fresh process per (method, L), "
               f"the tight heap for all; L doubles from 1k; SLiM measured at L = {slim_lengths}")  # fmt: skip
    save(args.out, "reach", fig, {"config": config.to_dict(), "chunk_size": C, "runs": runs, "table": table,
                                  "seconds": seconds}, caption)  # fmt: skip


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}k" if n >= 1024 else str(n)


# -- 3. backward compatibility ---------------------------------------------------------------------------------------


def compat(args) -> None:
    from slimtune.data import batches, read_bytes
    from slimtune.evaluation import evaluate
    from slimtune.recipes import load_recipe
    from slimtune.slim import slim_step

    recipe = load_recipe("small")
    config = recipe.model
    L, B = (64, 2) if args.quick else (int(recipe.train["seq_len"]), int(recipe.train["batch_size"]))
    steps = 6 if args.quick else args.compat_steps
    every = 2 if args.quick else 25
    small_c, large_c = (8, 32) if args.quick else (16, 64)
    eval_bytes = 4000 if args.quick else 100_000
    train, test = read_bytes(DATA / "ptb.valid.txt"), read_bytes(DATA / "ptb.test.txt")
    regimes = {"full backprop": lambda step: L, f"SLiM C={large_c}": lambda step: large_c,
               f"SLiM C={small_c}": lambda step: small_c,
               f"full, then SLiM C={small_c} (from step {steps // 2})":
                   lambda step: L if step < steps // 2 else small_c}  # fmt: skip
    curves, finals, started = {}, {}, time.time()
    for name, chunk_at in regimes.items():
        model = random_model(config, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(recipe.train["lr"]), foreach=False)
        curve = [(0, evaluate(model, test, seq_len=L, max_bytes=eval_bytes).bpc)]
        t0 = time.time()
        for step, windows in enumerate(batches(train, seq_len=L, batch_size=B, steps=steps, seed=0)):
            slim_step(model, windows, chunk_at(step))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % every == 0:
                curve.append((step + 1, evaluate(model, test, seq_len=L, max_bytes=eval_bytes).bpc))
        curves[name] = curve
        finals[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"{name}: bpc {curve[0][1]:.4f} -> {curve[-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - started
    base = finals["full backprop"]
    differences = {name: max((w[k] - base[k]).abs().max().item() for k in base) for name, w in finals.items()}
    bpc_gaps = {name: max(abs(a[1] - b[1]) for a, b in zip(c, curves["full backprop"], strict=True))
                for name, c in curves.items()}  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = ["o", "s", "^", "x"]
    for (name, curve), marker in zip(curves.items(), markers, strict=True):
        label = f"{name}: largest weight difference {differences[name]:.1e}" if name != "full backprop" else name
        ax.plot(*zip(*curve, strict=True), marker=marker, markersize=5, fillstyle="none", label=label, linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out bpc (ptb.test)")
    ax.legend(fontsize=8)
    ax.set_title("Training with SLiM at any C gives the model full backprop gives")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    caption = (f"{command(args)} | recipe small (d 128, 2 layers, L {L}, batch {B}, adam lr {recipe.train['lr']}), "
               f"one initialisation and seed | train ptb.valid, held-out ptb.test ({eval_bytes:,} bytes) | "
               f"{machine()} | {seconds:.0f} s")  # fmt: skip
    payload = {"curves": curves, "largest_weight_difference": differences, "largest_bpc_gap": bpc_gaps,
               "steps": steps, "seconds": seconds}  # fmt: skip
    save(args.out, "compat", fig, payload, caption)


# -- 4. one-step fine-tuning -----------------------------------------------------------------------------------------


def onestep(args) -> None:
    from slimtune.data import batches, read_bytes
    from slimtune.evaluation import adapt_one_step
    from slimtune.recipes import load_recipe
    from slimtune.slim import slim_step

    recipe = load_recipe("small")
    steps = 4 if args.quick else args.pretrain_steps
    seq_len, windows = (64, 2) if args.quick else (1024, 16)
    sizes = [("full", "full"), ("C=16", 16)] if args.quick else [("full", "full"), ("C=256", 256), ("C=16", 16)]
    started = time.time()
    model = random_model(recipe.model, seed=0)  # pretrained here on ptb.valid, adapted to wikitext2.valid
    optimizer = torch.optim.Adam(model.parameters(), lr=float(recipe.train["lr"]), foreach=False)
    for w in batches(read_bytes(DATA / "ptb.valid.txt"), seq_len=256, batch_size=8, steps=steps, seed=0):
        slim_step(model, w, 256)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    pretrain_seconds = time.time() - started
    held_out = read_bytes(DATA / "wikitext2.valid.txt")
    results = {}
    for name, C in sizes:
        t0 = time.time()
        r = adapt_one_step(model, held_out, seq_len=seq_len, windows=windows, lr=args.lr, chunk_size=C)
        results[name] = {**r.to_json(), "seconds": time.time() - t0}
        print(f"{name}: bpc {r.bpc_before:.6f} -> {r.bpc_after:.6f}", flush=True)
    afters = [r["bpc_after"] for r in results.values()]
    spread = max(afters) - min(afters)
    digits = 15 if spread == 0 else max(0, int(-math.log10(spread)))  # decimal places the afters share
    seconds = time.time() - started
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    xs = range(len(results))
    before = [r["bpc_before"] for r in results.values()]
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="before the step", color="lightgray")
    bars = ax.bar([x + 0.2 for x in xs], afters, 0.4, label="after one SGD step on the first half")
    for bar, value in zip(bars, afters, strict=True):
        ax.text(bar.get_x() + 0.2, value * 1.005, f"{value:.5f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), ["full backprop" if n == "full" else f"SLiM {n}" for n in results])
    ax.set_ylim(min(afters) * 0.97, max(before) * 1.04)
    ax.set_ylabel("bpc of the windows' second halves")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set_title(f"One-step fine-tuning: the same 'after' at every C (to {digits} decimal places)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    caption = (f"{command(args)} | recipe small, pretrained {steps} adam steps on ptb.valid (L 256, batch 8) | "
               f"{windows} random windows of wikitext2.valid, L {seq_len}, SGD lr {args.lr} | {machine()} | "
               f"{seconds:.0f} s")  # fmt: skip
    save(args.out, "onestep", fig, {"results": results, "after_spread": spread, "digits": digits,
                                    "pretrain_steps": steps, "pretrain_seconds": pretrain_seconds,
                                    "seconds": seconds}, caption)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["tradeoff", "reach", "compat", "onestep", "all"])
    parser.add_argument("--quick", action="store_true", help="toy sizes into benchmarks/out/figures-quick/")
    parser.add_argument("--out", type=Path, help="default docs/figures (benchmarks/out/figures-quick with --quick)")
    parser.add_argument("--compat-steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.01, help="onestep: the SGD step's learning rate")
    parser.add_argument("--reach-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reach_worker:
        method, L, C = args.reach_worker
        print(json.dumps(reach_worker(method, int(L), int(C))))
        return 0
    if args.part is None:
        parser.error("give a part: tradeoff, reach, compat, onestep or all")
    if not DATA.is_dir():
        parser.error(f"the corpora are not at {DATA}: clone the project beside ../shared")
    args.out = args.out or (QUICK_OUT if args.quick else FIGURES)
    parts = ["tradeoff", "reach", "compat", "onestep"] if args.part == "all" else [args.part]
    for part in parts:
        {"tradeoff": tradeoff, "reach": reach, "compat": compat, "onestep": onestep}[part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

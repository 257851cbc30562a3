"""What the command line shows: rich tables in a terminal and plain lines in a log, progress, warnings, one JSON
object as the last stdout line. Only cli.py calls these; no torch here."""

from __future__ import annotations

import io
import json
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .choices import LORA_COMPARED_RANK
from .cli_options import cli_message, flag_for
from .units import format_size

err = Console(stderr=True)
out = Console()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class Reporter:
    """Progress of a long job: a rich bar in a terminal; elsewhere (a log, CI, nohup) a plain line on stderr
    every `every` seconds, with the step, its figures and the time left. `started`: when the job began (the
    library call's own clock), so that the elapsed time agrees with what the call reports."""

    def __init__(self, what: str, total: int, *, transient: bool = False):
        self.what, self.total = what, total
        self.every = float(os.environ.get("SLIMTUNE_PROGRESS_SECONDS", 10))  # seconds between plain lines
        self.started = self.last = time.monotonic()
        self.bar = None
        if err.is_terminal:
            self.bar = Progress(
                TextColumn(f"[bold]{what}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=transient,
            )

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=self.total, info="")
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def update(self, done: int, info: str = "") -> None:
        if self.bar:
            self.bar.update(self.task, completed=done, info=info)
            return
        now = time.monotonic()
        if now - self.last < self.every:  # a short job prints nothing; a long one a line every `every` seconds
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        print(
            f"{self.what}: {done}/{self.total}  {info}  elapsed {elapsed:.0f} s, ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def step_info(m: dict) -> str:
    info = f"loss {m['loss']:.4f}"
    if "bpc" in m:
        info += f"  bpc {m['bpc']:.3f}"
    return info + (f"  {m['tokens_per_s']:,.0f} tok/s  C {m['chunk_size']}  peak {format_size(m['peak_memory_bytes'])}")


def warning(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {cli_message(message)}", highlight=False)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, default=str))


def console(as_json: bool) -> Console:
    return err if as_json else out


CHUNK_SOURCE = {"planned": " (auto)", "checked": " (fits the budget)", "given": "", "resumed": " (resumed)"}


def fit_table(result) -> Table:
    plan, source = result.plan, result.run.chunk_source
    table = Table(title="slimtune fit", show_header=False)
    for key, value in (
        ("device", result.device),
        ("seq len / batch", f"{result.seq_len} / {result.batch_size}"),
        ("chunk size C", f"{result.chunk_size}{CHUNK_SOURCE.get(source, f' ({source})')}"),
        ("why this C", plan.reason if plan and plan.reason and source == "planned" else "-"),
        ("resumed from step", str(result.first_step) if result.first_step else "-"),
        ("budget", format_size(plan.budget_bytes) if plan else "-"),
        ("predicted peak", format_size(plan.predicted_peak_bytes) if plan else "-"),
        ("measured peak", f"{format_size(result.peak_memory_bytes)} ({result.memory_counts})"),
        ("steps", str(result.steps)),
        ("loss first -> last", f"{result.loss:.4f} -> {result.final_loss:.4f} nats/token"),
        (
            "held-out bpc",
            f"{result.metrics['bpc']:.4f} over {result.metrics['bpc_bytes']:,} bytes (seq len {result.seq_len})"
            if "bpc" in result.metrics
            else "-",
        ),
        ("CPU threads", str(result.threads) if result.device == "cpu" else "-"),
        ("run folder", str(result.run_dir)),
        ("time", f"{result.seconds:.2f} s"),
        ("written", result.out),
    ):
        table.add_row(key, value)
    return table


def budget_words(budget: int | None, predicted: int | None, peak: int) -> str:
    """What an eval or generate said about memory: the budget it planned for (none: C was given), and its peak."""
    if budget is None:
        return f"C given without a budget; peak {format_size(peak)}"
    return f"budget {format_size(budget)} (predicted peak {format_size(predicted)}, measured {format_size(peak)})"


def eval_line(result, are_bytes: bool) -> str:
    """eval's one line: bpc of bytes, or bits per token (and per byte, where the bytes are known) of tokens."""
    if are_bytes:
        score, unit = f"bpc {result.bpc:.4f}", "bytes"
    else:
        per_byte = f" ({result.bits_per_byte:.4f} bits per byte)" if result.bits_per_byte else ""
        score, unit = f"{result.bits_per_token:.4f} bits per token{per_byte}", "tokens"
    return (
        f"{score} at seq len {result.seq_len} over {result.predicted_bytes:,} {unit}; C = {result.chunk_size}, "
        f"{plural(result.batch_size, 'sequence')} per forward, "
        + budget_words(result.budget_bytes, result.predicted_peak_bytes, result.peak_memory_bytes)
    )


def plan_caption(result) -> str:
    """What the plan's figures count and how far to trust them."""
    where = f" on {result.threads} CPU thread(s)" if result.heap else ""
    unknown = (
        "" if result.time_known else "; '?': the budget left no room to time SLiM's chunks, so their time is unknown"
    )
    caption = (
        f"Memory counts {result.memory_counts}; available {format_size(result.available_bytes)}, from "
        f"{result.available_source}. The runtime alone holds {format_size(result.breakdown.runtime)}: no budget "
        f"below it fits. Step time is relative to full backprop's (1.00x: predicted {result.seconds_full:.2f} s "
        f"here{where}), within about {result.time_uncertainty:.0%} of measured steps{unknown}"
    )
    if result.heap:
        caption += (
            f". Heap: {result.heap} ('fast': glibc keeps freed blocks for reuse, used when that fits the budget; "
            "'tight': they leave at once, at the price of page faults)"
        )
    return caption


def plan_tables(result, seq_len: int, batch_size: int, strategy: str, strategies=None) -> list[Table]:
    """The candidates (C, predicted peak, share of the budget, relative time, heap) with why C was chosen, the chosen
    C's breakdown, and (when compared) each strategy's C."""
    table = Table(
        title=f"slimtune plan: L {seq_len}, batch {batch_size}, {strategy}, budget "
        f"{format_size(result.budget_bytes)} on {result.device}\nC = {result.chunk_size}: {result.reason}",
        caption=plan_caption(result),
    )
    for col in ("C", "predicted peak", "of budget", f"time ±{result.time_uncertainty:.0%}", "heap", ""):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = "<- chosen" if c.chunk_size == result.chunk_size else ("" if c.fits else "over")
        table.add_row(
            f"{c.chunk_size}" + (" (full)" if c.chunk_size >= seq_len else ""),
            format_size(c.predicted_peak_bytes),
            f"{100 * c.share_of_budget:.0f}%",
            f"{c.relative_time:.2f}x" if result.time_known or c.chunk_size >= seq_len else "?",
            c.heap or "-",
            mark,
        )
    fixed = Table(title="predicted peak at the chosen C", show_header=False)
    for key, value in result.breakdown.to_json().items():
        fixed.add_row(key, format_size(value))
    tables = [table, fixed]
    if strategies:
        tables.append(strategies_table(strategies, seq_len, result.budget_bytes))
    return tables


def format_plan(plan, width: int = 120) -> str:
    """A Plan as text: the tables `slimtune plan` prints for it (without the strategies' comparison)."""
    text = Console(file=io.StringIO(), width=width, color_system=None)
    for table in plan_tables(plan, plan.seq_len, plan.batch_size, plan.optimizer):
        text.print(table)
    return text.file.getvalue()


def strategies_table(rows, seq_len: int, budget_bytes: int) -> Table:
    """Each parameter-memory strategy's C under the budget (chosen by the same rule as the asked one's), its
    predicted peak and step time; a strategy is named by the flags that turn the asked command into it."""
    asked = next(r.strategy for r in rows if r.asked)
    table = Table(
        title=f"strategies under {format_size(budget_bytes)}: the C of each",
        caption="s/step: predicted seconds per step at that C (same uncertainty as above). Nothing is switched "
        "on for you: add a row's flags to the command to train that way.",
    )
    table.add_column("flags to add", no_wrap=True)
    for col in ("trains", "C", "peak", "s/step"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r.chunk_size is None:
            size, peak, seconds = "none", r.note, ""
        else:
            size = f"{r.chunk_size}" + (" (full)" if r.chunk_size >= seq_len else "")
            peak, seconds = format_size(r.predicted_peak_bytes), "?" if r.seconds is None else f"{r.seconds:.2f}"
        table.add_row(_flags_to_add(asked, r.strategy), _count(r.trainable_parameters), size, peak, seconds)
    return table


def _count(n: int) -> str:
    """A parameter count in three digits: 17.5M, 393k."""
    return (
        f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)
    )


def _flags_to_add(asked, strategy) -> str:
    if strategy == asked:
        return "(as asked)"
    wanted, had = strategy.selected(), asked.selected()
    for name, default in (("lora_rank", "0"), ("base_dtype", "fp32")):  # back to the default where asked otherwise
        if name in had:
            wanted.setdefault(name, default)
    return " ".join(f"{flag_for(k)} {v}" for k, v in wanted.items() if had.get(k) != v)


def bench_table(rows, title: str) -> Table:
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    for col in ("s/step (median)", "time vs full", "peak memory", "memory vs full"):
        table.add_column(col, justify="right")
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        if r.error:
            table.add_row(r.method, r.error, "", "", "")
            continue
        table.add_row(
            r.method, f"{r.median_s:.3f}", ratio(r.vs_full_time), format_size(r.peak_bytes), ratio(r.vs_full_memory)
        )
    return table


def recipes_table(found) -> Table:
    table = Table("recipe", "model", "L", "description")
    for r in found:
        m = r.model
        table.add_row(
            r.path.stem,
            f"d {m.hidden_dim}, {m.n_layers} layers, {m.n_heads} heads, {m.feature_type}",
            str(r.train.get("seq_len", "-")),
            r.description,
        )
    return table


def inspect_tables(info: dict, title: str, tensors: bool) -> list[Table]:
    table = Table(title=title, show_header=False)
    for key, value in info["config"].items():
        table.add_row(key, str(value))
    table.add_row("tokenizer", info["tokenizer"])
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("dtypes", ", ".join(info["dtypes"]))
    table.add_row("file size", format_size(info["file_bytes"]))
    for name, cost in info["fine_tuning_bytes"].items():
        table.add_row(f"fixed cost, {name}", f"{format_size(cost)} (weights + gradients + optimizer state, measured)")
    for base, cost in info["lora_bytes"].items():
        table.add_row(
            f"fixed cost, LoRA r{LORA_COMPARED_RANK}, {base} base", f"{format_size(cost)} (base + adapters with adam)"
        )
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    if not tensors:
        return [table]
    listing = Table("tensor", "shape", "dtype", title="tensors")
    for name, (shape, dtype) in info["tensors"].items():
        listing.add_row(name, str(shape), dtype)
    return [table, listing]


def env_table(info, choice, threads_env: str) -> Table:
    table = Table(title="slimtune env", show_header=False)
    table.add_row("python / torch / CUDA", f"{info.python} / {info.torch} / {info.cuda_version or '-'}")
    table.add_row("CUDA usable", str(info.cuda_usable))
    table.add_row(
        "CPU",
        f"{info.cpu_count} cores, {format_size(info.cpu_available_bytes)} available "
        f"of {format_size(info.cpu_total_bytes)}",
    )
    table.add_row("CPU memory limit", info.cpu_limit)
    for gpu in info.gpus:
        table.add_row(
            f"cuda:{gpu.index}",
            f"{gpu.name}{' (MIG)' if gpu.mig else ''}, {format_size(gpu.free_bytes)} free "
            f"of {format_size(gpu.total_bytes)}",
        )
    if info.nvml_error:
        table.add_row("note", info.nvml_error)
    table.add_row("--device auto", info.default_device)
    table.add_row(
        "CPU threads",
        f"{choice.count} ({cli_message(choice.reason)}; followed during a run; --threads or {threads_env} fixes "
        "the count)",
    )
    table.add_row("CPU heap", "fit and pretrain: tight while planning, then fast when the run's peak fits that way")
    return table

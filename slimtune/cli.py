"""The `slimtune` command line. Each command parses its flags, calls one library function and renders the
result (rich tables and progress bars in a terminal, plain progress lines in a log, one JSON object as the last
stdout line with --json). Library errors (SlimtuneError) and usage errors become one line on stderr, exit code 2;
the named choices are enums that click validates and lists in --help."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .choices import (
    Adapt,
    BenchOptimizer,
    ExportDtype,
    ExportFormat,
    LayerNorm,
    Optimizer,
    Precision,
    Recovery,
    Schedule,
    Task,
)
from .errors import ConfigError, DataError, SlimtuneError
from .units import format_size

app = typer.Typer(
    name="slimtune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)
out = Console()

# Options shared by several commands, declared once.
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Model: a .safetensors checkpoint, an hf folder, or a .pt/.pth/.bin state dict. (required)",
        show_default=False,
    ),
]
DataFile = Annotated[
    Path | None, typer.Option("--data", help="Text: a file of raw bytes. (required)", show_default=False)
]
SeqLen = Annotated[int, typer.Option("--seq-len", min=1, help="L: bytes per training window.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per step.")]
Budget = Annotated[
    str | None,
    typer.Option(
        "--mem-budget",
        help="Memory the job may hold in all (weights, gradients, optimizer state, one chunk's activations, states, "
        "runtime): a size (2GB = 2e9 bytes, 1.5GiB, 512MB) or a share of free memory (80%). "
        "Default: free memory less 10%.",
        show_default=False,
    ),
]
OptimizerOpt = Annotated[Optimizer, typer.Option("--optimizer", help="sgd (plain, no momentum), adam or adamw.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda if usable), cpu, cuda or cuda:N.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
NHeads = Annotated[
    int | None,
    typer.Option("--n-heads", min=1, help="Heads, for checkpoints without slimtune_config.", show_default=False),
]
FeatureType = Annotated[
    str | None,
    typer.Option(
        "--feature-type",
        help="sqr, relu, elu+1, abs, favor+ or favor+_N, for checkpoints without slimtune_config.",
        show_default=False,
    ),
]
LayerNormOpt = Annotated[
    LayerNorm | None,
    typer.Option("--layernorm", help="post or pre, for checkpoints without slimtune_config.", show_default=False),
]
DtypeOpt = Annotated[
    ExportDtype, typer.Option("--dtype", help="Dtype of the written weights: auto keeps each tensor's input dtype.")
]
FormatOpt = Annotated[
    ExportFormat,
    typer.Option("--format", help="safetensors (one file) or hf (a folder with model.safetensors and config.json)."),
]
RecoveryOpt = Annotated[
    Recovery,
    typer.Option(
        "--state-recovery",
        help="How SLiM recovers each chunk's start states: subtract64 (the paper's subtraction with float64 states; "
        "exact, O(1) memory), subtract (the paper as published, fp32 states), store (keep every boundary state).",
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Compute precision: fp32, or bf16 (autocast: bf16 matmuls; fp32 weights, gradients, "
        "attention states and loss; no loss scaling needed).",
    ),
]
ChunkSize = Annotated[
    str,
    typer.Option(
        "--chunk-size", help="C: 'auto' picks the largest that fits --mem-budget; C >= L is ordinary backprop."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads (also SLIMTUNE_THREADS). Default: the cores other processes leave free (see slimtune env).",
        show_default=False,
    ),
]


RunDir = Annotated[
    Path | None,
    typer.Option(
        "--run-dir", help="Run folder for metrics.jsonl and resumable state (default: OUT.run).", show_default=False
    ),
]
SaveEvery = Annotated[
    int, typer.Option("--save-every", min=0, help="Save resumable state every N steps (and on Ctrl-C).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run saved in the run folder.")]
Restart = Annotated[
    bool, typer.Option("--restart", help="Start over although the run folder holds a saved run (moved aside, kept).")
]


def _run_folder(run_dir: Path | None, out: Path, save_every: int, resume: bool, restart: bool) -> dict:
    """The run-folder options of fit and pretrain; the folder defaults to OUT.run."""
    return dict(run_dir=str(run_dir or Path(f"{out}.run")), save_every=save_every, resume=resume, restart=restart)


def _train(what: str, options, call):
    """Run a training library call with progress; on Ctrl-C or SIGTERM say where the saved state is and exit
    128 + the signal's number."""
    from .runs import RunFolder

    if options.resume and options.run_dir and RunFolder(options.run_dir).has_state():
        err.print(f"resuming the run in {options.run_dir} ({RunFolder(options.run_dir).summary()})")
    with _Reporter(what, options.total_steps) as progress:
        try:
            return call(lambda step, m: progress.update(step, _step_info(m)))
        except KeyboardInterrupt:
            print(
                f"slimtune: interrupted; the run state is in {options.run_dir}: add --resume to the same command "
                "to continue",
                file=sys.stderr,
            )
            raise typer.Exit(128 + _stopped_by) from None


def _use_threads(value: int | None = None) -> None:
    """The CPU threads of a command that computes: --threads, SLIMTUNE_THREADS, else the free cores."""
    from . import threads

    threads.apply(threads.choose(value).count)


def _require(command: str, **given) -> None:
    """All missing required options in one line (click would name only the first)."""
    missing = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(f"slimtune {command} needs {' and '.join(missing)} (see 'slimtune {command} --help')")


def _model_flags(n_heads, feature_type, layernorm) -> dict:
    return {"n_heads": n_heads, "feature_type": feature_type, "layernorm": layernorm}


class _Reporter:
    """Progress of a long job: a rich bar in a terminal; elsewhere (a log, CI, nohup) a plain line on stderr
    every `every` seconds, with the step, its figures and the time left."""

    def __init__(self, what: str, total: int, *, transient: bool = False):
        self.what, self.total = what, total
        self.every = float(os.environ.get("SLIMTUNE_PROGRESS_SECONDS", 10))  # seconds between plain lines
        self.tty = err.is_terminal
        self.started = self.last = time.monotonic()
        self.bar = None
        if self.tty:
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


def _step_info(m: dict) -> str:
    info = f"loss {m['loss']:.4f}"
    if "bpc" in m:
        info += f"  bpc {m['bpc']:.3f}"
    return info + (f"  {m['tokens_per_s']:,.0f} tok/s  C {m['chunk_size']}  peak {format_size(m['peak_memory_bytes'])}")


def _warning(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def _emit_json(obj: dict) -> None:
    print(json.dumps(obj, default=str))


def _console(as_json: bool) -> Console:
    return err if as_json else out


def version_callback(value: bool):
    if value:
        print(f"slimtune {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
):
    """Fine-tune Performer language models on small devices with SLiM: exact gradients, memory O(C) instead of O(L).

    Start with [bold]slimtune demo[/bold]. Typical use:

      slimtune plan --checkpoint model.safetensors --seq-len 16384 --mem-budget 2GB
      slimtune fit --checkpoint model.safetensors --data my.txt --mem-budget 2GB --out tuned.safetensors
    """


@app.command()
def fit(
    checkpoint: Checkpoint = None,
    data: DataFile = None,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write the fine-tuned checkpoint. Default: NAME-tuned.safetensors beside the input "
            "(never overwriting a file).",
            show_default=False,
        ),
    ] = None,
    mem_budget: Budget = None,
    chunk_size: ChunkSize = "auto",
    seq_len: SeqLen = 1024,
    batch_size: BatchSize = 1,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps on seeded random windows.")] = 1,
    one_step: Annotated[
        bool,
        typer.Option(
            "--one-step",
            help="Exactly one step on the first batch (row b = bytes [bL, bL+L+1)), as in the paper's on-device "
            "experiment.",
        ),
    ] = False,
    optimizer: OptimizerOpt = Optimizer.ADAM,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-3,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay",
            help="Weight decay of the weight matrices (never LayerNorm gains or biases). "
            "Default: 0.01 with adamw, else 0.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for window sampling and FAVOR+ draws.")] = 0,
    device: Device = "auto",
    schedule: Annotated[
        Schedule, typer.Option("--schedule", help="Learning rate: constant, or cosine decay after the warmup.")
    ] = Schedule.CONSTANT,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Steps of linear learning-rate warmup.")] = 0,
    clip_grad: Annotated[
        float | None, typer.Option("--clip-grad", help="Clip the gradients' global norm (opt-in).", show_default=False)
    ] = None,
    accumulate: Annotated[
        int, typer.Option("--accumulate", min=1, help="Batches whose gradients make one optimizer step.")
    ] = 1,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out text scored in bits per character.", show_default=False)
    ] = None,
    eval_fraction: Annotated[
        float | None,
        typer.Option(
            "--eval-fraction",
            help="Hold out the last share of --data (e.g. 0.05) for evaluation instead of --eval-data.",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=0, help="With held-out data: bpc every N steps (0: at the end).")
    ] = 0,
    run_dir: RunDir = None,
    save_every: SaveEvery = 100,
    resume: Resume = False,
    restart: Restart = False,
    skip_nonfinite: Annotated[
        bool,
        typer.Option(
            "--skip-nonfinite", help="Skip (and count) steps with a non-finite loss or gradient instead of stopping."
        ),
    ] = False,
    recovery: RecoveryOpt = Recovery.SUBTRACT64,
    precision: PrecisionOpt = Precision.FP32,
    dtype: DtypeOpt = ExportDtype.AUTO,
    export_format: FormatOpt = ExportFormat.SAFETENSORS,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    threads: Threads = None,
    as_json: Json = False,
):
    """Fine-tune a checkpoint on a text file with SLiM and export weights the original model loads unchanged.

    Example: slimtune fit --checkpoint model.safetensors --data my.txt --mem-budget 2GB --out tuned.safetensors
    """
    from .checkpoint import default_out, load_checkpoint
    from .recipes import parse_chunk_size
    from .train import FitOptions
    from .train import fit as run_fit

    _require("fit", checkpoint=checkpoint, data=data)
    target = out_path or default_out(checkpoint, export_format)
    options = FitOptions(
        seq_len=seq_len,
        batch_size=batch_size,
        steps=steps,
        one_step=one_step,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        chunk_size=parse_chunk_size(chunk_size, seq_len),
        mem_budget=mem_budget,
        seed=seed,
        device=device,
        recovery=recovery,
        precision=precision,
        dtype=dtype,
        format=export_format,
        schedule=schedule,
        warmup=warmup,
        clip_grad=clip_grad,
        accumulate=accumulate,
        eval_every=eval_every,
        skip_nonfinite=skip_nonfinite,
        threads=threads,
        **_run_folder(run_dir, target, save_every, resume, restart),
    )
    ckpt = load_checkpoint(checkpoint, **_model_flags(n_heads, feature_type, layernorm))
    result = _train(
        "fit",
        options,
        lambda on_step: run_fit(
            ckpt,
            data,
            target,
            options,
            eval_data=eval_data,
            eval_fraction=eval_fraction,
            on_step=on_step,
            on_warning=_warning,
        ),
    )
    plan = result.plan
    table = Table(title="slimtune fit", show_header=False)
    for key, value in (
        ("device", result.device),
        ("seq len / batch", f"{result.seq_len} / {result.batch_size}"),
        (
            "chunk size C",
            f"{result.chunk_size}"
            + ((" (auto)" if options.chunk_size is None else " (fits the budget)") if plan else ""),
        ),
        ("resumed from step", str(result.first_step) if result.first_step else "-"),
        ("budget", format_size(plan["budget_bytes"]) if plan else "-"),
        ("predicted peak", format_size(plan["predicted_peak_bytes"]) if plan else "-"),
        ("measured peak", f"{format_size(result.peak_memory_bytes)} ({result.memory_counts})"),
        ("steps", str(result.steps)),
        ("loss first -> last", f"{result.loss:.4f} -> {result.final_loss:.4f} nats/byte"),
        (
            "held-out bpc",
            f"{result.metrics['bpc']:.4f} over {result.metrics['bpc_bytes']:,} bytes"
            if "bpc" in result.metrics
            else "-",
        ),
        ("CPU threads", str(result.threads) if result.device == "cpu" else "-"),
        ("run folder", options.run_dir),
        ("time", f"{result.seconds:.2f} s"),
        ("written", result.out),
    ):
        table.add_row(key, value)
    _console(as_json).print(table)
    if as_json:
        _emit_json(result.to_json())


def _plan_caption(result) -> str:
    """What the plan's figures count and how far to trust them."""
    where = f" on {result.threads} CPU thread(s)" if result.heap else ""
    caption = (
        f"Memory counts {result.memory_counts}; available {format_size(result.available_bytes)}, from "
        f"{result.available_source}. The runtime alone holds {format_size(result.breakdown['runtime'])}: no budget "
        f"below it fits. Step time is relative to full backprop's (1.00x: predicted {result.seconds_full:.2f} s "
        f"here{where}), within about {result.time_uncertainty:.0%} of measured steps"
    )
    if result.heap:
        caption += (
            f". Heap: {result.heap} ('fast': glibc keeps freed blocks for reuse, used when that fits the budget; "
            "'tight': they leave at once, at the price of page faults)"
        )
    return caption


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror}); pass an existing file") from None


@app.command()
def plan(
    checkpoint: Checkpoint = None,
    seq_len: SeqLen = 1024,
    mem_budget: Budget = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="The data files the run will read (training and held-out; repeat the flag): fit holds them "
            "resident, so their sizes count.",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchSize = 1,
    optimizer: OptimizerOpt = Optimizer.ADAM,
    device: Device = "auto",
    recovery: RecoveryOpt = Recovery.SUBTRACT64,
    precision: PrecisionOpt = Precision.FP32,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    threads: Threads = None,
    as_json: Json = False,
):
    """Predict peak memory and relative step time for each chunk size C, and pick the largest C that fits.

    Example: slimtune plan --checkpoint model.safetensors --seq-len 16384 --mem-budget 2GB
    """
    from .model import PerformerLM
    from .planner import plan as run_plan

    _require("plan", checkpoint=checkpoint)
    _use_threads(threads)
    model = PerformerLM.from_pretrained(checkpoint, device=device, **_model_flags(n_heads, feature_type, layernorm))
    result = run_plan(
        model,
        seq_len=seq_len,
        batch_size=batch_size,
        mem_budget=mem_budget,
        optimizer=optimizer,
        recovery=recovery,
        precision=precision,
        data_bytes=sum(_file_size(path) for path in data or ()),
    )
    table = Table(
        title=f"slimtune plan: L {seq_len}, batch {batch_size}, {optimizer}, budget "
        f"{format_size(result.budget_bytes)} on {result.device}",
        caption=_plan_caption(result),
    )
    for col in ("C", "predicted peak", "of budget", f"time ±{result.time_uncertainty:.0%}", "heap", ""):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = "<- chosen" if c.chunk_size == result.chunk_size else ("" if c.fits else "over")
        table.add_row(
            f"{c.chunk_size}" + (" (full)" if c.chunk_size >= seq_len else ""),
            format_size(c.predicted_peak_bytes),
            f"{100 * c.share_of_budget:.0f}%",
            f"{c.relative_time:.2f}x",
            c.heap or "-",
            mark,
        )
    fixed = Table(title="predicted peak at the chosen C", show_header=False)
    for key, value in result.breakdown.items():
        fixed.add_row(key, format_size(value))
    console = _console(as_json)
    console.print(table)
    console.print(fixed)
    if as_json:
        _emit_json(result.to_json())


@app.command()
def pretrain(
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write the new .safetensors checkpoint. (required)", show_default=False),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="A recipe name (see `slimtune recipes`) or .toml path; flags override it.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Training text (not needed for the copy task).", show_default=False)
    ] = None,
    task: Annotated[
        Task | None,
        typer.Option("--task", help="text, or copy: the paper's synthetic copying task.", show_default=False),
    ] = None,
    hidden_dim: Annotated[
        int | None,
        typer.Option("--hidden-dim", min=4, help="d (a multiple of 4 and of --n-heads).", show_default=False),
    ] = None,
    n_layers: Annotated[int | None, typer.Option("--n-layers", min=1, help="Layers.", show_default=False)] = None,
    ffn_dim: Annotated[
        int | None, typer.Option("--ffn-dim", min=1, help="Feed-forward width (default 4d).", show_default=False)
    ] = None,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="L (default 256).", show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Windows per step (default 8).", show_default=False)
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Optimizer steps (default 500).", show_default=False)
    ] = None,
    optimizer: Annotated[
        Optimizer | None, typer.Option("--optimizer", help="sgd, adam (default) or adamw.", show_default=False)
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default 0.002).", show_default=False)] = None,
    chunk_size: Annotated[
        str | None,
        typer.Option(
            "--chunk-size",
            help="full (ordinary backprop, default), auto (largest that fits --mem-budget) or N.",
            show_default=False,
        ),
    ] = None,
    mem_budget: Budget = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation, data order and FAVOR+ draws.")] = 0,
    device: Device = "auto",
    precision: PrecisionOpt = Precision.FP32,
    run_dir: RunDir = None,
    save_every: SaveEvery = 100,
    resume: Resume = False,
    restart: Restart = False,
    threads: Threads = None,
    as_json: Json = False,
):
    """Train a Performer from scratch (the server side) and write a contract checkpoint.

    Examples: slimtune pretrain --recipe small --data ../shared/data/tinyshakespeare.txt --out small.safetensors
              slimtune pretrain --recipe copy --out copy.safetensors
    """
    from .recipes import resolve
    from .train import FitOptions
    from .train import pretrain as run_pretrain

    _require("pretrain", out=out_path)
    config, settings = resolve(
        recipe,
        {
            "hidden_dim": hidden_dim,
            "n_layers": n_layers,
            "ffn_dim": ffn_dim,
            "n_heads": n_heads,
            "feature_type": feature_type,
            "layernorm": layernorm,
        },
        {
            "task": task,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "steps": steps,
            "optimizer": optimizer,
            "lr": lr,
            "chunk_size": chunk_size,
        },
    )
    options = FitOptions(
        **settings,
        mem_budget=mem_budget,
        seed=seed,
        device=device,
        precision=precision,
        threads=threads,
        **_run_folder(run_dir, out_path, save_every, resume, restart),
    )
    result = _train(
        "pretrain",
        options,
        lambda on_step: run_pretrain(config, data, out_path, options, on_step=on_step, on_warning=_warning),
    )
    summary = (
        f"{result.steps} steps, loss {result.loss:.4f} -> {result.final_loss:.4f}, C = {result.chunk_size}, "
        f"{result.seconds:.1f} s -> {result.out}"
    )
    for key, value in result.metrics.items():
        summary += f"; {key} {value:.4f}"
    _console(as_json).print(summary)
    if as_json:
        _emit_json(result.to_json())


def _int_list(value: str, flag: str) -> list[int]:
    try:
        found = [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"{flag} must be integers separated by commas, e.g. 1024,256,64,16; got {value!r}") from None
    if not found or min(found) < 1:
        raise ConfigError(f"{flag} must be integers >= 1 separated by commas, e.g. 1024,256,64,16; got {value!r}")
    return found


@app.command()
def bench(
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Model to measure: a .safetensors checkpoint.", show_default=False),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe", help="Or a recipe's model, randomly initialised (see `slimtune recipes`).", show_default=False
        ),
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=2, help="L. Default: the recipe's, else 1024.", show_default=False)
    ] = None,
    batch_size: BatchSize = 1,
    chunks: Annotated[
        str, typer.Option("--chunks", help="SLiM chunk sizes to measure, comma-separated; sizes >= L are skipped.")
    ] = "1024,256,64,16",
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Timed steps per method; the table shows their median.")
    ] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps per method first.")] = 1,
    optimizer: Annotated[
        BenchOptimizer,
        typer.Option(
            "--optimizer",
            help="none (gradients only), sgd, adam or adamw: its update and state count in time and memory.",
        ),
    ] = BenchOptimizer.NONE,
    precision: PrecisionOpt = Precision.FP32,
    device: Device = "auto",
    recovery: RecoveryOpt = Recovery.SUBTRACT64,
    full: Annotated[
        bool, typer.Option("--full/--no-full", help="Measure full backprop (the reference for the ratios).")
    ] = True,
    checkpointing: Annotated[
        bool,
        typer.Option(
            "--checkpointing/--no-checkpointing", help="Measure full backprop with per-layer activation checkpointing."
        ),
    ] = True,
    emulate: Annotated[
        str | None,
        typer.Option(
            "--emulate-memory",
            help="CUDA only: cap this process at a smaller card's memory (e.g. 2GB), as "
            "torch.cuda.set_per_process_memory_fraction does.",
            show_default=False,
        ),
    ] = None,
    plot_path: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw time and memory against C into this .png (needs matplotlib: pip install 'slimtune[plot]').",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the random token windows (and of a recipe's weights).")
    ] = 0,
    threads: Threads = None,
    as_json: Json = False,
):
    """Measure step time and peak memory of SLiM at each C, full backprop and activation checkpointing, side by side.

    Examples: slimtune bench --recipe config-2 --chunks 1024,256,64,16
              slimtune bench --checkpoint model.safetensors --seq-len 8192 --plot tradeoff.png --json
    """
    import torch

    from .bench import check_plot_path, methods_for, plot, rows_json, run_bench, setup

    check_plot_path(plot_path)
    _use_threads(threads)
    sizes = _int_list(chunks, "--chunks")
    run = setup(
        checkpoint=checkpoint,
        recipe=recipe,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        seed=seed,
        emulate_memory=emulate,
    )
    model, windows, length, dev = run.model, run.windows, run.seq_len, run.windows.device
    methods = methods_for(length, sizes, full=full, checkpointed=checkpointing)
    title = (
        f"slimtune bench: {run.name}, L = {length}, batch {batch_size}, {precision}, optimizer {optimizer.value}, {dev}"
    )
    total = len(methods) * (1 + warmup + steps)
    with _Reporter("bench", total, transient=True) as progress:
        done = iter(range(1, total + 1))
        rows = run_bench(
            model,
            windows,
            methods,
            steps=steps,
            warmup=warmup,
            precision=precision,
            optimizer=None if optimizer == BenchOptimizer.NONE else optimizer.value,
            recovery=recovery,
            on_progress=lambda: progress.update(next(done)),
        )
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
    console = _console(as_json)
    console.print(table)
    console.print(
        "peak memory: "
        + (
            "CUDA allocator peak reservation + context"
            if dev.type == "cuda"
            else "peak tensor bytes held (weights, gradients, optimizer state, activations); "
            "not resident memory, which `plan` and `fit` report"
        )
    )
    if plot_path is not None:
        plot(rows, plot_path, title)
        console.print(f"plot -> {plot_path}")
    if as_json:
        _emit_json(
            {
                "model": run.name,
                "config": model.config.to_dict(),
                "seq_len": length,
                "batch_size": batch_size,
                "precision": precision.value,
                "optimizer": optimizer.value,
                "device": str(dev),
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "memory_counts": "CUDA reserved + context" if dev.type == "cuda" else "tensor bytes",
                "torch": torch.__version__,
                "rows": rows_json(rows),
            }
        )


@app.command()
def recipes(as_json: Json = False):
    """List the recipes (the SLiM paper's configurations and a small one), each with the command that runs it."""
    from .recipes import list_recipes

    found = list_recipes()
    table = Table("recipe", "model", "L", "description")
    for r in found:
        m = r.model
        table.add_row(
            r.path.stem,
            f"d {m.hidden_dim}, {m.n_layers} layers, {m.n_heads} heads, {m.feature_type}",
            str(r.train.get("seq_len", "-")),
            r.description,
        )
    _console(as_json).print(table)
    if as_json:
        _emit_json(
            [
                {
                    "name": r.path.stem,
                    "path": str(r.path),
                    "description": r.description,
                    "model": r.model.to_dict(),
                    "train": r.train,
                }
                for r in found
            ]
        )


@app.command(name="eval")
def evaluate(
    checkpoint: Checkpoint = None,
    data: DataFile = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            min=1,
            help="Bytes per sequence (default: the checkpoint's seq_len, else 1024).",
            show_default=False,
        ),
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=2, help="Evaluate only the first N bytes.", show_default=False)
    ] = None,
    adapt: Annotated[
        Adapt | None,
        typer.Option(
            "--adapt",
            help="one-step: the paper's on-device protocol (bpc of each window's second half before and after one "
            "SGD step on its first half).",
            show_default=False,
        ),
    ] = None,
    windows: Annotated[
        int, typer.Option("--windows", min=1, help="--adapt: windows sampled from the data (seeded).")
    ] = 8,
    lr: Annotated[float, typer.Option("--lr", help="--adapt: learning rate of the SGD step (> 0).")] = 0.01,
    chunk_size: Annotated[
        str,
        typer.Option("--chunk-size", help="--adapt: C of the SLiM step, 'auto' (largest that fits --mem-budget) or N."),
    ] = "auto",
    mem_budget: Budget = None,
    seed: Annotated[int, typer.Option("--seed", help="--adapt: seed for the windows.")] = 0,
    device: Device = "auto",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    threads: Threads = None,
    as_json: Json = False,
):
    """Bits per character of a checkpoint on a text file (chunk by chunk: memory does not grow with --seq-len).

    Examples: slimtune eval --checkpoint tuned.safetensors --data valid.txt
              slimtune eval --checkpoint model.safetensors --data doc.txt --adapt one-step --seq-len 2048
    """
    from .data import read_bytes
    from .evaluation import adapt_one_step, default_seq_len, fixed_features
    from .evaluation import evaluate as run_eval
    from .model import PerformerLM
    from .recipes import parse_chunk_size

    _require("eval", checkpoint=checkpoint, data=data)
    _use_threads(threads)
    tokens = read_bytes(data, min_length=2)
    model = PerformerLM.from_pretrained(checkpoint, device=device, **_model_flags(n_heads, feature_type, layernorm))
    fixed_features(model)  # FAVOR+: a fixed draw, so eval is repeatable
    L = seq_len or default_seq_len(model)
    C = parse_chunk_size(chunk_size, max(1, L // 2))  # --adapt steps on each window's first half
    console = _console(as_json)
    if adapt is None:
        result = run_eval(model, tokens, seq_len=L, max_bytes=max_bytes)
        console.print(f"bpc {result.bpc:.4f} over {result.predicted_bytes} bytes (seq len {L})")
    else:
        with _Reporter("adapt", windows) as progress:
            result = adapt_one_step(
                model,
                tokens,
                seq_len=L,
                windows=windows,
                lr=lr,
                chunk_size=C,
                mem_budget=mem_budget,
                seed=seed,
                on_progress=lambda done, total: progress.update(done),
            )
        console.print(
            f"one-step adaptation over {windows} windows of {L} bytes, SGD lr {lr}, C = {result.chunk_size}: "
            f"second-half bpc {result.bpc_before:.4f} -> {result.bpc_after:.4f} ({result.difference:+.4f})"
        )
    if as_json:
        _emit_json(result.to_json())


@app.command()
def generate(
    checkpoint: Checkpoint = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = "The ",
    n_bytes: Annotated[int, typer.Option("--bytes", min=0, help="How many bytes to sample.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Sample among the k likeliest bytes.", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: Device = "auto",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    threads: Threads = None,
    as_json: Json = False,
):
    """Sample a continuation of a prompt in recurrent mode (constant memory per new byte).

    Example: slimtune generate --checkpoint tuned.safetensors --prompt "Day 12: wind" --bytes 300
    """
    from .generation import generate as run_generate
    from .model import PerformerLM

    _require("generate", checkpoint=checkpoint)
    _use_threads(threads)
    model = PerformerLM.from_pretrained(checkpoint, device=device, **_model_flags(n_heads, feature_type, layernorm))
    text = run_generate(model, prompt, n_bytes, temperature=temperature, top_k=top_k, seed=seed)
    if as_json:
        _emit_json({"prompt": prompt, "text": text.decode("utf-8", errors="replace"), "bytes": len(text)})
    else:
        sys.stdout.write(prompt + text.decode("utf-8", errors="replace") + "\n")


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint: .safetensors, an hf folder, or .pt/.pth/.bin state dict.", show_default=False
        ),
    ],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Also list every tensor with its shape and dtype.")
    ] = False,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
    as_json: Json = False,
):
    """Show a checkpoint's config, parameter count, dtypes, size, fine-tuning memory and provenance.

    Example: slimtune inspect model.safetensors --tensors
    """
    from .checkpoint import describe, load_checkpoint

    info = describe(load_checkpoint(path, **_model_flags(n_heads, feature_type, layernorm)))
    console = _console(as_json)
    table = Table(title=str(path), show_header=False)
    for key, value in info["config"].items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("dtypes", ", ".join(info["dtypes"]))
    table.add_row("file size", format_size(info["file_bytes"]))
    for name, cost in info["fine_tuning_bytes"].items():
        table.add_row(f"fixed cost, {name}", f"{format_size(cost)} (weights + gradients + optimizer state, fp32)")
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    console.print(table)
    if tensors:
        listing = Table("tensor", "shape", "dtype", title="tensors")
        for name, (shape, dtype) in info["tensors"].items():
            listing.add_row(name, str(shape), dtype)
        console.print(listing)
    if as_json:
        _emit_json(info)


@app.command()
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="Any accepted checkpoint: a reference state dict (.pt/.pth/.bin) or .safetensors.", show_default=False
        ),
    ],
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where to write the contract .safetensors checkpoint. (required)", show_default=False
        ),
    ] = None,
    dtype: DtypeOpt = ExportDtype.AUTO,
    export_format: FormatOpt = ExportFormat.SAFETENSORS,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNormOpt = None,
):
    """Convert a checkpoint (for example the SLiM reference code's torch.save state dict) to a contract checkpoint.

    Example: slimtune convert ref_model.pt --out model.safetensors --n-heads 8 --feature-type sqr --layernorm post
    """
    from .checkpoint import convert as run_convert

    _require("convert", out=out_path)
    ckpt = run_convert(src, out_path, dtype=dtype, fmt=export_format, **_model_flags(n_heads, feature_type, layernorm))
    written = ckpt.dtypes if dtype == ExportDtype.AUTO else [dtype.value]
    out.print(f"wrote {out_path}: {ckpt.parameters:,} parameters, {', '.join(written)}")


@app.command()
def env(as_json: Json = False):
    """Show the devices slimtune can use and their memory (CPU via psutil, NVIDIA GPUs via NVML)."""
    from . import threads
    from .devices import detect_environment
    from .memory import heap_policy

    info = detect_environment()
    choice = threads.choose()
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
        f"{choice.count} ({choice.reason}; followed during a run; --threads or {threads.ENV} fixes the count)",
    )
    table.add_row(
        "CPU heap",
        "tight while planning; a run uses fast when its peak fits that way (see `plan`)"
        if heap_policy() is not None
        else "the C library's own (not glibc: no heap policy)",
    )
    _console(as_json).print(table)
    if as_json:
        _emit_json(info.to_json() | {"threads": choice.count, "threads_reason": choice.reason})


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its data and checkpoints.")] = Path(
        "slimtune-demo"
    ),
    threads: Threads = None,
    as_json: Json = False,
):
    """The whole workflow on made-up data, no downloads: pretrain, plan, fine-tune with SLiM, compare, export.

    Pretrains a tiny Performer, plans fine-tuning under a small budget, fine-tunes with SLiM at the chosen C,
    compares bits per character before and after, exports, and reloads the export into the full model.
    """
    from .demo import run_demo

    console = _console(as_json)
    result = run_demo(workdir, say=lambda text: console.print(text), threads=threads)
    if as_json:
        _emit_json(result)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """The exception class `name` from click and from the click that newer typer releases vendor."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


USAGE_ERRORS = _click_exceptions("UsageError")
CLICK_ERRORS = _click_exceptions("ClickException")
EXITS = (typer.Exit, *_click_exceptions("Exit"))
ABORTS = (typer.Abort, *_click_exceptions("Abort"), KeyboardInterrupt)


_stopped_by = signal.SIGINT  # the signal that interrupted the run: exit code 128 + its number


def _interrupt(signum, frame):
    """SIGTERM is handled like Ctrl-C: the run saves its state and the exit code says which signal it was."""
    global _stopped_by
    _stopped_by = signum
    raise KeyboardInterrupt


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one error boundary."""
    from .memory import set_heap_policy

    set_heap_policy("tight")  # resident memory follows what the job holds; a run may then pick "fast" (memory.py)
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports; errors still print below
        out.quiet = err.quiet = True
    try:
        code = app(args=argv, prog_name="slimtune", standalone_mode=False)
    except SlimtuneError as e:
        print(f"slimtune: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except USAGE_ERRORS as e:
        where = e.ctx.command_path if e.ctx else "slimtune"
        print(f"{where}: error: {_one_line(e.format_message())} (see '{where} --help')", file=sys.stderr)
        return 2
    except EXITS as e:
        return e.exit_code
    except ABORTS:
        print("slimtune: interrupted", file=sys.stderr)
        return 128 + _stopped_by
    except CLICK_ERRORS as e:
        print(f"slimtune: error: {_one_line(e.format_message())}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # torch was loaded: leave a torchrun process group, if joined
            from .distributed import leave

            leave()
    return code if isinstance(code, int) else 0  # without standalone mode, click returns an Exit's code


if __name__ == "__main__":
    sys.exit(main())

"""The `slimtune` command line. Each command parses and validates, calls one library function, and renders
the result (rich tables and progress bars for people, one JSON object as the last stdout line with --json).
Library errors (SlimtuneError) and usage errors become one line on stderr and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import SlimtuneError

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
Checkpoint = Annotated[Path, typer.Option("--checkpoint", help="Model: a .safetensors checkpoint (or .pt/.pth/.bin state dict).", show_default=False)]
DataFile = Annotated[Path, typer.Option("--data", help="Training text: a file of raw bytes.", show_default=False)]
SeqLen = Annotated[int, typer.Option("--seq-len", min=1, help="L: bytes per training window.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per step.")]
Budget = Annotated[
    Optional[str],
    typer.Option(
        "--mem-budget",
        help="Memory the job may hold in all (weights, gradients, optimizer state, one chunk's activations, states, "
        "runtime): a size (2GB = 2e9 bytes, 1.5GiB, 512MB) or a share of free memory (80%). Default: free memory less 10%.",
        show_default=False,
    ),
]
Optimizer = Annotated[str, typer.Option("--optimizer", help="sgd (plain, no momentum), adam or adamw.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda if usable), cpu or cuda.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
NHeads = Annotated[Optional[int], typer.Option("--n-heads", min=1, help="Heads, for checkpoints without slimtune_config.", show_default=False)]
FeatureType = Annotated[Optional[str], typer.Option("--feature-type", help="sqr, relu, elu+1, abs, favor+ or favor+_N, for checkpoints without slimtune_config.", show_default=False)]
LayerNorm = Annotated[Optional[str], typer.Option("--layernorm", help="post or pre, for checkpoints without slimtune_config.", show_default=False)]
ExportDtype = Annotated[str, typer.Option("--dtype", help="Dtype of the written weights: auto (each tensor's input dtype), fp32, fp16 or bf16.")]
ExportFormat = Annotated[str, typer.Option("--format", help="safetensors (one file) or hf (a folder with model.safetensors and config.json).")]
Recovery = Annotated[
    str,
    typer.Option(
        "--state-recovery",
        help="How SLiM recovers each chunk's start states: subtract64 (the paper's subtraction with float64 states; "
        "exact, O(1) memory), subtract (the paper as published, fp32 states), store (keep every boundary state).",
    ),
]


Precision = Annotated[
    str,
    typer.Option("--precision", help="Compute precision: fp32, or bf16 (autocast: bf16 matmuls; fp32 weights, gradients, "
                 "attention states and loss; no loss scaling needed)."),
]


def _chunk_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise SlimtuneError(f"--chunk-size must be 'auto' or an integer >= 1, got {value!r}") from None
    if size < 1:
        raise SlimtuneError(f"--chunk-size must be 'auto' or an integer >= 1, got {size}")
    return size


def _progress(total: int, what: str, *, transient: bool = False) -> Progress:
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal,
    )


def _step_info(m: dict) -> str:
    info = f"loss {m['loss']:.4f}"
    if "bpc" in m:
        info += f"  bpc {m['bpc']:.3f}"
    return info + f"  {m['tokens_per_s']:,.0f} tok/s  C {m['chunk_size']}  peak {_size(m['peak_memory_bytes'])}"


def _emit_json(obj: dict) -> None:
    print(json.dumps(obj, default=str))


def _size(n: float) -> str:
    from .memory import format_size

    return format_size(n)


def _load(path: Path, n_heads=None, feature_type=None, layernorm=None):
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, n_heads=n_heads, feature_type=feature_type, layernorm=layernorm)


def version_callback(value: bool):
    if value:
        print(f"slimtune {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")] = None,
):
    """Fine-tune Performer language models on small devices with SLiM: exact gradients, memory O(C) instead of O(L).

    Start with [bold]slimtune demo[/bold]. Typical use:

      slimtune plan --checkpoint model.safetensors --seq-len 16384 --mem-budget 2GB
      slimtune fit --checkpoint model.safetensors --data my.txt --mem-budget 2GB --out tuned.safetensors
    """


@app.command()
def fit(
    checkpoint: Checkpoint,
    data: DataFile,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the fine-tuned .safetensors checkpoint.", show_default=False)],
    mem_budget: Budget = None,
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="C: 'auto' picks the largest that fits --mem-budget; C >= L is ordinary backprop.")] = "auto",
    seq_len: SeqLen = 1024,
    batch_size: BatchSize = 1,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps on seeded random windows.")] = 1,
    one_step: Annotated[bool, typer.Option("--one-step", help="Exactly one step on the first batch (row b = bytes [bL, bL+L+1)), as in the paper's on-device experiment.")] = False,
    optimizer: Optimizer = "adam",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed for window sampling and FAVOR+ draws.")] = 0,
    device: Device = "auto",
    schedule: Annotated[str, typer.Option("--schedule", help="Learning rate: constant, or cosine decay after the warmup.")] = "constant",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Steps of linear learning-rate warmup.")] = 0,
    clip_grad: Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the gradients' global norm (opt-in).", show_default=False)] = None,
    accumulate: Annotated[int, typer.Option("--accumulate", min=1, help="Batches whose gradients make one optimizer step.")] = 1,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="Held-out text scored in bits per character.", show_default=False)] = None,
    eval_fraction: Annotated[Optional[float], typer.Option("--eval-fraction", help="Hold out the last share of --data (e.g. 0.05) for evaluation instead of --eval-data.", show_default=False)] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="With held-out data: bpc every N steps (0: at the end).")] = 0,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder for metrics.jsonl and resumable state (default: OUT.run).", show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Save resumable state every N steps (and on Ctrl-C).")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in the run folder.")] = False,
    skip_nonfinite: Annotated[bool, typer.Option("--skip-nonfinite", help="Skip (and count) steps with a non-finite loss or gradient instead of stopping.")] = False,
    recovery: Recovery = "subtract64",
    precision: Precision = "fp32",
    dtype: ExportDtype = "auto",
    export_format: ExportFormat = "safetensors",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    as_json: Json = False,
):
    """Fine-tune a checkpoint on a text file with SLiM and export weights the original model loads unchanged.

    Example: slimtune fit --checkpoint model.safetensors --data my.txt --mem-budget 2GB --out tuned.safetensors
    """
    from .data import read_bytes, split_held_out
    from .train import FitOptions, fit as run_fit

    options = FitOptions(
        seq_len=seq_len, batch_size=batch_size, steps=steps, one_step=one_step, optimizer=optimizer, lr=lr,
        chunk_size=_chunk_size(chunk_size), mem_budget=mem_budget, seed=seed, device=device, recovery=recovery,
        precision=precision, dtype=dtype, format=export_format, schedule=schedule, warmup=warmup, clip_grad=clip_grad,
        accumulate=accumulate, eval_every=eval_every, save_every=save_every, resume=resume, skip_nonfinite=skip_nonfinite,
        run_dir=str(run_dir or Path(f"{out_path}.run")),
    )
    options.validate()
    ckpt = _load(checkpoint, n_heads, feature_type, layernorm)
    tokens = read_bytes(data, min_length=2)
    held_out = read_bytes(eval_data, min_length=2, what="--eval-data") if eval_data else None
    if eval_fraction is not None:
        if held_out is not None:
            raise SlimtuneError("give either --eval-data or --eval-fraction, not both")
        tokens, held_out = split_held_out(tokens, eval_fraction)
    total = 1 if one_step else steps
    with _progress(total, "fit") as bar:
        task = bar.add_task("fit", total=total, info="")
        try:
            result = run_fit(
                ckpt, tokens, out_path, options, data_path=data, eval_data=held_out,
                on_step=lambda step, m: bar.update(task, completed=step, info=_step_info(m)),
                on_warning=lambda message: err.print(f"[yellow]warning:[/yellow] {message}"),
            )
        except KeyboardInterrupt:
            print(f"slimtune: interrupted; the run state is in {options.run_dir}: add --resume to the same command "
                  "to continue", file=sys.stderr)
            raise typer.Exit(128 + _stopped_by) from None
    table = Table(title="slimtune fit", show_header=False)
    for key, value in (
        ("device", result.device),
        ("seq len / batch", f"{result.seq_len} / {result.batch_size}"),
        ("chunk size C", f"{result.chunk_size}" + (" (auto)" if result.plan else "")),
        ("budget", _size(result.plan["budget_bytes"]) if result.plan else "-"),
        ("predicted peak", _size(result.plan["predicted_peak_bytes"]) if result.plan else "-"),
        ("measured peak", _size(result.peak_memory_bytes)),
        ("steps", str(result.steps)),
        ("loss first -> last", f"{result.loss:.4f} -> {result.final_loss:.4f} nats/byte"),
        ("held-out bpc", f"{result.metrics['bpc']:.4f}" if "bpc" in result.metrics else "-"),
        ("run folder", options.run_dir),
        ("time", f"{result.seconds:.2f} s"),
        ("written", result.out),
    ):
        table.add_row(key, value)
    (err if as_json else out).print(table)
    if as_json:
        _emit_json(result.to_json())


@app.command()
def plan(
    checkpoint: Checkpoint,
    seq_len: SeqLen = 1024,
    mem_budget: Budget = None,
    batch_size: BatchSize = 1,
    optimizer: Optimizer = "adam",
    device: Device = "auto",
    recovery: Recovery = "subtract64",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    as_json: Json = False,
):
    """Predict peak memory and relative step time for each chunk size C, and pick the largest C that fits.

    Example: slimtune plan --checkpoint model.safetensors --seq-len 16384 --mem-budget 2GB
    """
    from .checkpoint import build_model
    from .memory import resolve_device
    from .planner import plan_chunk_size
    from .optimizers import OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise SlimtuneError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    ckpt = _load(checkpoint, n_heads, feature_type, layernorm)
    model = build_model(ckpt, device=resolve_device(device))
    ckpt.release()
    result = plan_chunk_size(model, seq_len, batch_size, optimizer, mem_budget, recovery=recovery)
    table = Table(title=f"slimtune plan: L = {seq_len}, batch {batch_size}, {optimizer}, budget {_size(result.budget_bytes)} on {result.device}")
    for col in ("C", "predicted peak", "share of budget", "relative step time", ""):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = "<- chosen" if c.chunk_size == result.chunk_size else ("" if c.fits else "does not fit")
        label = f"{c.chunk_size}" + (" (full backprop)" if c.chunk_size >= seq_len else "")
        table.add_row(label, _size(c.predicted_peak_bytes), f"{100 * c.share_of_budget:.0f}%", f"{c.relative_time:.2f}x", mark)
    fixed = Table(title="predicted peak at the chosen C", show_header=False)
    for key, value in result.breakdown.items():
        fixed.add_row(key, _size(value))
    console = err if as_json else out
    console.print(table)
    console.print(fixed)
    if as_json:
        _emit_json(result.to_json())


@app.command()
def pretrain(
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the new .safetensors checkpoint.", show_default=False)],
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A recipe name (see `slimtune recipes`) or .toml path; flags override it.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Training text (not needed for the copy task).", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="text, or copy: the paper's synthetic copying task.", show_default=False)] = None,
    hidden_dim: Annotated[Optional[int], typer.Option("--hidden-dim", min=4, help="d (a multiple of 4 and of --n-heads).", show_default=False)] = None,
    n_layers: Annotated[Optional[int], typer.Option("--n-layers", min=1, help="Layers.", show_default=False)] = None,
    ffn_dim: Annotated[Optional[int], typer.Option("--ffn-dim", min=1, help="Feed-forward width (default 4d).", show_default=False)] = None,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", min=1, help="L (default 256).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Windows per step (default 8).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps (default 500).", show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sgd, adam (default) or adamw.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default 0.002).", show_default=False)] = None,
    chunk_size: Annotated[Optional[str], typer.Option("--chunk-size", help="full (ordinary backprop, default), auto (largest that fits --mem-budget) or N.", show_default=False)] = None,
    mem_budget: Budget = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation, data order and FAVOR+ draws.")] = 0,
    device: Device = "auto",
    precision: Precision = "fp32",
    as_json: Json = False,
):
    """Train a Performer from scratch (the server side) and write a contract checkpoint.

    Examples: slimtune pretrain --recipe small --data ../shared/data/tinyshakespeare.txt --out small.safetensors
              slimtune pretrain --recipe copy --out copy.safetensors
    """
    from .data import read_bytes
    from .model import PerformerConfig
    from .recipes import load_recipe
    from .train import FitOptions, pretrain as run_pretrain

    base = load_recipe(recipe) if recipe else None
    model = base.model.to_dict() if base else {"vocab_size": 256, "hidden_dim": 128, "n_layers": 2, "n_heads": 2,
                                                 "feature_type": "sqr", "on_gptln": True}
    for key, value in (("hidden_dim", hidden_dim), ("n_layers", n_layers), ("ffn_dim", ffn_dim), ("n_heads", n_heads),
                       ("feature_type", feature_type)):
        if value is not None:
            model[key] = value
    if layernorm is not None:
        if layernorm not in ("post", "pre"):
            raise SlimtuneError(f"--layernorm must be post or pre, got {layernorm!r}")
        model["on_gptln"] = layernorm == "post"
    if ffn_dim is None and (base is None or hidden_dim is not None):
        model["ffn_dim"] = 4 * model["hidden_dim"]
    config = PerformerConfig.from_dict(model)
    settings = {"task": "text", "seq_len": 256, "batch_size": 8, "steps": 500, "optimizer": "adam", "lr": 2e-3,
                "chunk_size": "full"} | (base.train if base else {})
    for key, value in (("task", task), ("seq_len", seq_len), ("batch_size", batch_size), ("steps", steps),
                       ("optimizer", optimizer), ("lr", lr), ("chunk_size", chunk_size)):
        if value is not None:
            settings[key] = value
    chunk = str(settings.pop("chunk_size"))
    options = FitOptions(**settings, chunk_size=settings["seq_len"] if chunk == "full" else _chunk_size(chunk),
                         mem_budget=mem_budget, seed=seed, device=device, precision=precision)
    options.validate()
    tokens = read_bytes(data, min_length=2) if data is not None else None
    with _progress(options.steps, "pretrain") as bar:
        task_id = bar.add_task("pretrain", total=options.steps, info="")
        result = run_pretrain(
            config, tokens, out_path, options, data_path=data,
            on_step=lambda step, m: bar.update(task_id, completed=step, info=_step_info(m)),
            on_warning=lambda message: err.print(f"[yellow]warning:[/yellow] {message}"),
        )
    summary = f"{result.steps} steps, loss {result.loss:.4f} -> {result.final_loss:.4f}, C = {result.chunk_size}, " \
              f"{result.seconds:.1f} s -> {result.out}"
    for key, value in result.metrics.items():
        summary += f"; {key} {value:.4f}"
    (err if as_json else out).print(summary)
    if as_json:
        _emit_json(result.to_json())


def _int_list(value: str, flag: str) -> list[int]:
    try:
        found = [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise SlimtuneError(f"{flag} must be integers separated by commas, e.g. 1024,256,64,16; got {value!r}") from None
    if not found or min(found) < 1:
        raise SlimtuneError(f"{flag} must be integers >= 1 separated by commas, e.g. 1024,256,64,16; got {value!r}")
    return found


@app.command()
def bench(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Model to measure: a .safetensors checkpoint.", show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Or a recipe's model, randomly initialised (see `slimtune recipes`).", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", min=2, help="L. Default: the recipe's, else 1024.", show_default=False)] = None,
    batch_size: BatchSize = 1,
    chunks: Annotated[str, typer.Option("--chunks", help="SLiM chunk sizes to measure, comma-separated; sizes >= L are skipped.")] = "1024,256,64,16",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per method; the table shows their median.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps per method first.")] = 1,
    optimizer: Annotated[str, typer.Option("--optimizer", help="none (gradients only), sgd, adam or adamw: its update and state count in time and memory.")] = "none",
    precision: Precision = "fp32",
    device: Device = "auto",
    recovery: Recovery = "subtract64",
    full: Annotated[bool, typer.Option("--full/--no-full", help="Measure full backprop (the reference for the ratios).")] = True,
    checkpointing: Annotated[bool, typer.Option("--checkpointing/--no-checkpointing", help="Measure full backprop with per-layer activation checkpointing.")] = True,
    emulate: Annotated[Optional[str], typer.Option("--emulate-memory", help="CUDA only: cap this process at a smaller card's memory (e.g. 2GB), as torch.cuda.set_per_process_memory_fraction does.", show_default=False)] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Also draw time and memory against C into this .png (needs matplotlib: pip install 'slimtune[plot]').", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token windows (and of a recipe's weights).")] = 0,
    as_json: Json = False,
):
    """Measure step time and peak memory of SLiM at each C, full backprop and activation checkpointing, side by side.

    Examples: slimtune bench --recipe config-2 --chunks 1024,256,64,16
              slimtune bench --checkpoint model.safetensors --seq-len 8192 --plot tradeoff.png --json
    """
    import torch

    from .bench import methods_for, plot, rows_json, run_bench
    from .checkpoint import build_model
    from .memory import emulate_card, resolve_device
    from .model import PerformerLM
    from .optimizers import OPTIMIZERS
    from .recipes import load_recipe
    from .slim import PRECISIONS

    if (checkpoint is None) == (recipe is None):
        raise SlimtuneError("give exactly one of --checkpoint FILE or --recipe NAME (see `slimtune recipes`)")
    if optimizer != "none" and optimizer not in OPTIMIZERS:
        raise SlimtuneError(f"--optimizer must be none or one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if precision not in PRECISIONS:
        raise SlimtuneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if plot_path is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise SlimtuneError("--plot needs matplotlib: pip install 'slimtune[plot]' (or pip install matplotlib)")
        if plot_path.suffix.lower() != ".png":
            raise SlimtuneError(f"--plot must name a .png file, got {plot_path}")
    chunk_sizes = _int_list(chunks, "--chunks")
    dev = resolve_device(device)
    if emulate is not None:
        emulate_card(emulate, dev)
    torch.manual_seed(seed)
    if recipe is not None:
        base = load_recipe(recipe)
        model = PerformerLM(base.model).to(dev)
        length = seq_len or int(base.train.get("seq_len", 1024))
        name = f"recipe {base.path.stem}"
    else:
        ckpt = _load(checkpoint)
        model = build_model(ckpt, device=dev)
        ckpt.release()
        length = seq_len or 1024
        name = checkpoint.name
    model.redraw_features(torch.Generator().manual_seed(seed))
    methods = methods_for(length, chunk_sizes, full=full, checkpointed=checkpointing)
    windows = torch.randint(0, model.config.vocab_size, (batch_size, length + 1), generator=torch.Generator().manual_seed(seed)).to(dev)
    title = f"slimtune bench: {name}, L = {length}, batch {batch_size}, {precision}, optimizer {optimizer}, {dev}"
    with _progress(len(methods) * (1 + warmup + steps), "bench", transient=True) as bar:
        task_id = bar.add_task("bench", total=len(methods) * (1 + warmup + steps), info="")
        rows = run_bench(model, windows, methods, steps=steps, warmup=warmup, precision=PRECISIONS[precision],
                         optimizer=None if optimizer == "none" else optimizer, recovery=recovery,
                         on_progress=lambda: bar.advance(task_id))
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    for col in ("s/step (median)", "time vs full", "peak memory", "memory vs full"):
        table.add_column(col, justify="right")
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        if r.error:
            table.add_row(r.method, r.error, "", "", "")
            continue
        table.add_row(r.method, f"{r.median_s:.3f}", ratio(r.vs_full_time), _size(r.peak_bytes), ratio(r.vs_full_memory))
    console = err if as_json else out
    console.print(table)
    console.print("peak memory: " + ("CUDA allocator peak reservation + context" if dev.type == "cuda"
                                     else "peak tensor bytes held (weights, gradients, optimizer state, activations)"))
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, plot_path, title)
        console.print(f"plot -> {plot_path}")
    if as_json:
        _emit_json({"model": name, "config": model.config.to_dict(), "seq_len": length, "batch_size": batch_size,
                    "precision": precision, "optimizer": optimizer, "device": str(dev),
                    "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "rows": rows_json(rows)})


@app.command()
def recipes(as_json: Json = False):
    """List the recipes (the SLiM paper's configurations and a small one), each with the command that runs it."""
    from .recipes import list_recipes

    found = list_recipes()
    table = Table("recipe", "model", "L", "description")
    for r in found:
        m = r.model
        table.add_row(r.path.stem, f"d {m.hidden_dim}, {m.n_layers} layers, {m.n_heads} heads, {m.feature_type}",
                      str(r.train.get("seq_len", "-")), r.description)
    (err if as_json else out).print(table)
    if as_json:
        _emit_json([{"name": r.path.stem, "path": str(r.path), "description": r.description,
                     "model": r.model.to_dict(), "train": r.train} for r in found])


@app.command(name="eval")
def evaluate(
    checkpoint: Checkpoint,
    data: DataFile,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", min=1, help="Bytes per sequence (default: the checkpoint's seq_len, else 1024).", show_default=False)] = None,
    max_bytes: Annotated[Optional[int], typer.Option("--max-bytes", min=2, help="Evaluate only the first N bytes.", show_default=False)] = None,
    adapt: Annotated[Optional[str], typer.Option("--adapt", help="one-step: the paper's on-device protocol (bpc of each window's second half before and after one SGD step on its first half).", show_default=False)] = None,
    windows: Annotated[int, typer.Option("--windows", min=1, help="--adapt: windows sampled from the data (seeded).")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="--adapt: learning rate of the SGD step.")] = 0.01,
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="--adapt: C of the SLiM step, 'auto' (largest that fits --mem-budget) or N.")] = "auto",
    mem_budget: Budget = None,
    seed: Annotated[int, typer.Option("--seed", help="--adapt: seed for the windows.")] = 0,
    device: Device = "auto",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    as_json: Json = False,
):
    """Bits per character of a checkpoint on a text file (chunk by chunk: memory does not grow with --seq-len).

    Examples: slimtune eval --checkpoint tuned.safetensors --data valid.txt
              slimtune eval --checkpoint model.safetensors --data doc.txt --adapt one-step --seq-len 2048
    """
    import torch

    from .checkpoint import build_model
    from .data import read_bytes
    from .evaluation import adapt_one_step, evaluate as run_eval
    from .memory import resolve_device
    from .planner import plan_chunk_size

    if adapt not in (None, "one-step"):
        raise SlimtuneError(f"--adapt must be one-step, got {adapt!r}")
    if not (lr > 0 and lr < float("inf")):
        raise SlimtuneError(f"--lr must be a positive finite number, got {lr}")
    C = _chunk_size(chunk_size)
    ckpt = _load(checkpoint, n_heads, feature_type, layernorm)
    tokens = read_bytes(data, min_length=2)
    model = build_model(ckpt, device=resolve_device(device))
    ckpt.release()
    model.redraw_features(torch.Generator().manual_seed(0))  # FAVOR+: a fixed draw, so eval is repeatable
    L = seq_len or int(ckpt.extra_config.get("seq_len", 1024))
    console = err if as_json else out
    if adapt is None:
        result = run_eval(model, tokens, seq_len=L, max_bytes=max_bytes)
        console.print(f"bpc {result.bpc:.4f} over {result.predicted_bytes} bytes (seq len {L})")
    else:
        if C is None:
            C = plan_chunk_size(model, max(1, L // 2), 1, "sgd", mem_budget).chunk_size
        with _progress(windows, "adapt") as bar:
            task = bar.add_task("adapt", total=windows, info=f"C {C}")
            result = adapt_one_step(model, tokens, seq_len=L, windows=windows, lr=lr, chunk_size=C, seed=seed,
                                    on_progress=lambda done, total: bar.update(task, completed=done))
        console.print(f"one-step adaptation over {windows} windows of {L} bytes, SGD lr {lr}, C = {C}: second-half bpc "
                      f"{result.bpc_before:.4f} -> {result.bpc_after:.4f} ({result.difference:+.4f})")
    if as_json:
        _emit_json(result.to_json())


@app.command()
def generate(
    checkpoint: Checkpoint,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = "The ",
    n_bytes: Annotated[int, typer.Option("--bytes", min=0, help="How many bytes to sample.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Sample among the k likeliest bytes.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: Device = "auto",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    as_json: Json = False,
):
    """Sample a continuation of a prompt in recurrent mode (constant memory per new byte).

    Example: slimtune generate --checkpoint tuned.safetensors --prompt "Day 12: wind" --bytes 300
    """
    import torch

    from .checkpoint import build_model
    from .generation import generate as run_generate
    from .memory import resolve_device

    ckpt = _load(checkpoint, n_heads, feature_type, layernorm)
    model = build_model(ckpt, device=resolve_device(device))
    ckpt.release()
    generator = torch.Generator().manual_seed(seed)
    model.redraw_features(generator)
    text = run_generate(model, prompt.encode(), n_bytes, temperature=temperature, top_k=top_k, generator=generator)
    if as_json:
        _emit_json({"prompt": prompt, "text": text.decode("utf-8", errors="replace"), "bytes": len(text)})
    else:
        sys.stdout.write(prompt + text.decode("utf-8", errors="replace") + "\n")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A checkpoint: .safetensors, or .pt/.pth/.bin state dict.", show_default=False)],
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor with its shape and dtype.")] = False,
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
    as_json: Json = False,
):
    """Show a checkpoint's config, parameter count, dtypes, size, fine-tuning memory and provenance.

    Example: slimtune inspect model.safetensors --tensors
    """
    from .checkpoint import describe

    info = describe(_load(path, n_heads, feature_type, layernorm))
    console = err if as_json else out
    table = Table(title=str(path), show_header=False)
    for key, value in info["config"].items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("dtypes", ", ".join(info["dtypes"]))
    table.add_row("file size", _size(info["file_bytes"]))
    for name, cost in info["fine_tuning_bytes"].items():
        table.add_row(f"fixed cost, {name}", f"{_size(cost)} (weights + gradients + optimizer state, fp32)")
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
    src: Annotated[Path, typer.Argument(help="Any accepted checkpoint: a reference state dict (.pt/.pth/.bin) or .safetensors.", show_default=False)],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the contract .safetensors checkpoint.", show_default=False)],
    dtype: ExportDtype = "auto",
    export_format: ExportFormat = "safetensors",
    n_heads: NHeads = None,
    feature_type: FeatureType = None,
    layernorm: LayerNorm = None,
):
    """Convert a checkpoint (for example the SLiM reference code's torch.save state dict) to a contract checkpoint.

    Example: slimtune convert ref_model.pt --out model.safetensors --n-heads 8 --feature-type sqr --layernorm post
    """
    from .checkpoint import check_output_path, parse_dtype, save_checkpoint

    cast = parse_dtype(dtype)
    target = check_output_path(out_path, src, fmt=export_format)
    ckpt = _load(src, n_heads, feature_type, layernorm)
    tensors = {name: t.to(cast or t.dtype) for name, t in ckpt.tensors.items()}
    save_checkpoint(target, tensors, ckpt.config, extra_config=ckpt.extra_config,
                    provenance={"converted_from": src.name}, fmt=export_format)
    out.print(f"wrote {target}: {ckpt.parameters:,} parameters, {str(cast or ', '.join(ckpt.dtypes)).removeprefix('torch.')}")


@app.command()
def env(as_json: Json = False):
    """Show the devices slimtune can use and their memory (CPU via psutil, NVIDIA GPUs via NVML)."""
    from .devices import detect_environment

    info = detect_environment()
    table = Table(title="slimtune env", show_header=False)
    table.add_row("python / torch / CUDA", f"{info.python} / {info.torch} / {info.cuda_version or '-'}")
    table.add_row("CUDA usable", str(info.cuda_usable))
    table.add_row("CPU", f"{info.cpu_count} cores, {_size(info.cpu_available_bytes)} available of {_size(info.cpu_total_bytes)}")
    for gpu in info.gpus:
        table.add_row(f"cuda:{gpu.index}", f"{gpu.name}{' (MIG)' if gpu.mig else ''}, {_size(gpu.free_bytes)} free of {_size(gpu.total_bytes)}")
    if info.nvml_error:
        table.add_row("note", info.nvml_error)
    table.add_row("--device auto", info.default_device)
    (err if as_json else out).print(table)
    if as_json:
        _emit_json(info.to_json())


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its data and checkpoints.")] = Path("slimtune-demo"),
    as_json: Json = False,
):
    """The whole workflow on made-up data, no downloads: pretrain, plan, fine-tune with SLiM, compare, export.

    Pretrains a tiny Performer, plans fine-tuning under a small budget, fine-tunes with SLiM at the chosen C,
    compares bits per character before and after, exports, and reloads the export into the full model.
    """
    from .demo import run_demo

    console = err if as_json else out
    result = run_demo(workdir, say=lambda text: console.print(text))
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
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at its first use
    from .memory import limit_heap_retention

    limit_heap_retention()  # resident memory then follows what the job holds (see memory.py)
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

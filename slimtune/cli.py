"""The `slimtune` command line. Each command parses its flags (declared once, in options.py), calls one library
function and renders the result (rich tables and progress bars in a terminal, plain progress lines in a log, one
JSON object as the last stdout line with --json). Library errors (SlimtuneError) and usage errors become one line
on stderr naming the flags, exit code 2. The library is imported inside the commands: `slimtune --help` and
`slimtune recipes` load no torch."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .choices import BenchOptimizer, ExportDtype, Optimizer, Task
from .cli_options import Stopped, cli_message, command, flag_for, params
from .errors import ConfigError, Interrupted, SlimtuneError
from .options import (
    ADAPT_CHUNK,
    ADAPT_LR,
    BENCH_SEQ_LEN,
    BENCH_STEPS,
    BENCH_WARMUP,
    TRAINING_GROUPS,
    Adapters,
    BenchOptions,
    DataOptions,
    EvalOptions,
    ExportOptions,
    Files,
    FitOptions,
    GenerateOptions,
    ModelShape,
    ModelSource,
    Optimization,
    Output,
    PlanOptions,
    RunFolderOptions,
    Runtime,
    SlimStep,
)
from .render import (
    Reporter,
    bench_table,
    budget_words,
    console,
    emit_json,
    env_table,
    err,
    eval_line,
    fit_table,
    inspect_tables,
    out,
    plan_tables,
    plural,
    recipes_table,
    step_info,
    warning,
)
from .version import __version__

app = typer.Typer(
    name="slimtune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

MODEL = params(ModelSource)
MODEL_FLAGS = params(ModelSource, "n_heads", "feature_type", "layernorm")
RUNTIME = params(Runtime)
JSON = params(Output, "json")
SEED_HELP = {
    "pretrain": "Seed for initialisation, data order and FAVOR+ draws.",
    "eval": "--adapt: seed for the windows.",
    "generate": "Sampling seed.",
    "bench": "Seed of the random token windows (and of a recipe's weights).",
}


def _seed(command_name: str) -> list:
    return params(Optimization, "seed", seed={"help": SEED_HELP[command_name]})


def _require(command_name: str, **given) -> None:
    """All missing required options in one line (click would name only the first)."""
    missing = [flag_for(name) for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(
            f"slimtune {command_name} needs {' and '.join(missing)} (see 'slimtune {command_name} --help')"
        )


def _use_threads(value: int | None = None) -> None:
    """The CPU threads of a command that computes: --threads, SLIMTUNE_THREADS, else the free cores."""
    from . import threads

    threads.apply(threads.choose(value).count)


def _train(what: str, options: FitOptions, call):
    """Run a training library call with progress; on Ctrl-C or SIGTERM say what was saved (the library says) and
    exit 128 + the signal's number."""
    from .runs import RunFolder

    folder = RunFolder(options.run_dir) if options.run_dir else None
    if options.resume and folder is not None and folder.has_state() and folder.state_error() is None:
        err.print(f"resuming the run in {folder.path} ({folder.summary()})")
    with Reporter(what, options.total_steps) as progress:
        try:
            return call(lambda step, m: progress.update(step, step_info(m)))
        except Interrupted as e:
            if e.saved_step is None and e.run_dir is None:
                said = "nothing was saved (no run folder)"
            elif e.saved_step is None:
                said = "nothing was saved (the run had not started its steps): run the same command again"
            else:
                said = (
                    f"the run state after step {e.saved_step} is in {e.run_dir}: add --resume to the same command "
                    "to continue"
                )
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for the run
                print(f"slimtune: interrupted; {said}", file=sys.stderr)
            raise typer.Exit(128 + _stopped_by) from None


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


# Every flagged option of every training group (FitOptions' bases): a group or field added there is a flag of fit.
FIT_OPTIONS = [
    p
    for group in TRAINING_GROUPS
    for p in params(group, exclude=("task",), chunk_size={"default": "auto"})  # the copy task is pretrain's
]


@command(app, MODEL, params(Files), FIT_OPTIONS, JSON)
def fit(source: ModelSource, files: Files, options: FitOptions, output: Output):
    """Fine-tune a checkpoint on a text file with SLiM and export weights the original model loads unchanged.

    Example: slimtune fit --checkpoint model.safetensors --data my.txt --mem-budget 2GB --out tuned.safetensors
    """
    _require("fit", checkpoint=source.checkpoint, data=files.data)
    from .checkpoint import default_out
    from .train import fit as run_fit
    from .train import run_folder_path

    target = files.out or default_out(source.checkpoint, options.format, resume=options.resume)
    options = replace(options, run_dir=run_folder_path(options.run_dir, target))
    result = _train(
        "fit",
        options,
        lambda on_step: run_fit(
            source.checkpoint,
            files.data,
            target,
            options,
            eval_data=files.eval_data,
            eval_fraction=files.eval_fraction,
            on_step=on_step,
            on_warning=warning,
            model_flags=source.model_flags(),  # read by fit once it holds the run folder
        ),
    )
    console(output.json).print(fit_table(result))
    if output.json:
        emit_json(result.to_json())


@command(
    app,
    MODEL,
    params(
        Files,
        data={
            "type": list[Path] | None,
            "help": "The data files the run will read (repeat the flag): fit holds them resident, so their sizes "
            "count.",
        },
    ),
    FIT_OPTIONS,
    params(PlanOptions),
    JSON,
)
def plan(
    source: ModelSource,
    data: list[Path] | None,
    files: Files,
    options: FitOptions,
    planning: PlanOptions,
    output: Output,
):
    """Predict peak memory and relative step time for each chunk size C, and pick C as fit would (the fastest that
    fits, or with --chunk-size max the largest); then
    the same for the other parameter-memory strategies (full fine-tuning with adam, adafactor, sgd; LoRA with an
    fp32 or bf16 base), so that you see what else would fit. Nothing is switched on for you: fit trains what its
    flags say.

    The prediction is for `slimtune fit` with the same flags (its managed CPU heap included): paste a fit
    command here to see the C it would choose and why.

    Example: slimtune plan --checkpoint model.safetensors --seq-len 16384 --mem-budget 2GB --lora-rank 8
    """
    _require("plan", checkpoint=source.checkpoint)
    from .strategies import Strategy, lineup, plan_fit

    _use_threads(options.threads)
    options.check()
    strategy = Strategy.of(options)
    compare = planning.compare
    with Reporter("plan", len(lineup(strategy)) if compare else 1, transient=True) as progress:
        found = plan_fit(
            source.checkpoint, options, data=data or (), eval_data=files.eval_data,
            compare_strategies=compare, model_flags=source.model_flags(),
            on_stage=lambda done, total, name: progress.update(done, f"measuring {name}"),
        )  # fmt: skip
    for table in plan_tables(found.plan, options.seq_len, options.batch_size, strategy.name, found.strategies):
        console(output.json).print(table)
    if output.json:
        emit_json(found.to_json())


FROM_RECIPE = {"default": None, "show_default": False}


@command(
    app,
    params(
        Files,
        "out",
        "data",
        out={"help": "Where to write the new .safetensors checkpoint. (required)"},
        data={"help": "Training text (not needed for the copy task)."},
    ),
    params(ModelShape),
    MODEL_FLAGS,
    params(
        DataOptions,
        "task",
        "seq_len",
        "batch_size",
        task=FROM_RECIPE,
        seq_len=FROM_RECIPE | {"help": "L (default: the recipe's)."},
        batch_size=FROM_RECIPE | {"help": "Windows per step (default: the recipe's)."},
    ),
    params(
        Optimization,
        "steps",
        "optimizer",
        "lr",
        steps=FROM_RECIPE | {"help": "Optimizer steps (default: the recipe's)."},
        optimizer=FROM_RECIPE | {"help": "sgd, adam, adamw or adafactor (default: the recipe's)."},
        lr=FROM_RECIPE | {"help": "Learning rate (default: the recipe's)."},
    ),
    params(
        SlimStep,
        "chunk_size",
        "mem_budget",
        "precision",
        chunk_size=FROM_RECIPE
        | {
            "help": "full (ordinary backprop), auto (the fastest that fits --mem-budget), max (the largest that "
            "fits) or N (default: the recipe's)."
        },
    ),
    _seed("pretrain"),
    params(RunFolderOptions),
    params(ExportOptions, "overwrite"),
    params(DataOptions, "tokenizer", "data_dtype"),
    RUNTIME,
    JSON,
)
def pretrain(
    files: Files,
    shape: ModelShape,
    source: ModelSource,
    options: FitOptions,
    output: Output,
    # the training settings a recipe gives: None takes the recipe's (recipes.resolve)
    task: Task | None,
    seq_len: int | None,
    batch_size: int | None,
    steps: int | None,
    optimizer: Optimizer | None,
    lr: float | None,
    chunk_size: str | None,
):
    """Train a Performer from scratch (the server side) and write a contract checkpoint.

    Examples: slimtune pretrain --recipe small --data ../shared/data/tinyshakespeare.txt --out small.safetensors
              slimtune pretrain --recipe copy --out copy.safetensors
    """
    _require("pretrain", out=files.out)
    from .recipes import resolve
    from .train import pretrain as run_pretrain
    from .train import run_folder_path

    given = vars(shape) | source.model_flags()  # a new dict: the shape itself is left alone
    train = dict(
        task=task,
        seq_len=seq_len,
        batch_size=batch_size,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        chunk_size=chunk_size,
    )
    config, settings = resolve(given.pop("recipe"), given, train)
    options = replace(options, **settings, run_dir=run_folder_path(options.run_dir, files.out))
    result = _train(
        "pretrain",
        options,
        lambda on_step: run_pretrain(config, files.data, files.out, options, on_step=on_step, on_warning=warning),
    )
    summary = (
        f"{plural(result.steps, 'step')}, loss {result.loss:.4f} -> {result.final_loss:.4f}, C = "
        f"{result.chunk_size}, {result.seconds:.1f} s -> {result.out}"
    )
    for key, value in result.metrics.items():
        summary += f"; {key} {value:.4f}"
    console(output.json).print(summary)
    if output.json:
        emit_json(result.to_json())


@command(
    app,
    params(ModelSource, "checkpoint", checkpoint={"help": "Model to measure: a .safetensors checkpoint."}),
    params(
        ModelShape, "recipe", recipe={"help": "Or a recipe's model, randomly initialised (see `slimtune recipes`)."}
    ),
    params(
        DataOptions,
        "seq_len",
        "batch_size",
        seq_len={"default": None, "show_default": False, "help": f"L. Default: the recipe's, else {BENCH_SEQ_LEN}."},
    ),
    params(BenchOptions, "chunks"),
    params(
        Optimization,
        "steps",
        "warmup",
        steps={"default": BENCH_STEPS, "help": "Timed steps per method; the table shows their median."},
        warmup={"default": BENCH_WARMUP, "help": "Untimed steps per method first."},
    ),
    params(
        Optimization,
        "optimizer",
        optimizer={
            "type": BenchOptimizer,
            "default": BenchOptimizer.NONE,
            "help": "none (gradients only), sgd, adam, adamw or adafactor: its update and state count in time and "
            "memory.",
        },
    ),
    params(SlimStep, "precision"),
    params(Runtime, "device"),
    params(SlimStep, "recovery"),
    params(BenchOptions, "full", "checkpointing", "emulate_memory", "plot"),
    params(Adapters, "lora_rank", "base_dtype"),
    _seed("bench"),
    params(Runtime, "threads"),
    JSON,
)
def bench(
    checkpoint: Path | None,
    recipe: str | None,
    seq_len: int | None,
    batch_size: int,
    options: BenchOptions,
    steps: int,
    warmup: int,
    optimizer: BenchOptimizer,
    step: SlimStep,
    runtime: Runtime,
    adapters: Adapters,
    seed: int,
    output: Output,
):
    """Measure step time and peak memory of SLiM at each C, full backprop and activation checkpointing, side by side.

    Examples: slimtune bench --recipe config-2 --chunks 1024,256,64,16
              slimtune bench --checkpoint model.safetensors --seq-len 8192 --plot tradeoff.png --json
              slimtune bench --recipe config-4 --lora-rank 8 --chunks 1024 --optimizer adam
    """
    from .bench import bench_json, check_plot_path, chunk_list, methods_for, plot, run_bench, setup
    from .strategies import Strategy

    check_plot_path(options.plot)
    adapters.check()
    optimizer_name = None if optimizer == BenchOptimizer.NONE else optimizer.value
    strategy = Strategy(optimizer_name or "sgd", adapters.lora_rank, adapters.base_dtype, seed=seed)
    precision = strategy.precision(step.precision)  # a bf16 or quantized base: bf16 autocast, as fit does
    _use_threads(runtime.threads)
    sizes = chunk_list(options.chunks)
    run = setup(
        checkpoint=checkpoint,
        recipe=recipe,
        seq_len=seq_len,
        batch_size=batch_size,
        device=runtime.device,
        seed=seed,
        emulate_memory=options.emulate_memory,
        strategy=strategy,
    )
    methods = methods_for(run.seq_len, sizes, full=options.full, checkpointed=options.checkpointing)
    lora_note = f", LoRA r{adapters.lora_rank}, frozen {adapters.base_dtype} base" if adapters.lora_rank else ""
    title = (
        f"slimtune bench: {run.name}{lora_note}, L = {run.seq_len}, batch {batch_size}, {precision}, optimizer "
        f"{optimizer}, {run.windows.device}"
    )
    total = len(methods) * (1 + warmup + steps)
    with Reporter("bench", total, transient=True) as progress:
        done = iter(range(1, total + 1))
        rows = run_bench(
            run.model,
            run.windows,
            methods,
            steps=steps,
            warmup=warmup,
            precision=precision,
            optimizer=optimizer_name,
            recovery=step.recovery,
            on_progress=lambda: progress.update(next(done)),
        )
    report = bench_json(run, rows, batch_size=batch_size, precision=precision, optimizer=optimizer)
    console(output.json).print(bench_table(rows, title))
    console(output.json).print(f"peak memory: {report['memory_note']}")
    if options.plot is not None:
        plot(rows, options.plot, title)
        console(output.json).print(f"plot -> {options.plot}")
    if output.json:
        emit_json(report)


@command(app, JSON)
def recipes(output: Output):
    """List the recipes (the SLiM paper's configurations and a small one), each with the command that runs it."""
    from .recipes import list_recipes

    found = list_recipes()
    console(output.json).print(recipes_table(found))
    if output.json:
        emit_json(
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


def _forward_budget_help(data: str) -> str:
    """--mem-budget's help for the commands that run the model forward only (eval, generate)."""
    from .options import SAFETY_MARGIN

    return (
        f"Memory the whole process may hold (runtime, weights, {data}, one chunk's activations and logits, states): "
        f"a size (1GB = 1e9 bytes, 512MB) or a share of free memory (80%). Default: free memory less "
        f"{SAFETY_MARGIN:.0%}."
    )


@command(
    app,
    MODEL,
    params(Files, "data"),
    params(DataOptions, "seq_len", seq_len={"help": "Tokens per sequence, the same default for every checkpoint."}),
    params(DataOptions, "tokenizer", "data_dtype"),
    params(EvalOptions, "max_bytes", "adapt", "windows"),
    params(Optimization, "lr", lr={"default": ADAPT_LR, "help": "--adapt: learning rate of the SGD step (> 0)."}),
    params(
        SlimStep,
        "chunk_size",
        "mem_budget",
        chunk_size={
            "default": ADAPT_CHUNK,
            "help": "C, tokens per forward: auto (the largest whose peak fits --mem-budget), full (--seq-len) or N; "
            "--adapt: C of the SLiM step over each window's first half.",
        },
        mem_budget={"help": _forward_budget_help("the data")},
    ),
    _seed("eval"),
    params(
        Adapters,
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "base_dtype",
        lora_rank={
            "help": "--adapt: the step trains rank-R LoRA adapters on a frozen base (e.g. --lora-rank 8) "
            "instead of every weight; 0: every weight."
        },
    ),  # fmt: skip
    params(Runtime, "device", "threads"),
    JSON,
    name="eval",
)
def evaluate(
    source: ModelSource,
    files: Files,
    seq_len: int,
    reading: DataOptions,
    options: EvalOptions,
    lr: float,
    step: SlimStep,
    seed: int,
    adapters: Adapters,
    runtime: Runtime,
    output: Output,
):
    """Bits per character of a checkpoint on a text file (chunk by chunk: memory does not grow with --seq-len).

    Examples: slimtune eval --checkpoint tuned.safetensors --data valid.txt
              slimtune eval --checkpoint model.safetensors --data doc.txt --adapt one-step --seq-len 2048
    """
    _require("eval", checkpoint=source.checkpoint, data=files.data)
    step.check()  # the budget read before the checkpoint is
    from .data import read_data, tokenizer_for
    from .evaluation import adapt_one_step
    from .evaluation import evaluate as run_eval
    from .pretrained import PerformerLM
    from .strategies import Strategy

    adapters.check()
    if adapters.lora_rank and options.adapt is None:
        raise ConfigError("`lora_rank` sets what the one step trains: it needs `adapt=one-step`", params=("adapt",))
    _use_threads(runtime.threads)
    model = PerformerLM.from_pretrained(source.checkpoint, device=runtime.device, **source.model_flags())
    tokenizer = tokenizer_for(source.checkpoint, reading.tokenizer)
    tokens = read_data(files.data, vocab_size=model.config.vocab_size, tokenizer=tokenizer,
                       data_dtype=reading.data_dtype)  # fmt: skip
    Strategy(Optimizer.SGD, adapters.lora_rank, adapters.base_dtype, adapters.lora_alpha, adapters.targets,
             seed).apply(model)  # fmt: skip
    show = console(output.json)
    if options.adapt is None:
        result = run_eval(
            model,
            tokens,
            seq_len=seq_len,
            max_bytes=options.max_bytes,
            chunk_size=step.chunk_size,
            mem_budget=step.mem_budget,
        )
        show.print(eval_line(result, tokens.are_bytes))
    else:
        with Reporter("adapt", options.windows) as progress:
            result = adapt_one_step(
                model,
                tokens.ids,
                seq_len=seq_len,
                windows=options.windows,
                lr=lr,
                chunk_size=step.chunk_size,
                mem_budget=step.mem_budget,
                seed=seed,
                precision=adapters.base_dtype.compute("fp32"),  # a bf16 or quantized base: bf16 autocast, as in fit
                on_progress=lambda done, total: progress.update(done),
            )
        show.print(
            f"one-step adaptation{f' of LoRA r{adapters.lora_rank} adapters' if adapters.lora_rank else ''} over "
            f"{options.windows} windows at seq len {seq_len}, SGD lr {lr}, C = "
            f"{result.chunk_size}: second-half bpc {result.bpc_before:.4f} -> {result.bpc_after:.4f} "
            f"({result.difference:+.4f}); "
            + budget_words(result.budget_bytes, result.predicted_peak_bytes, result.peak_memory_bytes)
        )
    if output.json:
        emit_json(result.to_json())


@command(
    app,
    MODEL,
    params(GenerateOptions),
    params(
        DataOptions,
        "tokenizer",
        tokenizer={
            "help": "The model's tokenizer.json: encodes the prompt, decodes the sample (default: the one an hf "
            "folder carries)."
        },
    ),
    params(
        SlimStep,
        "chunk_size",
        "mem_budget",
        chunk_size={"help": "C, the prompt's tokens per forward: auto (the largest that fits --mem-budget), full or N"},
        mem_budget={"help": _forward_budget_help("the prompt")},
    ),
    _seed("generate"),
    params(Runtime, "device", "threads"),
    JSON,
)
def generate(
    source: ModelSource,
    options: GenerateOptions,
    reading: DataOptions,
    step: SlimStep,
    seed: int,
    runtime: Runtime,
    output: Output,
):
    """Sample a continuation of a prompt in recurrent mode (constant memory per new byte).

    Example: slimtune generate --checkpoint tuned.safetensors --prompt "Day 12: wind" --bytes 300
    """
    _require("generate", checkpoint=source.checkpoint)
    step.check()  # the budget read before the checkpoint is
    from .data import tokenizer_for
    from .generation import generate as run_generate
    from .pretrained import PerformerLM

    _use_threads(runtime.threads)
    model = PerformerLM.from_pretrained(source.checkpoint, device=runtime.device, **source.model_flags())
    planned = []
    text = run_generate(
        model,
        options.prompt,
        options.n_bytes,
        temperature=options.temperature,
        top_k=options.top_k,
        seed=seed,
        chunk_size=step.chunk_size,
        mem_budget=step.mem_budget,
        on_plan=planned.append,
        tokenizer=tokenizer_for(source.checkpoint, reading.tokenizer),
    )
    if output.json:
        from .memory import peak_memory_bytes
        from .options import chunk_request

        plan = planned[0] if planned else None
        emit_json(
            {
                "prompt": options.prompt,
                "text": text.decode("utf-8", errors="replace"),
                "bytes": len(text),
                "chunk_size": plan.chunk_size if plan else chunk_request(step.chunk_size, len(options.prompt.encode())),
                "budget_bytes": plan.budget_bytes if plan else None,
                "predicted_peak_bytes": plan.predicted_peak_bytes if plan else None,
                "peak_memory_bytes": peak_memory_bytes(next(model.parameters()).device),
            }
        )
    else:
        sys.stdout.write(options.prompt + text.decode("utf-8", errors="replace") + "\n")


CHECKPOINT_ARGUMENT = {
    "checkpoint": {
        "argument": True,
        "type": Path,
        "help": "A checkpoint: .safetensors, an hf folder, or .pt/.pth/.bin state dict.",
    }
}


@command(app, params(ModelSource, "checkpoint", **CHECKPOINT_ARGUMENT), params(Output, "tensors"), MODEL_FLAGS, JSON)
def inspect(source: ModelSource, output: Output):
    """Show a checkpoint's config, parameter count, dtypes, size, fine-tuning memory and provenance.

    Example: slimtune inspect model.safetensors --tensors
    """
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(source.checkpoint, **source.model_flags())
    for table in inspect_tables(info, str(source.checkpoint), output.tensors):
        console(output.json).print(table)
    if output.json:
        emit_json(info)


@command(
    app,
    params(
        ModelSource,
        "checkpoint",
        checkpoint=CHECKPOINT_ARGUMENT["checkpoint"]
        | {"help": "Any accepted checkpoint: a reference state dict (.pt/.pth/.bin) or .safetensors."},
    ),
    params(Files, "out", out={"help": "Where to write the contract .safetensors checkpoint. (required)"}),
    params(ExportOptions),
    MODEL_FLAGS,
)
def convert(source: ModelSource, files: Files, export: ExportOptions):
    """Convert a checkpoint (for example the SLiM reference code's torch.save state dict) to a contract checkpoint.

    Example: slimtune convert ref_model.pt --out model.safetensors --n-heads 8 --feature-type sqr --layernorm post
    """
    _require("convert", out=files.out)
    from .checkpoint import convert as run_convert

    flags = source.model_flags()
    ckpt = run_convert(
        source.checkpoint, files.out, dtype=export.dtype, fmt=export.format, overwrite=export.overwrite, **flags
    )
    written = ckpt.dtypes if export.dtype == ExportDtype.AUTO else [export.dtype.value]
    out.print(f"wrote {files.out}: {ckpt.parameters:,} parameters, {', '.join(written)}")


@command(app, JSON)
def env(output: Output):
    """Show the devices slimtune can use and their memory (CPU via psutil, NVIDIA GPUs via NVML)."""
    from . import threads
    from .devices import detect_environment

    info = detect_environment()
    choice = threads.choose()
    console(output.json).print(env_table(info, choice, threads.ENV))
    if output.json:
        emit_json(info.to_json() | {"threads": choice.count, "threads_reason": choice.reason})


@command(app, params(Output, "workdir"), params(Runtime, "threads"), JSON)
def demo(output: Output, runtime: Runtime):
    """The whole workflow on made-up data, no downloads: pretrain, plan, fine-tune with SLiM, compare, export.

    Pretrains a tiny Performer, plans fine-tuning under a small budget, fine-tunes with SLiM at the chosen C,
    compares bits per character before and after, exports, and reloads the export into the full model.
    """
    from .demo import run_demo

    show = console(output.json)
    result = run_demo(output.workdir, say=lambda text: show.print(text), threads=runtime.threads, on_warning=warning)
    if output.json:
        emit_json(result)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one error boundary. Library messages name Python parameters; here they become flags."""
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports; errors still print below
        out.quiet = err.quiet = True
    try:
        code = app(args=argv, prog_name="slimtune", standalone_mode=False)
    except SlimtuneError as e:
        print(f"slimtune: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except USAGE_ERRORS as e:
        where = e.ctx.command_path if e.ctx else "slimtune"
        print(f"{where}: error: {cli_message(e.format_message())} (see '{where} --help')", file=sys.stderr)
        return 2
    except EXITS as e:
        return e.exit_code
    except (Stopped, *ABORTS):
        print("slimtune: interrupted", file=sys.stderr)
        return 128 + _stopped_by
    except CLICK_ERRORS as e:
        print(f"slimtune: error: {cli_message(e.format_message())}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # torch was loaded: leave a torchrun process group, if joined
            try:
                from .distributed import leave

                leave()
            except BaseException:  # an interrupt inside torch's own import leaves nothing to leave
                pass
    return code if isinstance(code, int) else 0  # without standalone mode, click returns an Exit's code


if __name__ == "__main__":
    sys.exit(main())

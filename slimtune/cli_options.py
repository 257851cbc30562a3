"""The command line's options: each library option (options.py: name, type, default, bounds) with the flag and
help the command line shows for it (FLAGS). `params(...)` turns the fields a command has into typer parameters,
`command(...)` gives a command body their values as the option groups (and plain values) its signature names, and
`cli_message(error)` shows the Python parameters a library message names as the flags the user typed. No torch.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Annotated

import typer

from . import options as declarations
from .choices import ADAMW_WEIGHT_DECAY, LORA_ALPHA_PER_RANK, LORA_TARGETS
from .options import DEFAULT_RECIPE, SAFETY_MARGIN, spec_of


@dataclass(frozen=True)
class Flag:
    """How one option appears on the command line."""

    flag: str  # e.g. "--seq-len"
    help: str
    cli_type: typing.Any = None  # the command line's type where it differs from the Python one (text parsed later)
    show_default: bool = True
    secondary: str = ""  # a boolean's off switch, e.g. "--no-full"


FLAGS = {  # Python name -> how the command line shows it
    # ModelSource
    "checkpoint": Flag(
        "--checkpoint",
        "Model: a .safetensors checkpoint, an hf folder, or a .pt/.pth/.bin state dict. (required)",
        show_default=False,
    ),
    "n_heads": Flag("--n-heads", "Heads, for checkpoints without slimtune_config.", show_default=False),
    "feature_type": Flag(
        "--feature-type",
        "sqr, relu, elu+1, abs, favor+ or favor+_N, for checkpoints without slimtune_config.",
        show_default=False,
    ),
    "layernorm": Flag("--layernorm", "post or pre, for checkpoints without slimtune_config.", show_default=False),
    # ModelShape
    "recipe": Flag(
        "--recipe",
        f"A recipe name (see `slimtune recipes`) or .toml path; flags override it. Default: {DEFAULT_RECIPE}.",
        show_default=False,
    ),
    "hidden_dim": Flag("--hidden-dim", "d (a multiple of 4 and of --n-heads).", show_default=False),
    "n_layers": Flag("--n-layers", "Layers.", show_default=False),
    "ffn_dim": Flag("--ffn-dim", "Feed-forward width (default 4d).", show_default=False),
    # Files
    "data": Flag("--data", "Text: a file of raw bytes. (required)", show_default=False),
    "eval_data": Flag("--eval-data", "Held-out text scored in bits per character.", show_default=False),
    "eval_fraction": Flag(
        "--eval-fraction",
        "Hold out the last share of --data (e.g. 0.05) for evaluation instead of --eval-data.",
        show_default=False,
    ),
    "out": Flag(
        "--out",
        "Where to write the fine-tuned checkpoint. Default: NAME-tuned.safetensors beside the input (never "
        "overwriting a file).",
        show_default=False,
    ),
    # DataOptions
    "seq_len": Flag("--seq-len", "L: bytes per training window."),
    "batch_size": Flag("--batch-size", "Windows per step."),
    "task": Flag("--task", "text, or copy: the paper's synthetic copying task."),
    "eval_every": Flag("--eval-every", "With held-out data: bpc every N steps (0: at the end)."),
    "tokenizer": Flag(
        "--tokenizer",
        "A Hugging Face tokenizer.json that encodes text and .jsonl data (needed for text when the vocabulary is not "
        "256 bytes; pretrain: the new model's vocabulary is the tokenizer's). The hf export carries it.",
    ),
    "data_dtype": Flag("--data-dtype", "The ids of a .bin data file: uint16 (nanoGPT's train.bin) or uint32."),
    # Optimization
    "steps": Flag("--steps", "Optimizer steps on seeded random windows."),
    "one_step": Flag(
        "--one-step",
        "Exactly one step on the first batch (row b = bytes [bL, bL+L+1)), as in the paper's on-device experiment.",
    ),
    "optimizer": Flag(
        "--optimizer", "sgd (plain, no momentum), adam, adamw or adafactor (factored second moments: least state)."
    ),
    "lr": Flag("--lr", "Learning rate."),
    "weight_decay": Flag(
        "--weight-decay",
        f"Weight decay of the weight matrices (never LayerNorm gains or biases). Default: {ADAMW_WEIGHT_DECAY} with "
        "adamw, else 0.",
        show_default=False,
    ),
    "schedule": Flag("--schedule", "Learning rate: constant, or cosine decay after the warmup."),
    "warmup": Flag("--warmup", "Steps of linear learning-rate warmup."),
    "clip_grad": Flag("--clip-grad", "Clip the gradients' global norm (opt-in).", show_default=False),
    "accumulate": Flag("--accumulate", "Batches whose gradients make one optimizer step."),
    "seed": Flag("--seed", "Seed for window sampling and FAVOR+ draws."),
    "skip_nonfinite": Flag(
        "--skip-nonfinite", "Skip (and count) steps with a non-finite loss or gradient instead of stopping."
    ),
    # Adapters
    "lora_rank": Flag(
        "--lora-rank",
        "LoRA: freeze the base and train rank-R adapters on each target map (e.g. --lora-rank 8); 0: full "
        "fine-tuning. --out is still the whole model, with the adapters merged in.",
    ),
    "lora_alpha": Flag(
        "--lora-alpha",
        f"LoRA scale: the adapters add (ALPHA / R) B A x (e.g. --lora-alpha 16). Default: {LORA_ALPHA_PER_RANK:g}R.",
        show_default=False,
    ),
    "lora_targets": Flag(
        "--lora-targets",
        f"LoRA: comma list of the maps that get adapters, out of {','.join(LORA_TARGETS)} (e.g. --lora-targets "
        "q_map,v_map).",
    ),
    "base_dtype": Flag(
        "--base-dtype",
        "With --lora-rank: what the frozen layers' weights are held in, each read straight into it. bf16: 2 bytes a "
        "weight. int8 (1 byte, a scale per row) and nf4 (4-bit NormalFloat, a scale per 64: 0.56 bytes) are "
        "quantized as read and dequantized a few MB at a time. All three compute under bf16 autocast. "
        "Adapters and their gradients stay fp32; --out merges into the input's own weights (e.g. --lora-rank 8 "
        "--base-dtype nf4).",
    ),
    "adapter_out": Flag(
        "--adapter-out",
        "With --lora-rank: also write the adapter alone, in PEFT's format, to this folder (e.g. --adapter-out "
        "tuned.adapter: adapter_config.json, adapter_model.safetensors).",
        show_default=False,
    ),
    # SlimStep
    "chunk_size": Flag(
        "--chunk-size",
        "C: 'auto' picks the C predicted fastest among those that fit --mem-budget (on a GPU normally the "
        "largest; on a CPU often a smaller one); 'max' the largest that fits (the paper's rule); 'full' or C >= L "
        "is ordinary backprop.",
        cli_type=str,
    ),
    "mem_budget": Flag(
        "--mem-budget",
        "Memory the job may hold in all (weights, gradients, optimizer state, one chunk's activations, states, "
        "runtime): a size (2GB = 2e9 bytes, 1.5GiB, 512MB) or a share of free memory (80%). Default: free memory "
        f"less {SAFETY_MARGIN:.0%}.",
        cli_type=str | None,
        show_default=False,
    ),
    "recovery": Flag(
        "--state-recovery",
        "How SLiM recovers each chunk's start states: subtract64 (the paper's subtraction with float64 states; "
        "exact, O(1) memory), subtract (the paper as published, fp32 states), store (keep every boundary state).",
    ),
    "precision": Flag(
        "--precision",
        "Compute precision: fp32, or bf16 (autocast: bf16 matmuls; fp32 weights, gradients, attention states and "
        "loss; no loss scaling needed).",
    ),
    # RunFolderOptions
    "run_dir": Flag(
        "--run-dir", "Run folder for metrics.jsonl and resumable state (auto: OUT.run; in Python None: no run folder)."
    ),
    "save_every": Flag("--save-every", "Save resumable state every N steps (and on Ctrl-C)."),
    "resume": Flag("--resume", "Continue the run saved in the run folder."),
    "restart": Flag("--restart", "Start over although the run folder holds a saved run (moved aside, kept)."),
    # ExportOptions
    "dtype": Flag("--dtype", "Dtype of the written weights: auto keeps each tensor's input dtype."),
    "format": Flag("--format", "safetensors (one file) or hf (a folder with model.safetensors and config.json)."),
    "overwrite": Flag(
        "--overwrite",
        "Replace an existing --out. Without it an existing --out is refused, unless it is the output of the run "
        "being resumed or restarted (--resume, --restart).",
    ),
    # Runtime
    "device": Flag("--device", "auto (cuda if usable), cpu, cuda or cuda:N."),
    "threads": Flag(
        "--threads",
        "CPU threads (also SLIMTUNE_THREADS). Default: the cores other processes leave free (see slimtune env).",
        show_default=False,
    ),
    # EvalOptions
    "max_bytes": Flag("--max-bytes", "Evaluate only the first N bytes.", show_default=False),
    "adapt": Flag(
        "--adapt",
        "one-step: the paper's on-device protocol (bpc of each window's second half before and after one SGD step "
        "on its first half).",
        show_default=False,
    ),
    "windows": Flag("--windows", "--adapt: windows sampled from the data (seeded)."),
    # GenerateOptions
    "prompt": Flag("--prompt", "Text to continue."),
    "n_bytes": Flag("--bytes", "How many tokens to sample (bytes for a byte-level model)."),
    "temperature": Flag("--temperature", "0 is greedy."),
    "top_k": Flag("--top-k", "Sample among the k likeliest tokens.", show_default=False),
    # BenchOptions
    "chunks": Flag("--chunks", "SLiM chunk sizes to measure, comma-separated; sizes >= L are skipped."),
    "full": Flag("--full", "Measure full backprop (the reference for the ratios).", secondary="--no-full"),
    "checkpointing": Flag(
        "--checkpointing",
        "Measure full backprop with per-layer activation checkpointing.",
        secondary="--no-checkpointing",
    ),
    "emulate_memory": Flag(
        "--emulate-memory",
        "CUDA only: cap this process at a smaller card's memory (e.g. 2GB), as "
        "torch.cuda.set_per_process_memory_fraction does.",
        show_default=False,
    ),
    "plot": Flag(
        "--plot",
        "Also draw time and memory against C into this .png (needs matplotlib: pip install 'slimtune[plot]').",
        show_default=False,
    ),
    # PlanOptions
    "compare": Flag(
        "--compare",
        "Also plan the other parameter-memory strategies under the budget (full fine-tuning with adam, adafactor "
        "and sgd; LoRA with an fp32 and a bf16 base), each with its C: one more probe per kind, so about "
        "three times as long.",
        secondary="--no-compare",
    ),
    # Output
    "json": Flag("--json", "Print one JSON object as the last line of stdout."),
    "tensors": Flag("--tensors", "Also list every tensor with its shape and dtype."),
    "workdir": Flag("--workdir", "Where the demo writes its data and checkpoints."),
}


def flag_for(name: str) -> str:
    """The flag the command line shows for a Python parameter name (the name itself when it has none)."""
    return FLAGS[name].flag if name in FLAGS else name


class Stopped(Exception):
    """Ctrl-C or SIGTERM outside a training run (loading, planning a `plan`, an export): main() reports it."""


def params(group: type, *names: str, exclude: tuple[str, ...] = (), **overrides: dict) -> list[inspect.Parameter]:
    """Typer parameters for `names` of `group` (default: every field of it that has a flag, less `exclude`), in
    that order. `overrides[name]` may change a command's `default`, `help`, `type` or make it an `argument`; the
    flag, the bounds and whether a resume must match it stay those of the declaration. Overrides of fields the
    group does not have are ignored (one override list may serve several groups)."""
    hints = typing.get_type_hints(group, globalns=vars(declarations))
    by_name = {f.name: f for f in fields(group)}
    chosen = names or [f.name for f in fields(group) if f.name in FLAGS and f.name not in exclude]
    found = []
    for name in chosen:
        f, over = by_name[name], overrides.get(name, {})
        spec, shown = spec_of(f), FLAGS[name]
        hint = over.get("type", shown.cli_type or hints[name])
        help_ = over.get("help", shown.help)
        if over.get("argument"):
            info = typer.Argument(help=help_, show_default=False)
            found.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hint, info]))
            continue
        bounds = {"min": spec.min} if spec.min is not None and _numeric(hint) else {}
        names_ = f"{shown.flag}/{shown.secondary}" if shown.secondary else shown.flag
        info = typer.Option(names_, help=help_, show_default=over.get("show_default", shown.show_default), **bounds)
        default = over.get("default", f.default)
        found.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, info])
        )
    return found


def _numeric(hint) -> bool:
    return hint in (int, float) or any(a in (int, float) for a in typing.get_args(hint))


def command(app: typer.Typer, *groups: list[inspect.Parameter], name: str | None = None):
    """Register `body` as a command whose flags are `groups` (lists from `params`), in the order --help shows them.

    The body's annotated parameters say what it is given. One annotated with an option group (a dataclass of
    options.py) gets that group made from the flags among its fields, its other fields keeping their declared
    defaults; one annotated with any other type gets the flag of its own name, which then goes to no group (plan's
    `--data`, a list of files, is not `Files.data`). Every flag must reach a parameter and every plain parameter
    name a flag: a body that would drop a flag, or wait for one that does not exist, fails at import. Making a group
    checks nothing (typer has parsed its choices already): the body calls `check()` where its errors belong."""
    signature = [p for group in groups for p in group]

    def register(body):
        build = _builders(body, [p.name for p in signature])

        def run(**values):
            try:
                return body(**{name: make(values) for name, make in build.items()})
            except KeyboardInterrupt:  # typer would turn it into a silent exit: main() says it was interrupted
                raise Stopped from None

        run.__signature__ = inspect.Signature(signature)
        run.__annotations__ = {p.name: p.annotation for p in signature}
        run.__name__, run.__doc__ = body.__name__, body.__doc__
        app.command(name=name or body.__name__.strip("_"))(run)
        return body

    return register


def _builders(body, flags: list[str]) -> dict[str, typing.Callable[[dict], typing.Any]]:
    """For each parameter of `body`, how its value is made from the parsed flags (see `command`)."""
    hints = typing.get_type_hints(body)
    names = list(inspect.signature(body).parameters)
    if untyped := [name for name in names if name not in hints]:
        raise TypeError(f"{body.__name__}: annotate the parameters {', '.join(untyped)}")
    plain = {name for name in names if not _group(hints[name])}
    if unknown := sorted(plain - set(flags)):
        raise TypeError(f"{body.__name__}: no flag for the parameters {', '.join(unknown)}")
    build, reached = {}, set(plain)
    for name in names:
        if name in plain:
            build[name] = lambda values, name=name: values[name]
            continue
        group = hints[name]
        given = [f.name for f in fields(group) if f.name in flags and f.name not in plain]
        if not given:
            raise TypeError(f"{body.__name__}: no flag for a field of {name}: {group.__name__}")
        reached.update(given)
        build[name] = lambda values, group=group, given=given: group(**{n: values[n] for n in given})
    if dropped := [flag for flag in flags if flag not in reached]:
        raise TypeError(f"{body.__name__}: the flags {', '.join(dropped)} reach no parameter")
    return build


def _group(hint) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


MARKED = re.compile(r"`([a-z_][a-z0-9_]*)((?:=[^`\s]*)?)`")  # `seq_len`, `optimizer=sgd`


def cli_message(error: BaseException | str) -> str:
    """A library error's or warning's message in the command line's words, on one line: each parameter it marks
    (`seq_len`, `optimizer=sgd`) shown as its flag (--seq-len, --optimizer=sgd); nothing else is touched."""
    text = " ".join(str(error).split())
    return MARKED.sub(lambda m: flag_for(m.group(1)) + m.group(2), text)

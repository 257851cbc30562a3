"""Every option of slimtune, declared once: its Python name, its flag, its help, its default, whether a resumed
run must match it (`resume`) and whether the exported checkpoint's provenance records it (`record`).

Options are grouped by concern in frozen dataclasses. `FitOptions`, what `slimtune.fit` and `slimtune.pretrain`
take, is the union of the training groups, so `FitOptions(seq_len=4096, steps=100)` reads flat. From these
declarations come the command line's options (cli.py builds each command's typer signature from the groups and
fields it names), the resume check (`resume_settings`), the provenance (`recorded`) and the flag a CLI error
names (`flag_for`). Adding an option to `fit` is one `option(...)` line here plus the code that uses it.

No torch here (nor in choices.py): `slimtune --help` reads this module.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from .choices import (
    ADAMW_WEIGHT_DECAY,
    LORA_ALPHA_PER_RANK,
    LORA_DEFAULT_TARGETS,
    LORA_TARGETS,
    Adapt,
    BaseDtype,
    Choice,
    ChunkRule,
    ExportDtype,
    ExportFormat,
    Heap,
    LayerNorm,
    Optimizer,
    Precision,
    Recovery,
    Schedule,
    Task,
)
from .errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """How one option appears outside Python."""

    flag: str  # e.g. "--seq-len"; "": an option of the Python API only
    help: str
    resume: bool = False  # a resumed run must have the same value (it changes the data, gradients or update)
    record: bool = False  # the exported checkpoint's provenance records it
    key: str = ""  # the provenance / run-state key where it differs from the Python name
    min: int | float | None = None  # smallest allowed value (inclusive), checked by `check` and by the CLI
    above: float | None = None  # exclusive lower bound (lr > 0)
    cli_type: typing.Any = None  # the command line's type where it differs from the Python one (text parsed later)
    show_default: bool = True
    secondary: str = ""  # a boolean's off switch, e.g. "--no-full"


def option(default, flag: str, help: str, **kw) -> typing.Any:
    """A dataclass field carrying its Flag."""
    return field(default=default, metadata={"flag": Flag(flag, help, **kw)})


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, globalns=globals())


def _choice_of(hint) -> type[Choice] | None:
    """The Choice enum inside a field type such as `Optimizer` or `Optimizer | None`."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, Choice)), None)


def _is_int(hint) -> bool:
    return hint is int or int in typing.get_args(hint) and float not in typing.get_args(hint)


class Options:
    """What every group shares: choices parsed from strings, numbers checked against their declared bounds."""

    def __post_init__(self):
        for f in fields(self):
            choice = _choice_of(_hints(type(self))[f.name])
            value = getattr(self, f.name)
            if choice is not None and value is not None:
                object.__setattr__(self, f.name, choice.parse(value, f.name))

    def check(self) -> None:
        """Raise ConfigError naming the parameter for a value outside its declared bounds."""
        hints = _hints(type(self))
        for f in fields(self):
            spec, value = f.metadata.get("flag"), getattr(self, f.name)
            if spec is None or value is None or (spec.min is None and spec.above is None):
                continue
            whole = _is_int(hints[f.name])
            kind = "an integer" if whole else "a finite number"
            bound = f">= {spec.min}" if spec.min is not None else f"> {spec.above}"
            wrong = isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
            if wrong or not math.isfinite(value) or (spec.min is not None and value < spec.min):
                raise ConfigError(f"`{f.name}` must be {kind} {bound}, got {value!r}", params=(f.name,))
            if spec.above is not None and not value > spec.above:
                raise ConfigError(f"`{f.name}` must be {kind} {bound}, got {value!r}", params=(f.name,))

    def resume_settings(self) -> dict:
        """The values a resumed run must share with the run it continues, as plain values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if _spec(f).resume}

    def recorded(self) -> dict:
        """The values the exported checkpoint's provenance records, under their provenance keys."""
        return {_spec(f).key or f.name: _plain(getattr(self, f.name)) for f in fields(self) if _spec(f).record}


def _spec(f) -> Flag:
    return f.metadata.get("flag") or Flag("", "")


def _plain(value):
    return value.value if isinstance(value, Choice) else value


DEFAULT_RECIPE = "small"  # the model and training of `pretrain` without a recipe
SAFETY_MARGIN = 0.10  # with no `mem_budget`, leave this share of the free memory alone


# -- the groups -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource(Options):
    """Where the model comes from; the three settings a checkpoint without slimtune_config lacks."""

    checkpoint: Path | None = option(
        None,
        "--checkpoint",
        "Model: a .safetensors checkpoint, an hf folder, or a .pt/.pth/.bin state dict. (required)",
        show_default=False,
    )
    n_heads: int | None = option(
        None, "--n-heads", "Heads, for checkpoints without slimtune_config.", min=1, show_default=False
    )
    feature_type: str | None = option(
        None,
        "--feature-type",
        "sqr, relu, elu+1, abs, favor+ or favor+_N, for checkpoints without slimtune_config.",
        show_default=False,
    )
    layernorm: LayerNorm | None = option(
        None, "--layernorm", "post or pre, for checkpoints without slimtune_config.", show_default=False
    )

    def model_flags(self) -> dict:
        return {"n_heads": self.n_heads, "feature_type": self.feature_type, "layernorm": self.layernorm}


@dataclass(frozen=True)
class ModelShape(Options):
    """A new model's sizes (pretrain); unset ones come from the recipe."""

    recipe: str | None = option(
        None,
        "--recipe",
        f"A recipe name (see `slimtune recipes`) or .toml path; flags override it. Default: {DEFAULT_RECIPE}.",
        show_default=False,
    )
    hidden_dim: int | None = option(
        None, "--hidden-dim", "d (a multiple of 4 and of --n-heads).", min=4, show_default=False
    )
    n_layers: int | None = option(None, "--n-layers", "Layers.", min=1, show_default=False)
    ffn_dim: int | None = option(None, "--ffn-dim", "Feed-forward width (default 4d).", min=1, show_default=False)


@dataclass(frozen=True)
class Files(Options):
    """The files a command reads and writes."""

    data: Path | None = option(None, "--data", "Text: a file of raw bytes. (required)", show_default=False)
    eval_data: Path | None = option(
        None, "--eval-data", "Held-out text scored in bits per character.", show_default=False
    )
    eval_fraction: float | None = option(
        None,
        "--eval-fraction",
        "Hold out the last share of --data (e.g. 0.05) for evaluation instead of --eval-data.",
        show_default=False,
    )
    out: Path | None = option(
        None,
        "--out",
        "Where to write the fine-tuned checkpoint. Default: NAME-tuned.safetensors beside the input (never "
        "overwriting a file).",
        show_default=False,
    )


@dataclass(frozen=True)
class DataOptions(Options):
    """What a step reads: windows of the data, or the copy task; held-out scoring."""

    seq_len: int = option(1024, "--seq-len", "L: bytes per training window.", min=1, resume=True, record=True)
    batch_size: int = option(1, "--batch-size", "Windows per step.", min=1, resume=True, record=True)
    task: Task = option(
        Task.TEXT, "--task", "text, or copy: the paper's synthetic copying task.", resume=True, record=True
    )
    copy_symbols: int = option(16, "", "Copy task: size of the symbol alphabet.", min=1, resume=True)
    eval_every: int = option(0, "--eval-every", "With held-out data: bpc every N steps (0: at the end).", min=0)
    eval_bytes: int | None = option(100_000, "", "Bytes of the held-out data each evaluation scores (None: all).")


@dataclass(frozen=True)
class Optimization(Options):
    """The update: optimizer, schedule, steps, and what to do with a bad step."""

    steps: int = option(1, "--steps", "Optimizer steps on seeded random windows.", min=1, resume=True, record=True)
    one_step: bool = option(
        False,
        "--one-step",
        "Exactly one step on the first batch (row b = bytes [bL, bL+L+1)), as in the paper's on-device experiment.",
        resume=True,
        record=True,
    )
    optimizer: Optimizer = option(
        Optimizer.ADAM,
        "--optimizer",
        "sgd (plain, no momentum), adam, adamw or adafactor (factored second moments: least state).",
        resume=True,
        record=True,
    )
    lr: float = option(1e-3, "--lr", "Learning rate.", above=0.0, resume=True, record=True)
    weight_decay: float | None = option(
        None,
        "--weight-decay",
        f"Weight decay of the weight matrices (never LayerNorm gains or biases). Default: {ADAMW_WEIGHT_DECAY} with "
        "adamw, else 0.",
        min=0.0,
        show_default=False,
        resume=True,
        record=True,
    )
    schedule: Schedule = option(
        Schedule.CONSTANT,
        "--schedule",
        "Learning rate: constant, or cosine decay after the warmup.",
        resume=True,
        record=True,
    )
    warmup: int = option(0, "--warmup", "Steps of linear learning-rate warmup.", min=0, resume=True)
    clip_grad: float | None = option(
        None, "--clip-grad", "Clip the gradients' global norm (opt-in).", above=0.0, show_default=False, resume=True
    )
    accumulate: int = option(
        1, "--accumulate", "Batches whose gradients make one optimizer step.", min=1, resume=True, record=True
    )
    seed: int = option(0, "--seed", "Seed for window sampling and FAVOR+ draws.", resume=True, record=True)
    skip_nonfinite: bool = option(
        False,
        "--skip-nonfinite",
        "Skip (and count) steps with a non-finite loss or gradient instead of stopping.",
        resume=True,
    )


@dataclass(frozen=True)
class Adapters(Options):
    """Parameter memory (CONTRACT.md section 4): LoRA adapters on a frozen base, the base's dtype, the adapter's
    own export."""

    lora_rank: int = option(
        0,
        "--lora-rank",
        "LoRA: freeze the base and train rank-R adapters on each target map (e.g. --lora-rank 8); 0: full "
        "fine-tuning. --out is still the whole model, with the adapters merged in.",
        min=0,
        resume=True,
        record=True,
    )
    lora_alpha: float | None = option(
        None,
        "--lora-alpha",
        f"LoRA scale: the adapters add (ALPHA / R) B A x (e.g. --lora-alpha 16). Default: {LORA_ALPHA_PER_RANK:g}R.",
        above=0.0,
        show_default=False,
        resume=True,
        record=True,
    )
    lora_targets: str = option(
        ",".join(LORA_DEFAULT_TARGETS),
        "--lora-targets",
        f"LoRA: comma list of the maps that get adapters, out of {','.join(LORA_TARGETS)} (e.g. --lora-targets "
        "q_map,v_map).",
        resume=True,
        record=True,
    )
    base_dtype: BaseDtype = option(
        BaseDtype.FP32,
        "--base-dtype",
        "With --lora-rank: bf16 keeps the frozen layers' weights in 2 bytes, read straight into bf16, and computes "
        "under bf16 autocast (--precision bf16); adapters and their gradients stay fp32 (e.g. --lora-rank 8 "
        "--base-dtype bf16).",
        resume=True,
        record=True,
    )
    adapter_out: Path | None = option(
        None,
        "--adapter-out",
        "With --lora-rank: also write the adapter alone, in PEFT's format, to this folder (e.g. --adapter-out "
        "tuned.adapter: adapter_config.json, adapter_model.safetensors).",
        show_default=False,
    )

    @property
    def targets(self) -> tuple[str, ...]:
        return lora_targets(self.lora_targets)

    def check(self) -> None:
        super().check()
        if self.lora_rank:
            self.targets  # noqa: B018 (checks them)
            return
        given = [name for name in ("lora_alpha", "adapter_out") if getattr(self, name) is not None]
        given += ["base_dtype=bf16"] if self.base_dtype == BaseDtype.BF16 else []
        if given:
            raise ConfigError(
                f"{', '.join(f'`{g}`' for g in given)} {'needs' if len(given) == 1 else 'need'} LoRA: give "
                "`lora_rank` (e.g. 8)",
                params=("lora_rank",),
            )


def lora_targets(targets) -> tuple[str, ...]:
    """A comma list (or a sequence) of LoRA target module names, checked (ConfigError naming the unknown ones)."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(
            f"`lora_targets` {','.join(names) or '(empty)'}: "
            + (f"unknown {', '.join(unknown)}; " if unknown else "")
            + f"choose from {','.join(LORA_TARGETS)}",
            params=("lora_targets",),
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class SlimStep(Options):
    """How one step is computed: the chunk size and what bounds it, state recovery, precision."""

    chunk_size: int | str | None = option(
        None,
        "--chunk-size",
        "C: 'auto' picks the C predicted fastest among those that fit --mem-budget (on a GPU normally the "
        "largest; on a CPU often a smaller one); 'max' the largest that fits (the paper's rule); 'full' or C >= L "
        "is ordinary backprop.",
        cli_type=str,
    )
    mem_budget: int | str | None = option(
        None,
        "--mem-budget",
        "Memory the job may hold in all (weights, gradients, optimizer state, one chunk's activations, states, "
        "runtime): a size (2GB = 2e9 bytes, 1.5GiB, 512MB) or a share of free memory (80%). Default: free memory "
        f"less {SAFETY_MARGIN:.0%}.",
        cli_type=str | None,
        show_default=False,
    )
    recovery: Recovery = option(
        Recovery.SUBTRACT64,
        "--state-recovery",
        "How SLiM recovers each chunk's start states: subtract64 (the paper's subtraction with float64 states; "
        "exact, O(1) memory), subtract (the paper as published, fp32 states), store (keep every boundary state).",
        resume=True,
        record=True,
        key="state_recovery",
    )
    precision: Precision = option(
        Precision.FP32,
        "--precision",
        "Compute precision: fp32, or bf16 (autocast: bf16 matmuls; fp32 weights, gradients, attention states and "
        "loss; no loss scaling needed).",
        resume=True,
        record=True,
    )
    batch_weight_grads: bool | None = option(
        None, "", "Small C: batch weight gradients over chunks (deferred.py); None: when the plan can afford it."
    )


@dataclass(frozen=True)
class RunFolderOptions(Options):
    """Where a run keeps its metrics and resumable state."""

    run_dir: str | None = option(
        "auto",
        "--run-dir",
        "Run folder for metrics.jsonl and resumable state (auto: OUT.run; in Python None: no run folder).",
    )
    save_every: int = option(100, "--save-every", "Save resumable state every N steps (and on Ctrl-C).", min=0)
    resume: bool = option(False, "--resume", "Continue the run saved in the run folder.")
    restart: bool = option(
        False, "--restart", "Start over although the run folder holds a saved run (moved aside, kept)."
    )


@dataclass(frozen=True)
class ExportOptions(Options):
    """How the result is written."""

    dtype: ExportDtype = option(
        ExportDtype.AUTO, "--dtype", "Dtype of the written weights: auto keeps each tensor's input dtype."
    )
    format: ExportFormat = option(
        ExportFormat.SAFETENSORS,
        "--format",
        "safetensors (one file) or hf (a folder with model.safetensors and config.json).",
    )
    overwrite: bool = option(
        False,
        "--overwrite",
        "Replace an existing --out. Without it an existing --out is refused, unless it is the output of the run "
        "being resumed or restarted (--resume, --restart).",
    )


@dataclass(frozen=True)
class Runtime(Options):
    """Where and how the process computes. Placement only: results are the same under every setting."""

    device: str = option("auto", "--device", "auto (cuda if usable), cpu, cuda or cuda:N.")
    threads: int | None = option(
        None,
        "--threads",
        "CPU threads (also SLIMTUNE_THREADS). Default: the cores other processes leave free (see slimtune env).",
        min=1,
        show_default=False,
    )
    heap: Heap = option(
        Heap.MANAGED,
        "",
        "CPU: managed sets glibc's heap thresholds (tight while planning, then the plan's choice); system leaves "
        "glibc's own.",
    )


@dataclass(frozen=True)
class FitOptions(Runtime, ExportOptions, RunFolderOptions, SlimStep, Adapters, Optimization, DataOptions):
    """What `slimtune.fit` and `slimtune.pretrain` take: the training groups, flat (`options.seq_len`)."""

    def check(self) -> None:
        super().check()  # Adapters' check among them
        chunk_request(self.chunk_size, self.seq_len)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)):
            raise ConfigError(f"`threads` must be a positive integer, got {self.threads!r}", params=("threads",))
        if self.resume and self.restart:
            raise ConfigError(
                "`resume` continues the saved run and `restart` starts over: give one of them",
                params=("resume", "restart"),
            )

    @property
    def total_steps(self) -> int:
        return 1 if self.one_step else self.steps

    @property
    def effective_weight_decay(self) -> float:
        if self.one_step:
            return 0.0
        if self.weight_decay is not None:
            return self.weight_decay
        return self.optimizer.default_weight_decay

    @property
    def compute_precision(self) -> Precision:
        """What the steps compute in: a bf16 base under bf16 autocast, else `precision` (BaseDtype.compute)."""
        return self.base_dtype.compute(self.precision)

    def _effective(self) -> dict:  # what the run does, where a default or another option decides it
        return {"weight_decay": self.effective_weight_decay, "precision": _plain(self.compute_precision)}

    def resume_settings(self) -> dict:
        return super().resume_settings() | self._effective()

    def recorded(self) -> dict:
        return super().recorded() | self._effective()


def fit_options(options: FitOptions | None, overrides: dict) -> FitOptions:
    """`options` (FitOptions() when None) with keyword `overrides` replacing its fields, checked: what the
    library calls that take FitOptions and keywords (fit, pretrain, plan_fit) start from."""
    try:
        options = replace(options, **overrides) if options is not None else FitOptions(**overrides)
    except TypeError as e:
        raise ConfigError(f"unknown fit option ({e}): see slimtune.FitOptions for the names") from None
    options.check()
    return options


TRAINING_GROUPS = tuple(c for c in reversed(FitOptions.__mro__[1:]) if issubclass(c, Options) and c is not Options)


# Defaults of commands that share another group's flag but not its default (`eval --lr`, `bench --steps`): the
# library functions and the command line read them from here.
ADAPT_LR = 0.01  # adapt_one_step's SGD step (eval --adapt --lr)
ADAPT_CHUNK = "auto"  # its C (eval --adapt --chunk-size)
BENCH_STEPS, BENCH_WARMUP = 3, 1  # run_bench's timed and untimed steps per method
BENCH_SEQ_LEN = 1024  # bench's L without a recipe's


@dataclass(frozen=True)
class EvalOptions(Options):
    max_bytes: int | None = option(None, "--max-bytes", "Evaluate only the first N bytes.", min=2, show_default=False)
    adapt: Adapt | None = option(
        None,
        "--adapt",
        "one-step: the paper's on-device protocol (bpc of each window's second half before and after one SGD step "
        "on its first half).",
        show_default=False,
    )
    windows: int = option(8, "--windows", "--adapt: windows sampled from the data (seeded).", min=1)


@dataclass(frozen=True)
class GenerateOptions(Options):
    prompt: str = option("The ", "--prompt", "Text to continue.")
    n_bytes: int = option(200, "--bytes", "How many bytes to sample.", min=0)
    temperature: float = option(0.8, "--temperature", "0 is greedy.", min=0.0)
    top_k: int | None = option(None, "--top-k", "Sample among the k likeliest bytes.", min=1, show_default=False)


@dataclass(frozen=True)
class BenchOptions(Options):
    chunks: str = option(
        "1024,256,64,16", "--chunks", "SLiM chunk sizes to measure, comma-separated; sizes >= L are skipped."
    )
    full: bool = option(True, "--full", "Measure full backprop (the reference for the ratios).", secondary="--no-full")
    checkpointing: bool = option(
        True,
        "--checkpointing",
        "Measure full backprop with per-layer activation checkpointing.",
        secondary="--no-checkpointing",
    )
    emulate_memory: str | None = option(
        None,
        "--emulate-memory",
        "CUDA only: cap this process at a smaller card's memory (e.g. 2GB), as "
        "torch.cuda.set_per_process_memory_fraction does.",
        show_default=False,
    )
    plot: Path | None = option(
        None,
        "--plot",
        "Also draw time and memory against C into this .png (needs matplotlib: pip install 'slimtune[plot]').",
        show_default=False,
    )


@dataclass(frozen=True)
class PlanOptions(Options):
    compare: bool = option(
        True,
        "--compare",
        "Also plan the other parameter-memory strategies under the budget (full fine-tuning with adam, adafactor "
        "and sgd; LoRA with an fp32 and a bf16 base), each with its C: one more probe per kind, so about "
        "three times as long.",
        secondary="--no-compare",
    )


@dataclass(frozen=True)
class Output(Options):
    """How a command reports."""

    json: bool = option(False, "--json", "Print one JSON object as the last line of stdout.")
    tensors: bool = option(False, "--tensors", "Also list every tensor with its shape and dtype.")
    workdir: Path = option(Path("slimtune-demo"), "--workdir", "Where the demo writes its data and checkpoints.")


ALL_GROUPS = (
    ModelSource,
    ModelShape,
    Files,
    *TRAINING_GROUPS,
    EvalOptions,
    GenerateOptions,
    BenchOptions,
    PlanOptions,
    Output,
)


def declared() -> dict[str, tuple[type, Flag]]:
    """Every declared option: Python name -> (its group, its Flag). A name is declared in one group only."""
    found: dict[str, tuple[type, Flag]] = {}
    for group in ALL_GROUPS:
        for f in fields(group):
            if f.name in found and found[f.name][1] is not f.metadata["flag"]:
                raise AssertionError(
                    f"option {f.name} is declared twice ({found[f.name][0].__name__}, {group.__name__})"
                )
            found.setdefault(f.name, (group, f.metadata["flag"]))
    return found


def chunk_request(value: int | str | None, seq_len: int) -> int | None:
    """A chunk_size option as an integer: 'full' -> L (ordinary backprop), 'auto', 'max' or None -> None (the
    planner picks, by `chunk_rule`), else an integer >= 1."""
    if value is None or value in tuple(ChunkRule):
        return None
    if value == "full":
        return seq_len
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ConfigError(
            f"`chunk_size` must be auto, max, full or an integer >= 1, got {value!r}", params=("chunk_size",)
        )
    return size


def chunk_rule(value: int | str | None) -> ChunkRule:
    """How the planner picks C for a chunk_size option: 'max' the largest that fits, else the fastest."""
    return ChunkRule.LARGEST if value == ChunkRule.LARGEST else ChunkRule.FASTEST


def default_of(group: type, name: str):
    f = next(f for f in fields(group) if f.name == name)
    return f.default if f.default is not MISSING else None


def flag_for(name: str) -> str:
    """The flag the command line shows for a Python parameter name (the name itself when it has none)."""
    entry = declared().get(name)
    return entry[1].flag if entry and entry[1].flag else name

"""Every option of slimtune's library, declared once: its Python name, type, default and bounds, whether a resumed
run must match it (`resume`) and whether the exported checkpoint's provenance records it (`record`).

Options are grouped by concern in frozen dataclasses. `FitOptions`, what `slimtune.fit` and `slimtune.pretrain`
take, is the union of the training groups, so `FitOptions(seq_len=4096, steps=100)` reads flat. From these
declarations come the resume check (`resume_settings`), the provenance (`recorded`) and the bounds every caller is
held to (`check`). How the command line shows an option (its flag and help) is the interface's business
(cli_options.FLAGS); adding an option to `fit` is one `option(...)` line here, one FLAGS line there, and the code
that uses it.

No torch here (nor in choices.py): the command line's help reads this module.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from .choices import (
    LORA_DEFAULT_TARGETS,
    LORA_TARGETS,
    Adapt,
    BaseDtype,
    Choice,
    ChunkRule,
    DataDtype,
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
from .units import parse_budget


@dataclass(frozen=True)
class Spec:
    """What the library holds an option to, besides its type and default."""

    resume: bool = False  # a resumed run must have the same value (it changes the data, gradients or update)
    record: bool = False  # the exported checkpoint's provenance records it
    key: str = ""  # the provenance / run-state key where it differs from the Python name
    min: int | float | None = None  # smallest allowed value (inclusive), checked by `check` and by the CLI
    above: float | None = None  # exclusive lower bound (lr > 0)


def option(default, **kw) -> typing.Any:
    """A dataclass field carrying its Spec."""
    return field(default=default, metadata={"spec": Spec(**kw)})


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
            spec, value = spec_of(f), getattr(self, f.name)
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
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if spec_of(f).resume}

    def recorded(self) -> dict:
        """The values the exported checkpoint's provenance records, under their provenance keys."""
        return {spec_of(f).key or f.name: _plain(getattr(self, f.name)) for f in fields(self) if spec_of(f).record}


def spec_of(f) -> Spec:
    """A dataclass field's Spec."""
    return f.metadata.get("spec") or Spec()


def _plain(value):
    return value.value if isinstance(value, Choice) else value


DEFAULT_RECIPE = "small"  # the model and training of `pretrain` without a recipe
SAFETY_MARGIN = 0.10  # with no `mem_budget`, leave this share of the free memory alone


@dataclass(frozen=True)
class ModelSource(Options):
    """Where the model comes from; the three settings a checkpoint without slimtune_config lacks."""

    checkpoint: Path | None = option(None)
    n_heads: int | None = option(None, min=1)
    feature_type: str | None = option(None)
    layernorm: LayerNorm | None = option(None)

    def model_flags(self) -> dict:
        return {"n_heads": self.n_heads, "feature_type": self.feature_type, "layernorm": self.layernorm}


@dataclass(frozen=True)
class ModelShape(Options):
    """A new model's sizes (pretrain); unset ones come from the recipe."""

    recipe: str | None = option(None)
    hidden_dim: int | None = option(None, min=4)
    n_layers: int | None = option(None, min=1)
    ffn_dim: int | None = option(None, min=1)


@dataclass(frozen=True)
class Files(Options):
    """The files a command reads and writes."""

    data: Path | None = option(None)
    eval_data: Path | None = option(None)
    eval_fraction: float | None = option(None)
    out: Path | None = option(None)


@dataclass(frozen=True)
class DataOptions(Options):
    """What a step reads: windows of the data, or the copy task; held-out scoring."""

    seq_len: int = option(1024, min=1, resume=True, record=True)
    batch_size: int = option(1, min=1, resume=True, record=True)
    task: Task = option(Task.TEXT, resume=True, record=True)
    copy_symbols: int = option(16, min=1, resume=True)
    eval_every: int = option(0, min=0)
    eval_bytes: int | None = option(100_000)
    tokenizer: Path | None = option(None, resume=True)
    data_dtype: DataDtype = option(DataDtype.UINT16, resume=True)


@dataclass(frozen=True)
class Optimization(Options):
    """The update: optimizer, schedule, steps, and what to do with a bad step."""

    steps: int = option(1, min=1, resume=True, record=True)
    one_step: bool = option(False, resume=True, record=True)
    optimizer: Optimizer = option(Optimizer.ADAM, resume=True, record=True)
    lr: float = option(1e-3, above=0.0, resume=True, record=True)
    weight_decay: float | None = option(None, min=0.0, resume=True, record=True)
    schedule: Schedule = option(Schedule.CONSTANT, resume=True, record=True)
    warmup: int = option(0, min=0, resume=True)
    clip_grad: float | None = option(None, above=0.0, resume=True)
    accumulate: int = option(1, min=1, resume=True, record=True)
    seed: int = option(0, resume=True, record=True)
    skip_nonfinite: bool = option(False, resume=True)


@dataclass(frozen=True)
class Adapters(Options):
    """Parameter memory (CONTRACT.md section 4): LoRA adapters on a frozen base, the base's dtype, the adapter's
    own export."""

    lora_rank: int = option(0, min=0, resume=True, record=True)
    lora_alpha: float | None = option(None, above=0.0, resume=True, record=True)
    lora_targets: str = option(",".join(LORA_DEFAULT_TARGETS), resume=True, record=True)
    base_dtype: BaseDtype = option(BaseDtype.FP32, resume=True, record=True)
    adapter_out: Path | None = option(None)

    @property
    def targets(self) -> tuple[str, ...]:
        return lora_targets(self.lora_targets)

    def check(self) -> None:
        super().check()
        if self.lora_rank:
            self.targets  # noqa: B018 (checks them)
            return
        given = [name for name in ("lora_alpha", "adapter_out") if getattr(self, name) is not None]
        given += [f"base_dtype={self.base_dtype}"] if self.base_dtype != BaseDtype.FP32 else []
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

    chunk_size: int | str | None = option(None)
    mem_budget: int | str | None = option(None)
    recovery: Recovery = option(Recovery.SUBTRACT64, resume=True, record=True, key="state_recovery")
    precision: Precision = option(Precision.FP32, resume=True, record=True)
    batch_weight_grads: bool | None = option(None)

    def check(self) -> None:
        super().check()
        if self.mem_budget is not None:
            parse_budget(self.mem_budget)  # before any file is read: a budget that cannot be read is refused first


@dataclass(frozen=True)
class RunFolderOptions(Options):
    """Where a run keeps its metrics and resumable state."""

    run_dir: str | None = option("auto")
    save_every: int = option(100, min=0)
    resume: bool = option(False)
    restart: bool = option(False)


@dataclass(frozen=True)
class ExportOptions(Options):
    """How the result is written."""

    dtype: ExportDtype = option(ExportDtype.AUTO)
    format: ExportFormat = option(ExportFormat.SAFETENSORS)
    overwrite: bool = option(False)


@dataclass(frozen=True)
class Runtime(Options):
    """Where and how the process computes. Placement only: results are the same under every setting."""

    device: str = option("auto")
    threads: int | None = option(None, min=1)
    heap: Heap = option(Heap.MANAGED)


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
        """What the steps compute in: a bf16 or quantized base under bf16 autocast, else `precision`
        (BaseDtype.compute)."""
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
    max_bytes: int | None = option(None, min=2)
    adapt: Adapt | None = option(None)
    windows: int = option(8, min=1)


@dataclass(frozen=True)
class GenerateOptions(Options):
    prompt: str = option("The ")
    n_bytes: int = option(200, min=0)
    temperature: float = option(0.8, min=0.0)
    top_k: int | None = option(None, min=1)


@dataclass(frozen=True)
class BenchOptions(Options):
    chunks: str = option("1024,256,64,16")
    full: bool = option(True)
    checkpointing: bool = option(True)
    emulate_memory: str | None = option(None)
    plot: Path | None = option(None)


@dataclass(frozen=True)
class PlanOptions(Options):
    compare: bool = option(True)


@dataclass(frozen=True)
class Output(Options):
    """How a command reports."""

    json: bool = option(False)
    tensors: bool = option(False)
    workdir: Path = option(Path("slimtune-demo"))


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


def declared() -> dict[str, type]:
    """Every declared option: Python name -> its group. A name is declared in one group only."""
    found: dict[str, type] = {}
    for group in ALL_GROUPS:
        for f in fields(group):
            if f.name in found and found[f.name] is not group and not issubclass(group, found[f.name]):
                raise AssertionError(f"option {f.name} is declared twice ({found[f.name].__name__}, {group.__name__})")
            found.setdefault(f.name, group)
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

"""Parameter-memory strategies, planned with C under one budget (`slimtune plan`; CONTRACT.md section 4).

A strategy is what trains and in which dtype: full fine-tuning with one optimizer, or LoRA adapters on a frozen
base in fp32, bf16, int8 or nf4. Each has its own memory (gradients and optimizer state of what trains, the base's
bytes, a quantized map's dequantized weight while it computes) and its own C, so the planner probes each as its fit
would, and `compare` puts them side by side. The model is converted in place, from the most memory to the least:
full -> LoRA (fp32 base) -> bf16 base -> int8 base -> nf4 base, and each strategy's probe runs on the model as that
strategy trains it. No strategy is switched on for the user: `compare` only
reports, and a run trains the strategy it was given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial

from . import lora
from .choices import LORA_COMPARED_RANK, LORA_DEFAULT_TARGETS, BaseDtype, ChunkRule, Optimizer, Precision
from .data import held_while_training, read_data
from .devices import resolve_budget
from .errors import OutOfBudgetError
from .options import FitOptions, chunk_request, chunk_rule, fit_options
from .planner import HEADROOM, Plan, Workload, budget_holding, gradient_bytes, held_bytes, plan_chunk_size, usable_bytes
from .runplan import RunPlan, parameter_counts
from .units import format_size

FULL_OPTIMIZERS = (Optimizer.ADAM, Optimizer.ADAFACTOR, Optimizer.SGD)


@dataclass(frozen=True)
class Strategy:
    """What trains: every parameter (lora_rank 0) or rank-R adapters on a frozen base in `base_dtype`."""

    optimizer: Optimizer = Optimizer.ADAM
    lora_rank: int = 0
    base_dtype: BaseDtype = BaseDtype.FP32
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "optimizer", Optimizer.parse(self.optimizer, "optimizer"))
        object.__setattr__(self, "base_dtype", BaseDtype.parse(self.base_dtype, "base_dtype"))

    @classmethod
    def of(cls, options) -> Strategy:
        """The strategy a run's options (FitOptions) ask for."""
        return cls(
            options.optimizer, options.lora_rank, options.base_dtype, options.lora_alpha, options.targets, options.seed
        )

    @property
    def stage(self) -> int:
        """0 full, then LoRA on an fp32 (1), bf16 (2), int8 (3) or nf4 (4) base: the order the model converts in
        place."""
        return 0 if not self.lora_rank else 1 + list(BaseDtype).index(self.base_dtype)

    @property
    def name(self) -> str:
        if not self.lora_rank:
            return f"full fine-tuning, {self.optimizer}"
        return f"LoRA r{self.lora_rank}, {self.base_dtype} base, {self.optimizer}"

    def selected(self) -> dict[str, str]:
        """The parameters that select it (Python names; the CLI shows them as flags)."""
        chosen = {"optimizer": str(self.optimizer)}
        if self.lora_rank:
            chosen["lora_rank"] = str(self.lora_rank)
        if self.base_dtype != BaseDtype.FP32:
            chosen["base_dtype"] = str(self.base_dtype)
        return chosen

    @property
    def settings(self) -> str:
        """The parameters that select it, marked as the library's errors mark them (`optimizer=sgd`)."""
        return " ".join(f"`{name}={value}`" for name, value in self.selected().items())

    def precision(self, asked: Precision | str) -> Precision:
        """What a step computes in under this strategy (BaseDtype.compute: a bf16 or quantized base under bf16
        autocast, an fp32 base as asked)."""
        return (self.base_dtype if self.lora_rank else BaseDtype.FP32).compute(asked)

    @property
    def read_dtype(self):
        """What load_checkpoint reads the base into for this strategy (None: as stored, mapped): a bf16 or quantized
        base as it is read, tensor by tensor."""
        return lora.read_dtypes(self.base_dtype.held) if self.stage >= 2 else None

    def apply(self, model) -> None:
        """Make `model` train this way, in place: adapters on the targets (lora_A from `seed`), the frozen layers'
        weights in the base dtype or quantized. A model already at an earlier stage moves on; none goes back."""
        if self.lora_rank and not lora.adapted(model):
            lora.add(model, rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets, seed=self.seed)
        if self.lora_rank and self.base_dtype.quantized:
            lora.quantize_base(model, self.base_dtype.held)
        elif self.lora_rank:
            lora.freeze_base_to(model, self.base_dtype.held)


@dataclass
class StrategyRow:
    """One strategy under the budget: its C (None: none fits) and what it is predicted to hold and take."""

    strategy: Strategy
    name: str
    asked: bool
    chunk_size: int | None
    predicted_peak_bytes: int | None  # at that C (None where none fits)
    seconds: float | None  # predicted seconds per step at that C (None: unknown, or none fits)
    trainable_parameters: int
    note: str = ""  # why none fits

    def to_json(self) -> dict:
        return asdict(self) | {"strategy": {k: str(v) if k != "lora_targets" else list(v)
                                            for k, v in asdict(self.strategy).items()}}  # fmt: skip


@dataclass
class Comparison:
    asked: Plan | None  # the plan of the strategy asked for (None where it fits no C)
    error: OutOfBudgetError | None  # why it does not fit, naming the strategies that do
    rows: list[StrategyRow]


def lineup(asked: Strategy) -> list[Strategy]:
    """The strategies compared with `asked`: full fine-tuning with adam, adafactor and sgd (and the optimizer asked
    for, if another), then LoRA of the asked rank (LORA_COMPARED_RANK for a full run) on each base (fp32, bf16, int8,
    nf4), with the optimizer asked for."""
    rank = asked.lora_rank or LORA_COMPARED_RANK
    optimizers = dict.fromkeys([asked.optimizer, *FULL_OPTIMIZERS] if not asked.lora_rank else FULL_OPTIMIZERS)
    lora_ = replace(asked, lora_rank=rank)
    strategies = [replace(asked, optimizer=o, lora_rank=0, base_dtype=BaseDtype.FP32) for o in optimizers]
    strategies += [replace(lora_, base_dtype=base) for base in BaseDtype]
    return strategies


def compare(
    model,
    asked: Strategy,
    work: Workload,
    budget,
    *,
    heap="system",
    resident_data: int = 0,
    rule: ChunkRule | str = ChunkRule.FASTEST,
    forced: int | None = None,
    on_stage: Callable[[int, int, str], None] | None = None,
    on_planned: Callable[[Strategy, Plan], None] | None = None,
) -> Comparison:
    """Plan each strategy of `lineup(asked)` for `work` under `budget` on the model, converting it in place (it
    ends as the last strategy trains it: reload it to train another), each picking its C by `rule`; `forced`: the
    asked strategy's given C, checked. `model` must start as loaded: every
    parameter trainable, no adapters. `on_stage(done, total, name)`: progress, before each strategy's probe;
    `on_planned(strategy, plan)`: each plan, while the model still trains as that strategy does."""
    strategies = lineup(asked)
    budget = resolve_budget(budget, next(model.parameters()).device)[0]  # once: "80%" of free memory would move
    rows: dict[Strategy, StrategyRow] = {}
    plans: dict[Strategy, Plan] = {}
    errors: dict[Strategy, OutOfBudgetError] = {}
    # The order the model converts in; within full fine-tuning the asked optimizer first, in the freshest process.
    for done, s in enumerate(sorted(strategies, key=lambda s: (s.stage, s != asked))):
        if on_stage:
            on_stage(done, len(strategies), s.name)
        s.apply(model)
        trainable = parameter_counts(model)[0]
        try:
            plan = _plan(model, s, work, budget, heap, resident_data, rule, forced if s == asked else None)
        except OutOfBudgetError as e:
            errors[s] = e
            note = getattr(e, "note", "not even C = 1 fits")
            rows[s] = StrategyRow(s, s.name, s == asked, None, None, None, trainable, note)
            continue
        plans[s] = plan
        if on_planned:
            on_planned(s, plan)
        chosen = next(c for c in plan.candidates if c.chunk_size == plan.chunk_size)
        known = plan.time_known or plan.chunk_size >= plan.seq_len
        seconds = chosen.relative_time * plan.seconds_full if known else None
        rows[s] = StrategyRow(s, s.name, s == asked, plan.chunk_size, plan.predicted_peak_bytes, seconds, trainable)
    ordered = [rows[s] for s in strategies]
    error = errors.get(asked)
    return Comparison(plans.get(asked), error and _with_alternatives(error, ordered), ordered)


def _plan(model, strategy: Strategy, work: Workload, budget: int, heap, resident_data: int, rule, forced) -> Plan:
    """The strategy's plan, probed on its own as its fit would probe it (the probes' sizes follow the room its
    optimizer leaves, and the chunk line their slope: one probe shared across optimizers put sgd at C = 384 where
    sgd's own chose 192). Where what the process holds and the gradients already exceed the budget, nothing is
    probed (the probe could not fit in the process)."""
    usable = usable_bytes(budget)
    held, grads = held_bytes(next(model.parameters()).device), gradient_bytes(model)
    if held + grads > usable:
        note = f"held {format_size(held)} + gradients {format_size(grads)}"
        error = OutOfBudgetError(
            f"budget {format_size(budget)} (less {HEADROOM:.0%} headroom) cannot fit even C = 1 with {strategy.name}: "
            f"the process already holds {format_size(held)}, and the gradients take {format_size(grads)}; try a "
            f"larger `mem_budget` (at least {format_size(budget_holding(held + grads))} before any chunk)",
            params=("mem_budget",),
        )
        error.note = note
        raise error
    work = replace(work, optimizer=strategy.optimizer, precision=strategy.precision(work.precision))
    return plan_chunk_size(model, work, budget, resident_data=resident_data, heap=heap, rule=rule, forced=forced)


def _with_alternatives(error: OutOfBudgetError, rows: list[StrategyRow]) -> OutOfBudgetError:
    """The asked strategy's error, followed by the strategies that do fit, each with its C and its settings."""
    fitting = [r for r in rows if r.chunk_size is not None]
    if fitting:
        names = "; ".join(f"{r.name} at C = {r.chunk_size} ({r.strategy.settings})" for r in fitting)
        tail = f"; these strategies fit: {names}"
    else:
        tail = "; no other strategy fits either"
    params = {*error.params, "optimizer", "lora_rank", "base_dtype"}
    return OutOfBudgetError(str(error) + tail, params=tuple(sorted(params)))


@dataclass
class FitPlan:
    """What `fit` with the same options would plan: the asked strategy's Plan, the run plan it would resolve, and
    (with `compare`) every strategy's row."""

    plan: Plan
    run: RunPlan
    strategies: list[StrategyRow] | None = None

    def to_json(self) -> dict:
        run = {k: v for k, v in self.run.to_json().items() if k != "planner"}
        return self.plan.to_json() | {"run": run, "strategies": [r.to_json() for r in self.strategies or ()]}


def plan_fit(
    checkpoint,
    options: FitOptions | None = None,
    *,
    data: Sequence[str | os.PathLike] = (),
    eval_data: str | os.PathLike | None = None,
    compare_strategies: bool = True,
    model_flags: dict | None = None,
    on_stage: Callable[[int, int, str], None] | None = None,
    **overrides,
) -> FitPlan:
    """Plan `slimtune.fit(checkpoint, ...)` with the same options without training: the C of the asked strategy
    under `mem_budget` (its heap policy and its chunk_size rule included; a given C is checked), and with
    `compare_strategies` the same for the others (`lineup`). `data`, `eval_data`: the files the run will read, read
    as fit reads them (what fit holds of them counts: data.held_while_training). Raises OutOfBudgetError when the
    asked strategy fits no C, naming the strategies that do."""
    from .checkpoint import load_checkpoint
    from .pretrained import PerformerLM
    from .runplan import plan_for_chunk

    options = fit_options(options, overrides)
    strategy = Strategy.of(options)
    # Loaded as fit loads it, except where the comparison converts the model in place from full to LoRA: there
    # it starts as stored.
    read_as = None if compare_strategies else strategy.read_dtype
    model = PerformerLM.from_checkpoint(
        load_checkpoint(checkpoint, **(model_flags or {}), dtype=read_as), device=options.device
    )
    data_bytes, resident = _data_bytes(model.config.vocab_size, options, data, eval_data)
    work = Workload.of(options, data_bytes=data_bytes)
    rule, forced = chunk_rule(options.chunk_size), chunk_request(options.chunk_size, options.seq_len)
    runs = {}

    def record_run(planned: Strategy, result: Plan) -> None:  # while the model trains as the asked strategy does
        if planned == strategy:
            source = "planned" if forced is None else "checked"
            runs["run"] = plan_for_chunk(model, options, result.chunk_size, source=source, planner=result)

    if not compare_strategies:
        strategy.apply(model)
        result = plan_chunk_size(model, work, options.mem_budget, heap=options.heap, rule=rule, forced=forced,
                                 resident_data=resident)  # fmt: skip
        record_run(strategy, result)
        return FitPlan(result, runs["run"])
    # Each strategy computes in its own dtype (bf16 autocast on a bf16 or quantized base): compare starts from the
    # asked one.
    asked = replace(work, precision=options.precision)
    found = compare(model, strategy, asked, options.mem_budget, heap=options.heap, rule=rule, forced=forced,
                    resident_data=resident, on_planned=record_run, on_stage=on_stage)  # fmt: skip
    if found.error is not None:
        raise found.error
    return FitPlan(found.asked, runs["run"], found.rows)


def _data_bytes(vocab_size: int, options: FitOptions, data, eval_data) -> tuple[int, int]:
    """(what fit would hold of its data while training, what of it this process holds already): the files read
    as fit reads them; a file of ids (mapped) costs only its windows' pages, text encoded with a tokenizer or
    records are held in memory."""
    read = partial(read_data, vocab_size=vocab_size, tokenizer=options.tokenizer, data_dtype=options.data_dtype)
    streams = [read(path) for path in data]
    held_out = read(eval_data, what="eval_data") if eval_data is not None else None
    windows = options.batch_size * options.accumulate
    held = [held_while_training(s, None, windows=windows, seq_len=options.seq_len, eval_tokens=None) for s in streams]
    if held_out is not None:
        held.append(held_while_training(None, held_out, windows=0, seq_len=0, eval_tokens=options.eval_bytes))
    read_all = [*streams, held_out] if held_out is not None else streams
    resident = sum(h for h, s in zip(held, read_all, strict=True) if s.mapping is None)
    return sum(held), resident

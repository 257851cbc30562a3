"""Fine-tuning and pretraining: a `Trainer` takes optimizer steps with the SLiM step and keeps a resumable run;
`fit` and `pretrain` wrap it with the planner and the export.

`fit` is the library function behind `slimtune fit`: it loads the checkpoint, picks C (the planner, unless given
or resumed), runs the steps (one, as in the paper's on-device experiment, or many), and writes weights that the
original model loads unchanged (same names, shapes, dtypes and config), with the run's provenance.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from . import threads
from .checkpoint import Checkpoint, check_output_path, file_sha256, load_checkpoint
from .choices import Choice, ExportDtype, ExportFormat, Optimizer, Precision, Recovery, Schedule, Task
from .data import check_vocabulary, copy_windows, first_windows, random_windows, read_bytes, split_held_out
from .devices import resolve_device
from .distributed import (
    Group,
    agree_min,
    average_gradients,
    barrier,
    broadcast_parameters,
    join,
    launched,
    mean,
    rank_device,
)
from .errors import ConfigError, OutOfBudgetError, SlimtuneError
from .evaluation import copy_accuracy, evaluate
from .memory import heap_policy, is_out_of_memory, peak_memory_bytes, set_heap_policy
from .model import PerformerConfig, PerformerLM
from .optimizers import default_weight_decay, make_optimizer
from .planner import Plan, Workload, chunk_sizes, memory_counts, plan_chunk_size
from .runs import RunFolder
from .slim import slim_step

OnStep = Callable[[int, dict], None]  # (completed steps, that step's metrics)
OnWarning = Callable[[str], None]


@dataclass
class FitOptions:
    seq_len: int = 1024  # L, bytes per window (each window holds L + 1 bytes)
    batch_size: int = 1  # windows per step
    steps: int = 1  # optimizer steps
    one_step: bool = False  # the contract's one step on the first batch: rows b*L.., no shuffling
    optimizer: Optimizer = Optimizer.ADAM  # sgd (plain, no momentum), adam or adamw
    lr: float = 1e-3  # learning rate
    weight_decay: float | None = None  # on weight matrices only; None: 0.01 for adamw, else 0; always 0 with one_step
    chunk_size: int | None = None  # C; None picks the largest that fits mem_budget
    mem_budget: int | str | None = None  # what the run may hold (bytes, "2GB", "80%"); None: what is free
    seed: int = 0  # data order and FAVOR+ draws
    device: str = "auto"  # auto, cpu or cuda
    recovery: Recovery = Recovery.SUBTRACT64  # how SLiM recovers chunk start states (see slim.py)
    precision: Precision = Precision.FP32  # compute precision: fp32, or bf16 autocast
    batch_weight_grads: bool | None = None  # small C: batch weight gradients (deferred.py); None: whenever C is small
    schedule: Schedule = Schedule.CONSTANT  # learning rate: constant, or cosine decay to 0 after the warmup
    warmup: int = 0  # steps of linear warmup
    clip_grad: float | None = None  # clip the gradients' global norm to this (opt-in; never with one_step)
    accumulate: int = 1  # batches whose gradients are summed into one optimizer step
    eval_every: int = 0  # with eval data: bpc every N steps (0: only at the end)
    eval_bytes: int | None = 100_000  # bytes of the held-out data each evaluation scores (None: all of it)
    run_dir: str | None = None  # metrics.jsonl and resumable state; None: no run folder
    save_every: int = 100  # resumable state every N steps (and on interrupt), with a run folder
    resume: bool = False  # continue the run saved in run_dir
    restart: bool = False  # start over although run_dir holds a saved run (which is moved aside, not deleted)
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradients are not finite, instead of stopping
    threads: int | None = None  # CPU intra-op threads; None: SLIMTUNE_THREADS, else the free cores (threads.py)
    task: Task = Task.TEXT  # text: windows of the data file; copy: the synthetic copying task (pretrain only)
    copy_symbols: int = 16  # copy task: size of the symbol alphabet
    dtype: ExportDtype = ExportDtype.AUTO  # export dtype: auto keeps each tensor's input dtype; fp32, fp16 or bf16
    format: ExportFormat = ExportFormat.SAFETENSORS  # one .safetensors file, or hf: a folder with config.json

    def __post_init__(self):
        for name, choice, flag in (
            ("optimizer", Optimizer, "--optimizer"),
            ("recovery", Recovery, "--state-recovery"),
            ("precision", Precision, "--precision"),
            ("schedule", Schedule, "--schedule"),
            ("task", Task, "task"),
            ("dtype", ExportDtype, "--dtype"),
            ("format", ExportFormat, "--format"),
        ):
            setattr(self, name, choice.parse(getattr(self, name), flag))

    def validate(self) -> None:
        """Numbers in range (the named choices are checked when the options are made)."""
        for name in ("seq_len", "batch_size", "steps", "accumulate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or self.chunk_size < 1):
            raise ConfigError(f"--chunk-size must be 'auto' or an integer >= 1, got {self.chunk_size}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")
        if self.weight_decay is not None and not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"--clip-grad must be a positive number, got {self.clip_grad}")
        if self.threads is not None:
            threads.requested(self.threads)
        if self.resume and self.restart:
            raise ConfigError("--resume continues the saved run and --restart starts over: give one of them")
        if self.resume and not self.run_dir:
            raise ConfigError("--resume needs the run folder of the run to continue: pass --run-dir")

    @property
    def total_steps(self) -> int:
        return 1 if self.one_step else self.steps

    def settings(self, world: int) -> dict:
        """What the run state records, as plain values (torch.load with weights_only reads them back)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        plain = {k: v.value if isinstance(v, Choice) else v for k, v in plain.items()}
        return plain | {"weight_decay": self.effective_weight_decay, "world_size": world}

    @property
    def effective_weight_decay(self) -> float:
        if self.one_step:
            return 0.0
        return default_weight_decay(self.optimizer) if self.weight_decay is None else self.weight_decay


@dataclass
class FitResult:
    chunk_size: int
    seq_len: int
    batch_size: int
    steps: int
    loss: float  # the first step's loss, nats per byte
    final_loss: float
    losses: list[float]
    peak_memory_bytes: int
    device: str
    out: str
    seconds: float
    plan: dict | None = None  # the planner's choice (C auto), or its check of a given C against a given budget
    metrics: dict = field(default_factory=dict)  # task metrics, e.g. copy_accuracy
    first_step: int = 0  # steps already done when this process started (a resumed run)
    threads: int = 1  # CPU intra-op threads the run used
    memory_counts: str = ""  # what peak_memory_bytes counts on this device
    model: PerformerLM | None = field(default=None, repr=False, compare=False)  # the trained model, in memory

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finite(model, loss: float) -> bool:
    """Whether the loss and every gradient are finite (one device sync per step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return math.isfinite(loss) and bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _lr_factor(options: FitOptions):
    steps = options.total_steps

    def factor(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / options.warmup
        if options.schedule == Schedule.COSINE:
            progress = (step - options.warmup) / max(1, steps - options.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Trainer:
    """One training run, in the manner of torchtune's recipes: `setup()`, then `step()` until `done`, `close()`.

    `save(point)` writes the resumable state (weights, optimizer, schedule, step, random-number states, C) to the
    run folder, `restore()` reads it back; with `options.resume`, setup() restores. The chunk size is given, or
    restored, or set by the caller after setup (the planner's choice) before the first step.
    """

    def __init__(
        self,
        model: PerformerLM,
        data: torch.Tensor | None,
        options: FitOptions,
        *,
        chunk_size: int | None = None,
        eval_data: torch.Tensor | None = None,
        group: Group = Group(),
        on_warning: OnWarning | None = None,
    ):
        self.model, self.data, self.options, self.eval_data, self.group = model, data, options, eval_data, group
        self.chunk_size = chunk_size
        self.plan: dict | None = None
        self.device = next(model.parameters()).device
        self.losses: list[float] = []
        self.completed = 0  # optimizer steps done (skipped ones included)
        self.first_step = 0
        self.skipped = 0
        self.folder = RunFolder(options.run_dir) if options.run_dir else None
        self.writes = self.folder is not None and group.main  # only rank 0 writes; every rank reads
        self._warn = on_warning or _warn
        self._warned: set[str] = set()
        self._load: threads.LoadWatch | None = None  # set by setup() when the thread count was chosen

    # -- life cycle --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Optimizer, schedule, random numbers; the run folder's lock; the saved state with options.resume."""
        o = self.options
        self.generator = torch.Generator().manual_seed(o.seed)
        self.optimizer = make_optimizer(o.optimizer, self.model, o.lr, o.effective_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(o))
        if o.resume and not self.folder.has_state():
            raise SlimtuneError(f"nothing to resume in {self.folder.path}: no saved state there; run without --resume")
        if self.writes:
            self.folder.lock()
        if o.resume:
            self.restore()
        self._choose_heap()
        chosen = self.device.type == "cpu" and threads.requested(o.threads) is None
        self._load = threads.LoadWatch() if chosen else None  # follows neighbours that come and go
        broadcast_parameters(self.model)  # the same start on every rank (a no-op for one process)
        self._point = self._here()

    def _choose_heap(self) -> None:
        """The plan's heap policy on CPU ("fast" when its peak fits the budget, memory.py); without a plan "tight"
        under a --mem-budget, else "fast". Only where the heap is managed (the CLI), never in a library user's
        process. Placement only: results are the same under either."""
        if heap_policy() is None or self.device.type != "cpu":
            return
        fallback = "tight" if self.options.mem_budget is not None else "fast"
        set_heap_policy((self.plan or {}).get("heap") or fallback)

    def _follow_load(self) -> None:
        """Between steps and chunks: fewer CPU threads when another process took a core since the last reading,
        more when the cores have been free again for two readings (threads.LoadWatch)."""
        count = self._load.check(torch.get_num_threads()) if self._load else None
        if count is None:
            return
        why = "another process is keeping a core busy" if count < torch.get_num_threads() else "the cores are free"
        self._warn(f"{why}: {count} CPU thread(s) from step {self.completed + 1} on (--threads fixes the count)")
        threads.apply(count)

    def close(self) -> None:
        if self.writes:
            self.folder.release()

    @property
    def done(self) -> bool:
        return self.completed >= self.options.total_steps

    # -- state -------------------------------------------------------------------------------------------------
    def _here(self) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        """Where a resumed run would start now: completed steps and the random-number states for the next."""
        return self.completed, (self.generator.get_state(), torch.get_rng_state())

    def save(self, point=None) -> None:
        """The state at `point` (default: after the last completed step). Rank 0 with a run folder only."""
        if not self.writes:
            return
        step, (generator, rng) = point or self._point
        self.folder.save(
            {
                "step": step,
                "chunk_size": self.chunk_size,
                "losses": self.losses,
                "skipped": self.skipped,
                "plan": self.plan,
                "batch_weight_grads": self.options.batch_weight_grads,
                "settings": self.options.settings(self.group.world),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": generator,
                "torch_rng": rng,
                "threads": torch.get_num_threads(),  # the last bits depend on it: a resumed run uses the same
            }
        )

    def restore(self) -> None:
        saved = self.folder.load(self.options.settings(self.group.world))
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.completed = self.first_step = saved["step"]
        self.chunk_size, self.losses = saved["chunk_size"], list(saved["losses"])
        self.skipped, self.plan = saved.get("skipped", 0), saved.get("plan")
        if "threads" in saved and saved["threads"] != torch.get_num_threads():
            self._warn(
                f"using {saved['threads']} CPU threads, as the run being resumed did (its results depend on "
                f"the count in the last bits); this machine chose {torch.get_num_threads()}"
            )
            threads.apply(saved["threads"])
        if "batch_weight_grads" in saved:  # the same summation order as the run it continues: bit for bit
            self.options = replace(self.options, batch_weight_grads=saved["batch_weight_grads"])

    # -- one step ----------------------------------------------------------------------------------------------
    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn(message)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's windows [B, L + 1] and loss mask [B, L] (None: every position counts). Every rank draws
        the same global batch of world x B windows and keeps its own slice, so the data does not depend on the
        split."""
        o, g = self.options, self.group
        B = o.batch_size * g.world
        if o.task == Task.COPY:
            windows, mask = copy_windows(B, o.seq_len, o.copy_symbols, self.generator)
        elif o.one_step:
            windows, mask = first_windows(self.data, B, o.seq_len), None
        else:
            windows, mask = random_windows(self.data, B, o.seq_len, self.generator), None
        mine = slice(g.rank * o.batch_size, (g.rank + 1) * o.batch_size)
        return windows[mine], None if mask is None else mask[mine]

    def _gradients(self, batches) -> float:
        """Fill .grad with the mean gradient over `batches` and return the mean loss. On running out of memory
        anyway (another process took memory, fragmentation), redo the whole step from zeroed gradients with the
        next smaller C, so that no step is ever taken on incomplete gradients."""
        o = self.options
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                total = 0.0
                for windows, mask in batches:
                    total += slim_step(
                        self.model,
                        windows.to(self.device),
                        self.chunk_size,
                        None if mask is None else mask.to(self.device),
                        recovery=o.recovery,
                        precision=o.precision,
                        batch_weight_grads=o.batch_weight_grads,
                        between_chunks=self._follow_load if self._load else None,
                    )
                if len(batches) > 1:
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad /= len(batches)
                return total / len(batches)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
            # Outside the except block: the traceback no longer pins the failed step's tensors.
            self.optimizer.zero_grad(set_to_none=True)
            _free_device_memory(self.device)
            smaller = [c for c in chunk_sizes(o.seq_len) if c < min(self.chunk_size, o.seq_len)]
            if not smaller:
                raise OutOfBudgetError(
                    "out of memory even at chunk size 1: free memory on the device, or use a "
                    "smaller --batch-size, --seq-len or model"
                )
            self._warn_once(
                f"out of memory at chunk size {self.chunk_size}; retrying this step with chunk size {smaller[-1]}"
            )
            self.chunk_size = smaller[-1]

    def step(self) -> dict:
        """One optimizer step: `accumulate` batches, one FAVOR+ draw, the SLiM steps, the all-reduce (torchrun),
        optional clipping, the update and the schedule. Returns the step's metrics ({"skipped": True, ...} for a
        skipped non-finite step); a non-finite step without skip_nonfinite saves the state before it and raises."""
        o = self.options
        if self.chunk_size is None:
            raise ConfigError("the trainer has no chunk size: pass chunk_size, or set trainer.chunk_size after setup")
        self._follow_load()
        started = time.perf_counter()
        self._point = self._here()  # an interrupt inside this step resumes from before it, redrawing its data
        batches = [self._batch() for _ in range(o.accumulate)]
        self.model.redraw_features(self.generator)  # FAVOR+: one draw per step, shared by all its chunks
        loss = self._gradients(batches)
        average_gradients(self.model)  # torchrun: one all-reduce per optimizer step (distributed.py)
        loss = mean(loss, self.device)
        step = self.completed + 1
        if not _finite(self.model, loss):
            if not o.skip_nonfinite:
                self.save()  # the weights are still those of the last good step
                where = f"; the last good state is in {o.run_dir}" if self.writes else ""
                raise SlimtuneError(
                    f"non-finite loss or gradient at step {step} (loss {loss}){where}: lower --lr, "
                    "add --clip-grad, or pass --skip-nonfinite to skip such steps; nothing was exported"
                )
            with _signals_held():
                self.skipped += 1
                self.completed = step
                self._point = self._here()
            self._warn(f"skipped step {step}: non-finite loss or gradient ({self.skipped} so far)")
            return {"step": step, "skipped": True}
        if o.clip_grad and not o.one_step:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"]
        with _signals_held():  # an interrupt here would save updated weights under the step before
            self.optimizer.step()
            self.scheduler.step()
            self.losses.append(loss)
            self.completed = step
            self._point = self._here()
        metrics = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "chunk_size": self.chunk_size,
            "tokens_per_s": self.group.world
            * o.accumulate
            * o.batch_size
            * o.seq_len
            / (time.perf_counter() - started),
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        if (
            self.group.main
            and self.eval_data is not None
            and ((o.eval_every and step % o.eval_every == 0) or step == o.total_steps)
        ):
            # At the run's C and batch, without gradients: inside what a training chunk holds, so inside the plan.
            scored = evaluate(
                self.model,
                self.eval_data,
                seq_len=o.seq_len,
                max_bytes=o.eval_bytes,
                chunk_size=self.chunk_size,
                batch_size=o.batch_size,
            )
            metrics["bpc"], metrics["bpc_bytes"] = scored.bpc, scored.predicted_bytes
        if self.writes:
            self.folder.log(metrics)
            if o.save_every and step % o.save_every == 0 and not self.done:
                self.save()
        return metrics


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C (SIGINT) and SIGTERM that arrive inside the block take effect at its end, through the handlers that were
    in place, so that what the block changes (a step's update and its count) is saved whole or not at all. Outside
    the main thread, where Python runs no signal handlers, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {n: signal.signal(n, lambda number, frame: held.append(number)) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])


def _check_data(data: torch.Tensor | None, options: FitOptions) -> None:
    """Fail on data too short for the windows before any work starts."""
    if options.task == Task.COPY:
        return
    if data is None:
        raise SlimtuneError("--data is required for a text task: pass a text file")
    if options.one_step:
        first_windows(data, options.batch_size * launched().world, options.seq_len)
    elif data.numel() < options.seq_len + 1:
        raise SlimtuneError(
            f"data has {data.numel()} bytes, fewer than seq len + 1 = {options.seq_len + 1}: lower --seq-len"
        )


def _check_run_folder(options: FitOptions, group: Group, on_warning: OnWarning | None) -> None:
    """A folder holding a saved run is continued (--resume) or moved aside (--restart), never overwritten by
    accident. Under torchrun rank 0 moves it and every rank waits for that."""
    if not options.run_dir or options.resume:
        return
    folder = RunFolder(options.run_dir)
    if options.restart:
        if group.main and folder.has_state():
            aside = folder.move_aside()
            (on_warning or _warn)(f"--restart: the previous run in {folder.path} was moved to {aside}")
        barrier()
        return
    if folder.has_state():
        raise SlimtuneError(
            f"run folder {folder.path} holds a saved run ({folder.summary()}): add --resume to continue it, or "
            "--restart to start over (the old folder is moved aside, not deleted)"
        )


def _held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storages behind `tensors`, each counted once (a held-out split is a view of the same file)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def _plan(model, options: FitOptions, group: Group, data_bytes: int = 0) -> Plan:
    """The planner's choice on this rank's device; under torchrun every rank then takes the smallest C any rank
    can afford, so that a rank whose budget fits nothing stops them all with its reason."""
    device = next(model.parameters()).device
    work = Workload(
        options.seq_len, options.batch_size, options.optimizer, options.recovery, options.precision, data_bytes
    )
    try:
        plan = plan_chunk_size(model, work, options.mem_budget, forced=options.chunk_size, resident_data=data_bytes)
    except SlimtuneError:
        agree_min(0, device)
        raise
    chunk_size = agree_min(plan.chunk_size, device)
    if chunk_size == 0:
        raise OutOfBudgetError("another rank's --mem-budget fits no chunk size (see its message): give it more memory")
    if chunk_size != plan.chunk_size:
        plan.chunk_size = chunk_size
        plan.batch_weight_grads = False  # the buffers were sized against this rank's own C
    return plan


def _train(
    model,
    data,
    out,
    options: FitOptions,
    on_step: OnStep | None,
    on_warning: OnWarning | None,
    eval_data=None,
    group: Group = Group(),
) -> FitResult:
    """Run the steps (planning C first when it is auto and the run is not resumed), and report them; saves the
    run state at the end and on an interrupt. The export is the caller's."""
    _check_run_folder(options, group, on_warning)
    trainer = Trainer(
        model, data, options, chunk_size=options.chunk_size, eval_data=eval_data, group=group, on_warning=on_warning
    )
    # Plan before anything is written: C auto, or a given C checked against a given budget.
    if (trainer.chunk_size is None or options.mem_budget is not None) and not options.resume:
        plan = _plan(model, options, group, _held_bytes(data, eval_data))
        trainer.chunk_size, trainer.plan = plan.chunk_size, plan.to_json()
        if options.batch_weight_grads is None:
            trainer.options = replace(trainer.options, batch_weight_grads=plan.batch_weight_grads)
    trainer.setup()  # a resumed run restores its C (and plan) from the saved state
    started = time.perf_counter()
    try:
        metrics = {}
        while not trainer.done:
            metrics = trainer.step()
            if on_step and group.main and not metrics.get("skipped"):
                on_step(trainer.completed, metrics)
        trainer.save()
    except KeyboardInterrupt:
        trainer.save()
        raise
    finally:
        trainer.close()
    if not trainer.losses:
        raise SlimtuneError(
            "every step had a non-finite loss or gradient: lower --lr or add --clip-grad; nothing was exported"
        )
    device = next(model.parameters()).device
    last = {k: v for k, v in metrics.items() if k in ("bpc", "bpc_bytes")} | (
        {"skipped_steps": trainer.skipped} if trainer.skipped else {}
    )
    return FitResult(
        chunk_size=trainer.chunk_size,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        steps=len(trainer.losses),
        loss=trainer.losses[0],
        final_loss=trainer.losses[-1],
        losses=trainer.losses,
        peak_memory_bytes=peak_memory_bytes(device),
        device=str(device),
        out=str(out),
        seconds=time.perf_counter() - started,
        plan=trainer.plan,
        metrics=last,
        first_step=trainer.first_step,
        threads=torch.get_num_threads(),
        memory_counts=memory_counts(device),
        model=model,
    )


def _provenance(result: FitResult, options: FitOptions, data_path) -> dict:
    """What was run, for the exported checkpoint's metadata."""
    provenance = {
        "task": str(options.task),
        "steps": result.steps,
        "one_step": options.one_step,
        "optimizer": str(options.optimizer),
        "lr": options.lr,
        "weight_decay": options.effective_weight_decay,
        "schedule": str(options.schedule),
        "chunk_size": result.chunk_size,
        "seq_len": options.seq_len,
        "batch_size": options.batch_size,
        "accumulate": options.accumulate,
        "seed": options.seed,
        "state_recovery": str(options.recovery),
        **result.metrics,
    }
    if data_path is not None:
        provenance |= {"data": Path(data_path).name, "data_sha256": file_sha256(data_path)}
    return provenance


def _start(data, options: FitOptions) -> tuple[torch.device, Group]:
    """What fit and pretrain do before building the model: check the data, choose the CPU threads, join a torchrun
    group if launched by one, take this rank's device, seed."""
    device = resolve_device(options.device)
    _check_data(data, options)
    threads.apply(threads.choose(options.threads).count)
    group = join(device)
    torch.manual_seed(options.seed)
    return rank_device(device, group), group


def _options(options: FitOptions | None, overrides: dict) -> FitOptions:
    try:
        options = replace(options, **overrides) if options is not None else FitOptions(**overrides)
    except TypeError as e:
        raise ConfigError(f"unknown fit option ({e}): see slimtune.FitOptions for the names") from None
    options.validate()
    return options


def fit(
    checkpoint: Checkpoint | str | os.PathLike,
    data: torch.Tensor | str | os.PathLike,
    out: str | os.PathLike,
    options: FitOptions | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    eval_data: torch.Tensor | str | os.PathLike | None = None,
    eval_fraction: float | None = None,
    on_step: OnStep | None = None,
    on_warning: OnWarning | None = None,
    **overrides,
) -> FitResult:
    """Fine-tune a checkpoint on bytes with SLiM and export weights the original model loads unchanged.

    Args:
        checkpoint: a checkpoint path (or a loaded `Checkpoint`).
        data: a text file's path, or its bytes as a uint8 tensor [N].
        out: where to write the fine-tuned checkpoint (never an input).
        options: a FitOptions; keyword `overrides` (seq_len=, steps=, mem_budget=, ...) replace its fields.
        data_path: the data file, for provenance, when `data` is a tensor.
        eval_data: held-out bytes (or a path), scored in bpc every options.eval_every steps and at the end.
        eval_fraction: instead of eval_data, hold out this last share of `data` (e.g. 0.05).
        on_step: called as on_step(step, metrics) after each step (loss, lr, C, tokens/s, peak memory, bpc).
        on_warning: called with each warning (default: warnings.warn).

    Returns:
        FitResult: C, losses, measured peak, the plan (when C was auto), and the trained model.

    Raises:
        SlimtuneError (ConfigError, CheckpointError, DataError, OutOfBudgetError): bad input, found before
        anything is written.

    Example:
        result = slimtune.fit("model.safetensors", "my.txt", "tuned.safetensors", mem_budget="2GB", steps=100)
    """
    options = _options(options, overrides)
    if not isinstance(data, torch.Tensor):
        data_path = data_path or data
        data = read_bytes(data, min_length=2)
    if eval_data is not None and not isinstance(eval_data, torch.Tensor):
        eval_data = read_bytes(eval_data, min_length=2, what="--eval-data")
    if eval_fraction is not None:
        if eval_data is not None:
            raise ConfigError("give either --eval-data or --eval-fraction, not both")
        data, eval_data = split_held_out(data, eval_fraction)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    check_vocabulary(data, checkpoint.config.vocab_size)
    if eval_data is not None:
        check_vocabulary(eval_data, checkpoint.config.vocab_size, "--eval-data")
    out = check_output_path(out, checkpoint.path, data_path, fmt=options.format)
    device, group = _start(data, options)
    model = PerformerLM.from_checkpoint(checkpoint, device=device)  # holds the weights: one copy in memory
    result = _train(model, data, out, options, on_step, on_warning, eval_data, group)
    if group.main:
        model.save_pretrained(
            out,
            format=options.format,
            dtype=options.dtype,
            metadata={"world_size": group.world} | _provenance(result, options, data_path),
            extra_config={"seq_len": options.seq_len},
        )
    barrier()  # the other ranks wait until rank 0 has exported
    return result


def pretrain(
    config: PerformerConfig,
    data: torch.Tensor | str | os.PathLike | None,
    out: str | os.PathLike,
    options: FitOptions | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    on_step: OnStep | None = None,
    on_warning: OnWarning | None = None,
    **overrides,
) -> FitResult:
    """Train a model from random initialisation (the server side) and write a contract checkpoint. `data`: a
    text file's path or its bytes (None for the copy task); the rest as for `fit`."""
    options = _options(options, overrides)
    if data is not None and not isinstance(data, torch.Tensor):
        data_path = data_path or data
        data = read_bytes(data, min_length=2)
    out = check_output_path(out, data_path, fmt=options.format)
    device, group = _start(data, options)
    model = PerformerLM(config).to(device)
    result = _train(model, data, out, options, on_step, on_warning, group=group)
    if group.main:
        if options.task == Task.COPY:
            generator = torch.Generator().manual_seed(options.seed + 1)  # held-out sequences, not the training ones
            result.metrics["copy_accuracy"] = copy_accuracy(model, options.seq_len, options.copy_symbols, generator)
        model.save_pretrained(
            out,
            format=options.format,
            dtype=options.dtype,
            extra_config={"seq_len": options.seq_len},
            metadata={"pretrained": True, "world_size": group.world} | _provenance(result, options, data_path),
        )
    barrier()
    return result

"""Fine-tuning and pretraining: a `Trainer` takes optimizer steps with the SLiM step and keeps a resumable run;
a `Recipe` is one run around it (setup, train, save, cleanup), and `fit` and `pretrain` are a few lines over theirs.

`fit` is the library function behind `slimtune fit`: it checks the options and `out`, then its recipe takes the run
folder's lock, reads the checkpoint and the data, decides the run (runplan.py: C planned unless given or resumed),
runs the steps (one, as in the paper's on-device experiment, or many), and writes weights that the original model
loads unchanged (same names, shapes, dtypes and config), with the run's provenance.
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

from . import lora, recipes, threads
from .checkpoint import Checkpoint, check_output_path, default_out, file_sha256, load_checkpoint
from .choices import Schedule, Task
from .data import (
    Tokens,
    as_tokens,
    check_vocabulary,
    copy_windows,
    first_offsets,
    held_while_training,
    load_tokenizer,
    mask_at,
    random_offsets,
    windows_at,
)
from .devices import resolve_device
from .distributed import Group, average_gradients, barrier, broadcast_parameters, join, launched, mean, rank_device
from .errors import ConfigError, DataError, Interrupted, Notice, OutOfBudgetError, SlimtuneError
from .evaluation import copy_accuracy, evaluate
from .memory import heap_policy_during, is_out_of_memory, peak_memory_bytes, release_free_heap
from .optimizers import make_optimizer
from .options import FitOptions, chunk_request, fit_options
from .planner import Plan, memory_counts
from .pretrained import PerformerConfig, PerformerLM
from .runplan import RunPlan, after_out_of_memory, plan_for_chunk, resolve_run
from .runs import RunFolder
from .slim import autocast, slim_step
from .strategies import Strategy

__all__ = ["FitOptions", "FitResult", "Trainer", "fit", "pretrain"]

OnStep = Callable[[int, dict], None]  # (completed steps, that step's metrics)
OnWarning = Callable[[str], None]


@dataclass
class FitResult:
    chunk_size: int
    seq_len: int
    batch_size: int
    steps: int
    loss: float  # the first step's loss, nats per byte
    final_loss: float
    losses: list[float]
    peak_memory_bytes: int  # the process's peak over the whole call, the export included
    device: str
    out: str
    seconds: float  # the whole call: loading, planning, the steps and the export
    plan: Plan | None = None  # the planner's choice (C auto), or its check of a given C against a given budget
    metrics: dict = field(default_factory=dict)  # task metrics, e.g. copy_accuracy
    first_step: int = 0  # steps already done when this process started (a resumed run)
    threads: int = 1  # CPU intra-op threads the run used
    memory_counts: str = ""  # what peak_memory_bytes counts on this device
    run: RunPlan | None = None  # the run plan, as decided before the first step (its planner's Plan: `plan`)
    run_dir: str | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    trainable_parameters: int = 0  # elements of the parameters that trained
    step_seconds: list[float] = field(default_factory=list)  # each step of this process, data to update
    adapter_out: str | None = None  # where the adapter alone was written (PEFT's format)
    model: PerformerLM | None = field(default=None, repr=False, compare=False)  # the trained model, in memory

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        run = {k: v for k, v in self.run.to_json().items() if k != "planner"} if self.run else {}
        return values | {"plan": self.plan.to_json() if self.plan else None, "run": run}


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


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


MASK_REDRAWS = 100  # draws of a batch whose loss mask keeps nothing on some rank (prompts only) before giving up


def draw_batch(data: Tokens | None, options: FitOptions, group: Group, generator: torch.Generator):
    """This rank's windows [B, L + 1] and loss mask [B, L] (None: every position counts). Every rank draws the same
    global batch of world x B windows and keeps its own slice, so the data does not depend on the split."""
    o, g = options, group
    B = o.batch_size * g.world
    if o.task == Task.COPY:
        windows, mask = copy_windows(B, o.seq_len, o.copy_symbols, generator)
    else:
        windows, mask = _text_batch(data, B, o, g.world, generator)
    mine = slice(g.rank * o.batch_size, (g.rank + 1) * o.batch_size)
    return windows[mine], None if mask is None else mask[mine]


def _text_batch(data: Tokens, B: int, o: FitOptions, world: int, generator: torch.Generator):
    """Windows of the stream, at random offsets or (`one_step`) the first ones; with a mask (.jsonl records), drawn
    again where some rank's windows would hold no prediction the loss counts (prompts only)."""
    for _ in range(MASK_REDRAWS):
        offsets = (
            first_offsets(len(data), B, o.seq_len) if o.one_step else random_offsets(len(data), B, o.seq_len, generator)
        )
        mask = None if data.mask is None else mask_at(data.mask, offsets, o.seq_len)
        if mask is None or mask.view(world, -1).any(dim=1).all():
            return windows_at(data.ids, offsets, o.seq_len), mask
        if o.one_step:
            break
    raise DataError(
        f"the windows of `data` hold no completion to learn from (drawn {1 if o.one_step else MASK_REDRAWS} times): "
        "longer completions, a larger `seq_len` or `batch_size`, or records with `text`",
        params=("data", "seq_len", "batch_size"),
    )


def held_out_bpc(model: PerformerLM, eval_data: Tokens, options: FitOptions, run: RunPlan) -> dict:
    """Held-out bpc at the run's C, batch and compute dtype, without gradients: inside what a training chunk holds,
    so inside the plan (in fp32 beside bf16 steps it was not: 25-70 MB over, benchmarks/RESULTS.md)."""
    device = next(model.parameters()).device
    with autocast(device, run.precision.dtype):
        scored = evaluate(
            model,
            eval_data,
            seq_len=options.seq_len,
            max_bytes=options.eval_bytes,
            chunk_size=run.chunk_size,
            batch_size=options.batch_size,
        )
    # What the scoring freed leaves the heap before the next step: its blocks, interleaved with the steps',
    # otherwise stay resident (d 256 x 2, C 32, batch 3 under 436 MB: VmHWM 439 MB, 436 with the trim).
    release_free_heap()
    return {"bpc": scored.bpc, "bpc_bytes": scored.predicted_bytes}


def _slim_steps(model: PerformerLM, batches, run: RunPlan, options: FitOptions, between_chunks) -> float:
    """The mean gradient over `batches` in .grad (from zero), and the mean loss."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    total = 0.0
    for windows, mask in batches:
        total += slim_step(
            model,
            windows.to(device),
            run.chunk_size,
            None if mask is None else mask.to(device),
            recovery=options.recovery,
            precision=run.precision.dtype,
            batch_weight_grads=run.batch_weight_grads,
            between_chunks=between_chunks,
        )
    if len(batches) > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= len(batches)
    return total / len(batches)


def gradients(model, batches, run: RunPlan, options: FitOptions, between_chunks, warn) -> tuple[float, RunPlan]:
    """(mean loss, the run plan it ran with): _slim_steps; on running out of memory anyway (another process took
    memory, fragmentation), the whole step again from zeroed gradients with the next smaller C, so that no step is
    taken on incomplete gradients."""
    while True:
        try:
            return _slim_steps(model, batches, run, options, between_chunks), run
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
        # Outside the except block: the traceback no longer pins the failed step's tensors.
        model.zero_grad(set_to_none=True)
        gc.collect()
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.empty_cache()
        fallback = after_out_of_memory(run, options)
        if fallback is None:
            raise OutOfBudgetError(
                "out of memory even at chunk size 1: free memory on the device, or use a smaller `batch_size`, "
                "`seq_len` or model",
                params=("batch_size", "seq_len"),
            )
        warn(f"out of memory at chunk size {run.chunk_size}; retrying this step with chunk size {fallback.chunk_size}")
        run = fallback


def _frozen_base(model: PerformerLM) -> tuple[list[str], Path | None]:
    """The names of the parameters that do not train, and the file they come from: a LoRA model's base, as read
    from its checkpoint (None otherwise: other frozen weights may have been changed in memory)."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    source = getattr(model, "source", None)
    from_file = frozen and lora.adapted(model) and source is not None and source.path.is_file()
    return frozen, (source.path if from_file else None)


def weights_to_save(model: PerformerLM, base_sha256: str | None) -> tuple[dict, str | None]:
    """What a run state keeps of the model: every weight; or, with a frozen base read from a file (LoRA), only the
    weights that train and the base file's sha256 (a resume reads the base from that file again). Returns it and
    the sha256 (`base_sha256`, when given, is the file's, hashed before)."""
    frozen, path = _frozen_base(model)
    if path is None:
        return {"model": model.state_dict()}, base_sha256
    base_sha256, frozen = base_sha256 or file_sha256(path), set(frozen)
    kept = {n: t for n, t in model.state_dict().items() if n not in frozen}
    return {"model": kept, "base_sha256": base_sha256}, base_sha256


def restore_weights(model: PerformerLM, saved: dict, folder: Path | None) -> str | None:
    """The weights of a run state (`weights_to_save`) back into `model`; a frozen base must be the same file.
    Returns the base file's sha256 (None without one)."""
    if "base_sha256" not in saved:
        model.load_state_dict(saved["model"])
        return None
    frozen, path = _frozen_base(model)
    now = file_sha256(path) if path is not None else None
    if now != saved["base_sha256"]:
        raise SlimtuneError(
            f"the run in {folder or 'this state'} trained adapters on a base "
            f"checkpoint with sha256 {saved['base_sha256'][:12]}..., and the base given now "
            + (f"({path}) has {now[:12]}..." if now else "is not read from a file")
            + ": `resume` with the same `checkpoint`",
            params=("resume", "checkpoint"),
        )
    missing, unexpected = model.load_state_dict(saved["model"], strict=False)
    if unexpected or set(missing) != set(frozen):
        raise SlimtuneError(
            f"the saved run's weights do not fit this model ({len(unexpected)} unexpected, "
            f"{len(set(missing) - set(frozen))} missing): `resume` with the same LoRA settings",
            params=("resume",),
        )
    return now


class Trainer:
    """One training run, in the manner of torchtune's recipes: `setup()`, then `step()` until `done`, `close()`.

    It consumes a run plan (runplan.py; or, for a caller of its own, a given `chunk_size`, from which the rest of
    the plan is derived). `save(point)` writes the resumable state (weights, optimizer, schedule, step,
    random-number states, the run plan) to the run folder, `restore(saved)` reads it back; with
    `options.resume`, setup() restores.
    """

    def __init__(
        self,
        model: PerformerLM,
        data: Tokens | torch.Tensor | None,
        options: FitOptions,
        *,
        run: RunPlan | None = None,
        chunk_size: int | None = None,
        eval_data: Tokens | torch.Tensor | None = None,
        group: Group = Group(),
        on_warning: OnWarning | None = None,
        folder: RunFolder | None = None,
    ):
        self.model, self.options, self.group = model, options, group
        self.data, self.eval_data = as_tokens(data), as_tokens(eval_data)
        if run is None and chunk_size is not None:
            run = plan_for_chunk(model, options, chunk_size, world=group.world)
        self.run = run  # None only until a resumed run's plan is restored
        self.device = next(model.parameters()).device
        self.losses: list[float] = []
        self.step_seconds: list[float] = []  # this process's steps
        self.completed = 0  # optimizer steps done (skipped ones included)
        self.first_step = 0
        self.skipped = 0
        if folder is None and options.run_dir == "auto":
            raise ConfigError(
                "`run_dir` 'auto' (OUT.run) is for fit and pretrain, which know OUT: give the Trainer a path, or None",
                params=("run_dir",),
            )
        self.folder = folder or (RunFolder(options.run_dir) if options.run_dir else None)
        self.writes = self.folder is not None and group.main  # only rank 0 writes; every rank reads
        self._warn = on_warning or _warn
        self._warned: set[str] = set()
        self._load: threads.LoadWatch | None = None  # set by setup() when the thread count was chosen
        self._base_sha256: str | None = None  # a frozen base's file, hashed once (run states name it)

    @property
    def chunk_size(self) -> int | None:
        return self.run.chunk_size if self.run else None

    def setup(self, saved: dict | None = None) -> None:
        """Optimizer, schedule, random numbers; the run folder's lock; the saved state (`saved`, or with
        options.resume the folder's)."""
        o = self.options
        self.generator = torch.Generator().manual_seed(o.seed)
        self.optimizer = make_optimizer(o.optimizer, self.model, o.lr, o.effective_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(o))
        if self.folder is not None:
            saved = open_run_folder(self.folder, o, self.group.world, self.group.main, saved)
        elif o.resume:
            raise ConfigError(
                "`resume` needs the run folder of the run to continue: give `run_dir`", params=("run_dir",)
            )
        if saved is not None:
            self.restore(saved)
        if self.run is None:
            raise ConfigError("the trainer has no chunk size: pass `chunk_size` or a run plan", params=("chunk_size",))
        chosen = self.device.type == "cpu" and threads.requested(o.threads) is None
        self._load = threads.LoadWatch() if chosen else None  # follows neighbours that come and go
        broadcast_parameters(self.model)  # the same start on every rank (a no-op for one process)
        self._last_point = self._resume_point()

    def _follow_load(self) -> None:
        """Between steps and chunks: fewer CPU threads when another process took a core since the last reading,
        more when the cores have been free again for two readings (threads.LoadWatch)."""
        count = self._load.check(torch.get_num_threads()) if self._load else None
        if count is None:
            return
        why = "another process is keeping a core busy" if count < torch.get_num_threads() else "the cores are free"
        self._warn(
            Notice(
                f"{why}: {count} CPU thread(s) from step {self.completed + 1} on (`threads` fixes the count)",
                params=("threads",),
            )
        )
        threads.apply(count)

    def close(self) -> None:
        if self.writes:
            self.folder.release()

    @property
    def done(self) -> bool:
        return self.completed >= self.options.total_steps

    def _resume_point(self) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        """Where a resumed run would start now: completed steps and the random-number states for the next."""
        return self.completed, (self.generator.get_state(), torch.get_rng_state())

    def save(self, point=None) -> int | None:
        """The state at `point` (default: after the last completed step); returns its step, or None when this
        process writes no run folder (no run_dir, or a torchrun rank other than 0)."""
        if not self.writes:
            return None
        step, (generator, rng) = point or self._last_point
        self.folder.save(
            {
                "step": step,
                # The thread count now: the last bits depend on it, and a resumed run starts on the same.
                "run": replace(self.run, threads=torch.get_num_threads()).to_json(),
                "losses": self.losses,
                "skipped": self.skipped,
                "settings": self.options.resume_settings(),
                **self._weights(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": generator,
                "torch_rng": rng,
            }
        )
        return step

    def _weights(self) -> dict:
        kept, self._base_sha256 = weights_to_save(self.model, self._base_sha256)
        return kept

    def restore(self, saved: dict) -> None:
        """Weights, optimizer, schedule, random numbers and the run plan of a saved state, as a unit."""
        self._base_sha256 = restore_weights(self.model, saved, self.folder.path if self.folder else None)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.completed = self.first_step = saved["step"]
        self.losses, self.skipped = list(saved["losses"]), saved.get("skipped", 0)
        self.run = replace(RunPlan.from_json(saved["run"]), chunk_source="resumed", device=str(self.device))
        if self.run.threads != torch.get_num_threads():
            self._warn(
                f"using {self.run.threads} CPU threads, as the run being resumed did (its results depend on "
                f"the count in the last bits); this machine chose {torch.get_num_threads()}"
            )
            threads.apply(self.run.threads)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn(message)

    def _gradients(self, batches) -> float:
        """The step's mean gradient in .grad and its mean loss (`gradients`); a smaller C from now on where the
        step ran out of memory at this one."""
        between = self._follow_load if self._load else None
        loss, self.run = gradients(self.model, batches, self.run, self.options, between, self._warn_once)
        return loss

    def step(self) -> dict:
        """One optimizer step: `accumulate` batches, one FAVOR+ draw, the SLiM steps, the all-reduce (torchrun),
        optional clipping, the update and the schedule. Returns the step's metrics ({"skipped": True, ...} for a
        skipped non-finite step); a non-finite step without skip_nonfinite saves the state before it and raises."""
        o = self.options
        self._follow_load()
        started = time.perf_counter()
        self._last_point = (
            self._resume_point()
        )  # an interrupt inside this step resumes from before it, redrawing its data
        batches = [draw_batch(self.data, o, self.group, self.generator) for _ in range(o.accumulate)]
        if self.data is not None:
            self.data.release()  # a mapped file's pages go back: the windows are copies
        self.model.redraw_features(self.generator)  # FAVOR+: one draw per step, shared by all its chunks
        loss = self._gradients(batches)
        average_gradients(self.model)  # torchrun: one all-reduce per optimizer step (distributed.py)
        loss = mean(loss, self.device)
        step = self.completed + 1
        if not _finite(self.model, loss):
            return self._skip(step, loss)
        if o.clip_grad and not o.one_step:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"]
        with _signals_held():  # an interrupt here would save updated weights under the step before
            self.optimizer.step()
            self.scheduler.step()
            self.losses.append(loss)
            self.completed = step
            self._last_point = self._resume_point()
        tokens = self.group.world * o.accumulate * o.batch_size * o.seq_len
        self.step_seconds.append(time.perf_counter() - started)
        metrics = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "chunk_size": self.run.chunk_size,
            "tokens_per_s": tokens / self.step_seconds[-1],
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        due = (o.eval_every and step % o.eval_every == 0) or step == o.total_steps
        if self.group.main and self.eval_data is not None and due:
            metrics |= held_out_bpc(self.model, self.eval_data, o, self.run)
        self._record(step, metrics)
        return metrics

    def _skip(self, step: int, loss: float) -> dict:
        """A step with a non-finite loss or gradient: counted and skipped with skip_nonfinite, else the state
        before it saved and an error."""
        if not self.options.skip_nonfinite:
            self.save()  # the weights are still those of the last good step
            where = f"; the last good state is in {self.folder.path}" if self.writes else ""
            raise SlimtuneError(
                f"non-finite loss or gradient at step {step} (loss {loss}){where}: lower `lr`, give `clip_grad`, or "
                "turn on `skip_nonfinite` to skip such steps; nothing was exported",
                params=("lr", "clip_grad", "skip_nonfinite"),
            )
        with _signals_held():
            self.skipped += 1
            self.completed = step
            self._last_point = self._resume_point()
        self._warn(f"skipped step {step}: non-finite loss or gradient ({self.skipped} so far)")
        return {"step": step, "skipped": True}

    def _record(self, step: int, metrics: dict) -> None:
        if self.writes:
            self.folder.log(metrics)
            if self.options.save_every and step % self.options.save_every == 0 and not self.done:
                self.save()


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


def check_resume(saved: dict, options: FitOptions, world: int, where) -> None:
    """Refuse to continue a saved run with other settings (those declared `resume` in options.py), with another
    number of processes, or with more steps where the schedule depends on their number."""
    if "run" not in saved:
        raise SlimtuneError(
            f"the run state in {where} was saved by an older slimtune, without a run plan: start over with `restart` "
            "(the old run is moved aside, not deleted)",
            params=("restart",),
        )
    was, now = saved["settings"], options.resume_settings()
    changed = [k for k in now if k in was and was[k] != now[k] and k != "steps"]
    saved_world = saved["run"]["world_size"]
    if changed or saved_world != world:
        what = [f"`{k}` {was[k]!r} (now {now[k]!r})" for k in changed]
        what += [f"world_size {saved_world} (now {world}), torchrun's process count"] if saved_world != world else []
        raise SlimtuneError(
            f"the run in {where} was started with {', '.join(what)}: resume with the same settings", params=changed
        )
    steps, done = options.total_steps, saved["step"]
    if was.get("steps") == now["steps"]:
        return
    if steps < done:
        raise SlimtuneError(
            f"the run in {where} is at step {done}: `steps` must be at least {done} to resume it, got {steps}",
            params=("steps",),
        )
    why = None
    if options.one_step:
        why = "a one_step run has exactly one step"
    elif options.schedule != Schedule.CONSTANT:
        why = f"its {options.schedule} schedule was laid out over {was['steps']} steps"
    elif done < options.warmup:
        why = f"its warmup of {options.warmup} steps is not done ({done} steps)"
    if why:
        raise SlimtuneError(
            f"the run in {where} cannot change `steps` from {was['steps']} to {steps}: {why}; resume with "
            f"`steps={was['steps']}`, or start over with `restart`",
            params=("steps", "restart"),
        )


def _check_data(data: Tokens | None, options: FitOptions) -> None:
    """Fail on data too short for the windows (or a first batch with nothing to learn) before any work starts."""
    if options.task == Task.COPY:
        return
    if data is None:
        raise SlimtuneError("`data` is required for a text task: pass a text file", params=("data",))
    if options.one_step:
        _text_batch(data, options.batch_size * launched().world, options, launched().world, torch.Generator())
    elif len(data) < options.seq_len + 1:
        raise SlimtuneError(
            f"data has {len(data)} tokens, fewer than `seq_len` + 1 = {options.seq_len + 1}: lower `seq_len`",
            params=("seq_len",),
        )


def open_run_folder(folder: RunFolder, options: FitOptions, world: int, main: bool, saved: dict | None = None):
    """The one place a run folder is opened: rank 0 takes its lock (a no-op when held already); with `resume`, its
    saved state, read and checked against `options` (unless the caller has read it: `saved`). Returns the state."""
    if main:
        folder.lock()
    if saved is None and options.resume:
        saved = folder.load()
        check_resume(saved, options, world, folder.path)
    return saved


@contextlib.contextmanager
def _held_folder(options: FitOptions):
    """The run folder, held (rank 0 takes its lock) from before anything is read, planned or trained until after
    the export, with its saved state when resuming; yields (folder, saved). A folder holding a saved run is
    continued (resume) or, once the run is planned, moved aside (restart, `_restart`), never overwritten by
    accident."""
    if not options.run_dir:
        yield None, None
        return
    folder, launch = RunFolder(options.run_dir), launched()
    try:
        saved = open_run_folder(folder, options, launch.world, launch.main)
        taken = not (options.resume or options.restart) and folder.has_state()  # a saved run, neither asked for
        if taken and (unreadable := folder.state_error()):
            raise SlimtuneError(
                f"run folder {folder.path} holds a saved run state that cannot be read ({unreadable}): add `restart` "
                "to start over (the unreadable state is moved aside, kept)",
                params=("restart",),
            )
        if taken:
            raise SlimtuneError(
                f"run folder {folder.path} holds a saved run ({folder.summary()}): add `resume` to continue it, or "
                "`restart` to start over (the old run is moved aside, not deleted)",
                params=("resume", "restart"),
            )
        yield folder, saved
    finally:
        if launch.main:
            folder.release()


def _restart(folder: RunFolder | None, options: FitOptions, group: Group, warn: OnWarning) -> None:
    """restart: the saved run moves aside (kept), after the new run's plan succeeded. Under torchrun rank 0 moves
    it and every rank waits for that."""
    if folder is None or not options.restart:
        return
    if group.main and folder.has_state():
        aside = folder.move_aside()
        warn(Notice(f"`restart`: the previous run in {folder.path} was moved to {aside}", params=("restart",)))
    barrier()


def _run_steps(trainer: Trainer, on_step: OnStep | None) -> dict:
    """Steps until done, under the run plan's heap policy; the state saved at the end. Returns the last metrics."""
    metrics = {}
    with heap_policy_during(trainer.run.heap or None):
        while not trainer.done:
            metrics = trainer.step()
            if on_step and trainer.group.main and not metrics.get("skipped"):
                on_step(trainer.completed, metrics)
    trainer.save()
    return metrics


class Recipe:
    """One fit or pretrain run in the shape of torchtune's recipes: `setup()` holds the run folder (its lock taken
    once, before anything is read), reads the inputs, joins the process group, builds the model as it will train
    and decides the run (runplan.py; a resumed run keeps its plan); `train()` runs the steps; `save()` exports;
    `cleanup()` releases the run folder. `run()` is the four in order, with Ctrl-C and SIGTERM turned into
    Interrupted (saying what was saved). `FitRecipe` and `PretrainRecipe` give the inputs, the model and the export.

    The options are checked, and `out` is too, before a Recipe exists: nothing here refuses an option."""

    def __init__(self, options: FitOptions, out: Path, *, on_step: OnStep | None, on_warning: OnWarning | None):
        self.options, self.out, self.on_step, self.warn = options, out, on_step, on_warning or _warn
        self.started = time.perf_counter()
        self.held = contextlib.ExitStack()  # the run folder, from setup until cleanup
        self.data: Tokens | None = None
        self.eval_data: Tokens | None = None
        self.data_path: str | os.PathLike | None = None  # recorded in the provenance
        self.group = Group()
        self.trainer: Trainer | None = None

    def read_inputs(self) -> None:
        """Set self.data (and self.eval_data): read once the run folder is held."""
        raise NotImplementedError

    def build_model(self, device: torch.device) -> PerformerLM:
        """The model on `device`, with what trains set as the run will train it."""
        raise NotImplementedError

    def export(self, result: FitResult) -> None:
        """Write `out` (rank 0 only)."""
        raise NotImplementedError

    def setup(self) -> None:
        folder, saved = self.held.enter_context(_held_folder(self.options))
        self.read_inputs()
        self.device, self.group = _start(self.data, self.options)
        self.model = self.build_model(self.device)
        o, world = self.options, self.group.world
        data_bytes = held_while_training(self.data, self.eval_data, windows=o.batch_size * world * o.accumulate,
                                         seq_len=o.seq_len, eval_tokens=o.eval_bytes)  # fmt: skip
        run = None if saved else resolve_run(self.model, self.options, self.group, data_bytes=data_bytes)
        _restart(folder, self.options, self.group, self.warn)
        self.trainer = Trainer(self.model, self.data, self.options, run=run, eval_data=self.eval_data,
                               group=self.group, on_warning=self.warn, folder=folder)  # fmt: skip
        self.trainer.setup(saved)

    def train(self) -> FitResult:
        metrics = _run_steps(self.trainer, self.on_step)
        if not self.trainer.losses:
            raise SlimtuneError(
                "every step had a non-finite loss or gradient: lower `lr` or give `clip_grad`; nothing was exported",
                params=("lr", "clip_grad"),
            )
        return _result(self.trainer, self.options, metrics, self.out)

    def save(self, result: FitResult) -> None:
        # The export runs in the place of the last chunk (planner's export line): what the steps freed leaves the
        # heap first, or the export's copies come on top of it (d 1536 x 8 on an int8 base, C 16, under 800MB: the
        # steps peaked at 720 MB, the export at 801 MB).
        release_free_heap()
        if self.group.main:
            self.export(result)
        barrier()  # the other ranks wait until rank 0 has exported
        result.peak_memory_bytes = peak_memory_bytes(self.device)  # measured again: the export's peak counts too

    def cleanup(self) -> None:
        self.held.close()

    def run(self) -> FitResult:
        try:
            try:
                self.setup()
                result = self.train()
            except KeyboardInterrupt:
                ready = self.trainer is not None and hasattr(self.trainer, "_last_point")  # it has a state to save
                raise Interrupted(self.options.run_dir, self.trainer.save() if ready else None) from None
            self.save(result)
        finally:
            self.cleanup()
        result.seconds = time.perf_counter() - self.started
        return result

    def provenance(self, result: FitResult) -> dict:
        """What was run, for the exported checkpoint's metadata: the options declared `record`, and what the run
        did."""
        recorded = self.options.recorded() | {"steps": result.steps, "chunk_size": result.chunk_size}
        provenance = {"world_size": self.group.world} | recorded | result.metrics
        if self.data_path is not None:
            provenance |= {"data": Path(self.data_path).name, "data_sha256": file_sha256(self.data_path)}
        if self.options.tokenizer is not None:  # `inspect` shows it; the hf export carries the file itself
            tokenizer = self.options.tokenizer
            provenance |= {"tokenizer": Path(tokenizer).name, "tokenizer_sha256": file_sha256(tokenizer)}
        return provenance


def _result(trainer: Trainer, options: FitOptions, metrics: dict, out: Path) -> FitResult:
    last = {k: v for k, v in metrics.items() if k in ("bpc", "bpc_bytes")} | (
        {"skipped_steps": trainer.skipped} if trainer.skipped else {}
    )
    return FitResult(
        chunk_size=trainer.run.chunk_size,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        steps=len(trainer.losses),
        loss=trainer.losses[0],
        final_loss=trainer.losses[-1],
        losses=trainer.losses,
        step_seconds=trainer.step_seconds,
        peak_memory_bytes=peak_memory_bytes(trainer.device),
        device=str(trainer.device),
        out=str(out),
        seconds=0.0,  # set by Recipe.run, once the export is done
        plan=trainer.run.planner,
        metrics=last,
        first_step=trainer.first_step,
        threads=torch.get_num_threads(),
        memory_counts=memory_counts(trainer.device),
        run=trainer.run,
        run_dir=options.run_dir,
        lora_rank=options.lora_rank,
        trainable_parameters=trainer.run.trainable_parameters,
        model=trainer.model,
    )


def _read(data, vocab_size: int, options: FitOptions, what: str = "data") -> Tokens | None:
    """A data file in any of the contract's forms (data.read_data), or a caller's tensor of ids, checked against
    the model's vocabulary."""
    if isinstance(data, torch.Tensor):
        check_vocabulary(data, vocab_size, what)
    return as_tokens(data, vocab_size=vocab_size, tokenizer=options.tokenizer, data_dtype=options.data_dtype, what=what)


def _start(data, options: FitOptions) -> tuple[torch.device, Group]:
    """What fit and pretrain do before building the model: check the data, choose the CPU threads, join a torchrun
    group if launched by one, take this rank's device, seed."""
    device = resolve_device(options.device)
    _check_data(data, options)
    threads.apply(threads.choose(options.threads).count)
    group = join(device)
    torch.manual_seed(options.seed)
    return rank_device(device, group), group


def run_folder_path(run_dir: str | os.PathLike | None, out: str | os.PathLike) -> str | None:
    """The run folder of a run writing `out`: run_dir "auto" is OUT.run; None: no run folder."""
    return f"{out}.run" if str(run_dir) == "auto" else (str(run_dir) if run_dir else None)


def _may_replace(options: FitOptions) -> bool:
    """An existing `out` is replaced when asked to (`overwrite`), or when it is the output of the run whose state the
    run folder holds (which then must be resumed, or restarted with its old state kept aside: `_held_folder`); any
    other is refused, so that no finished fine-tune is lost to a run that only shares its `out`."""
    return bool(options.overwrite or (options.run_dir and RunFolder(options.run_dir).has_state()))


def _with_strategies_that_fit(
    error: OutOfBudgetError, checkpoint: Path, options: FitOptions, data_path, eval_path, model_flags: dict | None
) -> OutOfBudgetError:
    """A run that fits no C: its error, followed by the parameter-memory strategies that do fit under the same
    budget, each with its C (what `plan_fit` compares: adafactor, sgd, LoRA with an fp32 or a bf16 base)."""
    from .strategies import plan_fit

    data = [data_path] if data_path is not None else []
    try:
        plan_fit(checkpoint, options, data=data, eval_data=eval_path, compare_strategies=True, model_flags=model_flags)
    except OutOfBudgetError as compared:
        return compared
    return error


def _options(options: FitOptions | None, overrides: dict) -> FitOptions:
    """The options of a call, checked (run_dir "auto" is made OUT.run once OUT is known)."""
    options = fit_options(options, overrides)
    if options.resume and not options.run_dir:
        raise ConfigError(
            "`resume` needs the run folder of the run to continue: give `run_dir`", params=("resume", "run_dir")
        )
    return options


def _check_outputs(out, source, data_path, options: FitOptions) -> Path:
    """`out` (and `adapter_out`) checked before anything is read: never an input, an existing file only where it may
    be replaced (`_may_replace`)."""
    out = check_output_path(out, source, data_path, fmt=options.format, replace=_may_replace(options))
    if options.adapter_out is not None:
        if Path(options.adapter_out).resolve() == out.resolve():
            raise ConfigError(
                "`adapter_out` is the same path as `out`: give it a folder of its own", params=("adapter_out",)
            )
        check_output_path(options.adapter_out, source, data_path, fmt="hf", replace=_may_replace(options))
    return out


class FitRecipe(Recipe):
    """fit: a checkpoint fine-tuned on data (`fit` says what each input may be)."""

    def __init__(self, checkpoint, data, eval_data, eval_fraction, model_flags, options, out, **callbacks):
        super().__init__(options, out, **callbacks)
        self.checkpoint, self.model_flags = checkpoint, model_flags
        self.inputs = data, eval_data, eval_fraction

    def read_inputs(self) -> None:
        """(data, held-out data, checkpoint), read and checked against the checkpoint's vocabulary."""
        data, eval_data, eval_fraction = self.inputs
        if eval_fraction is not None and eval_data is not None:
            raise ConfigError(
                "give either `eval_data` or `eval_fraction`, not both", params=("eval_data", "eval_fraction")
            )
        if not isinstance(self.checkpoint, Checkpoint):  # a bf16 base is read straight into bf16
            read_as = Strategy.of(self.options).read_dtype
            self.checkpoint = load_checkpoint(self.checkpoint, **(self.model_flags or {}), dtype=read_as)
        vocab_size = self.checkpoint.config.vocab_size
        self.data = _read(data, vocab_size, self.options)
        self.eval_data = _read(eval_data, vocab_size, self.options, "eval_data")
        if eval_fraction is not None:
            self.data, self.eval_data = self.data.split(eval_fraction)

    def build_model(self, device: torch.device) -> PerformerLM:
        """The checkpoint's weights (one copy in memory), then what trains and in which dtype, before the run is
        planned (the planner measures the model as it will train): with `lora_rank`, the base frozen with adapters
        on the targets (fp32, lora_A from `seed`), the frozen layers' weights in `base_dtype`."""
        model = PerformerLM.from_checkpoint(self.checkpoint, device=device)
        Strategy.of(self.options).apply(model)
        return model

    def setup(self) -> None:
        """A run that fits no C is refused with the parameter-memory strategies that do fit, each with its C."""
        try:
            super().setup()
        except OutOfBudgetError as error:
            if chunk_request(self.options.chunk_size, self.options.seq_len) is not None or self.group.world > 1:
                raise  # a given C is refused naming the largest that fits; torchrun's ranks plan alike
            path = self.checkpoint.path
            self.model = self.checkpoint = None  # the comparison loads the checkpoint again, inside the same budget
            error.__traceback__ = None  # its frames hold the model too (a bf16 base: 416 MB still resident)
            gc.collect()
            eval_path = None if isinstance(self.inputs[1], torch.Tensor) else self.inputs[1]
            raise _with_strategies_that_fit(
                error, path, self.options, self.data_path, eval_path, self.model_flags
            ) from None

    def export(self, result: FitResult) -> None:
        """The fine-tuned checkpoint at `out`, and the adapters at `adapter_out` when asked for."""
        o, provenance = self.options, self.provenance(result)
        self.model.save_pretrained(
            self.out, format=o.format, dtype=o.dtype, metadata=provenance, extra_config={"seq_len": o.seq_len},
            tokenizer=o.tokenizer,
        )  # fmt: skip
        if o.adapter_out is not None:
            lora.save_adapter(self.model, o.adapter_out, metadata=provenance)
            result.adapter_out = str(o.adapter_out)


class PretrainRecipe(Recipe):
    """pretrain: a model from random initialisation, on data or the copy task."""

    def __init__(self, config: PerformerConfig, data, options, out, **callbacks):
        super().__init__(options, out, **callbacks)
        self.config, self.data = config, data

    def read_inputs(self) -> None:
        self.data = _read(self.data, self.config.vocab_size, self.options)

    def build_model(self, device: torch.device) -> PerformerLM:
        return PerformerLM(self.config).to(device)

    def export(self, result: FitResult) -> None:
        o = self.options
        if o.task == Task.COPY:
            generator = torch.Generator().manual_seed(o.seed + 1)  # held-out sequences, not the training's
            result.metrics["copy_accuracy"] = copy_accuracy(self.model, o.seq_len, o.copy_symbols, generator)
        self.model.save_pretrained(
            self.out,
            format=o.format,
            dtype=o.dtype,
            extra_config={"seq_len": o.seq_len},
            metadata={"pretrained": True} | self.provenance(result),
            tokenizer=o.tokenizer,
        )


def fit(
    checkpoint: Checkpoint | str | os.PathLike,
    data: torch.Tensor | str | os.PathLike,
    out: str | os.PathLike | None = None,
    options: FitOptions | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    eval_data: torch.Tensor | str | os.PathLike | None = None,
    eval_fraction: float | None = None,
    on_step: OnStep | None = None,
    on_warning: OnWarning | None = None,
    model_flags: dict | None = None,
    **overrides,
) -> FitResult:
    """Fine-tune a checkpoint on data with SLiM and export weights the original model loads unchanged.

    Args:
        checkpoint: a checkpoint path (or a loaded `Checkpoint`); `model_flags` (n_heads, feature_type,
            layernorm) fill what a checkpoint without slimtune_config lacks. A path is read once the run folder
            is held.
        data: a data file's path in any of the contract's forms (data.read_data: .npy or .bin ids, .jsonl records,
            text through options.tokenizer or as bytes), its Tokens, or token ids as an integer tensor [N].
        out: where to write the fine-tuned checkpoint (never an input); None: NAME-tuned.safetensors beside the
            checkpoint (-2, -3, ... when taken; with resume, the one whose run folder holds the saved run), as on
            the command line.
        options: a FitOptions; keyword `overrides` (seq_len=, steps=, mem_budget=, ...) replace its fields.
            run_dir defaults to OUT.run, as on the command line (run_dir=None: no run folder).
        data_path: the data file, for provenance, when `data` is a tensor.
        eval_data: held-out bytes (or a path), scored in bpc every options.eval_every steps and at the end.
        eval_fraction: instead of eval_data, hold out this last share of `data` (e.g. 0.05).
        on_step: called as on_step(step, metrics) after each step (loss, lr, C, tokens/s, peak memory, bpc).
        on_warning: called with each warning (default: warnings.warn).

    Returns:
        FitResult: C, losses, measured peak, the plan (when C was auto), the run plan, and the trained model.

    Raises:
        SlimtuneError (ConfigError, CheckpointError, DataError, OutOfBudgetError): bad input, found before
        anything is written. Interrupted (a KeyboardInterrupt) on Ctrl-C or SIGTERM, saying what was saved.

    Example:
        result = slimtune.fit("model.safetensors", "my.txt", "tuned.safetensors", mem_budget="2GB", steps=100)
    """
    source = checkpoint.path if isinstance(checkpoint, Checkpoint) else checkpoint
    options = _options(options, overrides)
    out = out if out is not None else default_out(source, options.format, resume=options.resume)
    options = replace(options, run_dir=run_folder_path(options.run_dir, out))
    data_path = data_path if isinstance(data, torch.Tensor) else data_path or data
    out = _check_outputs(out, source, data_path, options)
    recipe = FitRecipe(checkpoint, data, eval_data, eval_fraction, model_flags, options, out,
                       on_step=on_step, on_warning=on_warning)  # fmt: skip
    recipe.data_path = data_path
    return recipe.run()


def pretrain(
    config: PerformerConfig | str | os.PathLike,
    data: torch.Tensor | str | os.PathLike | None,
    out: str | os.PathLike,
    options: FitOptions | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    on_step: OnStep | None = None,
    on_warning: OnWarning | None = None,
    **overrides,
) -> FitResult:
    """Train a model from random initialisation (the server side) and write a contract checkpoint. `config`: a
    PerformerConfig, or a recipe's name or .toml path (`slimtune recipes`), whose [train] settings then stand
    under `overrides`, as `slimtune pretrain` reads a recipe's; with options.tokenizer the model's vocabulary is the
    tokenizer's. `data`: as for `fit` (None for the copy task); the rest as for `fit`."""
    if not isinstance(config, PerformerConfig):
        config, settings = recipes.resolve(config)
        overrides = settings | overrides
    options = _options(options, overrides)
    options = replace(options, run_dir=run_folder_path(options.run_dir, out))
    if options.lora_rank:
        raise ConfigError(
            "LoRA adapts a pretrained base: pretrain trains every parameter; give `lora_rank` to fit",
            params=("lora_rank",),
        )
    if data is not None and not isinstance(data, torch.Tensor):
        data_path = data_path or data
    if options.tokenizer is not None:  # a new model's vocabulary is its tokenizer's (a recipe's 256 is for bytes)
        config = replace(config, vocab_size=load_tokenizer(options.tokenizer).get_vocab_size(with_added_tokens=True))
    out = check_output_path(out, data_path, fmt=options.format, replace=_may_replace(options))
    recipe = PretrainRecipe(config, data, options, out, on_step=on_step, on_warning=on_warning)
    recipe.data_path = data_path
    return recipe.run()

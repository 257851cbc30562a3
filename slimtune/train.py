"""Fine-tuning: load a checkpoint, take optimizer steps with the SLiM step, export a contract checkpoint.

`fit` is the library function behind `slimtune fit`. It resolves the device and chunk size, runs the steps
(one, as in the paper's on-device experiment, or many), and writes weights that the original model loads
unchanged (same names, shapes, dtypes and config), with the run's provenance in the metadata.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (
    FORMATS,
    Checkpoint,
    build_model,
    check_output_path,
    export_tensors,
    file_sha256,
    parse_dtype,
    save_checkpoint,
)
from .data import copy_windows, first_windows, random_windows
from .distributed import Group, agree_min, average_gradients, barrier, broadcast_parameters, join, launched, mean, rank_device
from .evaluation import copy_accuracy, evaluate
from .model import PerformerConfig, PerformerLM
from .errors import ConfigError, SlimtuneError
from .memory import is_out_of_memory, peak_memory_bytes, resolve_device
from .optimizers import OPTIMIZERS, make_optimizer
from .planner import chunk_sizes, plan_chunk_size
from .runs import RunFolder
from .slim import PRECISIONS, RECOVERY_MODES, slim_step

@dataclass
class FitOptions:
    seq_len: int = 1024  # L, bytes per window (each window holds L + 1 bytes)
    batch_size: int = 1  # windows per step
    steps: int = 1  # optimizer steps
    one_step: bool = False  # the contract's one step on the first batch: rows b*L.., no shuffling
    optimizer: str = "adam"  # sgd (plain, no momentum), adam or adamw
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.01  # adamw only; 0 under one_step
    chunk_size: int | None = None  # C; None picks the largest that fits mem_budget
    mem_budget: int | None = None  # bytes the run may hold; None: what the device has free
    seed: int = 0  # data order and FAVOR+ draws
    device: str = "auto"  # auto, cpu or cuda
    recovery: str = "subtract64"  # how SLiM recovers chunk start states (see slim.py)
    precision: str = "fp32"  # compute precision: fp32, or bf16 autocast (fp32 weights, gradients and states)
    batch_weight_grads: bool | None = None  # small C: batch weight gradients (deferred.py); None: whenever C is small
    schedule: str = "constant"  # learning rate: constant, or cosine decay to 0 after the warmup
    warmup: int = 0  # steps of linear warmup
    clip_grad: float | None = None  # clip the gradients' global norm to this (opt-in; never with one_step)
    accumulate: int = 1  # batches whose gradients are summed into one optimizer step
    eval_every: int = 0  # with eval data: bpc every N steps (0: only at the end)
    eval_bytes: int = 100_000  # bytes of the eval data each evaluation reads
    run_dir: str | None = None  # metrics.jsonl and resumable state; None: no run folder
    save_every: int = 100  # resumable state every N steps (and on interrupt), with a run folder
    resume: bool = False  # continue the run saved in run_dir
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradients are not finite, instead of stopping
    task: str = "text"  # text: windows of the data file; copy: the synthetic copying task (pretrain only)
    copy_symbols: int = 16  # copy task: size of the symbol alphabet
    dtype: str = "auto"  # export dtype: auto keeps each tensor's input dtype; fp32, fp16 or bf16
    format: str = "safetensors"  # export as one .safetensors file, or hf: a folder with config.json

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be 'auto' or an integer >= 1, got {self.chunk_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")
        parse_dtype(self.dtype)
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.accumulate < 1:
            raise ConfigError(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"--clip-grad must be a positive number, got {self.clip_grad}")
        if self.resume and not self.run_dir:
            raise ConfigError("--resume needs the run folder of the run to continue: pass --run-dir")
        if self.task not in ("text", "copy"):
            raise ConfigError(f"task must be text or copy, got {self.task!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(f"--state-recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.recovery!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


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
    plan: dict | None = None  # the planner's choice when chunk size was auto
    metrics: dict = field(default_factory=dict)  # task metrics, e.g. copy_accuracy
    model: PerformerLM | None = field(default=None, repr=False, compare=False)  # the trained model, in memory

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gradients(model, batches, chunk_size: int, options: FitOptions, optimizer, warn) -> tuple[float, int]:
    """Fill .grad with the mean gradient over `batches` (SLiM steps), and return the mean loss. On running out of
    memory anyway (another process took memory, fragmentation), redo the whole step from zeroed gradients with
    the next smaller C, so that no step is ever taken on incomplete gradients."""
    device = next(model.parameters()).device
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total = 0.0
            for windows, mask in batches:
                mask = None if mask is None else mask.to(device)
                total += slim_step(model, windows.to(device), chunk_size, mask, recovery=options.recovery,
                                   precision=PRECISIONS[options.precision], batch_weight_grads=options.batch_weight_grads)
            if len(batches) > 1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad /= len(batches)
            return total / len(batches), chunk_size
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
        # Outside the except block: the traceback no longer pins the failed step's tensors.
        optimizer.zero_grad(set_to_none=True)
        _free_device_memory(device)
        smaller = [c for c in chunk_sizes(options.seq_len) if c < min(chunk_size, options.seq_len)]
        if not smaller:
            raise SlimtuneError(
                "out of memory even at chunk size 1: free memory on the device, or use a smaller --batch-size, "
                "--seq-len or model"
            )
        warn(f"out of memory at chunk size {chunk_size}; retrying this step with chunk size {smaller[-1]}")
        chunk_size = smaller[-1]


def _finite(model, loss: float) -> bool:
    """Whether the loss and every gradient are finite (one device sync per step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return math.isfinite(loss) and bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _batch(data, options: FitOptions, generator, group: Group = Group()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's windows [B, L + 1] and loss mask [B, L] (None: every position counts). Every rank draws the
    same global batch of world x B windows and keeps its own slice, so the data does not depend on the split."""
    B = options.batch_size * group.world
    if options.task == "copy":
        windows, mask = copy_windows(B, options.seq_len, options.copy_symbols, generator)
    elif options.one_step:
        windows, mask = first_windows(data, B, options.seq_len), None
    else:
        windows, mask = random_windows(data, B, options.seq_len, generator), None
    mine = slice(group.rank * options.batch_size, (group.rank + 1) * options.batch_size)
    return windows[mine], None if mask is None else mask[mine]


def _lr_factor(options: FitOptions, steps: int):
    def factor(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / options.warmup
        if options.schedule == "cosine":
            progress = (step - options.warmup) / max(1, steps - options.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _run_steps(model, data, options: FitOptions, chunk_size: int, on_step, warn, eval_data=None,
               group: Group = Group()) -> tuple[list[float], int, dict]:
    """The training loop: per step, `accumulate` batches of windows, one FAVOR+ draw, the SLiM steps, optional
    clipping, the optimizer and schedule steps; metrics and resumable state in the run folder.
    Returns the losses, the chunk size in use at the end (smaller than asked after an out-of-memory retry), and
    the last step's metrics."""
    generator = torch.Generator().manual_seed(options.seed)
    device = next(model.parameters()).device
    optimizer = make_optimizer(
        options.optimizer, model.parameters(), options.lr, 0.0 if options.one_step else options.weight_decay
    )
    steps = 1 if options.one_step else options.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(options, steps))
    folder = RunFolder(options.run_dir) if options.run_dir else None
    run = folder if group.main else None  # only rank 0 writes; every rank reads the state it resumes from
    settings = {f.name: getattr(options, f.name) for f in fields(options)} | {"world_size": group.world}
    losses, first = [], 0
    if options.resume:
        saved = folder.load(settings)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        first, chunk_size, losses = saved["step"], saved["chunk_size"], list(saved["losses"])
    broadcast_parameters(model)  # the same start on every rank (a no-op for one process)

    def save(step: int, rng: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The state after `step` completed steps; `rng`: the random-number states at the start of the next one."""
        run.save({"step": step, "chunk_size": chunk_size, "losses": losses, "settings": settings,
                  "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "generator": rng[0], "torch_rng": rng[1]})

    warned = set()

    def warn_once(message: str) -> None:
        if not warned:
            warn(message)
        warned.add(message)

    metrics, skipped = {}, 0
    # Where a resumed run would start: (completed steps, random-number states at that point). An interrupt inside a
    # step saves the point before it, so the resumed run redraws that step's data and FAVOR+ features.
    resume_point = (first, (generator.get_state(), torch.get_rng_state()))
    if run:
        run.lock()
    try:
        for step in range(first, steps):
            started = time.perf_counter()
            resume_point = (step, (generator.get_state(), torch.get_rng_state()))
            batches = [_batch(data, options, generator, group) for _ in range(options.accumulate)]
            model.redraw_features(generator)  # FAVOR+: one draw per step, shared by all its chunks
            loss, chunk_size = _gradients(model, batches, chunk_size, options, optimizer, warn_once)
            average_gradients(model)  # torchrun: one all-reduce per optimizer step (distributed.py)
            loss = mean(loss, device)
            if not _finite(model, loss):
                if not options.skip_nonfinite:
                    if run:
                        save(*resume_point)  # the weights are still those of the last good step
                    where = f"; the last good state is in {options.run_dir}" if run else ""
                    raise SlimtuneError(
                        f"non-finite loss or gradient at step {step + 1} (loss {loss}){where}: lower --lr, add "
                        "--clip-grad, or pass --skip-nonfinite to skip such steps; nothing was exported"
                    )
                skipped += 1
                warn(f"skipped step {step + 1}: non-finite loss or gradient ({skipped} so far)")
                resume_point = (step + 1, (generator.get_state(), torch.get_rng_state()))
                continue
            if options.clip_grad and not options.one_step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            losses.append(loss)
            resume_point = (step + 1, (generator.get_state(), torch.get_rng_state()))
            metrics = {"step": step + 1, "loss": loss, "lr": lr, "chunk_size": chunk_size,
                       "tokens_per_s": group.world * options.accumulate * options.batch_size * options.seq_len
                       / (time.perf_counter() - started),
                       "peak_memory_bytes": peak_memory_bytes(device)}
            if group.main and eval_data is not None and (
                    (options.eval_every and (step + 1) % options.eval_every == 0) or step + 1 == steps):
                metrics["bpc"] = evaluate(model, eval_data, seq_len=options.seq_len, max_bytes=options.eval_bytes).bpc
            if run:
                run.log(metrics)
                if options.save_every and (step + 1) % options.save_every == 0 and step + 1 < steps:
                    save(*resume_point)
            if on_step and group.main:
                on_step(step + 1, metrics)
        if run:
            save(*resume_point)
    except KeyboardInterrupt:
        if run:
            save(*resume_point)
        raise
    finally:
        if run:
            run.release()
    if not losses:
        raise SlimtuneError("every step had a non-finite loss or gradient: lower --lr or add --clip-grad; nothing was exported")
    return losses, chunk_size, metrics | ({"skipped_steps": skipped} if skipped else {})


def _check_data(data: torch.Tensor | None, options: FitOptions) -> None:
    """Fail on data too short for the windows before any work starts."""
    if options.task == "copy":
        return
    if data is None:
        raise SlimtuneError("--data is required for a text task: pass a text file")
    if options.one_step:
        first_windows(data, options.batch_size * launched().world, options.seq_len)
    elif data.numel() < options.seq_len + 1:
        raise SlimtuneError(
            f"data has {data.numel()} bytes, fewer than seq len + 1 = {options.seq_len + 1}: lower --seq-len"
        )


def _plan(model, options: FitOptions, group: Group):
    """The planner's choice on this rank's device; under torchrun every rank then takes the smallest C any rank
    can afford, so that a rank whose budget fits nothing stops them all with its reason."""
    device = next(model.parameters()).device
    try:
        plan = plan_chunk_size(
            model, options.seq_len, options.batch_size, options.optimizer, options.mem_budget, recovery=options.recovery
        )
    except SlimtuneError:
        agree_min(0, device)
        raise
    chunk_size = agree_min(plan.chunk_size, device)
    if chunk_size == 0:
        raise SlimtuneError("another rank's --mem-budget fits no chunk size (see its message): give it more memory")
    if chunk_size != plan.chunk_size:
        plan.chunk_size = chunk_size
        plan.batch_weight_grads = False  # the buffers were sized against this rank's own C
    return plan


def _train(model, data, out, options: FitOptions, on_step, on_warning, eval_data=None, group: Group = Group()) -> FitResult:
    """Pick C with the planner when it is auto, run the steps, and report them (the export is the caller's)."""
    plan = None
    chunk_size = options.chunk_size
    if chunk_size is None:
        plan = _plan(model, options, group)
        chunk_size = plan.chunk_size
        options = replace(options, batch_weight_grads=plan.batch_weight_grads)
    started = time.perf_counter()
    losses, chunk_size, last = _run_steps(model, data, options, chunk_size, on_step, on_warning or _warn, eval_data, group)
    device = next(model.parameters()).device
    return FitResult(
        chunk_size=chunk_size,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        steps=len(losses),
        loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
        peak_memory_bytes=peak_memory_bytes(device),
        device=str(device),
        out=str(out),
        seconds=time.perf_counter() - started,
        plan=None if plan is None else plan.to_json(),
        metrics={k: v for k, v in last.items() if k in ("bpc", "skipped_steps")},
        model=model,
    )


def _provenance(result: FitResult, options: FitOptions, data_path) -> dict:
    """What was run, for the exported checkpoint's metadata."""
    provenance = {
        "task": options.task,
        "steps": result.steps,
        "one_step": options.one_step,
        "optimizer": options.optimizer,
        "lr": options.lr,
        "schedule": options.schedule,
        "chunk_size": result.chunk_size,
        "seq_len": options.seq_len,
        "batch_size": options.batch_size,
        "accumulate": options.accumulate,
        "seed": options.seed,
        "state_recovery": options.recovery,
        **result.metrics,
    }
    if data_path is not None:
        provenance |= {"data": Path(data_path).name, "data_sha256": file_sha256(data_path)}
    return provenance


def _start(data, options: FitOptions) -> tuple[torch.device, Group]:
    """What fit and pretrain do before building the model: check the data, join a torchrun group if launched by
    one, take this rank's device, seed."""
    device = resolve_device(options.device)
    _check_data(data, options)
    group = join(device)
    torch.manual_seed(options.seed)
    return rank_device(device, group), group


def fit(
    checkpoint: Checkpoint,
    data: torch.Tensor,
    out: str | Path,
    options: FitOptions,
    *,
    data_path: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    eval_data: torch.Tensor | None = None,
) -> FitResult:
    """Fine-tune `checkpoint` on the bytes `data` and export to `out`; `eval_data`, if given, is scored in bpc
    (every options.eval_every steps and at the end). Raises SlimtuneError on bad input, before anything is
    written. `on_step(step, metrics)` sees each step's loss, lr, C, tokens/s, peak memory (and bpc)."""
    options.validate()
    out = check_output_path(out, checkpoint.path, data_path, fmt=options.format)
    device, group = _start(data, options)
    model = build_model(checkpoint, device=device)
    checkpoint.release()  # the model holds the weights now; keep one copy in memory, not two
    result = _train(model, data, out, options, on_step, on_warning, eval_data, group)
    if not group.main:
        barrier()  # rank 0 exports; the others wait until it has
        return result
    provenance = {"base_checkpoint": checkpoint.path.name, "base_sha256": file_sha256(checkpoint.path),
                  "world_size": group.world}
    save_checkpoint(
        out,
        export_tensors(model, checkpoint, parse_dtype(options.dtype)),
        checkpoint.config,
        extra_config=checkpoint.extra_config | {"seq_len": options.seq_len},
        provenance=provenance | _provenance(result, options, data_path),
        fmt=options.format,
    )
    barrier()
    return result


def pretrain(
    config: PerformerConfig,
    data: torch.Tensor,
    out: str | Path,
    options: FitOptions,
    *,
    data_path: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> FitResult:
    """Train a model from random initialisation (the server side) and write a contract checkpoint."""
    options.validate()
    out = check_output_path(out, data_path, fmt=options.format)
    device, group = _start(data, options)
    model = PerformerLM(config).to(device)
    result = _train(model, data, out, options, on_step, on_warning, group=group)
    if not group.main:
        barrier()  # rank 0 exports; the others wait until it has
        return result
    if options.task == "copy":
        generator = torch.Generator().manual_seed(options.seed + 1)  # held-out sequences, not the training ones
        result.metrics["copy_accuracy"] = copy_accuracy(model, options.seq_len, options.copy_symbols, generator)
    dtype = parse_dtype(options.dtype)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    save_checkpoint(out, tensors, config, extra_config={"seq_len": options.seq_len},
                    provenance={"pretrained": True, "world_size": group.world} | _provenance(result, options, data_path),
                    fmt=options.format)
    barrier()
    return result

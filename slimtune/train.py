"""Fine-tuning: load a checkpoint, take optimizer steps with the SLiM step, export a contract checkpoint.

`fit` is the library function behind `slimtune fit`. It resolves the device and chunk size, runs the steps
(one, as in the paper's on-device experiment, or many), and writes weights that the original model loads
unchanged (same names, shapes, dtypes and config), with the run's provenance in the metadata.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint, build_model, check_output_path, export_tensors, file_sha256, save_checkpoint
from .data import first_windows, random_windows
from .errors import ConfigError, SlimtuneError
from .memory import peak_memory_bytes, resolve_device
from .optimizers import OPTIMIZERS, make_optimizer
from .planner import plan_chunk_size
from .slim import RECOVERY_MODES, slim_step

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
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(f"--state-recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.recovery!r}")


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
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def fit(
    checkpoint: Checkpoint,
    data: torch.Tensor,
    out: str | Path,
    options: FitOptions,
    *,
    data_path: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fine-tune `checkpoint` on the bytes `data` and export to `out`. Raises SlimtuneError on bad input,
    before anything is written."""
    options.validate()
    out = check_output_path(out, checkpoint.path, data_path)
    device = resolve_device(options.device)
    steps = 1 if options.one_step else options.steps
    L, B = options.seq_len, options.batch_size
    if options.one_step:
        first_batch = first_windows(data, B, L)  # validates the length before any work
    elif data.numel() < L + 1:
        raise SlimtuneError(f"data has {data.numel()} bytes, fewer than seq len + 1 = {L + 1}: lower --seq-len")

    torch.manual_seed(options.seed)
    model = build_model(checkpoint, device=device)
    checkpoint.release()  # the model holds the weights now; keep one copy in memory, not two
    plan = None
    chunk_size = options.chunk_size
    if chunk_size is None:
        plan = plan_chunk_size(model, L, B, options.optimizer, options.mem_budget, recovery=options.recovery)
        chunk_size = plan.chunk_size

    generator = torch.Generator().manual_seed(options.seed)
    optimizer = make_optimizer(
        options.optimizer, model.parameters(), options.lr, 0.0 if options.one_step else options.weight_decay
    )
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        windows = first_batch if options.one_step else random_windows(data, B, L, generator)
        model.redraw_features(generator)  # FAVOR+: one draw per step, shared by all its chunks
        optimizer.zero_grad(set_to_none=True)
        loss = slim_step(model, windows.to(device), chunk_size, recovery=options.recovery)
        optimizer.step()
        losses.append(loss)
        if on_step:
            on_step(step + 1, loss)
    seconds = time.perf_counter() - started

    provenance = {
        "base_checkpoint": checkpoint.path.name,
        "base_sha256": file_sha256(checkpoint.path),
        "steps": steps,
        "one_step": options.one_step,
        "optimizer": options.optimizer,
        "lr": options.lr,
        "chunk_size": chunk_size,
        "seq_len": L,
        "batch_size": B,
        "seed": options.seed,
        "state_recovery": options.recovery,
    }
    if data_path is not None:
        provenance |= {"data": Path(data_path).name, "data_sha256": file_sha256(data_path)}
    save_checkpoint(
        out,
        export_tensors(model, checkpoint),
        checkpoint.config,
        extra_config=checkpoint.extra_config | {"seq_len": L},
        provenance=provenance,
    )
    return FitResult(
        chunk_size=chunk_size,
        seq_len=L,
        batch_size=B,
        steps=steps,
        loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
        peak_memory_bytes=peak_memory_bytes(device),
        device=str(device),
        out=str(out),
        seconds=seconds,
        plan=None if plan is None else plan.to_json(),
    )

"""`slimtune bench`: the time-memory tradeoff of one model on this device, measured side by side.

Three ways to get the same gradients are compared in one process:
- SLiM at each chunk size C (slimtune.slim.slim_step),
- full backprop (SLiM with C = L: one chunk, ordinary autograd),
- full backprop with per-layer activation checkpointing (torch.utils.checkpoint around each layer), the usual
  alternative: it keeps each layer's input for the whole sequence and recomputes one layer at a time.

Time: the median of `steps` timed steps after `warmup` untimed ones; methods are interleaved round by round, so a
drift of a shared machine hits all of them alike. Under the CLI the timed steps run with the "fast" heap
(memory.py): full backprop then runs as fast as in a plain PyTorch script, not slowed by page faults. A step is
zero_grad, the gradients and, with an optimizer, its update. Memory is measured on one further step per method,
alone: on CUDA the caching allocator's peak reservation plus the CUDA context (after empty_cache, so that one
method's cache does not count for the next); on CPU the peak of tensor bytes the process holds (weights,
gradients, optimizer state and everything the step allocates, counted as they are created and freed), which
unlike RSS does not depend on what ran before.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from . import lora
from .config import PerformerConfig
from .devices import cuda_context_bytes, emulate_card, resolve_device
from .errors import ConfigError
from .memory import TensorBytes, heap_policy, heap_policy_during, is_out_of_memory
from .optimizers import make_optimizer
from .options import BENCH_SEQ_LEN, BENCH_STEPS, BENCH_WARMUP
from .pretrained import PerformerLM
from .recipes import load_recipe
from .runplan import parameter_counts
from .slim import autocast, chunk_loss, compute_dtype, slim_step
from .strategies import Strategy

FULL, CHECKPOINTED = "full backprop", "layer checkpointing"  # the latter: torch.utils.checkpoint per layer


@dataclass(frozen=True)
class Method:
    name: str  # "SLiM", FULL or CHECKPOINTED
    chunk_size: int  # C; L for the two full-sequence methods

    @property
    def label(self) -> str:
        return f"SLiM C={self.chunk_size}" if self.name == "SLiM" else self.name


@dataclass
class Row:
    method: str
    chunk_size: int
    median_s: float | None = None  # None: the method ran out of memory
    min_s: float | None = None
    max_s: float | None = None
    peak_bytes: int | None = None
    vs_full_time: float | None = None
    vs_full_memory: float | None = None
    error: str | None = None
    times: list[float] = field(default_factory=list)


@dataclass
class Setup:
    """What a bench measures: a model on its device and one batch of token windows [B, L + 1]."""

    model: PerformerLM
    windows: torch.Tensor
    name: str  # the checkpoint's file name, "recipe NAME" or "model"

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1] - 1


def setup(
    *,
    checkpoint=None,
    recipe: str | None = None,
    config: PerformerConfig | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    seed: int = 0,
    emulate_memory: str | None = None,
    strategy: Strategy | None = None,
) -> Setup:
    """The model to measure, from exactly one of a checkpoint, a recipe's model or a config (the latter two
    randomly initialised with `seed`), and seeded random windows. L: `seq_len`, else the recipe's, else 1024.
    `emulate_memory` caps a CUDA process at a smaller card's memory before anything is allocated. `strategy`
    (slimtune.strategies): what trains, e.g. LoRA adapters on a frozen base; default every parameter."""
    if sum(x is not None for x in (checkpoint, recipe, config)) != 1:
        raise ConfigError(
            "give exactly one of `checkpoint` (a file) or `recipe` (a name, see `slimtune recipes`)",
            params=("checkpoint", "recipe"),
        )
    dev = resolve_device(device)
    if emulate_memory is not None:
        emulate_card(emulate_memory, dev)
    torch.manual_seed(seed)
    if checkpoint is not None:
        model, name = PerformerLM.from_pretrained(checkpoint, device=dev), Path(checkpoint).name
        default_len = BENCH_SEQ_LEN
    else:
        base = load_recipe(recipe) if recipe is not None else None
        model = PerformerLM(base.model if base else config).to(dev)
        name = f"recipe {base.path.stem}" if base else "model"
        default_len = int(base.train.get("seq_len", BENCH_SEQ_LEN)) if base else BENCH_SEQ_LEN
    length = seq_len or default_len
    if length < 2:
        raise ConfigError(f"`seq_len` must be at least 2 for a bench, got {length}", params=("seq_len",))
    if strategy is not None:
        strategy.apply(model)
    model.redraw_features(torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, model.config.vocab_size, (batch_size, length + 1), generator=generator).to(dev)
    return Setup(model, windows, name)


def checkpointed_step(model: PerformerLM, windows: torch.Tensor, precision: torch.dtype | None = None) -> float:
    """Full backprop of the mean next-token loss with each layer under torch.utils.checkpoint: the layer's
    activations are dropped after the forward and rebuilt during backward. Accumulates into .grad."""
    inputs, targets = windows[:, :-1].long(), windows[:, 1:].long()
    with autocast(inputs.device, precision):
        x = model.embed(inputs, 0)
        for layer, state in zip(model.layers, model.initial_states(inputs.shape[0]), strict=True):
            x, _ = checkpoint(layer, x, state, use_reentrant=False)
        weights = torch.full(targets.shape, 1.0 / targets.numel(), dtype=torch.float64, device=targets.device)
        loss = chunk_loss(model.output_logit_map(x), targets, weights)  # the mean, as slim_step's
    loss.backward()
    return loss.item()


def chunk_list(value: str) -> list[int]:
    """'1024,256,64' (commas or spaces) as [1024, 256, 64]."""
    try:
        found = [int(v) for v in str(value).replace(",", " ").split()]
    except ValueError:
        found = []
    if not found or min(found) < 1:
        raise ConfigError(
            f"`chunks` must be integers >= 1 separated by commas, e.g. 1024,256,64,16; got {value!r}",
            params=("chunks",),
        )
    return found


def methods_for(seq_len: int, chunk_sizes: list[int], *, full: bool = True, checkpointed: bool = True) -> list[Method]:
    bad = [c for c in chunk_sizes if c < 1]
    if bad:
        raise ConfigError(f"chunk sizes must be integers >= 1, got {bad[0]}: pass e.g. 1024,256,64,16")
    found = [Method("SLiM", c) for c in dict.fromkeys(chunk_sizes) if c < seq_len]
    if full:
        found.insert(0, Method(FULL, seq_len))
    if checkpointed:
        found.insert(1 if full else 0, Method(CHECKPOINTED, seq_len))
    if not found:
        raise ConfigError(f"nothing to measure: every chunk size is >= L = {seq_len} and the full methods are off")
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One step of one method, with the optimizer (if any) built once per method and kept between its steps,
    as in a real run."""

    def __init__(self, model, windows, optimizer: str | None, precision, recovery: str):
        self.model, self.windows, self.precision, self.recovery = model, windows, precision, recovery
        self.optimizer_name = optimizer
        self.initial = {k: v.clone() for k, v in model.state_dict().items()} if optimizer else None

    def step(self, method: Method, optimizer) -> None:
        self.model.zero_grad(set_to_none=True)
        if method.name == CHECKPOINTED:
            checkpointed_step(self.model, self.windows, self.precision)
        else:
            slim_step(self.model, self.windows, method.chunk_size, recovery=self.recovery, precision=self.precision)
        if optimizer is not None:
            optimizer.step()

    def optimizer(self):
        if self.optimizer_name is None:
            return None
        self.model.load_state_dict(self.initial)  # every method starts from the same weights
        return make_optimizer(self.optimizer_name, self.model.parameters(), 1e-6)


def _peak(runner: _Runner, method: Method, device: torch.device) -> int:
    """Measured peak bytes of one step of `method` (see the module docstring), optimizer state included."""
    model = runner.model
    model.zero_grad(set_to_none=True)
    optimizer = runner.optimizer()
    if optimizer is not None:
        runner.step(method, optimizer)  # creates the optimizer state, which a real run holds throughout
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        runner.step(method, optimizer)
        _sync(device)
        return torch.cuda.max_memory_reserved(device) + cuda_context_bytes(device)
    held = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    if optimizer is not None:
        held += sum(
            v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        )
    model.zero_grad(set_to_none=True)  # the step creates the gradients, so the tracker counts them
    with TensorBytes() as tracked:
        runner.step(method, optimizer)
    return held + tracked.peak


def run_bench(
    model: PerformerLM,
    windows: torch.Tensor,
    methods: list[Method],
    *,
    steps: int = BENCH_STEPS,
    warmup: int = BENCH_WARMUP,
    optimizer: str | None = None,
    precision=None,
    recovery: str = "subtract64",
    on_progress=None,
) -> list[Row]:
    """Measure every method on `windows` [B, L + 1]; see the module docstring. A method that runs out of memory
    gets a row with `error` set instead of figures, and the others go on."""
    if steps < 1 or warmup < 0:
        raise ConfigError(
            f"`steps` must be >= 1 and `warmup` >= 0, got {steps} and {warmup}", params=("steps", "warmup")
        )
    device = windows.device
    runner = _Runner(model, windows, optimizer, compute_dtype(precision), recovery)
    rows = {m: Row(m.label, m.chunk_size) for m in methods}
    optimizers = {}
    for m in methods:  # peak memory first, each method alone
        try:
            rows[m].peak_bytes = _peak(runner, m, device)
            optimizers[m] = runner.optimizer()
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            rows[m].error = "out of memory"
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_progress:
            on_progress()
    live = [m for m in methods if rows[m].error is None]
    # Timings without page faults, as plain PyTorch runs full backprop; a process whose heap slimtune does not
    # manage is left alone (glibc's own behaves like "fast").
    with heap_policy_during("fast" if heap_policy() is not None else None):
        for r in range(warmup + steps):
            for m in live:
                if rows[m].error:
                    continue
                state = {k: v.clone() for k, v in model.state_dict().items()} if optimizer else None
                try:
                    _sync(device)
                    started = time.perf_counter()
                    runner.step(m, optimizers[m])
                    _sync(device)
                    if r >= warmup:
                        rows[m].times.append(time.perf_counter() - started)
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    rows[m].error = "out of memory"
                if state is not None:
                    model.load_state_dict(state)  # keep the weights the same for every method
                model.zero_grad(set_to_none=True)
                if on_progress:
                    on_progress()
    for row in rows.values():
        if row.times and row.error is None:
            row.median_s, row.min_s, row.max_s = statistics.median(row.times), min(row.times), max(row.times)
    full = next((rows[m] for m in methods if m.name == FULL and rows[m].median_s is not None), None)
    for row in rows.values():
        if full is not None and row.median_s is not None:
            row.vs_full_time = row.median_s / full.median_s
            row.vs_full_memory = row.peak_bytes / full.peak_bytes
    return [rows[m] for m in methods]


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def bench_json(run: Setup, rows: list[Row], *, batch_size: int, precision, optimizer) -> dict:
    """What bench's JSON holds: the model, the settings, the machine and every row."""
    device = run.windows.device
    cuda = device.type == "cuda"
    return {
        "model": run.name,
        "config": run.model.config.to_dict(),
        "seq_len": run.seq_len,
        "batch_size": batch_size,
        "precision": str(precision),
        "optimizer": str(optimizer),
        "trainable_parameters": parameter_counts(run.model)[0],
        "lora": lora.settings(run.model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "memory_counts": "CUDA reserved + context" if cuda else "tensor bytes",
        "memory_note": "CUDA allocator peak reservation + context"
        if cuda
        else "peak tensor bytes held (weights, gradients, optimizer state, activations); not resident memory, "
        "which `plan` and `fit` report",
        "torch": torch.__version__,
        "rows": rows_json(rows),
    }


def check_plot_path(path) -> None:
    """Fail before any measuring when the plot cannot be drawn."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "`plot` needs matplotlib: pip install 'slimtune[plot]' (or pip install matplotlib)", params=("plot",)
        )
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"`plot` must name a .png file, got {path}", params=("plot",))


def plot(rows: list[Row], path, title: str) -> None:
    """Memory and time against C, one point per SLiM chunk size and a line for each full-sequence method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slim = sorted(
        (r for r in rows if r.method.startswith("SLiM") and r.median_s is not None), key=lambda r: r.chunk_size
    )
    others = [r for r in rows if not r.method.startswith("SLiM") and r.median_s is not None]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit, scale in (
        (ax_t, "median_s", "step time (s)", 1.0),
        (ax_m, "peak_bytes", "peak memory (MB)", 1e-6),
    ):
        if slim:
            ax.plot([r.chunk_size for r in slim], [getattr(r, key) * scale for r in slim], "o-", label="SLiM")
        for r, style in zip(others, ("--", ":"), strict=False):
            ax.axhline(
                getattr(r, key) * scale, linestyle=style, color="gray" if style == "--" else "black", label=r.method
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size C")
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

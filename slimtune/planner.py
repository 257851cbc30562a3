"""The planner: predict a step's peak memory and time for each chunk size C and pick a C that fits the budget.

The grid of C: powers of two up to 128, then 192, and from 256 on numbers with three significant binary digits
(256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, ...): from 128 on multiples of the 64-token attention block,
12-50 % apart; and L itself (ordinary backprop). Below L the predicted peak never falls as C grows (`_monotone`),
so the C < L that fit are the grid up to the largest that fits. Among them the rule picks (`choose_chunk`): "auto",
the one predicted fastest (on a CPU a smaller C can run faster, where its blocks stay in the heap and fault no pages);
"max", the largest (the paper's rule). If not even C = 1 fits, `plan_chunk_size` raises OutOfBudgetError with the
breakdown and what to change.

Two probe steps on the real model and device, at C = 256 and C = 1024 (or L when shorter, and shorter still
when the budget leaves no room for them: two tiny steps size them), count the tensor bytes a chunk's step holds at
its peak (memory.TensorBytes: deterministic, so `plan` and `fit` agree; views and in-place results are not new
bytes). Activations grow linearly in C, so the rest is extrapolation. The prediction, line by line (`predict`);
the lines add up to the total:
- runtime     measured: RSS after the probe steps (Python, torch, kernels' code and caches, the weights) less the
              data already read, on CPU; the CUDA context plus the allocated weights on CUDA.
- data        computed: the data files a run reads (fit maps them and reads them through; plan counts them too).
- gradients   computed: one per parameter, in the parameters' dtype.
- optimizer   measured: the optimizer's state, from one probe step with zero gradients and lr 0.
- chunk       measured: the tensor bytes one step holds at its peak besides the gradients (activations and
              temporaries; with a large vocabulary one tile of logits, model.loss_tile, at most 256 positions so
              that both probes run tiled), counted at two chunk sizes, extrapolated linearly in C, and charged what
              the CPU's allocator holds for them, calibrated: HEAP_OVERHEAD (HEAP_OVERHEAD_ONE_PASS for full backprop) x
              the bytes in blocks below the heap policy's mmap threshold at that C (the probe records every
              block's size; activations scale with C, so at large C they move to mmap), MAPPED_OVERHEAD x the
              rest. The threshold is the heap policy's (memory.py): 4 MB "tight", 32 MB "fast". C is chosen under
              "tight"; a run then uses "fast" (plain-PyTorch speed) when its peak under "fast" fits the budget too.
- states      computed: per-layer attention states, their copies and gradients, and the token windows.
- gradient batching  computed: the weight-gradient buffers of small chunks (deferred.py), where used.
- optimizer step     measured: where the optimizer step's own peak (gradients + state + temporaries, counted)
              exceeds the backward's, the difference.
- export      computed: where the export's copies (export.export_bytes: merged adapters, a cast) exceed
              what the steps held besides the weights, gradients and optimizer state, the difference.
- planning    measured: where the process's peak while probing exceeds the rest,
              the difference. The process has held it already, so the choice of C does not charge it.
C fits when the lines but planning add up to at most the budget less HEADROOM.

Time (the plan's column, relative to full backprop over L with the heap it would run with, so full backprop is
1.00x): full backprop per token and SLiM's per-chunk overhead plus per-token work are timed on the model (the
fastest of TIME_REPEATS, under the process's own heap policy, less the page faults that policy costs); page
faults are then added from a measured cost per byte for the blocks each heap policy maps afresh (4 MB and up
under "tight", 32 MB and up under "fast").
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .breakdown import StepBreakdown
from .choices import ChunkRule, Heap, Optimizer, Precision, Recovery
from .deferred import buffer_bytes, defers
from .devices import available_source, cuda_context_bytes, resolve_budget
from .errors import ConfigError, OutOfBudgetError
from .export import export_bytes
from .memory import (
    HEAP_THRESHOLDS,
    TensorBytes,
    heap_policy_during,
    new_peak_window,
    process_rss,
    release_free_heap,
    window_peak_rss,
)
from .optimizers import make_optimizer
from .options import FitOptions
from .pretrained import PerformerLM
from .slim import compute_dtype, slim_step
from .units import format_size

# Chunk sizes of the two probe steps. Below ~256 tokens a step's peak is not yet linear in C (fixed-size
# temporaries dominate), so both probes sit above that.
PROBE_SIZES = (256, 1024)
TINY_PROBE_SIZES = (16, 64)  # the warm-up's chunk, and the two steps that size the probes where the room is small
HEADROOM = 0.05  # share of the budget the choice leaves free


def usable_bytes(budget_bytes: float) -> float:
    """The share of a budget the choice may fill: the rest (HEADROOM) for what the prediction misses."""
    return budget_bytes * (1 - HEADROOM)


def budget_holding(total: float) -> float:
    """The least budget whose usable share holds `total` bytes."""
    return total / (1 - HEADROOM)


# The "fast" heap keeps freed blocks up to 32 MB, and what it keeps varies from run to run: it is chosen only where
# its prediction leaves this share of the usable budget free besides. (d 512 x 1, L 8192, adamw under 538 MB: C 448
# predicted 510 MB on the fast heap, 1 MB inside the usable share; two runs held 526 and 545 MB.)
FAST_HEAP_MARGIN = 0.05
SLIM_TIME_SIZES = (16, 256)  # C of the SLiM timing probes (smaller for short L)
SLIM_PROBE_CHUNKS = 4  # chunks per SLiM timing probe: the sweep, the recovery and the chained backward all run
TIME_REPEATS = 5  # each timing probe runs this often; the fastest counts
# C auto: where C's predicted times lie within this share of the fastest, the largest of them is taken. Above the
# spread of the same plan's times from one process to the next (benchmarks/planner_time.py: four plans within 6 %),
# so that plan and fit do not part over noise; far below the losses the rule exists to avoid (2x at the largest C).
CHOICE_TIE = 0.10
# The time column against measured steps (benchmarks/planner_time.py), stated in the plan: 8 % on a quiet machine,
# 27-34 % on a noisy one (benchmarks/RESULTS.md, "The plan's time column").
TIME_UNCERTAINTY = 0.35
# A block this large is mmap'ed under any heap policy (glibc's dynamic threshold stops at 32 MB): its first touch
# faults. The probe runs right after a tiny warm-up, while the process holds little more than the runtime and the
# weights, and only where it fits.
FAULT_PROBE_BYTES = 40 * 2**20
# Resident bytes per tensor byte at a training run's peak, by where glibc puts the block (memory.py). Calibrated on
# the 24 shapes of benchmarks/planner_sweep.py (d 64-1024, 1-8 layers, fp32/bf16, with and without evaluation),
# not measured per run:
# - heap-sized blocks (below the policy's mmap threshold): glibc reuses freed blocks but keeps and fragments them.
#   SLiM's chunked steps, whose chunk temporaries interleave with the carried states over many chunks and steps,
#   held 1.9-3.0x their tensor bytes there (2.5 puts the sweep's chunked cases within -8 % .. +7 %); full backprop,
#   one pass per step, 1.4-1.6x. (A single probe step from a trimmed heap shows ~1.35.)
# - blocks above it: mmap'ed and returned when freed, but not all of them: a request that a free chunk of the
#   heap can serve (coalesced from freed smaller blocks) is served there and stays resident. Runs at large C, where
#   nearly every byte is in such blocks, held 1.03-1.15x their tensor bytes (1.19x after probes that had run under
#   the "fast" heap, which they no longer do).
HEAP_OVERHEAD = 2.5
HEAP_OVERHEAD_ONE_PASS = 1.6
MAPPED_OVERHEAD = 1.15


@dataclass(frozen=True)
class Workload:
    """What a run asks of the device, besides the model."""

    seq_len: int  # L, tokens per window
    batch_size: int = 1  # windows per step
    optimizer: Optimizer = Optimizer.ADAM  # its state counts in the peak
    recovery: Recovery = Recovery.SUBTRACT64  # "store" keeps L / C start states
    precision: Precision = Precision.FP32  # bf16 autocast: other activations, and the weights' bf16 copies
    data_bytes: int = 0  # the training and held-out files: fit maps them and reads them through, so they stay resident
    copies_bytes: int = 0  # held besides: the one-step adaptation's copy of the weights, torchrun's all-reduce buffer
    batch_weight_grads: bool | None = None  # None: batch small chunks' weight gradients when the buffers fit
    export_dtype: str | None = None  # the export after the steps, in this dtype ("auto": the input's); None: none

    @classmethod
    def of(cls, options: FitOptions, *, data_bytes: int = 0, copies_bytes: int = 0) -> Workload:
        """What a fit or pretrain run with `options` asks of the device: the one builder the run plan and `plan`
        use (in the dtype the steps compute in, `compute_precision`)."""
        return cls(
            options.seq_len,
            options.batch_size,
            options.optimizer,
            options.recovery,
            options.compute_precision,
            data_bytes,
            copies_bytes,
            options.batch_weight_grads,
            options.dtype,
        )

    def __post_init__(self):
        object.__setattr__(self, "optimizer", Optimizer.parse(self.optimizer, "optimizer"))
        object.__setattr__(self, "recovery", Recovery.parse(self.recovery, "state recovery"))
        object.__setattr__(self, "precision", Precision.parse(self.precision, "precision"))


@dataclass
class Probe:
    """Measured on the real model and device: one chunk's step holds base + per_token * C tensor bytes at its
    peak besides the gradients; the optimizer holds `optimizer_state` and its step peaks at `optimizer_peak`;
    on CPU the heap costs `heap_overhead` x the bytes it serves, larger blocks `mapped_overhead` x theirs (sizes:
    the probe step's allocations at `probe_tokens`). Time: full backprop over T tokens takes full_base +
    full_per_token * T seconds; one chunk of a SLiM step (its share of the sweep, rebuild and backward)
    slim_base + slim_per_token * C, and a fresh page `fault_per_byte` seconds per byte."""

    base: float
    per_token: float
    optimizer_state: int
    optimizer_peak: int
    full_base: float = 0.0
    full_per_token: float = 0.0
    slim_base: float = 0.0
    slim_per_token: float = 0.0
    fault_per_byte: float = 0.0
    heap_overhead: float = 1.0
    mapped_overhead: float = 1.0
    probe_tokens: int = 1
    sizes: list = field(default_factory=list, repr=False)

    def heap_share(self, tokens: int, heap: str = "tight") -> float:
        """Share of a step's bytes in blocks below the heap policy's mmap threshold, at `tokens` per chunk
        (activations scale linearly with the chunk)."""
        total = sum(self.sizes)
        scale = tokens / self.probe_tokens
        return sum(s for s in self.sizes if s * scale < HEAP_THRESHOLDS[heap]) / total if total else 0.0

    def chunk_bytes(self, tokens: int, heap: str = "tight", one_pass: bool = False) -> float:
        """What a step at `tokens` per chunk adds to the device's memory; `one_pass`: full backprop, whose heap
        fragments less (no chunks whose temporaries interleave with the carried states)."""
        tensors = self.base + self.per_token * tokens
        share = self.heap_share(tokens, heap)
        heap_overhead = min(self.heap_overhead, HEAP_OVERHEAD_ONE_PASS) if one_pass else self.heap_overhead
        return tensors * (heap_overhead * share + self.mapped_overhead * (1 - share))

    def fault_seconds(self, tokens: int, heap: str) -> float:
        """Page faults of one chunk's step at `tokens` per chunk: the bytes it allocates in blocks the heap
        policy maps afresh each time, at the measured cost of a fresh page."""
        scale = tokens / self.probe_tokens
        mapped = sum(s * scale for s in self.sizes if s * scale >= HEAP_THRESHOLDS[heap])
        return self.fault_per_byte * mapped


@dataclass
class Candidate:
    chunk_size: int
    predicted_peak_bytes: int
    share_of_budget: float
    relative_time: float  # predicted step time / full backprop's (with the heap full backprop would run with)
    fits: bool
    heap: str = ""  # the heap policy this C would run with on CPU ("fast" when it fits, else "tight")


@dataclass
class Plan:
    """The planner's choice and what it predicts (`slimtune.format_plan(plan)`: the table as text)."""

    chunk_size: int  # C, the choice: L when full backprop fits
    budget_bytes: int
    available_bytes: int
    available_source: str  # what limits available_bytes (a cgroup's limit, the system's memory, the card)
    device: str
    seq_len: int
    batch_size: int
    optimizer: str
    predicted_peak_bytes: int
    breakdown: StepBreakdown  # the chosen C's predicted peak, line by line
    candidates: list[Candidate] = field(default_factory=list)
    batch_weight_grads: bool = False  # small C: weight gradients batched in buffers that fit the budget
    memory_counts: str = ""  # what the predicted peaks count on this device
    heap: str = ""  # CPU: the heap policy the run uses (memory.py); "" on CUDA
    seconds_full: float = 0.0  # predicted seconds of a full-backprop step over L, its own heap (the time unit)
    threads: int = 0  # CPU intra-op threads the timings ran with (a run with another count has other ratios)
    time_uncertainty: float = TIME_UNCERTAINTY  # how far measured relative step times may lie from the column
    # False where the room left no SLiM timing probe (a tight budget): the relative time of C < L is unknown.
    time_known: bool = True
    # How close the choice is to the edge: the usable budget less the chosen C's prediction (as judged, without the
    # planning line), and the next C on the grid's prediction less the usable budget (None at C = L).
    margin_bytes: int = 0
    next_over_bytes: int | None = None
    rule: str = str(ChunkRule.FASTEST)  # how C was picked among those that fit: auto (fastest) or max (largest)
    reason: str = ""  # why this C: "the fastest that fits; the largest that fits, 8192, is predicted at 2.20x ..."
    largest_fitting: int = 0  # the largest C that fits (0: none)

    def to_json(self) -> dict:
        return asdict(self) | {"breakdown": self.breakdown.to_json()}

    @classmethod
    def from_json(cls, values: dict) -> Plan:
        """The Plan `to_json` wrote (a run state's, read back on resume)."""
        candidates = [Candidate(**c) for c in values.get("candidates", ())]
        breakdown = StepBreakdown.from_json(values["breakdown"])
        return cls(**values | {"candidates": candidates, "breakdown": breakdown})


def memory_counts(device: torch.device) -> str:
    """What a budget and a peak count on `device`."""
    return "CUDA context + allocator reserved" if device.type == "cuda" else "process resident memory (RSS)"


def _tracked(fn) -> TensorBytes:
    """The tensor bytes fn() creates (gradients and temporaries included), counted: deterministic, so `plan`
    and `fit` always agree, and the same on any device."""
    with TensorBytes() as tracked:
        fn()
    return tracked


def _tracked_step(model: PerformerLM, windows: torch.Tensor, precision: Precision) -> TensorBytes:
    """Counted bytes of a full-backprop step over `windows`, with the gradients allocated beforehand: their size
    is known exactly, and the step's own peak is then its activations, which are linear in the chunk."""
    for p in model.parameters():
        if p.requires_grad:  # a frozen parameter gets no gradient (LoRA's base)
            p.grad = torch.zeros_like(p)
    tracked = _tracked(lambda: slim_step(model, windows, windows.shape[1] - 1, precision=precision))
    model.zero_grad(set_to_none=True)
    return tracked


def probe_windows(model: PerformerLM, batch_size: int, length: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randint(0, model.config.vocab_size, (batch_size, length + 1), device=device)


def _timed_step(
    model: PerformerLM, windows: torch.Tensor, precision: Precision, chunk_size: int | None = None
) -> float:
    """Seconds of one step over `windows` (full backprop, or SLiM at `chunk_size`): the fastest of TIME_REPEATS,
    the figure least disturbed by whatever else the machine does. Under the process's own heap policy: timing under
    "fast" here would leave free blocks of up to 32 MB in the heap, which the run would then be served from and keep
    resident (a d 1024 step held 1.62x its tensor bytes after such probes, 1.04x without). The page faults this
    includes are taken out again by the time model (`_probe`)."""
    best = float("inf")
    for _ in range(TIME_REPEATS):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        slim_step(model, windows, chunk_size or windows.shape[1] - 1, precision=precision)
        if windows.device.type == "cuda":
            torch.cuda.synchronize(windows.device)
        best = min(best, time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return best


def _fault_per_byte() -> float:
    """Seconds per byte of first touching freshly mapped memory (page faults, the kernel zeroing pages): a fill
    of a new FAULT_PROBE_BYTES block less a second fill of the same block, the fastest of TIME_REPEATS."""
    n = FAULT_PROBE_BYTES // 4
    fresh = again = float("inf")
    for _ in range(TIME_REPEATS):
        started = time.perf_counter()
        block = torch.empty(n)
        block.fill_(1.0)
        middle = time.perf_counter()
        block.fill_(2.0)
        fresh, again = min(fresh, middle - started), min(again, time.perf_counter() - middle)
        del block
    return max(0.0, fresh - again) / FAULT_PROBE_BYTES


def _line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) through two points, neither negative."""
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return max(0.0, y1 - slope * x1), slope


def _time_slim(model: PerformerLM, work: Workload, faults, largest: int) -> tuple[float, float]:
    """A SLiM chunk's seconds as intercept + slope x C, from SLiM steps of SLIM_PROBE_CHUNKS chunks at a small
    and a mid-sized C (at most `largest`, the memory probes' size), less `faults(C)`, a chunk's page faults: the
    intercept is the per-chunk overhead (many small ops) that dominates small C."""
    # Not below the memory probes' smaller size: a SLiM step over a few chunks holds more than a full-backprop
    # step of one chunk, so timing it below `largest` put the probes over a tight budget (d 896, 62M parameters:
    # 987 MB at C = 8 and 16 under a 1 GB budget). Where the room leaves no two sizes, C's time goes unknown.
    small = max(1, min(SLIM_TIME_SIZES[0], work.seq_len // (4 * SLIM_PROBE_CHUNKS)))
    large = min(SLIM_TIME_SIZES[1], work.seq_len // SLIM_PROBE_CHUNKS, largest)
    if large <= small:
        return 0.0, 0.0
    per_chunk = {}
    for c in (small, large):
        windows = probe_windows(model, work.batch_size, SLIM_PROBE_CHUNKS * c)
        per_chunk[c] = max(0.0, _timed_step(model, windows, work.precision, c) / SLIM_PROBE_CHUNKS - faults(c))
    return _line(small, per_chunk[small], large, per_chunk[large])


def measure_optimizer(model: PerformerLM, optimizer: str) -> tuple[int, int]:
    """(state bytes, peak bytes of a step incl. its state): one step with zero gradients and lr 0, which
    creates the optimizer's state but changes no weight. The one source of what an optimizer holds: the planner
    and `inspect` use it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(optimizer, params, lr=0.0)
    peak = _tracked(opt.step).peak
    state = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
    )
    del opt
    model.zero_grad(set_to_none=True)
    return state, max(peak, state)


def measure_optimizer_by_shape(shapes: dict[tuple[int, ...], int], optimizer: str) -> int:
    """The state `optimizer` keeps for parameters of these shapes (shape -> how many), measured with
    measure_optimizer on one fp32 parameter of each shape at a time: no more memory than the largest."""
    total = 0
    for shape, count in shapes.items():
        one = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(shape))])
        total += measure_optimizer(one, optimizer)[0] * count
    return total


@contextlib.contextmanager
def feature_draw_for_probes(model: PerformerLM):
    """A FAVOR+ model without a draw (none is saved in a checkpoint) gets one for the probe steps, and loses it
    after: the draw changes no shape, so no byte or second the probes measure."""
    layers = list(model.layers)
    missing = [layer.attention.projection is None for layer in layers]
    if any(missing):
        model.redraw_features(torch.Generator().manual_seed(0))
    try:
        yield
    finally:
        for layer, none in zip(layers, missing, strict=True):
            if none:
                layer.attention.projection = None


def probe(model: PerformerLM, work: Workload, room=None, *, heap: str = "fast", optimizer=None) -> Probe:
    """Measure the model on its device. `room`: a function that says how many bytes the probe steps may add to
    what the process holds now (None: no limit); it is read after a tiny warm-up, which loads the kernels' code,
    and every probe step is then sized to fit it. `heap`: the heap policy the probes run under ("fast" for
    glibc's own, which behaves like it); `optimizer`: its measure_optimizer() figures, when already taken."""
    with feature_draw_for_probes(model):
        return _probe(model, work, room, heap, optimizer or measure_optimizer(model, work.optimizer))


def _probe_sizes(model: PerformerLM, work: Workload, room: float | None, overhead: float) -> tuple[int, int]:
    """The probe steps' chunk sizes (c1, c2): `probe_sizes` over tiny training steps. The probes' peak is measured
    and counted (the "planning" line); in a tight case (d 256, batch 4, bf16, 87 MB of room) they held 102 MB where
    the line said 35 MB x 2.5, and the run's runtime grew 25 MB with the kernels' code the larger probe steps
    loaded."""
    if room is None:
        return min(PROBE_SIZES[0], work.seq_len), min(PROBE_SIZES[1], work.seq_len)

    def peak(tokens):
        return _tracked_step(model, probe_windows(model, work.batch_size, tokens), work.precision).peak

    return probe_sizes(peak, work.seq_len, room, overhead)


def probe_sizes(peak, seq_len: int, room: float, overhead: float) -> tuple[int, int]:
    """Chunk sizes (c1, c2) of two probes: PROBE_SIZES (at most L) where the room allows, else halved until a line
    through `peak(tokens)` of two tiny probes (16 and 64 tokens) times the heap's overhead fits half the room (c1 not
    below 16, c2 not below 2 x c1). Training steps and eval's forward share it."""
    c1, c2 = min(PROBE_SIZES[0], seq_len), min(PROBE_SIZES[1], seq_len)
    tiny = [min(t, seq_len) for t in TINY_PROBE_SIZES]
    peaks = [peak(t) for t in tiny]
    base, slope = _line(tiny[0], peaks[0], tiny[1], peaks[1]) if tiny[1] > tiny[0] else (peaks[0], 0.0)

    def fits(c):  # half the room: the rest for what the estimate misses (kernels' code that larger steps load)
        return (base + slope * c) * overhead <= room / 2

    while c1 > tiny[0] and not fits(c1):
        c1 //= 2
    while c2 > 2 * c1 and not fits(c2):
        c2 //= 2
    return c1, max(c1, min(c2, seq_len))


def chunk_line(c1: int, peak1: float, c2: int, peak2: float) -> tuple[float, float]:
    """(base, per_token): a chunk's peak tensor bytes as base + per_token x tokens, through the probes' peaks at
    c1 and c2 tokens (through zero where there was one probe size), neither negative."""
    per_token = max(0.0, (peak2 - peak1) / (c2 - c1)) if c2 > c1 else peak1 / c1
    return max(0.0, peak1 - per_token * c1), per_token


def _probe(model: PerformerLM, work: Workload, room, policy: str, optimizer: tuple[int, int]) -> Probe:
    seq_len, batch_size = work.seq_len, work.batch_size
    on_cpu = next(model.parameters()).device.type == "cpu"
    overhead = HEAP_OVERHEAD if on_cpu else 1.0
    # Warm-up on SLiM's own path (sweep, recovery, chained backward) at a tiny chunk: first use loads kernels'
    # code, which stays and counts in what the process holds before the room is read.
    c0 = min(TINY_PROBE_SIZES[0], seq_len)
    slim_step(model, probe_windows(model, batch_size, 3 * c0), c0, precision=work.precision)
    model.zero_grad(set_to_none=True)
    left = room() if room is not None else None
    fault_per_byte = _fault_per_byte() if on_cpu and (left is None or left > FAULT_PROBE_BYTES) else 0.0
    c1, c2 = _probe_sizes(model, work, left, overhead)
    w1 = probe_windows(model, batch_size, c1)
    t1, m1 = _timed_step(model, w1, work.precision), _tracked_step(model, w1, work.precision)
    w2 = probe_windows(model, batch_size, c2)
    t2, m2 = (_timed_step(model, w2, work.precision), _tracked_step(model, w2, work.precision)) if c2 > c1 else (t1, m1)
    base, per_token = chunk_line(c1, m1.peak, c2, m2.peak)
    state, opt_peak = optimizer
    measured = Probe(
        base=base,
        per_token=per_token,
        optimizer_state=state,
        optimizer_peak=opt_peak,
        fault_per_byte=fault_per_byte,
        heap_overhead=overhead,
        mapped_overhead=MAPPED_OVERHEAD if on_cpu else 1.0,
        probe_tokens=c2,
        sizes=m2.sizes,
    )
    # The timings ran under the heap policy `policy`: their page faults, which the time model adds per policy,
    # are taken out.
    policy = policy if on_cpu else "fast"
    measured.slim_base, measured.slim_per_token = _time_slim(
        model, work, lambda c: measured.fault_seconds(c, policy), c1
    )
    # Full backprop's time as proportional to L, from the longest probe: a line through two short probes
    # extrapolates its noise 8-16x (four plans spread 42 % that way, 0.87x-1.24x for one C).
    longest, seconds = max(c1, c2), t2 if c2 > c1 else t1
    measured.full_per_token = max(0.0, seconds - measured.fault_seconds(longest, policy)) / longest
    return measured


def _state_bytes(model: PerformerLM, work: Workload, chunk_size: int) -> int:
    c = model.config
    one = work.batch_size * c.n_heads * c.n_features * (c.head_dim + 1) * c.n_layers * 8  # float64 in subtract64
    stored = math.ceil(work.seq_len / chunk_size) if work.recovery == Recovery.STORE else 0
    copies = 4 + stored  # carried, start, end, gradient (+ every chunk's start states with "store")
    return one * copies + work.batch_size * (work.seq_len + 1) * 8 * 2  # windows (int64), loss weights (float64)


def predict(
    model: PerformerLM,
    measured: Probe,
    runtime: int,
    work: Workload,
    chunk_size: int,
    *,
    batching: bool = False,
    heap: str = "tight",
    reached: int = 0,
    export: int = 0,
) -> StepBreakdown:
    """The predicted peak of a run with chunk size C, line by line (bytes); `batching`: with the weight-gradient
    buffers of slimtune/deferred.py (computed, not probed); `heap`: the heap policy (CPU, memory.py); `reached`: the
    peak the process has already had (the probes'), a floor; `export`: what the export after the steps allocates
    (export.export_bytes)."""
    chunk = measured.chunk_bytes(min(chunk_size, work.seq_len), heap, one_pass=chunk_size >= work.seq_len)
    states = _state_bytes(model, work, chunk_size) if chunk_size < work.seq_len else 0
    grads = gradient_bytes(model)
    buffers = buffer_bytes(model) if batching else 0
    # The peak is the backward of a chunk (optimizer state already there from step 2 on), or the optimizer step
    # (gradients there) where its temporaries exceed a chunk's: then they stand in the chunk's place.
    backward = measured.optimizer_state + grads + int(chunk) + states + buffers + work.copies_bytes
    step = max(0, grads + measured.optimizer_peak - backward)
    lines = StepBreakdown(
        runtime=runtime,
        data=work.data_bytes,
        gradients=grads,
        optimizer=measured.optimizer_state,
        chunk=int(chunk),
        states=states,
        gradient_batching=buffers,
        copies=work.copies_bytes,
        optimizer_step=step,
        # The export after the last step: its copies (merged adapters, casts) in place of the freed chunk.
        export=max(0, export - int(chunk) - states - buffers - step),
    )
    # The probes' own peak where it is the higher: the process has held it already (inside the budget, as the
    # probes are sized to stay), so it is no prediction and the choice of C does not charge it.
    return lines.floored(reached)


def full_seconds(measured: Probe, seq_len: int, heap: str = "fast") -> float:
    """Predicted seconds of a full-backprop step over L tokens with the heap policy `heap`."""
    return measured.full_base + measured.full_per_token * seq_len + measured.fault_seconds(seq_len, heap)


def relative_time(measured: Probe, seq_len: int, chunk_size: int, heap: str = "fast", full_heap: str = "fast") -> float:
    """Predicted step time at C with the heap policy `heap` over full backprop's with its own heap `full_heap` (so
    full backprop is 1.00x): ceil(L / C) chunks' overhead plus L tokens' work plus page faults, against one pass
    over L tokens. Never below full backprop's own time over the same chunks with the same heap: a SLiM chunk does
    all that backprop over it does, and a forward sweep besides (the two lines come from different probes, and
    extrapolated from small C the SLiM line put C = 3584 of L = 4096 at 0.92x)."""
    unit = full_seconds(measured, seq_len, full_heap)
    if unit <= 0 or chunk_size >= seq_len:
        return 1.0
    if measured.slim_per_token <= 0:
        return 1.0
    n, rest = divmod(seq_len, chunk_size)
    work = math.ceil(seq_len / chunk_size) * measured.slim_base + measured.slim_per_token * seq_len
    slim = work + (n + (rest > 0)) * measured.fault_seconds(chunk_size, heap)
    backprop = n * full_seconds(measured, chunk_size, heap) + (full_seconds(measured, rest, heap) if rest else 0.0)
    return max(slim, backprop) / unit


def held_bytes(device: torch.device) -> int:
    """What the job holds now on `device`: CPU, the process's RSS (weights included) once the heap has returned
    what was freed (the probes' activations, measure_optimizer's gradients would otherwise count); CUDA, the
    context and the allocated tensors."""
    if device.type == "cuda":
        return cuda_context_bytes(device) + torch.cuda.memory_allocated(device)
    release_free_heap()
    return process_rss()


def gradient_bytes(model: PerformerLM) -> int:
    """One gradient per parameter that trains, in its dtype (frozen ones get none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def probe_room(model: PerformerLM, optimizer_state: int, usable: float, device: torch.device) -> float:
    """Bytes the probe steps may add on the model's own device: the usable budget less what the device already
    holds for this job, less the gradients the probe allocates and the optimizer state (measured) a run adds
    later."""
    return usable - held_bytes(device) - gradient_bytes(model) - optimizer_state


def _runtime_bytes(model: PerformerLM, resident_data: int = 0) -> int:
    """Measured before training: what the job holds, less the data the process already holds (CPU; a line of its
    own, so that `plan`, which does not read the data, measures the same)."""
    device = next(model.parameters()).device
    return held_bytes(device) - (resident_data if device.type == "cpu" else 0)


def chunk_sizes(seq_len: int) -> list[int]:
    """The C values the planner may pick, below L: powers of two up to 128, then 192, then numbers with at most
    three significant binary digits (256, 320, 384, 448, 512, 640, ...): from 128 on, multiples of the 64-token
    block. Steps of 12-50 % lose little: above a few hundred tokens a step's time hardly depends on C. (192 halves
    the step from 128 to 256, where a large model's chunk term can grow by more than the headroom: d 384, 7 layers,
    batch 4 measured 884 MB at 128 and 1078 MB at 256 under a 1111 MB budget.)"""
    sizes = {2**k for k in range(9)} | {192}
    top = 256
    while top < seq_len:
        sizes.update(top + i * top // 4 for i in range(4))
        top *= 2
    return sorted(c for c in sizes if c < seq_len)


def _monotone(predicted, chunk_size: int, seq_len: int, batching: bool, heap: str) -> StepBreakdown:
    """predicted(C, batching, heap)'s lines at C < L, its chunk line raised to the largest total any smaller C of
    the grid is predicted to need under the same heap policy: a larger chunk never needs less. (The heap model
    alone is not monotone: where a chunk's blocks grow past the mmap threshold they leave the fragmenting heap, and
    d 384 x 3 at L 24576 was predicted 946 MB at C = 2048 but 855 MB at C = 3072.) Full backprop (C >= L) is one
    pass with no chunk states, whose heap fragments less (HEAP_OVERHEAD_ONE_PASS, measured): it keeps its own
    prediction, and may fit where the C just below L do not."""
    lines = predicted(chunk_size, batching, heap)
    if chunk_size >= seq_len:
        return lines
    smaller = [c for c in chunk_sizes(seq_len) if c < chunk_size]
    floor = max((predicted(c, batching, heap).judged().total for c in smaller), default=0)
    short = floor - lines.judged().total
    return replace(lines, chunk=lines.chunk + short) if short > 0 else lines


def choose_chunk(fitting: list[int], seconds, rule: ChunkRule, time_known: bool) -> tuple[int | None, str]:
    """(C, why) among `fitting`, the C that fit in increasing order (None where none does). FASTEST: the least
    predicted `seconds(C)`, where several lie within CHOICE_TIE of the least, the largest of them (fewer chunks,
    and the time model's errors are smallest at large C); LARGEST, or where no SLiM timing could run: the largest."""
    if not fitting:
        return None, "nothing fits"
    largest = fitting[-1]
    if rule == ChunkRule.LARGEST:
        return largest, "the largest C that fits (chunk rule max)"
    if not time_known:
        return largest, "the largest C that fits: the budget left no room to time smaller ones"
    least = min(seconds(c) for c in fitting)
    chosen = max(c for c in fitting if seconds(c) <= least * (1 + CHOICE_TIE))
    if chosen == largest:
        return chosen, "the fastest that fits, and the largest"
    return chosen, (
        f"the fastest that fits; the largest that fits, {largest}, is predicted at "
        f"{seconds(largest) / seconds(chosen):.2f}x its time"
    )


def _nothing_fits(
    lines: StepBreakdown, probe_: Probe, work: Workload, budget_bytes: int, available: int
) -> OutOfBudgetError:
    """What is missing at C = 1, and only the changes that could close the gap."""
    lines = lines.judged()
    usable = usable_bytes(budget_bytes)
    missing = lines.total - usable
    hints = []
    if probe_.optimizer_state:
        enough = "" if probe_.optimizer_state >= missing else ", not enough on its own"
        hints.append(f"`optimizer=sgd` (saves {format_size(probe_.optimizer_state)}{enough})")
    if work.batch_size > 1:
        hints.append("a smaller `batch_size` (saves little: the fixed costs above stay)")
    hints.append(
        f"a larger `mem_budget` (at least {format_size(budget_holding(lines.total))}; "
        f"available: {format_size(available)})"
    )
    return OutOfBudgetError(
        f"budget {format_size(budget_bytes)} (less {HEADROOM:.0%} headroom) cannot fit even C = 1: "
        f"{lines.terms()}, {format_size(missing)} over; try {'; or '.join(hints)}",
        params=("optimizer", "batch_size", "mem_budget"),
    )


def _forced_over(forced: int, lines: StepBreakdown, chosen: int | None, budget_bytes: int) -> OutOfBudgetError:
    fits = f"the largest C that fits is {chosen}" if chosen else "no C fits it"
    return OutOfBudgetError(
        f"chunk size {forced} is predicted to need {lines.judged().terms()}, over the budget "
        f"{format_size(budget_bytes)} (less {HEADROOM:.0%} headroom): {fits}; or drop the budget (`mem_budget`) "
        f"to force C = {forced}",
        params=("mem_budget",),
    )


class _Predictions:
    """The predicted lines of every (C, batching, heap) from one set of measurements, each computed once; whether
    they fit the budget's usable share; the heap policy each C runs with; each C's relative time."""

    def __init__(self, model, measured: Probe, work: Workload, usable: float, managed: bool, **fixed):
        self.model, self.measured, self.work, self.usable, self.managed = model, measured, work, usable, managed
        self.least = "tight" if managed else "fast"  # the policy C is chosen under: the one that holds the least
        self.fixed = fixed  # runtime, reached, export: predict's lines that do not depend on C
        self.raw: dict = {}  # (C, batching, heap) -> predict's lines: pure, so each is computed once
        self.full_heap = self.heap_for(work.seq_len) or "fast"

    def _predicted(self, c: int, batching: bool, heap: str) -> StepBreakdown:
        key = (c, batching, heap)
        if key not in self.raw:
            self.raw[key] = predict(self.model, self.measured, work=self.work, chunk_size=c, batching=batching,
                                    heap=heap, **self.fixed)  # fmt: skip
        return self.raw[key]

    def peak(self, c: int, batching: bool = False, heap: str | None = None) -> StepBreakdown:
        return _monotone(self._predicted, c, self.work.seq_len, batching, heap or self.least)

    def fits(self, lines: StepBreakdown, share: float = 1.0) -> bool:
        """The training's prediction inside `share` of the usable budget; the probes' peak is a fact, not judged."""
        return lines.judged().total <= self.usable * share

    def heap_for(self, c: int, batching: bool = False) -> str:
        """Managed heap: "fast" (no page faults) where its peak fits with FAST_HEAP_MARGIN to spare, else "tight";
        "" when not managed."""
        if not self.managed:
            return ""
        return "fast" if self.fits(self.peak(c, batching, "fast"), 1 - FAST_HEAP_MARGIN) else "tight"

    def seconds(self, c: int) -> float:
        """Relative to full backprop's step, with the heap policy C would run with."""
        return relative_time(self.measured, self.work.seq_len, c, self.heap_for(c) or "fast", self.full_heap)

    def candidate(self, c: int, budget_bytes: int) -> Candidate:
        heap = self.heap_for(c)
        lines = self.peak(c, heap=heap or self.least)
        return Candidate(c, lines.total, lines.total / budget_bytes, self.seconds(c), self.fits(lines), heap)


def _measure(model: PerformerLM, work: Workload, usable: float, managed: bool, resident_data: int):
    """The probes, under the budget's usable share: (Probe, what the process held at their peak, the runtime)."""
    device = next(model.parameters()).device
    windowed = device.type == "cpu" and new_peak_window()  # the probes' own peak, not the process's earlier ones
    with heap_policy_during("tight" if managed else None):
        optimizer = measure_optimizer(model, work.optimizer)
        room = lambda: probe_room(model, optimizer[0], usable, device)  # noqa: E731
        measured = probe(model, work, room=room, heap="tight" if managed else "fast", optimizer=optimizer)
    # What the process held at its peak while probing: measured, and a floor under every prediction of the run's
    # peak. CPU only (on CUDA the probes' blocks stay reserved in the caching allocator and count in the chunk
    # line), and only where the kernel's counter could be restarted (else it would hold a library user's earlier
    # peaks).
    reached = window_peak_rss() if windowed else 0
    # After the probes: the kernels' code and caches they loaded stay resident.
    return measured, reached, _runtime_bytes(model, resident_data)


def _batching(predictions: _Predictions, work: Workload, chosen: int, budget_bytes: int) -> bool:
    """Small chunks run faster with batched weight gradients (slimtune/deferred.py), whose buffers take a fixed
    amount: used when they fit beside the chosen C, never at the price of a smaller C. A caller's True is counted as
    asked (and checked against the budget); False never batches."""
    can_batch = defers(work.batch_size, chosen, work.seq_len, compute_dtype(work.precision))
    if work.batch_weight_grads is None:
        return can_batch and predictions.fits(predictions.peak(chosen, True))
    if can_batch and work.batch_weight_grads and not predictions.fits(predictions.peak(chosen, True)):
        raise OutOfBudgetError(
            f"batched weight gradients (`batch_weight_grads=True`) do not fit beside chunk size {chosen} in the "
            f"budget {format_size(budget_bytes)}: leave `batch_weight_grads` None to batch only when they fit",
            params=("batch_weight_grads", "mem_budget"),
        )
    return can_batch and work.batch_weight_grads


def plan_chunk_size(
    model: PerformerLM,
    work: Workload,
    budget: str | int | None,
    *,
    forced: int | None = None,
    resident_data: int = 0,
    heap: Heap | str = Heap.SYSTEM,
    rule: ChunkRule | str = ChunkRule.FASTEST,
) -> Plan:
    """Probe the model, predict each candidate's peak and time, and pick by `rule` among the C that fit the budget
    (`choose_chunk`: the fastest, or the largest); with `forced`, check that C instead (OutOfBudgetError naming the
    largest C that fits when it does not). `resident_data`: how much of `work.data_bytes` the process already holds
    (fit has read its data; plan has not). `heap` "managed" (CPU): the probes run under the "tight" heap policy and
    the plan picks the run's ("fast" when it fits, else "tight"), as `fit` then sets it; "system": glibc's own,
    which keeps blocks up to 32 MB like "fast"."""
    device = next(model.parameters()).device
    L = work.seq_len
    budget_bytes, available = resolve_budget(budget, device)
    usable = usable_bytes(budget_bytes)
    # The probe steps stay inside the budget themselves: `fit` runs them in its own process.
    managed = device.type == "cpu" and Heap.parse(heap, "heap") == Heap.MANAGED
    measured, reached, runtime = _measure(model, work, usable, managed, resident_data)
    export = 0 if work.export_dtype is None else export_bytes(model, work.export_dtype)  # the same at every C
    at = _Predictions(model, measured, work, usable, managed, runtime=runtime, reached=reached, export=export)

    fitting = [c for c in chunk_sizes(L) + [L] if at.fits(at.peak(c))]  # C < L: a prefix of the grid (_monotone)
    rule = ChunkRule.parse(rule, "chunk rule")
    chosen, reason = choose_chunk(fitting, at.seconds, rule, time_known=measured.slim_per_token > 0)
    if forced is not None:
        forced = min(forced, L)
        if not at.fits(at.peak(forced)):
            raise _forced_over(forced, at.peak(forced), fitting[-1] if fitting else None, budget_bytes)
        chosen, reason = forced, "given"
    if chosen is None:
        raise _nothing_fits(at.peak(1), measured, work, budget_bytes, available)

    sizes = sorted({2**k for k in range(int(math.log2(L)) + 1)} | {L, chosen} | set(fitting[-1:]))
    batching = _batching(at, work, chosen, budget_bytes)
    heap_policy = at.heap_for(chosen, batching)
    lines = at.peak(chosen, batching, heap_policy or at.least)
    bigger = next((c for c in chunk_sizes(L) + [L] if c > chosen), None)
    return Plan(
        chunk_size=chosen,
        budget_bytes=budget_bytes,
        available_bytes=available,
        available_source=available_source(device),
        device=str(device),
        seq_len=L,
        batch_size=work.batch_size,
        optimizer=str(work.optimizer),
        predicted_peak_bytes=lines.total,
        breakdown=lines,
        candidates=[at.candidate(c, budget_bytes) for c in sizes],
        batch_weight_grads=batching,
        memory_counts=memory_counts(device),
        heap=heap_policy,
        seconds_full=full_seconds(measured, L, at.full_heap),
        time_known=measured.slim_per_token > 0,
        rule=str(rule),
        reason=reason,
        largest_fitting=fitting[-1] if fitting else 0,
        threads=torch.get_num_threads(),
        margin_bytes=int(usable - at.peak(chosen).judged().total),
        next_over_bytes=int(at.peak(bigger).judged().total - usable) if bigger else None,
    )


def plan_if_needed(model: PerformerLM, work: Workload, budget, given: int | None, **kw) -> Plan | None:
    """The one rule for when a run plans: C auto (`given` None) is planned, a given C is checked against a given
    budget (OutOfBudgetError when it does not fit), and a given C without a budget is taken as it is (None)."""
    if given is not None and budget is None:
        return None
    return plan_chunk_size(model, work, budget, forced=given, **kw)


def plan(
    model: PerformerLM,
    *,
    seq_len: int,
    batch_size: int = 1,
    mem_budget: str | int | None = None,
    optimizer: Optimizer | str = Optimizer.ADAM,
    recovery: Recovery | str = Recovery.SUBTRACT64,
    precision: Precision | str = Precision.FP32,
    data_bytes: int = 0,
    heap: Heap | str = Heap.SYSTEM,
    chunk_rule: ChunkRule | str = ChunkRule.FASTEST,
) -> Plan:
    """Pick the chunk size C for a training step that fits the memory budget on the model's device: the one
    predicted fastest among those that fit (`chunk_rule="max"`: the largest).

    Args:
        model: the model, on the device it will train on (two short probe steps run on it).
        seq_len: L, tokens per window; batch_size: windows per step.
        mem_budget: everything the job may hold: bytes, "2GB", "1.5GiB", "80%" of the free memory; None: the
            free memory less 10 %.
        optimizer: "sgd", "adam", "adamw" or "adafactor" (its state counts, measured); recovery: the SLiM state
            recovery; precision: "fp32" or "bf16" (autocast), as the run will use; data_bytes: the sizes of the
            data files a run will read (fit holds them resident); heap: "system" (glibc's own, as in your
            process) or "managed" (as `slimtune.fit` sets it, see plan_chunk_size); chunk_rule: "auto" (the
            fastest C that fits) or "max" (the largest).

    Returns:
        Plan: `chunk_size` (L when full backprop fits), `predicted_peak_bytes`, `candidates`; print() shows a table.

    Raises:
        OutOfBudgetError: not even C = 1 fits; the message names what is missing and what could help.

    Example:
        plan = slimtune.plan(model, seq_len=16384, mem_budget="2GB")
        loss = slimtune.slim_step(model, windows, chunk_size=plan.chunk_size)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"`seq_len` must be a positive integer, got {seq_len!r}", params=("seq_len",))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}", params=("batch_size",))
    work = Workload(seq_len, batch_size, optimizer, recovery, precision, data_bytes)
    return plan_chunk_size(model, work, mem_budget, heap=heap, rule=chunk_rule)

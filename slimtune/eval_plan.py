"""Planning the no-grad forward of `eval` and `generate` under a memory budget (issue 32): the chunk size C and the
batch (sequences per forward) whose predicted peak fits, as planner.py does for training steps: measure, predict,
choose.

- measure (`measure`): the tensor bytes (memory.TensorBytes) that one chunk of the forward holds at its peak, counted
  on the real model at two chunk sizes with one sequence (deterministic); then what the process holds (RSS on CPU,
  the CUDA context and the allocated tensors on CUDA).
- predict (`predict`, pure), line by line, adding up to the total:
  runtime   measured: what the process holds after the probes (Python, torch, the kernels' code they loaded, the
            weights) less the data, on CPU.
  data      computed: the token ids the process holds (the data is read whole and stays resident; the prompt); CPU
            only (on CUDA the data stays in host memory, and the windows line counts what goes to the card).
  chunk     measured: base + per_token x B x C, extrapolated linearly in the tokens per forward (the activations
            grow with them; the logits [B, C, V] and their log-probabilities too, up to a tile of positions:
            model.loss_tile, whose fixed share the line's base then holds), charged on CPU what
            glibc holds for them under the "lean" heap policy (memory.py: blocks of 1 MB and up mmap'ed), calibrated
            (FORWARD_HEAP_OVERHEAD for the blocks below 1 MB, planner.py's MAPPED_OVERHEAD for the rest), and never
            less than at fewer tokens.
  states    computed: the float64 attention states of the B sequences, carried and new, and one layer's cast.
  windows   computed: the B windows of L + 1 token ids (int64, and their rows before stacking) and the per-position
            losses (float64, and their concatenation).
  planning  measured: where the probes' own peak exceeds the rest (the process has held it already, so it is a
            floor, not judged).
- choose (`choose_forward`): the largest C up to L (planner.chunk_sizes' grid) with one sequence per forward; where
  C = L fits, the most sequences per forward up to the cap. A (C, B) fits when the lines but planning add up to at most
  the budget less planner.HEADROOM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from .breakdown import ForwardBreakdown
from .devices import available_source, resolve_budget
from .errors import OutOfBudgetError
from .memory import TensorBytes, heap_policy_during, new_peak_window, window_peak_rss
from .planner import (
    HEADROOM,
    MAPPED_OVERHEAD,
    PROBE_SIZES,
    TINY_PROBE_SIZES,
    Probe,
    budget_holding,
    chunk_line,
    chunk_sizes,
    feature_draw_for_probes,
    held_bytes,
    memory_counts,
    probe_sizes,
    probe_windows,
    usable_bytes,
)
from .pretrained import PerformerLM
from .units import format_size

# The forward a plan is for: runs windows [B, T + 1] (T inputs, T targets) at chunk size C, without gradients.
Forward = Callable[[torch.Tensor, int], object]
HEAP = "lean"  # the CPU heap policy the probes and the forward run under (memory.py): blocks of 1 MB and up mmap'ed
# Resident bytes per tensor byte of a chunk on CPU under HEAP, for blocks below its 1 MB mmap threshold (small C).
# Calibrated on 17 evaluations at a given C and batch (d 128-512, 1-4 layers, V 256 and 32000, C 64-16384, 60-300 kB
# each; benchmarks/RESULTS.md, "eval under a budget"): the loop's peak above the runtime was 2.6-3.1x the counted
# tensor bytes where the blocks lie below 1 MB (d 512 at C 256: 28 MB for 9.8 MB), and 1.0-1.3x where they are
# mapped, which planner.py's MAPPED_OVERHEAD covers (d 512 at C 1280: 51 MB for 39 MB; V 32000 at C 1024: 267 MB
# for 262 MB).
FORWARD_HEAP_OVERHEAD = 3.1


@dataclass(frozen=True)
class ForwardWork:
    """What the forward asks of the device, besides the model."""

    seq_len: int  # L: tokens per sequence (the longest the forward runs)
    max_batch: int = 1  # sequences per forward at most (the full sequences there are, up to the caller's cap)
    data_bytes: int = 0  # the token ids the process holds while it runs, resident when the plan measures


@dataclass
class ForwardPlan:
    """The choice and what it predicts."""

    chunk_size: int  # C: tokens per forward call of each sequence
    batch_size: int  # sequences per forward
    budget_bytes: int
    available_bytes: int
    available_source: str  # what limits available_bytes
    device: str
    seq_len: int
    predicted_peak_bytes: int
    breakdown: ForwardBreakdown  # the chosen (C, B)'s predicted peak, line by line
    memory_counts: str  # what the budget and the peaks count on this device
    heap: str = ""  # CPU: the heap policy the forward runs with (memory.py); "" on CUDA

    def to_json(self) -> dict:
        return asdict(self) | {"breakdown": self.breakdown.to_json()}


def _tracked(model: PerformerLM, forward: Forward, tokens: int) -> TensorBytes:
    """The tensor bytes one sequence's forward over `tokens` tokens in one chunk creates, counted."""
    windows = probe_windows(model, 1, tokens)
    with TensorBytes() as tracked:
        forward(windows, tokens)
    return tracked


def _probe_sizes(model: PerformerLM, forward: Forward, seq_len: int, room: float, overhead: float) -> tuple[int, int]:
    """planner.probe_sizes over tiny forwards of one sequence."""
    return probe_sizes(lambda tokens: _tracked(model, forward, tokens).peak, seq_len, room, overhead)


@torch.no_grad()
def measure(model: PerformerLM, forward: Forward, seq_len: int, room: Callable[[], float] | None = None) -> Probe:
    """One chunk's peak tensor bytes as base + per_token x tokens, from forwards of one sequence at two chunk sizes.
    `room`: how many bytes the probes may add to what the process holds (read after a tiny warm-up that loads the
    kernels' code); None: no limit."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    overhead = FORWARD_HEAP_OVERHEAD if on_cpu else 1.0
    with feature_draw_for_probes(model):
        c0 = min(TINY_PROBE_SIZES[0], seq_len)
        forward(probe_windows(model, 1, c0), c0)  # the warm-up: first use loads kernels' code, which stays
        if room is None:
            c1, c2 = min(PROBE_SIZES[0], seq_len), min(PROBE_SIZES[1], seq_len)
        else:
            c1, c2 = _probe_sizes(model, forward, seq_len, room(), overhead)
        m1 = _tracked(model, forward, c1)
        m2 = _tracked(model, forward, c2) if c2 > c1 else m1
    base, per_token = chunk_line(c1, m1.peak, c2, m2.peak)
    return Probe(
        base=base,
        per_token=per_token,
        optimizer_state=0,
        optimizer_peak=0,
        heap_overhead=overhead,
        mapped_overhead=MAPPED_OVERHEAD if on_cpu else 1.0,
        probe_tokens=c2,
        sizes=m2.sizes,
    )


def state_bytes(model: PerformerLM, batch_size: int) -> int:
    """The attention states of `batch_size` sequences: every layer's carried and new float64 state, and one layer's
    state cast to the compute dtype inside the attention."""
    c = model.config
    one = batch_size * c.n_heads * c.n_features * (c.head_dim + 1)  # one layer's [B, H, M, d_h + 1]
    return one * (8 * 2 * c.n_layers + model.output_logit_map.weight.element_size())


def window_bytes(seq_len: int, batch_size: int) -> int:
    """B windows of L + 1 token ids as int64, twice (the rows and their stack), and the per-position losses as
    float64, twice (the chunks' parts and their concatenation)."""
    return batch_size * (2 * (seq_len + 1) * 8 + 2 * seq_len * 8)


def predict(
    model: PerformerLM,
    measured: Probe | tuple[Probe, ...],
    runtime: int,
    work: ForwardWork,
    chunk_size: int,
    batch_size: int,
    *,
    heap: str = HEAP,
    reached: int = 0,
) -> ForwardBreakdown:
    """The predicted peak of the forward at chunk size C with B sequences per forward, line by line (bytes);
    `heap`: the heap policy (CPU, memory.py); `reached`: the peak the process has already had (the probes'), a
    floor."""
    tokens = min(chunk_size, work.seq_len) * batch_size
    # Never less than at fewer tokens: where a chunk's blocks grow past the mmap threshold they leave the heap, whose
    # overhead is the larger, and the heap model alone would predict less (planner.py's `_monotone`).
    probes = measured if isinstance(measured, tuple) else (measured,)  # the forward's, and its layers' alone
    chunk = max(p.chunk_bytes(t, heap) for p in probes for t in chunk_sizes(tokens) + [tokens])
    lines = ForwardBreakdown(
        runtime=runtime,
        data=work.data_bytes,
        chunk=int(chunk),
        states=state_bytes(model, batch_size),
        windows=window_bytes(work.seq_len, batch_size),
    )
    return lines.floored(reached)


def choose_forward(fits: Callable[[int, int], bool], seq_len: int, batches: list[int]) -> tuple[int, int] | None:
    """(C, B): the largest C (L, else the largest on planner.chunk_sizes' grid below it) that fits with the fewest
    sequences per forward in `batches`; where C = L, the most that fit. None when nothing fits."""
    least = min(batches)
    chunk = next((c for c in reversed(chunk_sizes(seq_len) + [seq_len]) if fits(c, least)), None)
    if chunk is None:
        return None
    return chunk, max(b for b in batches if b == least or (chunk >= seq_len and fits(chunk, b)))


def _nothing_fits(lines: ForwardBreakdown, work: ForwardWork, budget_bytes: int, available: int) -> OutOfBudgetError:
    lines = lines.judged()
    missing = lines.total - usable_bytes(budget_bytes)
    hints = [
        f"a larger `mem_budget` (at least {format_size(budget_holding(lines.total))}; "
        f"available: {format_size(available)})"
    ]
    if work.data_bytes >= missing:
        hints.append(f"less data (`max_bytes`: the data is held whole, {format_size(work.data_bytes)})")
    return OutOfBudgetError(
        f"budget {format_size(budget_bytes)} (less {HEADROOM:.0%} headroom) cannot fit even C = 1 with one sequence "
        f"per forward: {lines.terms()}, {format_size(missing)} over; try {'; or '.join(hints)}",
        params=("mem_budget", "max_bytes") if len(hints) > 1 else ("mem_budget",),
    )


def _forced_over(forced: int, batch: int, lines: ForwardBreakdown, chosen, budget_bytes: int) -> OutOfBudgetError:
    fits = f"the largest C that fits is {chosen[0]}" if chosen else "no C fits it"
    return OutOfBudgetError(
        f"chunk size {forced} with {batch} sequence(s) per forward is predicted to need {lines.judged().terms()}, over "
        f"the budget {format_size(budget_bytes)} (less {HEADROOM:.0%} headroom): {fits}; or drop the budget "
        f"(`mem_budget`) to force C = {forced}",
        params=("chunk_size", "mem_budget"),
    )


def plan_forward(
    model: PerformerLM,
    work: ForwardWork,
    budget: str | int | None,
    forward: Forward,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    layers: Forward | None = None,
) -> ForwardPlan:
    """Probe `forward` on the model, predict the peak of each (C, B) and pick the largest C that fits the budget (and
    at C = L the most sequences per forward, up to work.max_batch); `chunk_size` or `batch_size` given: that value,
    checked (OutOfBudgetError when it cannot fit). The data (work.data_bytes) must be resident already: the runtime
    measured holds it. Budget None: the available memory less a margin (devices.resolve_budget), as fit. `layers`:
    the forward without its output map and loss, probed apart where those run over tiles of positions after the
    layers' transients are gone (eval): the peak is then the larger of two lines, which one line through two probes
    at small C (where the tile dominates) would miss at large C (where the layers' transients do)."""
    device = next(model.parameters()).device
    seq_len = work.seq_len
    budget_bytes, available = resolve_budget(budget, device)
    usable = usable_bytes(budget_bytes)
    on_cpu = device.type == "cpu"
    windowed = on_cpu and new_peak_window()  # the probes' own peak, not the process's earlier ones
    with heap_policy_during(HEAP if on_cpu else None):  # as the forward will run (memory.py)
        measured = measure(model, forward, seq_len, room=lambda: usable - held_bytes(device))
        if layers is not None:
            measured = (measured, measure(model, layers, seq_len, room=lambda: usable - held_bytes(device)))
    reached = window_peak_rss() if windowed else 0
    runtime = held_bytes(device) - (work.data_bytes if on_cpu else 0)
    work = work if on_cpu else replace(work, data_bytes=0)  # on CUDA the data stays in host memory

    def peak(c, b):
        return predict(model, measured, runtime, work, c, b, heap=HEAP if on_cpu else "fast", reached=reached)

    def fits(c, b):
        return peak(c, b).judged().total <= usable

    batches = [batch_size] if batch_size is not None else list(range(1, max(1, work.max_batch) + 1))
    chosen = choose_forward(fits, seq_len, batches)
    if chunk_size is not None:
        forced = min(chunk_size, seq_len)
        fitting = [b for b in batches if fits(forced, b)]
        if not fitting:
            raise _forced_over(forced, min(batches), peak(forced, min(batches)), chosen, budget_bytes)
        chosen = forced, max(fitting)
    if chosen is None:
        raise _nothing_fits(peak(1, 1), work, budget_bytes, available)
    c, b = chosen
    lines = peak(c, b)
    return ForwardPlan(
        chunk_size=c,
        batch_size=b,
        budget_bytes=budget_bytes,
        available_bytes=available,
        available_source=available_source(device),
        device=str(device),
        seq_len=seq_len,
        predicted_peak_bytes=lines.total,
        breakdown=lines,
        memory_counts=memory_counts(device),
        heap=HEAP if on_cpu else "",
    )


def plan_forward_if_needed(
    model: PerformerLM,
    work: ForwardWork,
    budget,
    forward: Forward,
    *,
    chunk_size: int | None,
    batch_size: int | None = None,
    layers: Forward | None = None,
) -> ForwardPlan | None:
    """The rule fit follows (planner.plan_if_needed): C auto (None) is planned, a given C is checked against a given
    budget, and a given C without a budget is taken as it is (None)."""
    if chunk_size is not None and budget is None:
        return None
    return plan_forward(model, work, budget, forward, chunk_size=chunk_size, batch_size=batch_size, layers=layers)


def run_heap(plan: ForwardPlan | None):
    """The heap policy the planned forward runs under (memory.heap_policy_during); unplanned: the process's own."""
    return heap_policy_during(plan.heap or None if plan is not None else None)

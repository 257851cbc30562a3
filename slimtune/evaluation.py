"""Bits per character of a model on a byte file, computed chunk by chunk with carried states, so memory does not
grow with the sequence length: at the chunk size and the sequences per forward whose peak fits the memory budget
(eval_plan.py); and the paper's one-step adaptation protocol, whose SLiM step planner.py plans."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .choices import Precision
from .data import Tokens, as_tokens, check_vocabulary, copy_windows
from .errors import ConfigError
from .eval_plan import ForwardPlan, ForwardWork, plan_forward_if_needed, run_heap
from .memory import peak_memory_bytes
from .options import ADAPT_CHUNK, ADAPT_LR, DataOptions, EvalOptions, chunk_request, default_of
from .planner import Workload, plan_if_needed
from .pretrained import PerformerLM
from .slim import slim_step

DEFAULT_SEQ_LEN = default_of(DataOptions, "seq_len")  # fit's default L: a base and its fine-tune score alike
DEFAULT_BATCH = 8  # sequences per forward at most: beyond it a forward hardly runs faster per token


@dataclass
class EvalResult:
    bpc: float  # mean next-token cross-entropy in bits: bits per byte for byte data, bits per token for tokens
    loss: float  # the same in nats
    predicted_bytes: int
    seq_len: int
    chunk_size: int
    batch_size: int = 0  # sequences per forward
    budget_bytes: int | None = None  # the budget planned for; None: C was given without a budget
    predicted_peak_bytes: int | None = None  # the plan's prediction of the process's peak
    peak_memory_bytes: int = 0  # measured, the whole process's (memory.peak_memory_bytes): RSS on CPU
    plan: ForwardPlan | None = None  # the plan where one was made
    bits_per_token: float = 0.0  # = bpc
    bits_per_byte: float | None = None  # the summed bits over the text's UTF-8 bytes, where the bytes are known

    def to_json(self) -> dict:
        return asdict(self) | {"plan": self.plan.to_json() if self.plan else None}


@torch.no_grad()
def position_nll(model: PerformerLM, windows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Next-byte negative log-likelihood (nats) at each position [B, L] of windows [B, L + 1], run C tokens at a
    time with carried states."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    states = model.initial_states(inputs.shape[0], dtype=torch.float64)
    tile = model.loss_tile(inputs.shape[0])  # the logits [B, tile, V] at a time, as in training
    parts = []
    for s in range(0, inputs.shape[1], chunk_size):
        hidden, states = model.hidden_chunk(inputs[:, s : s + chunk_size], s, states)
        for t in range(0, hidden.shape[1], tile):
            logits = model.output_logit_map(hidden[:, t : t + tile]).float()
            ce = F.cross_entropy(
                logits.flatten(0, 1), targets[:, s + t : s + t + logits.shape[1]].flatten(), reduction="none"
            )
            parts.append(ce.view(inputs.shape[0], -1).double())
            del logits
    return torch.cat(parts, dim=1)


@torch.no_grad()
def layers_only(model: PerformerLM, windows: torch.Tensor, chunk_size: int) -> None:
    """position_nll's layers alone, chunk by chunk, without the output map and the loss: the transients the
    eval plan probes apart (eval_plan.plan_forward's `layers`)."""
    model.hidden_pass(windows[:, :-1], chunk_size)


def fixed_features(model: PerformerLM, seed: int = 0) -> None:
    """FAVOR+ models: a seeded draw, so that scoring and sampling are repeatable (a no-op for other maps)."""
    model.redraw_features(torch.Generator().manual_seed(seed))


def _needs_draw(model: PerformerLM) -> bool:
    """A FAVOR+ model that has no feature draw yet (a freshly loaded one)."""
    return any(getattr(layer.attention, "projection", 0) is None for layer in model.layers) and (
        model.config.feature_type.startswith("favor+")
    )


def check_ids(data: torch.Tensor, vocab_size: int, what: str = "data") -> None:
    """Token ids must lie in 0..vocab_size - 1 (data.check_vocabulary). Reads every id, so that memory-mapped data
    is resident before a plan measures what the process holds."""
    check_vocabulary(data, vocab_size, what)  # reads every id, except bytes under a byte-level vocabulary
    if data.numel() and data.dtype == torch.uint8:
        int(data.max())


def _sequences(n: int, seq_len: int) -> tuple[list[int], list[int]]:
    """(starts of every sequence, starts of the full ones): consecutive sequences of L predictions over n tokens."""
    starts = list(range(0, n - 1, seq_len))
    return starts, [s for s in starts if s + seq_len + 1 <= n]


def evaluate(
    model: PerformerLM,
    data: Tokens | torch.Tensor | str | os.PathLike,
    *,
    seq_len: int | None = None,
    chunk_size: int | str | None = "auto",
    batch_size: int | None = None,
    mem_budget: int | str | None = None,
    max_bytes: int | None = None,
    feature_seed: int = 0,
    on_progress=None,
) -> EvalResult:
    """Bits per character of `model` on bytes (bits per token on token ids).

    Args:
        model: the model. A FAVOR+ model uses its current draw; one without a draw (freshly loaded) gets the
            seeded draw `feature_seed`, so that scoring it is repeatable.
        data: a data file's path (data.read_data: text as bytes, or ids), its Tokens, or its token ids as an
            integer tensor [N] (bytes: uint8).
        seq_len: predictions per sequence; the data is cut into consecutive sequences, each starting from
            position 0 with fresh states, the last, shorter one included. Default: DEFAULT_SEQ_LEN (1024, fit's),
            whatever L the checkpoint was trained at, so that two checkpoints are scored alike.
        chunk_size: tokens run at a time: "auto" (or None) plans the largest C whose peak fits `mem_budget`
            (eval_plan.py), "full" is L, an integer is taken as it is (checked against a given `mem_budget`).
        batch_size: sequences per forward; None: planned (at most DEFAULT_BATCH, where C = L fits), or
            DEFAULT_BATCH with a given C.
        mem_budget: everything the process may hold (bytes, "1GB", "80%" of the available memory); None: the
            available memory less a margin, as fit.
        max_bytes: score only the first N tokens.

    Returns:
        EvalResult with bpc, loss (nats), the number of tokens scored, the C and batch used, the plan and the
        process's measured peak.

    Raises:
        OutOfBudgetError: the budget cannot fit even C = 1 with one sequence, or a given C does not fit it.

    Example:
        bpc = slimtune.evaluate(model, "valid.txt", mem_budget="1GB").bpc
    """
    tokens = as_tokens(data, vocab_size=model.config.vocab_size)
    data = tokens.ids
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len < 1 or (isinstance(chunk_size, int) and chunk_size < 1):
        raise ConfigError(
            f"`seq_len` and `chunk_size` must be >= 1, got {seq_len} and {chunk_size}", params=("seq_len", "chunk_size")
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"`batch_size` must be an integer >= 1, got {batch_size!r}", params=("batch_size",))
    n = data.numel() if max_bytes is None else min(data.numel(), max_bytes)
    if n < 2:
        raise ConfigError("eval needs at least 2 bytes of data", params=("max_bytes",))
    if _needs_draw(model):
        fixed_features(model, feature_seed)
    data = data[:n]
    check_ids(data, model.config.vocab_size)  # reads it all: resident before the plan measures the process
    device = next(model.parameters()).device
    starts, full = _sequences(n, seq_len)
    longest = min(seq_len, n - 1)  # no C beyond the longest sequence there is
    given = chunk_request(chunk_size, longest)
    cap = min(batch_size or DEFAULT_BATCH, max(1, len(full)))  # sequences per forward: no more than there are
    fixed = None if batch_size is None else cap
    work = ForwardWork(longest, cap, data.numel() * data.element_size())
    forward = partial(position_nll, model)
    layers = partial(layers_only, model)
    plan = plan_forward_if_needed(model, work, mem_budget, forward, chunk_size=given, batch_size=fixed, layers=layers)
    chunk, batch = (plan.chunk_size, plan.batch_size) if plan else (given, cap)
    kept = None if tokens.mask is None else tokens.mask[:n]  # records: only the completions' predictions count
    with run_heap(plan):
        total, count = _score_all(model, data[:n], kept, seq_len, chunk, batch, on_progress)
    loss = total / count
    # The bytes behind the predicted tokens: each token's own for byte data; for encoded text, the text's bytes in
    # the share of its tokens that were predicted (a sequence's first token is not), where the whole text is scored.
    n_bytes = n if data.dtype == torch.uint8 else (tokens.n_bytes if n == len(tokens) and kept is None else None)
    predicted_bytes = count if data.dtype == torch.uint8 else n_bytes and n_bytes * count / n
    return EvalResult(
        bpc=loss / math.log(2),
        bits_per_token=loss / math.log(2),
        bits_per_byte=total / math.log(2) / predicted_bytes if predicted_bytes else None,
        loss=loss,
        predicted_bytes=count,
        seq_len=seq_len,
        chunk_size=chunk,
        batch_size=batch,
        budget_bytes=plan.budget_bytes if plan else None,
        predicted_peak_bytes=plan.predicted_peak_bytes if plan else None,
        peak_memory_bytes=peak_memory_bytes(device),
        plan=plan,
    )


def _score_all(model, data: torch.Tensor, kept, seq_len: int, chunk: int, batch: int, on_progress) -> tuple[float, int]:
    """(summed nats, predictions counted) over consecutive sequences of `seq_len` predictions of `data`, `batch`
    full ones per forward, then the shorter tail; ConfigError where a mask keeps none of them."""
    device = next(model.parameters()).device
    n = data.numel()
    starts, full = _sequences(n, seq_len)
    total, count, done = 0.0, 0, 0
    for i in range(0, len(full), batch):
        windows = torch.stack([data[s : s + seq_len + 1] for s in full[i : i + batch]]).long().to(device)
        scored, counted = _scored(position_nll(model, windows, chunk), kept, full[i : i + batch])
        total, count, done = total + scored, count + counted, done + windows.shape[0] * seq_len
        del windows
        if on_progress:
            on_progress(done, n - 1)
    if len(full) < len(starts):  # the tail, shorter than L
        tail = data[starts[-1] : n].long()[None].to(device)
        scored, counted = _scored(position_nll(model, tail, chunk), kept, starts[-1:])
        total, count = total + scored, count + counted
    if count == 0:
        raise ConfigError("the data scored holds no completion: give more records, or a larger `max_bytes`")
    return total, count


def _scored(nll: torch.Tensor, kept: torch.Tensor | None, starts: list[int]) -> tuple[float, int]:
    """(summed nats, predictions counted) of per-position losses [B, T] of sequences at `starts`; with a mask, only
    the predictions whose target it keeps."""
    if kept is None:
        return nll.sum().item(), nll.numel()
    weights = torch.stack([kept[s + 1 : s + 1 + nll.shape[1]] for s in starts]).to(nll.device, nll.dtype)
    return (nll * weights).sum().item(), int(weights.sum().item())


@torch.no_grad()
def copy_accuracy(
    model: PerformerLM, seq_len: int, n_symbols: int, generator: torch.Generator, batches: int = 4
) -> float:
    """Share of the copy's symbols predicted exactly (argmax), over `batches` batches of 8 fresh sequences."""
    device = next(model.parameters()).device
    hits = total = 0.0
    for _ in range(batches):
        windows, mask = copy_windows(8, seq_len, n_symbols, generator)
        windows, mask = windows.to(device), mask.to(device)
        predicted = model(windows[:, :-1]).argmax(-1)
        hits += ((predicted == windows[:, 1:]).float() * mask).sum().item()
        total += mask.sum().item()
    return hits / total


@dataclass
class AdaptResult:
    bpc_before: float  # mean bpc of the windows' second halves with the checkpoint's weights
    bpc_after: float  # the same after one SGD step on each window's first half
    difference: float  # after - before (negative: the step helped)
    windows: int
    seq_len: int
    chunk_size: int
    lr: float
    budget_bytes: int | None = None  # the budget planned for; None: C was given without a budget
    predicted_peak_bytes: int | None = None  # the plan's prediction of the process's peak
    peak_memory_bytes: int = 0  # measured, the whole process's (memory.peak_memory_bytes): RSS on CPU

    def to_json(self) -> dict:
        return asdict(self)


def _half_bpc(model: PerformerLM, window: torch.Tensor, half: int, chunk_size: int) -> float:
    """bpc of the predictions at positions half..L-1 of window [1, L + 1], read with the whole prefix."""
    return position_nll(model, window, chunk_size)[:, half:].mean().item() / math.log(2)


def _restore(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def adapt_one_step(
    model: PerformerLM,
    data: torch.Tensor,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    windows: int = default_of(EvalOptions, "windows"),
    lr: float = ADAPT_LR,
    chunk_size: int | str | None = ADAPT_CHUNK,
    mem_budget: int | str | None = None,
    seed: int = 0,
    precision: Precision | str = Precision.FP32,
    on_progress=None,
) -> AdaptResult:
    """The paper's on-device protocol: for `windows` windows of seq_len + 1 bytes at seeded random offsets, the
    bpc of the second half before and after one plain-SGD step on the first half's loss, each window starting
    again from the original weights (of the parameters that train: a LoRA model's adapters). The step runs SLiM
    at `chunk_size` over the first half: an integer, "full" (ordinary backprop), or "auto"/None (the largest C
    that fits `mem_budget`, counting the copy of the trainable weights this keeps to start each window from), in
    `precision` ("bf16": under autocast, as a fit on a bf16 base computes)."""
    if seq_len < 4 or data.numel() < seq_len + 1:
        raise ConfigError(
            f"one-step adaptation needs `seq_len` >= 4 and at least `seq_len` + 1 = {seq_len + 1} bytes of data",
            params=("seq_len",),
        )
    half_len = max(1, seq_len // 2)
    given = chunk_request(chunk_size, half_len)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}  # a LoRA model: its adapters
    copy = sum(p.numel() * p.element_size() for p in trainable.values())
    check_ids(data, model.config.vocab_size)  # reads it all: resident before the plan measures the process
    held = data.numel() * data.element_size()  # the data, read whole
    work = Workload(half_len, 1, "sgd", precision=precision, data_bytes=held, copies_bytes=copy)
    planned = plan_if_needed(model, work, mem_budget, given, resident_data=held)
    chunk_size = given if planned is None else planned.chunk_size
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    original = {name: p.detach().clone() for name, p in trainable.items()}
    half = seq_len // 2
    offsets = torch.randint(0, data.numel() - seq_len, (windows,), generator=generator).tolist()
    before, after = [], []
    for i, offset in enumerate(offsets):
        window = data[offset : offset + seq_len + 1].long()[None].to(device)
        _restore(trainable, original)
        model.redraw_features(generator)
        before.append(_half_bpc(model, window, half, chunk_size))
        model.zero_grad(set_to_none=True)
        slim_step(model, window[:, : half + 1], chunk_size, precision=precision)  # the first half's predictions
        with torch.no_grad():
            for p in trainable.values():
                p -= lr * p.grad
        model.zero_grad(set_to_none=True)
        after.append(_half_bpc(model, window, half, chunk_size))
        if on_progress:
            on_progress(i + 1, windows)
    _restore(trainable, original)
    b, a = sum(before) / len(before), sum(after) / len(after)
    return AdaptResult(
        bpc_before=b,
        bpc_after=a,
        difference=a - b,
        windows=windows,
        seq_len=seq_len,
        chunk_size=chunk_size,
        lr=lr,
        budget_bytes=planned.budget_bytes if planned else None,
        predicted_peak_bytes=planned.predicted_peak_bytes if planned else None,
        peak_memory_bytes=peak_memory_bytes(device),
    )

"""The SLiM training step (Likhosherstov et al. 2021, section 3, Algorithm 1): exact gradients of a Performer's
loss over a sequence of length L in memory O(C), where C is the chunk size.

The only thing one position passes to the next is each layer's attention state, so the sequence is cut into
chunks. A forward sweep under no_grad carries the states across chunks and keeps nothing else. A reverse sweep
then visits the chunks from last to first: it recovers the chunk's start states, rebuilds the chunk's graph,
and backpropagates the chunk's loss plus <end states, their gradients>, which leaves the chunk's share of every
parameter gradient in .grad and yields the gradients of its start states for the chunk before.

Start states are recovered by one of three `recovery` strategies (the first chunk starts from zeros and the
last from the forward sweep's final states, exactly, under every strategy):
- "subtract"   the paper: start = end - (this chunk's contribution), states in the compute dtype. O(1) memory
               in L, but in fp32 each subtraction rounds, and the errors add up over many chunks when the
               states are large (long sequences, unbounded features such as sqr).
- "subtract64" the same subtraction with the carried states kept in float64 (2x a few hundred KB). The chunk's
               contribution is recomputed bit for bit, so recovery is exact to float64 rounding. Default.
- "store"      keep every chunk's start states from the forward sweep: no subtraction at all, but
               (L / C) x the state memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .attention import state_contribution
from .choices import Precision, Recovery
from .deferred import WeightGradBatcher, use_batching
from .errors import ConfigError
from .model import Performer

# A chunk's start state of layer l, given that layer's key features and values over the chunk (which the
# subtraction needs; the other strategies know the state already): (l, phi(k), v) -> [B, H, M, D + 1].
StartStates = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _known(states: list[torch.Tensor]) -> StartStates:
    return lambda layer, fk, v: states[layer]


class _Subtract:
    """The paper's recovery: a chunk's start states are its end states less its own contribution; nothing is
    kept per chunk. Exact to float64 rounding when the states are carried in float64 ("subtract64")."""

    def keep(self, states: list[torch.Tensor]) -> None:
        pass  # nothing per chunk

    def start_states(self, ends: list[torch.Tensor]) -> StartStates:
        return lambda layer, fk, v: ends[layer] - state_contribution(fk, v).to(ends[layer].dtype)


class _Store:
    """Every chunk's start states, kept by the forward sweep: no subtraction, (L / C) x the states' memory."""

    def __init__(self):
        self.kept: list[list[torch.Tensor]] = []

    def keep(self, states: list[torch.Tensor]) -> None:
        self.kept.append(states)

    def start_states(self, ends: list[torch.Tensor]) -> StartStates:
        return _known(self.kept.pop())


def _loss_weights(windows: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per-position weights [B, L] that make the summed loss the mean over the positions the mask keeps."""
    B, L = windows.shape[0], windows.shape[1] - 1
    if mask is None:
        return torch.full((B, L), 1.0 / (B * L), dtype=dtype, device=windows.device)
    if tuple(mask.shape) != (B, L):
        raise ConfigError(
            f"loss mask has shape {tuple(mask.shape)}, expected [B, L] = {[B, L]} (one per predicted byte)"
        )
    mask = mask.to(device=windows.device, dtype=dtype)
    kept = mask.sum()
    if kept <= 0:
        raise ConfigError("loss mask keeps no position: at least one entry must be nonzero")
    return mask / kept


def compute_dtype(precision: Precision | str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a precision given as "fp32"/"bf16", a Precision, a torch dtype or None."""
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    return Precision.parse(precision, "precision").dtype


def autocast(device: torch.device, precision: torch.dtype | None):
    """Mixed precision for the forward work of a step: matmuls in `precision` (bf16), while the weights, their
    gradients, the carried attention states and the loss stay in fp32 or wider. None: no autocast."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)


def _check(model: Performer, windows: torch.Tensor, chunk_size: int) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ConfigError(f"windows must be [B, L + 1] with L >= 1, got shape {tuple(windows.shape)}")
    if windows.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ConfigError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk size must be an integer >= 1, got {chunk_size!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("no parameter of the model requires grad: there is nothing to train")
    if windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= model.config.vocab_size):
        raise ConfigError(
            f"token ids must lie in [0, {model.config.vocab_size}), got {int(windows.min())}..{int(windows.max())}"
        )


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum of weights * cross-entropy over a chunk; logits [B, T, V], targets and weights [B, T]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a half-precision model still sums in fp32
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten().to(ce.dtype)).sum()


def _recompute(model: Performer, ids, start: int, start_states: StartStates, *, first: bool = False):
    """Rebuild one chunk with autograd from its start states (given per layer by `start_states`).

    Returns (the last layer's output [B, T, d], start states as recovered, their copies in the weights' dtype as
    the graph's leaves, which receive gradients unless `first`, end states in the graph). The graph holds the states
    in the weights' dtype (fp32) even when they are carried in float64: the state gradients need no more than
    backprop's own fp32."""
    x = model.embed(ids, start)
    exact, leaves, ends = [], [], []
    for index, layer in enumerate(model.layers):
        fq, fk, v = layer.features(x)
        with torch.no_grad():  # recovered or known: a constant of this chunk's graph
            state = start_states(index, fk, v)
        leaf = state.to(model.dtype).detach().requires_grad_(not first)  # the first chunk's zeros need no gradient
        x, end_state = layer.mix(x, fq, fk, v, leaf)
        exact.append(state)
        leaves.append(leaf)
        ends.append(end_state)
    return x, exact, leaves, ends


def _output_loss(model: Performer, hidden: torch.Tensor, targets, weights, mixed):
    """The chunk's loss from its last layer's output: (loss in the graph, None) where the chunk's logits fit in one
    tile (Performer.loss_tile); else tile by tile: each tile's logits [B, tile, V] made, backpropagated at once into
    the output map's parameters and the tile's rows, and freed, so the logits and their gradient never exist whole
    (Liger's and Apple's fused cross-entropy, in plain PyTorch). Then (the loss, detached; the gradient of
    `hidden`, for the backward through the layers). Exact either way: the same products, tile by tile."""
    tile = model.loss_tile(hidden.shape[0])
    if tile >= hidden.shape[1]:
        with mixed:
            return chunk_loss(model.output_logit_map(hidden), targets, weights), None
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grads = []
    for t in range(0, hidden.shape[1], tile):
        rows = hidden[:, t : t + tile].detach().requires_grad_()
        with mixed:
            loss = chunk_loss(model.output_logit_map(rows), targets[:, t : t + tile], weights[:, t : t + tile])
        loss.backward()  # frees this tile's logits before the next tile makes its own
        total += loss.detach()
        grads.append(rows.grad)
    return total, torch.cat(grads, dim=1)


def slim_step(
    model: Performer,
    windows: torch.Tensor,
    chunk_size: int,
    mask: torch.Tensor | None = None,
    *,
    recovery: Recovery | str = Recovery.SUBTRACT64,
    precision: Precision | str | torch.dtype | None = None,
    batch_weight_grads: bool | None = None,
    between_chunks: Callable[[], None] | None = None,
) -> float:
    """Accumulate into each parameter's .grad the exact gradient of the mean next-token loss, and return the loss.

    Args:
        model: the Performer; its current FAVOR+ draw is used for every chunk (see `Performer.redraw_features`).
        windows: [B, L + 1] token ids (inputs are [:, :-1], targets [:, 1:]).
        chunk_size: C >= 1; C >= L is ordinary backprop with no overhead.
        mask: optional [B, L] weights of the predicted positions (the loss is their weighted mean).
        recovery: how each chunk's start states are recovered: "subtract64" (default), "subtract" or "store".
        precision: "bf16" (or torch.bfloat16) runs the forward work under bf16 autocast, no loss scaling needed;
            sweep and rebuild run under the same autocast, so recovery stays bit for bit. Default: fp32.
        batch_weight_grads: apply weight gradients a few hundred rows at a time (deferred.py; faster for small
            C, costs fixed buffers). None: whenever the chunks are small and there is no autocast.
        between_chunks: called after each chunk of both sweeps (the Trainer adapts the CPU thread count there).

    Returns:
        The mean loss in nats per token. Gradients are added to .grad (zero them between optimizer steps).

    Example:
        loss = slim_step(model, windows, chunk_size=256)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
    """
    _check(model, windows, chunk_size)
    recovery, precision = Recovery.parse(recovery, "state recovery"), compute_dtype(precision)
    inputs, targets = windows[:, :-1].long(), windows[:, 1:].long()
    L = inputs.shape[1]
    weights = _loss_weights(windows, mask, torch.float64)
    starts = list(range(0, L, chunk_size))
    strategy = _Store() if recovery == Recovery.STORE else _Subtract()
    initial = model.initial_states(inputs.shape[0], dtype=torch.float64 if recovery == Recovery.SUBTRACT64 else None)

    # Forward sweep: carry the states to the last chunk's start. Nothing is kept but the current states (and,
    # with "store", the start states of chunks 1 .. n-2). The last chunk needs no sweep: it is rebuilt directly.
    states = initial
    mixed = autocast(inputs.device, precision)
    with torch.no_grad(), mixed:
        for i, s in enumerate(starts[:-1]):
            if i > 0:
                strategy.keep(states)
            states = model.advance(inputs[:, s : s + chunk_size], s, states)
            if between_chunks:
                between_chunks()

    # Reverse sweep, last chunk first. `states` holds the current chunk's end states (for the last chunk: its
    # start states, from the sweep). Small chunks hand their weight gradients to a batcher, which applies them a
    # few hundred rows at a time (slimtune/deferred.py).
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)  # summed on the device: no sync per chunk
    state_grads = None  # d loss / d (end states), from the chunk after; none for the last chunk
    batched = use_batching(inputs.shape[0], chunk_size, L, precision, batch_weight_grads)
    with WeightGradBatcher(model) if batched else contextlib.nullcontext():
        for i in reversed(range(len(starts))):
            s = starts[i]
            if i == 0:
                start_states = _known(initial)  # zeros, known exactly
            elif i == len(starts) - 1:
                start_states = _known(states)  # the sweep ended at this chunk's start
            else:
                start_states = strategy.start_states(states)
            with mixed:
                hidden, exact, leaves, end_states = _recompute(
                    model, inputs[:, s : s + chunk_size], s, start_states, first=i == 0
                )
            piece = slice(s, s + chunk_size)
            loss, hidden_grad = _output_loss(model, hidden, targets[:, piece], weights[:, piece], mixed)
            # The chunk's loss (or, tiled, its gradient at the last layer's output) plus <end states, their incoming
            # gradients>, in one backward. An end state that needs no gradient (the first chunk's, where every
            # parameter below it is frozen) leads to no parameter that trains: its term is zero and is left out.
            pairs = [(e, g) for e, g in zip(end_states, state_grads or (), strict=False) if e.requires_grad]
            root = (loss, None) if hidden_grad is None else (hidden, hidden_grad)
            if hidden_grad is None or hidden.requires_grad:
                torch.autograd.backward([root[0], *(e for e, _ in pairs)], [root[1], *(g for _, g in pairs)])
            total += loss.detach()
            # This chunk's start states are the previous chunk's end states; backward has freed the graph.
            states = exact
            state_grads = [st.grad for st in leaves]
            if between_chunks:
                between_chunks()
    return total.item()

"""Batched weight gradients for small chunks.

Backprop of a linear map y = x W^T + b over a chunk of r rows yields dL/dx = g W, needed at once to carry on
backward, and dL/dW = g^T x, which nothing downstream needs. Per chunk, the latter is an [out, r] x [r, in]
product written into a weight-sized temporary and added into .grad: for SLiM at C = 16 that is a pass over
every weight matrix, twice, for 16 rows of work, and it was a quarter of a C = 16 step on CPU.

While a `WeightGradBatcher` is attached, a `DeferredLinear` hands its (x, g) rows to the batcher instead; the
batcher collects them across chunks and applies one product per `rows` rows: the same sum, in another order.
It holds `rows` x (in + out) values per linear map (see `buffer_bytes`), flushes when full, and when detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import quantized_lora_linear

DEFER_ROWS = 256  # rows per batched weight-gradient product; chunks of B * C >= this are not deferred


class DeferredLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose weight gradient can be batched over chunks.

    While a batcher is attached, the weight and bias enter the graph as constants, so backward computes only
    dL/dx = g W, and a hook on the output hands (x, g) to the batcher's slot for this map."""

    batcher: WeightGradBatcher | None = None
    quantized = None  # a frozen base stored quantized (quant.Quantized; lora.quantize_base): no `weight` then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return quantized_lora_linear(x, self.quantized, self.bias)
        if self.weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # A frozen base kept in bf16 (slimtune/lora.py) outside autocast: computed as autocast would.
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        if not self.defers(x):
            return super().forward(x)
        y = F.linear(x, self.weight.detach(), None if self.bias is None else self.bias.detach())
        slot = self.batcher.slot(self)
        y.register_hook(lambda g: slot.add(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])))
        return y

    def _apply(self, fn, recurse=True):
        """`model.to(device)` moves a quantized weight with the parameters; its dtype stays (the format's own)."""
        super()._apply(fn, recurse)
        if self.quantized is not None:
            self.quantized = self.quantized.to(fn(torch.empty(0, device=self.quantized.device)).device)
        return self

    def defers(self, x: torch.Tensor) -> bool:
        """Whether forward(x) hands its weight gradient to the batcher (through a hook on its output)."""
        return self.batcher is not None and torch.is_grad_enabled() and self.weight.requires_grad and x.requires_grad


class _Slot:
    """One linear map's rows of (x, g), and their product into its .grad."""

    def __init__(self, module: nn.Linear, rows: int):
        self.module, self.rows, self.used = module, rows, 0
        self.x = self.g = None

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        r = x.shape[0]
        if self.used + r > self.rows:
            self.flush()
        if r >= self.rows:  # a big chunk: nothing to gain from batching it
            self._apply(x, g)
            return
        if self.x is None:
            self.x = x.new_empty(self.rows, x.shape[1])
            self.g = g.new_empty(self.rows, g.shape[1])
        self.x[self.used : self.used + r].copy_(x)
        self.g[self.used : self.used + r].copy_(g)
        self.used += r

    def _apply(self, x: torch.Tensor, g: torch.Tensor) -> None:
        weight, bias = self.module.weight, self.module.bias
        if weight.grad is None:
            weight.grad = g.t() @ x
        else:
            weight.grad.addmm_(g.t(), x)
        if bias is not None and bias.requires_grad:
            bias.grad = g.sum(0) if bias.grad is None else bias.grad.add_(g.sum(0))

    def flush(self) -> None:
        if self.used:
            self._apply(self.x[: self.used], self.g[: self.used])
            self.used = 0


class WeightGradBatcher:
    """Context manager: while active, every DeferredLinear in `model` batches its weight gradients; on a clean
    exit the remaining rows are applied, so .grad holds exactly what plain autograd would have put there."""

    def __init__(self, model: nn.Module, rows: int = DEFER_ROWS):
        self.modules = [m for m in model.modules() if isinstance(m, DeferredLinear)]
        self.rows = rows
        self.slots: dict[int, _Slot] = {}

    def slot(self, module: nn.Linear) -> _Slot:
        key = id(module)
        if key not in self.slots:
            self.slots[key] = _Slot(module, self.rows)
        return self.slots[key]

    def __enter__(self) -> WeightGradBatcher:
        for m in self.modules:
            m.batcher = self
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:  # after an error (out of memory) the step's gradients are thrown away anyway
                for slot in self.slots.values():
                    slot.flush()
        finally:
            for m in self.modules:
                m.batcher = None
            self.slots.clear()


def buffer_bytes(model: nn.Module, rows: int = DEFER_ROWS) -> int:
    """What a WeightGradBatcher holds at most: rows x (in + out) values per DeferredLinear that trains (a frozen
    map hands it nothing)."""
    return sum(
        rows * (m.in_features + m.out_features) * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, DeferredLinear) and m.weight is not None and m.weight.requires_grad
    )


def defers(batch_size: int, chunk_size: int, seq_len: int, precision: torch.dtype | None) -> bool:
    """Whether slim_step batches weight gradients: several chunks of fewer than DEFER_ROWS rows, no autocast."""
    return chunk_size < seq_len and batch_size * chunk_size < DEFER_ROWS and precision is None


def use_batching(
    batch_size: int, chunk_size: int, seq_len: int, precision: torch.dtype | None, requested: bool | None
) -> bool:
    """The one decision whether a step batches its weight gradients: when asked (None: whenever it can) and
    when it can (`defers`)."""
    possible = defers(batch_size, chunk_size, seq_len, precision)
    return possible if requested is None else bool(requested) and possible

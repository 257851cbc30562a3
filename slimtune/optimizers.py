"""The optimizers `fit` offers, built one way everywhere (training, and the planner's memory probe)."""

from __future__ import annotations

import torch

from .choices import ADAMW_WEIGHT_DECAY, Optimizer  # noqa: F401 (ADAMW_WEIGHT_DECAY: re-exported)


def default_weight_decay(name: Optimizer | str) -> float:
    return Optimizer.parse(name, "optimizer").default_weight_decay


def param_groups(model_or_params, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices (and the embedding) only, never on LayerNorm gains or biases
    (nanoGPT's rule: decay the parameters with two or more dimensions)."""
    params = list(model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params)
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(
    name: Optimizer | str, params, lr: float, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """sgd is plain SGD (no momentum, no state); adam, adamw and adafactor as in torch (torch.optim.Adafactor:
    factored second moments, a row and a column vector per matrix). `weight_decay` (default: 0.01 for adamw, else
    0) applies to the weight matrices only; adamw's and adafactor's is decoupled, sgd's and adam's is L2."""
    name = Optimizer.parse(name, "optimizer")
    decay = default_weight_decay(name) if weight_decay is None else weight_decay
    groups = param_groups(params, decay)
    if name == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=lr, momentum=0.0)
    if name == Optimizer.ADAM:
        return torch.optim.Adam(groups, lr=lr)
    if name == Optimizer.ADAFACTOR:
        return torch.optim.Adafactor(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)

"""The optimizers `fit` offers, built one way everywhere (training, and the planner's memory probe)."""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """sgd is plain SGD (no momentum, no state); adamw applies decoupled weight decay."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")

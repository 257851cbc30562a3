"""slimtune: fine-tune Performer language models in memory that does not grow with sequence length.

Implements SLiM ("Sub-Linear Memory: How to Make Performers SLiM", Likhosherstov et al., NeurIPS 2021).

    import torch, slimtune

    model = slimtune.PerformerLM.from_pretrained("model.safetensors")
    plan = slimtune.plan(model, seq_len=16384, mem_budget="2GB")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for windows in slimtune.data.batches("my.txt", seq_len=16384, steps=100):
        loss = slimtune.slim_step(model, windows, chunk_size=plan.chunk_size)  # exact gradients in .grad
        opt.step(); opt.zero_grad(set_to_none=True)
    model.save_pretrained("tuned.safetensors")

The names below are loaded on first use, so `import slimtune` (and the command line's help) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_EXPORTS = {
    "SlimtuneError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "DataError": "errors",
    "OutOfBudgetError": "errors",
    "Interrupted": "errors",
    "PerformerConfig": "config",
    "PerformerLM": "pretrained",
    "Plan": "planner",
    "plan": "planner",
    "format_plan": "render",
    "plan_fit": "strategies",
    "slim_step": "slim",
    "FitOptions": "options",
    "RunPlan": "runplan",
    "FitResult": "train",
    "Trainer": "train",
    "fit": "train",
    "pretrain": "train",
    "EvalResult": "evaluation",
    "evaluate": "evaluation",
    "adapt_one_step": "evaluation",
    "generate": "generation",
}
__all__ = [
    "__version__",
    "data",
    "lora",
    "SlimtuneError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "OutOfBudgetError",
    "Interrupted",
    "PerformerConfig",
    "PerformerLM",
    "Plan",
    "plan",
    "format_plan",
    "plan_fit",
    "slim_step",
    "FitOptions",
    "RunPlan",
    "FitResult",
    "Trainer",
    "fit",
    "pretrain",
    "EvalResult",
    "evaluate",
    "adapt_one_step",
    "generate",
]


def __getattr__(name: str):
    if name in ("data", "lora"):
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import data, lora
    from .config import PerformerConfig
    from .errors import CheckpointError, ConfigError, DataError, Interrupted, OutOfBudgetError, SlimtuneError
    from .evaluation import EvalResult, adapt_one_step, evaluate
    from .generation import generate
    from .options import FitOptions
    from .planner import Plan, plan
    from .pretrained import PerformerLM
    from .render import format_plan
    from .runplan import RunPlan
    from .slim import slim_step
    from .strategies import plan_fit
    from .train import FitResult, Trainer, fit, pretrain

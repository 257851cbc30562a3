"""A predicted peak, line by line: what `planner.predict` (a training step) and `eval_plan.predict` (a no-grad
forward) return, what a plan carries to the command line, and what an out-of-budget message adds up.

Each line is bytes. The lines add up to `total`. The "planning" line is the probes' own peak where it exceeds the
rest: the process has held it already, so it is a fact, not a prediction, and a budget judges the lines without it
(`judged`). The JSON form (`to_json`) names the lines in words ("gradient batching") and adds "total".
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .units import format_size


@dataclass(frozen=True)
class Breakdown:
    planning: int = 0  # the probes' peak above the other lines; never judged against the budget

    @property
    def total(self) -> int:
        return sum(size for _, size in self.lines())

    def lines(self) -> list[tuple[str, int]]:
        """(name, bytes) of each line, in order, "planning" last."""
        named = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self) if f.name != "planning"]
        return named + [("planning", self.planning)]

    def judged(self) -> Breakdown:
        """The lines a budget's usable share must hold: all but the probes' peak."""
        return replace(self, planning=0)

    def floored(self, reached: int) -> Breakdown:
        """With the "planning" line raised to what the process already reached (`reached`, the probes' peak)."""
        return replace(self, planning=max(0, reached - self.judged().total))

    def terms(self) -> str:
        """The lines as a sum that adds up: "runtime 350 MB + ... = 1.2 GB" (zero lines left out)."""
        parts = [f"{name} {format_size(size)}" for name, size in self.lines() if size]
        return " + ".join(parts) + f" = {format_size(self.total)}"

    def to_json(self) -> dict:
        return dict(self.lines()) | {"total": self.total}

    @classmethod
    def from_json(cls, values: dict) -> Breakdown:
        return cls(**{f.name: values.get(f.name.replace("_", " "), 0) for f in fields(cls)})


@dataclass(frozen=True)
class StepBreakdown(Breakdown):
    """A training step's peak (planner.py's module docstring says what each line counts)."""

    runtime: int = 0
    data: int = 0
    gradients: int = 0
    optimizer: int = 0
    chunk: int = 0
    states: int = 0
    gradient_batching: int = 0
    copies: int = 0
    optimizer_step: int = 0
    export: int = 0


@dataclass(frozen=True)
class ForwardBreakdown(Breakdown):
    """A no-grad forward's peak (eval_plan.py's module docstring says what each line counts)."""

    runtime: int = 0
    data: int = 0
    chunk: int = 0
    states: int = 0
    windows: int = 0

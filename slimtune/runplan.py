"""The plan of a run: everything derived from the options and the machine, decided once before the first step.

`resolve_run` makes it (the planner's chunk size, weight-gradient batching and heap policy; the thread count; the
trainable parameters; the weight and compute dtypes; the world size). The Trainer consumes it, fit's and plan's
JSON report it, and the run state saves and restores it as a unit, so a resumed run continues with the
decisions the run it continues made. No lower layer re-decides any of it; the one change during a run is the
out-of-memory fallback to a smaller C, which replaces the plan's chunk size and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .choices import Heap, Precision
from .deferred import defers, use_batching
from .distributed import Group, agree_min
from .errors import OutOfBudgetError, SlimtuneError
from .options import FitOptions, chunk_request, chunk_rule
from .planner import Plan, Workload, chunk_sizes, gradient_bytes, plan_if_needed

# Where the chunk size came from: the planner's choice, a given C it checked against a given budget, a given C,
# or the run being resumed.
SOURCES = ("planned", "checked", "given", "resumed")


@dataclass(frozen=True)
class RunPlan:
    chunk_size: int  # C
    chunk_source: str  # one of SOURCES (", then out of memory" added when the fallback took a smaller C)
    batch_weight_grads: bool  # weight gradients batched over small chunks (deferred.py)
    heap: str  # CPU heap policy of the steps: "fast" or "tight" (managed), "" (glibc's own, or CUDA)
    threads: int  # CPU intra-op threads at the start (threads.LoadWatch may follow the load from there)
    device: str
    world_size: int  # processes of a torchrun group (1: one process)
    weight_dtype: str  # the weights' dtype, e.g. "float32"
    precision: Precision  # what the steps compute in: fp32 (the weights' own dtype) or bf16 (autocast)
    trainable_parameters: int  # elements of the parameters that receive gradients
    frozen_parameters: int  # elements of those that do not
    planner: Plan | None = None  # the planner's (C auto, or a given C checked against a budget)

    @property
    def compute_dtype(self) -> str:
        """ "float32", or "bfloat16" under autocast."""
        return "bfloat16" if self.precision == Precision.BF16 else self.weight_dtype

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        planner = self.planner.to_json() if self.planner is not None else None
        return values | {"precision": str(self.precision), "compute_dtype": self.compute_dtype, "planner": planner}

    @classmethod
    def from_json(cls, values: dict) -> RunPlan:
        """The RunPlan `to_json` wrote (a run state's, read back on resume)."""
        values = dict(values)
        compute = values.pop("compute_dtype", None)  # derived; a state written before `precision` has only this
        precision = values.get("precision") or (Precision.BF16 if compute == "bfloat16" else Precision.FP32)
        planner = values.get("planner")
        return cls(**values | {"precision": Precision(precision), "planner": planner and Plan.from_json(planner)})


def parameter_counts(model) -> tuple[int, int]:
    """Elements of the parameters that train, and of those that do not (a quantized map's weight among them)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    quantized = [m.quantized.shape for m in model.modules() if getattr(m, "quantized", None) is not None]
    return trainable, sum(p.numel() for p in params) - trainable + sum(o * i for o, i in quantized)


def plan_for_chunk(
    model, options: FitOptions, chunk_size: int, *, world: int = 1, source: str = "given", planner: Plan | None = None
) -> RunPlan:
    """The run plan where C is known (given, or chosen by the planner): the rest is derived here."""
    device = next(model.parameters()).device
    on_cpu_managed = device.type == "cpu" and options.heap == Heap.MANAGED
    precision = options.compute_precision
    chunk_size = min(chunk_size, options.seq_len)
    if planner is not None:  # the planner took the request into account, and counted the buffers it batches in
        batching = planner.batch_weight_grads
    else:  # what slim_step will do: batch when asked (None: whenever it can) and when it can
        batching = use_batching(
            options.batch_size, chunk_size, options.seq_len, precision.dtype, options.batch_weight_grads
        )
    heap = ((planner and planner.heap) or "fast") if on_cpu_managed else ""
    trainable, frozen = parameter_counts(model)
    return RunPlan(
        chunk_size=chunk_size,
        chunk_source=source,
        batch_weight_grads=batching,
        heap=heap,
        threads=torch.get_num_threads(),
        device=str(device),
        world_size=world,
        weight_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        precision=precision,
        trainable_parameters=trainable,
        frozen_parameters=frozen,
        planner=planner,
    )


def resolve_run(model, options: FitOptions, group: Group = Group(), *, data_bytes: int = 0) -> RunPlan:
    """Decide the run: C is planned when it is auto, and checked when it is given with a budget (OutOfBudgetError
    when it does not fit); under torchrun every rank takes the smallest C any rank can afford."""
    given = chunk_request(options.chunk_size, options.seq_len)
    device = next(model.parameters()).device
    work = Workload.of(options, data_bytes=data_bytes, copies_bytes=_copies_bytes(model, group))
    try:
        plan = plan_if_needed(
            model,
            work,
            options.mem_budget,
            given,
            resident_data=data_bytes,
            heap=options.heap,
            rule=chunk_rule(options.chunk_size),
        )
    except SlimtuneError:
        agree_min(0, device)
        raise
    if plan is None:  # a given C without a budget
        return plan_for_chunk(model, options, given, world=group.world, source="given")
    chunk_size = agree_min(plan.chunk_size, device)
    if chunk_size == 0:
        raise OutOfBudgetError(
            "another rank's `mem_budget` fits no chunk size (see its message): give it more memory",
            params=("mem_budget",),
        )
    if chunk_size != plan.chunk_size:  # the batching buffers were sized against this rank's own C
        plan = replace(plan, chunk_size=chunk_size, batch_weight_grads=False)
    source = "planned" if given is None else "checked"
    return plan_for_chunk(model, options, chunk_size, world=group.world, source=source, planner=plan)


def _copies_bytes(model, group: Group) -> int:
    """What a run holds besides weights, gradients, optimizer state and a chunk: under torchrun the all-reduce's
    flat buffer of every gradient (distributed.average_gradients)."""
    return gradient_bytes(model) if group.world > 1 else 0


def after_out_of_memory(run: RunPlan, options: FitOptions) -> RunPlan | None:
    """The plan the Trainer falls back to when a step ran out of memory anyway: the next smaller C on the grid
    (batching kept where it still applies), or None at C = 1."""
    L = options.seq_len
    smaller = [c for c in chunk_sizes(L) if c < min(run.chunk_size, L)]
    if not smaller:
        return None
    batching = run.batch_weight_grads and defers(options.batch_size, smaller[-1], L, run.precision.dtype)
    return replace(
        run,
        chunk_size=smaller[-1],
        chunk_source=f"{run.chunk_source}, then out of memory",
        batch_weight_grads=batching,
    )

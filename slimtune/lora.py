"""LoRA: low-rank adapters on a Performer's linear maps (CONTRACT.md section 4; Hu et al. 2021).

`add(model, rank=R, alpha=A, targets=...)` freezes every base parameter and gives each target map two fp32
matrices, `lora_A` [R, in] (initialised like torch.nn.Linear's weight, from a seeded generator) and `lora_B`
[out, R] (zeros), so the map computes `W x + b + (A / R) lora_B lora_A x` and an untrained adapter changes
nothing. The base's parameters keep their names: a map `P` holds `P.weight`, `P.bias`, `P.lora_A.weight` and
`P.lora_B.weight`. SLiM needs nothing special: the adapters are ordinary parameters on the chunk's graph, the
frozen base maps get no weight gradient (and no batching buffer, slimtune/deferred.py), and x's gradient flows
through both. On a frozen base each adapted map is one autograd node (`_FrozenBaseLora`; a LoRA step went from
0.90x to 0.82x of a full step, benchmarks/RESULTS.md).

`merge` folds the adapters into the weights; `merged_weight` does it for an export, one target weight of the input
checkpoint at a time (`W + (A / R) lora_B @ lora_A` in fp32, cast to W's dtype; every other tensor is exported bit
for bit the input's). `save_adapter` / `load_adapter` read and write PEFT's format.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .choices import LORA_ALPHA_PER_RANK, LORA_DEFAULT_TARGETS, LORA_TARGETS
from .deferred import DeferredLinear
from .errors import CheckpointError, ConfigError
from .options import lora_targets
from .quant import FORMATS, hold_quantized, quantize, quantized_lora_linear

__all__ = ["TARGETS", "DEFAULT_TARGETS", "add", "merge", "adapted", "save_adapter", "load_adapter"]

TARGETS, DEFAULT_TARGETS = LORA_TARGETS, LORA_DEFAULT_TARGETS  # every linear map of every layer by default
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraLinear(DeferredLinear):
    """A linear map with a low-rank adapter: `W x + b + (alpha / rank) lora_B(lora_A(x))`. It takes the base map's
    weight and bias (the same Parameters, under the same names)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.quantized = getattr(base, "quantized", None)  # a quantized base (quant.hold_quantized): weight None
        self.rank, self.alpha = rank, float(alpha)
        held = base.weight if base.weight is not None else self.quantized.scales
        # fp32 (a float64 model, as in the tests, keeps float64)
        dtype = torch.float64 if held.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
        # torch.nn.Linear's own weight initialisation (Kaiming-uniform, a = sqrt(5)), drawn from `generator`.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(held.device)
        self.lora_B.to(held.device)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return quantized_lora_linear(
                x, self.quantized, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling
            )
        if _fused(self, x):
            return _FrozenBaseLora.apply(
                x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling
            )
        y = super().forward(x)
        own = self.lora_A.weight.dtype
        a = self.lora_A(x if x.dtype == own or torch.is_autocast_enabled(x.device.type) else x.to(own))
        a, b_t = a.reshape(-1, self.rank).to(y.dtype), self.lora_B.weight.t().to(y.dtype)
        if self.defers(x):  # the batcher's hook on y must see y's own gradient: added out of place
            return torch.addmm(y.view(-1, y.shape[-1]), a, b_t, alpha=self.scaling).view(y.shape)
        # y += (alpha / rank) a lora_B^T, in place: nothing saves the map's output for backward, and
        # `y + s * lora_B(a)` made three more output-sized tensors (the product, its scaling, the sum).
        y.view(-1, y.shape[-1]).addmm_(a, b_t, alpha=self.scaling)
        return y

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(alpha / rank) lora_B @ lora_A in `dtype` (fp32): what merging adds to the weight. Scaled in place: one
        weight-sized tensor, not two."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)).mul_(self.scaling)


def _fused(m: LoraLinear, x: torch.Tensor) -> bool:
    """Whether the map runs as one _FrozenBaseLora: a frozen base, everything in one dtype, no autocast. Under
    no_grad too (SLiM's forward sweep), where it records nothing and does the forward's three products."""
    w = m.weight
    return (
        not w.requires_grad
        and (m.bias is None or not m.bias.requires_grad)
        and x.dtype == w.dtype == m.lora_A.weight.dtype == m.lora_B.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


class _FrozenBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen, as one autograd node. Autograd on the plain path makes
    six nodes per map and sums the input gradient's two parts in a separate pass; here backward is four products:
    gB = g B, dx = g W + s gB A (the second added in place), dA = s gB^T x, dB = s g^T (x A^T)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        a = x2 @ lora_a.t()
        y.addmm_(a, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, weight, lora_a, lora_b, a = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])
        # Each product in the layout that runs fastest on CPU (oneDNN): a rank-R operand on the left. g2 @ lora_b
        # and g2^T @ a, the obvious ones, took 1.7x and 5x longer for a 2048-wide map.
        gb_t = lora_b.t() @ g2.t()  # [R, N]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ weight).addmm_(gb_t.t(), lora_a, alpha=s).view(ctx.shape)
        da = (gb_t @ x2).mul_(s) if ctx.needs_input_grad[3] else None
        db = (a.t() @ g2).mul_(s).t() if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None


def parse_targets(targets: str | Iterable[str] | None) -> tuple[str, ...]:
    """A comma list (or a sequence) of target module names, checked; None: the default (every layer's maps)."""
    return DEFAULT_TARGETS if targets is None else lora_targets(targets)


def check(rank: int, alpha: float | None) -> float:
    """alpha for `rank` (default 2 * rank), checked."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"`lora_rank` must be an integer >= 1, got {rank!r}", params=("lora_rank",))
    alpha = LORA_ALPHA_PER_RANK * rank if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"`lora_alpha` must be a positive number, got {alpha!r}", params=("lora_alpha",))
    return alpha


def _linear_maps(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, map) of every linear map in `model`, listed before any is replaced."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                yield module, attr, child


def add(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: str | Iterable[str] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Freeze every parameter of `model` and put a LoRA adapter on each target map, in place; returns the model.

    Args:
        rank: R >= 1. alpha: the scale numerator (default 2R); the adapter adds (alpha / R) lora_B lora_A x.
        targets: module names out of TARGETS (a comma list or a sequence); default: every layer's maps.
        seed: seeds lora_A's initialisation (map by map, in the model's order); lora_B starts at zeros.

    Example:
        slimtune.lora.add(model, rank=8)
        loss = slim_step(model, windows, chunk_size=256)  # gradients in the adapters only
    """
    alpha = check(rank, alpha)
    targets = parse_targets(targets)
    if adapted(model):
        raise ConfigError("the model already has LoRA adapters: merge them first (slimtune.lora.merge)")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for parent, attr, child in _linear_maps(model):
        if attr in targets:
            setattr(parent, attr, LoraLinear(child, rank, alpha, generator))
    return model


def adapters(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted maps by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapted(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def settings(model: nn.Module) -> dict:
    """rank, alpha and target names of an adapted model (empty when it has none)."""
    maps = adapters(model)
    if not maps:
        return {}
    first = next(iter(maps.values()))
    names = sorted({name.rsplit(".", 1)[-1] for name in maps}, key=TARGETS.index)
    return {"rank": first.rank, "alpha": first.alpha, "targets": names}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its map's weight (in fp32, cast back to the weight's dtype) and remove it, in
    place; the base's parameters stay frozen. Returns the model."""
    if quantized(model):
        raise ConfigError("a quantized base has no weights in memory to merge into: export it (save_pretrained)")
    for parent, attr, child in _linear_maps(model):
        if isinstance(child, LoraLinear):
            wide = torch.promote_types(torch.float32, child.weight.dtype)  # fp32, or float64's own
            with torch.no_grad():
                child.weight.copy_((child.weight.to(wide) + child.delta(wide)).to(child.weight.dtype))
            has_bias = child.bias is not None
            plain = DeferredLinear(child.in_features, child.out_features, bias=has_bias, device="meta")
            plain.weight, plain.bias = child.weight, child.bias
            setattr(parent, attr, plain)
    return model


def merged_weight(m: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    """The export of target map `m`'s weight against `weight`, the input checkpoint's (in its dtype, on the host):
    W + (alpha / R) lora_B @ lora_A computed in fp32 and cast to W's dtype. Its one fp32 temporary is the delta, to
    which W is added in place (the same sum, bit for bit, as W + delta)."""
    with torch.no_grad():
        merged = m.delta().to(weight.device)  # [out, in] fp32; on a GPU the delta is made there and copied
        # bf16 and fp16 widen to fp32 exactly inside the add, without an fp32 copy of W; fp64 is rounded to fp32 first
        merged.add_(weight if weight.dtype.itemsize <= 4 else weight.float())
    return merged.to(weight.dtype)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names (base_model.model.P.lora_A.weight, ...), on the CPU."""
    return {
        f"{PEFT_PREFIX}{name}.{part}.weight": getattr(m, part).weight.detach().to("cpu", torch.float32).contiguous()
        for name, m in adapters(model).items()
        for part in ("lora_A", "lora_B")
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the adapters alone in PEFT's format: DIR/adapter_config.json and DIR/adapter_model.safetensors
    (atomically: a crash leaves the previous folder or the new one). Returns the folder."""
    from safetensors.torch import save_file

    found = settings(model)
    if not found:
        raise ConfigError("the model has no LoRA adapters to save: add them with slimtune.lora.add")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": found["rank"],
        "lora_alpha": found["alpha"],
        "target_modules": found["targets"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    metadata = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    folder = Path(folder)
    with atomic_write(folder, folder=True) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(adapter_state(model), str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, trainable: bool = False) -> nn.Module:
    """Put the adapter saved in `folder` (PEFT's format) onto `model`, in place; returns the model. The base is
    frozen; `trainable`: the adapters train on (else they are frozen too, for evaluation or generation)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{folder} is not a readable adapter folder ({e}): give the folder `adapter_out` wrote"
        ) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    targets = [t.rsplit(".", 1)[-1] for t in config.get("target_modules", [])]
    add(model, rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets)
    maps = adapters(model)
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight" for name in maps for part in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(
            f"{folder}: the adapter does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, m in maps.items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(m, part).weight
                saved = tensors[f"{PEFT_PREFIX}{name}.{part}.weight"]
                if saved.shape != weight.shape:
                    raise CheckpointError(
                        f"{folder}: {name}.{part} has shape {list(saved.shape)}, expected {list(weight.shape)}"
                    )
                weight.copy_(saved)
                weight.requires_grad_(trainable)
    return model


LAYER_MAPS = TARGETS[:5]  # the layers' linear maps: what a frozen base keeps in its own dtype


def in_base_dtype(name: str) -> bool:
    """Whether the checkpoint tensor `name` is one a frozen base keeps in its dtype: the weight or bias of a layer's
    linear map (not the embedding, a layer norm, the output map or an adapter)."""
    parts = name.split(".")
    return parts[0] == "layers" and len(parts) >= 3 and parts[-2] in LAYER_MAPS and parts[-1] in ("weight", "bias")


def read_dtypes(base):
    """What each checkpoint tensor is read into for a frozen base held in `base` (load_checkpoint's `dtype`): a
    torch.dtype for the layers' linear maps (weights and biases), or a quantized format for their weights (biases
    fp32, CONTRACT.md section 4); the rest fp32. The base never sits in memory in fp32."""
    quantized = isinstance(base, str)

    def dtype_for(name: str):
        if not in_base_dtype(name):
            return torch.float32
        return torch.float32 if quantized and not name.endswith(".weight") else base

    return dtype_for


def freeze_base_to(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights and biases of the layers' linear maps in `dtype` (bf16: 2 bytes a value); the
    embedding, the layer norms, the output map and the adapters stay as they are (a few percent of the weights,
    and what the attention states' dtype follows). Returns the bytes saved."""
    saved, converted = 0, set()
    for name, p in model.named_parameters():
        if in_base_dtype(name) and not p.requires_grad and p.dtype != dtype:
            saved += p.numel() * (p.element_size() - dtype.itemsize)
            p.data = p.data.to(dtype)
            converted.add(p)
    if converted:
        # The weights a checkpoint was loaded into still map its file (safetensors reads zero-copy); one tensor
        # left on the mapping keeps all of it resident. The few the conversion kept get memory of their own, so
        # the mapping goes (d 64 x 1 layer, 67 MB of weights: 64 MB less resident). fit reads such a base with
        # read_dtypes instead, and nothing is left to convert here.
        for p in model.parameters():
            if p not in converted:
                p.data = p.data.clone()
    return saved


def quantize_base(model: nn.Module, fmt: str) -> int:
    """Store the frozen weights of every layer's linear maps (q, k, v, U, V) in `fmt` ("int8" or "nf4", quant.py),
    one map at a time, in place: each map then computes with its weight dequantized for each product (biases, the
    embedding, the layer norms, the output map and the adapters stay as they are). A map held in the other format
    is quantized again from its dequantized weight (`slimtune plan` compares the two on one model). Returns the
    bytes saved."""
    if fmt not in FORMATS:
        raise ConfigError(f"quantized formats are {', '.join(FORMATS)}, got {fmt!r}", params=("base_dtype",))
    saved = 0
    for _, attr, child in _linear_maps(model):
        held = getattr(child, "quantized", None)
        if attr not in LAYER_MAPS or (held is not None and held.format == fmt):
            continue
        weight = held.dequantize() if held is not None else child.weight
        if held is None and weight.requires_grad:
            continue
        before = held.nbytes if held is not None else weight.numel() * weight.element_size()
        q = quantize(weight, fmt)
        saved += before - q.nbytes
        if held is not None:
            child.quantized = q
        else:
            hold_quantized(child, q)
    if saved:  # as in freeze_base_to: what stays gets memory of its own, so a checkpoint's mapping can go
        for p in model.parameters():
            p.data = p.data.clone()
    return saved


def quantized(model: nn.Module) -> bool:
    """Whether some map of `model` holds its weight quantized (quantize_base)."""
    return any(getattr(m, "quantized", None) is not None for m in model.modules())

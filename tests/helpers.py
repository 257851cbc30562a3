"""Shared test helpers: one tolerance check, small model builders, a safetensors file's layout."""

import json
from pathlib import Path

import torch

from slimtune.checkpoint import save_checkpoint
from slimtune.pretrained import PerformerConfig, PerformerLM


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| (absolute when e is all zeros), computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.norm().item()
    diff = (a - e).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    err = rel_err(torch.as_tensor(actual), torch.as_tensor(expected))
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def tiny_model(feature_type="sqr", on_gptln=True, dtype=torch.float64, seed=0, **sizes) -> PerformerLM:
    cfg = dict(vocab_size=256, hidden_dim=16, n_layers=2, ffn_dim=32, n_heads=2)
    cfg.update(sizes)
    torch.manual_seed(seed)
    model = PerformerLM(PerformerConfig(feature_type=feature_type, on_gptln=on_gptln, **cfg)).to(dtype)
    model.redraw_features(torch.Generator().manual_seed(seed + 1))
    return model


def save_model(path, model: PerformerLM):
    """Write `model` as a contract checkpoint at `path`; returns the path."""
    save_checkpoint(path, {k: v.contiguous() for k, v in model.state_dict().items()}, model.config)
    return path


def safetensors_layout(path):
    """A safetensors file as (header length, tensor entries in header order, metadata, data bytes): what two files
    must share to be the same but for the metadata's key order."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n], object_pairs_hook=list)
    entries = [(name, info) for name, info in header if name != "__metadata__"]
    return n, entries, dict(dict(header)["__metadata__"]), raw[8 + n :]


def projections(model: PerformerLM):
    draws = [layer.attention.projection for layer in model.layers]
    return None if draws[0] is None else draws


def a_plan(**values):
    """A planner's Plan with the given fields and neutral others: for code that reads a plan (the run plan, the
    Trainer), tested without probing a model."""
    from slimtune.breakdown import StepBreakdown
    from slimtune.planner import Plan

    neutral = dict(chunk_size=8, budget_bytes=1, available_bytes=1, available_source="", device="cpu", seq_len=64,
                   batch_size=1, optimizer="adam", predicted_peak_bytes=0, breakdown=StepBreakdown())  # fmt: skip
    return Plan(**neutral | values)

"""Sampling a continuation in recurrent mode: the prompt runs chunk by chunk, then each new byte is one step
from the carried states, so memory per new byte is O(1) whatever the length."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .model import PerformerLM


@torch.no_grad()
def generate(
    model: PerformerLM,
    prompt: bytes,
    n_bytes: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    chunk_size: int = 1024,
    generator: torch.Generator | None = None,
) -> bytes:
    """`n_bytes` bytes sampled after `prompt` (temperature 0: greedy)."""
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one byte of text to continue")
    if n_bytes < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError(f"need --bytes >= 0, --temperature >= 0 and --top-k >= 1, got {n_bytes}, {temperature}, {top_k}")
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt), device=device)[None]
    states = model.initial_states(1, dtype=torch.float64)
    for s in range(0, ids.shape[1], chunk_size):
        logits, states = model.forward_chunk(ids[:, s : s + chunk_size], s, states)
    position, out = ids.shape[1], []
    for _ in range(n_bytes):
        last = logits[0, -1].float()
        if temperature == 0:
            token = int(last.argmax())
        else:
            if top_k is not None:
                cutoff = last.topk(min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < cutoff, float("-inf"))
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        logits, states = model.forward_chunk(torch.tensor([[token]], device=device), position, states)
        position += 1
    return bytes(out)

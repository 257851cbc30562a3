"""Sampling a continuation in recurrent mode: the prompt runs chunk by chunk, then each new byte is one step
from the carried states, so memory per new byte is O(1) whatever the length."""

from __future__ import annotations

import torch

from .data import check_vocabulary
from .errors import ConfigError
from .model import PerformerLM


@torch.no_grad()
def generate(
    model: PerformerLM,
    prompt: bytes | str,
    n_bytes: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    chunk_size: int = 1024,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> bytes:
    """Sample a continuation of `prompt` in recurrent mode.

    Args:
        model: the model; prompt: bytes (or text, encoded as UTF-8) to continue; n_bytes: how many to sample.
        temperature: 0 is greedy; top_k: sample among the k likeliest bytes.
        generator or seed: the random numbers (a seed also fixes a FAVOR+ model's feature draw).

    Returns:
        The `n_bytes` sampled bytes (without the prompt).

    Example:
        text = slimtune.generate(model, "Day 12: wind", 300, seed=0).decode("utf-8", errors="replace")
    """
    if isinstance(prompt, str):
        prompt = prompt.encode()
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one byte of text to continue")
    if n_bytes < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError(
            f"need `n_bytes` >= 0, `temperature` >= 0 and `top_k` >= 1, got {n_bytes}, {temperature}, {top_k}",
            params=("n_bytes", "temperature", "top_k"),
        )
    prompt_ids = torch.tensor(list(prompt), dtype=torch.uint8)
    check_vocabulary(prompt_ids, model.config.vocab_size, "the prompt")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        model.redraw_features(generator)
    device = next(model.parameters()).device
    ids = prompt_ids.to(device=device, dtype=torch.long)[None]
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
        if token > 255:  # a larger vocabulary than bytes: such ids have no byte to show
            raise ConfigError(f"the model sampled id {token}, which is no byte: generate works with byte-level models")
        out.append(token)
        logits, states = model.forward_chunk(torch.tensor([[token]], device=device), position, states)
        position += 1
    return bytes(out)

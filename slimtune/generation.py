"""Sampling a continuation in recurrent mode: the prompt runs chunk by chunk, at the largest chunk size whose peak
fits the memory budget (eval_plan.py), then each new byte is one step from the carried states, so memory per new
byte is O(1) whatever the length."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .data import BYTE_VOCAB, check_tokenizer, check_vocabulary, load_tokenizer
from .errors import ConfigError
from .eval_plan import ForwardPlan, ForwardWork, plan_forward_if_needed, run_heap
from .options import chunk_request
from .pretrained import PerformerLM


def prompt_pass(model: PerformerLM, ids: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ids [B, T] from position 0, `chunk_size` tokens at a time. Returns (the last position's logits [B, V],
    the states after it)."""
    hidden, states = model.hidden_pass(ids, chunk_size)
    return model.output_logit_map(hidden[:, -1]), states  # only the last position's logits [B, V] are made


@torch.no_grad()
def generate(
    model: PerformerLM,
    prompt: bytes | str,
    n_bytes: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    chunk_size: int | str | None = "auto",
    mem_budget: int | str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    on_plan: Callable[[ForwardPlan | None], None] | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> bytes:
    """Sample a continuation of `prompt` in recurrent mode.

    Args:
        model: the model; prompt: bytes (or text, encoded as UTF-8) to continue; n_bytes: how many tokens to
            sample (bytes for a byte-level model).
        temperature: 0 is greedy; top_k: sample among the k likeliest bytes.
        chunk_size: the prompt's tokens run at a time: "auto" (or None) plans the largest C whose peak fits
            `mem_budget` (eval_plan.py); "full" or an integer is taken as it is (checked against a given budget).
        mem_budget: everything the process may hold (bytes, "1GB", "80%"); None: the available memory less a margin.
        generator or seed: the random numbers (a seed also fixes a FAVOR+ model's feature draw).
        on_plan: called with the prompt's plan (None where C was given without a budget).
        tokenizer: a tokenizer.json that encodes the prompt and decodes the sample (needed when the model's
            vocabulary is not 256 bytes).

    Returns:
        The sampled bytes (without the prompt): the tokens themselves, or the tokenizer's decoded text as UTF-8.

    Raises:
        OutOfBudgetError: the budget cannot fit the prompt even at C = 1, or a given C does not fit it.

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
    encoder = _encoder(tokenizer, model.config.vocab_size)
    if encoder is None:
        prompt_ids = torch.tensor(list(prompt), dtype=torch.uint8)
    else:
        prompt_ids = torch.tensor(encoder.encode(prompt.decode("utf-8", "replace"), add_special_tokens=False).ids)
        if not prompt_ids.numel():
            raise ConfigError("the prompt encodes to no token: give more text to continue", params=("prompt",))
    check_vocabulary(prompt_ids, model.config.vocab_size, "the prompt")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        model.redraw_features(generator)
    device = next(model.parameters()).device
    ids = prompt_ids.to(device=device, dtype=torch.long)[None]
    given = chunk_request(chunk_size, ids.shape[1])
    work = ForwardWork(ids.shape[1], 1, prompt_ids.numel() * (1 + ids.element_size()))  # the prompt, twice
    forward = lambda windows, c: prompt_pass(model, windows[:, :-1], c)  # noqa: E731
    plan = plan_forward_if_needed(model, work, mem_budget, forward, chunk_size=given)
    if on_plan:
        on_plan(plan)
    with run_heap(plan):
        last, states = prompt_pass(model, ids, plan.chunk_size if plan else given)
    position, out = ids.shape[1], []
    for _ in range(n_bytes):
        last = last[0].float()
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
        last = logits[:, -1]
        position += 1
    return bytes(out) if encoder is None else encoder.decode(out).encode()


def _encoder(tokenizer, vocab_size: int):
    """The tokenizer that encodes prompts for a model whose vocabulary is not bytes (None: a byte-level model's
    prompt is its bytes)."""
    if tokenizer is not None:
        encoder = load_tokenizer(tokenizer)
        check_tokenizer(encoder, vocab_size, tokenizer)
        return encoder
    if vocab_size > BYTE_VOCAB:  # a smaller vocabulary reads the bytes below it (the copy task's symbols)
        raise ConfigError(
            f"the model's vocabulary has {vocab_size} ids, not {BYTE_VOCAB} bytes: give the `tokenizer` it was "
            "trained with, which encodes the prompt and decodes the sample",
            params=("tokenizer",),
        )
    return None

"""Causal linear attention with a carried state (the Performer's prefix-sum attention, SLiM paper section 2).

Position t of one head reads the prefix sums of everything up to and including itself:

    out_t = phi(q_t) . S_t / (phi(q_t) . z_t + 1e-16),   S_t = S_0 + sum_{s<=t} phi(k_s) v_s^T,
                                                          z_t = z_0 + sum_{s<=t} phi(k_s).

The state is held as one tensor [B, H, M, D + 1] whose last column is z: appending a column of ones to v
turns the normaliser into one more value column, so one code path computes both.

`causal_linear_attention` is the fast form: it cuts the sequence into blocks of b tokens and never builds the
per-token outer products phi(k_s) v_s^T ([T, M, D] per head). Inside a block it uses the masked quadratic form
tril(phi(Q) phi(K)^T) V; across blocks it carries the state. Autograd then saves the block's scores [b, b] and
one state per block, T / b states in all. `naive_causal_linear_attention` is its twin with explicit prefix sums
(O(T M D) memory), for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-16  # added to the normaliser, as in the reference code
BLOCK_SIZE = 64  # tokens per block of the quadratic in-block form


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, T, D + 1]: the extra column of ones accumulates the normaliser z."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, T, E] -> [B, H, n, block, E], zero-padding the end; zero features add nothing to any state."""
    B, H, T, E = x.shape
    x = F.pad(x, (0, 0, 0, (-T) % block))
    return x.view(B, H, -1, block, E)


def _block_sums(fk: torch.Tensor, v1: torch.Tensor, block: int) -> torch.Tensor:
    """Each block's own contribution phi(K_blk)^T [V_blk, 1]: [B, H, n, M, D + 1]."""
    kb = _blocks(fk, block)
    return kb.transpose(-1, -2) @ _blocks(v1, block)


def state_contribution(fk: torch.Tensor, v: torch.Tensor, *, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """What a chunk adds to the state, sum_s phi(k_s) [v_s, 1]^T: [B, H, M, D + 1].

    Computed with exactly the operations `causal_linear_attention` uses for its final state, so that
    `final_state - state_contribution(...)` undoes the chunk bit for bit when the state is kept in float64.
    """
    if fk.shape[2] <= block_size:  # one block, as in causal_linear_attention
        return fk.transpose(-1, -2) @ _with_ones(v)
    return _block_sums(fk, _with_ones(v), block_size).cumsum(2)[:, :, -1]


def causal_linear_attention(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: torch.Tensor, *, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise causal linear attention.

    fq, fk: [B, H, T, M] features of queries and keys; v: [B, H, T, D]; state: [B, H, M, D + 1], the prefix
    sums before the first token (zeros at the start of a sequence). The state may be kept in a wider dtype
    than the features (float64 under fp32): it is then added to in that dtype.
    Returns (out [B, H, T, D], final_state [B, H, M, D + 1] in the state's dtype).
    """
    B, H, T, _ = fq.shape
    D = v.shape[-1]
    v1 = _with_ones(v)
    if T <= block_size:  # one block (every chunk of a small C): no padding and no prefix over blocks
        num_den = (fq @ fk.transpose(-1, -2)).tril() @ v1 + fq @ state.to(fq.dtype)
        out = num_den[..., :D] / (num_den[..., D:] + EPS)
        return out, state + (fk.transpose(-1, -2) @ v1).to(state.dtype)
    block = block_size
    qb, kb, vb = _blocks(fq, block), _blocks(fk, block), _blocks(v1, block)  # [B, H, n, b, .]
    within = (qb @ kb.transpose(-1, -2)).tril() @ vb  # [B, H, n, b, D + 1], each token's own block
    sums = (kb.transpose(-1, -2) @ vb).cumsum(2)  # [B, H, n, M, D + 1], inclusive prefix over blocks
    before = torch.cat([torch.zeros_like(sums[:, :, :1]), sums[:, :, :-1]], dim=2)  # exclusive prefix
    carried = state.to(fq.dtype).unsqueeze(2) + before  # the state each block starts from: n states kept
    num_den = (within + qb @ carried).reshape(B, H, -1, D + 1)[:, :, :T]
    out = num_den[..., :D] / (num_den[..., D:] + EPS)
    return out, state + sums[:, :, -1].to(state.dtype)


def naive_causal_linear_attention(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference twin of `causal_linear_attention`: explicit per-token prefix sums, O(T M D) memory."""
    D = v.shape[-1]
    outer = fk.unsqueeze(-1) * _with_ones(v).unsqueeze(-2)  # [B, H, T, M, D + 1]
    prefix = state.to(fq.dtype).unsqueeze(2) + outer.cumsum(2)
    num_den = (fq.unsqueeze(-1) * prefix).sum(-2)  # [B, H, T, D + 1]
    out = num_den[..., :D] / (num_den[..., D:] + EPS)
    return out, state + outer.sum(2).to(state.dtype)

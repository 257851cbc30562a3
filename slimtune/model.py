"""The Performer language model of CONTRACT.md section 1, in the layout of the SLiM paper's reference code.

The one definition of the math is the chunk-level forward: `forward_chunk(ids, start, states)` runs a chunk
of tokens at absolute positions start, start + 1, ... from per-layer attention states and returns the logits
and the states after the chunk. The full-sequence forward is one chunk from zero states; SLiM runs many.
Each layer is split into `features` (queries, keys, values and their feature maps) and `mix` (attention from
a state, then the feed-forward block), so that SLiM can recover a layer's start state between the two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal_linear_attention, state_contribution
from .deferred import DeferredLinear as Linear  # nn.Linear whose weight gradient SLiM may batch over chunks
from .errors import ConfigError
from .features import apply_features, draw_orthogonal_features, favor_multiplier, feature_dim

LN_EPS = 1e-5


@dataclass(frozen=True)
class PerformerConfig:
    vocab_size: int = 256  # V; 256 for byte-level text
    hidden_dim: int = 256  # d; a multiple of 4 (E has d/2 columns, sin and cos d/4 each) and of n_heads
    n_layers: int = 3  # number of Performer layers
    ffn_dim: int = 1024  # F, the feed-forward width
    n_heads: int = 4  # H; head size d_h = d / H
    feature_type: str = "sqr"  # phi: sqr, relu, elu+1, abs, favor+ or favor+_N
    on_gptln: bool = True  # True: post layer norm (x + LN(f(x))), the reference default; False: pre

    def __post_init__(self):
        for name in ("vocab_size", "hidden_dim", "n_layers", "ffn_dim", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config {name} must be a positive integer, got {value!r}")
        if self.hidden_dim % 4:
            raise ConfigError(f"hidden_dim {self.hidden_dim} must be a multiple of 4 (embedding, sin and cos parts)")
        if self.hidden_dim % self.n_heads:
            raise ConfigError(
                f"hidden_dim {self.hidden_dim} is not divisible by n_heads {self.n_heads}: pick a head count that divides it"
            )
        if not isinstance(self.on_gptln, bool):
            raise ConfigError(f"config on_gptln must be true or false, got {self.on_gptln!r}")
        feature_dim(self.feature_type, self.head_dim)  # raises on an unknown feature type

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def n_features(self) -> int:
        """M, the feature dimension of each head's state."""
        return feature_dim(self.feature_type, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PerformerConfig":
        """Build from a checkpoint's config, ignoring keys that are not model settings (seq_len, provenance)."""
        names = {f.name for f in fields(cls)}
        missing = names - values.keys()
        if missing:
            raise ConfigError(f"model config lacks {', '.join(sorted(missing))}: add them to slimtune_config")
        return cls(**{k: values[k] for k in names})


class PerformerAttention(nn.Module):
    """Multi-head causal linear attention; no output projection (as in the reference)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.q_map, self.k_map, self.v_map = Linear(d, d), Linear(d, d), Linear(d, d)
        # FAVOR+ draw W: [M, d_h]; not part of the state_dict, so checkpoints keep the reference's names.
        self.register_buffer("projection", None, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # [B, T, d] -> [B, H, T, d_h]
        return x.view(B, T, self.config.n_heads, self.config.head_dim).transpose(1, 2)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, d] -> phi(q), phi(k): [B, H, T, M], and v: [B, H, T, d_h]."""
        phi = lambda y: apply_features(self._heads(y), self.config.feature_type, self.projection)  # noqa: E731
        return phi(self.q_map(x)), phi(self.k_map(x)), self._heads(self.v_map(x))


class PerformerLayer(nn.Module):
    def __init__(self, config: PerformerConfig):
        super().__init__()
        d = config.hidden_dim
        self.post_norm = config.on_gptln
        self.attention = PerformerAttention(config)
        self.U_map = Linear(d, config.ffn_dim)
        self.V_map = Linear(config.ffn_dim, d)
        self.layernorm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.layernorm2 = nn.LayerNorm(d, eps=LN_EPS)

    def features(self, x: torch.Tensor):
        """The attention's (phi(q), phi(k), v) for this layer's input x: [B, T, d]."""
        return self.attention.features(x if self.post_norm else self.layernorm1(x))

    def mix(self, x, fq, fk, v, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention from `state` ([B, H, M, d_h + 1]) and the feed-forward block: (x [B, T, d], new state)."""
        out, state = causal_linear_attention(fq, fk, v, state)
        B, H, T, Dh = out.shape
        out = out.transpose(1, 2).reshape(B, T, H * Dh)
        if self.post_norm:
            x = x + self.layernorm1(out)
            return x + self.layernorm2(self.V_map(F.gelu(self.U_map(x)))), state
        x = x + out
        return x + self.V_map(F.gelu(self.U_map(self.layernorm2(x)))), state

    def forward(self, x, state):
        return self.mix(x, *self.features(x), state)

    def advance(self, x, state) -> torch.Tensor:
        """Only the state after this chunk (needs k and v, not q, attention or the feed-forward block)."""
        _, fk, v = self.features(x)
        return state + state_contribution(fk, v).to(state.dtype)


class PerformerLM(nn.Module):
    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.input_map = nn.Embedding(config.vocab_size, d // 2)
        self.layers = nn.ModuleList(PerformerLayer(config) for _ in range(config.n_layers))
        self.output_logit_map = Linear(d, config.vocab_size)

    def initial_states(self, batch_size: int, *, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zero attention states, one [B, H, M, d_h + 1] per layer (last column: the normaliser z)."""
        c = self.config
        ref = self.output_logit_map.weight
        shape = (batch_size, c.n_heads, c.n_features, c.head_dim + 1)
        return [torch.zeros(shape, dtype=dtype or ref.dtype, device=ref.device) for _ in self.layers]

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw new FAVOR+ features for every layer (a no-op for elementwise maps). Call once per training step:
        every chunk of a step must see the same draw."""
        c = self.config
        if favor_multiplier(c.feature_type) is None:
            return
        ref = self.output_logit_map.weight
        for layer in self.layers:
            w = draw_orthogonal_features(c.n_features, c.head_dim, generator=generator)
            layer.attention.projection = w.to(device=ref.device, dtype=ref.dtype)

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids: [B, T] at positions start.. -> x: [B, T, d] = [E[id], sin(p w), cos(p w)]."""
        # Angles in float64 whatever the model's dtype: p * w loses digits in fp32 at long positions.
        half = self.config.hidden_dim // 2
        w = torch.exp(torch.arange(0, half, 2, device=ids.device, dtype=torch.float64) * (-math.log(10000.0) / half))
        positions = torch.arange(start, start + ids.shape[1], device=ids.device, dtype=torch.float64)
        angles = (positions[:, None] * w).to(self.output_logit_map.weight.dtype)
        tok = self.input_map(ids)
        pos = torch.cat([angles.sin(), angles.cos()], dim=-1).expand(ids.shape[0], -1, -1)
        return torch.cat([tok, pos], dim=-1)

    def forward_chunk(self, ids: torch.Tensor, start: int, states: list[torch.Tensor]):
        """ids: [B, T] at positions start..start+T-1; states: per layer [B, H, M, d_h + 1].
        Returns (logits [B, T, V], states after the chunk)."""
        x = self.embed(ids, start)
        new_states = []
        for layer, state in zip(self.layers, states):
            x, state = layer(x, state)
            new_states.append(state)
        return self.output_logit_map(x), new_states

    def advance(self, ids: torch.Tensor, start: int, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The states after the chunk, doing only the work they depend on: no logits, and in the last layer
        only its keys and values."""
        x = self.embed(ids, start)
        *body, last = self.layers
        new_states = []
        for layer, state in zip(body, states):
            x, state = layer(x, state)
            new_states.append(state)
        return new_states + [last.advance(x, states[-1])]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [B, T, V] for ids [B, T] starting at position 0."""
        return self.forward_chunk(ids, 0, self.initial_states(ids.shape[0]))[0]

"""The Performer's configuration (docs/format.md): sizes, feature map and layer-norm placement, as stored in a
checkpoint's `slimtune_config` metadata."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

ELEMENTWISE_NAMES = ("sqr", "relu", "elu+1", "abs")  # phi applied elementwise (features.py); M = d_h
_FAVOR = re.compile(r"^favor\+(?:_(\d+))?$")


def favor_multiplier(feature_type: str) -> int | None:
    """N for `favor+_N` (1 for `favor+`), None for an elementwise map; raises ConfigError if unknown."""
    if feature_type in ELEMENTWISE_NAMES:
        return None
    match = _FAVOR.match(feature_type)
    if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
        raise ConfigError(
            f"unknown feature type {feature_type!r}: use one of sqr, relu, elu+1, abs, favor+, favor+_N (N >= 1)"
        )
    return int(match.group(1) or 1)


def feature_dim(feature_type: str, head_dim: int) -> int:
    """M, the number of features per head."""
    multiplier = favor_multiplier(feature_type)
    return head_dim if multiplier is None else multiplier * head_dim


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
                f"hidden_dim {self.hidden_dim} is not divisible by n_heads {self.n_heads}: "
                "pick a head count that divides it"
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
    def from_dict(cls, values: dict) -> PerformerConfig:
        """Build from a checkpoint's config, ignoring keys that are not model settings (seq_len, provenance)."""
        names = {f.name for f in fields(cls)}
        missing = names - values.keys()
        if missing:
            raise ConfigError(f"model config lacks {', '.join(sorted(missing))}: add them to slimtune_config")
        return cls(**{k: values[k] for k in names})

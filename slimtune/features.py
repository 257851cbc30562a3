"""Feature maps phi of the Performer's linear attention (docs/format.md; CONTRACT.md section 1).

`sqr`, `relu`, `elu+1` and `abs` are elementwise, so the feature dimension M equals the head size d_h.
`favor+` and `favor+_N` are positive orthogonal random features (Choromanski et al. 2021), N * d_h of them:
phi(x) = exp(W x' - |x'|^2 / 2) with x' = x * d_h^-0.25. The draw W is made once per training step and
shared by every chunk of that step, which SLiM needs for its gradients to be exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ELEMENTWISE_NAMES, favor_multiplier, feature_dim  # noqa: F401 (re-exported)
from .errors import ConfigError

ELEMENTWISE = {
    "sqr": lambda x: x * x,
    "relu": F.relu,
    "elu+1": lambda x: F.elu(x) + 1.0,
    "abs": torch.abs,
}
FEATURE_TYPES = (*ELEMENTWISE, "favor+", "favor+_N")
assert tuple(ELEMENTWISE) == ELEMENTWISE_NAMES


def draw_orthogonal_features(
    n_features: int, head_dim: int, *, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """W: [n_features, head_dim]; blocks of orthogonal rows with chi-distributed norms, so each row is
    marginally Gaussian while rows within a block are exactly orthogonal."""
    blocks = []
    for start in range(0, n_features, head_dim):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # Q of a Gaussian matrix is Haar-distributed only with these signs
        blocks.append(q.T[: n_features - start])
    norms = torch.randn(n_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (torch.cat(blocks) * norms[:, None]).to(dtype)


def apply_features(x: torch.Tensor, feature_type: str, projection: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) for x: [..., d_h] -> [..., M]; `projection` is the FAVOR+ draw W: [M, d_h]."""
    if feature_type in ELEMENTWISE:
        return ELEMENTWISE[feature_type](x)
    if projection is None:
        raise ConfigError(f"feature type {feature_type!r} needs a random-feature draw: call redraw_features() first")
    scaled = x * x.shape[-1] ** -0.25
    return torch.exp(scaled @ projection.to(x.dtype).T - 0.5 * (scaled * scaled).sum(-1, keepdim=True))

"""An independent float64 Performer LM written from CONTRACT.md section 1 alone, for parity tests.

It shares no code with the package: plain tensors from a state_dict, a per-token loop of explicit prefix sums,
and the loss as a mean over kept positions. Slow, and meant to be.
"""

import math

import torch


def phi(x, feature_type, projection):
    if feature_type == "sqr":
        return x * x
    if feature_type == "relu":
        return torch.clamp(x, min=0.0)
    if feature_type == "elu+1":
        return torch.where(x > 0, x + 1.0, torch.exp(x))
    if feature_type == "abs":
        return x.abs()
    assert feature_type.startswith("favor+")
    d_h = x.shape[-1]
    xs = x / d_h**0.25
    return torch.exp(xs @ projection.T - (xs**2).sum(-1, keepdim=True) / 2)


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x, p, name, cfg):
    """x W^T + b, plus a LoRA adapter's (alpha / r) x A^T B^T where p holds one (CONTRACT.md section 4)."""
    y = x @ p[f"{name}.weight"].T + p[f"{name}.bias"]
    if f"{name}.lora_A.weight" in p:
        y = y + cfg["lora_alpha"] / cfg["lora_rank"] * (x @ p[f"{name}.lora_A.weight"].T) @ p[f"{name}.lora_B.weight"].T
    return y


def attention(x, p, prefix, cfg, projection):
    B, L, d = x.shape
    H = cfg["n_heads"]
    dh = d // H
    lin = lambda name: linear(x, p, f"{prefix}.{name}", cfg)  # noqa: E731
    q, k, v = (lin(n).reshape(B, L, H, dh) for n in ("q_map", "k_map", "v_map"))
    fq, fk = phi(q, cfg["feature_type"], projection), phi(k, cfg["feature_type"], projection)
    S = torch.zeros(B, H, fk.shape[-1], dh, dtype=x.dtype)
    z = torch.zeros(B, H, fk.shape[-1], dtype=x.dtype)
    outs = []
    for t in range(L):
        S = S + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + fk[:, t]
        num = (fq[:, t, :, :, None] * S).sum(-2)
        den = (fq[:, t] * z).sum(-1, keepdim=True)
        outs.append(num / (den + 1e-16))
    return torch.stack(outs, dim=1).reshape(B, L, d)


def logits(p, cfg, ids, projections=None):
    """p: state_dict (float64 tensors); ids: [B, L] -> logits [B, L, V]."""
    d = cfg["hidden_dim"]
    B, L = ids.shape
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    w = torch.exp(torch.arange(0, d // 2, 2, dtype=torch.float64) * (-math.log(10000.0) / (d // 2)))
    x = torch.cat(
        [p["input_map.weight"][ids], torch.sin(pos * w).expand(B, L, -1), torch.cos(pos * w).expand(B, L, -1)], -1
    )
    for i in range(cfg["n_layers"]):
        pre = f"layers.{i}"
        proj = projections[i] if projections else None

        def ln1(y, pre=pre):
            return layer_norm(y, p[f"{pre}.layernorm1.weight"], p[f"{pre}.layernorm1.bias"])

        def ln2(y, pre=pre):
            return layer_norm(y, p[f"{pre}.layernorm2.weight"], p[f"{pre}.layernorm2.bias"])

        def ffn(y, pre=pre):
            return linear(gelu(linear(y, p, f"{pre}.U_map", cfg)), p, f"{pre}.V_map", cfg)

        if cfg["on_gptln"]:
            x = x + ln1(attention(x, p, f"{pre}.attention", cfg, proj))
            x = x + ln2(ffn(x))
        else:
            x = x + attention(ln1(x), p, f"{pre}.attention", cfg, proj)
            x = x + ffn(ln2(x))
    return linear(x, p, "output_logit_map", cfg)


def loss_and_grads(state_dict, cfg, windows, mask=None, projections=None):
    """Mean next-token cross-entropy (over kept positions) and its gradient for every tensor, in float64."""
    p = {k: v.detach().double().clone().requires_grad_() for k, v in state_dict.items()}
    projections = [w.double() for w in projections] if projections else None
    out = logits(p, cfg, windows[:, :-1], projections)
    logp = torch.log_softmax(out, dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)  # [B, L]
    m = torch.ones_like(nll) if mask is None else mask.double()
    loss = (nll * m).sum() / m.sum()
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss.item(), dict(zip(p.keys(), grads, strict=True))

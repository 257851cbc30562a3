"""Quantized frozen weights (CONTRACT.md section 4, issue 35): the formats, defined once.

- int8: per output row, scale = absmax / 127 and q = round(w / scale), symmetric, stored as int8 [out, in] and fp32
  scales [out]. A row of zeros has scale 0 and dequantizes to zeros.
- nf4: the weight flattened row-major into blocks of 64 consecutive values; each block one fp32 scale, its absmax,
  and each value the nearest of QLoRA's 16 NormalFloat4 levels (Dettmers et al. 2023) times it, the level's index
  stored in 4 bits, two to a byte (the first value of a pair in the low nibble). A weight whose size is not a
  multiple of 64 has a last, shorter block.

`quantize` and `dequantize` work one tensor at a time, so that a checkpoint is quantized while it is read and never
held whole in fp32; `Quantized` is one weight in either format, with its bytes and its dequantized fp32 form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF4_BLOCK = 64
# QLoRA's NormalFloat4 levels (bitsandbytes' and torchao's table): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FORMATS = ("int8", "nf4")


@dataclass
class Quantized:
    """One weight [out, in] in a quantized format: `data` (int8 [out, in], or nf4's packed uint8 [ceil(n / 2)]) and
    `scales` (fp32: one per row, or one per block of 64)."""

    format: str
    shape: tuple[int, int]
    data: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def quantize(weight: torch.Tensor, fmt: str) -> Quantized:
    """`weight` [out, in] in `fmt` ("int8" or "nf4"), computed in fp32."""
    w = weight.detach().to(torch.float32)
    if fmt == "int8":
        scales = w.abs().amax(dim=1) / 127
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return Quantized("int8", tuple(w.shape), q, scales)
    if fmt == "nf4":
        flat = w.reshape(-1)
        n = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, -n % NF4_BLOCK)).view(-1, NF4_BLOCK)
        scales = padded.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        normed = (padded / safe[:, None]).reshape(-1)[:n]
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
        index = _nearest(normed, levels)
        index = torch.nn.functional.pad(index, (0, n % 2))  # an odd count: the last byte's high nibble is 0
        packed = (index[0::2] | (index[1::2] << 4)).to(torch.uint8)
        return Quantized("nf4", tuple(w.shape), packed, scales)
    raise ValueError(f"unknown quantized format {fmt!r}: one of {', '.join(FORMATS)}")


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level for each value (int64); a tie goes to the upper level. Midpoints between
    neighbouring levels, searched: no [n, 16] distance table."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values, midpoints, right=True)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] as the quantized model computes with it, in `dtype` (made in fp32)."""
    out, inner = q.shape
    if q.format == "int8":
        return (q.data.to(torch.float32) * q.scales[:, None]).to(dtype)
    n = out * inner
    index = torch.stack([q.data & 0x0F, q.data >> 4], dim=1).reshape(-1)[:n].long()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=q.data.device)
    blocks = torch.nn.functional.pad(levels[index], (0, -n % NF4_BLOCK)).view(-1, NF4_BLOCK)
    return (blocks * q.scales[:, None]).reshape(-1)[:n].view(out, inner).to(dtype)


class _QuantizedBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W frozen and quantized: dequantized for the forward's product, and again in
    backward for dx = g W, never saved, so that a step holds one map's dequantized weight at a time, not the
    model's. dA = s (g B)^T x and dB = s g^T (x A^T) as lora.py's fused map computes them. The products run in the
    autocast dtype where autocast is on (bf16), else in x's own."""

    @staticmethod
    def forward(ctx, x, q: Quantized, bias, lora_a, lora_b, scaling: float):
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = x2 @ q.dequantize(dtype).t()
        if bias is not None:
            y = y + bias.to(dtype)
        a = None
        if lora_a is not None:
            a = x2 @ lora_a.to(dtype).t()
            y = y + scaling * (a @ lora_b.to(dtype).t())
        ctx.save_for_backward(x2, lora_a, lora_b, a)
        ctx.q, ctx.scaling, ctx.shape, ctx.x_dtype = q, scaling, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, lora_a, lora_b, a = ctx.saved_tensors
        s, dtype = ctx.scaling, x2.dtype
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        gb = g2 @ lora_b.to(dtype) if lora_b is not None else None  # [N, R]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g2 @ ctx.q.dequantize(dtype)
            if gb is not None:
                dx = dx + s * (gb @ lora_a.to(dtype))
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        da = (s * (gb.t() @ x2)).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        db = (s * (g2.t() @ a)).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None


def quantized_lora_linear(x, q: Quantized, bias, lora_a=None, lora_b=None, scaling: float = 0.0) -> torch.Tensor:
    """A map on a frozen quantized base, with a LoRA adapter (lora_a, lora_b) or without (_QuantizedBaseLora): W's
    bytes stay quantized between products."""
    return _QuantizedBaseLora.apply(x, q, bias, lora_a, lora_b, scaling)

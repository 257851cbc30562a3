"""Quantized frozen weights (CONTRACT.md section 4, issue 35): the formats, defined once.

- int8: per output row, scale = absmax / 127 and q = round(w / scale), symmetric, stored as int8 [out, in] and fp32
  scales [out]. A row of zeros has scale 0 and dequantizes to zeros.
- nf4: the weight flattened row-major into blocks of 64 consecutive values; each block one fp32 scale, its absmax,
  and each value the nearest of QLoRA's 16 NormalFloat4 levels (Dettmers et al. 2023) times it, the level's index
  stored in 4 bits, two to a byte (the first value of a pair in the high nibble, as bitsandbytes packs them). A
  weight whose size is not a multiple of 64 has a last, shorter block.

`quantize` and `dequantize` work one tensor at a time, so that a checkpoint is quantized while it is read and never
held whole in fp32; `Quantized` is one weight in either format, with its bytes and its dequantized form.

The products (benchmarks/RESULTS.md, "A quantized base: which dequantize-and-matmul path"): int8 multiplies by the
int8 values themselves and applies the row scales to the product (no weight-sized float copy). nf4 dequantizes on a
CPU with bitsandbytes' kernel where it is installed (`slimtune[quant]`; 2-8x as fast as a PyTorch table lookup on
this CPU, and bit for bit the same values: tested), else (and on a GPU) with the PyTorch lookup. Either way a
product dequantizes one tile of rows at a time into buffers kept for the next (`Quantized.tiles`, `_buffer`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
# A map's product dequantizes this much fp32 weight at a time: its transient buffers stay a few MB, not the map's
# size (4 bytes a weight: 38 MB for a 1536 x 6144 map), so that a quantized base also fits where its largest map
# dequantized whole would not.
TILE_BYTES = 4 << 20


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

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to(self, device) -> Quantized:
        return Quantized(self.format, self.shape, self.data.to(device), self.scales.to(device))

    def rows(self, start: int, stop: int) -> Quantized:
        """Rows [start, stop) as a weight of their own (views, no copy); nf4 needs start x in on a block's edge."""
        inner = self.shape[1]
        if self.format == "int8":
            return Quantized("int8", (stop - start, inner), self.data[start:stop], self.scales[start:stop])
        first, last = start * inner, stop * inner
        if first % NF4_BLOCK:
            raise ValueError(f"nf4 rows start on a block of {NF4_BLOCK}: row {start} of {inner} values does not")
        data = self.data[first // 2 : -(-last // 2)]
        return Quantized("nf4", (stop - start, inner), data, self.scales[first // NF4_BLOCK : -(-last // NF4_BLOCK)])

    def tiles(self, tile_bytes: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of about `tile_bytes` (TILE_BYTES) of fp32 weight each (nf4's on block edges): what one
        product dequantizes at a time."""
        out, inner = self.shape
        align = NF4_BLOCK // math.gcd(inner, NF4_BLOCK) if self.format == "nf4" else 1
        step = max(align, (tile_bytes or TILE_BYTES) // (4 * inner) // align * align)
        return [(r, min(r + step, out)) for r in range(0, out, step)]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _sizes(shape: tuple[int, int], fmt: str) -> tuple[tuple[int, ...], int]:
    """(data's shape, scales' count) of a weight of `shape` in `fmt`: int8 a byte a value and a scale a row; nf4
    half a byte a value and a scale per block of 64."""
    n = shape[0] * shape[1]
    return (tuple(shape), shape[0]) if fmt == "int8" else ((-(-n // 2),), -(-n // NF4_BLOCK))


def stored_bytes(shape: tuple[int, int], fmt: str) -> int:
    """What a weight of `shape` holds in `fmt` (one byte a data element, four a scale)."""
    data, scales = _sizes(shape, fmt)
    return math.prod(data) + 4 * scales


def quantize(weight: torch.Tensor, fmt: str) -> Quantized:
    """`weight` [out, in] in `fmt` ("int8" or "nf4"), computed in fp32 a tile of rows at a time: a quarter of a
    product's tile (1 MB of fp32 values), whose temporaries (copies, indices) come to about 8 MB, not several
    copies of the weight (a checkpoint is quantized as it is read, beside the budget's other lines)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}: one of {', '.join(FORMATS)}")
    shape, device = tuple(weight.shape), weight.device
    data, scales = _sizes(shape, fmt)
    stored = torch.int8 if fmt == "int8" else torch.uint8
    q = Quantized(fmt, shape, torch.empty(data, dtype=stored, device=device), torch.empty(scales, device=device))
    for start, stop in q.tiles(TILE_BYTES // 4):
        part = q.rows(start, stop)  # views of data and scales: written in place
        w = weight[start:stop].detach().to(torch.float32)
        part.data.copy_(_int8(w, part.scales) if fmt == "int8" else _nf4(w.reshape(-1), part.scales))
    return q


def _int8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of w as int8, their scales (absmax / 127) written into `scales`."""
    torch.div(w.abs().amax(dim=1), 127, out=scales)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)


def _nf4(flat: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Values (from a block's edge) as packed nf4 bytes, each block's absmax written into `scales`."""
    n = flat.numel()
    padded = F.pad(flat, (0, -n % NF4_BLOCK)).view(-1, NF4_BLOCK)
    torch.amax(padded.abs(), dim=1, out=scales)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normed = (padded / safe[:, None]).reshape(-1)[:n]
    index = _nearest(normed, _levels(flat.device))
    index = F.pad(index, (0, n % 2))  # an odd count: the last byte's low nibble is 0
    return ((index[0::2] << 4) | index[1::2]).to(torch.uint8)


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level for each value (int32); a tie goes to the upper level. Midpoints between
    neighbouring levels, searched: no [n, 16] distance table."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values, midpoints, right=True, out_int32=True)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32, *, scratch: bool = False) -> torch.Tensor:
    """The weight [out, in] as the quantized model computes with it, in `dtype`: each value (level or integer times
    its scale) made in fp32, then cast; for float64 made in float64, where it is exact. `scratch`: in buffers that
    the next call reuses (_buffer: a product's tile, used at once)."""
    if q.format == "int8":
        made = torch.promote_types(dtype, torch.float32)
        return (q.data.to(made) * q.scales.to(made)[:, None]).to(dtype)
    usable = dtype in LIBRARY_KERNELS and q.device.type == "cpu" and q.shape[1] % 2 == 0
    fast = _bitsandbytes_dequantize() if usable and q.numel() % NF4_BLOCK == 0 else None
    if fast is None:
        return dequantize_nf4_torch(q, dtype, scratch=scratch)
    return fast(q, dtype, _buffer("weight", q.numel(), dtype, q.device, scratch))


def dequantize_nf4_torch(q: Quantized, dtype: torch.dtype = torch.float32, *, scratch: bool = False) -> torch.Tensor:
    """nf4 in PyTorch: each byte looks up its pair of levels in a 256-row table (one gather, not two nibble masks),
    and each block of 64 is scaled in place."""
    (out, inner), device = q.shape, q.device
    n, k, made = out * inner, q.data.numel(), torch.promote_types(dtype, torch.float32)
    index = _buffer("index", k, torch.int32, device, scratch).copy_(q.data)
    values = _buffer("values", -(-2 * k // NF4_BLOCK) * NF4_BLOCK, made, device, scratch)
    torch.index_select(_pair_table(device).to(made), 0, index, out=values[: 2 * k].view(k, 2))
    values[2 * k :].zero_()  # a last, shorter block
    values.view(-1, NF4_BLOCK).mul_(q.scales.to(made)[:, None])
    if made == dtype:
        return values[:n].view(out, inner)
    return _buffer("weight", n, dtype, device, scratch).copy_(values[:n]).view(out, inner)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device, scratch: bool) -> torch.Tensor:
    """`numel` values of `dtype`: fresh, or with `scratch` a view of one buffer per (name, dtype, device), kept and
    reused by every later call (at least a tile's worth: TILE_BYTES of fp32 values). A step dequantizes thousands of
    tiles; each allocating and freeing its own few MB fragmented glibc's heap under a fixed 4 MB mmap threshold (a
    d-1792 model's LoRA step on nf4 held 220 MB more than its tensors), where reused buffers hold under 10 MB."""
    if not scratch:
        return torch.empty(numel, dtype=dtype, device=device)
    held = _SCRATCH.get((name, dtype, device))
    if held is None or held.numel() < numel:
        held = _SCRATCH[(name, dtype, device)] = torch.empty(max(numel, TILE_BYTES // 4), dtype=dtype, device=device)
    return held[:numel]


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: byte b -> (level of its high nibble, level of its low nibble)."""
    levels = _levels(device)
    return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)


# What bitsandbytes' CPU kernels dequantize into, and their names' suffixes (cdequantize_blockwise_cpu_nf4_bf16).
LIBRARY_KERNELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NO_LIBRARY = "SLIMTUNE_NO_BITSANDBYTES"  # set (to anything): the PyTorch lookup even where bitsandbytes is installed


@functools.cache
def _bitsandbytes_dequantize():
    """bitsandbytes' CPU kernel for nf4 dequantization as a function (q, dtype, out) -> weight, or None where it
    is not installed (or NO_LIBRARY is set).

    The kernel is loaded from bitsandbytes' own CPU library through its C interface, not by importing the Python
    package: that import brings in torch.compile's stack (sympy, networkx), 124 MB of resident memory, on a tool whose
    point is memory. It writes into a buffer we give (_buffer), where the package's operator makes a fresh tensor
    per call."""
    if os.environ.get(NO_LIBRARY):
        return None
    try:
        spec = importlib.util.find_spec("bitsandbytes")  # finds the package without running it
        library = ctypes.CDLL(str(Path(spec.submodule_search_locations[0]) / "libbitsandbytes_cpu.so"))
        kernels = {dtype: getattr(library, f"cdequantize_blockwise_cpu_nf4_{name}")
                   for dtype, name in LIBRARY_KERNELS.items()}  # fmt: skip
    except (ImportError, AttributeError, OSError, TypeError, IndexError):
        return None  # not installed, or a build without the kernels: the PyTorch lookup serves
    for kernel in kernels.values():
        kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3
        kernel.restype = None

    def dequantize_4bit(q: Quantized, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """Rows of q, [m, n] with n even, blocks of 64 counted row-major: bitsandbytes' layout and ours."""
        data, scales = q.data.contiguous(), q.scales.contiguous()
        kernels[dtype](data.data_ptr(), scales.data_ptr(), out.data_ptr(), NF4_BLOCK, q.shape[0], q.shape[1])
        return out.view(q.shape)

    return dequantize_4bit


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def library() -> str:
    """What dequantizes nf4 here: "bitsandbytes" or "pytorch"."""
    return "bitsandbytes" if _bitsandbytes_dequantize() is not None else "pytorch"


def _factor(part: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """What a product multiplies by: int8's integers in `dtype` (its row scales apply to the product, exact: an
    8-bit integer is exact in bf16), nf4's dequantized weight."""
    if part.format == "int8":
        return _buffer("weight", part.numel(), dtype, part.device, True).copy_(part.data.view(-1)).view(part.shape)
    return dequantize(part, dtype, scratch=True)


def _product(x2: torch.Tensor, q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """x2 W^T in `dtype`, one tile of W's rows (output features) at a time."""
    tiles = q.tiles()
    y = x2.new_empty(x2.shape[0], q.shape[0], dtype=dtype) if len(tiles) > 1 else None
    for start, stop in tiles:
        part = q.rows(start, stop)
        product = x2 @ _factor(part, dtype).t()
        if part.format == "int8":
            product.mul_(part.scales.to(dtype))
        if y is None:
            return product
        y[:, start:stop] = product
        del product  # before the next tile's weight is made
    return y


def _input_product(g2: torch.Tensor, q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """g2 W in `dtype` (the input gradient), summed over tiles of W's rows (int8: g2's columns times the scales)."""
    dx = None
    for start, stop in q.tiles():
        part, g = q.rows(start, stop), g2[:, start:stop]
        if part.format == "int8":
            g = g * part.scales.to(dtype)
        w = _factor(part, dtype)
        dx = g @ w if dx is None else dx.addmm_(g, w)
        del w, g  # before the next tile's weight is made
    return dx


class _QuantizedBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W frozen and quantized: dequantized for the forward's product (int8: its
    scales applied to the product), and again in backward for dx = g W, tile by tile (Quantized.tiles), never
    saved, so that a step holds a few MB of dequantized weight at a time, not a map's, let alone the model's.
    dA = s (g B)^T x and dB = s g^T (x A^T) as lora.py's fused map computes them. The products run in the
    autocast dtype where autocast is on (bf16), else in x's own."""

    @staticmethod
    def forward(ctx, x, q: Quantized, bias, lora_a, lora_b, scaling: float):
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = _product(x2, q, dtype)  # a fresh tensor: the bias and the adapter are added in place (no copies of y)
        if bias is not None:
            y.add_(bias.to(dtype))
        a = None
        if lora_a is not None:
            a = x2 @ lora_a.to(dtype).t()
            y.addmm_(a, lora_b.to(dtype).t(), alpha=scaling)
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
            dx = _input_product(g2, ctx.q, dtype)
            if gb is not None:
                dx.addmm_(gb, lora_a.to(dtype), alpha=s)  # in place: no input-sized copies
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        da = (s * (gb.t() @ x2)).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        db = (s * (g2.t() @ a)).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None


def hold_quantized(module: torch.nn.Linear, q: Quantized) -> None:
    """Make a linear map hold its frozen weight as `q`, in place: its `weight` parameter goes (None), and its
    forward computes with the weight dequantized for each product (DeferredLinear, LoraLinear)."""
    del module._parameters["weight"]
    module.register_parameter("weight", None)
    module.quantized = q


def quantized_lora_linear(x, q: Quantized, bias, lora_a=None, lora_b=None, scaling: float = 0.0) -> torch.Tensor:
    """A map on a frozen quantized base, with a LoRA adapter (lora_a, lora_b) or without (_QuantizedBaseLora): W's
    bytes stay quantized between products."""
    return _QuantizedBaseLora.apply(x, q, bias, lora_a, lora_b, scaling)

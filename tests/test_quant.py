"""The quantized formats of CONTRACT.md section 4 (slimtune/quant.py), against independent numpy computations:
int8 per-row absmax, nf4 blocks of 64 with QLoRA's levels (the nearest, found here from a full distance table), the
nibble order of the packing, odd sizes and zero blocks, and the bytes each format stores."""

import numpy as np
import pytest
import torch

from slimtune.quant import NF4_LEVELS, dequantize, quantize

SHAPES = [(8, 64), (5, 37), (3, 200), (1, 1)]


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_is_per_row_absmax_over_127_rounded(shape):
    w = _weight(shape)
    q = quantize(w, "int8")
    ref = w.numpy().astype(np.float64)
    scale = np.abs(ref).max(axis=1) / 127
    expected = np.round(ref / scale[:, None])
    assert q.data.dtype == torch.int8 and np.array_equal(q.data.numpy(), expected.astype(np.int8))
    assert np.allclose(q.scales.numpy(), scale, rtol=1e-6)
    back = dequantize(q).numpy()
    assert np.all(np.abs(back - ref) <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_is_the_nearest_level_times_the_block_absmax(shape):
    w = _weight(shape, seed=1)
    q = quantize(w, "nf4")
    flat = w.numpy().astype(np.float64).reshape(-1)
    levels = np.array(NF4_LEVELS)
    expected_index, expected = [], []
    for start in range(0, flat.size, 64):
        block = flat[start : start + 64]
        absmax = np.abs(block).max()
        index = np.abs(block[:, None] / absmax - levels[None, :]).argmin(axis=1)  # a full distance table
        expected_index.extend(index)
        expected.extend(levels[index] * absmax)
    packed = q.data.numpy()
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[: flat.size]  # low nibble first
    assert np.array_equal(unpacked, expected_index)
    assert np.allclose(dequantize(q).numpy().reshape(-1), expected, rtol=1e-6, atol=0)
    assert q.scales.numel() == -(-flat.size // 64) and q.data.numel() == -(-flat.size // 2)


def test_zero_rows_and_blocks_dequantize_to_zero():
    w = torch.zeros(4, 64)
    w[1] = _weight((64,))
    for fmt in ("int8", "nf4"):
        back = dequantize(quantize(w, fmt))
        assert torch.equal(back[0], torch.zeros(64)) and torch.equal(back[2:], torch.zeros(2, 64))


def test_the_bytes_each_format_stores():
    w = _weight((256, 1024))
    assert quantize(w, "int8").nbytes == 256 * 1024 + 256 * 4  # one byte a weight, an fp32 scale a row
    assert quantize(w, "nf4").nbytes == 256 * 1024 // 2 + 256 * 1024 // 64 * 4  # 0.5625 bytes a weight


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="int8, nf4"):
        quantize(_weight((2, 2)), "fp8")

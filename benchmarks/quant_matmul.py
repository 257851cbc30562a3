"""Issue 35, the library question: which dequantize-and-matmul path serves a frozen quantized base best on this CPU.
One linear map of a 208M-parameter model's shape (d 1536: [1536, 1536] and [6144, 1536]) over a chunk of tokens,
forward (y = x W^T) and the input gradient (dx = g W) as a LoRA step needs them, each path timed interleaved with
the others and repeated (min / median / max of the per-round ratio to the bf16 base):

- bf16 base: the weight in bf16, products under bf16 autocast (what `--base-dtype bf16` runs);
- quant.py, nf4 / int8: what `--base-dtype nf4|int8` runs (tiles of rows dequantized into reused buffers; int8's
  scales applied to the product; nf4 through bitsandbytes' CPU kernel where installed, and the same with the
  PyTorch lookup); quant.py's definition: the whole weight dequantized, as the tests' reference does;
- torchao nf4: `to_nf4` and `linear_nf4` (plain PyTorch inside);
- bitsandbytes nf4 (its package): `quantize_4bit` and `matmul_4bit` (its CPU backend).

The libraries are optional here: a path whose library is missing is skipped (PYTHONPATH may point at a folder they
were installed into with `pip install --target`). Nothing else may run meanwhile.

    python benchmarks/quant_matmul.py --tokens 512 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import report

from slimtune import quant
from slimtune.quant import dequantize, quantize


def _paths(w: torch.Tensor) -> dict:
    """name -> (forward(x), input gradient(g)) for the weight w [out, in]."""
    bf16 = w.to(torch.bfloat16)
    paths = {"bf16 base": (lambda x: x @ bf16.t(), lambda g: g @ bf16)}
    for fmt in ("nf4", "int8"):
        q = quantize(w, fmt)
        paths[f"quant.py, {fmt}"] = (
            lambda x, q=q: quant._product(x, q, torch.bfloat16),
            lambda g, q=q: quant._input_product(g, q, torch.bfloat16),
        )
    if quant.library() == "bitsandbytes":  # the same products with the PyTorch lookup for nf4
        q = quantize(w, "nf4")
        paths["quant.py, nf4, PyTorch lookup"] = (
            lambda x, q=q: _without_library(quant._product, x, q),
            lambda g, q=q: _without_library(quant._input_product, g, q),
        )
    paths["quant.py's definition, nf4 (dequantize whole)"] = (
        lambda x, q=quantize(w, "nf4"): x @ dequantize(q, torch.bfloat16).t(),
        lambda g, q=quantize(w, "nf4"): g @ dequantize(q, torch.bfloat16),
    )
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        nf4 = to_nf4(bf16, block_size=64, scaler_block_size=256)
        paths["torchao nf4"] = (lambda x: linear_nf4(x, nf4), lambda g: g @ nf4.get_original_weight())
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        packed, state = bf.quantize_4bit(bf16, blocksize=64, quant_type="nf4")
        paths["bitsandbytes nf4 (its package)"] = (
            lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state),
            lambda g: g @ bf.dequantize_4bit(packed, state),
        )
    except ImportError:
        pass
    return paths


def _without_library(product, x, q):
    """`product` with nf4 dequantized by the PyTorch lookup (as without slimtune[quant])."""
    kept = quant._bitsandbytes_dequantize
    quant._bitsandbytes_dequantize = lambda: None
    try:
        return product(x, q, torch.bfloat16)
    finally:
        quant._bitsandbytes_dequantize = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="rows of x: B x C")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows, extra = [], {}
    for shape in ((1536, 1536), (6144, 1536)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        x = torch.randn(args.tokens, shape[1], dtype=torch.bfloat16)
        g = torch.randn(args.tokens, shape[0], dtype=torch.bfloat16)
        paths = _paths(w)
        seconds = {name: [] for name in paths}
        for r in range(args.rounds + 1):
            for name, (forward, backward) in paths.items():
                start = time.perf_counter()
                forward(x)
                backward(g)
                if r:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
        for name, times in seconds.items():
            ratios = [t / b for t, b in zip(times, seconds["bf16 base"], strict=True)]
            rows.append([f"{shape[0]}x{shape[1]}", name, f"{min(ratios):.2f}", f"{statistics.median(ratios):.2f}",
                         f"{max(ratios):.2f}", f"{statistics.median(times) * 1e3:.1f}"])  # fmt: skip
        extra[f"{shape[0]}x{shape[1]}"] = seconds
    headers = ["map", "path", "min", "median", "max", "median ms"]
    report("quant_matmul", headers, rows, {"seconds": extra, "tokens": args.tokens})


if __name__ == "__main__":
    main()

"""Issue 35, the library question: which dequantize-and-matmul path serves a frozen quantized base best on this CPU.
One linear map of a 208M-parameter model's shape (d 1536: [1536, 1536] and [6144, 1536]) over a chunk of tokens,
forward (y = x W^T) and the input gradient (dx = g W) as a LoRA step needs them, each path timed interleaved with
the others and repeated (min / median / max of the per-round ratio to the bf16 base):

- bf16 base: the weight in bf16, products under bf16 autocast (what `--base-dtype bf16` runs today);
- ours, nf4 / int8: slimtune/quant.py's formats, the weight dequantized to bf16 for the products, then dropped;
- torchao nf4: `to_nf4` and `linear_nf4` (plain PyTorch inside);
- bitsandbytes nf4: `quantize_4bit` and `matmul_4bit` (its CPU backend).

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

from slimtune.quant import dequantize, quantize


def _paths(w: torch.Tensor) -> dict:
    """name -> (forward(x), input gradient(g)) for the weight w [out, in]."""
    bf16 = w.to(torch.bfloat16)
    paths = {"bf16 base": (lambda x: x @ bf16.t(), lambda g: g @ bf16)}
    for fmt in ("nf4", "int8"):
        q = quantize(w, fmt)
        paths[f"ours, {fmt}"] = (
            lambda x, q=q: x @ dequantize(q, torch.bfloat16).t(),
            lambda g, q=q: g @ dequantize(q, torch.bfloat16),
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
        paths["bitsandbytes nf4"] = (
            lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state),
            lambda g: g @ bf.dequantize_4bit(packed, state),
        )
    except ImportError:
        pass
    return paths


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

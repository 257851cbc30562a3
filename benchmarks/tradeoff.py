"""The time-memory tradeoff of issue 6, in one process: SLiM at each C, full backprop and full backprop with
per-layer activation checkpointing (torch.utils.checkpoint), on the same model, windows and device.

Default: the issue's CPU setting, d = 256, 3 layers, d_ff = 1024, 4 heads, sqr features, batch 1, L = 8192.
Pass --recipe config-2 (etc.) and --seq-len for the paper's configurations; on a GPU add --device cuda
[--precision bf16]. Times are medians after warm-up with methods interleaved; peak memory is measured
(slimtune/bench.py: tensor bytes held on CPU, allocator reservation + context on CUDA).

    python benchmarks/tradeoff.py [--seq-len 8192] [--chunks 1024 256 64 16] [--steps 3] [--device cpu]
"""

import argparse

import torch
from _common import PAPER_CPU, report

from slimtune import bench
from slimtune.choices import Precision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=None, help="a recipe's model instead of the d 256 CPU model")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 16])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=[p.value for p in Precision])
    parser.add_argument("--optimizer", default=None, help="sgd, adam or adamw: include its state and update")
    parser.add_argument("--emulate-memory", default=None, help="CUDA: cap the process at a small card's size")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--name", default="tradeoff")
    args = parser.parse_args()
    setup = bench.setup(
        recipe=args.recipe,
        config=None if args.recipe else PAPER_CPU,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        emulate_memory=args.emulate_memory,
    )
    config, device = setup.model.config, setup.windows.device
    methods = bench.methods_for(args.seq_len, args.chunks, checkpointed=not args.no_checkpointing)
    rows = bench.run_bench(
        setup.model,
        setup.windows,
        methods,
        steps=args.steps,
        warmup=args.warmup,
        optimizer=args.optimizer,
        precision=args.precision,
    )
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    table = [
        [
            r.method,
            r.error or fmt(r.median_s, ".3f"),
            fmt(r.vs_full_time, ".2f") + "x",
            fmt(None if r.peak_bytes is None else r.peak_bytes / 1e6, ".1f"),
            fmt(r.vs_full_memory, ".2f") + "x",
        ]
        for r in rows
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report(
        args.name,
        ["method", "median s/step", "time vs full", "peak MB", "memory vs full"],
        table,
        {
            "device": device_name,
            "config": config.to_dict(),
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "optimizer": args.optimizer,
            "emulate_memory": args.emulate_memory,
            "rows_detail": bench.rows_json(rows),
        },
    )


if __name__ == "__main__":
    main()

"""The paper's one-step on-device adaptation (issue 5): pretrain the small recipe on tinyshakespeare, then for
windows of wikitext2.valid measure the second half's bpc before and after one SGD step on the first half,
with SLiM at a small C and with full backprop.

    python benchmarks/adaptation.py [--steps 600] [--seq-len 1024] [--windows 16] [--chunk 32]
"""

import argparse
import subprocess
import sys

import torch
from _common import DATA, OUT, report

from slimtune.data import read_bytes
from slimtune.evaluation import adapt_one_step
from slimtune.pretrained import PerformerLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    ckpt = OUT / "small-shakespeare.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "slimtune",
            "pretrain",
            "--recipe",
            "small",
            "--data",
            str(DATA / "tinyshakespeare.txt"),
            "--out",
            str(ckpt),
            "--steps",
            str(args.steps),
            "--device",
            "cpu",
            "--restart",  # a run folder left by an earlier run of this script is moved aside
            "--overwrite",
        ],
        check=True,
    )
    model = PerformerLM.from_pretrained(ckpt)
    model.redraw_features(torch.Generator().manual_seed(0))
    data = read_bytes(DATA / "wikitext2.valid.txt")
    rows, results = [], {}
    for label, chunk in ((f"SLiM C={args.chunk}", args.chunk), ("full backprop", args.seq_len // 2)):
        r = adapt_one_step(model, data, seq_len=args.seq_len, windows=args.windows, lr=args.lr, chunk_size=chunk)
        results[label] = r.to_json()
        rows.append([label, f"{r.bpc_before:.4f}", f"{r.bpc_after:.4f}", f"{r.difference:+.4f}"])
    slim, full = results[f"SLiM C={args.chunk}"], results["full backprop"]
    gap = abs(slim["bpc_after"] - full["bpc_after"]) / full["bpc_after"]
    report(
        "adaptation",
        ["adaptation step", "bpc before", "bpc after", "difference"],
        rows,
        {"results": results, "slim_vs_full_relative_gap": gap, "pretrain_steps": args.steps},
    )
    print(f"SLiM vs full-backprop adapted bpc: relative gap {gap:.1e}")


if __name__ == "__main__":
    main()

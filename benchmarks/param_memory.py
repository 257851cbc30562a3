"""Parameter memory (issue 23): how large a model each strategy trains under a budget, how fast a LoRA step is
against a full one, and how much of full fine-tuning's gain LoRA recovers. Every cell is a fresh `slimtune`
process, run alone.

- reach: at each budget, models of one family (d from 256 up, d / 128 layers, ffn 4d, d / 64 heads) under each
  strategy (full fine-tuning with adam, adafactor and sgd; LoRA r8 with adam on an fp32, bf16, int8 and nf4
  base): one `fit` step with `--mem-budget B`, d growing until fit refuses (exit 2: nothing fits) or the model
  takes longer than --max-seconds. Each strategy starts from the largest d of the one before it (they hold less
  and less), or from --start-d; --strategies picks some (a comma list of substrings of their names).
  Reported: the largest d that trained, its parameters, C and measured peak (VmHWM).
- speed: one model, one C: full fine-tuning (adam, adafactor) and LoRA steps (adam; fp32 and bf16 base),
  interleaved and repeated; each `fit` reports its steps' seconds (`step_seconds`), of which the first (the
  optimizer's state being made) is left out.
- quality: `pretrain --recipe small` on tinyshakespeare, then the same steps of fine-tuning on wikitext2.valid
  with full fine-tuning, with LoRA at two ranks, and with the larger rank on a bf16, int8 and nf4 base; held-out
  bpc on wikitext2.test before and after, of the exported `--out` (a quantized base's adapters merged into the
  full-precision weights, as a user gets them).
- squeeze (issue 35): a 208M-parameter checkpoint (d 1536, 8 layers, 832 MB in fp32) under --squeeze-budget
  (800MB) with LoRA r8 on each base: which fit, at which C, with what peak.

    python benchmarks/param_memory.py reach [--budgets 1GB,2GB] [--seq-len 2048]
    python benchmarks/param_memory.py speed [--repeats 5]
    python benchmarks/param_memory.py quality [--steps 200]
    python benchmarks/param_memory.py squeeze [--squeeze-budget 800MB]
    python benchmarks/param_memory.py all --quick     # every part at toy sizes (a smoke test of the script)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

from _common import DATA, OUT, make_checkpoint, report

from slimtune.model import PerformerConfig
from slimtune.units import parse_size

STRATEGIES = {  # name -> fit flags
    "full, adam": ["--optimizer", "adam"],
    "full, adafactor": ["--optimizer", "adafactor"],
    "full, sgd": ["--optimizer", "sgd"],
    "LoRA r8, fp32 base, adam": ["--optimizer", "adam", "--lora-rank", "8"],
    "LoRA r8, bf16 base, adam": ["--optimizer", "adam", "--lora-rank", "8", "--base-dtype", "bf16"],
    "LoRA r8, int8 base, adam": ["--optimizer", "adam", "--lora-rank", "8", "--base-dtype", "int8"],
    "LoRA r8, nf4 base, adam": ["--optimizer", "adam", "--lora-rank", "8", "--base-dtype", "nf4"],
}
FAMILY = (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072)
MB = 1e6


def family(d: int) -> PerformerConfig:
    """d / 128 layers (4 at d 512, 8 at d 1024), ffn 4d, heads of 64."""
    return PerformerConfig(hidden_dim=d, n_layers=max(1, d // 128), ffn_dim=4 * d, n_heads=max(1, d // 64))


def parameters(config: PerformerConfig) -> int:
    d, f, n = config.hidden_dim, config.ffn_dim, config.n_layers
    return n * (3 * d * d + 3 * d + 2 * d * f + d + f + 4 * d) + 256 * d // 2 + 256 * d + 256


def slimtune(*args, timeout: float | None = None) -> tuple[int, dict | None, str, float]:
    """A fresh `slimtune` process: (exit code, its JSON, stderr's last line, wall seconds)."""
    cmd = [sys.executable, "-m", "slimtune", *map(str, args), "--device", "cpu", "--json"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, None, f"over {timeout:.0f} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    last = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
    return proc.returncode, json.loads(last) if last else None, (proc.stderr.strip().splitlines() or [""])[-1], seconds


def fit(checkpoint, data, *flags, timeout=None):
    out = OUT / "param-out.safetensors"
    shutil.rmtree(OUT / "param-out.safetensors.run", ignore_errors=True)
    try:
        return slimtune("fit", "--checkpoint", checkpoint, "--data", data, "--out", out, "--overwrite", *flags,
                        timeout=timeout)  # fmt: skip
    finally:
        out.unlink(missing_ok=True)


def reach(args) -> None:
    rows, records = [], []
    for budget in args.budgets.split(","):
        start = args.start_d or args.family[0]
        for name, flags in STRATEGIES.items():
            if args.strategies and not any(part in name for part in args.strategies.split(",")):
                continue
            best = None
            for d in (d for d in args.family if d >= start):
                config = family(d)
                ckpt = make_checkpoint(config, f"family-d{d}")
                code, result, error, seconds = fit(
                    ckpt, DATA / "tinyshakespeare.txt", "--steps", 1, "--seq-len", args.seq_len,
                    "--mem-budget", budget, *flags, timeout=args.max_seconds,
                )  # fmt: skip
                record = {"budget": budget, "strategy": name, "d": d, "parameters": parameters(config),
                          "exit_code": code, "seconds": seconds, "error": error if code else ""}  # fmt: skip
                if result:
                    record |= {"chunk_size": result["chunk_size"], "peak_bytes": result["peak_memory_bytes"],
                               "predicted_bytes": (result["plan"] or {}).get("predicted_peak_bytes")}  # fmt: skip
                records.append(record)
                print(json.dumps(record), flush=True)
                if code != 0:
                    break
                best = record
            start = best["d"] if best else start
            if best is None:
                rows.append([budget, name, "-", "-", "-", "-", "-", records[-1]["error"][:60]])
                continue
            within = best["peak_bytes"] <= parse_size(budget)
            last = records[-1]
            stopped = "nothing fits" if last["exit_code"] == 2 else (last["error"][:40] or "end of family")
            rows.append([budget, name, best["d"], f"{best['parameters'] / 1e6:.1f}M", best["chunk_size"],
                         f"{best['peak_bytes'] / MB:.0f}", "yes" if within else "NO", f"next: {stopped}"])  # fmt: skip
    headers = ["budget", "strategy", "largest d", "parameters", "C", "peak MB (VmHWM)", "within", ""]
    subset = "-" + args.strategies.replace(",", "-").replace(" ", "") if args.strategies else ""
    report(f"param_memory-reach-L{args.seq_len}{subset}" + ("-quick" if args.quick else ""), headers, rows,
           {"seq_len": args.seq_len, "records": records})  # fmt: skip


def speed(args) -> None:
    """Full fine-tuning against LoRA at the same model and C: the `fit` JSON's step seconds, interleaved."""
    config = family(args.speed_d)
    ckpt = make_checkpoint(config, f"family-d{args.speed_d}")
    common = ["--steps", args.speed_steps, "--seq-len", args.seq_len, "--chunk-size", args.chunk]
    variants = {
        "full, adam": ["--optimizer", "adam"],
        "full, adafactor": ["--optimizer", "adafactor"],
        "LoRA r8, adam": ["--optimizer", "adam", "--lora-rank", 8],
        "LoRA r8, bf16 base, adam": ["--optimizer", "adam", "--lora-rank", 8, "--base-dtype", "bf16"],
        "LoRA r8, int8 base, adam": ["--optimizer", "adam", "--lora-rank", 8, "--base-dtype", "int8"],
        "LoRA r8, nf4 base, adam": ["--optimizer", "adam", "--lora-rank", 8, "--base-dtype", "nf4"],
    }
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        for name, flags in variants.items():
            code, result, error, _ = fit(ckpt, DATA / "tinyshakespeare.txt", *common, *flags)
            if code != 0:
                sys.exit(f"speed: {name} failed: {error}")
            seconds[name].append(statistics.median(result["step_seconds"][1:] or result["step_seconds"]))
    rows = []
    for name, values in seconds.items():
        ratios = [v / f for v, f in zip(values, seconds["full, adam"], strict=True)]  # within each round
        bf16 = [v / b for v, b in zip(values, seconds["LoRA r8, bf16 base, adam"], strict=True)]
        rows.append([name, f"{min(values):.3f}", f"{statistics.median(values):.3f}", f"{max(values):.3f}",
                     f"{min(ratios):.2f}x", f"{statistics.median(ratios):.2f}x", f"{max(ratios):.2f}x",
                     f"{min(bf16):.2f}x", f"{statistics.median(bf16):.2f}x", f"{max(bf16):.2f}x"])  # fmt: skip
    headers = ["strategy", "s/step min", "median", "max", "vs full, per round: min", "median", "max",
               "vs LoRA bf16 base: min", "median", "max"]  # fmt: skip
    report("param_memory-speed" + ("-quick" if args.quick else ""), headers, rows,
           {"d": args.speed_d, "seq_len": args.seq_len, "chunk_size": args.chunk, "seconds": seconds})  # fmt: skip


def quality(args) -> None:
    """From one pretrained base, the same fine-tuning steps on wikitext2.valid: held-out bpc on wikitext2.test."""
    base = OUT / "quality-base.safetensors"
    steps = ["--steps", args.pretrain_steps] if args.pretrain_steps else []
    code, _, error, seconds = slimtune("pretrain", "--recipe", "small", "--data", DATA / "tinyshakespeare.txt",
                                       "--out", base, "--run-dir", "", "--overwrite", *steps)  # fmt: skip
    if code != 0:
        sys.exit(f"quality: pretrain failed: {error}")
    print(f"pretrained the base in {seconds:.0f} s", flush=True)
    test = DATA / "wikitext2.test.txt"

    def bpc(checkpoint) -> float:
        code, result, error, _ = slimtune("eval", "--checkpoint", checkpoint, "--data", test, "--seq-len", 256,
                                          "--max-bytes", args.eval_bytes)  # fmt: skip
        if code != 0:
            sys.exit(f"quality: eval failed: {error}")
        return result["bpc"]

    before = bpc(base)
    variants = {"full": ["--lr", args.lr_full], f"LoRA r{args.ranks[0]}": ["--lora-rank", args.ranks[0]],
                f"LoRA r{args.ranks[1]}": ["--lora-rank", args.ranks[1]]}  # fmt: skip
    for held in ("bf16", "int8", "nf4"):  # issue 35: the same LoRA on a bf16 base and on quantized ones
        variants[f"LoRA r{args.ranks[1]}, {held} base"] = ["--lora-rank", args.ranks[1], "--base-dtype", held]
    rows, results = [], {}
    for name, flags in variants.items():
        tuned = OUT / f"quality-{name.replace(' ', '-')}.safetensors"
        lr = [] if name == "full" else ["--lr", args.lr_lora]
        shutil.rmtree(f"{tuned}.run", ignore_errors=True)
        code, result, error, seconds = slimtune(
            "fit", "--checkpoint", base, "--data", DATA / "wikitext2.valid.txt", "--out", tuned, "--overwrite",
            "--seq-len", 256,
            "--batch-size", 8, "--steps", args.steps, "--optimizer", "adam", "--chunk-size", 64, *lr, *flags,
        )  # fmt: skip
        if code != 0:
            sys.exit(f"quality: {name} failed: {error}")
        results[name] = {"bpc": bpc(tuned), "trainable_parameters": result["trainable_parameters"],
                         "seconds": seconds}  # fmt: skip
    gain_full = before - results["full"]["bpc"]
    gain_bf16 = before - results[f"LoRA r{args.ranks[1]}, bf16 base"]["bpc"]
    rows.append(["base (no fine-tuning)", "-", f"{before:.4f}", "-", "-", "-"])
    for name, r in results.items():
        gain = before - r["bpc"]
        share = f"{gain / gain_full:.0%}" if gain_full > 0 else "-"
        of_bf16 = f"{gain / gain_bf16:.0%}" if gain_bf16 > 0 and name.endswith("base") else "-"
        rows.append([name, f"{r['trainable_parameters']:,}", f"{r['bpc']:.4f}", f"{-gain:+.4f}", share, of_bf16])
    headers = ["fine-tuning", "trains", "test bpc", "vs base", "share of full's gain", "of bf16 base's"]
    report("param_memory-quality" + ("-quick" if args.quick else ""), headers, rows,
           {"steps": args.steps, "before": before, "results": results})  # fmt: skip


def squeeze(args) -> None:
    """The 832 MB checkpoint of issue 35 under a smaller budget, LoRA r8 on each base: one step each."""
    config = PerformerConfig(hidden_dim=1536, n_layers=8, ffn_dim=6144, n_heads=24)
    ckpt = make_checkpoint(config, "squeeze-d1536x8")
    rows, records = [], []
    for base in ("fp32", "bf16", "int8", "nf4"):
        code, result, error, seconds = fit(ckpt, DATA / "tinyshakespeare.txt", "--steps", 1, "--seq-len", args.seq_len,
                                           "--mem-budget", args.squeeze_budget, "--optimizer", "adam", "--lora-rank",
                                           8, "--base-dtype", base)  # fmt: skip
        record = {"base": base, "exit_code": code, "seconds": seconds, "error": error if code else ""}
        if result:
            record |= {"chunk_size": result["chunk_size"], "peak_bytes": result["peak_memory_bytes"],
                       "predicted_bytes": result["plan"]["predicted_peak_bytes"],
                       "step_seconds": result["step_seconds"]}  # fmt: skip
        records.append(record)
        print(json.dumps(record), flush=True)
        peak = f"{record['peak_bytes'] / MB:.0f}" if result else "-"
        within = ("yes" if record["peak_bytes"] <= parse_size(args.squeeze_budget) else "NO") if result else "-"
        rows.append([base, "trained" if code == 0 else f"exit {code}", record.get("chunk_size", "-"), peak, within,
                     f"{seconds:.0f}", error[:70]])  # fmt: skip
    headers = ["base", "fit", "C", "peak MB (VmHWM)", "within", "s (whole fit)", "why not"]
    report(f"param_memory-squeeze-{args.squeeze_budget}", headers, rows,
           {"parameters": parameters(config), "seq_len": args.seq_len, "records": records})  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["reach", "speed", "quality", "squeeze", "all"])
    parser.add_argument("--squeeze-budget", default="800MB")
    parser.add_argument("--budgets", default="1GB,2GB")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-seconds", type=float, default=600, help="reach: stop a family at a cell this slow")
    parser.add_argument("--strategies", default="", help="reach: only these (substrings of the names, comma list)")
    parser.add_argument("--start-d", type=int, default=0, help="reach: the first d tried (default: the smallest)")
    parser.add_argument("--speed-d", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="quality: fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="quality: 0 = the recipe's")
    parser.add_argument("--lr-full", default="0.001")
    parser.add_argument("--lr-lora", default="0.003")
    parser.add_argument("--eval-bytes", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of the script")
    args = parser.parse_args()
    args.family, args.ranks = FAMILY, (4, 16)
    if args.quick:
        args.budgets, args.seq_len, args.family, args.speed_d, args.chunk = "1GB", 256, (64, 128), 64, 64
        args.repeats, args.speed_steps, args.steps, args.pretrain_steps, args.eval_bytes = 1, 1, 3, 3, 5000
    parts = ["reach", "speed", "quality"] if args.part == "all" else [args.part]
    for part in parts:
        {"reach": reach, "speed": speed, "quality": quality, "squeeze": squeeze}[part](args)


if __name__ == "__main__":
    main()

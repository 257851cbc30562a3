"""How exact are SLiM's recovered states in fp32? (issue 2, item 4)

The paper recovers a chunk's start state by subtracting the chunk's contribution from its end state. In fp32 each
subtraction rounds, and over many chunks with large states (long L, unbounded sqr features) the errors add up.
This compares fp32 gradients of each recovery mode, and of plain fp32 backprop, with a float64 computation.

Model: d = 64, 2 layers, d_ff = 256, 4 heads, sqr and relu features, k_map weights scaled x3 so states are large;
L = 32768, batch 1.

    python benchmarks/state_recovery.py [--seq-len 32768] [--chunk 256 32]
    python benchmarks/state_recovery.py --tiny --seq-len 100 --chunk 1 7 --features relu
"""

import argparse
import time

import torch
from _common import report

from slimtune.pretrained import PerformerConfig, PerformerLM
from slimtune.slim import slim_step


def grads(model, windows, chunk, recovery="subtract64"):
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss = slim_step(model, windows, chunk, recovery=recovery)
    seconds = time.perf_counter() - started
    return loss, {n: p.grad.double().clone() for n, p in model.named_parameters()}, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--features", nargs="+", default=["sqr", "relu"])
    parser.add_argument(
        "--tiny", action="store_true", help="the unit tests' model and inputs (d 16, 2 heads, random ids)"
    )
    args = parser.parse_args()
    rows, results = [], {}
    for feature in args.features:
        run_feature(feature, args.seq_len, args.chunk, rows, results, tiny=args.tiny)
    report(
        "state_recovery" + ("-tiny" if args.tiny else ""),
        ["features", "run", "loss rel err", "max grad rel err", "worst tensor", "s"],
        rows,
        {"seq_len": args.seq_len, "results": results},
    )


def run_feature(feature, L, chunks, rows, results, tiny=False):
    if tiny:
        config = PerformerConfig(hidden_dim=16, n_layers=2, ffn_dim=32, n_heads=2, feature_type=feature)
    else:
        config = PerformerConfig(hidden_dim=64, n_layers=2, ffn_dim=256, n_heads=4, feature_type=feature)
    torch.manual_seed(0)
    model = PerformerLM(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.k_map.weight *= 1.0 if tiny else 3.0
    text = open(__file__.replace("state_recovery.py", "../../shared/data/tinyshakespeare.txt"), "rb").read()
    windows = torch.tensor(list(text[: L + 1]))[None]
    if tiny:  # the unit tests' inputs: random byte ids, as in tests/test_slim.py
        windows = torch.randint(0, 256, (1, L + 1), generator=torch.Generator().manual_seed(0))
    ref_loss, ref, _ = grads(model.double(), windows, L)
    model.float()
    with torch.no_grad():
        states = model.advance(windows[:, :-1], 0, model.initial_states(1))
    state_norm = max(s.abs().max().item() for s in states)
    for label, chunk, recovery in [("fp32 full backprop", L, "subtract64")] + [
        (f"SLiM C={c} {mode}", c, mode) for c in chunks for mode in ("subtract", "subtract64", "store")
    ]:
        loss, g, seconds = grads(model, windows, chunk, recovery)
        errs = {n: ((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
        worst = max(errs, key=errs.get)
        results[f"{feature} {label}"] = {
            "max_abs_state_entry": state_norm,
            "loss_rel_err": abs(loss - ref_loss) / ref_loss,
            "max_grad_rel_err": errs[worst],
            "worst_tensor": worst,
            "seconds": seconds,
        }
        rows.append(
            [feature, label, f"{abs(loss - ref_loss) / ref_loss:.1e}", f"{errs[worst]:.1e}", worst, f"{seconds:.1f}"]
        )
    print(f"{feature}: largest state entry at the end of the sequence: {state_norm:.3g}")


if __name__ == "__main__":
    main()

"""`slimtune demo`: the whole workflow on data it makes itself, with no downloads and no arguments.

1. Write two made-up corpora: general sentences (the "server" corpus) and a ship's log (the user's document).
2. Pretrain a tiny Performer on the server corpus with ordinary backprop and export a contract checkpoint.
3. Plan fine-tuning at a long sequence length under a small memory budget: full backprop does not fit.
4. Fine-tune on the log with SLiM at the chosen C, and compare bits per character on held-out log text.
5. Reload the exported checkpoint into a fresh full model and confirm it gives identical logits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import read_bytes
from .evaluation import evaluate
from .memory import release_free_heap, reset_peak_rss
from .options import Runtime, default_of
from .planner import Workload, budget_holding, plan_chunk_size, usable_bytes
from .pretrained import PerformerConfig, PerformerLM
from .train import FitOptions, fit, pretrain

CONFIG = PerformerConfig(
    vocab_size=256, hidden_dim=64, n_layers=2, ffn_dim=256, n_heads=4, feature_type="sqr", on_gptln=True
)
SEQ_LEN = 8192  # the fine-tune's L: full backprop over it does not fit the small device's budget

_PEOPLE = ["the captain", "an old sailor", "my brother", "the cook", "a young doctor", "the teacher", "our neighbour"]
_VERBS = ["found", "carried", "painted", "watched", "sold", "repaired", "forgot", "opened"]
_THINGS = ["a small boat", "the red door", "a bag of apples", "the long letter", "an empty box", "the garden gate"]
_PLACES = ["near the harbour", "in the morning", "after dinner", "under the bridge", "at the market", "by the river"]
_WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]


def server_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        when = rng.choice(["", f" at {rng.randint(1, 12)} o'clock", f" on day {rng.randint(1, 300)}"])
        who, did, what, where = rng.choice(_PEOPLE), rng.choice(_VERBS), rng.choice(_THINGS), rng.choice(_PLACES)
        s = f"{who.capitalize()} {did} {what} {where}{when}."
        s += "\n" if rng.random() < 0.25 else " "
        parts.append(s)
        size += len(s)
    return "".join(parts)


def log_text(n_bytes: int, seed: int = 1) -> str:
    """A ship's log: a rhythm the server corpus never shows, with numbers that carry over between entries."""
    rng = random.Random(seed)
    parts, size, day, course = [], 0, 1, 90
    while size < n_bytes:
        course = (course + rng.choice([-10, 0, 0, 10])) % 360
        s = (
            f"Day {day}: wind {rng.choice(_WINDS)} at {rng.randint(5, 30)} knots, course {course:03d}, "
            f"{rng.choice(_PEOPLE)} {rng.choice(_VERBS)} {rng.choice(_THINGS)}.\n"
        )
        parts.append(s)
        size += len(s)
        day += 1
    return "".join(parts)


def run_demo(
    workdir: str | Path,
    say: Callable[[str], None] = lambda text: None,
    *,
    pretrain_steps: int = 300,
    fit_steps: int = 40,
    threads: int | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> dict:
    """The demo's five steps (module docstring), reported line by line through `say`; returns its figures.
    `threads`: CPU threads (None: SLIMTUNE_THREADS, else the free cores); `on_warning`: the runs' warnings (a
    neighbour took a core, ...; default: warnings.warn)."""
    started = time.perf_counter()
    workdir = Path(workdir)
    corpus, document, held_out = _write_corpora(workdir, say)
    base = _pretrain(workdir, corpus, pretrain_steps, threads, on_warning, say)
    model = PerformerLM.from_pretrained(base)
    budget, full_backprop = _small_device_budget(model, say)
    before = evaluate(model, read_bytes(held_out), seq_len=SEQ_LEN).bpc
    tuned = workdir / "tuned.safetensors"
    result = _fine_tune(base, document, tuned, budget, fit_steps, threads, on_warning, say)
    after = evaluate(result.model, read_bytes(held_out), seq_len=SEQ_LEN).bpc
    say(
        f"[bold]4. fine-tune[/bold]  {result.steps} adam steps with SLiM at C = {result.chunk_size}, L {SEQ_LEN}: "
        f"held-out bpc {before:.3f} -> {after:.3f}; "
        f"peak memory predicted {result.plan.predicted_peak_bytes / 1e6:.1f} MB, "
        f"measured {result.peak_memory_bytes / 1e6:.1f} MB (budget {budget / 1e6:.1f} MB), {result.seconds:.1f} s"
    )
    diff = _reload_difference(tuned, result.model, held_out)
    say(f"[bold]5. export[/bold]  {tuned} reloaded into a fresh full model: max |logit difference| = {diff:g}")
    say(
        "      less memory still: LoRA adapters on a frozen base (--lora-rank 8; --base-dtype bf16, int8 or nf4 holds "
        "the base in 2, 1 or 0.56 bytes a weight), adafactor or sgd; "
        f"`slimtune plan --checkpoint {base} --seq-len {SEQ_LEN} --mem-budget {budget}` shows the C of each"
    )
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.0f} s; files in {workdir.resolve()}")
    return {
        "workdir": str(workdir.resolve()),
        "base": str(base),
        "tuned": str(tuned),
        "chunk_size": result.chunk_size,
        "seq_len": SEQ_LEN,
        "budget_bytes": budget,
        "full_backprop_predicted_bytes": full_backprop,
        "bpc_before": before,
        "bpc_after": after,
        "max_logit_diff": diff,
        "peak_memory_bytes": result.peak_memory_bytes,
        "seconds": seconds,
    }


def _write_corpora(workdir: Path, say) -> tuple[Path, Path, Path]:
    """Step 1: the server's corpus, the device's log and its held-out tail."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, document, held_out = workdir / "server.txt", workdir / "log.txt", workdir / "log-valid.txt"
    corpus.write_text(server_text(400_000))
    log = log_text(160_000)
    document.write_text(log[:120_000])
    held_out.write_text(log[120_000:])
    say(f"[bold]1. data[/bold]  {corpus} ({corpus.stat().st_size:,} B), {document} and {held_out}")
    return corpus, document, held_out


def _pretrain(workdir: Path, corpus: Path, steps: int, threads, on_warning, say) -> Path:
    """Step 2: the server's model, pretrained with full backprop at a short L."""
    base = workdir / "base.safetensors"
    options = FitOptions(
        seq_len=256,
        batch_size=8,
        steps=steps,
        optimizer="adam",
        lr=3e-3,
        device="cpu",
        threads=threads,
        run_dir=None,
        overwrite=True,  # the demo's own files in its workdir, written again by each demo
    )
    pre = pretrain(CONFIG, read_bytes(corpus), base, options, data_path=corpus, on_warning=on_warning)
    say(
        f"[bold]2. pretrain[/bold]  d {CONFIG.hidden_dim}, {CONFIG.n_layers} layers, {pre.steps} steps of full "
        "backprop at "
        f"L 256: loss {pre.loss:.2f} -> {pre.final_loss:.2f} nats/byte in {pre.seconds:.1f} s -> {base}"
    )
    return base


def _small_device_budget(model: PerformerLM, say) -> tuple[int, int]:
    """Step 3: (a budget that rules out full backprop at L = SEQ_LEN, full backprop's predicted peak)."""
    # C = L/4 checked without a budget: its prediction, the next C on the grid's, and every power of two's.
    work = Workload.of(_fine_tune_options(None, 0, None))  # the fine-tune's own workload, as fit builds it
    quarter = plan_chunk_size(model, work, None, forced=SEQ_LEN // 4, heap=default_of(Runtime, "heap"))
    full_backprop = next(c.predicted_peak_bytes for c in quarter.candidates if c.chunk_size == SEQ_LEN)
    # Emulate a small device: a budget whose usable share (less the planner's headroom) lies halfway between what
    # the planner judges at C = L/4 and at the next C of its grid, as far from either edge as the grid allows (a
    # budget halfway between L/4 and L/2 left L/4 a few MB inside the usable share). Another process, such as the
    # `slimtune plan` printed below, measures its own runtime and may still land one C of the grid away.
    usable = usable_bytes(quarter.budget_bytes)
    at_quarter, at_next = usable - quarter.margin_bytes, usable + quarter.next_over_bytes
    budget = int(budget_holding((at_quarter + at_next) / 2))
    say(
        f"[bold]3. plan[/bold]  L {SEQ_LEN} under a budget of {budget / 1e6:.1f} MB (a small device); "
        f"full backprop would need {full_backprop / 1e6:.1f} MB"
    )
    return budget, full_backprop


def _fine_tune(base: Path, document: Path, tuned: Path, budget: int, steps: int, threads, on_warning, say):
    """Step 4: fine-tune on the device's log under the budget, C planned; the plan's table."""
    release_free_heap()  # what pretraining freed leaves the process, and
    reset_peak_rss()  # the fine-tune reports its own peak, not the pretraining's
    options = _fine_tune_options(budget, steps, threads)
    result = fit(load_checkpoint(base), read_bytes(document), tuned, options, data_path=document, on_warning=on_warning)
    for c in result.plan.candidates:
        if c.chunk_size >= 128:
            mark = "<- chosen" if c.chunk_size == result.chunk_size else ("" if c.fits else "does not fit")
            say(
                f"      C {c.chunk_size:>5}  predicted peak {c.predicted_peak_bytes / 1e6:7.1f} MB  "
                f"time x{c.relative_time:.2f}  {mark}"
            )
    return result


def _fine_tune_options(budget: int | None, steps: int, threads: int | None) -> FitOptions:
    return FitOptions(
        seq_len=SEQ_LEN,
        batch_size=1,
        steps=max(1, steps),
        optimizer="adam",
        lr=2e-3,
        mem_budget=budget,
        device="cpu",
        threads=threads,
        run_dir=None,
        overwrite=True,
    )


def _reload_difference(tuned: Path, model: PerformerLM, held_out: Path) -> float:
    """Step 5: the largest logit difference between the exported file, reloaded, and the model in memory."""
    reloaded = PerformerLM.from_pretrained(tuned)
    probe = read_bytes(held_out)[:SEQ_LEN].long()[None]
    with torch.no_grad():
        return (reloaded(probe) - model(probe)).abs().max().item()

"""What the command line prints (slimtune/render.py): counts and plurals, the plain progress lines of a job
outside a terminal (a log, CI), warnings in flag words, and the flags a plan's strategy row says to add."""

import re

import pytest

from slimtune import render
from slimtune.strategies import Strategy


@pytest.mark.parametrize("n, text", [(1, "1 step"), (0, "0 steps"), (2, "2 steps"), (1000, "1000 steps")])
def test_plural(n, text):
    assert render.plural(n, "step") == text


@pytest.mark.parametrize("n, text", [(17_500_000, "17.5M"), (393_216, "393k"), (2_100_000_000, "2.1B"), (512, "512")])
def test_parameter_counts_read_in_three_digits(n, text):
    assert render._count(n) == text


def test_outside_a_terminal_a_long_job_prints_a_plain_line_with_the_time_left(monkeypatch, capsys):
    assert not render.err.is_terminal  # captured: no bar
    monkeypatch.setenv("SLIMTUNE_PROGRESS_SECONDS", "0")
    clock = iter([100.0, 104.0, 108.0])
    monkeypatch.setattr(render.time, "monotonic", lambda: next(clock))
    with render.Reporter("fit", 10) as progress:
        progress.update(2, "loss 1.0")  # 4 s for 2 of 10: 16 s to go
        progress.update(4, "loss 0.9")  # 8 s for 4 of 10: 12 s to go
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "fit: 2/10  loss 1.0  elapsed 4 s, ETA 16 s",
        "fit: 4/10  loss 0.9  elapsed 8 s, ETA 12 s",
    ]


def test_a_short_job_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("SLIMTUNE_PROGRESS_SECONDS", "10")
    with render.Reporter("plan", 3) as progress:
        for i in range(3):
            progress.update(i + 1)
    assert capsys.readouterr().err == ""


def test_a_warning_names_flags(capsys):
    render.warning("`threads` is more than the free cores: lower `threads`")
    assert re.sub(r"\s+", " ", capsys.readouterr().err).strip() == (
        "warning: --threads is more than the free cores: lower --threads"
    )


def test_a_strategy_row_says_which_flags_to_add():
    asked = Strategy("adam")
    assert render._flags_to_add(asked, asked) == "(as asked)"
    assert render._flags_to_add(asked, Strategy("sgd")) == "--optimizer sgd"
    lora_bf16 = Strategy("adam", lora_rank=8, base_dtype="bf16")
    assert render._flags_to_add(asked, lora_bf16) == "--lora-rank 8 --base-dtype bf16"
    assert render._flags_to_add(lora_bf16, asked) == "--lora-rank 0 --base-dtype fp32"  # back to the defaults


def test_step_info_shows_the_figures_of_a_step():
    m = {"loss": 1.23456, "tokens_per_s": 12345.6, "chunk_size": 256, "peak_memory_bytes": 400_000_000}
    assert render.step_info(m) == "loss 1.2346  12,346 tok/s  C 256  peak 400.00 MB"
    assert "bpc 3.210" in render.step_info(m | {"bpc": 3.21})

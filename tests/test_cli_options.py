"""The command line's side of the declaration (slimtune/cli_options.py): library messages shown with flags, and
the typer parameters a command derives from a group (its own default or help, never its own flag or bounds)."""

import typer.main

from slimtune.cli import app
from slimtune.cli_options import cli_message
from slimtune.errors import ConfigError, Notice


def test_the_cli_shows_parameters_as_flags():
    """Each marked parameter becomes its flag; a value after it stays; paths and plain words are not touched, even
    where they spell an option's name (a folder called data, "4 steps")."""
    error = ConfigError("`seq_len` must be >= 1; lower `seq_len`, or `recovery=store`", params=("seq_len", "recovery"))
    assert cli_message(error) == "--seq-len must be >= 1; lower --seq-len, or --state-recovery=store"
    text = "`data` file /tmp/data/steps.txt has 4 steps of data: lower `steps` or `copy_symbols`"
    assert cli_message(ConfigError(text, params=("data", "steps"))) == (
        "--data file /tmp/data/steps.txt has 4 steps of data: lower --steps or copy_symbols"  # no flag: the name
    )


def test_a_warning_is_one_line_with_flags():
    notice = Notice("`threads` 8 is more than the\n   4 free cores: lower `threads`", params=("threads",))
    assert cli_message(notice) == "--threads 8 is more than the 4 free cores: lower --threads"
    assert cli_message("`batch_weight_grads=True` does not fit") == "batch_weight_grads=True does not fit"  # no flag


def _option(command: str, flag: str):
    group = typer.main.get_command(app)
    return next(p for p in group.commands[command].params if flag in p.opts)


def test_a_command_may_change_an_options_default_and_help_but_not_its_bounds():
    fit_lr, eval_lr = _option("fit", "--lr"), _option("eval", "--lr")
    assert eval_lr.default == 0.01 != fit_lr.default and eval_lr.help != fit_lr.help  # eval's own
    fit_seq, eval_seq = _option("fit", "--seq-len"), _option("eval", "--seq-len")
    assert fit_seq.min == eval_seq.min == 1  # the declaration's bound, in every command
    bench_steps = _option("bench", "--steps")
    assert bench_steps.default == 3 and bench_steps.min == _option("fit", "--steps").min == 1

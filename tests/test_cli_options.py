"""The command line's side of the declaration (slimtune/cli_options.py): library messages shown with flags, the
typer parameters a command derives from a group (its own default or help, never its own flag or bounds), and the
typed values a command body is given."""

from pathlib import Path

import pytest
import typer.main

from slimtune.cli import app
from slimtune.cli_options import cli_message, command, params
from slimtune.errors import ConfigError, Notice
from slimtune.options import DataOptions, Files, Optimization, Output


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


def test_a_command_body_is_given_typed_groups_made_from_its_flags():
    """Each group parameter gets its group made from the flags among its fields (the others: their declared
    defaults); a plain parameter gets the flag of its name, which then reaches no group."""
    seen = {}
    cli = typer.Typer()

    @command(cli, params(Files, "out"), params(DataOptions, "seq_len", "batch_size"), params(Output, "json"))
    def body(files: Files, data: DataOptions, batch_size: int, output: Output):
        seen.update(files=files, data=data, batch_size=batch_size, output=output)

    cli(args=["--out", "x.safetensors", "--seq-len", "64", "--batch-size", "3", "--json"], standalone_mode=False)
    assert seen["files"] == Files(out=Path("x.safetensors"))
    assert seen["data"] == DataOptions(seq_len=64) and seen["data"].batch_size == 1  # --batch-size is batch_size's
    assert seen["batch_size"] == 3 and seen["output"] == Output(json=True)


def _lr_body(lr: float, output: Output): ...


def _files_body(files: Files, output: Output): ...


def _untyped_body(output, lr: float): ...


SEQ_LEN_LR_JSON = (params(DataOptions, "seq_len"), params(Optimization, "lr"), params(Output, "json"))


@pytest.mark.parametrize(
    "body, flags, error",
    [
        (_lr_body, SEQ_LEN_LR_JSON, "the flags seq_len reach no parameter"),  # a flag the body would drop
        (_lr_body, (params(Output, "json"),), "no flag for the parameters lr"),  # a value no flag gives
        (_files_body, SEQ_LEN_LR_JSON, "no flag for a field of files: Files"),  # a group no flag fills
        (_untyped_body, SEQ_LEN_LR_JSON, "annotate the parameters output"),
    ],
    ids=["dropped-flag", "plain-without-flag", "group-without-flags", "untyped"],
)
def test_a_body_that_does_not_match_its_flags_is_refused_when_registered(body, flags, error):
    with pytest.raises(TypeError, match=error):
        command(typer.Typer(), *flags)(body)

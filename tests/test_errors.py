"""The library's exception types (slimtune/errors.py): every error is a SlimtuneError (and a ValueError, so callers
that catch bad values catch it) carrying the parameters its message names as a tuple; a Notice is a plain str that
keeps its parameters; Interrupted is a KeyboardInterrupt that says where and after which step the run was saved."""

import pytest

from slimtune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    Notice,
    OutOfBudgetError,
    SlimtuneError,
)


def test_an_error_keeps_its_message_and_its_parameters_as_a_tuple():
    error = SlimtuneError("seq_len must be >= 1, got 0", params=["seq_len", "chunk_size"])
    assert str(error) == "seq_len must be >= 1, got 0"
    assert error.params == ("seq_len", "chunk_size") and isinstance(error.params, tuple)
    assert SlimtuneError("no parameter named").params == ()


@pytest.mark.parametrize("kind", [ConfigError, CheckpointError, DataError, OutOfBudgetError])
def test_every_error_is_one_family_and_a_value_error(kind):
    with pytest.raises(SlimtuneError) as info:
        raise kind("bad", params=("mem_budget",))
    assert isinstance(info.value, ValueError) and type(info.value) is kind
    assert info.value.params == ("mem_budget",)
    with pytest.raises(ValueError):
        raise kind("bad")


def test_a_notice_is_its_text_and_keeps_its_parameters():
    notice = Notice("another process is keeping a core busy", params=["threads"])
    assert isinstance(notice, str) and notice == "another process is keeping a core busy"
    assert notice.params == ("threads",)
    assert "core busy" in notice and notice.upper() == "ANOTHER PROCESS IS KEEPING A CORE BUSY"
    assert Notice("plain").params == ()
    assert str(notice) == "another process is keeping a core busy"


def test_interrupted_says_where_and_after_which_step_it_was_saved():
    with pytest.raises(KeyboardInterrupt) as info:
        raise Interrupted("runs/a", 17)
    stop = info.value
    assert (stop.run_dir, stop.saved_step) == ("runs/a", 17)
    assert not isinstance(stop, SlimtuneError)  # a stop, not bad input: the CLI must not turn it into exit 2
    nothing = Interrupted(None, None)
    assert nothing.saved_step is None and nothing.run_dir is None

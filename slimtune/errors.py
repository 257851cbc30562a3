"""The library's exception types. Each message names the bad value by its Python parameter, marked in backticks
(`seq_len`, `optimizer=sgd`), and says how to fix it; `params` lists the parameters it names. The command line,
the one place that knows flags (slimtune/options.py), shows each marked name as its flag; only it turns errors
into a one-line message and exit code 2."""

from __future__ import annotations


class SlimtuneError(ValueError):
    """Input the user can fix (a bad value, file, checkpoint or budget)."""

    def __init__(self, message: str, *, params: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.params = tuple(params)


class ConfigError(SlimtuneError):
    """A model configuration or engine argument that is invalid."""


class CheckpointError(SlimtuneError):
    """A checkpoint that cannot be read, or does not match the contract."""


class DataError(SlimtuneError):
    """A data file that is missing, empty or too short."""


class OutOfBudgetError(SlimtuneError):
    """A memory budget that fits no chunk size, or a device that ran out of memory even at C = 1."""


class Notice(str):
    """A warning's text (passed to `on_warning` callbacks) with the parameters it names, like SlimtuneError's."""

    params: tuple[str, ...] = ()

    def __new__(cls, message: str, *, params: tuple[str, ...] | list[str] = ()):
        notice = super().__new__(cls, message)
        notice.params = tuple(params)
        return notice


class Interrupted(KeyboardInterrupt):
    """A training run stopped by Ctrl-C or SIGTERM. `saved_step`: the completed steps in the run state it saved
    (None: it was stopped before its run state existed, and nothing was saved); `run_dir`: where."""

    def __init__(self, run_dir: str | None, saved_step: int | None):
        super().__init__(run_dir, saved_step)
        self.run_dir, self.saved_step = run_dir, saved_step

"""The library's exception types. Each message names the bad value and how to fix it; only the CLI turns
them into a one-line message and exit code 2."""


class SlimtuneError(ValueError):
    """Input the user can fix (a bad value, file, checkpoint or budget)."""


class ConfigError(SlimtuneError):
    """A model configuration or engine argument that is invalid."""


class CheckpointError(SlimtuneError):
    """A checkpoint that cannot be read, or does not match the contract."""


class DataError(SlimtuneError):
    """A data file that is missing, empty or too short."""


class OutOfBudgetError(SlimtuneError):
    """A memory budget that fits no chunk size, or a device that ran out of memory even at C = 1."""

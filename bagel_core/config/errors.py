"""Errors that reach users: every message names the file/key/row and the fix."""


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and how to fix it."""


class DataError(ValueError):
    """Input data is unusable as a whole (not a single bad sample, which is quarantined instead)."""


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite and ``--nonfinite_loss stop`` is in force: the message names the step
    and the samples of the pack."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, permissions): the message names the folder, the space
    free and needed; the previous complete checkpoint is untouched."""

"""Errors that reach users: every message names the file/key/row and the fix."""


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and how to fix it."""


class DataError(ValueError):
    """Input data is unusable as a whole (not a single bad sample, which is quarantined instead)."""

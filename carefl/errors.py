"""Errors raised at CareFL's edges. Each message names the thing that is wrong and the fix."""


class CareFLError(Exception):
    """Base class: one clear, user-facing line."""


class ConfigError(CareFLError, ValueError):
    """A config key has an impossible value (message names the key and the fix)."""


class DataError(CareFLError, ValueError):
    """A hospital's data cannot be used (message names the hospital, the file and the problem)."""


class CheckpointError(CareFLError):
    """A run's checkpoint cannot be used to resume (message names the file and the fix)."""

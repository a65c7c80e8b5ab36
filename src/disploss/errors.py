"""The errors that are the user's to fix.

Commands print a `UsageError` as one line `disploss CMD: error: ...` and exit with status 2; every other
exception is a bug or an environment failure and keeps its traceback. Each subclass also derives from the
built-in exception a Python caller would expect (a bad value is a ValueError, a missing file a
FileNotFoundError), so library users can catch either.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HubUnavailableError",
    "MissingDependencyError",
    "MissingFileError",
    "NonFiniteWeightsError",
    "UsageError",
]


class UsageError(Exception):
    """Base class: a mistake in a flag, an input file or the environment, with a message meant for the user."""


class ConfigError(UsageError, ValueError):
    """A bad option value, or options that contradict each other or an input file."""


class MissingFileError(UsageError, FileNotFoundError):
    """An input file or folder named by the user does not exist."""


class MissingDependencyError(UsageError, ImportError):
    """An optional package is needed for what was asked (the message gives the pip command)."""


class HubUnavailableError(UsageError, OSError):
    """A model could not be fetched from the Hugging Face hub (offline, or an unknown id)."""


class NonFiniteWeightsError(UsageError, ValueError):
    """Weights that hold NaN or infinite values (a diverged run, or damage), refused on load with the tensor named."""

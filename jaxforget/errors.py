"""User-facing errors: one line, naming the file / line / field, exit code 2."""

from __future__ import annotations


class JaxforgetError(Exception):
    """An error caused by the user's input. The CLI prints ``str(err)`` on one line and exits 2."""

    exit_code = 2

    def __str__(self) -> str:  # keep it on one line whatever the message contains
        return " ".join(super().__str__().split())


class CheckpointFormatError(JaxforgetError):
    """A model folder or weight file cannot be loaded as asked."""


class ConfigError(JaxforgetError):
    """A config file, key or value is wrong."""


class RequestError(JaxforgetError):
    """A deletion request (requests file line or field) is wrong."""

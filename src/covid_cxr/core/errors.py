"""Errors a user can act on. The CLI prints these as one line and exits 2; anything else is a bug
and keeps its traceback (so a bug is never mistaken for bad input)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable file: the message says what is wrong and where."""


class DataError(UserError, ValueError):
    """A dataset folder or option that cannot be used (no images, empty split, bad balance)."""


class ConfigError(UserError, ValueError):
    """A configuration value out of its allowed range."""


class DataNotFound(DataError, FileNotFoundError):
    """A dataset folder, or a class folder in it, that is not there."""

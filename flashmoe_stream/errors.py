"""Errors a user can cause. Each carries a message that says what to do; the CLI prints it on one line."""


class FlashMoeError(Exception):
    """Base class of every error the user can cause or fix."""


class BadFileError(FlashMoeError):
    """A missing, truncated, foreign or inconsistent model file."""


class UnsupportedError(FlashMoeError):
    """An architecture, quantisation type or option this runtime does not handle."""


class BudgetError(FlashMoeError):
    """A memory budget too small to run, or one that cannot be parsed."""
